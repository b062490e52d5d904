import {createRequire} from 'node:module'

import type * as Lz4 from 'lz4-napi'
import type * as ZstdBinding from 'zstd-napi/binding.js'

import {Codec} from '../format/constants.js'

// The low-level binding is CommonJS without an exports map; it is the only zstd API that
// decompresses straight into a caller's buffer (no allocation per chunk on the fault path).
const require = createRequire(import.meta.url)
// Both loaded on first use: `uffd resume` listens before anything is decoded on its main thread,
// and every compression worker and fault-loop thread starts faster without a native module most
// snapshots never use (lz4).
let zstdModule: typeof ZstdBinding | undefined
export const zstd = (): typeof ZstdBinding => (zstdModule ??= require('zstd-napi/binding.js') as typeof ZstdBinding)
let lz4Module: typeof Lz4 | undefined
export const lz4 = (): typeof Lz4 => (lz4Module ??= require('lz4-napi') as typeof Lz4)

export type CompressionCodec = 'zstd' | 'lz4' | 'raw'

/**
 * 64 KiB frames, the kernel's own fault-around for file pages: chosen by bench/first-touch
 * against 16 and 32 KiB and unframed chunks (docs/BENCHMARKS.md, Framed chunks), at a small cost
 * in size (one zstd frame header and checksum per frame, and less context to compress with).
 */
export const DEFAULT_FRAME_SIZE = 64 * 1024

/** Pages per frame for a frame size (0: unframed), given the codec and geometry. */
export function framePagesFor(codec: CompressionCodec, frameSize: number, pageSize: number, chunkSize: number): number {
  if (codec !== 'zstd' || frameSize < pageSize || frameSize >= chunkSize) return 0
  return Math.floor(frameSize / pageSize)
}

export const ZSTD_MIN_LEVEL = -131072
export const ZSTD_MAX_LEVEL = 22

/**
 * Compresses chunk payloads with one codec, reusing one zstd context and output buffer (one
 * instance per worker thread).
 */
export class ChunkCompressor {
  private readonly cctx = new (zstd().CCtx)()
  private output = Buffer.alloc(0)

  constructor(
    readonly codec: CompressionCodec,
    readonly level: number,
  ) {
    // compress2 honours these; the content checksum (XXH64 of the decoded bytes, 4 bytes per
    // frame) makes zstd itself verify its output when decoding.
    this.cctx.setParameter(zstd().CParameter.compressionLevel, level)
    this.cctx.setParameter(zstd().CParameter.checksumFlag, 1)
  }

  /**
   * Returns the stored form and its codec. Falls back to raw whenever compression would not make
   * the payload smaller, so incompressible memory costs no decode time at fault time. With
   * `groupBytes` (the payload bytes of each non-empty group of a framed chunk), zstd writes one
   * frame per group.
   */
  compress(payload: Buffer, groupBytes?: readonly number[]): {codec: Codec; stored: Buffer} {
    let stored: Buffer | undefined
    let codec = Codec.Raw
    if (this.codec === 'zstd') {
      // Framed (src/format/frames.ts): one frame per group, back to back, each within its bound.
      const framed = groupBytes !== undefined && groupBytes.length > 1
      const bound = framed ? groupBytes.reduce((sum, bytes) => sum + zstd().compressBound(bytes), 0) : zstd().compressBound(payload.length)
      if (this.output.length < bound) this.output = Buffer.alloc(bound)
      let n = 0
      if (framed) {
        for (let at = 0, g = 0; g < groupBytes.length; at += groupBytes[g], g++) n += this.cctx.compress2(this.output.subarray(n), payload.subarray(at, at + groupBytes[g]))
      } else {
        n = this.cctx.compress2(this.output, payload)
      }
      stored = this.output.subarray(0, n)
      codec = Codec.Zstd
    } else if (this.codec === 'lz4') {
      stored = lz4().compressSync(payload)
      codec = Codec.Lz4
    }
    if (stored === undefined || stored.length >= payload.length) return {codec: Codec.Raw, stored: payload}
    return {codec, stored}
  }
}
