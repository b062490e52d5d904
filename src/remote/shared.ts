import {BUCKETS} from '../resume/run-stats.js'
import {type Location} from './location.js'
import {type ObjectIdentity} from './object.js'
import {type S3Settings} from './s3-object.js'

/**
 * What the fetcher thread and every thread that reads a remote snapshot share: the extents
 * (distinct stored byte ranges: a chunk's or a packed block's stored bytes; deduplicated chunks
 * share one), each extent's state, the counters, and the first failure. States and counters
 * live in SharedArrayBuffers, so a reader blocked in Atomics.wait is woken by the fetcher
 * without either running an event loop for the other.
 */

/** Not on disk as far as this handler knows. */
export const EXTENT_ABSENT = 0
/** Asked of the fetcher, not landed yet. */
export const EXTENT_ASKED = 1
/** In the cache directory (a reader that finds the file gone sets it back to ABSENT). */
export const EXTENT_PRESENT = 2
/**
 * Could not be had (see the failure text). Readers waiting on it fail; after FAILED_HOLD_MS it
 * is ABSENT again, so a later client (--serve) or a retried command asks the store anew.
 */
export const EXTENT_FAILED = 3
export const FAILED_HOLD_MS = 5000
/**
 * Fetched and verified, but the cache directory could not store it (read-only, I/O errors,
 * permissions): its bytes are in the hand-over area (see Handover) until newer ones need the room.
 */
export const EXTENT_IN_MEMORY = 4

export {PRIORITY_DEMAND, PRIORITY_PREFETCH, type Priority} from '../snapshot/byte-source.js'

/** Counters, integers (bytes, counts, µs), added to with Atomics by any thread. */
export const REMOTE_COUNTERS = [
  'requests',
  'bytesFetched',
  'extentsFetched',
  'retries',
  'badResponses',
  'diskHits',
  'diskBytes',
  'waits',
  'waitUs',
  'maxWaitUs',
  'cacheWriteErrors',
  'evictedBytes',
  'memoryHandovers',
  'claimWaits',
] as const
export type RemoteCounter = (typeof REMOTE_COUNTERS)[number]

export interface FetchOptions {
  /** Requests in flight at once, at most. */
  concurrency: number
  /** Neighbouring extents wanted at once are fetched in one ranged request of at most this many bytes. */
  maxRequestBytes: number
  /** A request that receives nothing for this long is aborted and retried. */
  idleTimeoutMs: number
  /** An extent that cannot be had within this long of being asked for fails (FETCH_DEADLINE). */
  deadlineMs: number
}

/** Everything a thread needs to read a remote snapshot; structured-cloneable (SharedArrayBuffers are shared, not copied). */
export interface RemoteShare {
  location: Location
  name: string
  s3: S3Settings
  identity: ObjectIdentity
  /** Byte ranges read when the snapshot was opened (header, index, zero map, packed table, footer). */
  segments: {offset: number; bytes: Uint8Array}[]
  /** Per extent, sorted by offset: its offset, stored length, CRC-32 and the CRC's seed (ExtentTable). */
  extentOffsets: Float64Array
  extentLengths: Int32Array
  extentCrcs: Uint32Array
  extentSeeds: Uint32Array
  /** The snapshot's cache directory: root/<identity digest>. */
  cacheDir: string
  cacheRoot: string
  cacheMaxBytes: number
  fetch: FetchOptions
  states: SharedArrayBuffer
  counters: SharedArrayBuffer
  /** Fetch latencies (µs, run-stats buckets). */
  latency: SharedArrayBuffer
  /** The hand-over area and its index (see Handover). */
  handover: SharedArrayBuffer
  handoverIndex: SharedArrayBuffer
  /** [length, ...utf-8 JSON {code, message}] of the first failure. */
  failure: SharedArrayBuffer
  /** Signalled (eventfd) whenever an extent lands or fails, for the fault loop's poll(). */
  landedFd: number
}

/** Fills `dst` from the byte ranges read at open when one of them holds all of [position, +dst.length); false otherwise. */
export function readFromSegments(segments: readonly {offset: number; bytes: Uint8Array}[], dst: Uint8Array, position: number): boolean {
  for (const s of segments) {
    if (position >= s.offset && position + dst.length <= s.offset + s.bytes.length) {
      dst.set(s.bytes.subarray(position - s.offset, position - s.offset + dst.length))
      return true
    }
  }
  return false
}

export const FAILURE_BYTES = 4096

/**
 * The hand-over area holds at least this much, and at least HANDOVER_EXTENTS of the largest
 * extent. Untouched, it costs address space only: it is used when the cache directory fails.
 */
export const HANDOVER_MIN_BYTES = 64 << 20
const HANDOVER_EXTENTS = 4

export function sharedBuffers(extents: number, largestExtent = 0): Pick<RemoteShare, 'states' | 'counters' | 'latency' | 'failure' | 'handover' | 'handoverIndex'> {
  return {
    states: new SharedArrayBuffer(Math.max(1, extents) * 4),
    counters: new SharedArrayBuffer(REMOTE_COUNTERS.length * 8),
    latency: new SharedArrayBuffer(BUCKETS * 8),
    failure: new SharedArrayBuffer(FAILURE_BYTES),
    handover: new SharedArrayBuffer(Math.max(HANDOVER_MIN_BYTES, HANDOVER_EXTENTS * largestExtent)),
    handoverIndex: new SharedArrayBuffer(Math.max(1, extents) * 8),
  }
}

/**
 * Verified extents handed from the fetcher to readers in memory, for when the cache directory
 * cannot store them: a ring of shared memory, bounded, written by the fetcher thread only. Each
 * extent has two index cells: where its bytes lie in the ring, and a generation the writer bumps
 * before it overwrites them. A reader copies, then checks that the generation did not move and
 * the extent is still IN_MEMORY; a copy torn by an overwrite is thrown away (and the reader's
 * CRC check stands behind that too).
 */
export class Handover {
  private readonly ring: Uint8Array
  private readonly index: Int32Array
  private readonly states: Int32Array
  private readonly lengths: Int32Array
  /** Writer only: the extents in the ring, oldest first, and where the next one goes. */
  private readonly residents: {extent: number; at: number; length: number}[] = []
  private next = 0

  constructor(share: Pick<RemoteShare, 'handover' | 'handoverIndex' | 'states' | 'extentLengths'>) {
    this.ring = new Uint8Array(share.handover)
    this.index = new Int32Array(share.handoverIndex)
    this.states = new Int32Array(share.states)
    this.lengths = share.extentLengths
  }

  get capacity(): number {
    return this.ring.length
  }

  /**
   * Reader: fills `dst` with the extent's bytes if it is IN_MEMORY and stays so while copied;
   * false otherwise (not handed over, or pushed out by newer extents: fetch it again).
   */
  read(extent: number, dst: Uint8Array): boolean {
    const generation = Atomics.load(this.index, 2 * extent + 1)
    if (Atomics.load(this.states, extent) !== EXTENT_IN_MEMORY) return false
    const at = Atomics.load(this.index, 2 * extent)
    dst.set(this.ring.subarray(at, at + this.lengths[extent]))
    return Atomics.load(this.index, 2 * extent + 1) === generation && Atomics.load(this.states, extent) === EXTENT_IN_MEMORY
  }

  /**
   * Writer: places verified bytes in the ring, pushing out (back to ABSENT) the oldest extents
   * whose room they take. The caller then sets the extent IN_MEMORY and wakes its readers.
   * False when the bytes are larger than the whole ring.
   */
  put(extent: number, bytes: Uint8Array): boolean {
    if (bytes.length > this.ring.length) return false
    if (this.next + bytes.length > this.ring.length) this.next = 0
    const at = this.next
    const end = at + bytes.length
    for (let i = 0; i < this.residents.length; ) {
      const r = this.residents[i]
      // (An earlier copy of this very extent was discarded by a reader: its room is free.)
      if (r.extent === extent) this.residents.splice(i, 1)
      else if (r.at < end && at < r.at + r.length) {
        Atomics.compareExchange(this.states, r.extent, EXTENT_IN_MEMORY, EXTENT_ABSENT)
        Atomics.add(this.index, 2 * r.extent + 1, 1)
        this.residents.splice(i, 1)
      } else i++
    }
    this.ring.set(bytes, at)
    Atomics.store(this.index, 2 * extent, at)
    this.residents.push({extent, at, length: bytes.length})
    this.next = end
    return true
  }
}

/** The counters of a share, by name. */
export class RemoteCounters {
  private readonly cells: BigInt64Array
  constructor(buffer: SharedArrayBuffer) {
    this.cells = new BigInt64Array(buffer)
  }

  add(name: RemoteCounter, n = 1): void {
    Atomics.add(this.cells, REMOTE_COUNTERS.indexOf(name), BigInt(Math.round(n)))
  }

  max(name: RemoteCounter, n: number): void {
    const i = REMOTE_COUNTERS.indexOf(name)
    const value = BigInt(Math.round(n))
    for (let old = Atomics.load(this.cells, i); value > old; old = Atomics.load(this.cells, i)) {
      if (Atomics.compareExchange(this.cells, i, old, value) === old) return
    }
  }

  get(name: RemoteCounter): number {
    return Number(Atomics.load(this.cells, REMOTE_COUNTERS.indexOf(name)))
  }
}

/**
 * Records the latest failure, for the readers its extents wake. Cell 0 is the text's length, -1
 * while a write is under way (a write racing another is skipped: either message is true).
 */
export function recordFailure(buffer: SharedArrayBuffer, failure: {code: string; message: string}): void {
  const cells = new Int32Array(buffer, 0, 1)
  const text = JSON.stringify(failure)
  const bytes = Buffer.from(text.length > FAILURE_BYTES / 4 ? JSON.stringify({code: failure.code, message: failure.message.slice(0, FAILURE_BYTES / 4)}) : text)
  const old = Atomics.load(cells, 0)
  if (old < 0 || Atomics.compareExchange(cells, 0, old, -1) !== old) return
  new Uint8Array(buffer, 8, bytes.length).set(bytes)
  Atomics.store(cells, 0, bytes.length)
}

export function readFailure(buffer: SharedArrayBuffer): {code: string; message: string} | undefined {
  const cells = new Int32Array(buffer, 0, 1)
  let length = Atomics.load(cells, 0)
  for (let spins = 0; length < 0 && spins < 1000; spins++) length = Atomics.load(cells, 0)
  if (length <= 0) return undefined
  try {
    return JSON.parse(Buffer.from(new Uint8Array(buffer, 8, length)).toString()) as {code: string; message: string}
  } catch {
    return undefined
  }
}
