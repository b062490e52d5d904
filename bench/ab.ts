/**
 * bench/ab: A/B of two checkouts on the resume path. In each round it runs bench/prefetch.ts
 * (scattered pages with population; 64 KiB clusters without) and bench/resume.ts (--only "default
 * ("), the commands docs/BENCHMARKS.md gives (bench/suite.ts), from checkout A and then from
 * checkout B: each checkout's own script, run in its own directory, so each uses its own build.
 * To fit ~20 minutes, every command runs with --runs 1 per round, 3 rounds (medians of 3 per side,
 * A and B alternating), and resume measures two of its four placements (--placements client,free:
 * the handler may use both CPUs; split and shared confine it to CPU 0, where a shared machine's
 * other work lands too: in the trial split's baseline took 40-60 s per touch instead of ~5 s).
 * Afterwards it reads the results each run wrote (bench/results/*.json) and prints per scenario
 * the median over every run of A, of B, and B/A, with the range of each ("within noise" when each
 * side's median lies in the other's range). The C handlers (baseline, bound, copy floor) run the
 * same code on both sides: their B/A is the noise of this A/B.
 *
 *   node --import tsx bench/ab.ts --a DIR --b DIR [--rounds 3] [--runs-per-round 1] [--placements client,free]
 *        [--only prefetch-scattered,prefetch-clusters,resume] [--build] [--list] [--image /work/data/guest-1g.raw]
 *
 * Per side and round, in the trial (2 cores, load average ~10 from other engineers' tests): resume
 * ~90 s (client,free; all four placements ~245 s), prefetch scattered ~120 s, clusters ~68 s; so the
 * default 3 rounds take ~28 min under that load, ~15-18 min on a quiet machine.
 * Both checkouts must be built (`npm run build`; --build does it first), and dist/ must be newer than
 * src/. --list prints the commands and runs nothing. Logs of every run, each line stamped with
 * seconds since its start: bench/results/ab-<time>/ here.
 */
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {Writable} from 'node:stream'

import {arg, flag, median, ROOT, runBenchmark, table, writeResults} from './lib.js'
import {commandLine, ensureGuestImage, GUEST_1G, select, type Benchmark} from './suite.js'

const sides = {A: path.resolve(arg('a', '')), B: path.resolve(arg('b', ''))}
if (!arg('a', '') || !arg('b', '')) {
  console.error('usage: node --import tsx bench/ab.ts --a BASELINE_DIR --b CANDIDATE_DIR [--rounds 3] [--runs-per-round 1] [--placements client,free] [--only NAME,...] [--build] [--list]')
  process.exit(2)
}
const rounds = Number(arg('rounds', '3'))
const perRound = Number(arg('runs-per-round', '1'))
const image = arg('image', GUEST_1G)
const benches = select(arg('only', 'prefetch-scattered,prefetch-clusters,resume'))
for (const b of benches) if (b.script !== 'bench/prefetch.ts' && b.script !== 'bench/resume.ts') throw new Error(`${b.name}: bench/ab.ts reads prefetch and resume results only`)
const placements = arg('placements', 'client,free')
const argsOf = (b: Benchmark): string[] => [
  ...b.args.map((a) => (a === GUEST_1G ? image : a)),
  '--runs',
  String(perRound),
  ...(b.script === 'bench/resume.ts' ? ['--placements', placements] : []),
]

/** Newest modification time of any file under dir (0 if there is none). */
function newest(dir: string): number {
  let t = 0
  if (!fs.existsSync(dir)) return t
  for (const e of fs.readdirSync(dir, {withFileTypes: true, recursive: true})) if (e.isFile()) t = Math.max(t, fs.statSync(path.join(e.parentPath, e.name)).mtimeMs)
  return t
}

function describe(dir: string): string {
  const head = spawnSync('git', ['-C', dir, 'log', '-1', '--format=%h %s'], {encoding: 'utf8'}).stdout.trim()
  const dirty = spawnSync('git', ['-C', dir, 'status', '--porcelain', '--', 'src', 'native', 'bench'], {encoding: 'utf8'}).stdout.trim()
  return `${dir} @ ${head || '?'}${dirty ? ' + uncommitted changes' : ''}`
}

for (const [side, dir] of Object.entries(sides)) {
  if (flag('build')) {
    console.error(`building ${side}: npm run build in ${dir}`)
    if (spawnSync('npm', ['run', 'build'], {cwd: dir, stdio: ['ignore', 'inherit', 'inherit']}).status !== 0) throw new Error(`build of ${dir} failed`)
  }
  for (const f of ['bin/run.js', 'dist/commands/resume.js', 'native/build/fc_client', 'native/build/baseline_handler', 'bench/prefetch.ts', 'bench/resume.ts'])
    if (!fs.existsSync(path.join(dir, f))) throw new Error(`${side}: ${dir}/${f} is missing (npm run build there, or --build)`)
  if (newest(path.join(dir, 'src')) > newest(path.join(dir, 'dist'))) throw new Error(`${side}: ${dir}/src is newer than its dist/: build it (npm run build there, or --build)`)
}
ensureGuestImage(image)
/** The builds' newest file times: a checkout rebuilt during the A/B (another session's build) is reported. */
const build = (dir: string): number => Math.max(newest(path.join(dir, 'dist')), newest(path.join(dir, 'native/build')))
const builds = {A: build(sides.A), B: build(sides.B)}
const warnings: string[] = []

/** A log that prefixes each line with the seconds since `t0`, to see where a run spends its time. */
function stampedLog(file: string, t0: number): {stream: Writable; close: () => void} {
  const fd = fs.openSync(file, 'w')
  let atLineStart = true
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done): void {
      const stamp = `[${((performance.now() - t0) / 1000).toFixed(1)} s] `
      const text = chunk.toString().replace(/\n(?=.)/g, `\n${stamp}`)
      fs.writeSync(fd, (atLineStart ? stamp : '') + text)
      atLineStart = text.endsWith('\n')
      done()
    },
  })
  return {stream, close: () => fs.closeSync(fd)}
}

/** Samples (ms, one per run) per scenario of one result file. */
function samples(b: Benchmark, json: any): Record<string, number[]> {
  const out: Record<string, number[]> = {}
  if (b.script === 'bench/resume.ts') {
    for (const [key, byScenario] of Object.entries(json.results as Record<string, Record<string, {touchMs: number}[]>>))
      for (const [scenario, ms] of Object.entries(byScenario)) out[`${key} | ${scenario}`] = ms.map((m) => m.touchMs)
    return out
  }
  for (const [scenario, ms] of Object.entries(json.touch as Record<string, number[]>)) out[`touch | ${scenario}`] = ms
  for (const [scenario, ms] of Object.entries(json.readyMs as Record<string, number[]>)) if (scenario.startsWith('uffd')) out[`ready | ${scenario}`] = ms
  const p = json.populate as {uffdMs: number[]; lz4Ms: number[]; floorMs: number[]}
  if (p.floorMs.length) {
    out['populate all | zstd'] = p.uffdMs
    out['populate all | lz4'] = p.lz4Ms
    out['populate all | copy floor (C)'] = p.floorMs
    out['populate all | zstd / copy floor (ratio)'] = p.uffdMs.map((ms, i) => ms / p.floorMs[i])
  }
  return out
}

const logs = path.join(ROOT, 'bench/results', `ab-${new Date().toISOString().replace(/[:.]/g, '-')}`)
const collected: Record<string, Record<string, {A: number[]; B: number[]}>> = {}
const seconds: Record<string, {A: number[]; B: number[]}> = {}
const t0 = performance.now()
console.log(`A/B: A = ${describe(sides.A)}\n     B = ${describe(sides.B)}\n     ${rounds} rounds, A then B per benchmark; logs in ${logs}`)
for (const b of benches) console.log(`     ${b.name}: ${commandLine(b, argsOf(b))}`)
if (flag('list')) process.exit(0)
fs.mkdirSync(logs, {recursive: true})
for (let r = 1; r <= rounds; r++) {
  for (const b of benches) {
    for (const side of ['A', 'B'] as const) {
      const logFile = path.join(logs, `${b.name}-r${r}-${side}.log`)
      const log = stampedLog(logFile, performance.now())
      const res = await runBenchmark(sides[side], b.script, argsOf(b), log.stream, log.stream)
      log.close()
      if (res.code !== 0 || !res.resultsFile) throw new Error(`${side} ${b.name} round ${r} failed (exit ${res.code}): see ${logFile}`)
      if (build(sides[side]) !== builds[side] && !warnings.some((w) => w.startsWith(side)))
        warnings.push(`${side}: ${sides[side]} was rebuilt during the A/B (noticed after round ${r}, ${b.name}): its runs mix two builds`)
      ;((seconds[b.name] ??= {A: [], B: []})[side]).push(res.seconds)
      for (const [scenario, ms] of Object.entries(samples(b, JSON.parse(fs.readFileSync(res.resultsFile, 'utf8'))))) ((collected[b.name] ??= {})[scenario] ??= {A: [], B: []})[side].push(...ms)
      process.stderr.write(`round ${r}/${rounds} ${side} ${b.name}: ${res.seconds.toFixed(0)} s (${res.resultsFile})\n`)
    }
  }
}

const fmt = (v: number): string => (v < 10 ? v.toFixed(2) : v.toFixed(1))
const spread = (v: number[]): string => `${fmt(Math.min(...v))}-${fmt(Math.max(...v))}`
const summary: Record<string, (string | number)[][]> = {}
for (const b of benches) {
  summary[b.name] = Object.entries(collected[b.name]).map(([scenario, {A, B}]) => {
    const a = median(A)
    const m = median(B)
    // "noise" when each side's median lies within the other's range of runs.
    const overlap = m >= Math.min(...A) && m <= Math.max(...A) && a >= Math.min(...B) && a <= Math.max(...B)
    const verdict = A.length < 2 || B.length < 2 ? '1 run: no verdict' : overlap ? 'within noise' : m < a ? 'B lower' : 'B higher'
    return [scenario, fmt(a), fmt(m), (m / a).toFixed(3), spread(A), spread(B), `${A.length}/${B.length}`, verdict]
  })
  const s = seconds[b.name]
  console.log(`\n${b.name} (ms unless a ratio; medians over every run of ${rounds} rounds; each command took A ${median(s.A).toFixed(0)} s, B ${median(s.B).toFixed(0)} s)\n`)
  console.log(table(['scenario', 'A median', 'B median', 'B/A', 'A range', 'B range', 'runs A/B', ''], summary[b.name]))
}
const minutes = (performance.now() - t0) / 60000
for (const w of warnings) console.log(`\nWARNING ${w}`)
console.log(`\n(C) rows and "baseline"/"bound" scenarios run the same C code on both sides: their B/A is this A/B's noise.`)
console.log(`total ${minutes.toFixed(1)} min\nresults: ${writeResults('ab', {sides, rounds, benches: benches.map((b) => ({name: b.name, command: commandLine(b, argsOf(b))})), seconds, collected, summary, warnings, minutes})}`)
