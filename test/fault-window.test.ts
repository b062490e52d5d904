import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {atLeast, nextWindow, NO_WINDOW, widestWindow, type WindowHistory, windowSizes} from '../src/resume/fault-loop/fault-window.js'

const CHUNK = windowSizes(256 * 1024, 2 * 1024 * 1024, 4096)

/** The windows a sequence of faults gets, in order. */
function windows(pages: number[], sizes = CHUNK, region: [number, number] = [0, 1 << 18]): WindowHistory[] {
  const out: WindowHistory[] = []
  let last = NO_WINDOW
  for (const page of pages) {
    last = nextWindow(last, page, sizes, region[0], region[1])
    out.push(last)
  }
  return out
}

describe('fault-around windows', () => {
  it('atLeast grows a window to a whole aligned unit (a chunk decoded whole), clipped to the region, and leaves a larger one be', () => {
    const frame = {pages: 16, first: 96, end: 112}
    expect(atLeast(frame, 64, 100, 0, 1 << 18)).toEqual({pages: 64, first: 64, end: 128})
    expect(atLeast(frame, 64, 100, 90, 110)).toEqual({pages: 64, first: 90, end: 110})
    const grown = {pages: 128, first: 0, end: 128}
    expect(atLeast(grown, 64, 100, 0, 1 << 18)).toBe(grown)
    fc.assert(
      fc.property(fc.integer({min: 0, max: (1 << 18) - 1}), fc.constantFrom(1, 16, 64, 512), (page, pages) => {
        const w = atLeast(NO_WINDOW, pages, page, 0, 1 << 18)
        expect(w.first).toBeLessThanOrEqual(page)
        expect(w.end).toBeGreaterThan(page)
        expect(w.first % pages).toBe(0)
        expect(w.end - w.first).toBe(pages)
      }),
    )
  })

  it('sizes: the smallest is never above the largest, both at least a page', () => {
    expect(windowSizes(256 * 1024, 2 * 1024 * 1024, 4096)).toEqual({minPages: 64, maxPages: 512})
    expect(windowSizes(4 << 20, 2 << 20, 4096)).toEqual({minPages: 512, maxPages: 512})
    expect(windowSizes(4096, 4096, 2 << 20)).toEqual({minPages: 1, maxPages: 1})
  })

  it('an isolated fault installs its chunk only; faults far apart stay at that size', () => {
    const w = windows([100_000, 3, 50_000, 200_123])
    expect(w.map((x) => x.pages)).toEqual([64, 64, 64, 64])
    expect(w[0]).toEqual({pages: 64, first: 99_968, end: 100_032})
  })

  it('a sequential scan doubles the window up to the largest, each holding the one before', () => {
    // Each fault is on the first page past the last window, as a scan meets them.
    const pages: number[] = []
    let last = NO_WINDOW
    for (let i = 0, page = 0; i < 8; i++) {
      last = nextWindow(last, page, CHUNK, 0, 1 << 18)
      pages.push(last.pages)
      page = last.end
    }
    expect(pages).toEqual([64, 128, 256, 512, 512, 512, 512, 512])
  })

  it('a backward scan grows too, and a jump away starts small again', () => {
    const w = windows([1000, 959, 900, 100_000])
    expect(w.map((x) => x.pages)).toEqual([64, 128, 256, 64])
  })

  it('a fixed window is the aligned window of that size, clipped to the region, whatever came before', () => {
    const fixed = windowSizes(64 * 1024, 64 * 1024, 4096)
    fc.assert(
      fc.property(fc.array(fc.integer({min: 100, max: 10_000}), {minLength: 1, maxLength: 30}), (faults) => {
        for (const w of windows(faults, fixed, [100, 10_001])) {
          expect(w.pages).toBe(16)
        }
        const last = windows(faults, fixed, [100, 10_001]).at(-1)!
        const page = faults.at(-1)!
        expect(last.first).toBe(Math.max(100, page - (page % 16)))
        expect(last.end).toBe(Math.min(10_001, page - (page % 16) + 16))
      }),
    )
  })

  it('every window holds its faulting page, lies in the region, is aligned and between the sizes', () => {
    fc.assert(
      fc.property(
        fc.integer({min: 0, max: 5000}),
        fc.integer({min: 1, max: 20_000}),
        fc.array(fc.nat(), {minLength: 1, maxLength: 60}),
        fc.integer({min: 0, max: 4}),
        fc.integer({min: 0, max: 4}),
        (regionFirst, regionLength, raw, minLog, extraLog) => {
          const sizes = {minPages: 2 ** minLog, maxPages: 2 ** (minLog + extraLog)}
          const regionEnd = regionFirst + regionLength
          const faults = raw.map((r) => regionFirst + (r % regionLength))
          let last = NO_WINDOW
          for (const page of faults) {
            const next = nextWindow(last, page, sizes, regionFirst, regionEnd)
            expect(next.first).toBeLessThanOrEqual(page)
            expect(next.end).toBeGreaterThan(page)
            expect(next.first).toBeGreaterThanOrEqual(regionFirst)
            expect(next.end).toBeLessThanOrEqual(regionEnd)
            expect(next.pages).toBeGreaterThanOrEqual(sizes.minPages)
            expect(next.pages).toBeLessThanOrEqual(sizes.maxPages)
            // Aligned to its size in image pages, unless clipped by the region.
            if (next.first > regionFirst) expect(next.first % next.pages).toBe(0)
            if (next.end < regionEnd) expect(next.end % next.pages).toBe(0)
            // It grows only next to the last window, and then by doubling.
            if (next.pages > sizes.minPages) {
              expect(next.pages).toBe(Math.min(sizes.maxPages, last.pages * 2))
              expect(page >= last.first - last.pages && page < last.end + last.pages).toBe(true)
            }
            last = next
          }
        },
      ),
    )
  })

  it('the widest window is the aligned largest one around the page, clipped to the region', () => {
    expect(widestWindow(1000, CHUNK, 0, 1 << 18)).toEqual({first: 512, end: 1024})
    expect(widestWindow(1000, CHUNK, 700, 900 + 200)).toEqual({first: 700, end: 1024})
    expect(widestWindow(1000, CHUNK, 0, 1010)).toEqual({first: 512, end: 1010})
  })
})
