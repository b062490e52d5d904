import {Codec} from '../../format/constants.js'
import {addressOf, type InstallHelper, MADV, processMadvise, SysError} from '../../sys/index.js'
import {type SnapshotReader} from '../../snapshot/reader.js'
import {PAGE_MISSING} from './address-map.js'
import {type DecodePool, SLOT_ERROR, SLOT_PENDING, SLOT_READY} from './decode-pool.js'
import {type Client, type FaultServer, type ServeOutcome} from './fault-server.js'
import {type RunClock, type RunStats} from '../run-stats.js'

export interface PrefetchOptions {
  /** Upper bound of sequential readahead, bytes past the last fault's window. 0 disables it. */
  readaheadBytes: number
  /** Fill all of each client's memory in the background (demand faults still go first). */
  populateAll: boolean
  /** How many units past a queue's head are asked of the decoders at once. */
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
  /** The rest of the working set, being installed by a helper thread; units[..reapAt) are released. */
  helper?: {installer: InstallHelper; units: number[]; reapAt: number}
}

/**
 * The part of a working set the fault loop installs itself when a helper thread takes the rest:
 * the loop also serves the faults and runs the JavaScript around each block, so even shares left
 * it finishing last. Replaying recorded sets (medians of 9): 30% against 50% was 1.12x faster on
 * scattered pages and 1.13x on 64 KiB clusters, 20% was slower again on scattered pages.
 */
const LOOP_SHARE_OF_WORKING_SET = 0.3

/** The owner of staged units in `wanted`: no client (client ids count up from 1). */
const STAGED = -1

/**
 * Installs memory before it faults: sequential readahead (a run of faults that each continue the
 * previous window asks for a growing stretch ahead) and background population. Chunks that need
 * decoding are decoded by the decode pool on other cores; the fault loop only copies, one chunk
 * per step, and checks for demand faults between steps, so a fault never waits behind prefetch.
 * Only missing pages are filled (PageStates), so removed memory is never refilled and nothing is
 * copied twice.
 */
export class Prefetcher {
  private readonly queues = new Map<number, ClientQueue>()
  /** Decodes in flight or done, and the clients that still want each. */
  private readonly wanted = new Map<number, Set<number>>()
  private readonly pagesPerChunk: number
  /** Ranges installed by the current step, for clearAccessed. */
  private readonly installed: {address: number; length: number}[] = []
  /** Units decoded before any client connected (stage()), in order, and whether they stay. */
  private staged: number[] = []
  private keepStaged = false

  constructor(
    private readonly server: FaultServer,
    private readonly reader: SnapshotReader,
    private readonly pool: DecodePool | undefined,
    private readonly stats: RunStats,
    private readonly options: PrefetchOptions,
    private readonly clock: RunClock,
    private readonly onComplete: (client: Client) => void,
  ) {
    this.pagesPerChunk = reader.geometry.pagesPerChunk
    server.chunkSource = (chunk) => this.decoded(chunk)
  }

  /**
   * Decodes `units` (the working set) into the decode pool's slots before any client connects, so
   * that after a handshake installing them costs only the copies. They stay in memory until every
   * client that wants them has them, or for good with `keep` (every later client wants them too).
   * Returns how many were queued (the pool's slots bound them).
   */
  stage(units: readonly number[], maxUnits: number, keep: boolean): number {
    if (!this.pool) return 0
    for (const unit of units.slice(0, maxUnits)) {
      if (this.wanted.has(unit) || this.reader.entry(unit).codec === Codec.None || !this.pool.request(unit)) continue
      this.wanted.set(unit, new Set([STAGED]))
      this.staged.push(unit)
    }
    this.keepStaged = keep
    return this.staged.length
  }

  /**
   * Blocks until every staged unit is decoded, or failed (a failed one is decoded again when it
   * is installed, which reports its error), or `timeoutMs` passed (the rest is decoded on the
   * way). Returns the units and bytes ready.
   */
  waitUntilStaged(timeoutMs: number): {units: number; bytes: number} {
    const deadline = performance.now() + timeoutMs
    let units = 0
    let bytes = 0
    for (const unit of this.staged) {
      const slot = this.pool!.slotOf(unit)
      if (slot === undefined || this.pool!.waitFor(slot, deadline - performance.now()) !== SLOT_READY) continue
      units++
      bytes += this.pool!.payload(slot).length
      this.countDecode(slot)
    }
    return {units, bytes}
  }

  /** `first`: chunks to install before anything else (a recorded working set), in order. */
  addClient(client: Client, first: readonly number[] = []): void {
    const urgent = first.filter((chunk) => this.needed(client, chunk))
    this.stats.add('workingSetChunks', urgent.length)
    this.queues.set(client.id, {client, urgent, urgentAt: 0, background: [], backgroundAt: 0, nextPage: -1, streak: 0, aheadUntilChunk: -1, completeReported: false, workingSetEnd: urgent.length, urgentFedTo: 0, backgroundFedTo: 0})
    // Staged units this client wants are its own now; unless they are kept for later clients,
    // each slot is freed once the clients that want it have it.
    for (const unit of urgent) this.wanted.get(unit)?.add(client.id)
    if (!this.keepStaged) {
      for (const unit of this.staged.splice(0)) this.done(STAGED, unit)
    }
    this.startHelper(this.queues.get(client.id)!)
    if (this.options.populateAll) this.populate(client)
  }

  /**
   * Gives the later part of a client's working set to a helper thread, when every unit of it is
   * a packed block already decoded (staged): the fault loop installs the first part and serves
   * faults meanwhile (baseline_handler --prefetch-threads: ~1.3x faster on 2 cores).
   */
  private startHelper(q: ClientQueue): void {
    const pool = this.pool
    if (!this.options.installHelper || !pool || q.workingSetEnd < 2) return
    const loopShare = Math.ceil(q.workingSetEnd * LOOP_SHARE_OF_WORKING_SET)
    const units = q.urgent.slice(loopShare, q.workingSetEnd)
    // Every unit decoded already (or all zeros: nothing to decode), so the helper never waits.
    const payloads: number[] = []
    for (const unit of units) {
      const slot = pool.slotOf(unit)
      if (this.reader.packedBlock(unit) === undefined) return
      if (this.reader.entry(unit).codec === Codec.None) payloads.push(0)
      else if (slot !== undefined && pool.state(slot) === SLOT_READY) payloads.push(addressOf(pool.payload(slot)))
      else return
    }
    const installer = this.server.startInstallHelper(q.client, units.map((unit) => this.reader.packedBlock(unit)!), payloads, pool.eventFd)
    if (!installer) return
    q.urgent.splice(loopShare, units.length)
    q.workingSetEnd = loopShare
    q.helper = {installer, units, reapAt: 0}
    q.client.installHelper = installer
    q.client.states.shared = true
  }

  /**
   * Collects a helper's work: its counts, the slots of the units it installed, and once it has
   * stopped, the helper itself. Returns an outcome when it stopped on an error.
   */
  private pollHelper(q: ClientQueue): ServeOutcome | undefined {
    const h = q.helper
    if (!h) return undefined
    // Read before its counts: once it says finished, all it did is counted.
    const finished = h.installer.finished
    const outcome = this.helperProgress(q, h.installer)
    while (h.reapAt < h.units.length && h.installer.done(h.reapAt)) this.done(q.client.id, h.units[h.reapAt++])
    if (!finished && outcome === 'served') return undefined
    this.dropHelper(q)
    // Units it did not finish (it stopped on an error) are installed by faults or not at all.
    for (const unit of h.units.slice(h.reapAt)) this.done(q.client.id, unit)
    this.checkWorkingSet(q)
    return outcome === 'served' ? undefined : outcome
  }

  /** Accounts what a helper installed since last asked: prefetched pages, by a helper. */
  private helperProgress(q: ClientQueue, installer: InstallHelper): ServeOutcome {
    const before = this.stats.get('pagesCopied') + this.stats.get('pagesZeroed')
    try {
      return this.server.helperProgress(q.client, installer)
    } finally {
      const pages = this.stats.get('pagesCopied') + this.stats.get('pagesZeroed') - before
      this.stats.add('prefetchedPages', pages)
      this.stats.add('helperPages', pages)
    }
  }

  /** Stops a client's helper after the block it is on: it must be gone before the client's uffd closes or its slots are freed. */
  private dropHelper(q: ClientQueue): void {
    if (!q.helper) return
    q.helper.installer.stop()
    q.client.installHelper = undefined
    q.client.states.shared = false
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
    for (const [chunk, clients] of this.wanted) {
      clients.delete(client.id)
      if (clients.size === 0) this.forget(chunk)
    }
  }

  /**
   * Before a client is dropped: stops its helper and collects its counts. A helper that had
   * already finished its part completed it, and with the loop's part done (by prefetch or by
   * faults) the working set is complete: recorded now, whichever the loop saw first, the
   * helper's signal or the client's exit (both can arrive in one wake-up, and a client that
   * found its set installed may exit at once).
   */
  private settle(q: ClientQueue): void {
    const installer = q.helper?.installer
    if (installer && !(installer.finished && installer.error === 0)) {
      this.dropHelper(q)
      try {
        this.helperProgress(q, installer)
      } catch {
        // The client is being dropped: what stopped its helper no longer matters.
      }
      return
    }
    try {
      this.pollHelper(q)
    } catch {
      // As above.
    } finally {
      this.dropHelper(q)
    }
    while (q.urgentAt < q.workingSetEnd && !this.needed(q.client, q.urgent[q.urgentAt])) this.done(q.client.id, q.urgent[q.urgentAt++])
    this.checkWorkingSet(q)
  }

  /** Called after a demand fault at image page `page` whose window ended at `windowEnd`. */
  noteFault(client: Client, page: number, windowEnd: number): void {
    const q = this.queues.get(client.id)
    if (!q || this.options.readaheadBytes <= 0) return
    const windowPages = this.server.windowPages
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
      if (q.urgentAt < q.urgent.length || q.backgroundAt < q.background.length || q.helper?.installer.finished) return true
    }
    return false
  }

  /**
   * One unit of prefetch work: installs the next wanted chunk of some client if it is ready (or
   * needs no decoding), keeps the decoders fed. Returns 'busy' when it did something, 'waiting'
   * when everything left waits for a decoder, 'idle' when there is nothing to do, or a client
   * outcome ('retry': events are queued; 'gone').
   */
  step(): {result: 'busy' | 'waiting' | 'idle'} | {result: 'outcome'; client: Client; outcome: ServeOutcome} | {result: 'failed'; client: Client; error: Error} {
    let waiting = false
    for (const q of this.queues.values()) {
      try {
        const outcome = this.pollHelper(q)
        if (outcome) return {result: 'outcome', client: q.client, outcome}
      } catch (error) {
        return {result: 'failed', client: q.client, error: error as Error}
      }
      // A helper still installing: the loop is woken (pool.eventFd) when it stops.
      if (q.helper) waiting = true
      this.feed(q)
      for (const urgent of [true, false]) {
        const list = urgent ? q.urgent : q.background
        let at = urgent ? q.urgentAt : q.backgroundAt
        // Chunks faults have filled meanwhile: drop this client's claim on their decode slots,
        // or the slots stay taken until the client ends and readahead starves.
        while (at < list.length && !this.needed(q.client, list[at])) this.done(q.client.id, list[at++])
        if (urgent) q.urgentAt = at
        else q.backgroundAt = at
        if (urgent) this.checkWorkingSet(q)
        if (at >= list.length) continue
        const chunk = list[at]
        const ready = this.readyToInstall(chunk)
        if (!ready) {
          // Never asked for (it was in the cache when fed, and evicted since): feed it again.
          if (this.pool!.slotOf(chunk) === undefined) {
            if (urgent) q.urgentFedTo = Math.min(q.urgentFedTo, at)
            else q.backgroundFedTo = Math.min(q.backgroundFedTo, at)
          }
          waiting = true
          continue
        }
        const before = this.stats.get('pagesCopied') + this.stats.get('pagesZeroed')
        let outcome: ServeOutcome
        const tracking = q.client.hitTrackingPidfd >= 0
        if (tracking) this.server.onCopied = (_client, address, length) => this.installed.push({address, length})
        try {
          const block = this.reader.packedBlock(chunk)
          outcome = block !== undefined ? this.server.installBlock(q.client, block) : this.server.fillImageRange(q.client, chunk * this.pagesPerChunk, (chunk + 1) * this.pagesPerChunk)
        } catch (error) {
          return {result: 'failed', client: q.client, error: error as Error}
        } finally {
          this.server.onCopied = undefined
          if (tracking) this.clearAccessed(q.client)
        }
        this.stats.add('prefetchedPages', this.stats.get('pagesCopied') + this.stats.get('pagesZeroed') - before)
        if (outcome !== 'served') return {result: 'outcome', client: q.client, outcome}
        this.done(q.client.id, chunk)
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

  /**
   * Prefetch hits: UFFDIO_COPY installs pages with their accessed bit set; clearing it right
   * after (MADV_COLD, which also flushes the client's TLB) lets /proc/PID/smaps count later
   * which prefetched pages the client touched. Zero pages map the shared zero page, which smaps
   * does not count: hits are counted over data pages. If the kernel refuses (no CAP_SYS_NICE),
   * counting stops for this client and the report says so by its absence.
   */
  private clearAccessed(client: Client): void {
    const ranges = this.installed.splice(0)
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
   * Requests decodes for the next chunks this client will want, while slots are free. Each unit
   * is looked at once (every step would rescan the whole window otherwise: ~20% of installing
   * a staged working set).
   */
  private feed(q: ClientQueue): void {
    if (!this.pool) return
    for (const urgent of [true, false]) {
      const list = urgent ? q.urgent : q.background
      const from = urgent ? q.urgentAt : q.backgroundAt
      let i = Math.max(from, urgent ? q.urgentFedTo : q.backgroundFedTo)
      for (; i < list.length && i < from + this.options.decodeAhead; i++) {
        const chunk = list[i]
        let clients = this.wanted.get(chunk)
        if (clients?.has(q.client.id)) continue
        if (this.reader.entry(chunk).codec === Codec.None || this.server.isCached(chunk) || !this.needed(q.client, chunk)) continue
        if (!clients) {
          if (!this.pool.request(chunk)) break
          this.wanted.set(chunk, (clients = new Set()))
        }
        clients.add(q.client.id)
      }
      if (urgent) q.urgentFedTo = i
      else q.backgroundFedTo = i
    }
  }

  /** Can `chunk` be installed without waiting: all zeros, decoded, or no decode pool at all. */
  private readyToInstall(chunk: number): boolean {
    if (this.reader.entry(chunk).codec === Codec.None || !this.pool || this.server.isCached(chunk)) return true
    const slot = this.pool.slotOf(chunk)
    if (slot === undefined) return false
    const state = this.pool.state(slot)
    return state === SLOT_READY || state === SLOT_ERROR
  }

  /**
   * The decode pool's payload for `chunk` (a demand fault needs it now): decoded here if no
   * decoder has started on it yet, else waited for (at most one decode).
   */
  private decoded(chunk: number): Buffer | undefined {
    const slot = this.pool?.slotOf(chunk)
    if (slot === undefined || !this.pool) return undefined
    if (this.pool.takeBack(slot)) {
      let length = -1
      try {
        length = this.reader.readPayload(chunk, this.pool.slotBuffer(slot)).length
      } catch {
        // Reported with its context when the fault path decodes it again (below).
      }
      this.pool.finish(slot, length)
    }
    const state = this.pool.state(slot) === SLOT_PENDING ? this.pool.waitFor(slot) : this.pool.state(slot)
    if (state === SLOT_READY) return this.pool.payload(slot)
    // ERROR: decode it here instead, which raises the real error with its context.
    this.forget(chunk)
    return undefined
  }

  private needed(client: Client, chunk: number): boolean {
    const block = this.reader.packedBlock(chunk)
    if (block !== undefined) {
      const packed = this.reader.packed!
      const {listStart, pageCount} = packed.blocks[block]
      for (let k = listStart; k < listStart + pageCount; k++) if (client.states.get(packed.pages[k]) === PAGE_MISSING) return true
      return false
    }
    const first = chunk * this.pagesPerChunk
    const end = Math.min(first + this.pagesPerChunk, this.reader.geometry.pageCount)
    for (const r of client.map.imagePageRanges(this.reader.geometry.pageSize)) {
      for (let p = Math.max(first, r.firstPage); p < Math.min(end, r.endPage); p++) {
        if (client.states.get(p) === PAGE_MISSING) return true
      }
    }
    return false
  }

  /** `owner` (a client id, or STAGED) no longer wants `chunk`; the last one out frees it. */
  private done(owner: number, chunk: number): void {
    const clients = this.wanted.get(chunk)
    if (!clients) return
    clients.delete(owner)
    if (clients.size === 0) this.forget(chunk)
  }

  private forget(chunk: number): void {
    this.wanted.delete(chunk)
    const slot = this.pool?.slotOf(chunk)
    if (slot !== undefined && this.pool!.state(slot) !== SLOT_PENDING) this.release(slot)
  }

  private release(slot: number): void {
    if (this.pool!.state(slot) === SLOT_READY) {
      const payload = this.pool!.payload(slot)
      this.countDecode(slot)
      // Worth a copy into the cache only if someone will want this chunk again: another client of
      // the snapshot, or faults whose window is smaller than a chunk.
      if (this.queues.size > 1 || this.server.windowPages < this.pagesPerChunk) this.server.adoptDecoded(this.pool!.chunkIn(slot), payload)
    }
    this.pool!.release(slot)
  }

  private countDecode(slot: number): void {
    const length = this.pool!.countOnce(slot)
    if (length < 0) return
    this.stats.add('chunksDecoded')
    this.stats.add('bytesDecompressed', length)
  }

  /** Frees slots whose decode finished after every client that wanted them lost interest. */
  reap(): void {
    if (!this.pool) return
    for (const slot of this.pool.finished()) {
      if (!this.wanted.has(this.pool.chunkIn(slot))) this.release(slot)
    }
  }

  private checkWorkingSet(q: ClientQueue): void {
    if (q.workingSetEnd === 0 || q.urgentAt < q.workingSetEnd || q.helper) return
    q.workingSetEnd = 0
    if (this.stats.get('workingSetDoneMs') === 0) this.stats.set('workingSetDoneMs', this.clock.now())
  }

  private checkComplete(q: ClientQueue): void {
    if (q.completeReported || !this.server.isComplete(q.client)) return
    q.completeReported = true
    if (this.stats.get('memoryCompleteMs') === 0) this.stats.set('memoryCompleteMs', this.clock.now())
    this.onComplete(q.client)
  }
}
