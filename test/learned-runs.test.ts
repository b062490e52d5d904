// The pure part of `uffd resume --learn`: the stored form of learned runs, what a run counts as
// touched, and the fold into a majority, against a naive oracle.
import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {Geometry} from '../src/format/geometry.js'
import {type ChunkEntry} from '../src/format/index-table.js'
import {decodeLearnedRuns, encodeLearnedRuns, foldRun, type LearnedRun, learnedSet, MAX_LEARN_RUNS, memoryDigest, touchedInRun} from '../src/format/learned-runs.js'

const identity = {logicalSize: 64 * 4096, pageSize: 4096, headerCrc: 7}
const PAGES = 64

/** A run: distinct pages in some order with non-decreasing times. */
const runArb: fc.Arbitrary<LearnedRun> = fc.uniqueArray(fc.integer({min: 0, max: PAGES - 1}), {maxLength: 40}).chain((pages) =>
  fc.array(fc.integer({min: 0, max: 1000}), {minLength: pages.length, maxLength: pages.length}).map((times) => ({pages, firstTouchMs: times.sort((a, b) => a - b)})),
)

describe('learned runs', () => {
  it('round-trip through their stored form', () => {
    fc.assert(
      fc.property(fc.array(runArb, {maxLength: 6}), (runs) => {
        expect(decodeLearnedRuns(encodeLearnedRuns(runs), 'x', PAGES)).toEqual(runs)
      }),
    )
  })

  it('refuse a malformed stored form, naming the run', () => {
    const bad = (doc: unknown): Buffer => Buffer.from(JSON.stringify(doc))
    const ok = {kind: 'uffd-learned-runs', version: 1}
    expect(() => decodeLearnedRuns(Buffer.from('{'), 'f', PAGES)).toThrow(/f: learned runs are not JSON/)
    expect(() => decodeLearnedRuns(bad({...ok, version: 2, runs: []}), 'f', PAGES)).toThrow(/not learned runs/)
    expect(() => decodeLearnedRuns(bad({...ok, runs: [{pages: [1, 1], firstTouchMs: [0, 0]}]}), 'f', PAGES)).toThrow(/learned run 1: page 1 appears twice/)
    expect(() => decodeLearnedRuns(bad({...ok, runs: [{pages: [PAGES], firstTouchMs: [0]}]}), 'f', PAGES)).toThrow(/outside the snapshot's 64 pages/)
    expect(() => decodeLearnedRuns(bad({...ok, runs: [{pages: [1], firstTouchMs: []}]}), 'f', PAGES)).toThrow(/equal length/)
    expect(() => decodeLearnedRuns(bad({...ok, runs: [{pages: [1], firstTouchMs: ['0']}]}), 'f', PAGES)).toThrow(/not a non-negative number/)
    expect(() => decodeLearnedRuns(bad({...ok, runs: Array.from({length: MAX_LEARN_RUNS + 1}, () => ({pages: [], firstTouchMs: []}))}), 'f', PAGES)).toThrow(/more than/)
  })

  it('count a run as touching what faulted and what it was handed, each page once at its earliest time', () => {
    fc.assert(
      fc.property(runArb, runArb, (faulted, prefetched) => {
        const run = touchedInRun(faulted, prefetched)
        const expected = new Map<number, number>()
        prefetched.pages.forEach((p, i) => expected.set(p, prefetched.firstTouchMs[i]))
        faulted.pages.forEach((p, i) => expected.set(p, Math.min(expected.get(p) ?? Infinity, faulted.firstTouchMs[i])))
        expect(new Map(run.pages.map((p, i) => [p, run.firstTouchMs[i]]))).toEqual(expected)
        expect(run.firstTouchMs).toEqual([...run.firstTouchMs].sort((a, b) => a - b))
      }),
    )
  })

  it('fold into the majority of the last `keep` runs', () => {
    fc.assert(
      fc.property(fc.array(runArb, {maxLength: 7}), runArb, fc.integer({min: 1, max: 7}), (history, run, keep) => {
        const {runs, set} = foldRun(history, run, keep, identity)
        expect(runs).toEqual([...history, run].slice(-keep))
        // Oracle: count each page's runs.
        const counts = new Array<number>(PAGES).fill(0)
        for (const r of runs) for (const p of r.pages) counts[p]++
        const majority = counts.flatMap((n, p) => (n * 2 > runs.length ? [p] : []))
        expect([...set.pages].sort((a, b) => a - b)).toEqual(majority)
        expect(set.runs).toBe(runs.length)
      }),
    )
    expect(learnedSet([], identity).pages).toEqual([])
    expect(() => foldRun([], {pages: [], firstTouchMs: []}, 0, identity)).toThrow(RangeError)
  })

  it('digest the memory, not where it is stored', () => {
    const geometry = new Geometry(4096, 8192, 4 * 4096)
    const entry = (dataOffset: number, storedCrc: number): ChunkEntry => ({dataOffset, storedLength: 100, payloadLength: 8192, storedCrc, codec: Codec.Zstd, flags: 0})
    const zero = new Uint8Array([0])
    const a = memoryDigest(geometry, [entry(100, 1), entry(200, 2)], zero)
    expect(memoryDigest(geometry, [entry(5000, 1), entry(100, 2)], zero)).toBe(a)
    expect(memoryDigest(geometry, [entry(100, 1), entry(200, 3)], zero)).not.toBe(a)
    expect(memoryDigest(geometry, [entry(100, 1), entry(200, 2)], new Uint8Array([1]))).not.toBe(a)
  })
})
