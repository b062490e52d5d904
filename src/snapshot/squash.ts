import {setImmediate as yieldToEventLoop} from 'node:timers/promises'

import {BoundKind, placeSeed} from '../format/bind.js'
import {Codec, COMPAT_PAGE_DIGESTS, INCOMPAT_BOUND, INCOMPAT_FRAMED, SOURCE_ZERO} from '../format/constants.js'
import {encodeDigestTable, PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {findRun} from '../format/layer.js'
import {encodeHeader} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {UNIT_DIGEST_BYTES, unitDigest, UnitKind} from '../format/seal.js'
import {ZeroMap} from '../format/zero-map.js'
import {crc32} from '../sys/crc.js'
import {AtomicFile, appendTail} from './atomic-file.js'
import {encodeChunk} from './chunk-job.js'
import {ChunkCompressor, type CompressionCodec, DEFAULT_FRAME_SIZE, framePagesFor} from './codecs.js'
import {type LayeredReader} from './layered-reader.js'
import {resolvedDigests} from './page-digests.js'
import {FileSealer, type SealingOptions} from './sealing.js'

export interface SquashSummary {
  path: string
  logicalSize: number
  fileSize: number
  chunkCount: number
  /** Chunks whose stored bytes were copied from the base unchanged (every data page of theirs is the base's). */
  copiedChunks: number
  /** Chunks assembled from several files and compressed again. */
  encodedChunks: number
  /** The top layer's working set, attached to the squashed file (its pages); absent without one. */
  workingSetPages?: number
  seconds: number
}

/**
 * Writes the image a chain resolves to as one self-contained ordinary snapshot. A chunk whose
 * pages all come from the base (or are zero where the base's are zero) has the base's stored
 * bytes copied, verified, not recompressed; any other chunk is assembled from the chain and
 * compressed with `codec`. Atomic, like every snapshot written.
 */
export async function squashChain(reader: LayeredReader, output: string, options: {codec: CompressionCodec; level: number; mode?: number; name?: string; signal?: AbortSignal; onProgress?: (done: number, total: number) => void; seal?: SealingOptions}): Promise<SquashSummary> {
  const started = performance.now()
  const {geometry, runs} = reader
  const base = reader.files[0]
  const {pageSize} = geometry
  const sameChunks = base.geometry.chunkSize === geometry.chunkSize
  const {layer: _layer, seal: _seal, pageDigests: _digests, framePages: _framePages, ...metadata} = reader.header.metadata
  // The base's stored chunks are copied as they are, framed or not: the output frames as the base
  // does (docs/FORMAT.md, Framed chunks), and frames the chunks it compresses again the same way.
  const framePages = sameChunks ? base.framePages : framePagesFor(options.codec, DEFAULT_FRAME_SIZE, pageSize, geometry.chunkSize)
  // A new file: its units are sealed anew, under a salt of its own.
  const sealer = FileSealer.create(options.seal ?? {}, [UnitKind.Chunk])
  // The chain's digests, each from the file holding its page, are the squashed file's: nothing
  // to hash. A sealed output stores none (docs/FORMAT.md, Page digests).
  const digests = sealer ? undefined : resolvedDigests(reader)
  const header = encodeHeader({
    incompatFeatures: INCOMPAT_BOUND | (framePages > 0 ? INCOMPAT_FRAMED : 0n) | (sealer?.incompatFeatures ?? 0n),
    compatFeatures: (sealer?.compatFeatures ?? 0n) | (digests ? COMPAT_PAGE_DIGESTS : 0n),
    pageSize,
    chunkSize: geometry.chunkSize,
    logicalSize: geometry.logicalSize,
    regions: reader.header.regions,
    metadata: {...metadata, codec: options.codec, level: options.level, ...(framePages > 0 ? {framePages} : {}), squashedFrom: reader.paths.map((p, k) => ({name: p, id: reader.files[k].identity})), ...(digests ? {pageDigests: digests.info} : {}), ...(sealer ? {seal: sealer.metadata} : {})},
  })
  const unitDigests = sealer?.signed ? Buffer.alloc(geometry.chunkCount * UNIT_DIGEST_BYTES) : undefined
  const place = (c: number, codec: Codec, payloadLength: number, plain: Buffer): ChunkEntry => {
    const stored = sealer ? sealer.seal({kind: UnitKind.Chunk, number: c, codec, payloadLength, unit: c}, plain) : plain
    if (unitDigests) unitDigest(stored).copy(unitDigests, c * UNIT_DIGEST_BYTES)
    return {dataOffset: file.append(stored), storedLength: stored.length, payloadLength, storedCrc: crc32(stored, placeSeed({kind: BoundKind.Chunk, number: c, codec, payloadLength})), codec, flags: 0, ...(sealer?.encrypted ? {sealedAs: c} : {})}
  }
  const compressor = new ChunkCompressor(options.codec, options.level)
  const zeroPage = Buffer.alloc(pageSize)
  const bytes = Buffer.alloc(geometry.chunkSize)
  const scratch = Buffer.alloc(geometry.chunkSize)
  const zeroMap = new ZeroMap(geometry.pageCount)
  zeroMap.bytes.set(reader.zeroMap.bytes)
  const entries: ChunkEntry[] = []
  // A chain in object storage streams in with the fetchers' concurrency, not a round trip per chunk.
  if (reader.remote) reader.fetchAhead(Array.from({length: geometry.chunkCount}, (_, c) => c))
  let copied = 0
  let encoded = 0
  const file = new AtomicFile(output, {mode: options.mode, name: options.name})
  try {
    file.append(header)
    for (let c = 0; c < geometry.chunkCount; c++) {
      if (c % 16 === 0) {
        await yieldToEventLoop()
        options.signal?.throwIfAborted()
      }
      const entry = reader.entry(c)
      if (entry.codec === Codec.None) {
        entries.push({dataOffset: 0, storedLength: 0, payloadLength: 0, storedCrc: 0, codec: Codec.None, flags: 0})
        continue
      }
      if (sameChunks && fromBaseOnly(c)) {
        // The same pages, zero and data, as the base's chunk: its stored bytes are this chunk's.
        const e = base.entry(c)
        entries.push(place(c, e.codec, e.payloadLength, base.codecBytes(c)))
        copied++
      } else {
        const length = geometry.chunkPaddedLength(c)
        reader.readChunk(c, bytes)
        const {chunk, stored} = encodeChunk(bytes.subarray(0, length), pageSize, compressor, zeroPage, scratch, framePages)
        entries.push(place(c, chunk.codec, chunk.payloadLength, Buffer.from(stored)))
        encoded++
      }
      options.onProgress?.(geometry.chunkStart(c) + geometry.chunkLogicalLength(c), geometry.logicalSize)
    }
    if (digests) {
      // A base's rows: its non-zero pages', in page order, right before the index.
      const rows = Buffer.alloc((geometry.pageCount - zeroMap.countZero(0, geometry.pageCount)) * PAGE_DIGEST_BYTES)
      for (let p = 0, row = 0; p < geometry.pageCount; p++) if (!zeroMap.isZero(p)) digests.rows.copy(rows, row++ * PAGE_DIGEST_BYTES, p * PAGE_DIGEST_BYTES, (p + 1) * PAGE_DIGEST_BYTES)
      file.append(encodeDigestTable(rows, crc32))
    }
    appendTail(file, entries, zeroMap, header, sealer ? {sealer, parts: [], unitDigests, blocks: 0} : undefined)
    options.signal?.throwIfAborted()
    file.commit()
    return {path: output, logicalSize: geometry.logicalSize, fileSize: file.size, chunkCount: geometry.chunkCount, copiedChunks: copied, encodedChunks: encoded, seconds: (performance.now() - started) / 1000}
  } finally {
    file.discard()
  }

  /** Whether every page of chunk c is the base's: data from the base, zero where the base is zero. */
  function fromBaseOnly(c: number): boolean {
    const first = geometry.firstPageOfChunk(c)
    const end = first + geometry.pagesInChunk(c)
    for (let r = findRun(runs, first), p = first; p < end; r++) {
      const run = runs[r]
      if (run.source !== 0 && run.source !== SOURCE_ZERO) return false
      const stop = Math.min(end, run.firstPage + run.pageCount)
      if (run.source === SOURCE_ZERO) for (let q = p; q < stop; q++) if (!base.zeroMap.isZero(q)) return false
      p = stop
    }
    return true
  }
}

