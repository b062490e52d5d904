import {crc32} from 'node:zlib'

import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {Codec, SOURCE_ZERO} from '../src/format/constants.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {Geometry} from '../src/format/geometry.js'
import {
  baseRuns,
  checkLayerLocation,
  composeRuns,
  decodeRunTable,
  encodeRunTable,
  findRun,
  indexOfPage,
  type LayerRun,
  layerIdentity,
  layerPagesProblem,
  pagesBySource,
  runTableProblem,
} from '../src/format/layer.js'
import {type PackedSet} from '../src/format/packed-set.js'
import {ZeroMap} from '../src/format/zero-map.js'

/** The oracle: a table is one source per page. */
function expand(runs: readonly LayerRun[]): number[] {
  return runs.flatMap((r) => Array.from({length: r.pageCount}, () => r.source))
}

/** Runs of a page array, normalised: what every table must equal. */
function runsOf(sources: readonly number[]): LayerRun[] {
  const runs: LayerRun[] = []
  sources.forEach((source, page) => {
    const last = runs.at(-1)
    if (last && last.source === source) last.pageCount++
    else runs.push({firstPage: page, pageCount: 1, source})
  })
  return runs
}

const source = (parents: number) => fc.oneof(fc.integer({min: 0, max: parents}), fc.constant(SOURCE_ZERO))
const pageArray = (parents: number) => fc.array(source(parents), {minLength: 1, maxLength: 300})

describe('composeRuns', () => {
  it('equals laying the changed pages over the parent page by page, normalised', () => {
    fc.assert(
      fc.property(
        pageArray(2).chain((parent) => fc.tuple(fc.constant(parent), fc.array(fc.option(fc.oneof(fc.constant(3), fc.constant(SOURCE_ZERO)), {nil: undefined}), {minLength: parent.length, maxLength: parent.length}))),
        ([parent, change]) => {
          const expected = parent.map((s, p) => change[p] ?? s)
          // The overrides as the writer makes them: runs of changed pages, unmerged where they touch.
          const overrides: LayerRun[] = []
          change.forEach((s, p) => {
            if (s !== undefined) overrides.push({firstPage: p, pageCount: 1, source: s})
          })
          const composed = composeRuns(runsOf(parent), overrides)
          expect(expand(composed)).toEqual(expected)
          expect(composed).toEqual(runsOf(expected))
          expect(runTableProblem(composed, parent.length, 3)).toBeUndefined()
        },
      ),
    )
  })

  it('refuses overrides out of order or past the image', () => {
    const parent = [{firstPage: 0, pageCount: 10, source: 0}]
    expect(() => composeRuns(parent, [{firstPage: 5, pageCount: 1, source: 1}, {firstPage: 2, pageCount: 1, source: 1}])).toThrow(RangeError)
    expect(() => composeRuns(parent, [{firstPage: 8, pageCount: 3, source: 1}])).toThrow(RangeError)
  })
})

describe('findRun', () => {
  it('finds the run of every page, as the page array says', () => {
    fc.assert(
      fc.property(pageArray(3), (sources) => {
        const runs = runsOf(sources)
        sources.forEach((s, p) => {
          const r = runs[findRun(runs, p)]
          expect(r.source).toBe(s)
          expect(p >= r.firstPage && p < r.firstPage + r.pageCount).toBe(true)
        })
      }),
    )
  })
})

describe('baseRuns', () => {
  it('gives the base (source 0) for data pages and zero for zero pages', () => {
    fc.assert(
      // Single pages, and runs long enough to cover whole bytes of the map.
      fc.property(fc.oneof(fc.array(fc.boolean(), {minLength: 1, maxLength: 200}), fc.array(fc.tuple(fc.boolean(), fc.integer({min: 1, max: 40})), {minLength: 1, maxLength: 30}).map((runs) => runs.flatMap(([zero, n]) => Array<boolean>(n).fill(zero)))), (zeros) => {
        const map = new ZeroMap(zeros.length)
        zeros.forEach((z, p) => z && map.setZero(p))
        expect(expand(baseRuns(map))).toEqual(zeros.map((z) => (z ? SOURCE_ZERO : 0)))
      }),
    )
  })
})

describe('runTableProblem', () => {
  const ok: LayerRun[] = [
    {firstPage: 0, pageCount: 4, source: 0},
    {firstPage: 4, pageCount: 2, source: SOURCE_ZERO},
    {firstPage: 6, pageCount: 4, source: 1},
  ]
  it('accepts a flattened table and names what is wrong with a bad one', () => {
    expect(runTableProblem(ok, 10, 1)).toBeUndefined()
    expect(runTableProblem(ok, 11, 1)).toMatch(/cover 10 of 11/)
    expect(runTableProblem(ok, 9, 1)).toMatch(/past the image/)
    expect(runTableProblem(ok, 10, 0)).toMatch(/source 1/)
    expect(runTableProblem([ok[0], {...ok[2], firstPage: 5}], 10, 1)).toMatch(/starts at page 5, expected 4/)
    expect(runTableProblem([ok[0], {...ok[1], firstPage: 3}], 10, 1)).toMatch(/starts at page 3/)
    expect(runTableProblem([ok[0], {firstPage: 4, pageCount: 0, source: 1}], 4, 1)).toMatch(/empty/)
    expect(runTableProblem([ok[0], {firstPage: 4, pageCount: 6, source: 0}], 10, 1)).toMatch(/not normalised/)
  })

  it('accepts exactly the normalised tables of page arrays', () => {
    fc.assert(
      fc.property(pageArray(3), (sources) => {
        expect(runTableProblem(runsOf(sources), sources.length, 3)).toBeUndefined()
      }),
    )
  })
})

describe('run table encoding', () => {
  const geometry = new Geometry(4096, 65536, 300 * 4096)
  const at = (table: Buffer, count: number, parents = 3) => ({runs: {offset: 4096, length: table.length, crc: crc32(table), count}, parents: Array.from({length: parents}, (_, i) => ({name: `p${i}`, id: '0'.repeat(64)}))})

  it('round-trips and checks its CRC and contents', () => {
    fc.assert(
      fc.property(pageArray(3), (sources) => {
        const runs = runsOf(sources)
        const table = encodeRunTable(runs)
        expect(decodeRunTable(table, at(table, runs.length), sources.length)).toEqual(runs)
      }),
    )
    const runs = runsOf([0, 0, 1, SOURCE_ZERO])
    const table = encodeRunTable(runs)
    const flipped = Buffer.from(table)
    flipped[0] ^= 1
    expect(() => decodeRunTable(flipped, at(table, runs.length), 4)).toThrow(/checksum mismatch/)
    expect(() => decodeRunTable(table, at(table, runs.length, 0), 4)).toThrow(/names source 1/)
    expect(() => decodeRunTable(table, at(table, runs.length), 5)).toThrow(SnapshotFormatError)
  })

  it('checks the location in the metadata before anything is read', () => {
    const good = {runs: {offset: 4096, length: 32, crc: '0000abcd', count: 2}, parents: [{name: 'base.uffd', id: 'a'.repeat(64)}]}
    expect(checkLayerLocation(good, 4096, 8192, geometry)).toEqual({runs: {offset: 4096, length: 32, crc: 0xabcd, count: 2}, parents: good.parents})
    const bad = (patch: object, pattern: RegExp) => expect(() => checkLayerLocation({...good, ...patch}, 4096, 8192, geometry)).toThrow(pattern)
    bad({runs: {...good.runs, length: 31}}, /cannot hold 2 runs/)
    bad({runs: {...good.runs, offset: 8180}}, /outside the data section/)
    bad({runs: {...good.runs, crc: 12}}, /8 hex digits/)
    bad({parents: []}, /1 to 64 ancestors/)
    bad({parents: [{name: '../x', id: 'a'.repeat(64)}]}, /not a file name/)
    bad({parents: [{name: 'x', id: 'abc'}]}, /64 hex digits/)
    expect(() => checkLayerLocation(null, 4096, 8192, geometry)).toThrow(/not an object/)
  })
})

describe('layerPagesProblem', () => {
  /** A layer over one parent: source 1 = its own pages, stored ascending in blocks of 4. */
  function layer(sources: number[]): {runs: LayerRun[]; set: PackedSet; zero: ZeroMap} {
    const own = sources.flatMap((s, p) => (s === 1 ? [p] : []))
    const zero = new ZeroMap(sources.length)
    sources.forEach((s, p) => s === SOURCE_ZERO && zero.setZero(p))
    const blocks = []
    for (let i = 0; i < own.length; i += 4) {
      const n = Math.min(4, own.length - i)
      blocks.push({dataOffset: 4096, storedLength: n * 4096, payloadLength: n * 4096, storedCrc: 0, codec: Codec.Raw, flags: 0, listStart: i, pageCount: n})
    }
    return {runs: runsOf(sources), set: {blocks, pages: Uint32Array.from(own)}, zero}
  }

  it('accepts what the writer makes', () => {
    fc.assert(
      fc.property(pageArray(1), (sources) => {
        const {runs, set, zero} = layer(sources)
        expect(layerPagesProblem(runs, 1, set, zero)).toBeUndefined()
      }),
    )
  })

  it('refuses stored pages the table does not take from this layer, and a zero map that disagrees', () => {
    const {runs, set, zero} = layer([0, 1, 1, SOURCE_ZERO, 1, 0])
    expect(layerPagesProblem(runs, 1, {...set, pages: Uint32Array.from([1, 2, 4, 5])}, zero)).toMatch(/not provided/)
    expect(layerPagesProblem(runs, 1, {...set, pages: Uint32Array.from([1, 4, 2])}, zero)).toMatch(/page 2 comes from this layer/)
    expect(layerPagesProblem(runs, 1, {...set, pages: Uint32Array.from([1, 2])}, zero)).toMatch(/page 4/)
    const wrongZero = new ZeroMap(6)
    expect(layerPagesProblem(runs, 1, set, wrongZero)).toMatch(/page 3 is not zero/)
    wrongZero.setZero(3)
    wrongZero.setZero(0)
    expect(layerPagesProblem(runs, 1, set, wrongZero)).toMatch(/page 0 is zero/)
  })
})

describe('indexOfPage and pagesBySource', () => {
  it('find pages in an ascending list and count what each file provides', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({min: 0, max: 500}), {maxLength: 100}), fc.integer({min: 0, max: 500}), (list, probe) => {
        const pages = Uint32Array.from(list.sort((a, b) => a - b))
        expect(indexOfPage(pages, probe)).toBe(list.indexOf(probe))
      }),
    )
    fc.assert(
      fc.property(pageArray(2), (sources) => {
        const counted = pagesBySource(runsOf(sources), 3)
        expect(counted.pages).toEqual([0, 1, 2].map((s) => sources.filter((x) => x === s).length))
        expect(counted.zero).toBe(sources.filter((x) => x === SOURCE_ZERO).length)
      }),
    )
  })
})

describe('layerIdentity', () => {
  const geometry = new Geometry(4096, 65536, 64 * 4096)
  const parents = [{name: 'base.uffd', id: 'a'.repeat(64)}]
  const runs: LayerRun[] = [
    {firstPage: 0, pageCount: 10, source: 0},
    {firstPage: 10, pageCount: 3, source: 1},
    {firstPage: 13, pageCount: 51, source: SOURCE_ZERO},
  ]
  const set = (dataOffset: number): PackedSet => ({blocks: [{dataOffset, storedLength: 100, payloadLength: 3 * 4096, storedCrc: 0x1234, codec: Codec.Zstd, flags: 0, listStart: 0, pageCount: 3}], pages: Uint32Array.from([10, 11, 12])})
  const zero = new ZeroMap(64)
  for (let p = 13; p < 64; p++) zero.setZero(p)
  const id = layerIdentity(geometry, parents, runs, set(4096), zero.bytes)

  it('is of the content: where the blocks lie does not change it', () => {
    expect(id).toMatch(/^[0-9a-f]{64}$/)
    expect(layerIdentity(geometry, parents, runs, set(999_999), zero.bytes)).toBe(id)
  })

  it('changes with anything that changes what the layer holds', () => {
    fc.assert(
      fc.property(fc.integer({min: 0, max: 5}), fc.integer({min: 1, max: 0xffff}), (what, x) => {
        const s = set(4096)
        let p = parents
        let r = runs
        const z = new ZeroMap(64)
        z.bytes.set(zero.bytes)
        if (what === 0) s.blocks[0].storedCrc ^= x
        if (what === 1) s.blocks[0].storedLength += x
        if (what === 2) s.pages[2] = 12 + x
        if (what === 3) p = [{name: 'base.uffd', id: (x % 10).toString().repeat(64)}]
        if (what === 4) r = [{firstPage: 0, pageCount: 10 + (x % 2), source: 0}, {firstPage: 10 + (x % 2), pageCount: 3 - (x % 2), source: 1}, runs[2]].filter((q) => q.pageCount > 0)
        if (what === 5) z.setZero(x % 13)
        if (what === 4 && x % 2 === 0) r = [{firstPage: 0, pageCount: 13, source: 1}, runs[2]]
        expect(layerIdentity(geometry, p, r, s, z.bytes)).not.toBe(id)
      }),
    )
  })
})
