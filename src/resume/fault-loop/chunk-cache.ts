import {type ImageReader} from '../../snapshot/layered-reader.js'
import {type RunStats} from '../run-stats.js'

/**
 * Decoded chunk payloads (their non-zero pages, packed), least recently used first out, within a
 * byte budget. Every fault and prefetch of every client goes through one cache, so VMs resumed
 * from the same snapshot by one process decode each chunk once. Evicted buffers are reused:
 * allocating fresh 64 KiB-4 MiB buffers makes glibc return and re-fault memory on every chunk.
 */
export class ChunkCache {
  private readonly entries = new Map<number, Buffer>()
  private readonly spare: Buffer[] = []
  private bytes = 0

  constructor(
    private readonly reader: ImageReader,
    private readonly budgetBytes: number,
    private readonly stats: RunStats,
  ) {}

  /**
   * The verified payload of `chunk`, or undefined when its stored bytes are not on this host (a
   * remote snapshot's, asked for at demand priority: the fault loop never waits on the network).
   * Throws SnapshotFormatError if it cannot be verified.
   */
  payload(chunk: number): Buffer | undefined {
    const hit = this.entries.get(chunk)
    if (hit) {
      this.entries.delete(chunk)
      this.entries.set(chunk, hit)
      this.stats.add('cacheHits')
      return hit
    }
    const entry = this.reader.entry(chunk)
    const buffer = this.take(entry.payloadLength)
    const before = this.reader.unitsDecoded
    const sharedBefore = this.reader.unitsShared
    let payload: Buffer | undefined
    try {
      payload = this.reader.readPayloadIfLocal(chunk, buffer)
    } catch (error) {
      this.stats.add('cacheMisses')
      throw error
    } finally {
      this.stats.add('unitsDecoded', this.reader.unitsDecoded - before)
      this.stats.add('unitsShared', this.reader.unitsShared - sharedBefore)
    }
    if (!payload) {
      this.giveBack(buffer)
      return undefined
    }
    // (Counted once read or failed: a fault waiting for remote bytes asks again each time some land.)
    this.stats.add('cacheMisses')
    this.stats.add('chunksDecoded')
    this.stats.add('bytesDecompressed', payload.length)
    this.entries.set(chunk, payload)
    this.bytes += payload.length
    this.evict()
    return payload
  }

  has(chunk: number): boolean {
    return this.entries.has(chunk)
  }

  /**
   * Keeps a copy of a payload decoded elsewhere (by the decode pool, whose slots are reused), so
   * later faults and other clients of the same snapshot find it here instead of decoding again.
   */
  adopt(chunk: number, payload: Buffer): void {
    if (this.entries.has(chunk)) return
    const copy = this.take(payload.length)
    payload.copy(copy)
    this.entries.set(chunk, copy)
    this.bytes += copy.length
    this.evict()
  }

  private take(length: number): Buffer {
    const chunkSize = this.reader.geometry.chunkSize
    const reusable = this.spare.pop()
    // Buffers are allocated at full chunk size so any payload fits a reused one.
    return (reusable ?? Buffer.allocUnsafeSlow(chunkSize)).subarray(0, length)
  }

  /** Keeps a buffer take() handed out and nothing filled, for the next take(). */
  private giveBack(buffer: Buffer): void {
    if (this.spare.length < 4 && buffer.buffer.byteLength - buffer.byteOffset >= this.reader.geometry.chunkSize) {
      this.spare.push(Buffer.from(buffer.buffer, buffer.byteOffset, this.reader.geometry.chunkSize))
    }
  }

  private evict(): void {
    // Keep the newest entry even if it alone exceeds the budget: it is about to be copied from.
    while (this.bytes > this.budgetBytes && this.entries.size > 1) {
      const [oldest, buffer] = this.entries.entries().next().value as [number, Buffer]
      this.entries.delete(oldest)
      this.bytes -= buffer.length
      // Only buffers take() allocated: an all-zero unit's empty payload is the reader's own, with
      // no chunk-sized buffer behind it (widening it throws; giveBack checks). The fault path
      // asks for no such unit today; a cache must not depend on that.
      this.giveBack(buffer)
    }
  }
}
