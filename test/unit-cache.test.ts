// Decoded units of a chain's files are cached by the file that holds them, not by the top layer:
// two layers of one base read in one thread decode each base chunk once between them. Real
// snapshot files written by the CLI; every read checked against the raw image.
import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {LayeredReader} from '../src/snapshot/layered-reader.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {UnitCache} from '../src/snapshot/unit-cache.js'
import {uffd} from './helpers/cli.js'
import {makeImage, pseudoRandom, tempDir} from './helpers/images.js'

const PAGE = 4096
const SIZE = 4 * 1024 * 1024
const CHUNK = 64 * 1024

let dir: string
const at = (name: string): string => path.join(dir, name)
const images = new Map<string, Buffer>()

/** `image` with every `stride`-th page (from `seed`) new. */
function changed(image: Buffer, seed: number, stride: number): Buffer {
  const out = Buffer.from(image)
  const fresh = pseudoRandom(SIZE, seed)
  for (let p = seed % stride; p < SIZE / PAGE; p += stride) fresh.copy(out, p * PAGE, p * PAGE, (p + 1) * PAGE)
  return out
}

function write(args: string[]): void {
  const r = uffd(args)
  expect(r.status, r.stderr).toBe(0)
}

/** The chain of `top` (over base.uffd) read through `units`. */
function chain(top: string, units: UnitCache): LayeredReader {
  return LayeredReader.fromFiles([SnapshotReader.open(at('base.uffd')), SnapshotReader.open(at(top))], ['base.uffd', top], units)
}

/** Chunks of the image any of whose data pages the chain takes from the base. */
function chunksUsingBase(reader: LayeredReader): Set<number> {
  const chunks = new Set<number>()
  for (const run of reader.runs) {
    if (run.source !== 0) continue
    for (let p = run.firstPage; p < run.firstPage + run.pageCount; p++) chunks.add(Math.floor(p / (CHUNK / PAGE)))
  }
  return chunks
}

beforeAll(() => {
  dir = tempDir('uffd-unit-cache-')
  const base = makeImage('mixed', SIZE, 21)
  images.set('a.uffd', changed(base, 3, 29))
  images.set('b.uffd', changed(base, 7, 43))
  fs.writeFileSync(at('base.raw'), base)
  write(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd'), '--chunk-size', '64K'])
  for (const [name, image] of images) {
    fs.writeFileSync(at(`${name}.raw`), image)
    write(['snapshot', '--mem-file', at(`${name}.raw`), '--parent', at('base.uffd'), '-o', at(name)])
  }
})

afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe('the unit cache', () => {
  it('decodes each base chunk once for two layers of that base read side by side', () => {
    const shared = new UnitCache()
    const a = chain('a.uffd', shared)
    const b = chain('b.uffd', shared)
    const separate = [new UnitCache(), new UnitCache()]
    const a2 = chain('a.uffd', separate[0])
    const b2 = chain('b.uffd', separate[1])
    const dst = Buffer.alloc(CHUNK)
    try {
      for (let c = 0; c < a.geometry.chunkCount; c++) {
        for (const [reader, name] of [
          [a, 'a.uffd'],
          [b, 'b.uffd'],
          [a2, 'a.uffd'],
          [b2, 'b.uffd'],
        ] as const) {
          reader.readChunk(c, dst)
          expect(dst.equals(images.get(name)!.subarray(c * CHUNK, (c + 1) * CHUNK)), `${name} chunk ${c}`).toBe(true)
        }
      }
      const base = a.files[0].layout
      const needed = new Set([...chunksUsingBase(a), ...chunksUsingBase(b)])
      expect(needed.size).toBeGreaterThan(0)
      // Shared: once per base chunk either layer needs; separate: once per layer that needs it.
      expect(shared.decodes.get(base)).toBe(needed.size)
      // The second layer to ask for a base chunk both need finds it decoded.
      expect(shared.hits.get(base)).toBeGreaterThanOrEqual([...chunksUsingBase(a)].filter((c) => chunksUsingBase(b).has(c)).length)
      // (A chain alone on its cache decodes base chunks straight into the chunk it assembles.)
      expect(a2.files[0].unitsDecoded + b2.files[0].unitsDecoded).toBe(chunksUsingBase(a).size + chunksUsingBase(b).size)
      // What a resume counts as storedUnitsShared: b took decoded each base chunk a had read first
      // (the same cache entries, keyed by the base's layout); a itself, and chains with caches of
      // their own, were spared nothing.
      const both = [...chunksUsingBase(a)].filter((c) => chunksUsingBase(b).has(c)).length
      expect(both).toBeGreaterThan(0)
      expect(b.unitsShared).toBe(both)
      expect(a.unitsShared).toBe(0)
      expect(a2.unitsShared + b2.unitsShared).toBe(0)
    } finally {
      for (const r of [a, b, a2, b2]) r.close()
    }
  })

  it('never serves another file\'s or another unit\'s bytes, whatever the order of reads across chains', () => {
    const dst = Buffer.alloc(CHUNK)
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.constantFrom('a.uffd', 'b.uffd'), fc.integer({min: 0, max: SIZE / CHUNK - 1})), {minLength: 1, maxLength: 200}), (reads) => {
        const units = new UnitCache()
        const readers = {'a.uffd': chain('a.uffd', units), 'b.uffd': chain('b.uffd', units)}
        try {
          for (const [name, c] of reads) {
            readers[name].readChunk(c, dst)
            expect(dst.equals(images.get(name)!.subarray(c * CHUNK, (c + 1) * CHUNK))).toBe(true)
          }
        } finally {
          for (const r of Object.values(readers)) r.close()
        }
      }),
      {numRuns: 40},
    )
  })

  it('decodes each layer block once for all readers of one chain that share its blocks (as the fault loop and its decoders do)', () => {
    const first = chain('a.uffd', new UnitCache())
    const files = [SnapshotReader.open(at('base.uffd')), SnapshotReader.open(at('a.uffd'))]
    const second = LayeredReader.fromFiles(files, ['base.uffd', 'a.uffd'], new UnitCache(), first.blockShare)
    const dst = Buffer.alloc(CHUNK)
    try {
      const chunks = Array.from({length: SIZE / CHUNK}, (_, c) => c)
      for (const c of chunks) {
        for (const reader of c % 2 === 0 ? [first, second] : [second, first]) {
          reader.readChunk(c, dst)
          expect(dst.equals(images.get('a.uffd')!.subarray(c * CHUNK, (c + 1) * CHUNK)), `chunk ${c}`).toBe(true)
        }
      }
      const blocks = first.files[1].layer!.set.blocks.length
      expect(blocks).toBeGreaterThan(1)
      expect(first.files[1].unitsDecoded + second.files[1].unitsDecoded).toBe(blocks)
    } finally {
      first.close()
      second.close()
    }
  })

  it('assembles every chunk into a caller buffer whatever it held, base pages moved in place', () => {
    const dst = Buffer.alloc(CHUNK)
    fc.assert(
      fc.property(fc.array(fc.integer({min: 0, max: SIZE / CHUNK - 1}), {minLength: 1, maxLength: 64}), fc.integer({min: 0, max: 255}), (reads, fill) => {
        const reader = chain('b.uffd', new UnitCache())
        try {
          for (const c of reads) {
            dst.fill(fill)
            const payload = reader.readPayload(c, dst)
            const image = images.get('b.uffd')!
            const expected = Buffer.concat(
              Array.from({length: CHUNK / PAGE}, (_, i) => c * (CHUNK / PAGE) + i)
                .filter((p) => !reader.zeroMap.isZero(p))
                .map((p) => image.subarray(p * PAGE, (p + 1) * PAGE)),
            )
            expect(payload.equals(expected), `chunk ${c}`).toBe(true)
          }
          expect(reader.files[0].unitsDecoded).toBeGreaterThan(0)
        } finally {
          reader.close()
        }
      }),
      {numRuns: 30},
    )
  })

  it('assembles a layer chunked otherwise than its base from the base chunks that hold its pages', () => {
    // uffd writes a layer with its parent's chunk size, but a chain only has to agree on pages:
    // a layer of 128 KiB chunks over the 64 KiB chunks of base.uffd, header rewritten by hand.
    const bytes = fs.readFileSync(at('a.uffd'))
    const headerSize = bytes.readUInt32LE(12)
    bytes.writeUInt32LE(2 * CHUNK, 36)
    const headerCrc = crc32(bytes.subarray(0, headerSize - 8))
    bytes.writeUInt32LE(headerCrc, headerSize - 8)
    const footer = bytes.length - 64
    bytes.writeUInt32LE(headerCrc, footer + 48)
    bytes.writeUInt32LE(crc32(bytes.subarray(footer, footer + 60)), footer + 60)
    fs.writeFileSync(at('a-128k.uffd'), bytes)
    const reader = LayeredReader.fromFiles([SnapshotReader.open(at('base.uffd')), SnapshotReader.open(at('a-128k.uffd'))], ['base.uffd', 'a-128k.uffd'], new UnitCache())
    const dst = Buffer.alloc(2 * CHUNK)
    try {
      expect(reader.geometry.chunkSize).toBe(2 * CHUNK)
      for (let c = 0; c < reader.geometry.chunkCount; c++) {
        reader.readChunk(c, dst)
        expect(dst.equals(images.get('a.uffd')!.subarray(c * 2 * CHUNK, (c + 1) * 2 * CHUNK)), `chunk ${c}`).toBe(true)
      }
    } finally {
      reader.close()
    }
  })

  it('never waits for a layer block another thread claimed: a thread that died decoding it holds up nobody', () => {
    const first = chain('a.uffd', new UnitCache())
    const files = [SnapshotReader.open(at('base.uffd')), SnapshotReader.open(at('a.uffd'))]
    // Every block claimed and never published, as by a thread that stopped mid-decode.
    new Int32Array(first.blockShare.states).fill(1)
    const second = LayeredReader.fromFiles(files, ['base.uffd', 'a.uffd'], new UnitCache(), first.blockShare)
    const dst = Buffer.alloc(CHUNK)
    try {
      for (let c = 0; c < SIZE / CHUNK; c++) {
        second.readChunk(c, dst)
        expect(dst.equals(images.get('a.uffd')!.subarray(c * CHUNK, (c + 1) * CHUNK)), `chunk ${c}`).toBe(true)
      }
    } finally {
      first.close()
      second.close()
    }
  })
})

