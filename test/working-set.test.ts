import fs from 'node:fs'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {checkMatches, chunksInTouchOrder, mergeWorkingSets, parseWorkingSet, type WorkingSetFile, WorkingSetRecorder} from '../src/format/working-set.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

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

describe('uffd working-set merge', () => {
  let dir: string
  let image: string
  let snap: string
  let recordings: string[]
  let sets: WorkingSetFile[]
  beforeAll(async () => {
    dir = tempDir('uffd-ws-merge-test-')
    image = path.join(dir, 'guest.mem')
    fs.writeFileSync(image, makeImage('mixed', 1 << 20, 9))
    snap = path.join(dir, 'guest.uffd')
    // Framed (16 KiB frames in 64 KiB chunks): attaching must keep them framed.
    await writeSnapshot(memFileInput(image), snap, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1, frameSize: 16384})
    const reader = SnapshotReader.open(snap)
    const identity = {logicalSize: reader.geometry.logicalSize, pageSize: 4096, headerCrc: reader.header.headerCrc}
    reader.close()
    // Three runs as --record writes them: page 200 touched by one run only, the others by all three.
    const runs = [
      [10, 11, 12, 200],
      [11, 10, 12],
      [10, 12, 11, 13],
    ]
    sets = runs.map((pages) => ({kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, pages, firstTouchMs: pages.map((_, i) => i * 2.5)}))
    recordings = sets.map((set, i) => {
      const file = path.join(dir, `run${i + 1}.ws`)
      fs.writeFileSync(file, `${JSON.stringify(set)}\n`)
      return file
    })
  })
  afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

  it('writes the majority of the runs by default, as mergeWorkingSets computes it, and says so', () => {
    const out = path.join(dir, 'majority.ws')
    const r = uffd(['working-set', 'merge', ...recordings, '-o', out])
    expect(r.status, r.stderr).toBe(0)
    const expected = mergeWorkingSets(sets, 'majority')
    expect([...expected.pages].sort((a, b) => a - b)).toEqual([10, 11, 12])
    expect(r.stdout).toBe(`${out}: 3 pages from 3 runs (majority)\n`)
    expect(JSON.parse(fs.readFileSync(out, 'utf8'))).toEqual(expected)
    // Page numbers and timings only: the umask's default, not a snapshot's 0600.
    expect(fs.statSync(out).mode & 0o777).toBe(0o644 & ~process.umask())
  })

  it('--mode union keeps every page, --json reports the result, and an existing output is replaced', () => {
    const out = path.join(dir, 'union.ws')
    fs.writeFileSync(out, 'old contents')
    const r = uffd(['working-set', 'merge', ...recordings, '--mode', 'union', '-o', out, '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(r.json).toEqual({output: out, runs: 3, pages: 5, mode: 'union'})
    const merged = parseWorkingSet(fs.readFileSync(out, 'utf8'), out)
    expect([...merged.pages].sort((a, b) => a - b)).toEqual([10, 11, 12, 13, 200])
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([])
  })

  it('the merged set attaches to its snapshot, which still verifies against the image', () => {
    const out = path.join(dir, 'attach.ws')
    expect(uffd(['working-set', 'merge', ...recordings, '-o', out]).status).toBe(0)
    const attached = path.join(dir, 'attached.uffd')
    const a = uffd(['working-set', 'attach', snap, out, '-o', attached, '--json'])
    expect(a.status, a.stderr).toBe(0)
    expect(a.json).toMatchObject({output: attached, pages: 3})
    const v = uffd(['verify', attached, '--against', image, '--json'])
    expect(v.json, v.stdout).toMatchObject({ok: true})
    // Its chunks are copied as they are stored: framed ones stay framed, and the file says so.
    const frameSize = (file: string): number => uffd(['stats', file, '--json']).json.frameSize
    expect(frameSize(snap)).toBe(16384)
    expect(frameSize(attached)).toBe(16384)
  })

  it("a set of another snapshot or a malformed file is BAD_WORKING_SET naming the file, and nothing is written", () => {
    const other = path.join(dir, 'other.ws')
    fs.writeFileSync(other, JSON.stringify({...sets[0], snapshot: {...sets[0].snapshot, headerCrc: (sets[0].snapshot.headerCrc + 1) >>> 0}}))
    const out = path.join(dir, 'never.ws')
    const mismatch = uffd(['working-set', 'merge', recordings[0], other, '-o', out, '--json'])
    expect(mismatch.status).toBe(1)
    expect(mismatch.json.error).toMatchObject({code: 'BAD_WORKING_SET', message: expect.stringMatching(new RegExp(`^${other} \\(unlike ${recordings[0]}\\) was recorded against a different snapshot`))})
    const broken = path.join(dir, 'broken.ws')
    fs.writeFileSync(broken, '{"kind": "uffd-working-set", ')
    const text = uffd(['working-set', 'merge', recordings[0], broken, '-o', out])
    expect(text.status).toBe(1)
    expect(text.stderr).toMatch(new RegExp(`^uffd working-set merge: ${broken}: not JSON`))
    expect(fs.existsSync(out)).toBe(false)
  })

  it('resume with a set of another snapshot is BAD_WORKING_SET before it listens, with or without decoders', () => {
    const other = path.join(dir, 'other-resume.ws')
    fs.writeFileSync(other, JSON.stringify({...sets[0], snapshot: {...sets[0].snapshot, headerCrc: (sets[0].snapshot.headerCrc + 1) >>> 0}}))
    for (const decoders of ['0', '2']) {
      const r = uffd(['resume', snap, '--socket', path.join(dir, `bad-${decoders}.sock`), '--working-set', other, '--decoders', decoders, '--timeout', '5', '--json'])
      expect(r.status, `--decoders ${decoders}`).toBe(1)
      expect(r.json.error).toMatchObject({code: 'BAD_WORKING_SET'})
      expect(r.stderr, `--decoders ${decoders}: nobody was told to connect`).not.toContain('listening on')
    }
  })

  it('without -o it is a USAGE error, and its help names it as typed', () => {
    const r = uffd(['working-set', 'merge', ...recordings, '--json'])
    expect(r.status).toBe(2)
    expect(r.json.error).toMatchObject({code: 'USAGE', exitCode: 2})
    const help = uffd(['working-set', 'merge', '--help'])
    expect(help.stdout).toMatch(/\$ uffd working-set merge FILES\.\.\. -o <value>/)
    expect(`${help.stdout}${uffd(['working-set', '--help']).stdout}`).not.toMatch(/working-set:/)
  })
})
