import {type RemoteReport} from '../remote/remote-snapshot.js'

/**
 * Counters and a latency histogram of a resume, kept in a SharedArrayBuffer: the fault-loop
 * worker writes them with plain stores on its hot path, the main thread reads them whenever it
 * wants (SIGUSR1, exit) without interrupting the worker. A torn read of a counter that is being
 * incremented can only be one event stale.
 */
export const COUNTERS = [
  'faults',
  'faultsData',
  'faultsZero',
  'faultsRemoved',
  'faultsAlreadyPresent',
  'pagesCopied',
  'pagesZeroed',
  'faultAroundPages',
  'prefetchedPages',
  'helperPages',
  'kernelZeroRanges',
  'kernelZeroPages',
  'workingSetChunks',
  'copyIoctls',
  'zeropageIoctls',
  'bytesCopied',
  'chunksDecoded',
  'framesDecoded',
  'unitsDecoded',
  'unitsShared',
  'bytesDecompressed',
  'cacheHits',
  'cacheMisses',
  'eexist',
  'eagain',
  'removeEvents',
  'removedPages',
  'unmapEvents',
  'remapEvents',
  'forkEvents',
  'clients',
  'clientsEnded',
  'firstFaultMs',
  'lastFaultMs',
  'latencyMinUs',
  'latencyMaxUs',
  'latencySumUs',
  'memoryCompleteMs',
  'workingSetDoneMs',
  'prefetchCopiedPages',
  'hitsTracked',
  'prefetchHits',
  'prefetchWasted',
  'hitsSampledMs',
  'stagedUnits',
  'stagedBytes',
  'stagedMs',
] as const

export type CounterName = (typeof COUNTERS)[number]

/** Latency buckets: 8 per power of two from 1 µs up, so a percentile is within ~9%. */
const SUB_BUCKETS = 8
const OCTAVES = 26
export const BUCKETS = SUB_BUCKETS * OCTAVES

export class RunStats {
  readonly values: Float64Array
  readonly histogram: Float64Array
  private readonly index: Record<CounterName, number>

  readonly buffer: SharedArrayBuffer

  /** Without `buffer`, new counters; with it, a view of counters another thread keeps. */
  constructor(buffer?: SharedArrayBuffer) {
    this.buffer = buffer ?? new SharedArrayBuffer((COUNTERS.length + BUCKETS) * 8)
    this.values = new Float64Array(this.buffer, 0, COUNTERS.length)
    this.histogram = new Float64Array(this.buffer, COUNTERS.length * 8, BUCKETS)
    this.index = Object.fromEntries(COUNTERS.map((name, i) => [name, i])) as Record<CounterName, number>
    // Any first sample is below it; a 0 would stay the minimum for good.
    if (!buffer) this.values[this.index.latencyMinUs] = Infinity
  }

  add(name: CounterName, n = 1): void {
    this.values[this.index[name]] += n
  }

  set(name: CounterName, value: number): void {
    this.values[this.index[name]] = value
  }

  get(name: CounterName): number {
    return this.values[this.index[name]]
  }

  recordLatency(us: number): void {
    this.histogram[bucketOf(us)]++
    this.values[this.index.latencySumUs] += us
    if (us > this.values[this.index.latencyMaxUs]) this.values[this.index.latencyMaxUs] = us
    if (us < this.values[this.index.latencyMinUs]) this.values[this.index.latencyMinUs] = us
  }
}

/**
 * Milliseconds since the first client's handshake: the origin of time-to-first-fault,
 * time-to-complete and working-set timestamps (not process start, which includes start-up and
 * waiting for the VMM).
 */
export class RunClock {
  private origin: number | undefined

  start(): void {
    this.origin ??= performance.now()
  }

  now(): number {
    return this.origin === undefined ? 0 : performance.now() - this.origin
  }
}

export function bucketOf(us: number): number {
  if (us < 1) return 0
  const octave = Math.floor(Math.log2(us))
  const sub = Math.floor((us / 2 ** octave - 1) * SUB_BUCKETS)
  return Math.min(BUCKETS - 1, octave * SUB_BUCKETS + sub)
}

/** The upper bound of a bucket in µs. */
export function bucketUpperUs(bucket: number): number {
  const octave = Math.floor(bucket / SUB_BUCKETS)
  const sub = bucket % SUB_BUCKETS
  return 2 ** octave * (1 + (sub + 1) / SUB_BUCKETS)
}

/** The smallest bucket bound below which `q` (0..1) of the samples fall. */
export function percentileUs(histogram: ArrayLike<number>, q: number): number | null {
  let total = 0
  for (let i = 0; i < histogram.length; i++) total += histogram[i]
  if (total === 0) return null
  const rank = Math.ceil(q * total)
  let seen = 0
  for (let i = 0; i < histogram.length; i++) {
    seen += histogram[i]
    if (seen >= rank) return bucketUpperUs(i)
  }
  return bucketUpperUs(histogram.length - 1)
}

/**
 * A percentile is its bucket's upper bound, which can lie above every sample (the top bucket's
 * bound over the exact max would report p99 > max), and the last bucket holds every sample from
 * 2^26 µs up, so its bound can lie below them all (p50 < min): no reader believes either. The
 * exact min and max bound every percentile.
 */
export function clampPercentile(p: number | null, min: number | null, max: number | null): number | null {
  if (p === null) return null
  const atLeast = min === null ? p : Math.max(p, min)
  return max === null ? atLeast : Math.min(atLeast, max)
}

export interface ResumeReport {
  kind: 'uffd-resume-stats'
  version: 1
  snapshot: string
  /** The other snapshots the handler served (--also), each on its own socket. */
  also?: string[]
  startedAt: string
  durationMs: number
  clients: {served: number; ended: number}
  faults: {total: number; data: number; zero: number; removed: number; alreadyPresent: number}
  /**
   * byHelper: of the prefetched, installed by a helper thread beside the fault loop; toKernel:
   * all-zero pages handed to the kernel, which fills them without faults (both absent in older reports).
   */
  pages: {copied: number; zeroed: number; faultAround: number; prefetched: number; byHelper?: number; toKernel?: number}
  /** Units queued from a recorded working set for the clients: its packed blocks, or its chunks. */
  workingSetChunks: number
  /**
   * The working set's units decoded into memory before the first client (bytes decoded, ms from
   * start until done; --ready-file waits for it). null when nothing was staged.
   */
  staged: {units: number; bytes: number; ms: number} | null
  ioctls: {copy: number; zeropage: number; eexist: number; eagain: number}
  bytes: {copied: number; decompressed: number}
  /**
   * decoded: chunks of the image made ready (for a chain: assembled); storedUnitsDecoded: stored
   * units read and verified for them (a file's chunks, packed or layer blocks; for one file the
   * same as decoded, for a chain the units of every file it took pages from); storedUnitsShared:
   * stored units a chain took already decoded by another snapshot's chain served by the same
   * handler (sibling layers over one base, `--also`): decodes spared (absent in older reports).
   */
  chunks: {decoded: number; framesDecoded?: number; storedUnitsDecoded?: number; storedUnitsShared?: number; cacheHits: number; cacheMisses: number; hitRate: number | null}
  events: {remove: number; removedPages: number; unmap: number; remap: number; fork: number}
  /**
   * Time from reading a fault message to the faulting page being installed, in µs; every
   * percentile lies within [min, max]. `min` is absent in reports of older versions.
   */
  latencyUs: {p50: number | null; p90: number | null; p99: number | null; min?: number | null; max: number | null; mean: number | null}
  /** From the first handshake to the first and last fault, ms. */
  timeToFirstFaultMs: number | null
  timeToLastFaultMs: number | null
  /** From the first handshake until a client's memory was all present (prefetch, population). */
  timeToMemoryCompleteMs: number | null
  /** From the first handshake until a client's working set was all installed (or faulted in). */
  timeToWorkingSetMs: number | null
  /**
   * With --count-hits: of the data pages installed ahead of need (prefetch, readahead,
   * population), how many the client touched afterwards, and how many it had not, as of the
   * last sample of its accessed bits (`sampledAtMs`: ms after the handler started). null when
   * not counted.
   */
  prefetchHits: {copiedPages: number; hits: number; wasted: number; sampledAtMs: number} | null
  /** A snapshot served from object storage: what fetching it cost (absent for a local file). */
  remote?: RemoteReport
}

export function buildReport(stats: RunStats, snapshot: string, startedAt: Date, now = Date.now(), remote?: RemoteReport, also: readonly string[] = []): ResumeReport {
  const g = (name: CounterName): number => stats.get(name)
  const faults = g('faults')
  const lookups = g('cacheHits') + g('cacheMisses')
  // Finite once a sample is in: read while the loop records its first fault, it may not be yet.
  const min = faults && Number.isFinite(g('latencyMinUs')) ? g('latencyMinUs') : null
  const max = faults ? g('latencyMaxUs') : null
  const percentile = (q: number): number | null => clampPercentile(percentileUs(stats.histogram, q), min, max)
  return {
    kind: 'uffd-resume-stats',
    version: 1,
    snapshot,
    ...(also.length > 0 ? {also: [...also]} : {}),
    startedAt: startedAt.toISOString(),
    durationMs: now - startedAt.getTime(),
    clients: {served: g('clients'), ended: g('clientsEnded')},
    faults: {total: faults, data: g('faultsData'), zero: g('faultsZero'), removed: g('faultsRemoved'), alreadyPresent: g('faultsAlreadyPresent')},
    pages: {copied: g('pagesCopied'), zeroed: g('pagesZeroed'), faultAround: g('faultAroundPages'), prefetched: g('prefetchedPages'), byHelper: g('helperPages'), toKernel: g('kernelZeroPages')},
    workingSetChunks: g('workingSetChunks'),
    staged: g('stagedUnits') ? {units: g('stagedUnits'), bytes: g('stagedBytes'), ms: g('stagedMs')} : null,
    ioctls: {copy: g('copyIoctls'), zeropage: g('zeropageIoctls'), eexist: g('eexist'), eagain: g('eagain')},
    bytes: {copied: g('bytesCopied'), decompressed: g('bytesDecompressed')},
    chunks: {decoded: g('chunksDecoded'), framesDecoded: g('framesDecoded'), storedUnitsDecoded: g('unitsDecoded'), storedUnitsShared: g('unitsShared'), cacheHits: g('cacheHits'), cacheMisses: g('cacheMisses'), hitRate: lookups ? g('cacheHits') / lookups : null},
    events: {remove: g('removeEvents'), removedPages: g('removedPages'), unmap: g('unmapEvents'), remap: g('remapEvents'), fork: g('forkEvents')},
    latencyUs: {p50: percentile(0.5), p90: percentile(0.9), p99: percentile(0.99), min, max, mean: faults ? g('latencySumUs') / faults : null},
    timeToFirstFaultMs: faults ? g('firstFaultMs') : null,
    timeToLastFaultMs: faults ? g('lastFaultMs') : null,
    timeToMemoryCompleteMs: g('memoryCompleteMs') || null,
    timeToWorkingSetMs: g('workingSetDoneMs') || null,
    prefetchHits: g('hitsTracked') ? {copiedPages: g('prefetchCopiedPages'), hits: g('prefetchHits'), wasted: g('prefetchWasted'), sampledAtMs: g('hitsSampledMs')} : null,
    ...(remote ? {remote} : {}),
  }
}
