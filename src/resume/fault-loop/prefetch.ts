import {type ImageReader} from '../../snapshot/layered-reader.js'
import {MADV, processMadvise, SysError} from '../../sys/index.js'
import {type RunClock, type RunStats} from '../run-stats.js'
import {type Client} from './client.js'
import {type FaultServer, type FaultWindow} from './fault-server.js'
import {type CopiedRange, type Installed, type Installer, type Outcome} from './installer.js'
import {PAGE_MISSING} from './page-states.js'
import {type PayloadSource} from './payload-source.js'
import {WorkingSetHelper} from './working-set-helper.js'

export interface PrefetchOptions {
  /** Upper bound of sequential readahead, bytes past the last fault's window. 0 disables it. */
  readaheadBytes: number
  /** Fill all of each client's memory in the background (demand faults still go first). */
  populateAll: boolean
  /** How many units past a queue's head are asked of the source at once. */
  decodeAhead: number
  /** Hand most of a client's staged working set to a helper thread (native/libuffd_fill). */
  installHelper?: boolean
}

/**
 * What a client still wants installed ahead of its faults, in order. Entries are reader units:
 * chunks, or packed working-set blocks (numbered after the chunks).
 */
interface ClientQueue {
  client: Client
  /** Readahead: chunks just past a sequential run of faults. Served before `background`. */
  urgent: number[]
  urgentAt: number
  /** Population: every chunk of the client's regions, in image order. */
  background: number[]
  backgroundAt: number
  /** First page after the last fault's window, and how many faults in a row continued there. */
  nextPage: number
  streak: number
  /** Chunks already queued as readahead (so a long sequential run does not queue twice). */
  aheadUntilChunk: number
  completeReported: boolean
  /** The working set is urgent[0..workingSetEnd): readahead appends after it. */
  workingSetEnd: number
  /** feed() has seen urgent[..urgentFedTo) and background[..backgroundFedTo). */
  urgentFedTo: number
  backgroundFedTo: number
  /** The rest of the working set, being installed by a helper thread. */
  helper?: WorkingSetHelper
}

/**
 * One step of prefetch work: 'busy' (it installed something), 'waiting' (everything left waits
 * for a decode or a helper), 'idle' (nothing to do), 'outcome' (a client's install stopped:
 * 'retry' while its events are unread, 'gone'), 'failed' (serving that client is impossible).
 */
export type PrefetchStep =
  | {result: 'busy' | 'waiting' | 'idle'}
  | {result: 'outcome'; client: Client; outcome: Exclude<Outcome, 'served'>}
  | {result: 'failed'; client: Client; error: Error}

/**
 * Installs memory before it faults: the working set, sequential readahead (a run of faults that
 * each continue the previous window asks for a growing stretch ahead) and background population.
 * Units that need decoding are asked of the payload source ahead of time (decoded on other
 * cores); the fault loop only copies, one unit per step, and checks for demand faults between
 * steps, so a fault never waits behind prefetch. It tells the loop when a client's memory is
 * complete through step()'s caller asking completedClients().
 */
export class Prefetcher {
  private readonly queues = new Map<number, ClientQueue>()
  private readonly pagesPerChunk: number
  /** Clients whose memory became complete since last asked (completedClients). */
  private readonly completed: Client[] = []

  constructor(
    private readonly server: FaultServer,
    private readonly installer: Installer,
    private readonly source: PayloadSource,
    private readonly reader: ImageReader,
    private readonly stats: RunStats,
    private readonly clock: RunClock,
    private readonly options: PrefetchOptions,
  ) {
    this.pagesPerChunk = reader.geometry.pagesPerChunk
    this.updateRetention()
  }

  /** `workingSet`: units to install before anything else (a recorded working set), in order. */
  addClient(client: Client, workingSet: readonly number[] = []): void {
    const urgent = workingSet.filter((unit) => this.needed(client, unit))
    this.stats.add('workingSetChunks', urgent.length)
    const q: ClientQueue = {client, urgent, urgentAt: 0, background: [], backgroundAt: 0, nextPage: -1, streak: 0, aheadUntilChunk: -1, completeReported: false, workingSetEnd: urgent.length, urgentFedTo: 0, backgroundFedTo: 0}
    this.queues.set(client.id, q)
    this.updateRetention()
    this.source.adoptStaged(client.id, urgent)
    if (this.options.installHelper) this.startHelper(q)
    if (this.options.populateAll) this.populate(client)
  }

  private startHelper(q: ClientQueue): void {
    const started = WorkingSetHelper.start(q.client, q.urgent.slice(0, q.workingSetEnd), {
      reader: this.reader,
      installer: this.installer,
      source: this.source,
      blockRuns: (block) => this.server.blockRuns(block),
    })
    if (!started) return
    q.urgent.splice(started.loopUnits, started.helper.units.length)
    q.workingSetEnd = started.loopUnits
    q.helper = started.helper
  }

  /**
   * Collects a helper's work, and once it has stopped, the helper itself. Returns an outcome
   * when it stopped on one; throws when it stopped on an unexpected error (the helper then stays
   * until the client is dropped, so settle() sees that it did not complete its part).
   */
  private pollHelper(q: ClientQueue): Exclude<Outcome, 'served'> | undefined {
    const helper = q.helper
    if (!helper) return undefined
    const progress = helper.poll()
    this.countHelperPages(progress.pages)
    if (progress.error) throw progress.error
    if (!progress.stopped && progress.outcome === 'served') return undefined
    this.dropHelper(q)
    this.checkWorkingSet(q)
    return progress.outcome === 'served' ? undefined : progress.outcome
  }

  private countHelperPages(pages: number): void {
    this.stats.add('prefetchedPages', pages)
    this.stats.add('helperPages', pages)
  }

  private dropHelper(q: ClientQueue): void {
    q.helper?.stop()
    q.helper = undefined
  }

  /** Queues all of the client's memory for background population (once). */
  populate(client: Client): void {
    const q = this.queues.get(client.id)
    if (!q || q.background.length > 0) return
    const seen = new Set<number>()
    for (const r of client.map.imagePageRanges(this.reader.geometry.pageSize)) {
      for (let c = Math.floor(r.firstPage / this.pagesPerChunk); c * this.pagesPerChunk < r.endPage; c++) {
        if (!seen.has(c)) q.background.push(c)
        seen.add(c)
      }
    }
  }

  removeClient(client: Client): void {
    const q = this.queues.get(client.id)
    if (q) this.settle(q)
    this.queues.delete(client.id)
    this.updateRetention()
    this.source.releaseOwner(client.id)
  }

  /**
   * A decoded payload is worth a copy into the cache when released only if someone will want it
   * again: another client of the snapshot, or faults whose window is smaller than a chunk.
   */
  private updateRetention(): void {
    this.source.retainReleased = this.queues.size > 1 || this.server.windowSizes.minPages < this.pagesPerChunk
  }

  /**
   * Before a client is dropped: stops its helper and collects its counts. A helper that had
   * already finished its part completed it, and with the loop's part done (by prefetch or by
   * faults) the working set is complete: recorded now, whichever the loop saw first, the
   * helper's signal or the client's exit (both can arrive in one wake-up, and a client that
   * found its set installed may exit at once).
   */
  private settle(q: ClientQueue): void {
    const helper = q.helper
    if (helper && !helper.completedAll) {
      this.dropHelper(q)
      // (The client is being dropped: what stopped its helper no longer matters.)
      this.countHelperPages(helper.poll().pages)
      return
    }
    try {
      this.pollHelper(q)
    } catch {
      // As above.
    } finally {
      this.dropHelper(q)
    }
    while (q.urgentAt < q.workingSetEnd && !this.needed(q.client, q.urgent[q.urgentAt])) this.source.release(q.client.id, q.urgent[q.urgentAt++])
    this.checkWorkingSet(q)
  }

  /** After a demand fault that installed `window`: sequential runs of faults ask for readahead. */
  noteFault(client: Client, window: FaultWindow): void {
    const q = this.queues.get(client.id)
    if (!q || this.options.readaheadBytes <= 0) return
    const {page, first: windowFirst, end: windowEnd} = window
    const windowPages = Math.max(1, windowEnd - windowFirst)
    q.streak = page >= q.nextPage && page < q.nextPage + windowPages ? q.streak + 1 : 0
    q.nextPage = windowEnd
    if (q.streak === 0) return
    // Like the kernel's readahead: double the distance while the pattern holds.
    const pageSize = this.reader.geometry.pageSize
    const aheadPages = Math.min(this.options.readaheadBytes / pageSize, windowPages * 2 ** Math.min(q.streak, 16))
    const lastChunk = Math.min(this.reader.geometry.chunkCount - 1, Math.floor((windowEnd + aheadPages - 1) / this.pagesPerChunk))
    for (let c = Math.max(Math.floor(windowEnd / this.pagesPerChunk), q.aheadUntilChunk + 1); c <= lastChunk; c++) q.urgent.push(c)
    q.aheadUntilChunk = Math.max(q.aheadUntilChunk, lastChunk)
  }

  /** True when a step could make progress now (not only wait for a decoder). */
  hasWork(): boolean {
    for (const q of this.queues.values()) {
      if (q.urgentAt < q.urgent.length || q.backgroundAt < q.background.length || q.helper?.stopped) return true
    }
    return false
  }

  /** Clients whose memory became complete (every page present or removed) since last asked. */
  completedClients(): Client[] {
    return this.completed.splice(0)
  }

  /**
   * One unit of prefetch work: installs the next wanted unit of some client if it is ready (or
   * needs no decoding), and keeps the source asked ahead.
   */
  step(): PrefetchStep {
    let waiting = false
    for (const q of this.queues.values()) {
      try {
        const outcome = this.pollHelper(q)
        if (outcome) return {result: 'outcome', client: q.client, outcome}
      } catch (error) {
        return {result: 'failed', client: q.client, error: error as Error}
      }
      // A helper still installing: the loop is woken (source.eventFd) when it stops.
      if (q.helper) waiting = true
      this.feed(q)
      for (const urgent of [true, false]) {
        const list = urgent ? q.urgent : q.background
        let at = urgent ? q.urgentAt : q.backgroundAt
        // Units faults have filled meanwhile: drop this client's claim on them, or their decode
        // slots stay taken until the client ends and readahead starves.
        while (at < list.length && !this.needed(q.client, list[at])) this.source.release(q.client.id, list[at++])
        if (urgent) q.urgentAt = at
        else q.backgroundAt = at
        if (urgent) this.checkWorkingSet(q)
        if (at >= list.length) continue
        const unit = list[at]
        if (!this.source.isReady(unit)) {
          // Never asked for (it was in the cache when fed, and evicted since): feed it again.
          if (!this.source.isRequested(unit)) {
            if (urgent) q.urgentFedTo = Math.min(q.urgentFedTo, at)
            else q.backgroundFedTo = Math.min(q.backgroundFedTo, at)
          }
          waiting = true
          continue
        }
        let installed: Installed
        try {
          installed = this.install(q.client, unit)
        } catch (error) {
          return {result: 'failed', client: q.client, error: error as Error}
        }
        this.stats.add('prefetchedPages', installed.pages)
        if (installed.outcome !== 'served') return {result: 'outcome', client: q.client, outcome: installed.outcome}
        this.source.release(q.client.id, unit)
        if (urgent) q.urgentAt++
        else q.backgroundAt++
        if (urgent) this.checkWorkingSet(q)
        this.checkComplete(q)
        return {result: 'busy'}
      }
      this.checkComplete(q)
    }
    return {result: waiting ? 'waiting' : 'idle'}
  }

  /** Installs one unit's missing pages into the client, clearing their accessed bits when hits are counted. */
  private install(client: Client, unit: number): Installed {
    const copied: CopiedRange[] | undefined = client.hitTrackingPidfd >= 0 ? [] : undefined
    try {
      const block = this.reader.packedBlock(unit)
      return block !== undefined ? this.server.installBlock(client, block, -1, copied) : this.server.fillImageRange(client, unit * this.pagesPerChunk, (unit + 1) * this.pagesPerChunk, copied)
    } finally {
      if (copied) this.clearAccessed(client, copied)
    }
  }

  /**
   * Prefetch hits: UFFDIO_COPY installs pages with their accessed bit set; clearing it right
   * after (MADV_COLD, which also flushes the client's TLB) lets /proc/PID/smaps count later
   * which prefetched pages the client touched. Zero pages map the shared zero page, which smaps
   * does not count: hits are counted over data pages. If the kernel refuses (no CAP_SYS_NICE),
   * counting stops for this client and the report says so by its absence.
   */
  private clearAccessed(client: Client, ranges: CopiedRange[]): void {
    if (ranges.length === 0) return
    try {
      processMadvise(client.hitTrackingPidfd, ranges, MADV.COLD)
      this.stats.add('prefetchCopiedPages', ranges.reduce((n, r) => n + r.length, 0) / this.reader.geometry.pageSize)
    } catch (error) {
      if (!(error instanceof SysError)) throw error
      // ESRCH: the client is exiting (its end is reported by its pidfd); anything else: stop.
      if (error.code !== 'ESRCH') this.stats.set('hitsTracked', 0)
      client.hitTrackingPidfd = -1
    }
  }

  /**
   * Asks the source for the next units this client will want, while it has room. Each unit is
   * looked at once (every step would rescan the whole window otherwise).
   */
  private feed(q: ClientQueue): void {
    for (const urgent of [true, false]) {
      const list = urgent ? q.urgent : q.background
      const from = urgent ? q.urgentAt : q.backgroundAt
      let i = Math.max(from, urgent ? q.urgentFedTo : q.backgroundFedTo)
      for (; i < list.length && i < from + this.options.decodeAhead; i++) {
        const unit = list[i]
        if (this.source.isClaimedBy(q.client.id, unit) || !this.source.needsRequest(unit) || !this.needed(q.client, unit)) continue
        if (this.source.prefetch(q.client.id, unit) === 'full') break
      }
      if (urgent) q.urgentFedTo = i
      else q.backgroundFedTo = i
    }
  }

  private needed(client: Client, unit: number): boolean {
    const block = this.reader.packedBlock(unit)
    if (block !== undefined) {
      const packed = this.reader.packed!
      const {listStart, pageCount} = packed.blocks[block]
      for (let k = listStart; k < listStart + pageCount; k++) if (client.states.get(packed.pages[k]) === PAGE_MISSING) return true
      return false
    }
    const first = unit * this.pagesPerChunk
    const end = Math.min(first + this.pagesPerChunk, this.reader.geometry.pageCount)
    for (const r of client.map.imagePageRanges(this.reader.geometry.pageSize)) {
      for (let p = Math.max(first, r.firstPage); p < Math.min(end, r.endPage); p++) {
        if (client.states.get(p) === PAGE_MISSING) return true
      }
    }
    return false
  }

  private checkWorkingSet(q: ClientQueue): void {
    if (q.workingSetEnd === 0 || q.urgentAt < q.workingSetEnd || q.helper) return
    q.workingSetEnd = 0
    if (this.stats.get('workingSetDoneMs') === 0) this.stats.set('workingSetDoneMs', this.clock.now())
  }

  private checkComplete(q: ClientQueue): void {
    if (q.completeReported || !q.client.isComplete) return
    q.completeReported = true
    if (this.stats.get('memoryCompleteMs') === 0) this.stats.set('memoryCompleteMs', this.clock.now())
    this.completed.push(q.client)
  }
}
