import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {type CompressionCodec} from '../src/snapshot/codecs.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {readFileDigests} from '../src/snapshot/page-digests.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {decodeImage, type ImageKind, makeImage, tempDir, writeSparse} from './helpers/images.js'

let dir: string
beforeAll(() => {
  dir = tempDir()
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

/** Decodes a whole snapshot through the reader, chunk by chunk, cut at the logical size. */
function decodeAll(file: string): Buffer {
  const reader = SnapshotReader.open(file)
  try {
    return decodeImage(reader)
  } finally {
    reader.close()
  }
}

async function roundTrip(image: Buffer, name: string, codec: CompressionCodec, level: number, chunkSize: number, jobs = 2, pageSize = 4096) {
  const raw = path.join(dir, `${name}.raw`)
  const out = path.join(dir, `${name}.uffd`)
  fs.writeFileSync(raw, image)
  const summary = await writeSnapshot(memFileInput(raw), out, {codec, level, chunkSize, pageSize, jobs})
  const decoded = decodeAll(out)
  expect(decoded.length).toBe(image.length)
  expect(decoded.equals(image)).toBe(true)
  return summary
}

describe('snapshot round trips are byte-exact', () => {
  const kinds: ImageKind[] = ['random', 'zero', 'mixed', 'incompressible', 'compressible']
  const cases: [CompressionCodec, number][] = [
    ['zstd', 1],
    ['zstd', -5],
    ['zstd', 9],
    ['lz4', 0],
    ['raw', 0],
  ]
  for (const kind of kinds) {
    for (const [codec, level] of cases) {
      it(`${kind} image, ${codec} ${level}, odd size`, async () => {
        const size = 1024 * 1024 + 12345 // not a multiple of the chunk or the page
        await roundTrip(makeImage(kind, size, 3), `${kind}-${codec}${level}`, codec, level, 65536)
      })
    }
  }

  for (const chunkSize of [4096, 16384, 1024 * 1024, 4 * 1024 * 1024]) {
    it(`mixed image with ${chunkSize}-byte chunks`, async () => {
      await roundTrip(makeImage('mixed', 5 * 1024 * 1024 + 4096 * 3 + 17, 5), `chunk-${chunkSize}`, 'zstd', 1, chunkSize)
    })
  }

  it('tiny and empty images', async () => {
    await roundTrip(Buffer.from('x'), 'one-byte', 'zstd', 1, 65536)
    await roundTrip(Buffer.alloc(0), 'empty', 'zstd', 1, 65536)
    await roundTrip(makeImage('random', 4095, 1), 'sub-page', 'lz4', 0, 4096)
  })

  it('2 MiB pages (hugetlbfs guests)', async () => {
    const image = makeImage('mixed', 8 * 1024 * 1024, 9)
    image.fill(0, 2 * 1024 * 1024, 4 * 1024 * 1024) // one whole zero huge page
    const s = await roundTrip(image, 'huge', 'zstd', 1, 4 * 1024 * 1024, 2, 2 * 1024 * 1024)
    expect(s.pageCount).toBe(4)
    expect(s.zeroPages).toBe(1)
  })

  it('output does not depend on the number of workers', async () => {
    const image = makeImage('mixed', 6 * 1024 * 1024, 11)
    await roundTrip(image, 'jobs1', 'zstd', 1, 65536, 1)
    await roundTrip(image, 'jobs3', 'zstd', 1, 65536, 3)
    const a = fs.readFileSync(path.join(dir, 'jobs1.uffd'))
    const b = fs.readFileSync(path.join(dir, 'jobs3.uffd'))
    // Only the creation time and the page digest key in the metadata may differ, and so the
    // digest table (each base draws its own key): compare everything else after the header.
    const reader = SnapshotReader.open(path.join(dir, 'jobs1.uffd'))
    const h = reader.header.headerSize
    const table = readFileDigests(reader)!
    reader.close()
    expect(a.length).toBe(b.length)
    expect(a.subarray(h, table.offset).equals(b.subarray(h, table.offset))).toBe(true)
    expect(a.subarray(table.offset + table.length, -64).equals(b.subarray(table.offset + table.length, -64))).toBe(true)
  })
})

describe('what is stored', () => {
  it('never stores zero pages and stores identical chunks once', async () => {
    const image = makeImage('mixed', 2 * 1024 * 1024, 2)
    const s = await roundTrip(image, 'dedup', 'zstd', 1, 65536)
    let zeroPages = 0
    for (let at = 0; at < image.length; at += 4096) if (image.subarray(at, at + 4096).every((b) => b === 0)) zeroPages++
    expect(s.zeroPages).toBe(zeroPages)
    expect(s.dedupChunks).toBe(2)
    const reader = SnapshotReader.open(path.join(dir, 'dedup.uffd'))
    expect(reader.index.at(5).dataOffset).toBe(reader.index.at(1).dataOffset)
    expect(reader.index.at(7).dataOffset).toBe(reader.index.at(1).dataOffset)
    expect(reader.index.at(1).flags & 1).toBe(1)
    // The stored data section holds no more than the non-zero payload needs, and the page digest table.
    const payload = [...reader.index].reduce((sum, e, i) => sum + (i === 5 || i === 7 ? 0 : e.storedLength), 0)
    expect(reader.footer.indexOffset - reader.header.headerSize).toBe(payload + readFileDigests(reader)!.length)
    reader.close()
  })

  it('falls back to raw for incompressible chunks and zstd shrinks compressible ones', async () => {
    const s = await roundTrip(makeImage('random', 1024 * 1024, 4), 'incompressible-stats', 'zstd', 1, 65536)
    expect(s.codecs.raw?.chunks).toBe(16)
    const c = await roundTrip(makeImage('compressible', 1024 * 1024, 4), 'compressible-stats', 'zstd', 1, 65536)
    expect(c.codecs.zstd?.chunks).toBe(16)
    expect(c.fileSize).toBeLessThan(1024 * 1024 / 4)
  })

  it('skips holes of sparse files and round-trips them', async () => {
    const raw = path.join(dir, 'sparse.raw')
    const size = 64 * 1024 * 1024 + 4096 * 5
    const image = writeSparse(raw, size, [
      [0, 8192],
      [3 * 1024 * 1024 + 100, 70_000],
      [size - 5000, 5000],
    ])
    const input = memFileInput(raw)
    // Only the data extents are read (rounded to the filesystem's block granularity).
    const segments = input.segments(0, size)
    const read = segments.reduce((sum, s) => sum + s.length, 0)
    expect(read).toBeLessThan(1024 * 1024)
    const out = path.join(dir, 'sparse.uffd')
    await writeSnapshot(input, out, {codec: 'zstd', level: 1, chunkSize: 262144, pageSize: 4096, jobs: 2})
    expect(decodeAll(out).equals(image)).toBe(true)
  })
})

describe('atomic output', () => {
  it('leaves no file and no temporary file when the source fails mid-way', async () => {
    const sub = fs.mkdtempSync(path.join(dir, 'atomic-'))
    const out = path.join(sub, 'out.uffd')
    const input = {
      logicalSize: 16 * 1024 * 1024,
      regions: [],
      metadata: {},
      segments: (start: number, end: number) => {
        // Halfway through, the source disappears (e.g. a process exited).
        const file = start < 8 * 1024 * 1024 ? '/dev/zero' : path.join(sub, 'does-not-exist')
        return [{path: file, position: 0, length: end - start, imageOffset: start}]
      },
    }
    await expect(writeSnapshot(input, out, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 2})).rejects.toThrow(/no such file/i)
    expect(fs.readdirSync(sub)).toEqual([])
  })

  it('removes the temporary file when aborted', async () => {
    const sub = fs.mkdtempSync(path.join(dir, 'abort-'))
    const controller = new AbortController()
    const input = {
      logicalSize: 256 * 1024 * 1024,
      regions: [],
      metadata: {},
      segments: (start: number, end: number) => [{path: '/dev/urandom', position: 0, length: end - start, imageOffset: start}],
    }
    const done = writeSnapshot(input, path.join(sub, 'out.uffd'), {
      codec: 'zstd',
      level: 1,
      chunkSize: 65536,
      pageSize: 4096,
      jobs: 2,
      signal: controller.signal,
      onProgress: (d) => d > 8 * 1024 * 1024 && controller.abort(),
    })
    await expect(done).rejects.toThrow(/abort/i)
    expect(fs.readdirSync(sub)).toEqual([])
  })
})

describe('shared tables', () => {
  it("open a file with another opening's index and zero map, and refuse another file's", async () => {
    const write = async (name: string, seed: number): Promise<string> => {
      const raw = path.join(dir, `${name}.raw`)
      const out = path.join(dir, `${name}.uffd`)
      const image = makeImage('mixed', 2 * 1024 * 1024, seed)
      fs.writeFileSync(raw, image)
      await writeSnapshot(memFileInput(raw), out, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1})
      return out
    }
    const a = await write('tables-a', 1)
    const b = await write('tables-b', 2)
    const first = SnapshotReader.open(a)
    const again = SnapshotReader.open(a, a, undefined, false, first.tables)
    try {
      // The same memory, not a copy: a thread that opens with them keeps no tables of its own.
      expect(again.tables.index).toBe(first.tables.index)
      expect(again.tables.zeroMap).toBe(first.tables.zeroMap)
      expect(decodeImage(again).equals(decodeImage(first))).toBe(true)
      // Another file's tables of the same sizes fail that file's own footer checksums.
      const other = SnapshotReader.open(b)
      expect(other.tables.index.byteLength).toBe(first.tables.index.byteLength)
      other.close()
      expect(() => SnapshotReader.open(b, b, undefined, false, first.tables)).toThrow(/checksum mismatch/)
    } finally {
      again.close()
      first.close()
    }
  })
})
