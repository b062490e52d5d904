// Unit tests of the pure parts of `uffd resume`: the Firecracker handshake parser and validator,
// the address map (client address -> image offset) and page states, and the latency histogram
// of the run statistics. Each is checked against a naive oracle with fast-check.
import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {Geometry} from '../src/format/geometry.js'
import {AddressMap} from '../src/resume/fault-loop/address-map.js'
import {PAGE_MISSING, PAGE_PRESENT, PAGE_REMOVED, PageStates} from '../src/resume/fault-loop/page-states.js'
import {type GuestRegion, HandshakeError, MAX_HANDSHAKE_BYTES, parseHandshake, validateRegions} from '../src/resume/main/handshake.js'
import {BUCKETS, bucketOf, bucketUpperUs, buildReport, clampPercentile, percentileUs, RunStats} from '../src/resume/run-stats.js'

const PAGE = 4096
const HUGE = 2 * 1024 * 1024
const MiB = 1024 * 1024

type Shape = '1.1' | '1.7' | '1.12'

/** The JSON a Firecracker of `shape` sends for these regions (serde field order), optionally with fork fields. */
function handshakeJson(regions: readonly GuestRegion[], shape: Shape, extraFields = false): string {
  const parts = regions.map((r) => {
    const fields: string[] = []
    if (extraFields) fields.push(`"gpa_start":${r.offset}`)
    fields.push(`"base_host_virt_addr":${r.baseHostVirtAddr}`, `"size":${r.size}`, `"offset":${r.offset}`)
    if (shape === '1.12') fields.push(`"page_size":${r.pageSize}`)
    if (shape !== '1.1') fields.push(`"page_size_kib":${r.pageSize}`)
    if (extraFields) fields.push('"is_guest_memfd":false')
    return `{${fields.join(',')}}`
  })
  return `[${parts.join(',')}]`
}

/** parseHandshake must throw a HandshakeError whose message contains `text`. */
function expectRejected(run: () => unknown, text: string | RegExp): void {
  let error: unknown
  try {
    run()
  } catch (caught) {
    error = caught
  }
  expect(error, 'expected a HandshakeError').toBeInstanceOf(HandshakeError)
  expect((error as HandshakeError).code).toBe('BAD_HANDSHAKE')
  expect((error as Error).message).toMatch(/^invalid handshake: /)
  if (typeof text === 'string') expect((error as Error).message).toContain(text)
  else expect((error as Error).message).toMatch(text)
}

const region = (baseHostVirtAddr: number, size: number, offset: number, pageSize = PAGE): GuestRegion => ({baseHostVirtAddr, size, offset, pageSize})

describe('parseHandshake', () => {
  // Firecracker's documented example: a 3 GiB region below the MMIO gap and one above it.
  const base = 140393563471872
  const twoRegions = [region(base, 3 * 1024 * MiB, 0), region(base + 4 * 1024 * MiB, 1024 * MiB, 3 * 1024 * MiB)]

  it('reads the v1.1 shape (no page size: 4 KiB)', () => {
    expect(parseHandshake(handshakeJson(twoRegions, '1.1'))).toEqual(twoRegions)
  })

  it('reads the v1.7 shape (page_size_kib, which holds bytes)', () => {
    const huge = twoRegions.map((r) => ({...r, pageSize: HUGE}))
    expect(parseHandshake(handshakeJson(huge, '1.7'))).toEqual(huge)
  })

  it('reads the v1.12 shape, preferring page_size over page_size_kib', () => {
    expect(parseHandshake(handshakeJson(twoRegions, '1.12'))).toEqual(twoRegions)
    const json = `[{"base_host_virt_addr":${base},"size":4096,"offset":0,"page_size":2097152,"page_size_kib":4096}]`
    expect(parseHandshake(json)[0].pageSize).toBe(HUGE)
  })

  it('ignores unknown fields added by forks, and reads a Buffer', () => {
    expect(parseHandshake(Buffer.from(handshakeJson(twoRegions, '1.12', true)))).toEqual(twoRegions)
    expect(parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0,"future":{"nested":[1,2]}}]')).toEqual([region(4096, 4096, 0)])
  })

  it('keeps user-space addresses exact (no precision lost below 2^53)', () => {
    const top = 0x7fff_ffff_f000 // highest 4 KiB page of a 47-bit address space
    expect(parseHandshake(`[{"base_host_virt_addr":${top},"size":4096,"offset":0}]`)[0].baseHostVirtAddr).toBe(top)
  })

  it('takes a null page_size as absent', () => {
    expect(parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":null,"page_size_kib":2097152}]')[0].pageSize).toBe(HUGE)
  })

  it('rejects what is not a JSON array of region objects, saying what is wrong', () => {
    expectRejected(() => parseHandshake('this is not JSON {'), /not JSON .*"this is not JSON \{"/)
    expectRejected(() => parseHandshake(''), 'not JSON')
    expectRejected(() => parseHandshake('{"base_host_virt_addr":4096,"size":4096,"offset":0}'), 'expected a JSON array of memory regions')
    expectRejected(() => parseHandshake('[]'), 'no memory regions')
    expectRejected(() => parseHandshake('[null]'), 'region 0 is not an object')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0},[1]]'), 'region 1 is not an object')
    expectRejected(() => parseHandshake('[42]'), 'region 0 is not an object')
  })

  it('rejects missing and non-integer fields, naming the region and the field', () => {
    expectRejected(() => parseHandshake('[{"size":4096,"offset":0}]'), 'region 0 has no "base_host_virt_addr"')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0},{"base_host_virt_addr":8192,"offset":4096}]'), 'region 1 has no "size"')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096}]'), 'region 0 has no "offset"')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":"4096","size":4096,"offset":0}]'), 'region 0 "base_host_virt_addr" is "4096", not a non-negative integer')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":-4096,"offset":0}]'), '"size" is -4096')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096.5,"offset":0}]'), '"size" is 4096.5')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":"4K"}]'), '"page_size" is "4K"')
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":true}]'), '"page_size_kib" is true')
  })

  it('rejects numbers that JSON.parse would round (fc_client --malformed huge-size)', () => {
    // 2^64 - 4096: page-aligned, but not representable; rounding it would make a bogus size.
    expectRejected(() => parseHandshake('[{"base_host_virt_addr":4096,"size":18446744073709547520,"offset":0}]'), 'not a non-negative integer below 2^53')
    expectRejected(() => parseHandshake(`[{"base_host_virt_addr":${2 ** 53},"size":4096,"offset":0}]`), 'below 2^53')
  })

  it('rejects too many regions and too long messages', () => {
    const many = Array.from({length: 1025}, (_, i) => region(i * 2 * PAGE + PAGE, PAGE, i * PAGE))
    expectRejected(() => parseHandshake(handshakeJson(many, '1.1')), '1025 regions is more than 1024')
    expectRejected(() => parseHandshake(`[${' '.repeat(MAX_HANDSHAKE_BYTES)}]`), 'too long')
  })
})

describe('validateRegions', () => {
  const geometry = new Geometry(PAGE, 65536, 8 * MiB)

  it('accepts regions in any order and returns them sorted by address', () => {
    const a = region(0x7f00_0000_0000, 4 * MiB, 0)
    const b = region(0x7e00_0000_0000, 4 * MiB, 4 * MiB)
    expect(validateRegions([a, b], geometry)).toEqual([b, a])
  })

  it('accepts regions covering less than the snapshot, and up to the padded last page', () => {
    expect(validateRegions([region(PAGE, PAGE, 0)], geometry)).toHaveLength(1)
    const odd = new Geometry(PAGE, 65536, 8 * MiB + 1)
    expect(validateRegions([region(PAGE, 8 * MiB + PAGE, 0)], odd)).toHaveLength(1)
  })

  it('rejects page sizes that are not 4 KiB or 2 MiB, or that differ between regions', () => {
    expectRejected(() => validateRegions([region(PAGE, PAGE, 0, 8192)], geometry), 'region 0 has page size 8192, expected 4096 or 2097152')
    expectRejected(() => validateRegions([region(PAGE, PAGE, 0, 0)], geometry), 'region 0 has page size 0')
    expectRejected(() => validateRegions([region(HUGE, HUGE, 0), region(2 * HUGE, HUGE, HUGE, HUGE)], geometry), 'regions use different page sizes (4096 and 2097152)')
  })

  it('rejects empty and unaligned regions, naming the field', () => {
    expectRejected(() => validateRegions([region(PAGE, 0, 0)], geometry), 'region 0 is empty')
    expectRejected(() => validateRegions([region(PAGE + 2048, PAGE, 0)], geometry), 'region 0 base_host_virt_addr 6144 is not a multiple of the page size 4096')
    expectRejected(() => validateRegions([region(PAGE, PAGE + 1, 0)], geometry), 'region 0 size 4097 is not a multiple')
    expectRejected(() => validateRegions([region(PAGE, PAGE, 0), region(4 * PAGE, PAGE, 100)], geometry), 'region 1 offset 100 is not a multiple')
    expectRejected(() => validateRegions([region(HUGE + PAGE, HUGE, 0, HUGE)], new Geometry(HUGE, HUGE, 8 * MiB)), 'is not a multiple of the page size 2097152')
  })

  it('rejects a page size other than the snapshot\'s', () => {
    expectRejected(() => validateRegions([region(HUGE, HUGE, 0, HUGE)], geometry), 'the VMM uses 2097152-byte pages but the snapshot was taken with 4096-byte pages')
    expectRejected(() => validateRegions([region(PAGE, PAGE, 0)], new Geometry(HUGE, HUGE, 8 * MiB)), 'the VMM uses 4096-byte pages but the snapshot was taken with 2097152-byte pages')
  })

  it('rejects overlaps in the address space and in the memory file', () => {
    expectRejected(() => validateRegions([region(PAGE, 2 * PAGE, 0), region(2 * PAGE, PAGE, 2 * PAGE)], geometry), 'two regions overlap in the VMM address space')
    expectRejected(() => validateRegions([region(PAGE, 2 * PAGE, 0), region(16 * PAGE, PAGE, PAGE)], geometry), 'two regions overlap in the memory file')
  })

  it('rejects regions that need more memory than the snapshot holds', () => {
    expectRejected(() => validateRegions([region(PAGE, 16 * MiB, 0)], geometry), 'regions need 16777216 bytes of memory but the snapshot holds 8388608')
    expectRejected(() => validateRegions([region(PAGE, PAGE, 8 * MiB)], geometry), 'regions need 8392704 bytes')
  })
})

/**
 * Random valid region sets: page-aligned, non-overlapping in the address space (gaps between
 * them, shuffled order) and packed as a running sum of sizes in the file, like Firecracker's.
 */
const regionSets = fc
  .record({
    pageSize: fc.constantFrom(PAGE, HUGE),
    regions: fc.array(fc.record({pages: fc.integer({min: 1, max: 64}), gapPages: fc.integer({min: 0, max: 1000})}), {minLength: 1, maxLength: 8}),
    startPage: fc.integer({min: 0, max: 2 ** 20}),
    order: fc.array(fc.nat(), {minLength: 8, maxLength: 8}),
  })
  .map(({pageSize, regions, startPage, order}) => {
    let address = startPage * pageSize
    let offset = 0
    const out: GuestRegion[] = []
    for (const r of regions) {
      address += r.gapPages * pageSize
      out.push({baseHostVirtAddr: address, size: r.pages * pageSize, offset, pageSize})
      address += r.pages * pageSize
      offset += r.pages * pageSize
    }
    // A deterministic shuffle driven by `order`: the VMM may list regions in any order.
    const shuffled = out.map((r, i) => ({r, key: order[i % order.length] * 16 + i})).sort((a, b) => a.key - b.key).map((x) => x.r)
    return {pageSize, regions: shuffled, total: offset}
  })

describe('handshake round trip (property)', () => {
  it('every shape of a random valid region set parses back to it and validates', () => {
    fc.assert(
      fc.property(regionSets, fc.constantFrom<Shape>('1.1', '1.7', '1.12'), fc.boolean(), fc.nat(), ({regions, total}, shape, extra, slack) => {
        // v1.1 sends no page size: only 4 KiB guests could use it.
        const sent = shape === '1.1' ? regions.map((r) => ({...r, pageSize: PAGE})) : regions
        const parsed = parseHandshake(handshakeJson(sent, shape, extra))
        expect(parsed).toEqual(sent)
        const page = sent[0].pageSize
        const validated = validateRegions(parsed, new Geometry(page, Math.max(page, 65536), total + (slack % 4) * page))
        expect(validated).toEqual([...sent].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr))
      }),
      {numRuns: 300},
    )
  })

  it('a region set one page too big for the snapshot is refused', () => {
    fc.assert(
      fc.property(regionSets, ({pageSize, regions, total}) => {
        expectRejected(() => validateRegions(regions, new Geometry(pageSize, pageSize, total - pageSize)), `regions need ${total} bytes`)
      }),
      {numRuns: 100},
    )
  })
})

describe('AddressMap', () => {
  /** The oracle: scan every region. */
  function naiveLocate(regions: readonly GuestRegion[], address: number): {region: GuestRegion; imageOffset: number} | undefined {
    for (const r of regions) {
      if (address >= r.baseHostVirtAddr && address < r.baseHostVirtAddr + r.size) return {region: r, imageOffset: r.offset + address - r.baseHostVirtAddr}
    }
    return undefined
  }

  it('locates like a naive scan, for addresses inside, between, before and after regions, in any query order', () => {
    fc.assert(
      fc.property(regionSets, fc.array(fc.tuple(fc.nat(), fc.integer({min: -2, max: 2}), fc.nat()), {minLength: 1, maxLength: 60}), ({regions}, queries) => {
        const map = new AddressMap(regions)
        const lowest = Math.min(...regions.map((r) => r.baseHostVirtAddr))
        const highest = Math.max(...regions.map((r) => r.baseHostVirtAddr + r.size))
        for (const [pick, edge, within] of queries) {
          // Mostly addresses at and around region boundaries, where off-by-one errors live.
          const r = regions[pick % regions.length]
          const candidates = [
            r.baseHostVirtAddr + edge,
            r.baseHostVirtAddr + r.size + edge,
            r.baseHostVirtAddr + (within % r.size),
            lowest - 1 - (within % 4096),
            highest + (within % 4096),
            lowest + (within % (highest - lowest + 1)),
          ]
          for (const address of candidates) {
            if (address < 0) continue
            const got = map.locate(address)
            const want = naiveLocate(regions, address)
            if (want === undefined) expect(got, `address ${address}`).toBeUndefined()
            else expect(got, `address ${address}`).toEqual(want)
          }
        }
      }),
      {numRuns: 300},
    )
  })

  it('lists regions sorted by address with their image page ranges', () => {
    fc.assert(
      fc.property(regionSets, ({pageSize, regions}) => {
        const map = new AddressMap(regions)
        const sorted = [...regions].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr)
        expect(map.all).toEqual(sorted)
        expect(map.imagePageRanges(pageSize)).toEqual(sorted.map((region) => ({region, firstPage: region.offset / pageSize, endPage: (region.offset + region.size) / pageSize})))
      }),
    )
  })
})

describe('PageStates', () => {
  it('tracks missing/present/removed pages and the present count like an array oracle', () => {
    const op = fc.record({kind: fc.constantFrom('present', 'removed'), first: fc.nat({max: 199}), count: fc.integer({min: 0, max: 40})})
    fc.assert(
      fc.property(fc.array(op, {maxLength: 60}), (ops) => {
        const pages = 200
        const states = new PageStates(pages)
        const oracle: number[] = Array.from({length: pages}, () => PAGE_MISSING)
        for (const {kind, first, count} of ops) {
          const n = Math.min(count, pages - first)
          expect(states.allMissing(first, n)).toBe(oracle.slice(first, first + n).every((s) => s === PAGE_MISSING))
          if (kind === 'present') states.markPresent(first, n)
          else states.markRemoved(first, n)
          for (let p = first; p < first + n; p++) oracle[p] = kind === 'present' ? PAGE_PRESENT : PAGE_REMOVED
          expect(states.presentCount).toBe(oracle.filter((s) => s === PAGE_PRESENT).length)
          expect(states.settledCount).toBe(oracle.filter((s) => s !== PAGE_MISSING).length)
        }
        expect(Array.from({length: pages}, (_, p) => states.get(p))).toEqual(oracle)
      }),
      {numRuns: 300},
    )
  })

  it('starts with every page missing', () => {
    const states = new PageStates(10)
    expect(states.presentCount).toBe(0)
    expect(Array.from({length: 10}, (_, p) => states.get(p))).toEqual(Array(10).fill(PAGE_MISSING))
  })
})

describe('latency histogram', () => {
  /** Every bucket's [lower, upper) bounds, from the documented layout: 8 per power of two from 1 µs. */
  const bounds = Array.from({length: BUCKETS}, (_, b) => {
    const octave = Math.floor(b / 8)
    const sub = b % 8
    return {lower: 2 ** octave * (1 + sub / 8), upper: 2 ** octave * (1 + (sub + 1) / 8)}
  })

  /** The oracle: the bucket whose bounds hold `us` (below 1 µs: the first; beyond the last: the last). */
  function naiveBucket(us: number): number {
    if (us < bounds[0].upper) return 0
    for (let b = 0; b < BUCKETS; b++) if (us >= bounds[b].lower && us < bounds[b].upper) return b
    return BUCKETS - 1
  }

  const latencies = fc.oneof(
    fc.double({min: 0, max: 2 ** 27, noNaN: true}),
    fc.integer({min: 0, max: 100_000}),
    // Exactly on bucket bounds and a hair either side of them.
    fc.tuple(fc.integer({min: 0, max: BUCKETS - 1}), fc.constantFrom(-1e-9, 0, 1e-9)).map(([b, d]) => Math.max(0, bounds[b].lower * (1 + d))),
  )

  it('bucketOf agrees with the bucket bounds', () => {
    fc.assert(
      fc.property(latencies, (us) => {
        expect(bucketOf(us)).toBe(naiveBucket(us))
      }),
      {numRuns: 2000},
    )
    expect(bucketOf(0)).toBe(0)
    expect(bucketOf(1)).toBe(0)
    expect(bucketOf(2)).toBe(8)
    expect(bucketOf(2 ** 40)).toBe(BUCKETS - 1)
  })

  it('bucketUpperUs is the upper bound of the bucket', () => {
    for (let b = 0; b < BUCKETS; b++) expect(bucketUpperUs(b)).toBe(bounds[b].upper)
  })

  it('percentileUs is the upper bound of the bucket holding the rank-th smallest sample (sorted-array oracle)', () => {
    fc.assert(
      fc.property(fc.array(fc.double({min: 1, max: 2 ** 25, noNaN: true}), {minLength: 1, maxLength: 300}), fc.double({min: 0.001, max: 1, noNaN: true}), (samples, q) => {
        const histogram = new Float64Array(BUCKETS)
        for (const us of samples) histogram[bucketOf(us)]++
        const sorted = [...samples].sort((a, b) => a - b)
        const exact = sorted[Math.ceil(q * sorted.length) - 1]
        const got = percentileUs(histogram, q)!
        expect(got).toBe(bucketUpperUs(naiveBucket(exact)))
        // Never below the exact percentile and at most one bucket (12.5%) above it.
        expect(got).toBeGreaterThan(exact)
        expect(got).toBeLessThanOrEqual(exact * 1.125 + 1e-9)
      }),
      {numRuns: 500},
    )
  })

  it('percentileUs of an empty histogram is null; p100 is the largest sample\'s bucket', () => {
    expect(percentileUs(new Float64Array(BUCKETS), 0.5)).toBeNull()
    const h = new Float64Array(BUCKETS)
    h[bucketOf(3)]++
    h[bucketOf(1000)]++
    expect(percentileUs(h, 1)).toBe(bucketUpperUs(bucketOf(1000)))
    expect(percentileUs(h, 0.5)).toBe(bucketUpperUs(bucketOf(3)))
  })
})

describe('RunStats and buildReport', () => {
  it('shares counters through the SharedArrayBuffer and reports them', () => {
    const writer = new RunStats()
    const reader = new RunStats(writer.buffer) // the main thread's view of the worker's counters
    writer.add('faults', 3)
    writer.add('faultsData', 2)
    writer.add('faultsZero')
    writer.add('pagesCopied', 32)
    writer.add('cacheHits', 3)
    writer.add('cacheMisses')
    writer.set('firstFaultMs', 5)
    writer.set('lastFaultMs', 9)
    for (const us of [10, 20, 3000]) writer.recordLatency(us)
    const started = new Date(1_000_000)
    const report = buildReport(reader, 'vm.uffd', started, 1_000_250)
    expect(report).toMatchObject({
      kind: 'uffd-resume-stats', version: 1, snapshot: 'vm.uffd', startedAt: started.toISOString(), durationMs: 250,
      faults: {total: 3, data: 2, zero: 1}, pages: {copied: 32},
      chunks: {cacheHits: 3, cacheMisses: 1, hitRate: 0.75},
      timeToFirstFaultMs: 5, timeToLastFaultMs: 9,
    })
    expect(report.latencyUs.max).toBe(3000)
    expect(report.latencyUs.mean).toBeCloseTo(3030 / 3)
    expect(report.latencyUs.p50).toBe(bucketUpperUs(bucketOf(20)))
    // The bucket bound of 3000 lies above the observed max: reported percentiles never exceed it.
    expect(bucketUpperUs(bucketOf(3000))).toBeGreaterThan(3000)
    expect(report.latencyUs.p99).toBe(3000)
    expect(report.latencyUs.p90).toBe(3000)
  })

  it('never reports a percentile below the min or above the max, whatever the samples', () => {
    // From below 1 µs (bucket 0) to past 2^26 µs (the last bucket, whose bound lies below them).
    const latency = fc.oneof(fc.double({min: 0, max: 2 ** 25, noNaN: true}), fc.double({min: 2 ** 25, max: 2 ** 32, noNaN: true}))
    fc.assert(
      fc.property(fc.array(latency, {minLength: 1, maxLength: 200}), (samples) => {
        const stats = new RunStats()
        for (const us of samples) {
          stats.add('faults')
          stats.recordLatency(us)
        }
        const l = buildReport(stats, 's', new Date(0), 0).latencyUs
        expect(l.min).toBe(Math.min(...samples))
        expect(l.max).toBe(Math.max(...samples))
        expect(l.min!).toBeLessThanOrEqual(l.p50!)
        expect(l.p50!).toBeLessThanOrEqual(l.p90!)
        expect(l.p90!).toBeLessThanOrEqual(l.p99!)
        expect(l.p99!).toBeLessThanOrEqual(l.max!)
      }),
      {numRuns: 300},
    )
  })

  it('clamps up to the min where the last bucket lies below every sample', () => {
    const stats = new RunStats()
    for (const us of [1e8, 2e8, 3e8]) {
      stats.add('faults')
      stats.recordLatency(us)
    }
    // The unclamped percentile: the last bucket's bound, below the fastest fault.
    expect(percentileUs(stats.histogram, 0.5)).toBeLessThan(1e8)
    expect(buildReport(stats, 's', new Date(0), 0).latencyUs).toMatchObject({min: 1e8, p50: 1e8, p90: 1e8, p99: 1e8, max: 3e8})
  })

  it('clampPercentile bounds a percentile by whichever of min and max is known', () => {
    expect(clampPercentile(5, 10, 20)).toBe(10)
    expect(clampPercentile(25, 10, 20)).toBe(20)
    expect(clampPercentile(15, 10, 20)).toBe(15)
    expect(clampPercentile(5, null, 20)).toBe(5)
    expect(clampPercentile(25, 10, null)).toBe(25)
    expect(clampPercentile(null, 10, 20)).toBeNull()
  })

  it('a view of the counters (another thread\'s) does not reset the min', () => {
    const writer = new RunStats()
    writer.add('faults')
    writer.recordLatency(0)
    const reader = new RunStats(writer.buffer)
    writer.add('faults')
    writer.recordLatency(50)
    expect(buildReport(reader, 's', new Date(0), 0).latencyUs).toMatchObject({min: 0, max: 50})
  })

  it('reports nulls, not zeros, when nothing was served', () => {
    const report = buildReport(new RunStats(), 's', new Date(0), 0)
    expect(report.latencyUs).toEqual({p50: null, p90: null, p99: null, min: null, max: null, mean: null})
    expect(report.chunks.hitRate).toBeNull()
    expect(report.timeToFirstFaultMs).toBeNull()
  })
})
