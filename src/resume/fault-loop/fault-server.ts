import {SnapshotFormatError} from '../../format/errors.js'
import {type Geometry} from '../../format/geometry.js'
import {packedBlockRuns, zeroRunWindowBytes} from '../../format/packed-set.js'
import {type SnapshotReader} from '../../snapshot/reader.js'
import {addressOf, type BlockFillResult, Errno, errnoName, fillRegions, InstallHelper, nativeBlockFill, uffdCopy, uffdFillBlock, uffdWake, uffdZeropage, type FillResult} from '../../sys/index.js'
import {AddressMap, PAGE_MISSING, PAGE_PRESENT, PAGE_REMOVED, PageStates} from './address-map.js'
import {ChunkCache} from './chunk-cache.js'
import {payloadPageIndex} from '../../format/zero-map.js'
import {type GuestRegion} from '../main/handshake.js'
import {type RunClock, type RunStats} from '../run-stats.js'

/** A fault read from the uffd and not yet served. */
export interface PendingFault {
  address: number
  /** performance.now() when the message was read, for the latency histogram. */
  readAt: number
}

function hex(n: number): string {
  return `0x${n.toString(16)}`
}

/** One client (a VMM or a restored process) whose memory is served through one uffd. */
export class Client {
  readonly map: AddressMap
  readonly states: PageStates
  readonly pending: PendingFault[] = []
  /** Pages inside the client's regions: memory is complete when all are present or removed. */
  readonly regionPages: number
  /** A pidfd for process_madvise when prefetch hits are counted (else -1). */
  hitTrackingPidfd = -1
  /** A thread installing part of the working set beside the fault loop (see Prefetcher), if any. */
  installHelper: InstallHelper | undefined
  private fillRegionTable: BigUint64Array | undefined

  /**
   * `nonCooperative`: a process restored by CRIU, which does not announce its memory layout
   * changes but lets the kernel report them (fork, mremap, munmap): its faults outside the
   * snapshot's regions are fresh memory, and its mappings can be split or moved under us.
   */
  constructor(
    readonly id: number,
    readonly uffd: number,
    regions: readonly GuestRegion[],
    geometry: Geometry,
    readonly nonCooperative = false,
    inherited?: {states: PageStates; regionPages: number},
  ) {
    this.map = new AddressMap(regions)
    this.states = inherited?.states ?? new PageStates(geometry.pageCount)
    this.regionPages = inherited?.regionPages ?? regions.reduce((sum, r) => sum + r.size / geometry.pageSize, 0)
  }

  /** The regions as the native block fill takes them (a cooperative client's never change). */
  get fillRegions(): BigUint64Array {
    return (this.fillRegionTable ??= fillRegions(this.map.all.map((r) => ({offset: r.offset, size: r.size, base: r.baseHostVirtAddr}))))
  }

  /**
   * The client for a child this process forked (UFFD_EVENT_FORK), with the child's new uffd:
   * fork copies the page tables, so what is present here is present there and what is missing
   * is missing there too. While the event is unread the kernel fails copies into the parent with
   * EAGAIN (mmap_changing), so the parent's states are exactly the child's at this point.
   */
  fork(id: number, uffd: number, geometry: Geometry): Client {
    // Unmapped pages are settled in the copy as they are here, so the total stays the parent's.
    return new Client(id, uffd, this.map.all, geometry, true, {states: this.states.clone(), regionPages: this.regionPages})
  }
}

/** An error that makes serving a client impossible: the client must not run on. */
export class FatalServeError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message)
    this.name = 'FatalServeError'
  }
}

export type ServeOutcome = 'served' | 'retry' | 'gone'

export interface ServeOptions {
  /** Bytes around a faulting page installed with it (aligned window, clipped to its region). */
  faultAroundBytes: number
  /**
   * Serve faults on pages of the snapshot's packed working set from their packed block (the
   * pages the set touches next) instead of a window of chunks around them.
   */
  packedWorkingSet?: boolean
}

/**
 * Serves page faults from a snapshot: the policy half of the fault loop. For a fault it installs
 * the faulting page's run first (so the faulting thread wakes as early as possible), then the
 * other missing pages of the fault-around window: data runs with one UFFDIO_COPY each straight
 * from the decoded chunk payload, zero runs with one UFFDIO_ZEROPAGE each. Only MISSING pages are
 * ever filled, so nothing is copied twice and removed memory is never refilled with snapshot data.
 */
export class FaultServer {
  readonly geometry: Geometry
  private readonly cache: ChunkCache
  private readonly pageSize: number
  private readonly huge: boolean
  private zeroSource: Buffer | undefined
  readonly windowPages: number
  /** Each page's position in its chunk's payload (see payloadPageIndex). */
  private readonly payloadIndex: Int32Array
  /**
   * Decoded payloads available without decoding here (the decode pool's slots); consulted before
   * the cache. Returns undefined when the chunk is not there.
   */
  chunkSource: ((chunk: number) => Buffer | undefined) | undefined
  /** Called with every range installed by UFFDIO_COPY while set (the prefetcher's hit tracking). */
  onCopied: ((client: Client, address: number, length: number) => void) | undefined
  /** The window of the last fault served from a missing page (for readahead), in image pages. */
  lastWindow = {page: -1, first: -1, end: -1}
  /** Each page's packed working-set block, or -1 (when serving from packed blocks). */
  private readonly blockOfPage: Int32Array | undefined
  /** The region of the block run installed last (installBlock's lookup cache; reset per block). */
  private blockRegion: GuestRegion | undefined
  /** Zero runs around packed set pages grow within aligned windows of this many pages. */
  private readonly zeroRunWindowPages: number = 1
  /** Each packed block's runs (packedBlockRuns): the same for every client. */
  private readonly runsOfBlock: Int32Array[] = []

  constructor(
    private readonly reader: SnapshotReader,
    private readonly stats: RunStats,
    cacheBytes: number,
    options: ServeOptions,
    private readonly clock: RunClock,
  ) {
    this.geometry = reader.geometry
    this.pageSize = this.geometry.pageSize
    // hugetlbfs has no UFFDIO_ZEROPAGE: zero pages are copied from a zero buffer there.
    this.huge = this.pageSize > 4096
    this.cache = new ChunkCache(reader, cacheBytes, stats)
    this.windowPages = Math.max(1, Math.floor(options.faultAroundBytes / this.pageSize))
    this.payloadIndex = payloadPageIndex(reader.zeroMap, this.geometry.pagesPerChunk)
    const packed = reader.packed
    if (options.packedWorkingSet && packed) {
      this.blockOfPage = new Int32Array(this.geometry.pageCount).fill(-1)
      for (const [b, block] of packed.blocks.entries()) {
        for (let k = block.listStart; k < block.listStart + block.pageCount; k++) this.blockOfPage[packed.pages[k]] = b
        this.runsOfBlock.push(packedBlockRuns(packed, b, reader.zeroMap))
      }
      // (One page on hugetlbfs, where zeros are copied, not mapped.)
      this.zeroRunWindowPages = Math.max(1, zeroRunWindowBytes(packed) / this.pageSize)
    }
  }

  serve(client: Client, fault: PendingFault): ServeOutcome {
    const location = client.map.locate(fault.address)
    if (!location && client.nonCooperative) {
      // A restored process's registered memory that was not in the dump: a mapping grown with
      // mremap (it keeps the registration), or a PROT_NONE reservation made accessible since.
      // Such memory did not exist at dump time, so it is fresh anonymous memory: zeros.
      const outcome = this.zeroOutside(client, fault.address - (fault.address % this.pageSize))
      if (outcome === 'served') this.recordServed(fault, 'faultsZero')
      return outcome
    }
    if (!location) {
      throw new FatalServeError(`fault at ${hex(fault.address)} lies outside every memory region the client announced`, 'FAULT_OUTSIDE_REGIONS')
    }
    const {region} = location
    const page = Math.floor(location.imageOffset / this.pageSize)
    const regionFirst = region.offset / this.pageSize
    const regionEnd = regionFirst + region.size / this.pageSize
    const state = client.states.get(page)
    let outcome: ServeOutcome
    if (state === PAGE_PRESENT) {
      // Served already (by fault-around, or a duplicate message from another thread): the page
      // is there, but make sure the thread that faulted is not left waiting.
      uffdWake(client.uffd, this.pageAddress(region, page), this.pageSize)
      outcome = 'served'
      this.recordServed(fault, 'faultsAlreadyPresent')
    } else if (state === PAGE_REMOVED) {
      outcome = this.install(client, region, page, 1, true)
      if (outcome === 'served') this.recordServed(fault, 'faultsRemoved')
    } else if (this.blockOfPage && this.blockOfPage[page] >= 0) {
      // A page of the packed working set: its block holds the pages touched around the same
      // time, wherever they lie, which predicts the next faults better than its neighbours do.
      const installedBefore = this.stats.get('pagesCopied') + this.stats.get('pagesZeroed')
      outcome = this.installBlock(client, this.blockOfPage[page], page)
      if (outcome === 'served' || (outcome === 'gone' && client.states.get(page) === PAGE_PRESENT)) {
        this.lastWindow = {page, first: page, end: page + 1}
        this.recordServed(fault, this.reader.zeroMap.isZero(page) ? 'faultsZero' : 'faultsData')
        this.stats.add('faultAroundPages', this.stats.get('pagesCopied') + this.stats.get('pagesZeroed') - installedBefore - 1)
      }
    } else {
      const windowFirst = Math.max(regionFirst, page - (page % this.windowPages))
      const windowEnd = Math.min(regionEnd, windowFirst + this.windowPages)
      const installedBefore = this.stats.get('pagesCopied') + this.stats.get('pagesZeroed')
      const [runFirst, runEnd] = this.runAround(client, page, windowFirst, windowEnd)
      outcome = this.install(client, region, runFirst, runEnd - runFirst, this.reader.zeroMap.isZero(page))
      if (outcome === 'served') {
        this.lastWindow = {page, first: windowFirst, end: windowEnd}
        this.recordServed(fault, this.reader.zeroMap.isZero(page) ? 'faultsZero' : 'faultsData')
        // The fault itself is served; the rest of the window is a bonus. If the address space
        // is changing (EAGAIN), the remaining pages are left to later faults.
        if (this.fillWindow(client, region, windowFirst, windowEnd) === 'gone') outcome = 'gone'
        this.stats.add('faultAroundPages', this.stats.get('pagesCopied') + this.stats.get('pagesZeroed') - installedBefore - 1)
      }
    }
    return outcome
  }

  private zeroOutside(client: Client, address: number): ServeOutcome {
    const result = this.huge ? uffdCopy(client.uffd, address, addressOf((this.zeroSource ??= Buffer.alloc(this.pageSize))), this.pageSize) : uffdZeropage(client.uffd, address, this.pageSize)
    if (result.error === Errno.EAGAIN) return 'retry'
    if (result.error === Errno.ESRCH) return 'gone'
    // EEXIST: another thread's fault installed it; ENOENT: no longer registered (unmapped
    // meanwhile). Either way the faulting thread only needs waking to retry its access.
    if (result.error === Errno.EEXIST || result.error === Errno.ENOENT) uffdWake(client.uffd, address, this.pageSize)
    else if (result.error !== 0) throw new FatalServeError(`unexpected ${errnoName(result.error)} zeroing the page at ${hex(address)}`, errnoName(result.error))
    else this.stats.add('pagesZeroed')
    return 'served'
  }

  private recordServed(fault: PendingFault, kind: 'faultsData' | 'faultsZero' | 'faultsRemoved' | 'faultsAlreadyPresent'): void {
    const now = performance.now()
    this.stats.add('faults')
    this.stats.add(kind)
    this.stats.recordLatency((now - fault.readAt) * 1000)
    const sinceStart = this.clock.now()
    if (this.stats.get('faults') === 1) this.stats.set('firstFaultMs', sinceStart)
    this.stats.set('lastFaultMs', sinceStart)
  }

  /** The maximal run of missing pages around `page` (inside the window) that one ioctl can fill. */
  private runAround(client: Client, page: number, windowFirst: number, windowEnd: number): [number, number] {
    const zero = this.reader.zeroMap.isZero(page)
    const chunk = this.geometry.chunkOfOffset(page * this.pageSize)
    const same = (p: number): boolean =>
      client.states.get(p) === PAGE_MISSING && this.reader.zeroMap.isZero(p) === zero && (zero || this.geometry.chunkOfOffset(p * this.pageSize) === chunk)
    let first = page
    while (first > windowFirst && same(first - 1)) first--
    let end = page + 1
    while (end < windowEnd && same(end)) end++
    return [first, end]
  }

  /**
   * Installs every still-missing page of image pages [first, end) that lies in one of the
   * client's regions (prefetch and population work in image space; regions map it to addresses).
   */
  fillImageRange(client: Client, first: number, end: number): ServeOutcome {
    for (const region of client.map.all) {
      const regionFirst = region.offset / this.pageSize
      const from = Math.max(first, regionFirst)
      const to = Math.min(end, regionFirst + region.size / this.pageSize)
      if (from >= to) continue
      const outcome = this.fillWindow(client, region, from, to)
      if (outcome !== 'served') return outcome
    }
    return 'served'
  }

  /**
   * Installs the still-missing pages of packed working-set block `block`, the run holding `first`
   * (a faulting page) before the others. Each run of consecutive image pages of one kind is one
   * ioctl: a block's pages are sorted, so a data run is adjacent in its payload too.
   */
  installBlock(client: Client, block: number, first = -1): ServeOutcome {
    const runs = this.runsOfBlock[block]
    this.blockRegion = undefined
    // Resolved before anything is installed: a block that fails its checksum installs nothing.
    let payloadBase = -1
    for (let i = 2; i < runs.length; i += 3) {
      if (runs[i] >= 0) {
        payloadBase = this.unitAddress(this.reader.index.length + block)
        break
      }
    }
    let firstRun = -1
    for (let i = 0; first >= 0 && i < runs.length; i += 3) {
      if (first >= runs[i] && first < runs[i] + runs[i + 1]) firstRun = i
    }
    // The same work in one native call (native/libuffd_fill.c) when it can.
    if (this.fillsNatively(client)) return this.fillBlockNatively(client, block, runs, payloadBase, firstRun)
    const installRun = (i: number): ServeOutcome => this.installBlockRun(client, runs[i], runs[i + 1], runs[i + 2] < 0 ? -1 : payloadBase + runs[i + 2] * this.pageSize)
    // The faulting page's run first, then the others in order.
    if (firstRun >= 0) {
      const outcome = installRun(firstRun)
      if (outcome !== 'served') return outcome
    }
    for (let i = 0; i < runs.length; i += 3) {
      if (i === firstRun) continue
      const outcome = installRun(i)
      if (outcome !== 'served') return outcome
    }
    return 'served'
  }

  /**
   * Whether a client's packed blocks can go to native/libuffd_fill: per page, the JavaScript
   * path costs about what the kernel's copy does. Not for hit counting (which needs each copied
   * range), hugetlbfs or restored processes (their mappings change).
   */
  fillsNatively(client: Client): boolean {
    return nativeBlockFill && !this.onCopied && !this.huge && !client.nonCooperative
  }

  /**
   * Starts a thread installing packed blocks `blocks` (decoded at `payloads`) into the client
   * beside this one, or returns undefined when it cannot (see fillsNatively). `notifyFd`: an
   * eventfd the thread signals when it stops.
   */
  startInstallHelper(client: Client, blocks: readonly number[], payloads: readonly number[], notifyFd: number): InstallHelper | undefined {
    // (Prefetch hits are counted per installed range, which a helper does not report.)
    if (!this.fillsNatively(client) || client.hitTrackingPidfd >= 0) return undefined
    const jobs = blocks.map((block, k) => ({runs: this.runsOfBlock[block], payload: payloads[k]}))
    return InstallHelper.start(client.uffd, client.states.states, this.reader.zeroMap.bytes, this.pageSize, client.fillRegions, jobs, this.zeroRunWindowPages, notifyFd)
  }

  /** Accounts what a helper installed since last asked; once it stopped on an error, that outcome. */
  helperProgress(client: Client, helper: InstallHelper): ServeOutcome {
    return this.blockFilled(client, 'a packed working-set block (install helper)', helper.takeProgress())
  }

  private fillBlockNatively(client: Client, block: number, runs: Int32Array, payloadBase: number, firstRun: number): ServeOutcome {
    const r = uffdFillBlock(client.uffd, client.states.states, this.reader.zeroMap.bytes, this.pageSize, client.fillRegions, runs, Math.max(0, payloadBase), firstRun < 0 ? -1 : firstRun / 3, this.zeroRunWindowPages)
    return this.blockFilled(client, `packed working-set block ${block}`, r)
  }

  /** Accounts a native block fill and turns its errno into an outcome. */
  private blockFilled(client: Client, what: string, r: BlockFillResult): ServeOutcome {
    client.states.countInstalled(r.newlyPresent)
    this.stats.add('pagesCopied', r.pagesCopied)
    this.stats.add('pagesZeroed', r.pagesZeroed)
    this.stats.add('bytesCopied', r.pagesCopied * this.pageSize)
    this.stats.add('copyIoctls', r.copyIoctls)
    this.stats.add('zeropageIoctls', r.zeropageIoctls)
    this.stats.add('eexist', r.eexist)
    if (r.error === 0) return 'served'
    if (r.error === Errno.EAGAIN) {
      this.stats.add('eagain')
      return 'retry'
    }
    if (r.error === Errno.ENOENT || r.error === Errno.ESRCH) return 'gone'
    throw new FatalServeError(`unexpected ${errnoName(r.error)} installing ${what} at image page ${r.stopPage}`, errnoName(r.error))
  }

  /**
   * Installs the missing pages of one run of a block (`source`: the payload address of its first
   * page, -1 for zeros), one ioctl per stretch of missing pages inside one region.
   */
  private installBlockRun(client: Client, page: number, count: number, source: number): ServeOutcome {
    const {states} = client
    const end = page + count
    for (let p = page; p < end; ) {
      if (states.get(p) !== PAGE_MISSING) {
        p++
        continue
      }
      // Usually the same region as the block's previous run.
      let region = this.blockRegion
      if (!region || p * this.pageSize < region.offset || p * this.pageSize >= region.offset + region.size) region = this.blockRegion = client.map.regionOfImagePage(p, this.pageSize)
      if (!region) {
        p++
        continue
      }
      const regionFirst = region.offset / this.pageSize
      const regionEnd = regionFirst + region.size / this.pageSize
      let q = p + 1
      while (q < end && q < regionEnd && states.get(q) === PAGE_MISSING) q++
      let outcome: ServeOutcome
      if (source < 0) {
        const [from, to] = this.zeroRunAround(client, p, q, regionFirst, regionEnd)
        outcome = this.install(client, region, from, to - from, true)
      } else {
        outcome = this.install(client, region, p, q - p, false, source + (p - page) * this.pageSize)
      }
      if (outcome !== 'served') return outcome
      p = q
    }
    return 'served'
  }

  /**
   * The zero run to map for set pages [first, end): grown over the missing zero pages around it
   * within its aligned window (zeroRunWindowBytes), so that the isolated zero pages of a scattered
   * set cost one ioctl per window rather than one each (a zero page is its own content, so extra
   * ones are never wrong). The window bounds the ioctl: a zero page costs a page-table entry, and
   * a fault may wait behind it.
   */
  private zeroRunAround(client: Client, first: number, end: number, regionFirst: number, regionEnd: number): [number, number] {
    const {zeroMap} = this.reader
    const {states} = client
    const windowPages = this.zeroRunWindowPages
    const windowFirst = Math.max(regionFirst, first - (first % windowPages))
    const windowEnd = Math.min(regionEnd, end - 1 - ((end - 1) % windowPages) + windowPages)
    let from = first
    while (from > windowFirst && zeroMap.isZero(from - 1) && states.get(from - 1) === PAGE_MISSING) from--
    let to = end
    while (to < windowEnd && zeroMap.isZero(to) && states.get(to) === PAGE_MISSING) to++
    return [from, to]
  }

  /** Installs every still-missing run in [first, end). */
  private fillWindow(client: Client, region: GuestRegion, first: number, end: number): ServeOutcome {
    let p = first
    while (p < end) {
      if (client.states.get(p) !== PAGE_MISSING) {
        p++
        continue
      }
      const zero = this.reader.zeroMap.isZero(p)
      const chunk = this.geometry.chunkOfOffset(p * this.pageSize)
      let q = p + 1
      while (q < end && client.states.get(q) === PAGE_MISSING && this.reader.zeroMap.isZero(q) === zero && (zero || this.geometry.chunkOfOffset(q * this.pageSize) === chunk)) q++
      const outcome = this.install(client, region, p, q - p, zero)
      if (outcome !== 'served') return outcome
      p = q
    }
    return 'served'
  }

  /**
   * Fills pages [first, first+count) of one region with zeros or with their snapshot data,
   * handling the kernel's partial results: a copy that runs into a page already present stops
   * there (EAGAIN with bytes done, or EEXIST at the first page): that page is marked present and
   * the copy goes on after it, so no page after a collision is left missing.
   */
  private install(client: Client, region: GuestRegion, first: number, count: number, zero: boolean, from?: number): ServeOutcome {
    const length = count * this.pageSize
    const dst = this.pageAddress(region, first)
    let source = 0
    if (!zero) {
      source = from ?? this.payloadAddress(first)
    } else if (this.huge) {
      this.zeroSource ??= Buffer.alloc(this.pageSize)
    }
    let done = 0
    // Bytes per ioctl; drops to one page when a range turns out to span several VMAs.
    let step = length
    while (done < length) {
      let result: FillResult
      if (!zero) {
        result = uffdCopy(client.uffd, dst + done, source + done, Math.min(step, length - done))
        this.stats.add('copyIoctls')
      } else if (this.huge) {
        result = uffdCopy(client.uffd, dst + done, addressOf(this.zeroSource!), this.pageSize)
        this.stats.add('copyIoctls')
      } else {
        result = uffdZeropage(client.uffd, dst + done, Math.min(step, length - done))
        this.stats.add('zeropageIoctls')
      }
      if (result.done > 0) {
        const pages = result.done / this.pageSize
        client.states.markPresent(first + done / this.pageSize, pages)
        this.stats.add(zero ? 'pagesZeroed' : 'pagesCopied', pages)
        if (!zero) {
          this.stats.add('bytesCopied', result.done)
          this.onCopied?.(client, dst + done, result.done)
        }
        done += result.done
      }
      if (result.error === 0) continue
      if (result.error === Errno.EEXIST) {
        // The page at dst+done is already there: nothing to install, but wake any waiter on it.
        this.stats.add('eexist')
        uffdWake(client.uffd, dst + done, this.pageSize)
        client.states.markPresent(first + done / this.pageSize, 1)
        done += this.pageSize
      } else if (result.error === Errno.EAGAIN) {
        this.stats.add('eagain')
        // Progress then a stop: a present page follows (the next call reports EEXIST for it).
        // No progress: the client's address space is changing (a REMOVE/UNMAP event is queued
        // and unread); read the events first, then retry this fault.
        if (result.done === 0) return 'retry'
      } else if (result.error === Errno.ENOENT && client.nonCooperative) {
        // A copy must lie inside one registered VMA. A restored process may have split one
        // (mprotect of part of it) or unregistered part of it: go page by page; a single page
        // the kernel still refuses is not registered memory, so no fault can ever ask for it.
        if (step > this.pageSize) {
          step = this.pageSize
          continue
        }
        uffdWake(client.uffd, dst + done, this.pageSize)
        client.states.markRemoved(first + done / this.pageSize, 1)
        done += this.pageSize
      } else if (result.error === Errno.ENOENT || result.error === Errno.ESRCH) {
        // The mapping or the whole process is gone.
        return 'gone'
      } else {
        throw new FatalServeError(`unexpected ${errnoName(result.error)} installing ${length} bytes at ${hex(dst)}`, errnoName(result.error))
      }
    }
    return 'served'
  }

  private pageAddress(region: GuestRegion, page: number): number {
    return region.baseHostVirtAddr + (page * this.pageSize - region.offset)
  }

  /**
   * The address of `page`'s bytes in its chunk's decoded payload: a chunk's payload is its
   * non-zero pages packed in order, so consecutive non-zero pages are contiguous there too.
   */
  private payloadAddress(page: number): number {
    return this.unitAddress(this.geometry.chunkOfOffset(page * this.pageSize)) + this.payloadIndex[page] * this.pageSize
  }

  /** Where the verified payload of a unit (chunk or packed block) is, decoding it if needed. */
  private unitAddress(unit: number): number {
    try {
      return addressOf((this.cache.has(unit) ? undefined : this.chunkSource?.(unit)) ?? this.cache.payload(unit))
    } catch (error) {
      if (error instanceof SnapshotFormatError) throw new FatalServeError(error.message, error.code)
      throw error
    }
  }

  /** True when `chunk`'s payload is decoded in the cache (no decode needed to install it). */
  isCached(chunk: number): boolean {
    return this.cache.has(chunk)
  }

  /** Hands a payload decoded by the decode pool to the cache, for later faults and other clients. */
  adoptDecoded(chunk: number, payload: Buffer): void {
    this.cache.adopt(chunk, payload)
  }

  /** Pages that are present or removed, of all the client's region pages. */
  isComplete(client: Client): boolean {
    return client.states.settledCount >= client.regionPages
  }
}
