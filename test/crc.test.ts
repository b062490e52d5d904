// The format's CRC-32: native/libuffd_crc (carry-less multiplication) against zlib.crc32.
import crypto from 'node:crypto'
import {crc32 as zlibCrc32} from 'node:zlib'

import {describe, expect, it} from 'vitest'

import {crc32, nativeCrc32} from '../src/sys/index.js'

if (!nativeCrc32) console.warn('test/crc.test.ts: native/libuffd_crc is not built or this CPU lacks PCLMULQDQ: only the zlib path is checked')

describe('crc32', () => {
  it(`agrees with zlib.crc32 for every length, offset and starting value (${nativeCrc32 ? 'native' : 'zlib'})`, () => {
    const data = crypto.randomBytes(300_000)
    const lengths = [...Array.from({length: 200}, (_, i) => i), 255, 256, 257, 4096, 65535, 65536, 65537, 262_144, 299_000]
    for (const length of lengths) {
      for (const offset of [0, 1, 7, 15]) {
        const piece = data.subarray(offset, offset + length)
        for (const start of [0, 0xffffffff, 0x12345678]) expect(crc32(piece, start), `length ${length} offset ${offset}`).toBe(zlibCrc32(piece, start))
      }
    }
  })

  it('continues across pieces like one call, and reads SharedArrayBuffer views', () => {
    const shared = new Uint8Array(new SharedArrayBuffer(1 << 20))
    shared.set(crypto.randomBytes(shared.length))
    const whole = crc32(shared)
    expect(whole).toBe(zlibCrc32(Buffer.from(shared)))
    let running = 0
    for (let at = 0; at < shared.length; at += 70_001) running = crc32(shared.subarray(at, at + 70_001), running)
    expect(running).toBe(whole)
  })

  it('changes with any flipped bit', () => {
    const data = crypto.randomBytes(4096)
    const before = crc32(data)
    for (const bit of [0, 7, 8 * 100 + 3, 8 * 4095 + 7]) {
      data[bit >> 3] ^= 1 << (bit & 7)
      expect(crc32(data)).not.toBe(before)
      data[bit >> 3] ^= 1 << (bit & 7)
    }
    expect(crc32(data)).toBe(before)
  })
})
