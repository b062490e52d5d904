// The chunk codecs, and the two lz4 decoders (the system's liblz4 in place, lz4-napi as the
// fallback) against each other and against malformed blocks.
import {createRequire} from 'node:module'

import {describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {ChunkCompressor} from '../src/snapshot/codecs.js'
import {ChunkDecompressor} from '../src/snapshot/decompressor.js'
import {hasSystemLz4, lz4DecodeBlock} from '../src/sys/index.js'
import {type ImageKind, makeImage} from './helpers/images.js'

const lz4napi = createRequire(import.meta.url)('lz4-napi') as typeof import('lz4-napi')

if (!hasSystemLz4) console.warn("test/codecs.test.ts: the system's liblz4 (liblz4.so.1) is not installed: its cases are skipped")

const kinds: ImageKind[] = ['random', 'zero', 'mixed', 'compressible']
const sizes = [1, 4096, 65536 + 17, 256 * 1024]

describe('chunk codecs', () => {
  for (const codec of ['zstd', 'lz4'] as const) {
    for (const systemLz4 of codec === 'lz4' ? [true, false] : [false]) {
      it.skipIf(systemLz4 && !hasSystemLz4)(`${codec}${codec === 'lz4' ? (systemLz4 ? ' (system liblz4)' : ' (lz4-napi)') : ''} decodes what it encoded, exactly`, () => {
        const compressor = new ChunkCompressor(codec, codec === 'zstd' ? 1 : 0)
        const decompressor = new ChunkDecompressor(systemLz4)
        for (const kind of kinds) {
          for (const size of sizes) {
            const payload = makeImage(kind, size, size)
            const {codec: stored, stored: bytes} = compressor.compress(payload)
            // A guard after the destination: a decoder must write exactly its length, no more.
            const out = Buffer.alloc(size + 64, 0xa5)
            if (stored === Codec.Raw) decompressor.decompress(stored, Buffer.from(bytes), out.subarray(0, size))
            else decompressor.decompress(stored, bytes, out.subarray(0, size))
            expect(out.subarray(0, size).equals(payload), `${kind} ${size}`).toBe(true)
            expect(out.subarray(size).every((b) => b === 0xa5)).toBe(true)
          }
        }
      })
    }
  }

  it.skipIf(!hasSystemLz4)('the system liblz4 and lz4-napi read the same blocks', () => {
    for (const kind of kinds) {
      const payload = makeImage(kind, 200_000, 7)
      const block = lz4napi.compressSync(payload)
      const out = Buffer.alloc(payload.length)
      expect(lz4DecodeBlock(block.subarray(4), out)).toBe(payload.length)
      expect(out.equals(lz4napi.uncompressSync(block))).toBe(true)
    }
  })

  for (const systemLz4 of [true, false]) {
    it.skipIf(systemLz4 && !hasSystemLz4)(`refuses malformed lz4 blocks without writing past the chunk (${systemLz4 ? 'system liblz4' : 'lz4-napi'})`, () => {
      const payload = makeImage('compressible', 65536, 3)
      const block = lz4napi.compressSync(payload)
      const decompressor = new ChunkDecompressor(systemLz4)
      const damaged: [string, Buffer, number][] = [
        ['truncated', block.subarray(0, block.length - 9), payload.length],
        ['cut to its size prefix', block.subarray(0, 4), payload.length],
        ['declaring another size', block, payload.length - 4096],
        ['with a literal run past its end', Buffer.concat([block.subarray(0, 4), Buffer.from([0xf0, 0xff, 0xff, 0xff, 0x10])]), payload.length],
      ]
      for (const [what, bytes, length] of damaged) {
        const out = Buffer.alloc(length + 64, 0xa5)
        expect(() => decompressor.decompress(Codec.Lz4, bytes, out.subarray(0, length)), what).toThrow()
        expect(out.subarray(length).every((b) => b === 0xa5), what).toBe(true)
      }
    })
  }

  it.skipIf(!hasSystemLz4)('lz4DecodeBlock reports a block that does not fit its buffer', () => {
    const payload = makeImage('random', 8192, 5)
    const block = lz4napi.compressSync(payload).subarray(4)
    expect(lz4DecodeBlock(block, Buffer.alloc(8191))).toBe(-1)
    expect(lz4DecodeBlock(block, Buffer.alloc(8192))).toBe(8192)
  })
})
