import {UffdError} from '../../core/errors.js'
import {SnapshotFormatError} from '../../format/errors.js'
import {type Geometry} from '../../format/geometry.js'
import {PackedPageLookup, packedBlockRuns, zeroRunWindowBytes} from '../../format/packed-set.js'
import {largeZeroRuns, payloadPosition, type ZeroMap} from '../../format/zero-map.js'
import {type ImageReader} from '../../snapshot/layered-reader.js'
import {addressOf, rethrowAsSysError, SysError} from '../../sys/index.js'
import {type GuestRegion} from '../protocol.js'
import {type RunClock, type RunStats} from '../run-stats.js'
import {type Client, type PendingFault} from './client.js'
import {atLeast, nextWindow, widestWindow, windowSizes, type WindowSizes} from './fault-window.js'
import {type CopiedRange, type Installed, type Installer, type Outcome, ZEROS} from './installer.js'
import {PAGE_MISSING, PAGE_PRESENT, PAGE_REMOVED} from './page-states.js'
import {type PayloadSource} from './payload-source.js'

function hex(n: number): string {
  return `0x${n.toString(16)}`
}

/**
 * What an install that may find its bytes still in object storage did: as Installed, or 'wait'
 * (nothing installed; the bytes are asked for at demand priority, landedFd says when they land).
 */
export interface Attempted {
  outcome: Outcome | 'wait'
  pages: number
}

/**
 * A chunk's frames decoded on their own for one fault (see FaultServer.framesBase): `base` is
 * where the chunk's payload would start, so payload page p of those frames lies p pages past it.
 */
interface DecodedFrames {
  chunk: number
  base: number
}

/** The image pages a served fault installed around its faulting page: [first, end), page first. */
export interface FaultWindow {
  page: number
  first: number
  end: number
}

/**
 * A fault's outcome and, when its faulting page was installed (even if the client then went
 * away while the rest of its window was filled), the window it installed, for recording and
 * readahead.
 */
export interface Served {
  /** 'wait': the unit's bytes are still on their way from object storage; serve it again when they land. */
  outcome: Outcome | 'wait'
  window: FaultWindow | undefined
}

export interface ServeOptions {
  /**
   * Bytes around a faulting page installed with it (an aligned window, clipped to its region):
   * from `faultAroundMinBytes` (default: the same, a fixed window) growing to `faultAroundBytes`
   * while faults land next to each other (see fault-window.ts).
   */
  faultAroundBytes: number
  faultAroundMinBytes?: number
  /**
   * Serve faults on pages of the snapshot's packed working set from their packed block (the
   * pages the set touches next) instead of a window of chunks around them.
   */
  packedWorkingSet?: boolean
}

/**
 * Zero ranges handed to the kernel are at least this long, and at most KERNEL_ZERO_MAX_RANGES of
 * them, the longest: each splits the client's mapping (up to two more VMAs, against the process's
 * vm.max_map_count, 65530 by default), which only pays for itself on a long range.
 */
export const KERNEL_ZERO_MIN_BYTES = 2 * 1024 * 1024
export const KERNEL_ZERO_MAX_RANGES = 128

/**
 * The smallest part of `reader`'s chunks that decodes on its own, in bytes: where an adaptive
 * window starts (an isolated fault pays for its decode anyway). A frame of a framed file (of a
 * chain's base, whose frames serve the chunks it holds unchanged), else a chunk.
 */
export function smallestWindowBytes(reader: ImageReader): number {
  const {pageSize, chunkSize} = reader.geometry
  return reader.framePages > 0 ? reader.framePages * pageSize : Math.max(chunkSize, pageSize)
}

/**
 * Zero runs around packed set pages grow within aligned windows of this many pages
 * (zeroRunWindowBytes; one page on hugetlbfs, where zeros are copied, not mapped).
 */
export function zeroRunWindowPages(reader: ImageReader): number {
  return reader.packed ? Math.max(1, zeroRunWindowBytes(reader.packed) / reader.geometry.pageSize) : 1
}

/**
 * Serves page faults from a snapshot: the policy half of the fault loop. For a fault it installs
 * the faulting page's run first (so the faulting thread wakes as early as possible), then the
 * other missing pages of the fault-around window: data runs with one copy each straight from the
 * unit's decoded payload, zero runs with one zero fill each. Only MISSING pages are ever filled
 * (the installer checks and marks page states), so nothing is copied twice and removed memory
 * is never refilled with snapshot data. Payloads come from a PayloadSource, pages go in through
 * the Installer.
 */
export class FaultServer {
  readonly geometry: Geometry
  readonly windowSizes: WindowSizes
  private readonly zeroMap: ZeroMap
  private readonly pageSize: number
  private readonly chunkCount: number
  /** The snapshot's name, for errors reading it. */
  private readonly snapshotName: string
  /** Which packed working-set block holds a page (when serving from packed blocks). */
  private readonly packedPages: PackedPageLookup | undefined
  /** Each packed block's runs (packedBlockRuns): the same for every client (only while the set is served from its blocks). */
  private readonly runsOfBlock: Int32Array[] = []
  /** The image's large zero runs (largeZeroRuns), found when a client first wants them. */
  private kernelZeroRuns: {first: number; end: number}[] | undefined

  constructor(
    reader: ImageReader,
    private readonly source: PayloadSource,
    private readonly installer: Installer,
    private readonly stats: RunStats,
    private readonly clock: RunClock,
    options: ServeOptions,
  ) {
    this.geometry = reader.geometry
    this.zeroMap = reader.zeroMap
    this.pageSize = this.geometry.pageSize
    this.chunkCount = reader.index.length
    this.snapshotName = reader.source.name
    this.windowSizes = windowSizes(options.faultAroundMinBytes ?? options.faultAroundBytes, options.faultAroundBytes, this.pageSize)
    const packed = reader.packed
    if (options.packedWorkingSet && packed) {
      this.packedPages = new PackedPageLookup(packed)
      for (let b = 0; b < packed.blocks.length; b++) this.runsOfBlock.push(packedBlockRuns(packed, b, reader.zeroMap))
    }
  }

  serve(client: Client, fault: PendingFault): Served {
    const location = client.map.locate(fault.address)
    if (!location && client.nonCooperative) {
      // A restored process's registered memory that was not in the dump: a mapping grown with
      // mremap (it keeps the registration), or a PROT_NONE reservation made accessible since.
      // Such memory did not exist at dump time, so it is fresh anonymous memory: zeros.
      const {outcome} = this.installer.fillFreshPage(client, fault.address - (fault.address % this.pageSize))
      if (outcome === 'served') this.recordServed(fault, 'faultsZero')
      return {outcome, window: undefined}
    }
    if (!location) {
      throw new UffdError('FAULT_OUTSIDE_REGIONS', `fault at ${hex(fault.address)} lies outside every memory region the client announced`)
    }
    const {region} = location
    const page = Math.floor(location.imageOffset / this.pageSize)
    const state = client.states.get(page)
    if (state === PAGE_PRESENT) {
      // Served already (by fault-around, or a duplicate message from another thread): the page
      // is there, but make sure the thread that faulted is not left waiting.
      this.installer.wakePage(client, region, page)
      this.recordServed(fault, 'faultsAlreadyPresent')
      return {outcome: 'served', window: undefined}
    }
    if (state === PAGE_REMOVED) {
      const {outcome} = this.installer.fill(client, region, page, 1, ZEROS)
      if (outcome === 'served') this.recordServed(fault, 'faultsRemoved')
      return {outcome, window: undefined}
    }
    const kind = this.zeroMap.isZero(page) ? 'faultsZero' : 'faultsData'
    // Bytes still in object storage: the fault waits (the vCPU with it) while the loop goes on
    // serving everything else; it is served again when they land.
    const block = this.packedPages?.blockOf(page) ?? -1
    const unit = block >= 0 ? this.chunkCount + block : kind === 'faultsData' ? this.geometry.chunkOfOffset(page * this.pageSize) : -1
    // (isLocal is a hint from the extent states; a file evicted since it landed is found out by
    // the read itself, which then asks for it and answers 'wait' the same way.)
    if (unit >= 0 && !this.source.isLocal(unit)) {
      this.source.fetchNow([unit], unit < this.chunkCount ? this.chunksAround(page, region) : [])
      return {outcome: 'wait', window: undefined}
    }
    if (block >= 0) {
      // A page of the packed working set: its block holds the pages touched around the same
      // time, wherever they lie, which predicts the next faults better than its neighbours do.
      const installed = this.installBlock(client, block, page)
      if (installed.outcome === 'wait') return {outcome: 'wait', window: undefined}
      if (installed.outcome !== 'served' && !(installed.outcome === 'gone' && client.states.get(page) === PAGE_PRESENT)) return {outcome: installed.outcome, window: undefined}
      this.recordServed(fault, kind)
      this.stats.add('faultAroundPages', installed.pages - 1)
      return {outcome: installed.outcome, window: {page, first: page, end: page + 1}}
    }
    const regionFirst = region.offset / this.pageSize
    const regionEnd = regionFirst + region.size / this.pageSize
    let window = nextWindow(client.faultWindow, page, this.windowSizes, regionFirst, regionEnd)
    const decoded = kind === 'faultsData' ? this.framesBase(unit, window) : undefined
    if (decoded === 'wait') return {outcome: 'wait', window: undefined}
    // Decoded (or assembled) whole by this fault, not by frames: it installs all it paid for.
    if (decoded === 'whole') window = atLeast(window, this.geometry.pagesPerChunk, page, regionFirst, regionEnd)
    const frames = decoded === 'whole' ? undefined : decoded
    const [runFirst, runEnd] = this.runAround(client, page, window.first, window.end)
    const faulting = this.fillRun(client, region, runFirst, runEnd - runFirst, undefined, frames)
    if (faulting.outcome !== 'served') return {outcome: faulting.outcome, window: undefined}
    client.faultWindow = window
    this.recordServed(fault, kind)
    // The fault itself is served; the rest of the window is a bonus. If the address space
    // is changing (EAGAIN), the remaining pages are left to later faults.
    const rest = this.fillWindow(client, region, window.first, window.end, undefined, 'all', frames)
    let pages = faulting.pages + rest.pages
    let outcome = rest.outcome
    // Zero runs cost no decode and almost no copy: they are filled over the widest window
    // whatever the window's size now, so zero memory near a fault does not fault again.
    const widest = widestWindow(page, this.windowSizes, regionFirst, regionEnd)
    if (outcome === 'served' && (widest.first < window.first || widest.end > window.end)) {
      const zeros = this.fillWindow(client, region, widest.first, widest.end, undefined, 'zeros')
      pages += zeros.pages
      outcome = zeros.outcome
    }
    this.stats.add('faultAroundPages', pages - 1)
    return {outcome: outcome === 'gone' ? 'gone' : 'served', window: {page, first: window.first, end: window.end}}
  }

  /**
   * A window inside one chunk and smaller than it is served from the frames holding it alone,
   * when the chunk is framed and nothing has it decoded (PayloadSource.framesOf). Undefined:
   * install from the whole payload; 'whole': the same, decoding it whole now (the chunk cannot be
   * decoded by frames: raw, assembled from a chain's files, one frame); 'wait': its bytes are
   * not on this host.
   */
  private framesBase(chunk: number, window: {first: number; end: number}): DecodedFrames | undefined | 'whole' | 'wait' {
    // Only for an adaptive window: it installs the whole of what it decodes, and grows when its
    // neighbours are wanted. A fixed window smaller than a chunk (a page-by-page recording run)
    // has the rest of the chunk wanted by the faults after it: decoded whole, into the cache.
    if (this.windowSizes.minPages === this.windowSizes.maxPages) return undefined
    // A grown window clipped to a small region can be smaller than a chunk and still cross into
    // the next one, whose pages are not in these frames.
    const {pagesPerChunk} = this.geometry
    if (window.end - window.first >= pagesPerChunk || Math.floor(window.first / pagesPerChunk) !== chunk || Math.floor((window.end - 1) / pagesPerChunk) !== chunk) return undefined
    let base: number | 'ready' | 'whole' | undefined
    try {
      base = this.source.framesOf(chunk, window.first, window.end)
    } catch (error) {
      this.unitFailed(chunk, error)
    }
    if (base === 'ready') return undefined
    return base === 'whole' ? 'whole' : base === undefined ? 'wait' : {chunk, base}
  }

  /**
   * The other chunks of the widest window around `page`: asked for with a fault's own chunk
   * (in its ranged request where they are stored back to back with it), since a round trip to
   * the store costs far more than the bytes around the fault, which the window may grow into.
   * They go at prefetch priority: the fault waits only for its own chunk, and a later fault
   * elsewhere is fetched before those that could not share its request.
   */
  private chunksAround(page: number, region: GuestRegion): number[] {
    const regionFirst = region.offset / this.pageSize
    const widest = widestWindow(page, this.windowSizes, regionFirst, regionFirst + region.size / this.pageSize)
    const own = this.geometry.chunkOfOffset(page * this.pageSize)
    const chunks: number[] = []
    const last = this.geometry.chunkOfOffset((widest.end - 1) * this.pageSize)
    for (let c = this.geometry.chunkOfOffset(widest.first * this.pageSize); c <= last; c++) if (c !== own) chunks.push(c)
    return chunks
  }

  /**
   * Hands the image's large all-zero ranges of `client`'s memory to the kernel (see
   * Installer.handToKernel): their first touch then costs no fault at all. Returns the pages
   * handed over. For a VMM only: a restored process's mappings move and split under us.
   */
  handZerosToKernel(client: Client): number {
    const minPages = Math.max(1, KERNEL_ZERO_MIN_BYTES / this.pageSize)
    this.kernelZeroRuns ??= largeZeroRuns(this.zeroMap, minPages, 1, KERNEL_ZERO_MAX_RANGES)
    let pages = 0
    // (A region's pages are the snapshot's, a huge page on hugetlbfs: the handshake checks it, so
    // any run of image pages is a range the mapping can be split at.)
    for (const region of client.map.all) {
      const regionFirst = region.offset / this.pageSize
      const regionEnd = regionFirst + region.size / this.pageSize
      for (const run of this.kernelZeroRuns) {
        const first = Math.max(run.first, regionFirst)
        const end = Math.min(run.end, regionEnd)
        if (end - first < minPages) continue
        if (this.installer.handToKernel(client, region, first, end - first)) pages += end - first
      }
    }
    return pages
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
    const zero = this.zeroMap.isZero(page)
    const chunk = this.geometry.chunkOfOffset(page * this.pageSize)
    const same = (p: number): boolean => client.states.get(p) === PAGE_MISSING && this.zeroMap.isZero(p) === zero && (zero || this.geometry.chunkOfOffset(p * this.pageSize) === chunk)
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
  fillImageRange(client: Client, first: number, end: number, copied?: CopiedRange[]): Installed {
    let pages = 0
    for (const region of client.map.all) {
      const regionFirst = region.offset / this.pageSize
      const from = Math.max(first, regionFirst)
      const to = Math.min(end, regionFirst + region.size / this.pageSize)
      if (from >= to) continue
      const r = this.fillWindow(client, region, from, to, copied)
      pages += r.pages
      if (r.outcome !== 'served') return {outcome: r.outcome, pages}
    }
    return {outcome: 'served', pages}
  }

  /**
   * Installs the still-missing pages of packed working-set block `block`, the run holding
   * `first` (a faulting page) before the others; 'wait' when its bytes are not on this host.
   */
  installBlock(client: Client, block: number, first = -1, copied?: CopiedRange[]): Attempted {
    const runs = this.runsOfBlock[block]
    // Resolved before anything is installed: a block that fails its checksum installs nothing.
    let payload: number | undefined = ZEROS
    for (let i = 2; i < runs.length; i += 3) {
      if (runs[i] >= 0) {
        payload = this.unitAddress(this.chunkCount + block)
        break
      }
    }
    if (payload === undefined) return {outcome: 'wait', pages: 0}
    let firstRun = -1
    for (let i = 0; first >= 0 && i < runs.length; i += 3) {
      if (first >= runs[i] && first < runs[i] + runs[i + 1]) firstRun = i / 3
    }
    return this.installer.fillBlock(client, `packed working-set block ${block}`, runs, payload, firstRun, copied)
  }

  /** Packed block `block`'s runs (packedBlockRuns), for an install helper. */
  blockRuns(block: number): Int32Array {
    return this.runsOfBlock[block]
  }

  /**
   * Installs every still-missing run in [first, end) of one region (of zero pages only, with
   * 'zeros'); data of `frames`' chunk from those frames (see framesBase) when given, else from
   * the whole payload.
   */
  private fillWindow(client: Client, region: GuestRegion, first: number, end: number, copied?: CopiedRange[], what: 'all' | 'zeros' = 'all', frames?: DecodedFrames): Installed {
    let pages = 0
    let p = first
    while (p < end) {
      if (client.states.get(p) !== PAGE_MISSING || (what === 'zeros' && !this.zeroMap.isZero(p))) {
        p++
        continue
      }
      const zero = this.zeroMap.isZero(p)
      const chunk = this.geometry.chunkOfOffset(p * this.pageSize)
      let q = p + 1
      while (q < end && client.states.get(q) === PAGE_MISSING && this.zeroMap.isZero(q) === zero && (zero || this.geometry.chunkOfOffset(q * this.pageSize) === chunk)) q++
      // Fault-around and prefetch never wait on the network: a run whose bytes are not here is
      // left to its own fault, or to prefetch once they land.
      if (!zero && !this.source.isLocal(chunk)) {
        p = q
        continue
      }
      const r = this.fillRun(client, region, p, q - p, copied, frames)
      pages += r.pages
      if (r.outcome === 'wait') {
        p = q
        continue
      }
      if (r.outcome !== 'served') return {outcome: r.outcome, pages}
      p = q
    }
    return {outcome: 'served', pages}
  }

  /**
   * Installs a run of pages that are all zero or all in one chunk, data from `frames` when they
   * are that chunk's; 'wait' when the chunk's bytes are not on this host.
   */
  private fillRun(client: Client, region: GuestRegion, first: number, count: number, copied?: CopiedRange[], frames?: DecodedFrames): Attempted {
    const fromFrames = frames !== undefined && this.geometry.chunkOfOffset(first * this.pageSize) === frames.chunk
    const source = this.zeroMap.isZero(first) ? ZEROS : fromFrames ? frames.base + this.payloadOffset(first) : this.payloadAddress(first)
    if (source === undefined) return {outcome: 'wait', pages: 0}
    return this.installer.fill(client, region, first, count, source, copied)
  }

  /**
   * The address of `page`'s bytes in its chunk's decoded payload: a chunk's payload is its
   * non-zero pages packed in order, so consecutive non-zero pages are contiguous there too.
   * Undefined when the chunk's bytes are not on this host.
   */
  private payloadAddress(page: number): number | undefined {
    const unit = this.unitAddress(this.geometry.chunkOfOffset(page * this.pageSize))
    return unit === undefined ? undefined : unit + this.payloadOffset(page)
  }

  /** Where `page`'s bytes lie in its chunk's payload, from the payload's start. */
  private payloadOffset(page: number): number {
    return payloadPosition(this.zeroMap, page, this.geometry.pagesPerChunk) * this.pageSize
  }

  /**
   * Where the verified payload of a unit (chunk or packed block) is, or undefined when its
   * stored bytes are still in object storage (asked for; see PayloadSource.payload). A unit
   * that cannot be read or fails its check is fatal for the client, and only for it: other
   * clients go on, and fail in turn only if they need that unit too.
   */
  private unitAddress(unit: number): number | undefined {
    try {
      const payload = this.source.payload(unit)
      return payload === undefined ? undefined : addressOf(payload)
    } catch (error) {
      this.unitFailed(unit, error)
    }
  }

  /** A unit's read or check failed: the error a client fails with (see unitAddress). */
  private unitFailed(unit: number, error: unknown): never {
    if (error instanceof SnapshotFormatError) throw new UffdError(error.code, error.message, {cause: error})
    if (error instanceof UffdError || error instanceof SysError) throw error
    // Node's fs fails a read (EIO from a failing disk, a device that shrank) with an error that
    // names neither the file nor the chunk, and that the loop would not contain to one client.
    const what = unit < this.chunkCount ? `chunk ${unit}` : `packed working-set block ${unit - this.chunkCount}`
    rethrowAsSysError(error, (error as NodeJS.ErrnoException).syscall ?? 'read', `reading ${what} of ${this.snapshotName}`)
  }
}
