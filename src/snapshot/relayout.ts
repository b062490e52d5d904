import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {Codec, COMPAT_PACKED_WORKING_SET, COMPAT_WORKING_SET} from '../format/constants.js'
import {encodeHeader} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {encodePackedTable, type PackedBlock, type PackedSetLocation, planPackedBlocks} from '../format/packed-set.js'
import {AtomicFile, appendTail} from './atomic-file.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'
import {chunksInTouchOrder} from '../format/working-set.js'
import {packedPageSteps} from './packed-pages.js'
import {SnapshotReader} from './reader.js'

/** What an attached working set records in the snapshot's metadata (docs/FORMAT.md). */
export interface AttachedWorkingSet {
  /** Chunks in the order the working set first touches them; stored first in the file. */
  chunks: number[]
  pages: number
  runs: number
  /** Where the packed copy of the set's pages is described (compat feature bit 1). */
  packed?: Omit<PackedSetLocation, 'crc'> & {crc: string; codec: string}
}

export interface PackOptions {
  /** Codec of the packed blocks; 'none' stores no packed copy. */
  codec: CompressionCodec | 'none'
  level: number
}

export const PACK_CODECS = ['zstd', 'lz4', 'raw', 'none']

/** The packing options for a snapshot: `codec` if given, else the codec and level it was written with. */
export function packOptionsFor(metadata: Record<string, unknown>, codec: string | undefined): PackOptions {
  const level = typeof metadata.level === 'number' ? metadata.level : 1
  const chosen = codec ?? (typeof metadata.codec === 'string' && PACK_CODECS.includes(metadata.codec) ? metadata.codec : 'zstd')
  return {codec: chosen as PackOptions['codec'], level}
}

/** Longest stretch of attaching between two turns of the event loop, where SIGINT/SIGTERM are seen. */
const SLICE_MS = 20

/**
 * Lets the event loop run once a slice has passed since `since` (a performance.now() time) and
 * throws if `signal` was aborted meanwhile. Returns when the next slice starts.
 */
async function breathe(since: number, signal: AbortSignal | undefined): Promise<number> {
  if (performance.now() - since < SLICE_MS) return since
  await new Promise((resolve) => setImmediate(resolve))
  signal?.throwIfAborted()
  return performance.now()
}

async function packBlocks(
  reader: SnapshotReader,
  pagesInTouchOrder: readonly number[],
  options: PackOptions,
  signal: AbortSignal | undefined,
): Promise<{blocks: Omit<PackedBlock, 'dataOffset'>[]; stored: Buffer[]; list: Uint32Array}> {
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
  let since = performance.now()
  for (const step of steps) {
    since = await breathe(since, signal)
    if (step.kind !== 'pass') continue
    for (let b = step.from; b < step.to; b++) {
      const plan = plans[b]
      list.set(plan.pages, plan.listStart)
      const payload = step.payloads[b - step.from]!
      const c = payload.length === 0 ? {codec: Codec.None, stored: payload} : compressor.compress(payload)
      // The compressor reuses its output buffer: keep a copy.
      stored.push(Buffer.from(c.stored))
      blocks.push({storedLength: c.stored.length, payloadLength: payload.length, storedCrc: c.codec === Codec.None ? 0 : crc32(c.stored), codec: c.codec, flags: 0, listStart: plan.listStart, pageCount: plan.pageCount})
      since = await breathe(since, signal)
    }
  }
  return {blocks, stored, list}
}

/**
 * Rewrites a snapshot with a working set attached: the set's pages packed in blocks of their own
 * (unless options.codec is 'none'), then its chunks, are stored first, in first-touch order, so
 * prefetching the set is one sequential read that decodes only its pages; the set is recorded in
 * the metadata (compat feature bits). Chunks' stored bytes are copied, not recompressed; the
 * result is written atomically (to `outputPath`, which may be the input itself). It lets the
 * event loop run every few milliseconds: once `signal` is aborted it stops, removes its
 * temporary file and throws, and `outputPath` is as it was.
 */
export async function attachWorkingSet(
  inputPath: string,
  outputPath: string,
  set: {pages: readonly number[]; runs: number},
  options: PackOptions = {codec: 'zstd', level: 1},
  mode?: number,
  signal?: AbortSignal,
): Promise<{fileSize: number; chunksFirst: number; packedBlocks: number; packedBytes: number}> {
  const reader = SnapshotReader.open(inputPath)
  const out = new AtomicFile(outputPath, {mode})
  try {
    const {header, index, geometry} = reader
    for (const p of set.pages) if (!Number.isInteger(p) || p < 0 || p >= geometry.pageCount) throw new RangeError(`working-set page ${p} is outside the snapshot's ${geometry.pageCount} pages`)
    const pages = [...new Set(set.pages)]
    const chunks = chunksInTouchOrder(pages, geometry.pagesPerChunk).filter((c) => index[c].codec !== Codec.None)
    const first = new Set(chunks)
    const order = [...chunks, ...index.keys()].filter((c, i) => i < chunks.length || !first.has(c))
    const packed = options.codec === 'none' || pages.length === 0 ? undefined : await packBlocks(reader, pages, options, signal)
    // The header records where the packed table lies, which depends on the header's own size:
    // encode until the size is stable. The CRC is fixed-width hex and a larger header only adds
    // digits to the offset, so this settles in two or three rounds.
    let encoded: Buffer = Buffer.alloc(0)
    let table: Buffer = Buffer.alloc(0)
    let blocks: PackedBlock[] = []
    for (let headerSize = 0, round = 0; ; headerSize = encoded.length, round++) {
      if (round > 8) throw new UffdError('INTERNAL', 'the header size does not settle (a bug): giving up')
      let at = headerSize
      blocks = (packed?.blocks ?? []).map((b, i) => {
        const dataOffset = b.codec === Codec.None ? 0 : at
        at += packed!.stored[i].length
        return {...b, dataOffset}
      })
      table = packed ? encodePackedTable({blocks, pages: packed.list}) : Buffer.alloc(0)
      const workingSet: AttachedWorkingSet = {chunks, pages: pages.length, runs: set.runs}
      if (packed) workingSet.packed = {offset: at, length: table.length, crc: crc32(table).toString(16).padStart(8, '0'), blocks: blocks.length, pages: packed.list.length, codec: options.codec}
      encoded = encodeHeader({
        incompatFeatures: header.incompatFeatures,
        compatFeatures: (header.compatFeatures & ~COMPAT_PACKED_WORKING_SET) | COMPAT_WORKING_SET | (packed ? COMPAT_PACKED_WORKING_SET : 0n),
        pageSize: header.pageSize,
        chunkSize: header.chunkSize,
        logicalSize: header.logicalSize,
        regions: header.regions,
        metadata: {...header.metadata, workingSet},
      })
      if (encoded.length === headerSize) break
    }
    out.append(encoded)
    for (const bytes of packed?.stored ?? []) out.append(bytes)
    if (packed) out.append(table)
    const entries: ChunkEntry[] = [...index]
    // Deduplicated chunks share stored bytes: copy each stored range once.
    const moved = new Map<number, number>()
    let since = performance.now()
    for (const c of order) {
      const e = index[c]
      if (e.codec === Codec.None) continue
      let at = moved.get(e.dataOffset)
      if (at === undefined) {
        const stored = Buffer.alloc(e.storedLength)
        reader.source.readAt(stored, e.dataOffset)
        at = out.append(stored)
        moved.set(e.dataOffset, at)
      }
      entries[c] = {...e, dataOffset: at}
      since = await breathe(since, signal)
    }
    appendTail(out, entries, reader.zeroMap, encoded.readUInt32LE(encoded.length - 8))
    // The last look before the output is replaced in one go (a signal during that is too late).
    await new Promise((resolve) => setImmediate(resolve))
    signal?.throwIfAborted()
    out.commit()
    return {fileSize: out.size, chunksFirst: chunks.length, packedBlocks: blocks.length, packedBytes: (packed?.stored ?? []).reduce((n, b) => n + b.length, 0)}
  } finally {
    out.discard()
    reader.close()
  }
}

/** The working set a snapshot carries, if any. */
export function attachedWorkingSet(reader: SnapshotReader): AttachedWorkingSet | undefined {
  if ((reader.header.compatFeatures & COMPAT_WORKING_SET) === 0n) return undefined
  const ws = reader.header.metadata.workingSet as AttachedWorkingSet | undefined
  if (!ws || !Array.isArray(ws.chunks) || ws.chunks.some((c) => !Number.isInteger(c) || c < 0 || c >= reader.index.length)) return undefined
  return ws
}
