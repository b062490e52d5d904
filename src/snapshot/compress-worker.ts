import fs from 'node:fs'
import {parentPort, workerData} from 'node:worker_threads'

import {Codec, maxStoredLength} from '../format/constants.js'
import {type ChunkJob, type ChunkJobResult, type EncodedChunk, encodeChunk} from './chunk-job.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'

/**
 * A compression worker: reads the segments of a job straight from their source files (so reading
 * is spread over the workers too), then encodes each chunk. Replies {ok, result} or {ok:false,
 * error} per job.
 */
const {codec, level} = workerData as {codec: CompressionCodec; level: number}
const compressor = new ChunkCompressor(codec, level)
const fds = new Map<string, number>()
let input = Buffer.alloc(0)
let payloadScratch = Buffer.alloc(0)
let zeroPage = Buffer.alloc(0)

function fdFor(path: string): number {
  let fd = fds.get(path)
  if (fd === undefined) {
    fd = fs.openSync(path, 'r')
    fds.set(path, fd)
  }
  return fd
}

function readSegments(job: ChunkJob, length: number): void {
  input.fill(0, 0, length)
  for (const s of job.segments) {
    const fd = fdFor(s.path)
    let done = 0
    while (done < s.length) {
      const n = fs.readSync(fd, input, s.imageOffset - job.start + done, s.length - done, s.position + done)
      if (n === 0) throw new Error(`${s.path}: ended at ${s.position + done}, expected ${s.length - done} more bytes`)
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
  readSegments(job, length)

  // Its own ArrayBuffer (not the shared pool) so it can be transferred to the main thread, not copied.
  const stored = Buffer.allocUnsafeSlow(job.chunkLengths.reduce((a, n) => a + maxStoredLength(n), 0))
  const chunks: EncodedChunk[] = []
  let at = 0
  let storedAt = 0
  for (const chunkLength of job.chunkLengths) {
    const bytes = input.subarray(at, at + chunkLength)
    const covered = job.segments.some((s) => s.imageOffset < job.start + at + chunkLength && s.imageOffset + s.length > job.start + at)
    if (covered) {
      const encoded = encodeChunk(bytes, job.pageSize, compressor, zeroPage, payloadScratch)
      encoded.stored.copy(stored, storedAt)
      chunks.push({...encoded.chunk, storedOffset: storedAt, storedLength: encoded.stored.length})
      storedAt += encoded.stored.length
    } else {
      // Nothing was read for this chunk (a hole): all of it is zero pages.
      const pages = chunkLength / job.pageSize
      const zeroBits = new Uint8Array(Math.ceil(pages / 8)).fill(0xff)
      if (pages % 8) zeroBits[zeroBits.length - 1] = (1 << (pages % 8)) - 1
      chunks.push({codec: Codec.None, payloadLength: 0, storedCrc: 0, zeroBits, zeroPages: pages, storedOffset: 0, storedLength: 0})
    }
    at += chunkLength
  }
  return {id: job.id, chunks, stored: new Uint8Array(stored.buffer, stored.byteOffset, storedAt)}
}

parentPort!.on('message', (job: ChunkJob) => {
  try {
    const result = run(job)
    parentPort!.postMessage({ok: true, result}, [result.stored.buffer as ArrayBuffer])
  } catch (error) {
    parentPort!.postMessage({ok: false, id: job.id, error: (error as Error).message, code: (error as NodeJS.ErrnoException).code})
  }
})
