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
import {type ByteSource, PRIORITY_DEMAND, PRIORITY_PREFETCH, type Priority} from './byte-source.js'
import {SnapshotReader} from './reader.js'
import {threadUnitCache, type UnitCache} from './unit-cache.js'

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
  /** Whether any file of the chain is in object storage (isLocal and fetchAhead mean something). */
  readonly remote: boolean
  readonly runs: readonly LayerRun[]
  private readonly basePayloadIndex: Int32Array
  /** Per layer file: the block holding each position of its page list. */
  private readonly blockOfListIndex: Int32Array[]
  private scratch = Buffer.alloc(0)
  private closed = false

  private constructor(
    /** The chain, base first, the top layer last. */
    readonly files: readonly SnapshotReader[],
    /** Where each file was found (a path, or a URL as it prints). */
    readonly paths: readonly string[],
    /** Decoded units of the files, keyed by file identity: shared with other chains of this thread. */
    private readonly units: UnitCache,
  ) {
    units.attach()
    const top = files.at(-1)!
    this.remote = files.some((f) => f.remote)
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
   * The chain of `files` (base first, each ancestor's identity checked by whoever found it),
   * cross-checked (see docs/FORMAT.md) before anything is served. The readers are this one's
   * from then on; on a throw the caller still owns them.
   */
  static fromFiles(files: SnapshotReader[], paths: string[], units: UnitCache = threadUnitCache): LayeredReader {
    checkChain(files, paths)
    return new LayeredReader(files, paths, units)
  }

  get source(): ByteSource {
    return this.files.at(-1)!.source
  }

  /** Stored units of the chain's files decoded by this chain's readers (a unit another chain decoded first, through the shared unit cache, is not counted here). */
  get unitsDecoded(): number {
    return this.files.reduce((sum, f) => sum + f.unitsDecoded, 0)
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

  /** Whether every stored unit the chunk is assembled from can be read without waiting on the network. */
  isLocal(chunk: number): boolean {
    if (!this.remote) return true
    return this.unitsOf(chunk).every(({source, unit}) => this.files[source].isLocal(unit))
  }

  /**
   * Asks the chain's remote files for the stored units these chunks are assembled from, and for
   * those of the chunks `around` them at prefetch priority in the same ask (nothing for local files).
   */
  fetchAhead(chunks: Iterable<number>, priority: Priority = PRIORITY_PREFETCH, around: Iterable<number> = []): void {
    if (!this.remote) return
    const wanted = this.files.map(() => new Set<number>())
    const near = this.files.map(() => new Set<number>())
    for (const chunk of chunks) for (const {source, unit} of this.unitsOf(chunk)) wanted[source].add(unit)
    for (const chunk of around) for (const {source, unit} of this.unitsOf(chunk)) if (!wanted[source].has(unit)) near[source].add(unit)
    for (const [source, units] of wanted.entries()) if (units.size > 0 || near[source].size > 0) this.files[source].fetchAhead(units, priority, near[source])
  }

  /** The files' units chunk `chunk` is assembled from (its pages' runs, looked up as readPayload does). */
  unitsOf(chunk: number): {source: number; unit: number}[] {
    this.entry(chunk)
    const units: {source: number; unit: number}[] = []
    const first = this.geometry.firstPageOfChunk(chunk)
    const end = first + this.geometry.pagesInChunk(chunk)
    for (let r = findRun(this.runs, first), p = first; p < end; r++) {
      const run = this.runs[r]
      const stop = Math.min(end, run.firstPage + run.pageCount)
      if (run.source !== SOURCE_ZERO) for (const {unit} of this.pieces(run.source, p, stop)) units.push({source: run.source, unit})
      p = stop
    }
    return units
  }

  /**
   * Chunk `chunk`'s payload if every stored unit it is assembled from is on this host, else
   * undefined: each unit is read without waiting (a remote file asks for what it lacks at demand
   * priority, and the fault loop waits for it to land), so this never waits on the network.
   */
  readPayloadIfLocal(chunk: number, dst?: Buffer): Buffer | undefined {
    if (this.remote && !this.isLocal(chunk)) {
      this.fetchAhead([chunk], PRIORITY_DEMAND)
      return undefined
    }
    return this.assemble(chunk, dst, !this.remote)
  }

  /**
   * Chunk `chunk`'s payload (its non-zero pages, in order), assembled from the files that hold
   * them, every stored unit verified on the way. A view of `dst`, or of scratch valid until the
   * next call.
   */
  readPayload(chunk: number, dst?: Buffer): Buffer {
    return this.assemble(chunk, dst, true)!
  }

  /** readPayload; without `wait`, undefined as soon as a unit is not on this host. */
  private assemble(chunk: number, dst: Buffer | undefined, wait: boolean): Buffer | undefined {
    const {payloadLength} = this.entry(chunk)
    if (dst && dst.length < payloadLength) throw new RangeError(`buffer of ${dst.length} bytes is too small for chunk ${chunk} (${payloadLength})`)
    if (!dst && this.scratch.length < payloadLength) this.scratch = Buffer.alloc(this.geometry.chunkSize)
    const payload = (dst ?? this.scratch).subarray(0, payloadLength)
    const first = this.geometry.firstPageOfChunk(chunk)
    const end = first + this.geometry.pagesInChunk(chunk)
    let at = 0
    for (let r = findRun(this.runs, first), p = first; p < end; r++) {
      const run = this.runs[r]
      const stop = Math.min(end, run.firstPage + run.pageCount)
      if (run.source !== SOURCE_ZERO) {
        const next = this.copyPages(run.source, p, stop, payload, at, wait)
        if (next === undefined) return undefined
        at = next
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
    if (!this.closed) this.units.detach()
    this.closed = true
    for (const f of this.files) f.close()
  }

  /**
   * Copies pages [from, to) of file `source` (all data pages there: checked at open) to `dst` at
   * `at`; returns the next offset, or undefined (without `wait`) when a unit is not on this host.
   */
  private copyPages(source: number, from: number, to: number, dst: Buffer, at: number, wait: boolean): number | undefined {
    const {pageSize} = this.geometry
    for (const {unit, position, count} of this.pieces(source, from, to)) {
      const payload = this.units.payload(this.files[source], unit, wait)
      if (!payload) return undefined
      payload.copy(dst, at, position * pageSize, (position + count) * pageSize)
      at += count * pageSize
    }
    return at
  }

  /**
   * The units of file `source` holding pages [from, to) (all data pages there), in order: each
   * unit, the position of the first of those pages in its payload, and how many follow.
   */
  private pieces(source: number, from: number, to: number): {unit: number; position: number; count: number}[] {
    const file = this.files[source]
    const pieces: {unit: number; position: number; count: number}[] = []
    for (let p = from; p < to; ) {
      let unit: number
      let position: number
      let count: number
      if (source === 0) {
        // The base: the page's chunk, at its place among the chunk's data pages; the run's pages
        // are all data pages there, so consecutive ones in one chunk are adjacent in its payload.
        const ppc = file.geometry.pagesPerChunk
        unit = Math.floor(p / ppc)
        position = this.basePayloadIndex[p]
        count = Math.min(to, (unit + 1) * ppc) - p
      } else {
        // A layer: its pages ascend through its list, so consecutive pages are adjacent there and
        // in their block's payload.
        const list = file.layer!.set
        const i = indexOfPage(list.pages, p)
        const block = this.blockOfListIndex[source][i]
        const b = list.blocks[block]
        unit = block
        position = i - b.listStart
        count = Math.min(to - p, b.listStart + b.pageCount - i)
      }
      pieces.push({unit, position, count})
      p += count
    }
    return pieces
  }
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
