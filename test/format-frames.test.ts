import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, describe, expect, it} from 'vitest'

import {Codec, INCOMPAT_FRAMED} from '../src/format/constants.js'
import {chunkFrames, framePagesProblem, framesOfPages, groupPayloadBytes, zstdFrameAt} from '../src/format/frames.js'
import {ZeroMap} from '../src/format/zero-map.js'
import {encodeChunk} from '../src/snapshot/chunk-job.js'
import {ChunkCompressor} from '../src/snapshot/codecs.js'
import {ChunkDecompressor} from '../src/snapshot/decompressor.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {writeSnapshot} from '../src/snapshot/writer.js'

const PAGE = 4096
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-frames-'))
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

/** A chunk of `pages` pages: zero where `zero[i]`, else compressible bytes unique to the page. */
function chunkBytes(zero: boolean[], seed: number): Buffer {
  const bytes = Buffer.alloc(zero.length * PAGE)
  for (let i = 0; i < zero.length; i++) {
    if (zero[i]) continue
    for (let b = 0; b < PAGE; b += 16) bytes.writeUInt32LE((seed * 7919 + i * 104729 + (b >> 6)) >>> 0, i * PAGE + b)
  }
  return bytes
}

function zeroMapOf(zero: boolean[]): ZeroMap {
  const map = new ZeroMap(zero.length)
  zero.forEach((z, i) => z && map.setZero(i))
  return map
}

/** The chunk's non-zero pages, in order: its payload. */
function payloadOf(bytes: Buffer, zero: boolean[]): Buffer {
  return Buffer.concat(zero.flatMap((z, i) => (z ? [] : [bytes.subarray(i * PAGE, (i + 1) * PAGE)])))
}

const zeroPatterns = fc.array(fc.boolean(), {minLength: 64, maxLength: 64})

describe('framed chunks: the pure frame walk', () => {
  it('frame sizes: a power of two below the chunk', () => {
    expect(framePagesProblem(8, 64)).toBeUndefined()
    expect(framePagesProblem(1, 64)).toBeUndefined()
    expect(framePagesProblem(64, 64)).toMatch(/not smaller than a chunk/)
    expect(framePagesProblem(12, 64)).toMatch(/power of two/)
    expect(framePagesProblem('8', 64)).toMatch(/"8" is not a number of pages/)
    expect(framePagesProblem(0, 64)).toMatch(/power of two/)
  })

  it('each frame of a framed chunk decodes its group alone; the whole chunk decodes in one call (property)', () => {
    const compressor = new ChunkCompressor('zstd', 1)
    const decompressor = new ChunkDecompressor()
    fc.assert(
      fc.property(zeroPatterns, fc.constantFrom(1, 2, 4, 8, 16, 32), fc.integer({min: 0, max: 1000}), (zero, framePages, seed) => {
        const bytes = chunkBytes(zero, seed)
        const {chunk, stored, payload} = encodeChunk(bytes, PAGE, compressor, Buffer.alloc(PAGE), Buffer.alloc(bytes.length), framePages)
        if (chunk.codec !== Codec.Zstd) return
        const map = zeroMapOf(zero)
        const groups = groupPayloadBytes(map, 0, 64, framePages, PAGE)
        expect(groups).toEqual(groupPayloadBytes(new ZeroMap(64, chunk.zeroBits), 0, 64, framePages, PAGE))
        expect(groups.reduce((a, b) => a + b, 0)).toBe(payload.length)
        const frames = chunkFrames(stored, groups)
        if (groups.length === 1) {
          expect(frames).not.toBeTypeOf('string')
        } else {
          if (!Array.isArray(frames)) throw new Error(`not framed: ${frames}`)
          expect(frames.length).toBe(groups.length)
        }
        // Whole: zstd decodes the concatenation.
        const whole = Buffer.alloc(payload.length)
        decompressor.decompress(Codec.Zstd, stored, whole, true)
        expect(whole.equals(payloadOf(bytes, zero))).toBe(true)
        // Any page range: its frames alone hold exactly its data pages at their payload place.
        const first = (seed * 13) % 64
        const end = Math.min(64, first + 1 + (seed % 20))
        const span = framesOfPages(map, 0, 64, framePages, first, end)
        if (span.to === span.from || !Array.isArray(frames)) return
        const from = frames[span.from].offset
        const to = frames[span.to - 1].offset + frames[span.to - 1].length
        const part = Buffer.alloc(groups.slice(span.from, span.to).reduce((a, b) => a + b, 0))
        decompressor.decompress(Codec.Zstd, stored.subarray(from, to), part, true)
        expect(part.equals(whole.subarray(span.payloadPage * PAGE, span.payloadPage * PAGE + part.length))).toBe(true)
        for (let p = first; p < end; p++) {
          if (zero[p]) continue
          const at = (zero.slice(0, p).filter((z) => !z).length - span.payloadPage) * PAGE
          expect(at).toBeGreaterThanOrEqual(0)
          expect(part.subarray(at, at + PAGE).equals(bytes.subarray(p * PAGE, (p + 1) * PAGE))).toBe(true)
        }
      }),
      {numRuns: 150},
    )
  })

  it('refuses crafted frames: wrong sizes, bytes after the last frame, truncation, reserved bits, no frame at all (property: never throws)', () => {
    const compressor = new ChunkCompressor('zstd', 1)
    const zero = Array.from({length: 64}, (_, i) => i % 9 === 3)
    const bytes = chunkBytes(zero, 5)
    const {stored} = encodeChunk(bytes, PAGE, compressor, Buffer.alloc(PAGE), Buffer.alloc(bytes.length), 8)
    const groups = groupPayloadBytes(zeroMapOf(zero), 0, 64, 8, PAGE)
    const good = Buffer.from(stored)
    expect(Array.isArray(chunkFrames(good, groups))).toBe(true)
    expect(chunkFrames(Buffer.concat([good, Buffer.alloc(3)]), groups)).toMatch(/bytes follow the last zstd frame/)
    expect(chunkFrames(good.subarray(0, good.length - 1), groups)).toMatch(/runs past the chunk|no zstd frame/)
    expect(chunkFrames(good, [groups[0] + PAGE, ...groups.slice(1)])).toMatch(/declares/)
    const reserved = Buffer.from(good)
    reserved[4] |= 0x08
    expect(chunkFrames(reserved, groups)).toMatch(/reserved bit/)
    expect(chunkFrames(Buffer.alloc(64), groups)).toMatch(/no zstd frame/)
    // One frame of the whole payload (another writer's chunk): decoded whole.
    const one = new ChunkCompressor('zstd', 1).compress(payloadOf(bytes, zero)).stored
    expect(chunkFrames(Buffer.from(one), groups)).toBe('whole')
    fc.assert(
      fc.property(fc.integer({min: 0, max: good.length - 1}), fc.integer({min: 0, max: 255}), fc.integer({min: 1, max: good.length}), (at, value, cut) => {
        const bad = Buffer.from(good)
        bad[at] = value
        for (const b of [bad, bad.subarray(0, cut)]) {
          const frames = chunkFrames(b, groups)
          if (Array.isArray(frames)) {
            let end = 0
            for (const f of frames) {
              expect(f.offset).toBe(end)
              end += f.length
            }
            expect(end).toBe(b.length)
          }
          expect(() => zstdFrameAt(b, 0)).not.toThrow()
        }
      }),
      {numRuns: 500},
    )
  })

  it('a framed chunk read by a reader that does not know the file frames is refused, not misread', () => {
    const compressor = new ChunkCompressor('zstd', 1)
    const zero = Array.from({length: 64}, () => false)
    const bytes = chunkBytes(zero, 9)
    const {stored} = encodeChunk(bytes, PAGE, compressor, Buffer.alloc(PAGE), Buffer.alloc(bytes.length), 8)
    expect(() => new ChunkDecompressor().decompress(Codec.Zstd, stored, Buffer.alloc(bytes.length))).toThrow(/declares 32768 bytes/)
  })
})

describe('framed snapshots', () => {
  async function written(name: string, frameSize: number | undefined, image: Buffer): Promise<string> {
    const raw = path.join(dir, `${name}.raw`)
    fs.writeFileSync(raw, image)
    const out = path.join(dir, `${name}.uffd`)
    await writeSnapshot(memFileInput(raw), out, {codec: 'zstd', level: 1, chunkSize: 256 * 1024, pageSize: PAGE, jobs: 2, ...(frameSize === undefined ? {} : {frameSize})})
    return out
  }

  /** 4 MiB: data, zero runs, scattered zero pages. */
  function image(): Buffer {
    const pages = 1024
    const zero = Array.from({length: pages}, (_, i) => (i >= 200 && i < 330) || i % 37 === 5)
    return chunkBytes(zero, 3)
  }

  it('frames every 64 KiB by default (incompat bit, metadata), reads back byte-exact, and decodes a fault\'s frames alone', async () => {
    const bytes = image()
    const file = await written('default', undefined, bytes)
    const reader = SnapshotReader.open(file)
    expect(reader.header.incompatFeatures & INCOMPAT_FRAMED).toBe(INCOMPAT_FRAMED)
    expect(reader.header.metadata.framePages).toBe(16)
    expect(reader.framePages).toBe(16)
    const chunk = Buffer.alloc(256 * 1024)
    for (let c = 0; c < reader.index.length; c++) {
      reader.readChunk(c, chunk)
      expect(chunk.equals(bytes.subarray(c * chunk.length, (c + 1) * chunk.length))).toBe(true)
    }
    const dst = Buffer.alloc(256 * 1024)
    for (let page = 0; page < 1024; page += 5) {
      const c = Math.floor(page / 64)
      const got = reader.readFramesIfLocal(c, page, page + 1, dst)
      if (reader.zeroMap.isZero(page)) continue
      if (got === undefined) throw new Error(`page ${page}: not local`)
      if (got === 'whole') {
        // Only where its frames would be the whole chunk: one group holds all its data.
        expect(groupPayloadBytes(reader.zeroMap, c * 64, 64, 16, PAGE).length).toBe(1)
        continue
      }
      const position = page - c * 64 - reader.zeroMap.countZero(c * 64, page - c * 64)
      const at = (position - got.payloadPage) * PAGE
      expect(got.payload.subarray(at, at + PAGE).equals(bytes.subarray(page * PAGE, (page + 1) * PAGE))).toBe(true)
    }
    reader.close()
  })

  it('--frame-size 0 writes one frame a chunk, with no feature bit', async () => {
    const file = await written('whole', 0, image())
    const reader = SnapshotReader.open(file)
    expect(reader.header.incompatFeatures & INCOMPAT_FRAMED).toBe(0n)
    expect(reader.framePages).toBe(0)
    expect(reader.readFramesIfLocal(0, 0, 1, Buffer.alloc(256 * 1024))).toBe('whole')
    reader.close()
  })

  it('a frame that fails its checksum, or a chunk whose stored bytes changed, is refused naming the chunk', async () => {
    const file = await written('corrupt', undefined, image())
    const reader = SnapshotReader.open(file)
    const entry = reader.entry(1)
    reader.close()
    const fd = fs.openSync(file, 'r+')
    const one = Buffer.alloc(1)
    fs.readSync(fd, one, 0, 1, entry.dataOffset + 40)
    one[0] ^= 0xff
    fs.writeSync(fd, one, 0, 1, entry.dataOffset + 40)
    fs.closeSync(fd)
    const again = SnapshotReader.open(file)
    expect(() => again.readFramesIfLocal(1, 64 + 40, 64 + 41, Buffer.alloc(256 * 1024))).toThrow(/chunk 1.*checksum mismatch/)
    again.close()
  })
})
