import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {checkMatches, chunksInTouchOrder, mergeWorkingSets, parseWorkingSet, type WorkingSetFile, WorkingSetRecorder} from '../src/format/working-set.js'

const snapshot = {logicalSize: 1 << 20, pageSize: 4096, headerCrc: 42}
const set = (pages: number[], times = pages.map((_, i) => i), runs = 1): WorkingSetFile => ({kind: 'uffd-working-set', version: 1, snapshot, runs, pages, firstTouchMs: times})

describe('WorkingSetRecorder', () => {
  it('keeps each page once, in first-touch order, across growth', () => {
    const r = new WorkingSetRecorder(5000)
    const touches = Array.from({length: 4000}, (_, i) => (i * 7919) % 3000)
    touches.forEach((p, i) => r.record(p, i / 10))
    const {pages, firstTouchMs} = r.result()
    const oracle = [...new Set(touches)]
    expect(pages).toEqual(oracle)
    expect(firstTouchMs[0]).toBe(0)
    expect(firstTouchMs.length).toBe(pages.length)
  })
})

describe('mergeWorkingSets', () => {
  it('union and majority agree with a counting oracle', () => {
    fc.assert(
      fc.property(fc.array(fc.uniqueArray(fc.integer({min: 0, max: 255}), {maxLength: 60}), {minLength: 1, maxLength: 5}), (runs) => {
        const sets = runs.map((pages) => set(pages))
        const counts = new Map<number, number>()
        for (const pages of runs) for (const p of pages) counts.set(p, (counts.get(p) ?? 0) + 1)
        const union = mergeWorkingSets(sets, 'union')
        expect(new Set(union.pages)).toEqual(new Set(counts.keys()))
        expect(union.runs).toBe(runs.length)
        const majority = mergeWorkingSets(sets, 'majority')
        expect(new Set(majority.pages)).toEqual(new Set([...counts].filter(([, n]) => n * 2 > runs.length).map(([p]) => p)))
        // Ordered by median first touch.
        for (let i = 1; i < union.firstTouchMs.length; i++) expect(union.firstTouchMs[i]).toBeGreaterThanOrEqual(union.firstTouchMs[i - 1])
      }),
      {numRuns: 300},
    )
  })

  it('orders pages by their median first-touch time', () => {
    const merged = mergeWorkingSets([set([1, 2, 3], [0, 10, 20]), set([3, 2, 1], [0, 10, 20]), set([3, 1, 2], [0, 5, 30])], 'union')
    expect(merged.pages).toEqual([3, 1, 2])
  })

  it('refuses sets of different snapshots', () => {
    const other = {...set([1]), snapshot: {...snapshot, headerCrc: 7}}
    expect(() => mergeWorkingSets([set([1]), other], 'union')).toThrow(/different snapshot/)
    // The files' names, as the CLI passes them: which file is the odd one out.
    expect(() => mergeWorkingSets([set([1]), other], 'union', ['run1.ws', 'run2.ws'])).toThrow(expect.objectContaining({code: 'BAD_WORKING_SET', message: expect.stringMatching(/^run2\.ws \(unlike run1\.ws\) was recorded against a different snapshot/)}))
    expect(() => checkMatches(other, snapshot, 'x.ws')).toThrow(/x.ws was recorded against a different snapshot/)
  })
})

describe('parseWorkingSet', () => {
  it('round-trips and rejects malformed files with the reason', () => {
    const good = set([5, 1, 9])
    expect(parseWorkingSet(JSON.stringify(good), 'a.ws')).toEqual(good)
    expect(() => parseWorkingSet('nope', 'a.ws')).toThrow(/a.ws: not JSON/)
    expect(() => parseWorkingSet(JSON.stringify({...good, kind: 'x'}), 'a.ws')).toThrow(/not a uffd working set/)
    expect(() => parseWorkingSet(JSON.stringify({...good, pages: [1, 1], firstTouchMs: [0, 1]}), 'a.ws')).toThrow(/appears twice/)
    expect(() => parseWorkingSet(JSON.stringify({...good, pages: [256], firstTouchMs: [0]}), 'a.ws')).toThrow(/outside/)
    expect(() => parseWorkingSet(JSON.stringify({...good, firstTouchMs: [0]}), 'a.ws')).toThrow(/equal length/)
  })
})

describe('chunksInTouchOrder', () => {
  it('lists each chunk once, in the order its first page was touched', () => {
    expect(chunksInTouchOrder([70, 3, 65, 130, 1, 200], 64)).toEqual([1, 0, 2, 3])
  })
})
