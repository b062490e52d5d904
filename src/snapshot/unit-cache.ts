import {type SnapshotReader} from './reader.js'

/** Decoded units kept per chain using a cache (a scattered layer's block serves many resolved chunks). */
export const UNIT_CACHE_ENTRIES_PER_CHAIN = 16

/**
 * Decoded units of the files of layer chains, keyed by the file that holds them (its layout
 * digest, see SnapshotReader.layout) and the unit's number there, not by the chain or the top layer: chains that share a file (two
 * layers of one base) opened in one thread decode each of its units once between them. Least
 * recently used out, its buffer reused; room for UNIT_CACHE_ENTRIES_PER_CHAIN per chain attached.
 * Counts, per file layout, the units it decoded and the reads it answered from memory.
 */
export class UnitCache {
  private readonly entries = new Map<string, {buffer: Buffer; payload: Buffer}>()
  private chains = 0
  readonly decodes = new Map<string, number>()
  readonly hits = new Map<string, number>()

  /** A chain starts using the cache (its room grows). */
  attach(): void {
    this.chains++
  }

  /** A chain stops using it; with none left, its buffers are dropped. */
  detach(): void {
    this.chains = Math.max(0, this.chains - 1)
    if (this.chains === 0) this.entries.clear()
    else while (this.entries.size > this.capacity) this.entries.delete(this.entries.keys().next().value!)
  }

  /** Unit `unit` of `file`, decoded and verified by its reader; valid until the next call. */
  payload(file: SnapshotReader, unit: number): Buffer {
    const key = `${file.layout}:${unit}`
    const hit = this.entries.get(key)
    if (hit) {
      this.entries.delete(key)
      this.entries.set(key, hit)
      this.hits.set(file.layout, (this.hits.get(file.layout) ?? 0) + 1)
      return hit.payload
    }
    const size = Math.max(file.entry(unit).payloadLength, file.geometry.chunkSize)
    let buffer: Buffer | undefined
    if (this.entries.size >= this.capacity) {
      const [oldest, old] = this.entries.entries().next().value!
      this.entries.delete(oldest)
      if (old.buffer.length >= size) buffer = old.buffer
    }
    buffer ??= Buffer.alloc(size)
    const payload = file.readPayload(unit, buffer)
    this.decodes.set(file.layout, (this.decodes.get(file.layout) ?? 0) + 1)
    this.entries.set(key, {buffer, payload})
    return payload
  }

  private get capacity(): number {
    return Math.max(1, this.chains) * UNIT_CACHE_ENTRIES_PER_CHAIN
  }
}

/** This thread's cache: every chain a thread opens shares it unless given another. */
export const threadUnitCache = new UnitCache()
