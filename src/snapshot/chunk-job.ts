import {crc32} from 'node:zlib'

import {Codec} from '../format/constants.js'
import {groupPayloadBytes} from '../format/frames.js'
import {ZeroMap} from '../format/zero-map.js'
import {type ChunkCompressor} from './codecs.js'

/** A byte range of a source file that lands at `imageOffset` in the image. */
export interface ReadSegment {
  path: string
  position: number
  length: number
  imageOffset: number
}

/** Work for one compression worker: consecutive chunks starting at image offset `start`. */
export interface ChunkJob {
  id: number
  firstChunk: number
  start: number
  /** Whole-page length of each chunk in this job. */
  chunkLengths: number[]
  pageSize: number
  segments: ReadSegment[]
  /**
   * Compute each stored chunk's SHA-256 before sealing (for a writer that cannot read its output
   * back to compare, or whose stored bytes are sealed: identical chunks seal differently).
   */
  digests?: boolean
  /** Compute each chunk's unit digest (docs/FORMAT.md, Sealed snapshots) of its bytes as stored: a signed file's. */
  unitDigests?: boolean
  /** Digest every non-zero page with these NH key words (docs/FORMAT.md, Page digests). */
  pageDigestKey?: Uint32Array
  /** Frame zstd chunks every this many pages (docs/FORMAT.md, Framed chunks); 0: one frame a chunk. */
  framePages?: number
}

/** How a worker seals chunks: the file's unit key and its chunks' generation (docs/FORMAT.md, Sealed snapshots). */
export type ChunkSealing = {unitKey: Uint8Array; generation: Uint8Array} | {convergentKey: Uint8Array}

export interface EncodedChunk {
  codec: Codec
  payloadLength: number
  storedCrc: number
  /** Where this chunk's stored bytes lie in the job's `stored` buffer. */
  storedOffset: number
  storedLength: number
  /** Chunk-local zero-page bits (bit i = page i of the chunk). */
  zeroBits: Uint8Array
  zeroPages: number
  /** SHA-256 of the stored bytes before sealing (32 bytes), when the job asked for digests and the chunk has stored bytes. */
  digest?: Uint8Array
  /** Its unit digest (of the bytes as stored), when the job asked for them and the chunk has stored bytes. */
  unitDigest?: Uint8Array
  /** A sealed chunk: the CRC-32 of its bytes before sealing (what nominates identical chunks). */
  plainCrc?: number
  /** A convergently sealed chunk: its content key (a row of the file's key table). */
  contentKey?: Uint8Array
}

export interface ChunkJobResult {
  id: number
  chunks: EncodedChunk[]
  stored: Uint8Array
  /** With pageDigestKey: the digests of the job's non-zero pages in page order, 16 bytes each. */
  pageDigests?: Uint8Array
}

/**
 * Turns one chunk's bytes into its stored form: finds zero pages (never stored), concatenates the
 * rest into the payload, compresses it and checksums the stored bytes. Pure apart from the compressor's
 * buffers; shared by the worker and by tests. The payload returned is a view of `bytes` or of
 * `payloadScratch`, valid until either is reused.
 */
export function encodeChunk(
  bytes: Buffer,
  pageSize: number,
  compressor: ChunkCompressor,
  zeroPage: Buffer,
  payloadScratch: Buffer,
  framePages = 0,
): {chunk: Omit<EncodedChunk, 'storedOffset' | 'storedLength'>; stored: Buffer; payload: Buffer} {
  const pages = bytes.length / pageSize
  const zeroBits = new Uint8Array(Math.ceil(pages / 8))
  let zeroPages = 0
  let payloadLength = 0
  for (let i = 0; i < pages; i++) {
    const at = i * pageSize
    if (zeroPage.compare(bytes, at, at + pageSize) === 0) {
      zeroBits[i >>> 3] |= 1 << (i & 7)
      zeroPages++
    } else {
      payloadLength += pageSize
    }
  }
  if (payloadLength === 0) {
    return {chunk: {codec: Codec.None, payloadLength: 0, storedCrc: 0, zeroBits, zeroPages}, stored: Buffer.alloc(0), payload: Buffer.alloc(0)}
  }
  // A chunk without zero pages is its own payload; otherwise its non-zero pages are packed.
  const payload = zeroPages === 0 ? bytes : compactPayload(bytes, pageSize, zeroBits, payloadScratch, payloadLength)
  const {codec, stored} = compressor.compress(payload, framePages > 0 ? groupPayloadBytes(new ZeroMap(pages, zeroBits), 0, pages, framePages, pageSize) : undefined)
  return {chunk: {codec, payloadLength, storedCrc: crc32(stored), zeroBits, zeroPages}, stored, payload}
}

/** Writes the non-zero pages of `bytes`, in order, to the start of `scratch`. */
function compactPayload(bytes: Buffer, pageSize: number, zeroBits: Uint8Array, scratch: Buffer, payloadLength: number): Buffer {
  let out = 0
  for (let i = 0; out < payloadLength; i++) {
    if (zeroBits[i >>> 3] & (1 << (i & 7))) continue
    bytes.copy(scratch, out, i * pageSize, (i + 1) * pageSize)
    out += pageSize
  }
  return scratch.subarray(0, payloadLength)
}
