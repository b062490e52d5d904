import {Codec} from '../../format/constants.js'
import {PRIORITY_DEMAND} from '../../snapshot/byte-source.js'
import {type ImageReader} from '../../snapshot/layered-reader.js'
import {addressOf} from '../../sys/index.js'
import {type RunStats} from '../run-stats.js'
import {ChunkCache} from './chunk-cache.js'
import {type DecodePool, SLOT_ERROR, SLOT_PENDING, SLOT_READY} from './decode-pool.js'

/**
 * Where the fault loop gets a unit's verified bytes (a chunk's payload, or a packed working-set
 * block's). A fault asks for a unit and does not care where it comes from; prefetch asks ahead
 * for the units it will install, on behalf of an owner (a client id, or STAGED), and says when
 * it no longer needs them. This is the seam a new place of chunks plugs into.
 */
export interface PayloadSource {
  /**
   * The verified payload of `unit`, now: decoded here if nothing has it ready, waited for if a
   * decoder is on it. Valid until the unit is released (or, for a fault, the next call).
   * Undefined when its stored bytes are still in object storage: they are asked for at demand
   * priority and landedFd becomes readable when they arrive; the caller never waits on the
   * network. Throws SnapshotFormatError when it cannot be verified.
   */
  payload(unit: number): Buffer | undefined
  /**
   * For a fault that wants only image pages [first, end) of framed chunk `chunk`: those pages'
   * frames decoded on their own, here, when nothing has the chunk decoded or on its way. Returns
   * the address its payload would start at (payload page p lies at that address plus p pages,
   * for the pages of those frames only), valid until the next call. Else use payload(): 'ready'
   * when the chunk is decoded or on its way, 'whole' when it must be decoded (or assembled) whole
   * now; undefined as for payload(). Throws SnapshotFormatError as payload() does.
   */
  framesOf(chunk: number, first: number, end: number): number | 'ready' | 'whole' | undefined
  /** Whether `unit` can be installed without waiting: nothing to decode, decoded, or failed (installing it reports the error). */
  isReady(unit: number): boolean
  /**
   * Whether payload(unit) can be had without waiting on the network: always for a local file;
   * for object storage, once its stored bytes are on this host (or decoded, or failed). A hint
   * that costs no request: bytes evicted since they landed are found out by payload().
   */
  isLocal(unit: number): boolean
  /**
   * Asks for these units' stored bytes at demand priority, and for `around` (a fault's
   * neighbours) at prefetch priority in the same ask, without waiting; landedFd becomes
   * readable when they arrive.
   */
  fetchNow(units: readonly number[], around?: readonly number[]): void
  /** Readable when fetched bytes land (-1: a local file, never readable). */
  readonly landedFd: number
  /** Whether a decode of `unit` was asked for and is not yet released. */
  isRequested(unit: number): boolean
  /** Whether `owner` has asked for `unit` and not released it. */
  isClaimedBy(owner: number, unit: number): boolean
  /** Whether prefetch() would have anything to make ready for `unit` (false: ready already, or nothing to decode). */
  needsRequest(unit: number): boolean
  /**
   * Asks for `unit` ahead of need for `owner`: 'asked' (being made ready), 'unneeded' (ready
   * already, or nothing to decode), 'full' (no room now: ask again after releases).
   */
  prefetch(owner: number, unit: number): 'asked' | 'unneeded' | 'full'
  /** `owner` no longer wants `unit`; the last owner out frees it. */
  release(owner: number, unit: number): void
  /** Releases every unit `owner` asked for (a client that ended). */
  releaseOwner(owner: number): void
  /** Frees units whose decode finished after every owner lost interest; call when eventFd is readable. */
  reap(): void
  /**
   * The address of `unit`'s decoded bytes if it is ready now (0 when it has none: all zeros),
   * else undefined. For a helper thread, which must never wait.
   */
  readyAddress(unit: number): number | undefined
  /**
   * A client connected: the units staged before it (see DecodedUnits.stage) that it will
   * install are its own now; `units` is its working set.
   */
  adoptStaged(owner: number, units: readonly number[]): void
  /** Readable when decodes finish (-1: no decoders, never readable). */
  readonly eventFd: number
  /** Keep released payloads in the decoded-chunk cache (someone will want them again). */
  retainReleased: boolean
}

/** How often a fault waiting for a decoder looks whether that decoder is waiting for the network. */
const DECODER_LOOK_MS = 1

/** The owner of units decoded before any client connected (client ids count up from 1). */
export const STAGED = -1

/**
 * A snapshot's units, decoded: the decoded-chunk cache (shared by every client) in front of the
 * decode pool's slots (decodes ahead of need on other cores, for prefetch, population and the
 * staged working set), in front of decoding in this thread. Each pool slot is held while some
 * owner wants its unit, and freed (its payload kept in the cache when retainReleased) when the
 * last one releases it.
 */
export class DecodedUnits implements PayloadSource {
  private readonly cache: ChunkCache
  /** Decodes in flight or done, and the owners that still want each. */
  private readonly wanted = new Map<number, Set<number>>()
  /** Units decoded before any client connected (stage()), in order, and whether they stay. */
  private staged: number[] = []
  private keepStaged = false
  /** Where framesOf decodes: a chunk's frames are at most the chunk. */
  private readonly frameScratch: Buffer
  retainReleased = false

  constructor(
    private readonly reader: ImageReader,
    private readonly pool: DecodePool | undefined,
    private readonly stats: RunStats,
    cacheBytes: number,
    /** The remote source's landing eventfd (-1 for a local file). */
    private readonly landedEventFd = -1,
    /** Which of the pool's snapshots this one is (a handler serving several shares one pool). */
    private readonly image = 0,
  ) {
    this.cache = new ChunkCache(reader, cacheBytes, stats)
    this.frameScratch = Buffer.alloc(reader.framePages > 0 ? reader.geometry.chunkSize : 0)
  }

  get eventFd(): number {
    return this.pool?.eventFd ?? -1
  }

  get landedFd(): number {
    return this.landedEventFd
  }

  isLocal(unit: number): boolean {
    if (!this.reader.remote || this.cache.has(unit)) return true
    const slot = this.pool?.slotOf(unit, this.image)
    if (slot !== undefined && this.pool!.state(slot) !== SLOT_PENDING) return true
    return this.reader.isLocal(unit)
  }

  fetchNow(units: readonly number[], around: readonly number[] = []): void {
    this.reader.fetchAhead(units, PRIORITY_DEMAND, around)
  }

  framesOf(chunk: number, first: number, end: number): number | 'ready' | 'whole' | undefined {
    if (this.cache.has(chunk) || this.isRequested(chunk)) return 'ready'
    const got = this.reader.readFramesIfLocal(chunk, first, end, this.frameScratch)
    if (got === undefined || got === 'whole') return got
    this.stats.add('framesDecoded', got.frames)
    this.stats.add('bytesDecompressed', got.payload.length)
    return addressOf(got.payload) - got.payloadPage * this.reader.geometry.pageSize
  }

  payload(unit: number): Buffer | undefined {
    if (!this.cache.has(unit)) {
      const pooled = this.fromPool(unit)
      if (pooled !== 'none') return pooled
    }
    return this.cache.payload(unit)
  }

  isReady(unit: number): boolean {
    if (this.needsNoDecode(unit) || !this.pool || this.cache.has(unit)) return true
    const slot = this.pool.slotOf(unit, this.image)
    if (slot === undefined) return false
    const state = this.pool.state(slot)
    return state === SLOT_READY || state === SLOT_ERROR
  }

  isRequested(unit: number): boolean {
    return this.pool?.slotOf(unit, this.image) !== undefined
  }

  isClaimedBy(owner: number, unit: number): boolean {
    return this.wanted.get(unit)?.has(owner) ?? false
  }

  needsRequest(unit: number): boolean {
    return this.pool !== undefined && !this.needsNoDecode(unit) && !this.cache.has(unit)
  }

  prefetch(owner: number, unit: number): 'asked' | 'unneeded' | 'full' {
    if (!this.needsRequest(unit)) return 'unneeded'
    let owners = this.wanted.get(unit)
    if (!owners) {
      if (!this.pool!.request(unit, this.image)) return 'full'
      // The decoder that takes it would wait for the network: fetching starts now, beside the
      // other units asked ahead, not one at a time as decoders reach them.
      this.reader.fetchAhead([unit])
      this.wanted.set(unit, (owners = new Set()))
    }
    owners.add(owner)
    return 'asked'
  }

  release(owner: number, unit: number): void {
    const owners = this.wanted.get(unit)
    if (!owners) return
    owners.delete(owner)
    if (owners.size === 0) this.forget(unit)
  }

  releaseOwner(owner: number): void {
    for (const [unit, owners] of this.wanted) {
      owners.delete(owner)
      if (owners.size === 0) this.forget(unit)
    }
  }

  reap(): void {
    if (!this.pool) return
    for (const slot of this.pool.finished()) {
      if (this.pool.imageIn(slot) === this.image && !this.wanted.has(this.pool.chunkIn(slot))) this.freeSlot(slot)
    }
  }

  readyAddress(unit: number): number | undefined {
    if (this.needsNoDecode(unit)) return 0
    const slot = this.pool?.slotOf(unit, this.image)
    if (slot === undefined || this.pool!.state(slot) !== SLOT_READY) return undefined
    return addressOf(this.pool!.payload(slot))
  }

  /**
   * Decodes `units` (the working set) into the decode pool's slots before any client connects, so
   * that after a handshake installing them costs only the copies. They stay until every client
   * that wants them has them (see adoptStaged), or for good with `keep` (every later client
   * wants them too). Returns how many were queued (the pool's slots bound them).
   */
  stage(units: readonly number[], maxUnits: number, keep: boolean): number {
    if (!this.pool) return 0
    // From object storage, the whole working set is fetched at once, with the fetcher's full
    // concurrency, before or while the client connects (beyond the staged slots too: decoders
    // then find those bytes on disk).
    this.reader.fetchAhead(units)
    for (const unit of units.slice(0, maxUnits)) {
      if (this.wanted.has(unit) || this.needsNoDecode(unit) || !this.pool.request(unit, this.image)) continue
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
      const slot = this.pool!.slotOf(unit, this.image)
      if (slot === undefined || this.pool!.waitFor(slot, deadline - performance.now()) !== SLOT_READY) continue
      units++
      bytes += this.pool!.payload(slot).length
      this.countDecode(slot)
    }
    return {units, bytes}
  }

  /** Unless staged units are kept for later clients, each is freed once the clients that want it have it. */
  adoptStaged(owner: number, units: readonly number[]): void {
    for (const unit of units) this.wanted.get(unit)?.add(owner)
    if (!this.keepStaged) {
      for (const unit of this.staged.splice(0)) this.release(STAGED, unit)
    }
  }

  /** Stored raw zeros or data that needs no decoding (Codec.None: all zeros, nothing stored). */
  private needsNoDecode(unit: number): boolean {
    return this.reader.entry(unit).codec === Codec.None
  }

  /**
   * The decode pool's payload for `unit` (a demand fault needs it now): decoded here if no
   * decoder has started on it yet, else waited for (at most one decode). Undefined when its
   * bytes are not on this host: the fault loop does not wait for the network, a decoder may.
   * 'none' when the pool does not have it, or its decode failed (decoded again by the caller,
   * which then raises the real error with its context).
   */
  private fromPool(unit: number): Buffer | undefined | 'none' {
    const pool = this.pool
    const slot = pool?.slotOf(unit, this.image)
    if (slot === undefined || !pool) return 'none'
    if (pool.takeBack(slot)) {
      let length = -1
      const before = this.reader.unitsDecoded
      const sharedBefore = this.reader.unitsShared
      try {
        const payload = this.reader.readPayloadIfLocal(unit, pool.slotBuffer(slot))
        if (!payload) {
          pool.giveBack(slot)
          return undefined
        }
        length = payload.length
      } catch {
        // Reported with its context when the cache decodes it again.
      }
      pool.finish(slot, length, this.reader.unitsDecoded - before, this.reader.unitsShared - sharedBefore)
    }
    const state = pool.state(slot) === SLOT_PENDING ? this.waitForDecoder(slot, unit) : pool.state(slot)
    if (state === SLOT_PENDING) return undefined
    if (state === SLOT_READY) return pool.payload(slot)
    this.forget(unit)
    return 'none'
  }

  /**
   * Waits for the decoder on `unit`'s slot while its bytes are on this host: a decoder that found
   * them evicted waits for the network, and the fault loop must not wait with it. Returns the
   * slot's state (still PENDING: the bytes are on their way, asked for at demand priority).
   */
  private waitForDecoder(slot: number, unit: number): number {
    const pool = this.pool!
    for (;;) {
      const state = pool.waitFor(slot, DECODER_LOOK_MS)
      if (state !== SLOT_PENDING) return state
      if (!this.reader.isLocal(unit)) {
        this.reader.fetchAhead([unit], PRIORITY_DEMAND)
        return state
      }
    }
  }

  private forget(unit: number): void {
    this.wanted.delete(unit)
    const slot = this.pool?.slotOf(unit, this.image)
    if (slot !== undefined && this.pool!.state(slot) !== SLOT_PENDING) this.freeSlot(slot)
  }

  private freeSlot(slot: number): void {
    const pool = this.pool!
    if (pool.state(slot) === SLOT_READY) {
      this.countDecode(slot)
      if (this.retainReleased) this.cache.adopt(pool.chunkIn(slot), pool.payload(slot))
    }
    pool.release(slot)
  }

  private countDecode(slot: number): void {
    const length = this.pool!.countOnce(slot)
    if (length < 0) return
    this.stats.add('chunksDecoded')
    this.stats.add('unitsDecoded', this.pool!.unitsDecodedIn(slot))
    this.stats.add('unitsShared', this.pool!.unitsSharedIn(slot))
    this.stats.add('bytesDecompressed', length)
  }
}
