// Decoding of stored chunks. Apart from codecs.ts because it loads src/sys (koffi, for the
// system's liblz4): compression workers only need the encoder. (They load koffi all the same
// now, for page digests: a worker terminated while koffi loads aborts the process, so a pool
// ends its workers with WORKER_STOP, src/core/workers.ts, never by terminating one still loading.)
import {UffdError} from '../core/errors.js'
import {Codec} from '../format/constants.js'
import {hasSystemLz4, lz4DecodeBlock} from '../sys/lz4.js'
import {lz4, zstd} from './codecs.js'

/**
 * Decodes stored chunk bytes into `dst` (exactly `dst.length` bytes expected). Throws CORRUPT on
 * malformed input or a length mismatch; the reader turns it into a SnapshotFormatError naming
 * the chunk.
 */
export class ChunkDecompressor {
  private readonly dctx = new (zstd().DCtx)()

  /** `systemLz4`: decode lz4 with the system's liblz4 (in place) rather than lz4-napi. */
  constructor(private readonly systemLz4 = hasSystemLz4) {}

  /**
   * `framed`: a chunk of a file that frames its zstd chunks (src/format/frames.ts), or some of its
   * frames, which the caller checked (chunkFrames): the first frame may declare only its group.
   */
  decompress(codec: Codec, stored: Buffer, dst: Buffer, framed = false): void {
    switch (codec) {
      case Codec.Raw:
        if (stored.length !== dst.length) throw new UffdError('CORRUPT', `raw data is ${stored.length} bytes, expected ${dst.length}`)
        stored.copy(dst)
        return
      case Codec.Zstd: {
        const size = zstd().getFrameContentSize(stored)
        if (size !== null && size !== dst.length && !framed) throw new UffdError('CORRUPT', `zstd frame declares ${size} bytes, expected ${dst.length}`)
        const n = this.dctx.decompress(dst, stored)
        if (n !== dst.length) throw new UffdError('CORRUPT', `zstd produced ${n} bytes, expected ${dst.length}`)
        return
      }
      case Codec.Lz4: {
        // The lz4 block format's 4-byte size prefix is read before the allocation it sizes.
        if (stored.length < 4 || stored.readUInt32LE(0) !== dst.length) throw new UffdError('CORRUPT', `lz4 block does not declare ${dst.length} bytes`)
        if (this.systemLz4) {
          // The same block format as lz4-napi's, decoded in place (lz4-napi allocates per block).
          const n = lz4DecodeBlock(stored.subarray(4), dst)
          if (n !== dst.length) throw new UffdError('CORRUPT', n < 0 ? 'malformed lz4 block' : `lz4 produced ${n} bytes, expected ${dst.length}`)
          return
        }
        const out = lz4().uncompressSync(stored)
        if (out.length !== dst.length) throw new UffdError('CORRUPT', `lz4 produced ${out.length} bytes, expected ${dst.length}`)
        out.copy(dst)
        return
      }
      default:
        throw new UffdError('CORRUPT', `codec ${codec} has no data to decode`)
    }
  }
}

