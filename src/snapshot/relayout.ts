import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {formatBytes} from '../core/units.js'
import {BoundKind, learnedPlace, placeSeed} from '../format/bind.js'
import {Codec, COMPAT_PACKED_WORKING_SET, COMPAT_PAGE_DIGESTS, COMPAT_SIGNED, COMPAT_WORKING_SET, INCOMPAT_BOUND, INCOMPAT_ENCRYPTED} from '../format/constants.js'
import {encodeDigestTable} from '../format/page-digest.js'
import {encodeRunTable} from '../format/layer.js'
import {encodeHeader} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {encodePackedTable, type PackedBlock, type PackedSetLocation, planPackedBlocks} from '../format/packed-set.js'
import {ManifestPart, UNIT_DIGEST_BYTES, unitDigest, UnitKind} from '../format/seal.js'
import {AtomicFile, appendTail} from './atomic-file.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'
import {chunksInTouchOrder} from '../format/working-set.js'
import {encodeLearnedRuns, type LearnedRun, memoryDigest} from '../format/learned-runs.js'
import {type OutputSink} from './output-sink.js'
import {packedPageSteps} from './packed-pages.js'
import {ReadAhead} from './read-ahead.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {SnapshotReader} from './reader.js'
import {readFileDigests} from './page-digests.js'
import {FileSealer, type SealingOptions} from './sealing.js'
import {type AttachedWorkingSet, type LearnedRunsLocation} from './attached-set.js'

export {type AttachedWorkingSet, attachedWorkingSet, type LearnedRunsLocation} from './attached-set.js'

/** A working set to attach; `learned` also stores the runs it was learned from. */
export interface SetToAttach {
  pages: readonly number[]
  runs: number
  learned?: {runs: readonly LearnedRun[]; keep: number}
}

export interface PackOptions {
  /** Codec of the packed blocks; 'none' stores no packed copy. */
  codec: CompressionCodec | 'none'
  level: number
  /**
   * The keys of a sealed snapshot: an encrypted one's key (its chunks are copied as sealed, new
   * units sealed with it), and the signing key a signed one must be signed with again.
   */
  seal?: SealingOptions
}

export const PACK_CODECS = ['zstd', 'lz4', 'raw', 'none']

/** The packing options for a snapshot: `codec` if given, else the codec and level it was written with. */
export function packOptionsFor(metadata: Record<string, unknown>, codec: string | undefined): PackOptions {
  const level = typeof metadata.level === 'number' ? metadata.level : 1
  const chosen = codec ?? (typeof metadata.codec === 'string' && PACK_CODECS.includes(metadata.codec) ? metadata.codec : 'zstd')
  return {codec: chosen as PackOptions['codec'], level}
}

/**
 * `firstUnit`: the unit number of the first block (after the file's chunks, or a layer's own
 * blocks); `bound`: the file written binds its units' CRCs to their places.
 */
function* packBlocks(reader: ImageReader, pagesInTouchOrder: readonly number[], options: PackOptions, sealer: FileSealer | undefined, firstUnit: number, bound: boolean): Generator<Wait, {blocks: Omit<PackedBlock, 'dataOffset'>[]; stored: Buffer[]; list: Uint32Array}, void> {
  const {zeroMap, geometry} = reader
  const plans = planPackedBlocks(pagesInTouchOrder, geometry.pagesPerChunk)
  const compressor = new ChunkCompressor(options.codec === 'none' ? 'raw' : options.codec, options.level)
  const blocks: Omit<PackedBlock, 'dataOffset'>[] = []
  const stored: Buffer[] = []
  const list = new Uint32Array(pagesInTouchOrder.length)
  const steps = packedPageSteps(
    reader,
    plans.map((plan) => plan.pages),
    {
      start: (from, to) => plans.slice(from, to).map((plan) => Buffer.alloc(plan.pages.filter((p) => !zeroMap.isZero(p)).length * geometry.pageSize)),
      page: (_block, payload, at, _page, _chunk, chunkPage) => chunkPage.copy(payload, at),
    },
  )
  // Packing at a high zstd level takes seconds: each step is a point where the caller may let
  // the event loop run (and a signal stop it).
  for (const step of steps) {
    yield {kind: 'drain'}
    if (step.kind !== 'pass') continue
    for (let b = step.from; b < step.to; b++) {
      const plan = plans[b]
      list.set(plan.pages, plan.listStart)
      const payload = step.payloads[b - step.from]!
      const c = payload.length === 0 ? {codec: Codec.None, stored: payload} : compressor.compress(payload)
      // The compressor reuses its output buffer: keep a copy (sealing makes one).
      const bytes = sealer?.encrypted ? sealer.seal({kind: UnitKind.PackedBlock, number: b, codec: c.codec, payloadLength: payload.length, unit: firstUnit + b}, c.stored) : Buffer.from(c.stored)
      stored.push(bytes)
      blocks.push({storedLength: bytes.length, payloadLength: payload.length, storedCrc: c.codec === Codec.None ? 0 : crc32(bytes, bound ? placeSeed({kind: BoundKind.PackedBlock, number: b, pages: plan.pages, codec: c.codec, payloadLength: payload.length}) : 0), codec: c.codec, flags: 0, listStart: plan.listStart, pageCount: plan.pageCount})
      yield {kind: 'drain'}
    }
  }
  return {blocks, stored, list}
}

/** What attaching wrote. */
export interface AttachResult {
  fileSize: number
  chunksFirst: number
  packedBlocks: number
  packedBytes: number
}

/** What attaching did, in words. */
export function describeAttached(result: {chunksFirst: number; packedBlocks: number; packedBytes: number}, set: {pages: readonly number[]; runs: number}): string {
  const packed = result.packedBlocks > 0 ? `${set.pages.length} pages packed in ${result.packedBlocks} blocks (${formatBytes(result.packedBytes)}), then ` : ''
  return `${packed}${result.chunksFirst} working-set chunks stored first (a set of ${set.pages.length} pages from ${set.runs} run(s))`
}

/** About how large the result of attaching `set` to `reader`'s snapshot can be (the packed copy at most raw). */
export function attachedSizeHint(reader: ImageReader, set: {pages: readonly number[]}): number {
  return reader.fileSize + set.pages.length * reader.geometry.pageSize
}

/**
 * Where the relayout lets an asynchronous caller wait: for units to be fetched (of `of`, a chain's
 * top file, when not the reader's own), for the sink to drain.
 */
type Wait = {kind: 'all'; units: readonly number[]} | {kind: 'unit'; units: readonly number[]; index: number; of?: SnapshotReader} | {kind: 'drain'}

/**
 * Rewrites a snapshot with a working set attached: the set's pages packed in blocks of their own
 * (unless options.codec is 'none'), then its chunks, are stored first, in first-touch order, so
 * prefetching the set is one sequential read that decodes only its pages; the set is recorded in
 * the metadata (compat feature bits). Chunks' stored bytes are copied, not recompressed (each
 * checked against its checksum on the way). The result is written atomically (to `outputPath`,
 * which may be the input itself). Local files only, synchronously; writeAttached does the same
 * from any reader to any sink.
 */
export function attachWorkingSet(
  inputPath: string,
  outputPath: string,
  set: SetToAttach,
  options: PackOptions = {codec: 'zstd', level: 1},
  mode?: number,
): AttachResult {
  const reader = SnapshotReader.open(inputPath, inputPath, {keys: options.seal?.key ? [options.seal.key] : [], verifyKeys: []})
  try {
    const out = new AtomicFile(outputPath, {mode})
    try {
      // A local reader never waits for a unit, and an AtomicFile writes as it is called: every
      // wait is over as soon as it is asked.
      const steps = relayout(reader, out, set, options)
      for (let step = steps.next(); ; step = steps.next()) {
        if (step.done) {
          out.commit()
          return step.value
        }
      }
    } finally {
      out.discard()
    }
  } finally {
    reader.close()
  }
}

/**
 * attachWorkingSet from any reader (a remote one's chunks are fetched ahead: the set's before
 * packing, the rest in a window ahead of the copy, waiting without blocking the event loop) to
 * any sink (a local AtomicFile, an S3 upload), which is committed on success and discarded on any
 * failure or abort. The reader stays the caller's.
 */
export async function writeAttached(
  reader: ImageReader,
  out: OutputSink,
  set: SetToAttach,
  options: PackOptions = {codec: 'zstd', level: 1},
  signal?: AbortSignal,
): Promise<AttachResult> {
  try {
    const steps = reader instanceof LayeredReader ? relayoutLayer(reader, out, set, options) : relayout(reader, out, set, options)
    let ahead: ReadAhead | undefined
    let since = performance.now()
    for (let step = steps.next(); ; step = steps.next()) {
      // A local reader and file never make this wait: let the event loop run every few ms, or a
      // SIGINT would not be seen until the whole file is written.
      if (performance.now() - since > 5) {
        await new Promise((resolve) => setImmediate(resolve))
        since = performance.now()
      }
      signal?.throwIfAborted()
      if (step.done) {
        await out.commit()
        return step.value
      }
      const wait = step.value
      if (wait.kind === 'drain') await out.drain(signal)
      else if (wait.kind === 'all') await ReadAhead.all(reader, wait.units, signal)
      else await (ahead ??= new ReadAhead(wait.of ?? reader, wait.units)).ready(wait.index, signal)
    }
  } finally {
    await out.discard()
  }
}

/** The relayout itself, yielding where a caller may wait; returns what it wrote (not committed). */
function* relayout(reader: SnapshotReader, out: OutputSink, set: SetToAttach, options: PackOptions): Generator<Wait, AttachResult, void> {
  const {header, index, geometry} = reader
  for (const p of set.pages) if (!Number.isInteger(p) || p < 0 || p >= geometry.pageCount) throw new RangeError(`working-set page ${p} is outside the snapshot's ${geometry.pageCount} pages`)
  const pages = [...new Set(set.pages)]
  const chunks = chunksInTouchOrder(pages, geometry.pagesPerChunk).filter((c) => index.codec(c) !== Codec.None)
  const first = new Set(chunks)
  const order = [...chunks, ...index.keys()].filter((c, i) => i < chunks.length || !first.has(c))
  const packing = options.codec !== 'none' && pages.length > 0
  // Chunks are copied as they are stored (sealed for their places under the file's salt); the
  // packed blocks and learned runs are new, and sealed under new generations.
  const sealer = FileSealer.rewrite(reader.seal?.info, options.seal ?? {}, [UnitKind.Chunk], [...(packing ? [UnitKind.PackedBlock] : []), ...(set.learned ? [UnitKind.LearnedRuns] : [])], reader.source.name)
  // The chunks' CRCs are copied with their bytes, to the same places: a bound file stays bound,
  // an older one unbound (its chunks' CRCs are part of its identity, which layers on it record).
  const bound = (header.incompatFeatures & INCOMPAT_BOUND) !== 0n
  if (packing) yield {kind: 'all', units: chunks}
  const packed = packing ? yield* packBlocks(reader, pages, options, sealer, index.length, bound) : undefined
  const learned = set.learned ? storedLearnedRuns(reader, set.learned, sealer, bound) : undefined
  // The page digest table is carried, checked, unless the result is sealed (it would be in the clear).
  const digestTable = sealer ? undefined : carriedDigestTable(reader)
  // The header records where the packed table lies, which depends on the header's own size:
  // encode until the size is stable. The CRC is fixed-width hex and a larger header only adds
  // digits to the offset, so this settles in two or three rounds.
  let encoded: Buffer = Buffer.alloc(0)
  let table: Buffer = Buffer.alloc(0)
  let blocks: PackedBlock[] = []
  for (let headerSize = 0, round = 0; ; headerSize = encoded.length, round++) {
    if (round > 8) throw new UffdError('INTERNAL', 'the header size does not settle (a bug): giving up')
    const placed = placePacked(packed, headerSize)
    blocks = placed.blocks
    table = placed.table
    const at = placed.tableAt
    const workingSet: AttachedWorkingSet = {chunks, pages: pages.length, runs: set.runs}
    if (packed) workingSet.packed = {offset: at, length: table.length, crc: hex8(table), blocks: blocks.length, pages: packed.list.length, codec: options.codec}
    if (learned) workingSet.learned = {...learned.location, offset: at + table.length}
    const {seal: _oldSeal, pageDigests: _digests, ...metadata} = header.metadata
    encoded = encodeHeader({
      incompatFeatures: (header.incompatFeatures & ~INCOMPAT_ENCRYPTED) | (sealer?.incompatFeatures ?? 0n),
      compatFeatures: (header.compatFeatures & ~(COMPAT_PACKED_WORKING_SET | COMPAT_SIGNED | COMPAT_PAGE_DIGESTS)) | COMPAT_WORKING_SET | (packed ? COMPAT_PACKED_WORKING_SET : 0n) | (digestTable ? COMPAT_PAGE_DIGESTS : 0n) | (sealer?.compatFeatures ?? 0n),
      pageSize: header.pageSize,
      chunkSize: header.chunkSize,
      logicalSize: header.logicalSize,
      regions: header.regions,
      metadata: {...metadata, workingSet, ...(digestTable ? {pageDigests: header.metadata.pageDigests} : {}), ...(sealer ? {seal: sealer.metadata} : {})},
    })
    if (encoded.length === headerSize) break
  }
  out.append(encoded)
  for (const bytes of packed?.stored ?? []) {
    out.append(bytes)
    yield {kind: 'drain'}
  }
  if (packed) out.append(table)
  if (learned) out.append(learned.stored)
  const entries: ChunkEntry[] = [...index]
  // A signed result's unit digest table: chunks, then the packed blocks.
  const digests = sealer?.signed ? Buffer.alloc((index.length + blocks.length) * UNIT_DIGEST_BYTES) : undefined
  // Deduplicated chunks share stored bytes: copy each stored range once.
  const moved = new Map<number, {at: number; digest?: Buffer}>()
  for (let i = 0; i < order.length; i++) {
    const c = order[i]
    const e = entries[c]
    if (e.codec === Codec.None) continue
    let copied = moved.get(e.dataOffset)
    if (copied === undefined) {
      yield {kind: 'unit', units: order, index: i}
      const bytes = reader.storedBytes(c)
      copied = {at: out.append(bytes), ...(digests ? {digest: unitDigest(bytes)} : {})}
      moved.set(e.dataOffset, copied)
      yield {kind: 'drain'}
    }
    copied.digest?.copy(digests!, c * UNIT_DIGEST_BYTES)
    // Chunks are copied as sealed: a convergent file's key table keeps their content keys.
    if (sealer?.convergent) sealer.recordKey(c, reader.seal!.contentKeyOf(c))
    entries[c] = {...e, dataOffset: copied.at}
  }
  if (digests) for (const [b, bytes] of (packed?.stored ?? []).entries()) if (bytes.length > 0) unitDigest(bytes).copy(digests, (index.length + b) * UNIT_DIGEST_BYTES)
  const parts = [...(packed ? [{part: ManifestPart.PackedTable, bytes: table}] : []), ...(learned ? [{part: ManifestPart.LearnedRuns, bytes: learned.stored}] : [])]
  // Right before the index, where a reader looks for it.
  if (digestTable) out.append(digestTable)
  appendTail(out, entries, reader.zeroMap, encoded, sealer ? {sealer, parts, unitDigests: digests, blocks: blocks.length} : undefined)
  return {fileSize: out.size, chunksFirst: chunks.length, packedBlocks: blocks.length, packedBytes: (packed?.stored ?? []).reduce((n, b) => n + b.length, 0)}
}

/**
 * relayout for a chain's top layer (docs/FORMAT.md, Layers): the set's pages, read from the image
 * the chain resolves to (whichever file holds each), packed in blocks stored first; then the
 * layer's own blocks, their stored bytes copied (each checked) and their table written anew with
 * the new offsets; its run table as it was; its zero map. What the layer's identity covers (its
 * blocks but for their offsets, its pages, runs, parents and zero map) is unchanged, so layers
 * made on it still resolve. Only the top file is written; the chain's other files stay as they are.
 */
function* relayoutLayer(chain: LayeredReader, out: OutputSink, set: SetToAttach, options: PackOptions): Generator<Wait, AttachResult, void> {
  const top = chain.files.at(-1)!
  const {header, geometry} = top
  const layer = top.layer!
  for (const p of set.pages) if (!Number.isInteger(p) || p < 0 || p >= geometry.pageCount) throw new RangeError(`working-set page ${p} is outside the snapshot's ${geometry.pageCount} pages`)
  if (set.learned) throw new UffdError('USAGE', 'a layer cannot learn: learned runs are not attached to layers')
  // A layer has no chunks to put first: only the packed copy prefetches anything.
  if (options.codec === 'none') throw new UffdError('USAGE', `--pack none: a layer has no chunks to reorder, so its working set must be packed (zstd, lz4 or raw)`)
  const pages = [...new Set(set.pages)]
  const chunks = chunksInTouchOrder(pages, geometry.pagesPerChunk).filter((c) => chain.index.codec(c) !== Codec.None)
  // The layer's blocks are copied as sealed; the packed blocks are new (units after the layer's).
  const sealer = FileSealer.rewrite(top.seal?.info, options.seal ?? {}, [UnitKind.LayerBlock], pages.length > 0 ? [UnitKind.PackedBlock] : [], top.source.name)
  if (pages.length > 0) yield {kind: 'all', units: chunks}
  // The layer's blocks keep their numbers and first pages: their CRCs hold, bound or not.
  const packed = pages.length > 0 ? yield* packBlocks(chain, pages, options, sealer, layer.set.blocks.length, (header.incompatFeatures & INCOMPAT_BOUND) !== 0n) : undefined
  const runTable = encodeRunTable(layer.runs)
  const digestTable = sealer ? undefined : carriedDigestTable(top)
  const ownUnits = layer.set.blocks.map((_, b) => b)
  const ownStored = layer.set.blocks.reduce((n, b) => n + (b.codec === Codec.None ? 0 : b.storedLength), 0)
  let encoded: Buffer = Buffer.alloc(0)
  let packedTable: Buffer = Buffer.alloc(0)
  let blockTable: Buffer = Buffer.alloc(0)
  let packedBlocks: PackedBlock[] = []
  for (let headerSize = 0, round = 0; ; headerSize = encoded.length, round++) {
    if (round > 8) throw new UffdError('INTERNAL', 'the header size does not settle (a bug): giving up')
    const placed = placePacked(packed, headerSize)
    packedBlocks = placed.blocks
    packedTable = placed.table
    const packedAt = placed.tableAt
    let at = packedAt + packedTable.length
    const own = layer.set.blocks.map((b) => {
      const dataOffset = b.codec === Codec.None ? 0 : at
      if (b.codec !== Codec.None) at += b.storedLength
      return {...b, dataOffset}
    })
    blockTable = encodePackedTable({blocks: own, pages: layer.set.pages})
    const blocksAt = at
    const runsAt = blocksAt + blockTable.length
    const workingSet: AttachedWorkingSet = {chunks: [], pages: pages.length, runs: set.runs}
    if (packed) workingSet.packed = {offset: packedAt, length: packedTable.length, crc: hex8(packedTable), blocks: packedBlocks.length, pages: packed.list.length, codec: options.codec}
    const meta = header.metadata.layer as Record<string, unknown>
    encoded = encodeHeader({
      incompatFeatures: (header.incompatFeatures & ~INCOMPAT_ENCRYPTED) | (sealer?.incompatFeatures ?? 0n),
      compatFeatures: (header.compatFeatures & ~(COMPAT_PACKED_WORKING_SET | COMPAT_WORKING_SET | COMPAT_SIGNED | COMPAT_PAGE_DIGESTS)) | (packed ? COMPAT_WORKING_SET | COMPAT_PACKED_WORKING_SET : 0n) | (digestTable ? COMPAT_PAGE_DIGESTS : 0n) | (sealer?.compatFeatures ?? 0n),
      pageSize: header.pageSize,
      chunkSize: header.chunkSize,
      logicalSize: header.logicalSize,
      regions: header.regions,
      metadata: {
        ...header.metadata,
        ...(packed ? {workingSet} : {workingSet: undefined}),
        pageDigests: digestTable ? header.metadata.pageDigests : undefined,
        layer: {
          ...meta,
          runs: {offset: runsAt, length: runTable.length, crc: hex8(runTable), count: layer.runs.length},
          blocks: {offset: blocksAt, length: blockTable.length, crc: hex8(blockTable), blocks: own.length, pages: layer.set.pages.length},
        },
        seal: sealer?.metadata,
      },
    })
    if (encoded.length === headerSize) break
  }
  out.append(encoded)
  for (const bytes of packed?.stored ?? []) {
    out.append(bytes)
    yield {kind: 'drain'}
  }
  if (packed) out.append(packedTable)
  let copied = 0
  const ownCount = layer.set.blocks.length
  const digests = sealer?.signed ? Buffer.alloc((ownCount + packedBlocks.length) * UNIT_DIGEST_BYTES) : undefined
  for (const [i, b] of layer.set.blocks.entries()) {
    if (b.codec === Codec.None) continue
    yield {kind: 'unit', units: ownUnits, index: i, of: top}
    const bytes = top.storedBytes(i)
    out.append(bytes)
    if (digests) unitDigest(bytes).copy(digests, i * UNIT_DIGEST_BYTES)
    if (sealer?.convergent) sealer.recordKey(i, top.seal!.contentKeyOf(i))
    copied += b.storedLength
    yield {kind: 'drain'}
  }
  if (copied !== ownStored) throw new UffdError('INTERNAL', 'the layer blocks copied are not those laid out (a bug)')
  if (digests) for (const [b, bytes] of (packed?.stored ?? []).entries()) if (bytes.length > 0) unitDigest(bytes).copy(digests, (ownCount + b) * UNIT_DIGEST_BYTES)
  out.append(blockTable)
  out.append(runTable)
  if (digestTable) out.append(digestTable)
  const parts = [...(packed ? [{part: ManifestPart.PackedTable, bytes: packedTable}] : []), {part: ManifestPart.LayerBlockTable, bytes: blockTable}, {part: ManifestPart.LayerRunTable, bytes: runTable}]
  appendTail(out, [], top.zeroMap, encoded, sealer ? {sealer, parts, unitDigests: digests, blocks: ownCount + packedBlocks.length} : undefined)
  return {fileSize: out.size, chunksFirst: 0, packedBlocks: packedBlocks.length, packedBytes: (packed?.stored ?? []).reduce((n, b) => n + b.length, 0)}
}

/** The packed blocks placed from `at` on (their stored bytes in order), their table, and where it goes (right after them). */
function placePacked(packed: {blocks: Omit<PackedBlock, 'dataOffset'>[]; stored: Buffer[]; list: Uint32Array} | undefined, at: number): {blocks: PackedBlock[]; table: Buffer; tableAt: number} {
  if (!packed) return {blocks: [], table: Buffer.alloc(0), tableAt: at}
  const blocks = packed.blocks.map((b, i) => {
    const dataOffset = b.codec === Codec.None ? 0 : at
    at += packed.stored[i].length
    return {...b, dataOffset}
  })
  return {blocks, table: encodePackedTable({blocks, pages: packed.list}), tableAt: at}
}

/**
 * A file's page digest table to copy into its rewrite (its rows stay valid: they follow its pages,
 * not where they are stored), checked first; undefined when it has none.
 */
function carriedDigestTable(file: SnapshotReader): Buffer | undefined {
  const table = readFileDigests(file)
  return table && encodeDigestTable(table.rows, crc32)
}

function hex8(bytes: Buffer): string {
  return crc32(bytes).toString(16).padStart(8, '0')
}

/** The compressed form of learned runs and what the metadata says of it (but where: the caller places it). */
function storedLearnedRuns(reader: SnapshotReader, learned: NonNullable<SetToAttach['learned']>, sealer: FileSealer | undefined, bound: boolean): {stored: Buffer; location: Omit<LearnedRunsLocation, 'offset'>} {
  const raw = encodeLearnedRuns(learned.runs)
  const c = new ChunkCompressor('zstd', 3).compress(raw)
  const stored = sealer?.encrypted ? sealer.seal({kind: UnitKind.LearnedRuns, number: 0, codec: c.codec, payloadLength: raw.length}, c.stored) : Buffer.from(c.stored)
  return {
    stored,
    location: {
      length: stored.length,
      rawLength: raw.length,
      crc: crc32(stored, bound ? placeSeed(learnedPlace(c.codec, raw.length)) : 0).toString(16).padStart(8, '0'),
      codec: c.codec === Codec.Zstd ? 'zstd' : 'raw',
      runs: learned.runs.length,
      keep: learned.keep,
      memory: memoryDigest(reader.geometry, reader.index, reader.zeroMap.bytes),
    },
  }
}
