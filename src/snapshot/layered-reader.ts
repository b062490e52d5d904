import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {Codec, SOURCE_ZERO} from '../format/constants.js'
import {SnapshotFormatError} from '../format/errors.js'
import {type Geometry} from '../format/geometry.js'
import {type SnapshotHeader} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {baseRuns, findRun, indexOfPage, type LayerParent, type LayerRun} from '../format/layer.js'
import {payloadPageIndex, type ZeroMap} from '../format/zero-map.js'
import {type ByteSource} from './byte-source.js'
import {SnapshotReader} from './reader.js'

/**
 * Bytes of decoded layer blocks a reader keeps. A block of scattered pages serves many chunks, in
 * whatever order they fault: decoded again for each, a random-order resume of a chain of
 * scattered layers decoded several times the image. A layer's blocks hold its changed pages
 * only, so this keeps every block of a chain of a few small layers.
 */
export const LAYER_BLOCK_CACHE_BYTES = 64 * 1024 * 1024

/**
 * A chain of snapshots (a base, the layers on it, docs/FORMAT.md) read as the one image it
 * resolves to, through the reader's seam: its units are the image's chunks, each assembled from
 * the files that hold its pages (the top layer's flattened run table names them: one binary search
 * per chunk, whatever the depth), so the fault loop, the decoders, stats and verify handle a chain
 * as they handle one file. Every file's bytes are verified as SnapshotReader verifies them.
 */
export class LayeredReader {
  readonly geometry: Geometry
  readonly header: SnapshotHeader
  readonly zeroMap: ZeroMap
  /** One entry per resolved chunk: its payload length (codec none: all zeros; else data to assemble). */
  readonly index: ChunkEntry[]
  readonly packed = undefined
  readonly unitCount: number
  readonly remote = false
  readonly runs: readonly LayerRun[]
  private readonly basePayloadIndex: Int32Array
  /** Per layer file: the block holding each position of its page list. */
  private readonly blockOfListIndex: Int32Array[]
  /** Decoded layer blocks by "file:block", least recently used first, within LAYER_BLOCK_CACHE_BYTES. */
  private readonly blocks = new Map<string, Buffer>()
  private blockBytes = 0
  /** The base chunk of the chunk being assembled (chunk sizes agree through the chain: resolved chunk c takes base pages from base chunk c only). */
  private baseChunk = Buffer.alloc(0)
  private scratch = Buffer.alloc(0)

  private constructor(
    /** The chain, base first, the top layer last. */
    readonly files: readonly SnapshotReader[],
    /** Where each file was found. */
    readonly paths: readonly string[],
  ) {
    const top = files.at(-1)!
    this.geometry = top.geometry
    this.header = top.header
    this.zeroMap = top.zeroMap
    this.runs = top.layer!.runs
    const {pageSize} = this.geometry
    this.index = Array.from({length: this.geometry.chunkCount}, (_, c) => {
      const first = this.geometry.firstPageOfChunk(c)
      const pages = this.geometry.pagesInChunk(c)
      const payloadLength = (pages - this.zeroMap.countZero(first, pages)) * pageSize
      return {dataOffset: 0, storedLength: payloadLength, payloadLength, storedCrc: 0, codec: payloadLength === 0 ? Codec.None : Codec.Raw, flags: 0}
    })
    this.unitCount = this.index.length
    this.basePayloadIndex = payloadPageIndex(files[0].zeroMap, files[0].geometry.pagesPerChunk)
    this.blockOfListIndex = files.map((f) => {
      const blocks = f.layer?.set.blocks ?? []
      const of = new Int32Array(f.layer?.set.pages.length ?? 0)
      blocks.forEach((b, i) => of.fill(i, b.listStart, b.listStart + b.pageCount))
      return of
    })
  }

  /**
   * Opens the layer at `file` and its ancestors: each found by its recorded name in `layersDir`
   * (default: the layer's directory), its identity checked, and the chain cross-checked (see
   * docs/FORMAT.md) before anything is served.
   */
  static open(file: string, layersDir?: string): LayeredReader {
    return LayeredReader.fromTop(SnapshotReader.open(file), file, layersDir)
  }

  /** As open, with the top layer opened already (the reader is this one's from then on). */
  static fromTop(top: SnapshotReader, file: string, layersDir?: string): LayeredReader {
    const files: SnapshotReader[] = []
    const paths: string[] = []
    try {
      const {parents} = top.layer!
      const dir = layersDir ?? path.dirname(file)
      for (const [k, parent] of parents.entries()) {
        const at = path.join(dir, parent.name)
        files.push(openParent(at, parent, k, parents.length, file))
        paths.push(at)
      }
      files.push(top)
      paths.push(file)
      checkChain(files, paths)
      return new LayeredReader(files, paths)
    } catch (error) {
      for (const f of files) f.close()
      if (!files.includes(top)) top.close()
      throw error
    }
  }

  get source(): ByteSource {
    return this.files.at(-1)!.source
  }

  /** The top layer's size (what stats calls the file). */
  get fileSize(): number {
    return this.files.at(-1)!.fileSize
  }

  entry(unit: number): ChunkEntry {
    if (!Number.isInteger(unit) || unit < 0 || unit >= this.unitCount) throw new RangeError(`chunk ${unit} is outside 0..${this.unitCount - 1}`)
    return this.index[unit]
  }

  packedBlock(): undefined {
    return undefined
  }

  isLocal(): boolean {
    return true
  }

  fetchAhead(): void {}

  /**
   * Chunk `chunk`'s payload (its non-zero pages, in order), assembled from the files that hold
   * them, every stored unit verified on the way. A view of `dst`, or of scratch valid until the
   * next call.
   */
  readPayload(chunk: number, dst?: Buffer): Buffer {
    const {payloadLength} = this.entry(chunk)
    if (dst && dst.length < payloadLength) throw new RangeError(`buffer of ${dst.length} bytes is too small for chunk ${chunk} (${payloadLength})`)
    if (!dst && this.scratch.length < payloadLength) this.scratch = Buffer.alloc(this.geometry.chunkSize)
    const payload = (dst ?? this.scratch).subarray(0, payloadLength)
    const first = this.geometry.firstPageOfChunk(chunk)
    const end = first + this.geometry.pagesInChunk(chunk)
    const from = findRun(this.runs, first)
    let baseOnly = true
    for (let r = from; r < this.runs.length && this.runs[r].firstPage < end; r++) if (this.runs[r].source !== 0 && this.runs[r].source !== SOURCE_ZERO) baseOnly = false
    // No layer changed a page of it to data, and none to zero (the payloads are as long): the
    // chunk is the base's, decoded where it goes.
    if (baseOnly && this.files[0].entry(chunk).payloadLength === payloadLength) return payloadLength === 0 ? payload : this.files[0].readPayload(chunk, payload)
    let base: Buffer | undefined
    let at = 0
    for (let r = from, p = first; p < end; r++) {
      const run = this.runs[r]
      const stop = Math.min(end, run.firstPage + run.pageCount)
      if (run.source === 0) {
        base ??= this.readBaseChunk(chunk)
        // The run's pages are all data pages of the base, so consecutive ones are adjacent in its chunk's payload.
        const position = this.basePayloadIndex[p]
        at += base.copy(payload, at, position * this.geometry.pageSize, (position + stop - p) * this.geometry.pageSize)
      } else if (run.source !== SOURCE_ZERO) {
        at = this.copyLayerPages(run.source, p, stop, payload, at)
      }
      p = stop
    }
    return payload
  }

  /** Fills `dst` with the chunk's whole-page bytes (zero pages included), as SnapshotReader.readChunk. */
  readChunk(chunk: number, dst: Buffer): void {
    const payload = this.readPayload(chunk)
    const {pageSize} = this.geometry
    const first = this.geometry.firstPageOfChunk(chunk)
    let from = 0
    for (let i = 0, pages = this.geometry.pagesInChunk(chunk); i < pages; i++) {
      if (this.zeroMap.isZero(first + i)) {
        dst.fill(0, i * pageSize, (i + 1) * pageSize)
      } else {
        payload.copy(dst, i * pageSize, from, from + pageSize)
        from += pageSize
      }
    }
  }

  /** Loads every layer's decoders now (see SnapshotReader.prepareDecoding). */
  prepareDecoding(): void {
    for (const f of this.files) f.prepareDecoding()
  }

  close(): void {
    for (const f of this.files) f.close()
  }

  private readBaseChunk(chunk: number): Buffer {
    const base = this.files[0]
    if (this.baseChunk.length < base.geometry.chunkSize) this.baseChunk = Buffer.alloc(base.geometry.chunkSize)
    return base.readPayload(chunk, this.baseChunk)
  }

  /** Copies pages [from, to) of layer `source` (all its own pages: checked at open) to `dst` at `at`; returns the next offset. */
  private copyLayerPages(source: number, from: number, to: number, dst: Buffer, at: number): number {
    const list = this.files[source].layer!.set
    const {pageSize} = this.geometry
    for (let p = from; p < to; ) {
      // Its pages ascend through its list, so consecutive pages are adjacent there and in their block's payload.
      const i = indexOfPage(list.pages, p)
      const block = this.blockOfListIndex[source][i]
      const b = list.blocks[block]
      const position = i - b.listStart
      const count = Math.min(to - p, b.listStart + b.pageCount - i)
      at += this.block(source, block).copy(dst, at, position * pageSize, (position + count) * pageSize)
      p += count
    }
    return at
  }

  /** A layer's decoded block, from the cache (least recently used out beyond its budget). */
  private block(source: number, block: number): Buffer {
    const key = `${source}:${block}`
    const hit = this.blocks.get(key)
    if (hit) {
      this.blocks.delete(key)
      this.blocks.set(key, hit)
      return hit
    }
    // A layer has no chunks: its units are its blocks.
    const file = this.files[source]
    const payload = file.readPayload(block, Buffer.allocUnsafe(file.entry(block).payloadLength))
    this.blocks.set(key, payload)
    this.blockBytes += payload.length
    for (const [k, old] of this.blocks) {
      if (this.blockBytes <= LAYER_BLOCK_CACHE_BYTES || k === key) break
      this.blocks.delete(k)
      this.blockBytes -= old.length
    }
    return payload
  }
}

function openParent(at: string, parent: LayerParent, k: number, count: number, layer: string): SnapshotReader {
  const which = `${k === 0 ? 'its base' : `its ancestor ${k}`} ${parent.name} (${k + 1} of ${count})`
  if (!fs.existsSync(at)) throw new UffdError('PARENT_MISSING', `${layer}: ${which} is not at ${at} (copy it there, or give --layers DIR)`)
  const reader = SnapshotReader.open(at)
  if (reader.identity !== parent.id) {
    reader.close()
    throw new UffdError('PARENT_MISMATCH', `${layer}: ${at} is not ${which} it was made on (its content identity differs: another snapshot, or its chunks written again since)`)
  }
  return reader
}

/**
 * Checks what identities do not: each ancestor's own chain is the start of this one, the geometry
 * agrees, and every page the top's table takes from a file is one that file holds itself.
 */
function checkChain(files: readonly SnapshotReader[], paths: readonly string[]): void {
  const top = files.at(-1)!
  const {parents, runs} = top.layer!
  const fail = (file: number, detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', 'layer', detail, paths[file])
  }
  if (files[0].layer) fail(0, `is a layer, but ${paths.at(-1)} names it as its base`)
  for (const [k, f] of files.entries()) {
    if (f.geometry.pageSize !== top.geometry.pageSize || f.geometry.logicalSize !== top.geometry.logicalSize) {
      fail(k, `holds ${f.geometry.logicalSize} bytes of ${f.geometry.pageSize}-byte pages, the layer ${top.geometry.logicalSize} bytes of ${top.geometry.pageSize}-byte pages`)
    }
    if (k === 0 || k === files.length - 1) continue
    const own = f.layer?.parents
    if (!own || own.length !== k || own.some((p, i) => p.id !== parents[i].id)) fail(k, `is not a layer on the first ${k} file(s) of ${paths.at(-1)}'s chain`)
  }
  const self = files.length - 1
  const tables = files.map((f, k) => (k === 0 ? baseRuns(f.zeroMap) : f.layer!.runs))
  for (const run of runs) {
    if (run.source === SOURCE_ZERO || run.source === self) continue
    const table = tables[run.source]
    for (let p = run.firstPage, r = findRun(table, p); p < run.firstPage + run.pageCount; r++) {
      const theirs = table[r]
      if (theirs.source !== run.source) fail(self, `pages from ${p} are taken from ${paths[run.source]}, which does not hold them`)
      p = theirs.firstPage + theirs.pageCount
    }
  }
}

/** Whatever reads a snapshot for resume, stats and verify: one file, or a chain resolved to one image. */
export type ImageReader = SnapshotReader | LayeredReader

/** Opens a local snapshot: a layer with its chain, anything else as itself. */
export function openImage(file: string, layersDir?: string, openPath = file): ImageReader {
  const reader = SnapshotReader.open(file, openPath)
  return reader.layer ? LayeredReader.fromTop(reader, file, layersDir) : reader
}
