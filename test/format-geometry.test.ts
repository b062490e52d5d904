import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {Geometry, geometryProblem} from '../src/format/geometry.js'
import {pageRuns, payloadPosition, ZeroMap} from '../src/format/zero-map.js'

const pageSizes = fc.constantFrom(4096, 2 * 1024 * 1024)

/** A geometry generator: page size, a valid chunk size for it, and a logical size. */
const geometries = pageSizes.chain((pageSize) =>
  fc.record({
    pageSize: fc.constant(pageSize),
    chunkSize: fc.integer({min: Math.log2(pageSize), max: 22}).map((e) => 2 ** e),
    logicalSize: fc.integer({min: 0, max: 64 * 1024 * 1024}),
  }),
)

describe('Geometry', () => {
  it('agrees with a naive byte-by-byte oracle', () => {
    fc.assert(
      fc.property(geometries, fc.nat(), ({pageSize, chunkSize, logicalSize}, pick) => {
        const g = new Geometry(pageSize, chunkSize, logicalSize)
        // Oracle: walk the image page by page.
        let pages = 0
        for (let at = 0; at < logicalSize; at += pageSize) pages++
        expect(g.pageCount).toBe(pages)
        let chunks = 0
        for (let at = 0; at < logicalSize; at += chunkSize) chunks++
        expect(g.chunkCount).toBe(chunks)
        if (chunks === 0) return
        const c = pick % chunks
        const oraclePages = Array.from({length: pages}, (_, p) => p).filter((p) => Math.floor((p * pageSize) / chunkSize) === c)
        expect(g.firstPageOfChunk(c)).toBe(oraclePages[0])
        expect(g.pagesInChunk(c)).toBe(oraclePages.length)
        expect(g.chunkPaddedLength(c)).toBe(oraclePages.length * pageSize)
        expect(g.chunkLogicalLength(c)).toBe(Math.min(logicalSize, (c + 1) * chunkSize) - c * chunkSize)
        const offset = pick % logicalSize
        expect(g.chunkOfOffset(offset)).toBe(Math.floor(offset / chunkSize))
        expect(g.pageOfOffset(offset)).toBe(Math.floor(offset / pageSize))
      }),
      {numRuns: 2000},
    )
  })

  it('rejects invalid page and chunk sizes with a reason', () => {
    expect(geometryProblem(8192, 65536, 10)).toMatch(/page size/)
    expect(geometryProblem(4096, 3 * 4096, 10)).toMatch(/power of two/)
    expect(geometryProblem(4096, 8 * 1024 * 1024, 10)).toMatch(/4 MiB/)
    expect(geometryProblem(2 * 1024 * 1024, 1024 * 1024, 10)).toMatch(/smaller than the page size/)
    expect(geometryProblem(4096, 4096, -1)).toMatch(/logical size/)
    expect(geometryProblem(4096, 65536, 12345)).toBeUndefined()
  })
})

/** Bits as runs of random lengths (whole bytes of the map all set or clear, and not). */
const runBits = fc.array(fc.tuple(fc.boolean(), fc.integer({min: 1, max: 40})), {maxLength: 30}).map((runs) => runs.flatMap(([zero, n]) => Array<boolean>(n).fill(zero)))

describe('ZeroMap', () => {
  it('fillZero marks exactly the range, whatever its alignment', () => {
    fc.assert(
      fc.property(runBits, fc.nat(), fc.nat(), (bits, a, b) => {
        const map = new ZeroMap(bits.length)
        bits.forEach((zero, p) => zero && map.setZero(p))
        const first = bits.length === 0 ? 0 : a % bits.length
        const count = b % (bits.length - first + 1)
        map.fillZero(first, count)
        bits.forEach((zero, p) => expect(map.isZero(p)).toBe(zero || (p >= first && p < first + count)))
        expect(map.paddingIsClear()).toBe(true)
      }),
    )
  })

  it('stores bits and finds runs like a boolean array does', () => {
    fc.assert(
      fc.property(fc.array(fc.boolean(), {maxLength: 300}), fc.nat(), fc.nat(), (bits, a, b) => {
        const map = new ZeroMap(bits.length)
        bits.forEach((zero, p) => zero && map.setZero(p))
        bits.forEach((zero, p) => expect(map.isZero(p)).toBe(zero))
        expect(map.paddingIsClear()).toBe(true)
        if (bits.length === 0) return
        const first = a % bits.length
        const count = b % (bits.length - first + 1)
        expect(map.countZero(first, count)).toBe(bits.slice(first, first + count).filter(Boolean).length)
        const runs = pageRuns(map, first, count)
        // Runs tile the range exactly, alternate, and match the oracle.
        const rebuilt: boolean[] = []
        runs.forEach((r, i) => {
          if (i > 0) expect(r.zero).not.toBe(runs[i - 1].zero)
          for (let k = 0; k < r.count; k++) rebuilt.push(r.zero)
        })
        expect(rebuilt).toEqual(bits.slice(first, first + count))
      }),
      {numRuns: 1000},
    )
  })

  it('copies chunk-local bits into place', () => {
    const map = new ZeroMap(20)
    map.setRange(5, 10, Uint8Array.of(0b1000_0101, 0b10))
    expect([...Array(20).keys()].filter((p) => map.isZero(p))).toEqual([5, 7, 12, 14])
  })

  it('detects set padding bits', () => {
    const map = new ZeroMap(10, Uint8Array.of(0, 0b0000_0100))
    expect(map.paddingIsClear()).toBe(false)
  })
})

describe('payloadPosition', () => {
  it('gives each non-zero page its position among the non-zero pages of its chunk', () => {
    fc.assert(
      fc.property(fc.array(fc.boolean(), {maxLength: 200}), fc.integer({min: 0, max: 5}), (bits, e) => {
        const pagesPerChunk = 2 ** e
        const map = new ZeroMap(bits.length)
        bits.forEach((zero, p) => zero && map.setZero(p))
        bits.forEach((zero, p) => {
          if (zero) return
          const chunkFirst = p - (p % pagesPerChunk)
          expect(payloadPosition(map, p, pagesPerChunk)).toBe(bits.slice(chunkFirst, p).filter((z) => !z).length)
        })
      }),
      {numRuns: 500},
    )
  })
})
