import crypto from 'node:crypto'
import fs from 'node:fs'
import {parentPort, workerData} from 'node:worker_threads'
import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {WORKER_STOP} from '../core/workers.js'
import {pageDigests} from '../sys/digest.js'
import {onFile} from '../sys/errors.js'
import {Codec, maxStoredLength} from '../format/constants.js'
import {PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {contentKey, sealConvergent, sealUnit, TAG_BYTES, unitDigest, UnitKind} from '../format/seal.js'
import {type ChunkJob, type ChunkJobResult, type ChunkSealing, type EncodedChunk, encodeChunk} from './chunk-job.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'

/**
 * A compression worker: reads the segments of a job straight from their source files (so reading
 * is spread over the workers too), then encodes each chunk. Replies {ok, result} or {ok:false,
 * error} per job.
 */
const {codec, level, sealing} = workerData as {codec: CompressionCodec; level: number; sealing?: ChunkSealing}
const unitKey = sealing && 'unitKey' in sealing ? Buffer.from(sealing.unitKey) : undefined
const generation = sealing && 'generation' in sealing ? Buffer.from(sealing.generation) : undefined
const convergent = sealing && 'convergentKey' in sealing ? Buffer.from(sealing.convergentKey) : undefined

/** A chunk's bytes as the file stores them, and (convergent) the content key that sealed them. */
function sealed(chunk: number, codec: Codec, payloadLength: number, stored: Buffer): {kept: Buffer; key?: Buffer} {
  if (stored.length === 0) return {kept: stored}
  if (convergent) {
    const key = contentKey(convergent, codec, payloadLength, stored)
    return {kept: sealConvergent(key, codec, payloadLength, stored), key}
  }
  if (unitKey) return {kept: sealUnit(unitKey, generation!, {kind: UnitKind.Chunk, number: chunk, codec, payloadLength}, stored)}
  return {kept: stored}
}
const compressor = new ChunkCompressor(codec, level)
const fds = new Map<string, number>()
let input = Buffer.alloc(0)
let payloadScratch = Buffer.alloc(0)
let zeroPage = Buffer.alloc(0)
let storedScratch = Buffer.alloc(0)

function fdFor(path: string): number {
  let fd = fds.get(path)
  if (fd === undefined) {
    fd = onFile(path, 'opening', () => fs.openSync(path, 'r'))
    fds.set(path, fd)
  }
  return fd
}

/** The job's chunks as [start, end) offsets in `input`, and whether any segment touches each. */
function chunkSpans(job: ChunkJob): {start: number; end: number; covered: boolean}[] {
  let at = 0
  return job.chunkLengths.map((length) => {
    const start = at
    at += length
    const covered = job.segments.some((s) => s.imageOffset - job.start < at && s.imageOffset - job.start + s.length > start)
    return {start, end: at, covered}
  })
}

/**
 * Reads the job's segments into `input`, and zeroes the bytes no segment covers, but only in
 * chunks that have data: a chunk that is all hole is never read, zeroed or scanned.
 */
function readSegments(job: ChunkJob, spans: readonly {start: number; end: number; covered: boolean}[]): void {
  const zeroGap = (from: number, to: number): void => {
    for (const span of spans) {
      if (span.covered && span.start < to && span.end > from) input.fill(0, Math.max(from, span.start), Math.min(to, span.end))
    }
  }
  let cursor = 0
  for (const s of [...job.segments].sort((a, b) => a.imageOffset - b.imageOffset)) {
    const at = s.imageOffset - job.start
    if (at > cursor) zeroGap(cursor, at)
    cursor = Math.max(cursor, at + s.length)
  }
  zeroGap(cursor, spans.length ? spans[spans.length - 1].end : 0)
  for (const s of job.segments) {
    const fd = fdFor(s.path)
    let done = 0
    while (done < s.length) {
      const n = onFile(s.path, 'reading', () => fs.readSync(fd, input, s.imageOffset - job.start + done, s.length - done, s.position + done))
      if (n === 0) throw new UffdError('TRUNCATED', `${s.path}: ended at ${s.position + done}, expected ${s.length - done} more bytes`)
      done += n
    }
  }
}

function run(job: ChunkJob): ChunkJobResult {
  const length = job.chunkLengths.reduce((a, b) => a + b, 0)
  if (input.length < length) input = Buffer.alloc(length)
  if (zeroPage.length !== job.pageSize) zeroPage = Buffer.alloc(job.pageSize)
  const longest = Math.max(...job.chunkLengths)
  if (payloadScratch.length < longest) payloadScratch = Buffer.alloc(longest)
  const spans = chunkSpans(job)
  readSegments(job, spans)

  const bound = job.chunkLengths.reduce((a, n) => a + maxStoredLength(n) + TAG_BYTES, 0)
  if (storedScratch.length < bound) storedScratch = Buffer.allocUnsafeSlow(bound)
  const stored = storedScratch
  const chunks: EncodedChunk[] = []
  let storedAt = 0
  // Digested here, while the payload is in cache, and in parallel: a full snapshot pays one
  // pass of NH over its data pages (docs/FORMAT.md, Page digests).
  const digestKey = job.pageDigestKey
  const digestRows = digestKey ? Buffer.allocUnsafeSlow((length / job.pageSize) * PAGE_DIGEST_BYTES) : undefined
  let digestAt = 0
  for (const {start, end, covered} of spans) {
    const chunkLength = end - start
    const bytes = input.subarray(start, end)
    if (covered) {
      const encoded = encodeChunk(bytes, job.pageSize, compressor, zeroPage, payloadScratch, job.framePages)
      const empty = encoded.stored.length === 0
      if (digestRows && !empty) {
        const pages = encoded.payload.length / job.pageSize
        pageDigests(encoded.payload, pages, digestKey!, digestRows.subarray(digestAt))
        digestAt += pages * PAGE_DIGEST_BYTES
      }
      const digest = job.digests && !empty ? crypto.createHash('sha256').update(encoded.stored).digest() : undefined
      const chunk = job.firstChunk + chunks.length
      // Sealed for this chunk's place; the CRC is of the bytes as the file holds them.
      const {kept, key} = sealed(chunk, encoded.chunk.codec, encoded.chunk.payloadLength, encoded.stored)
      const storedCrc = kept === encoded.stored ? encoded.chunk.storedCrc : crc32(kept)
      const ownDigest = job.unitDigests && !empty ? unitDigest(kept) : undefined
      kept.copy(stored, storedAt)
      chunks.push({...encoded.chunk, storedCrc, storedOffset: storedAt, storedLength: kept.length, ...(digest === undefined ? {} : {digest}), ...(ownDigest === undefined ? {} : {unitDigest: ownDigest}), ...(kept === encoded.stored ? {} : {plainCrc: encoded.chunk.storedCrc}), ...(key ? {contentKey: key} : {})})
      storedAt += kept.length
    } else {
      // Nothing was read for this chunk (a hole): all of it is zero pages.
      const pages = chunkLength / job.pageSize
      const zeroBits = new Uint8Array(Math.ceil(pages / 8)).fill(0xff)
      if (pages % 8) zeroBits[zeroBits.length - 1] = (1 << (pages % 8)) - 1
      chunks.push({codec: Codec.None, payloadLength: 0, storedCrc: 0, zeroBits, zeroPages: pages, storedOffset: 0, storedLength: 0})
    }
  }
  // Compressed data is a fraction of the job: hand over an exact-size copy (its own ArrayBuffer,
  // transferred, not cloned) and keep the scratch. Transferring the worst-case-sized buffer made
  // the main thread collect gigabytes of external memory on a large snapshot.
  const result = Buffer.allocUnsafeSlow(storedAt)
  stored.copy(result, 0, 0, storedAt)
  const rows = digestRows && new Uint8Array(digestRows.buffer, digestRows.byteOffset, digestAt)
  return {id: job.id, chunks, stored: new Uint8Array(result.buffer, result.byteOffset, storedAt), ...(rows ? {pageDigests: rows} : {})}
}

parentPort!.on('message', (job: ChunkJob | typeof WORKER_STOP) => {
  if (job === WORKER_STOP) return parentPort!.close()
  try {
    const result = run(job)
    parentPort!.postMessage({ok: true, result}, [result.stored.buffer as ArrayBuffer, ...(result.pageDigests ? [result.pageDigests.buffer as ArrayBuffer] : [])])
  } catch (error) {
    parentPort!.postMessage({ok: false, id: job.id, error: (error as Error).message, code: (error as NodeJS.ErrnoException).code})
  }
})
