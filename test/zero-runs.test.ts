import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {largeZeroRuns, ZeroMap} from '../src/format/zero-map.js'

/** The same runs, page by page: maximal zero runs, trimmed to alignment, long enough, the longest kept. */
function oracle(zero: boolean[], minPages: number, align: number, maxRuns: number): {first: number; end: number}[] {
  const runs: {first: number; end: number}[] = []
  for (let p = 0; p < zero.length; ) {
    if (!zero[p]) {
      p++
      continue
    }
    let q = p
    while (q < zero.length && zero[q]) q++
    const first = Math.ceil(p / align) * align
    const end = Math.floor(q / align) * align
    if (end - first >= minPages) runs.push({first, end})
    p = q
  }
  return [...runs]
    .sort((a, b) => b.end - b.first - (a.end - a.first) || a.first - b.first)
    .slice(0, maxRuns)
    .sort((a, b) => a.first - b.first)
}

function mapOf(zero: boolean[]): ZeroMap {
  const map = new ZeroMap(zero.length)
  zero.forEach((z, p) => z && map.setZero(p))
  return map
}

describe('large zero runs', () => {
  it('finds aligned runs of at least the minimum, the longest first when capped', () => {
    const zero = Array.from({length: 4096}, (_, p) => (p >= 100 && p < 1700) || (p >= 2048 && p < 4000) || p === 5)
    expect(largeZeroRuns(mapOf(zero), 512, 512, 10)).toEqual([
      {first: 512, end: 1536},
      {first: 2048, end: 3584},
    ])
    expect(largeZeroRuns(mapOf(zero), 512, 512, 1)).toEqual([{first: 2048, end: 3584}])
    expect(largeZeroRuns(mapOf(zero), 2000, 1, 10)).toEqual([])
  })

  it('agrees with a page-by-page oracle', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.boolean(), fc.integer({min: 1, max: 70})), {maxLength: 40}),
        fc.integer({min: 1, max: 40}),
        fc.constantFrom(1, 2, 4, 8, 16),
        fc.integer({min: 0, max: 6}),
        (pieces, minPages, align, maxRuns) => {
          const zero = pieces.flatMap(([z, n]) => Array.from({length: n}, () => z))
          expect(largeZeroRuns(mapOf(zero), minPages, align, maxRuns)).toEqual(oracle(zero, minPages, align, maxRuns))
        },
      ),
      {numRuns: 500},
    )
  })
})
