import {type SnapshotReader} from './reader.js'

/** Decoded base chunks kept per chain using a cache (each serves the one resolved chunk at its place, and a sibling layer's). */
export const UNIT_CACHE_ENTRIES_PER_CHAIN = 16
/**
 * Bytes of decoded layer blocks kept per chain. A block of scattered pages serves many resolved
 * chunks, in whatever order they fault: decoded again for each, a random-order resume of a chain
 * of scattered layers decoded several times the image. A layer's blocks hold its changed pages
 * only, so this keeps every block of a chain of a few small layers.
 */
export const LAYER_BLOCK_BYTES_PER_CHAIN = 64 * 1024 * 1024

/**
 * Decoded units of the files of layer chains, keyed by the file that holds them (its layout
 * digest, see SnapshotReader.layout) and the unit's number there, not by the chain or the top
 * layer: chains that share a file (two layers of one base) opened in one thread decode each of its
 * units once between them. Least recently used out: a base's chunks within
 * UNIT_CACHE_ENTRIES_PER_CHAIN per chain attached (their buffers reused), layer blocks within
 * LAYER_BLOCK_BYTES_PER_CHAIN per chain, apart, so that the stream of base chunks a resume reads
 * never pushes out the blocks that serve many chunks. Counts, per file layout, the units it
 * decoded and the reads it answered from memory.
 */
export class UnitCache {
  /** `by`: the chain whose read decoded the unit (see attach). */
  private readonly entries = new Map<string, {buffer: Buffer; payload: Buffer; by: number}>()
  private readonly blocks = new Map<string, {payload: Buffer; by: number}>()
  private blockBytes = 0
  private chains = 0
  private nextChain = 0
  /** Base chunks kept at least, whatever the chains attached (reserveBaseEntries). */
  private reserved = 0
  readonly decodes = new Map<string, number>()
  readonly hits = new Map<string, number>()

  /** A chain starts using the cache (its room grows). Returns its number, for take(). */
  attach(): number {
    this.chains++
    return this.nextChain++
  }

  /**
   * Keeps at least `entries` decoded base chunks from now on: a thread serving several layers of
   * one base (resume --also) reads each base chunk for every layer that faults on it, at whatever
   * time its VMM does, and the per-chain room would have dropped it by then.
   */
  reserveBaseEntries(entries: number): void {
    this.reserved = Math.max(0, Math.floor(entries))
  }

  /** Whether several chains read through it (or it was told to keep base chunks for them): a decoded base chunk may serve another. */
  get sharedByChains(): boolean {
    return this.chains > 1 || this.reserved > 0
  }

  /** A chain stops using it; with none left, its buffers are dropped. */
  detach(): void {
    this.chains = Math.max(0, this.chains - 1)
    if (this.chains === 0) {
      this.entries.clear()
      this.blocks.clear()
      this.blockBytes = 0
    } else {
      while (this.entries.size > this.capacity) this.entries.delete(this.entries.keys().next().value!)
      this.trimBlocks(undefined)
    }
  }

  /**
   * Unit `unit` of `file`, decoded and verified by its reader; valid until the next call. Without
   * `wait`, undefined when its stored bytes are not on this host (a remote file has been asked
   * for them: see SnapshotReader.readPayloadIfLocal).
   */
  payload(file: SnapshotReader, unit: number, wait = true): Buffer | undefined {
    return this.take(file, unit, wait, -1)?.payload
  }

  /**
   * payload() for chain `chain` (attach's number): also says whether the unit was decoded by
   * another chain's read, i.e. a decode this chain was spared (sibling layers over one base,
   * served by one handler, share the base's units this way).
   */
  take(file: SnapshotReader, unit: number, wait: boolean, chain: number): {payload: Buffer; shared: boolean} | undefined {
    const key = `${file.layout}:${unit}`
    if (file.layer) return this.block(file, unit, key, wait, chain)
    const hit = this.entries.get(key)
    if (hit) {
      this.entries.delete(key)
      this.entries.set(key, hit)
      this.hits.set(file.layout, (this.hits.get(file.layout) ?? 0) + 1)
      return {payload: hit.payload, shared: hit.by !== chain}
    }
    const size = Math.max(file.entry(unit).payloadLength, file.geometry.chunkSize)
    let buffer: Buffer | undefined
    if (this.entries.size >= this.capacity) {
      const [oldest, old] = this.entries.entries().next().value!
      this.entries.delete(oldest)
      if (old.buffer.length >= size) buffer = old.buffer
    }
    buffer ??= Buffer.alloc(size)
    const payload = wait ? file.readPayload(unit, buffer) : file.readPayloadIfLocal(unit, buffer)
    if (!payload) return undefined
    this.decodes.set(file.layout, (this.decodes.get(file.layout) ?? 0) + 1)
    this.entries.set(key, {buffer, payload, by: chain})
    return {payload, shared: false}
  }

  private block(file: SnapshotReader, unit: number, key: string, wait: boolean, chain: number): {payload: Buffer; shared: boolean} | undefined {
    const hit = this.blocks.get(key)
    if (hit) {
      this.blocks.delete(key)
      this.blocks.set(key, hit)
      this.hits.set(file.layout, (this.hits.get(file.layout) ?? 0) + 1)
      return {payload: hit.payload, shared: hit.by !== chain}
    }
    const buffer = Buffer.allocUnsafe(file.entry(unit).payloadLength)
    const payload = wait ? file.readPayload(unit, buffer) : file.readPayloadIfLocal(unit, buffer)
    if (!payload) return undefined
    this.decodes.set(file.layout, (this.decodes.get(file.layout) ?? 0) + 1)
    this.blocks.set(key, {payload, by: chain})
    this.blockBytes += payload.length
    this.trimBlocks(key)
    return {payload, shared: false}
  }

  /** Drops the least recently used blocks beyond the budget (never `keep`, the one just decoded). */
  private trimBlocks(keep: string | undefined): void {
    const budget = Math.max(1, this.chains) * LAYER_BLOCK_BYTES_PER_CHAIN
    for (const [key, old] of this.blocks) {
      if (this.blockBytes <= budget || key === keep) break
      this.blocks.delete(key)
      this.blockBytes -= old.payload.length
    }
  }

  private get capacity(): number {
    return Math.max(Math.max(1, this.chains) * UNIT_CACHE_ENTRIES_PER_CHAIN, this.reserved)
  }
}

/** This thread's cache: every chain a thread opens shares it unless given another. */
export const threadUnitCache = new UnitCache()
