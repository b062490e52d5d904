/**
 * bench/criu: lazy restore of one CRIU dump with `uffd resume --criu-dir` (from the snapshot)
 * against `criu lazy-pages` (CRIU's own daemon, from the dump's page images), and an eager
 * `criu restore` for reference. The process is native/memory_pattern --verify-loop: restore time
 * is from the start of `criu restore` until the restored process printed its next "verified"
 * line, i.e. read and checked all of its memory once. Same dump for every run; scenarios
 * interleaved; medians and ratios against `criu lazy-pages`. Needs root and criu.
 *
 *   node --import tsx bench/criu.ts [--mib 512] [--runs 5] [--cold]
 *
 * --cold drops the page cache before each restore (dump images and snapshot read from disk).
 */
import {spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {arg, dropCaches, flag, median, NATIVE, start, table, tempDir, UFFD, waitForFile, writeResults} from './lib.js'

const mib = Number(arg('mib', '512'))
const runs = Number(arg('runs', '5'))
const cold = flag('cold')
const work = tempDir('uffd-bench-criu-')
const out = path.join(work, 'pattern.out')
const dump = path.join(work, 'dump')
const snapshot = path.join(work, 'pattern.uffd')

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))
const lineCount = (): number => fs.readFileSync(out, 'utf8').split('\n').filter(Boolean).length
const alive = (pid: number): boolean => fs.existsSync(`/proc/${pid}`) && !fs.readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ')

async function until(what: string, ok: () => boolean, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`)
    await sleep(2)
  }
}

function criu(args: string[]): void {
  const r = spawnSync('criu', args, {encoding: 'utf8'})
  if (r.status !== 0) throw new Error(`criu ${args.join(' ')} failed (${r.status}): ${r.stderr}`)
}

// --- The dump and the snapshot --------------------------------------------------------------
spawn('sh', ['-c', `exec ${path.join(NATIVE, 'memory_pattern')} --mib ${mib} --seed 7 --verify-loop > ${out}`], {detached: true, stdio: 'ignore', cwd: work}).unref()
await until('memory_pattern to start', () => fs.existsSync(out) && lineCount() >= 1)
const pid = (JSON.parse(fs.readFileSync(out, 'utf8').split('\n')[0]) as {pid: number}).pid
fs.mkdirSync(dump)
criu(['dump', '-t', String(pid), '-D', dump, '--shell-job', '-o', 'dump.log'])
await until('the dumped pid to be free', () => !alive(pid))
// CRIU restores the output file only at the size it had at dump time: put it back before each run.
const outSize = fs.statSync(out).size
const snap = spawnSync(process.execPath, [UFFD, 'snapshot', '--criu-dir', dump, '-o', snapshot, '--json'], {encoding: 'utf8'})
if (snap.status !== 0) throw new Error(snap.stderr)
const pagesBytes = fs.readdirSync(dump).filter((f) => /^pages-\d+\.img$/.test(f)).reduce((s, f) => s + fs.statSync(path.join(dump, f)).size, 0)
const snapshotBytes = fs.statSync(snapshot).size

// --- Runs -----------------------------------------------------------------------------------
type Scenario = 'criu lazy-pages' | 'uffd resume --criu-dir' | 'criu restore (eager)'
const scenarios: Scenario[] = ['criu lazy-pages', 'uffd resume --criu-dir', 'criu restore (eager)']
const times: Record<Scenario, number[]> = {'criu lazy-pages': [], 'uffd resume --criu-dir': [], 'criu restore (eager)': []}

async function once(scenario: Scenario): Promise<number> {
  fs.truncateSync(out, outSize)
  const before = lineCount()
  if (cold) dropCaches()
  let daemon: ReturnType<typeof start> | undefined
  const ready = path.join(work, 'ready')
  fs.rmSync(ready, {force: true})
  if (scenario === 'criu lazy-pages') {
    daemon = start('criu', ['lazy-pages', '-D', dump, '-o', 'lazy-pages.log'])
    await waitForFile(path.join(dump, 'lazy-pages.socket'), 30_000, daemon.child)
  } else if (scenario === 'uffd resume --criu-dir') {
    daemon = start(process.execPath, [UFFD, 'resume', snapshot, '--criu-dir', dump, '--ready-file', ready])
    await waitForFile(ready, 30_000, daemon.child)
  }
  const t0 = performance.now()
  criu(['restore', '-D', dump, '--shell-job', '-d', '-o', 'restore.log', ...(daemon ? ['--lazy-pages'] : [])])
  // The restored process first finishes the check it was in when dumped, then prints a line per
  // full pass: the second new line is the first whole pass over the restored memory.
  await until('a full verification', () => lineCount() >= before + 2)
  const ms = performance.now() - t0
  const lines = fs.readFileSync(out, 'utf8')
  if (lines.includes('"verified":false')) throw new Error(`${scenario}: the restored process saw wrong memory`)
  const finished = daemon ? await daemon.done : undefined
  if (finished && finished.code !== 0) throw new Error(`${scenario}: the daemon exited ${finished.code}: ${finished.stderr}`)
  process.kill(pid, 'SIGKILL')
  // Until reaped, not only dead: a zombie still holds the pid the next restore needs.
  await until('the restored process to be reaped', () => !fs.existsSync(`/proc/${pid}`))
  return ms
}

for (let r = 0; r < runs; r++) {
  for (const s of scenarios) times[s].push(await once(s))
  process.stderr.write(`run ${r + 1}/${runs}: ${scenarios.map((s) => `${s} ${times[s].at(-1)!.toFixed(0)} ms`).join(', ')}\n`)
}

const base = median(times['criu lazy-pages'])
const rows = scenarios.map((s) => [s, median(times[s]).toFixed(0), (median(times[s]) / base).toFixed(2)])
const sizes = [
  ['CRIU page images (pages-*.img)', (pagesBytes / 2 ** 20).toFixed(1), '1.00'],
  ['uffd snapshot', (snapshotBytes / 2 ** 20).toFixed(1), (snapshotBytes / pagesBytes).toFixed(2)],
]
console.log(`memory_pattern --mib ${mib}, ${runs} runs, ${cold ? 'cold' : 'warm'} page cache\n`)
console.log(table(['restore until one full verification', 'median ms', 'vs criu lazy-pages'], rows))
console.log()
console.log(table(['memory image', 'MiB', 'vs CRIU'], sizes))
const file = writeResults('criu', {mib, runs, cold, times, pagesBytes, snapshotBytes, snapshotSummary: JSON.parse(snap.stdout)})
console.log(`\nresults: ${path.relative(process.cwd(), file)}`)
fs.rmSync(work, {recursive: true, force: true})
