import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {SOURCE_ZERO} from '../format/constants.js'
import {SnapshotFormatError} from '../format/errors.js'
import {type Geometry} from '../format/geometry.js'
import {type SnapshotHeader} from '../format/header.js'
import {type ChunkEntry, ChunkIndex} from '../format/index-table.js'
import {baseRuns, findRun, indexOfPage, type LayerParent, type LayerRun} from '../format/layer.js'
import {blockOfListIndex, type PackedSet} from '../format/packed-set.js'
import {payloadPosition, type ZeroMap} from '../format/zero-map.js'
import {type ByteSource, PRIORITY_DEMAND, PRIORITY_PREFETCH, type Priority} from './byte-source.js'
import {SnapshotReader} from './reader.js'
import {SharedLayerBlocks, type SharedBlocksShare} from './shared-blocks.js'
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
  readonly index: ChunkIndex
  /**
   * The top layer's packed working set, if it carries one: its blocks hold pages of the resolved
   * image, whichever file of the chain holds them, and are units chunkCount.. onwards here.
   */
  readonly packed: PackedSet | undefined
  /** The resolved chunks, then the packed working set's blocks. */
  readonly unitCount: number
  /** Whether any file of the chain is in object storage (isLocal and fetchAhead mean something). */
  readonly remote: boolean
  readonly runs: readonly LayerRun[]
  /** Per layer file: the block holding each position of its page list. */
  private readonly blockOfListIndex: Int32Array[]
  private scratch = Buffer.alloc(0)
  private closed = false
  /** This chain's number in the unit cache. */
  private readonly chain: number
  private shared = 0
  /** The layers' decoded blocks, in memory this process's threads share. */
  private readonly blocks: SharedLayerBlocks

  private constructor(
    /** The chain, base first, the top layer last. */
    readonly files: readonly SnapshotReader[],
    /** Where each file was found (a path, or a URL as it prints). */
    readonly paths: readonly string[],
    /** Decoded units of the files, keyed by file identity: shared with other chains of this thread. */
    private readonly units: UnitCache,
    blocks: SharedBlocksShare | undefined,
  ) {
    this.blocks = new SharedLayerBlocks(files, blocks)
    this.chain = units.attach()
    const top = files.at(-1)!
    this.remote = files.some((f) => f.remote)
    this.geometry = top.geometry
    this.header = top.header
    this.zeroMap = top.zeroMap
    this.runs = top.layer!.runs
    const {pageSize} = this.geometry
    const payloadLengths = new Uint32Array(this.geometry.chunkCount)
    for (let c = 0; c < payloadLengths.length; c++) {
      const first = this.geometry.firstPageOfChunk(c)
      const pages = this.geometry.pagesInChunk(c)
      payloadLengths[c] = (pages - this.zeroMap.countZero(first, pages)) * pageSize
    }
    this.index = ChunkIndex.ofRawChunks(payloadLengths)
    this.packed = top.packed
    this.unitCount = this.index.length + (this.packed?.blocks.length ?? 0)
    this.blockOfListIndex = files.map((f) => (f.layer ? blockOfListIndex(f.layer.set) : new Int32Array(0)))
    // The base's frames serve the chunks it holds unchanged, where its chunks are the chain's.
    this.framePages = files[0].geometry.chunkSize === this.geometry.chunkSize ? files[0].framePages : 0
  }

  /** The base's frame size in pages where its chunks are the chain's (readFramesIfLocal), else 0. */
  readonly framePages: number

  /**
   * The chain of `files` (base first, each ancestor's identity checked by whoever found it),
   * cross-checked (see docs/FORMAT.md) before anything is served. The readers are this one's
   * from then on; on a throw the caller still owns them. `blocks`: another thread's chain's
   * blockShare, to share its decoded layer blocks; `checkedBefore`: the opening whose tables the
   * files were opened with checked their chain (SnapshotSpec `checked`).
   */
  static fromFiles(files: SnapshotReader[], paths: string[], units: UnitCache = threadUnitCache, blocks?: SharedBlocksShare, checkedBefore = false): LayeredReader {
    // `checkedBefore`: the chain of these very files (each of the layout that opening checked) was checked there.
    if (!(checkedBefore && files.every((f) => f.checkedElsewhere))) checkChain(files, paths)
    return new LayeredReader(files, paths, units, blocks)
  }

  /** For the threads this one starts: their readers of this chain then share its decoded layer blocks. */
  get blockShare(): SharedBlocksShare {
    return this.blocks.share
  }

  get source(): ByteSource {
    return this.files.at(-1)!.source
  }

  /** Stored units of the chain's files decoded by this chain's readers (a unit another chain decoded first, through the shared unit cache, is not counted here). */
  get unitsDecoded(): number {
    return this.files.reduce((sum, f) => sum + f.unitsDecoded, 0)
  }

  /**
   * Stored units this chain's reads took decoded from the unit cache after another chain of this
   * thread decoded them (a sibling layer's read of their common base): decodes it was spared.
   */
  get unitsShared(): number {
    return this.shared
  }

  /** The top layer's size (what stats calls the file). */
  get fileSize(): number {
    return this.files.at(-1)!.fileSize
  }

  entry(unit: number): ChunkEntry {
    if (!Number.isInteger(unit) || unit < 0 || unit >= this.unitCount) throw new RangeError(`chunk ${unit} is outside 0..${this.unitCount - 1}`)
    return unit < this.index.length ? this.index.at(unit) : this.packed!.blocks[unit - this.index.length]
  }

  /** The packed working-set block a unit number names, or undefined for a chunk. */
  packedBlock(unit: number): number | undefined {
    return unit >= this.index.length && unit < this.unitCount ? unit - this.index.length : undefined
  }

  /** The top file's unit holding packed block `block`. */
  private topUnit(block: number): number {
    return this.files.at(-1)!.packedUnit(block)
  }

  /** Whether every stored unit the chunk (or the packed block) is made from can be read without waiting on the network. */
  isLocal(unit: number): boolean {
    if (!this.remote) return true
    const block = this.packedBlock(unit)
    if (block !== undefined) return this.files.at(-1)!.isLocal(this.topUnit(block))
    return this.unitsOf(unit).every(({source, unit}) => this.files[source].isLocal(unit))
  }

  /**
   * Asks the chain's remote files for the stored units these chunks are assembled from, and for
   * those of the chunks `around` them at prefetch priority in the same ask (nothing for local files).
   */
  fetchAhead(chunks: Iterable<number>, priority: Priority = PRIORITY_PREFETCH, around: Iterable<number> = []): void {
    if (!this.remote) return
    const wanted = this.files.map(() => new Set<number>())
    const near = this.files.map(() => new Set<number>())
    for (const chunk of chunks) {
      const block = this.packedBlock(chunk)
      if (block !== undefined) wanted[this.files.length - 1].add(this.topUnit(block))
      else for (const {source, unit} of this.unitsOf(chunk)) wanted[source].add(unit)
    }
    for (const chunk of around) {
      if (this.packedBlock(chunk) !== undefined) continue
      for (const {source, unit} of this.unitsOf(chunk)) if (!wanted[source].has(unit)) near[source].add(unit)
    }
    for (const [source, units] of wanted.entries()) if (units.size > 0 || near[source].size > 0) this.files[source].fetchAhead(units, priority, near[source])
  }

  /** The files' units chunk `chunk` is assembled from (its pages' runs, looked up as readPayload does). */
  unitsOf(chunk: number): {source: number; unit: number}[] {
    if (!Number.isInteger(chunk) || chunk < 0 || chunk >= this.index.length) throw new RangeError(`chunk ${chunk} is outside 0..${this.index.length - 1}`)
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
    const block = this.packedBlock(chunk)
    // A packed block is one stored unit of the top file, read as that file reads it.
    if (block !== undefined) return this.files.at(-1)!.readPayloadIfLocal(this.topUnit(block), dst)
    if (this.remote && !this.isLocal(chunk)) {
      this.fetchAhead([chunk], PRIORITY_DEMAND)
      return undefined
    }
    return this.assemble(chunk, dst, !this.remote)
  }

  /**
   * As SnapshotReader.readFramesIfLocal, for a chunk that is its base's chunk unchanged (every
   * data page the base's, at the same place in the payload: the same pages zero), read from the
   * base's frames; any other chunk is assembled from its files, whole.
   */
  readFramesIfLocal(chunk: number, first: number, end: number, dst: Buffer): {payload: Buffer; payloadPage: number; frames: number} | 'whole' | undefined {
    if (this.framePages === 0 || chunk >= this.index.length) return 'whole'
    const base = this.files[0]
    const pieces = this.piecesOfChunk(chunk)
    const {pageSize} = this.geometry
    let bytes = 0
    for (const piece of pieces) {
      if (piece.source !== 0 || piece.unit !== chunk || piece.at !== piece.position * pageSize) return 'whole'
      bytes += piece.count * pageSize
    }
    if (bytes === 0 || bytes !== base.entry(chunk).payloadLength) return 'whole'
    return base.readFramesIfLocal(chunk, first, end, dst)
  }

  /**
   * Chunk `chunk`'s payload (its non-zero pages, in order), assembled from the files that hold
   * them, every stored unit verified on the way. A view of `dst`, or of scratch valid until the
   * next call.
   */
  readPayload(chunk: number, dst?: Buffer): Buffer {
    const block = this.packedBlock(chunk)
    if (block !== undefined) return this.files.at(-1)!.readPayload(this.topUnit(block), dst)
    return this.assemble(chunk, dst, true)!
  }

  /** readPayload; without `wait`, undefined as soon as a unit is not on this host. */
  private assemble(chunk: number, dst: Buffer | undefined, wait: boolean): Buffer | undefined {
    const {payloadLength} = this.entry(chunk)
    if (dst && dst.length < payloadLength) throw new RangeError(`buffer of ${dst.length} bytes is too small for chunk ${chunk} (${payloadLength})`)
    if (!dst && this.scratch.length < payloadLength) this.scratch = Buffer.alloc(this.geometry.chunkSize)
    const room = dst ?? this.scratch
    const payload = room.subarray(0, payloadLength)
    const pieces = this.piecesOfChunk(chunk)
    const baseDone = this.baseInPlace(chunk, pieces, room, wait)
    if (baseDone === undefined) return undefined
    const {pageSize} = this.geometry
    // The units another chain had decoded, once each however many runs of the chunk they hold.
    const spared = new Set<string>()
    for (const {source, unit, position, count, at} of pieces) {
      if (baseDone && source === 0) continue
      const taken = this.unitPayload(source, unit, wait)
      if (!taken) return undefined
      if (taken.shared) spared.add(`${source}:${unit}`)
      taken.payload.copy(payload, at, position * pageSize, (position + count) * pageSize)
    }
    this.shared += spared.size
    return payload
  }

  /**
   * Decodes the chunk's base chunk straight into `room` and moves its pages to their places in
   * the resolved payload, when no other chain of this thread could want it (then it goes through
   * the unit cache, for them): saves a chunk-sized copy per chunk. The base's pages keep their
   * order in the resolved payload (both offsets ascend), though a piece may move towards the start
   * and a later one towards the end (base pages became zero, zero pages gained data): those moving
   * towards the start are moved first, in ascending order, the others after, in descending order,
   * and no move overwrites a page still to be moved. Only where the chunk is one chunk of the base
   * (the base may be chunked otherwise: a chain agrees on pages, not chunks). True when done, false
   * when the caller must take the base's pieces from the unit cache, undefined when its stored
   * bytes are not on this host (without `wait`).
   */
  private baseInPlace(chunk: number, pieces: readonly ChunkPiece[], room: Buffer, wait: boolean): boolean | undefined {
    const base = this.files[0]
    const own = pieces.filter((piece) => piece.source === 0)
    if (own.length === 0 || own.some((piece) => piece.unit !== chunk) || this.units.sharedByChains) return false
    if (room.length < base.entry(chunk).payloadLength) return false
    const decoded = wait ? base.readPayload(chunk, room) : base.readPayloadIfLocal(chunk, room)
    if (!decoded) return undefined
    const {pageSize} = this.geometry
    const move = ({position, count, at}: ChunkPiece): void => {
      room.copy(room, at, position * pageSize, (position + count) * pageSize)
    }
    for (const piece of own) if (piece.at < piece.position * pageSize) move(piece)
    for (let i = own.length - 1; i >= 0; i--) if (own[i].at > own[i].position * pageSize) move(own[i])
    return true
  }

  /**
   * Unit `unit` of file `source`, decoded and verified, and whether another chain of this thread
   * had decoded it: a layer's block from the shared blocks when it has a place there and no other
   * thread is decoding it, unless other chains of this thread read through its unit cache (which
   * shares blocks between chains with a common layer). Undefined, without `wait`, when its stored
   * bytes are not on this host.
   */
  private unitPayload(source: number, unit: number, wait: boolean): {payload: Buffer; shared: boolean} | undefined {
    const file = this.files[source]
    if (source > 0 && !this.units.sharedByChains) {
      const block = this.blocks.take(file, source, unit, wait)
      if (block !== 'elsewhere') return block && {payload: block, shared: false}
    }
    return this.units.take(file, unit, wait, this.chain)
  }

  /** Where each of the chunk's data pages comes from: runs of them, in page order, each with its byte offset `at` in the resolved payload. */
  private piecesOfChunk(chunk: number): ChunkPiece[] {
    const {pageSize} = this.geometry
    const first = this.geometry.firstPageOfChunk(chunk)
    const end = first + this.geometry.pagesInChunk(chunk)
    const pieces: ChunkPiece[] = []
    let at = 0
    for (let r = findRun(this.runs, first), p = first; p < end; r++) {
      const run = this.runs[r]
      const stop = Math.min(end, run.firstPage + run.pageCount)
      if (run.source !== SOURCE_ZERO) {
        for (const piece of this.pieces(run.source, p, stop)) {
          pieces.push({source: run.source, ...piece, at})
          at += piece.count * pageSize
        }
      }
      p = stop
    }
    return pieces
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
        position = payloadPosition(file.zeroMap, p, ppc)
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

/** A run of a resolved chunk's data pages held by one unit of one file of the chain. */
interface ChunkPiece {
  source: number
  unit: number
  /** The first page's place among the unit's payload pages. */
  position: number
  count: number
  /** Its byte offset in the resolved chunk's payload. */
  at: number
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
  // The top's runs ascend: each file's table is walked once, a cursor per file (every thread
  // serving the chain checks it, on code not yet optimised).
  const cursors = new Array<number>(files.length).fill(0)
  for (let i = 0; i < runs.length; i++) {
    const run = runs[i]
    if (run.source === SOURCE_ZERO || run.source === self) continue
    const table = tables[run.source]
    let r = cursors[run.source]
    while (table[r].firstPage + table[r].pageCount <= run.firstPage) r++
    for (let p = run.firstPage; p < run.firstPage + run.pageCount; r++) {
      const theirs = table[r]
      if (theirs.source !== run.source) fail(self, `pages from ${p} are taken from ${paths[run.source]}, which does not hold them`)
      p = theirs.firstPage + theirs.pageCount
    }
    // Its last run may go on past this one.
    cursors[run.source] = r - 1
  }
}

/** Whatever reads a snapshot for resume, stats and verify: one file, or a chain resolved to one image. */
export type ImageReader = SnapshotReader | LayeredReader
