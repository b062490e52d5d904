import {createRequire} from 'node:module'

import type * as Lz4 from 'lz4-napi'
import type * as ZstdBinding from 'zstd-napi/binding.js'

import {Codec} from '../format/constants.js'
import {hasSystemLz4, lz4DecodeBlock} from '../sys/lz4.js'

// The low-level binding is CommonJS without an exports map; it is the only zstd API that
// decompresses straight into a caller's buffer (no allocation per chunk on the fault path).
const require = createRequire(import.meta.url)
const zstd = require('zstd-napi/binding.js') as typeof ZstdBinding
// Loaded on first use: every compression worker and fault-loop thread starts faster without a
// native module most snapshots never use.
let lz4Module: typeof Lz4 | undefined
const lz4 = (): typeof Lz4 => (lz4Module ??= require('lz4-napi') as typeof Lz4)

export type CompressionCodec = 'zstd' | 'lz4' | 'raw'

export const ZSTD_MIN_LEVEL = -131072
export const ZSTD_MAX_LEVEL = 22

/**
 * Compresses chunk payloads with one codec, reusing one zstd context and output buffer (one
 * instance per worker thread).
 */
export class ChunkCompressor {
  private readonly cctx = new zstd.CCtx()
  private output = Buffer.alloc(0)

  constructor(
    readonly codec: CompressionCodec,
    readonly level: number,
  ) {
    // compress2 honours these; the content checksum (XXH64 of the decoded bytes, 4 bytes per
    // frame) makes zstd itself verify its output when decoding.
    this.cctx.setParameter(zstd.CParameter.compressionLevel, level)
    this.cctx.setParameter(zstd.CParameter.checksumFlag, 1)
  }

  /**
   * Returns the stored form and its codec. Falls back to raw whenever compression would not make
   * the payload smaller, so incompressible memory costs no decode time at fault time.
   */
  compress(payload: Buffer): {codec: Codec; stored: Buffer} {
    let stored: Buffer | undefined
    let codec = Codec.Raw
    if (this.codec === 'zstd') {
      const bound = zstd.compressBound(payload.length)
      if (this.output.length < bound) this.output = Buffer.alloc(bound)
      const n = this.cctx.compress2(this.output, payload)
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

/**
 * Decodes stored chunk bytes into `dst` (exactly `dst.length` bytes expected). Throws a plain
 * Error on malformed input or a length mismatch; the reader turns it into a SnapshotFormatError
 * naming the chunk.
 */
export class ChunkDecompressor {
  private readonly dctx = new zstd.DCtx()

  /** `systemLz4`: decode lz4 with the system's liblz4 (in place) rather than lz4-napi. */
  constructor(private readonly systemLz4 = hasSystemLz4) {}

  decompress(codec: Codec, stored: Buffer, dst: Buffer): void {
    switch (codec) {
      case Codec.Raw:
        if (stored.length !== dst.length) throw new Error(`raw data is ${stored.length} bytes, expected ${dst.length}`)
        stored.copy(dst)
        return
      case Codec.Zstd: {
        const size = zstd.getFrameContentSize(stored)
        if (size !== null && size !== dst.length) throw new Error(`zstd frame declares ${size} bytes, expected ${dst.length}`)
        const n = this.dctx.decompress(dst, stored)
        if (n !== dst.length) throw new Error(`zstd produced ${n} bytes, expected ${dst.length}`)
        return
      }
      case Codec.Lz4: {
        // The lz4 block format's 4-byte size prefix is read before the allocation it sizes.
        if (stored.length < 4 || stored.readUInt32LE(0) !== dst.length) throw new Error(`lz4 block does not declare ${dst.length} bytes`)
        if (this.systemLz4) {
          // The same block format as lz4-napi's, decoded in place (lz4-napi allocates per block).
          const n = lz4DecodeBlock(stored.subarray(4), dst)
          if (n !== dst.length) throw new Error(n < 0 ? 'malformed lz4 block' : `lz4 produced ${n} bytes, expected ${dst.length}`)
          return
        }
        const out = lz4().uncompressSync(stored)
        if (out.length !== dst.length) throw new Error(`lz4 produced ${out.length} bytes, expected ${dst.length}`)
        out.copy(dst)
        return
      }
      default:
        throw new Error(`codec ${codec} has no data to decode`)
    }
  }
}
