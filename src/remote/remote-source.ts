import {type MessagePort} from 'node:worker_threads'

import {isErrorCode, UffdError} from '../core/errors.js'
import {type ByteSource} from '../snapshot/byte-source.js'
import {extentAt, type ExtentTable} from './coalesce.js'
import {DiskCache} from './disk-cache.js'
import {type FetcherMessage} from './fetcher/worker.js'
import {EXTENT_ABSENT, EXTENT_ASKED, EXTENT_FAILED, EXTENT_IN_MEMORY, EXTENT_PRESENT, Handover, PRIORITY_DEMAND, PRIORITY_PREFETCH, type Priority, readFailure, readFromSegments, RemoteCounters, type RemoteShare} from './shared.js'

/** A waiting reader looks again this often even without a wake-up (a lost notify costs this much, never a hang). */
const WAIT_SLICE_MS = 1000

/**
 * A remote snapshot's bytes for one thread, synchronously: the byte ranges read at open come from
 * memory; an extent comes from the cache directory, or is asked of the fetcher thread and waited
 * for (Atomics.wait on its state). readAt blocks, which is what a reader of a snapshot does on a
 * local file too (decoders, commands); the fault loop reads with readIfLocal, which never waits.
 */
export class RemoteByteSource implements ByteSource {
  readonly name: string
  readonly size: number
  private readonly table: ExtentTable
  private readonly states: Int32Array
  private readonly counters: RemoteCounters
  private readonly cache: DiskCache
  private readonly handover: Handover
  /** The highest priority this thread has asked each extent at, so each ask is sent once. */
  private readonly asked: Uint8Array
  private open = true

  constructor(
    private readonly share: RemoteShare,
    private readonly port: MessagePort,
  ) {
    this.name = share.name
    this.size = share.identity.size
    this.table = {offsets: share.extentOffsets, lengths: share.extentLengths, crcs: share.extentCrcs, seeds: share.extentSeeds}
    this.states = new Int32Array(share.states)
    this.counters = new RemoteCounters(share.counters)
    this.cache = new DiskCache(share.cacheDir)
    this.handover = new Handover(share)
    this.asked = new Uint8Array(this.table.offsets.length)
    // A reader that never returns to its event loop must not keep its thread alive for the port.
    port.unref()
  }

  readAt(dst: Uint8Array, position: number): void {
    if (!this.open) throw new UffdError('INTERNAL', `${this.name} is closed`)
    if (readFromSegments(this.share.segments, dst, position)) return
    this.readExtent(this.extentOf(position, dst.length), dst)
  }

  readIfLocal(dst: Uint8Array, position: number): boolean {
    if (!this.open) throw new UffdError('INTERNAL', `${this.name} is closed`)
    if (readFromSegments(this.share.segments, dst, position)) return true
    const extent = this.extentOf(position, dst.length)
    if (this.readHere(extent, dst)) return true
    this.askOnce(extent)
    return false
  }

  /**
   * Whether the bytes at [position, +length) can be read now, without the network, as far as
   * the extent's state says: a hint (the file can be evicted right after), readIfLocal decides.
   */
  isLocal(position: number, length: number): boolean {
    const extent = extentAt(this.table, position, length)
    if (extent < 0) return true
    const state = Atomics.load(this.states, extent)
    if (state === EXTENT_PRESENT || state === EXTENT_FAILED || state === EXTENT_IN_MEMORY) return true
    if (!this.cache.has({offset: position, length})) return false
    // ASKED and on disk: it is landing (this handler's fetch, or another's that shares the cache).
    if (state === EXTENT_ABSENT) this.counters.add('diskHits')
    Atomics.compareExchange(this.states, extent, state, EXTENT_PRESENT)
    return true
  }

  /**
   * Asks the fetcher for these ranges without waiting (prefetch, or a fault that will be served
   * when they land), and for `around` at prefetch priority in the same message: the fetcher
   * holds its requests while it takes one message, so a fault's neighbours stored next to it
   * share its ranged request, and those that do not wait behind later faults.
   */
  fetchAhead(ranges: readonly {position: number; length: number}[], priority: Priority = PRIORITY_PREFETCH, around: readonly {position: number; length: number}[] = []): void {
    const extents = this.toAsk(ranges, priority)
    // (Units can share an extent: one asked for itself is not asked again as a neighbour.)
    const mine = new Set(extents)
    const near = this.toAsk(around, PRIORITY_PREFETCH, mine)
    if (extents.length > 0 || near.length > 0) this.ask(extents, priority, near)
  }

  /** The extents of `ranges` not here and not yet asked for at `priority` or above, marked asked. */
  private toAsk(ranges: readonly {position: number; length: number}[], priority: Priority, skip?: ReadonlySet<number>): number[] {
    const extents: number[] = []
    for (const {position, length} of ranges) {
      const extent = extentAt(this.table, position, length)
      if (extent < 0 || skip?.has(extent)) continue
      const state = Atomics.load(this.states, extent)
      // Here, or failing; or already on its way at this priority. (ABSENT is asked again: it
      // may have been evicted, or reset after a failure, since this thread last asked.)
      if (state === EXTENT_PRESENT || state === EXTENT_FAILED || state === EXTENT_IN_MEMORY || (state === EXTENT_ASKED && this.asked[extent] >= priority)) continue
      this.asked[extent] = priority
      extents.push(extent)
    }
    return extents
  }

  /** Drops a cached extent whose bytes failed the reader's check, so the next read fetches it again. */
  discard(position: number, length: number): boolean {
    const extent = extentAt(this.table, position, length)
    if (extent < 0) return false
    this.cache.discard({offset: position, length})
    Atomics.store(this.states, extent, EXTENT_ABSENT)
    this.asked[extent] = 0
    return true
  }

  close(): void {
    if (!this.open) return
    this.open = false
    this.port.close()
  }

  private extentOf(position: number, length: number): number {
    const extent = extentAt(this.table, position, length)
    if (extent < 0) {
      throw new UffdError('INTERNAL', `${this.name}: read of ${length} bytes at ${position} is neither a stored chunk nor a part read at open`)
    }
    return extent
  }

  private readExtent(extent: number, dst: Uint8Array): void {
    let waitedFrom: number | undefined
    for (;;) {
      const state = Atomics.load(this.states, extent)
      if (this.readHere(extent, dst)) {
        if (waitedFrom !== undefined) this.countWait(waitedFrom)
        return
      }
      this.askOnce(extent)
      waitedFrom ??= performance.now()
      // (A state changed since the read above returns at once, and the loop looks again.)
      Atomics.wait(this.states, extent, state === EXTENT_PRESENT ? EXTENT_ABSENT : state, WAIT_SLICE_MS)
    }
  }

  /**
   * Fills `dst` from the hand-over area or the cache directory when the extent is there; throws
   * the failure of an extent that could not be had. Never waits.
   */
  private readHere(extent: number, dst: Uint8Array): boolean {
    if (this.handover.read(extent, dst)) return true
    const range = {offset: this.table.offsets[extent], length: this.table.lengths[extent]}
    const state = Atomics.load(this.states, extent)
    if (this.cache.read(range, dst)) {
      if (state === EXTENT_ABSENT) {
        // Fetched by another handler sharing the cache, or by an earlier run.
        this.counters.add('diskHits')
        this.counters.add('diskBytes', range.length)
        Atomics.compareExchange(this.states, extent, EXTENT_ABSENT, EXTENT_PRESENT)
      }
      return true
    }
    if (state === EXTENT_FAILED) throw this.failure()
    if (state === EXTENT_PRESENT) {
      // Evicted since it landed (by this handler or another sharing the cache): fetch it again.
      Atomics.compareExchange(this.states, extent, EXTENT_PRESENT, EXTENT_ABSENT)
      this.asked[extent] = 0
    }
    return false
  }

  /** Asks for an extent that is not here at demand priority, unless this thread has already (and it is still on its way). */
  private askOnce(extent: number): void {
    if (this.asked[extent] < PRIORITY_DEMAND || Atomics.load(this.states, extent) === EXTENT_ABSENT) {
      this.asked[extent] = PRIORITY_DEMAND
      this.ask([extent], PRIORITY_DEMAND)
    }
  }

  private ask(extents: number[], priority: Priority, around: number[] = []): void {
    const message: FetcherMessage = {type: 'want', priority, extents, around}
    this.port.postMessage(message)
  }

  private countWait(from: number): void {
    const us = (performance.now() - from) * 1000
    this.counters.add('waits')
    this.counters.add('waitUs', us)
    this.counters.max('maxWaitUs', us)
  }

  private failure(): UffdError {
    const failure = readFailure(this.share.failure)
    if (!failure) return new UffdError('FETCH_DEADLINE', `${this.name}: a chunk could not be fetched`)
    return new UffdError(isErrorCode(failure.code) ? failure.code : 'FETCH_DEADLINE', failure.message)
  }
}
