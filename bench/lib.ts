import {spawn, spawnSync, type ChildProcess} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

/** Shared plumbing of the benchmarks: processes, readiness, medians, result files. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
export const NATIVE = path.join(ROOT, 'native/build')
/** The uffd under test: this checkout's, or another built checkout's bin/run.js (UFFD_BENCH_BIN) for an A/B by hand. */
export const UFFD = process.env.UFFD_BENCH_BIN ?? path.join(ROOT, 'bin/run.js')

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

/** A seeded shuffle (xorshift), so every run of a benchmark uses the same sets. */
export function shuffled<T>(values: readonly T[], seed: number): T[] {
  let x = seed
  const out = [...values]
  for (let i = out.length - 1; i > 0; i--) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    const j = (x >>> 0) % (i + 1)
    ;[out[i], out[j]] = [out[j], out[i]]
  }
  return out
}

/**
 * A working set of `fraction` of `pages`, whole runs of `cluster` pages picked at random (seeded),
 * written as two fc_client traces of page offsets: the order it is recorded in and another order
 * to replay it in (the order of faults varies between resumes; the set barely does).
 */
export function workingSetTraces(pages: number, fraction: number, cluster: number, dir: string): {set: number[]; recordTrace: string; replayTrace: string} {
  const clusters = shuffled(Array.from({length: Math.floor(pages / cluster)}, (_, c) => c), 12345).slice(0, Math.round((pages * fraction) / cluster))
  const set = clusters.flatMap((c) => Array.from({length: cluster}, (_, i) => c * cluster + i))
  const recordTrace = path.join(dir, 'record.trace')
  const replayTrace = path.join(dir, 'replay.trace')
  fs.writeFileSync(recordTrace, set.map((p) => String(p * 4096)).join('\n'))
  fs.writeFileSync(replayTrace, shuffled(set, 777).map((p) => String(p * 4096)).join('\n'))
  return {set, recordTrace, replayTrace}
}

export function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : fallback
}

export function flag(name: string): boolean {
  return process.argv.includes(`--${name}`)
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix))
}

export async function waitForFile(file: string, timeoutMs: number, child?: ChildProcess): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!fs.existsSync(file)) {
    if (child && child.exitCode !== null) throw new Error(`process exited (${child.exitCode}) before ${file} appeared`)
    if (Date.now() > deadline) throw new Error(`${file} did not appear within ${timeoutMs} ms`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

export interface Finished {
  code: number | null
  stdout: string
  stderr: string
}

export function start(command: string, args: string[]): {child: ChildProcess; done: Promise<Finished>} {
  const child = spawn(command, args, {stdio: ['ignore', 'pipe', 'pipe']})
  let stdout = ''
  let stderr = ''
  child.stdout!.on('data', (d) => (stdout += d))
  child.stderr!.on('data', (d) => (stderr += d))
  const done = new Promise<Finished>((resolve) => child.on('close', (code) => resolve({code, stdout, stderr})))
  return {child, done}
}

export function run(command: string, args: string[]): Finished {
  const r = spawnSync(command, args, {encoding: 'utf8', maxBuffer: 64 * 1024 * 1024})
  return {code: r.status, stdout: r.stdout, stderr: r.stderr}
}

export function dropCaches(): void {
  spawnSync('sync')
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3')
  } catch {
    // Not root: caches stay warm, which the report says.
  }
}

/** Evict just these files from the page cache (written back first): the host's other files,
 * node and the handler's code among them, stay as warm as on a host that has run it before. */
export function evictFiles(files: string[]): void {
  spawnSync('sync')
  for (const file of files) spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'])
}

export function writeResults(name: string, data: unknown): string {
  const dir = path.join(ROOT, 'bench/results')
  fs.mkdirSync(dir, {recursive: true})
  const file = path.join(dir, `${name}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`)
  fs.writeFileSync(file, `${JSON.stringify(data, null, 2)}\n`)
  return file
}

export function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))]
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i].length)))
  const line = (r: string[]): string => `| ${r.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`
  return [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...cells.slice(1).map(line)].join('\n')
}

export interface BenchRun {
  code: number | null
  seconds: number
  /** The JSON file the benchmark wrote (its `results: PATH` line), absolute; null if none. */
  resultsFile: string | null
}

/**
 * Runs one benchmark script (`node --import tsx SCRIPT ARGS`) in checkout `cwd`, so it uses that
 * checkout's build, and copies its output to `stdout` and `stderr` as it comes.
 */
export function runBenchmark(cwd: string, script: string, args: string[], stdout: NodeJS.WritableStream, stderr: NodeJS.WritableStream): Promise<BenchRun> {
  const t0 = performance.now()
  const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], {cwd, stdio: ['ignore', 'pipe', 'pipe']})
  let out = ''
  child.stdout.on('data', (d) => {
    out += d
    stdout.write(d)
  })
  child.stderr.on('data', (d) => stderr.write(d))
  return new Promise((resolve) =>
    child.on('close', (code) => {
      const m = /^results: (.+)$/m.exec(out)
      resolve({code, seconds: (performance.now() - t0) / 1000, resultsFile: m ? path.resolve(cwd, m[1].trim()) : null})
    }),
  )
}

/** Where a benchmark's client and handler run (CPU lists for taskset; null: unpinned). */
export interface Placement {
  name: string
  client: string | null
  handler: string | null
}

/**
 * CPU placements: a fault round trip costs ~10 us when handler and client share a CPU and about
 * twice that across CPUs, so resume benchmarks measure each.
 */
export const PLACEMENTS: Record<string, Placement> = {
  split: {name: 'split: client CPU 1, handler CPU 0', client: '1', handler: '0'},
  shared: {name: 'shared: client and handler CPU 0', client: '0', handler: '0'},
  client: {name: 'client CPU 1, handler unpinned', client: '1', handler: null},
  free: {name: 'unpinned', client: null, handler: null},
}

/** The placements a comma-separated --placements list names. */
export function placementsOf(list: string): Placement[] {
  return list.split(',').map((p) => {
    if (!PLACEMENTS[p]) throw new Error(`unknown placement ${p}: one of ${Object.keys(PLACEMENTS).join(', ')}`)
    return PLACEMENTS[p]
  })
}

/** Runs a command confined to a CPU list with taskset (inherited by its threads), or as is. */
export function pinned(cpus: string | null, command: string, args: string[]): [string, string[]] {
  return cpus === null ? [command, args] : ['taskset', ['-c', cpus, command, ...args]]
}
