// A bounded, seeded fuzz run of everything that reads untrusted files (the engine and what counts
// as a crash: test/helpers/fuzz.ts). A longer run is bench/fuzz.ts (docs/BENCHMARKS.md). A
// failure names the seed and case; UFFD_FUZZ_SEED=N runs another seed, and `node --import tsx
// bench/fuzz.ts --seed N --from CASE --snapshots 1 --working-sets 0 --stats-files 0 --cli 0`
// runs one snapshot case again.
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {SnapshotReader} from '../src/snapshot/reader.js'
import {verifySnapshot} from '../src/snapshot/inspect.js'
import {checkAttach, checkCli, checkMoved, checkSnapshot, checkStatsFile, checkWorkingSet, type Corpus, jsonCase, makeCorpus, movedUnitCase, Rng, runCase, snapshotCase, Tally} from './helpers/fuzz.js'
import {tempDir} from './helpers/images.js'

const SEED = Number(process.env.UFFD_FUZZ_SEED ?? 20260102)
/**
 * Longest an in-process case may take before it counts as a hang: the slowest take ~1 s on a
 * quiet machine (a 100,000-page working set, attached); a loop that never ends meets the test's
 * own time-out. A CLI run's bound is checkCli's time-out (a hang is killed and is a crash).
 */
const HANG_MS = 15_000

let dir: string
let corpus: Corpus
beforeAll(async () => {
  dir = tempDir('uffd-fuzz-test-')
  corpus = await makeCorpus(path.join(dir, 'corpus'))
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

function expectClean(tally: Tally, kind: string): void {
  const crashes = tally.crashes.map((c) => `seed ${c.seed} case ${c.index} (${c.how}): ${c.message}\n${c.stack ?? ''}`)
  expect(crashes, `crashes of ${kind}`).toEqual([])
  for (const [what, slowest] of tally.slowest) {
    if (!what.startsWith('cli ')) expect(slowest.ms, `slowest ${what}: case ${slowest.index} (${slowest.how})`).toBeLessThan(HANG_MS)
  }
}

describe(`fuzz (seed ${SEED})`, () => {
  it('4,000 mutated snapshots through the reader, stats, verify and resume start-up; 400 through working-set attach', () => {
    const tally = new Tally()
    for (let i = 0; i < 4000; i++) {
      const c = snapshotCase(corpus, SEED, i)
      runCase(tally, 'snapshot', SEED, i, c.how, () => checkSnapshot(c.bytes, `case-${i}.uffd`))
      if (i % 10 === 0) runCase(tally, 'attach', SEED, i, c.how, () => checkAttach(c.bytes, dir, new Rng(SEED, 1_000_000 + i)))
    }
    expectClean(tally, 'snapshots')
    const seen = new Set(tally.counts.get('snapshot')!.keys())
    // Not a fuzz of the checksums alone: crafted mutations get past them to every kind of check
    // behind (decoders included: VERIFY_FAILED), and some mutations leave a readable file.
    for (const outcome of ['OK', 'CORRUPT', 'TRUNCATED', 'INVALID', 'UNSUPPORTED_VERSION', 'VERIFY_FAILED']) expect(seen, `no case ended in ${outcome}: ${JSON.stringify(tally.summary())}`).toContain(outcome)
    const checksum = tally.count('snapshot', 'CORRUPT (checksum)')
    expect(checksum / 4000, 'refused by a checksum').toBeLessThan(0.2)
  }, 120_000)

  it('1,000 mutated sealed snapshots (encrypted, signed, packed): each refused, or read as exactly the image it was sealed from', () => {
    const tally = new Tally()
    for (let i = 0; i < 1000; i++) {
      const c = snapshotCase(corpus, SEED, i, corpus.sealed)
      runCase(tally, 'sealed', SEED, i, c.how, () => checkSnapshot(c.bytes, `sealed-${i}.uffd`, c.base.sealed))
    }
    expectClean(tally, 'sealed snapshots')
    const seen = new Set(tally.counts.get('sealed')!.keys())
    // Crafted mutations get past the checksums to the authentication behind them.
    expect(seen, JSON.stringify(tally.summary())).toContain('NOT_AUTHENTIC')
  }, 120_000)

  it('600 snapshots with units moved (entries given other units\' bytes and CRCs, structures resealed): each refused, or read as exactly its image', () => {
    const tally = new Tally()
    for (let i = 0; i < 600; i++) {
      const c = movedUnitCase(corpus, SEED, i)
      runCase(tally, 'moved', SEED, i, c.how, () => checkMoved(c.bytes, `moved-${i}.uffd`, c.base))
    }
    expectClean(tally, 'moved units')
    // Refused by the units' bound checksums (docs/FORMAT.md, Bound units), past every structure's.
    expect(tally.count('moved', 'CORRUPT (checksum)'), JSON.stringify(tally.summary())).toBeGreaterThan(300)
  }, 120_000)

  it('1,000 mutated working sets through parse, merge, the identity check and (1 in 8) attach', () => {
    const tally = new Tally()
    for (let i = 0; i < 1000; i++) {
      const c = jsonCase(corpus.workingSet.text, SEED, i, 1)
      runCase(tally, 'working set', SEED, i, c.how, () => checkWorkingSet(corpus, c.text, dir, i % 8 === 0))
    }
    expectClean(tally, 'working sets')
    expect(tally.count('working set', 'OK')).toBeGreaterThan(0)
    expect(tally.count('working set', 'BAD_WORKING_SET')).toBeGreaterThan(0)
  }, 120_000)

  it('1,000 mutated stats files through uffd stats FILE (read, render, or refused as a snapshot)', () => {
    const tally = new Tally()
    for (let i = 0; i < 1000; i++) {
      const c = jsonCase(corpus.report.text, SEED, i, 2)
      runCase(tally, 'stats file', SEED, i, c.how, () => checkStatsFile(c.text, dir))
    }
    expectClean(tally, 'stats files')
    for (const outcome of ['OK', 'INVALID', 'NOT_A_SNAPSHOT']) expect(tally.count('stats file', outcome), outcome).toBeGreaterThan(0)
  }, 120_000)

  it('a sample through the CLI: verify and stats of 4 snapshots, merge and attach of 2 working sets, stats of 2 stats files', () => {
    const tally = new Tally()
    const cli = path.join(dir, 'cli')
    fs.mkdirSync(cli)
    for (const i of [3, 4, 5, 6]) {
      const c = snapshotCase(corpus, SEED, i)
      const file = path.join(cli, `case-${i}.uffd`)
      fs.writeFileSync(file, c.bytes)
      runCase(tally, 'cli verify', SEED, i, c.how, () => checkCli(['verify', file]))
      runCase(tally, 'cli stats', SEED, i, c.how, () => checkCli(['stats', file]))
    }
    for (const i of [0, 1]) {
      const c = jsonCase(corpus.workingSet.text, SEED, i, 1)
      const file = path.join(cli, `case-${i}.ws`)
      fs.writeFileSync(file, c.text)
      runCase(tally, 'cli merge', SEED, i, c.how, () => checkCli(['working-set', 'merge', file, corpus.workingSet.file, '-o', path.join(cli, 'merged.ws')]))
      runCase(tally, 'cli attach', SEED, i, c.how, () => checkCli(['working-set', 'attach', corpus.snapshots[0].file, file, '-o', path.join(cli, 'attached.uffd')]))
      const s = jsonCase(corpus.report.text, SEED, i, 2)
      const stats = path.join(cli, `case-${i}.json`)
      fs.writeFileSync(stats, s.text)
      runCase(tally, 'cli stats file', SEED, i, s.how, () => checkCli(['stats', stats]))
    }
    expectClean(tally, 'CLI runs')
    expect(tally.cases).toBe(14)
  }, 240_000)

  it('verify lists what the file refused, and does not hide a bug as a problem of the file', () => {
    const reader = SnapshotReader.open(corpus.snapshots[0].file)
    try {
      reader.readChunk = () => {
        throw new TypeError('a bug')
      }
      expect(() => verifySnapshot(reader, 'x.uffd')).toThrow(TypeError)
    } finally {
      reader.close()
    }
  })
})
