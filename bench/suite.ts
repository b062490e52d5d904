// bench/suite.ts: not run itself; the list of benchmarks that bench/run.ts (`npm run bench`) and
// bench/ab.ts run, with the commands docs/BENCHMARKS.md gives, and the inputs they need.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {ROOT} from './lib.js'

/**
 * Every benchmark in bench/ with the command docs/BENCHMARKS.md gives for it, and its inputs.
 * `runs` is the command's --runs, kept apart so bench/run.ts --quick and bench/ab.ts can change it.
 */
export interface Benchmark {
  name: string
  script: string
  args: string[]
  runs: number
  /** Extra arguments for bench/run.ts --quick (beside --runs 1). */
  quick?: string[]
  images: string[]
  commands: string[]
  root?: boolean
}

export const DATA = process.env.UFFD_BENCH_DATA ?? '/work/data'
export const GUEST_1G = path.join(DATA, 'guest-1g.raw')
export const GUEST_2G = path.join(DATA, 'guest-2g.raw')
/** The shared guest-image tool, as docs/BENCHMARKS.md names it (relative to the checkout). */
export const GUEST_IMAGE_TOOL = process.env.UFFD_GUEST_IMAGE_TOOL ?? path.resolve(ROOT, '../shared/tools/guest-image/qemu/make-guest-image.sh')
/** MiB of guest RAM for each image the benchmarks use. */
export const GUEST_IMAGES: Record<string, number> = {[GUEST_1G]: 1024, [GUEST_2G]: 2048}

export const BENCHMARKS: Benchmark[] = [
  {name: 'snapshot', script: 'bench/snapshot.ts', args: ['--image', GUEST_2G], runs: 5, images: [GUEST_2G], commands: ['zstd', 'lz4']},
  {name: 'resume', script: 'bench/resume.ts', args: ['--image', GUEST_1G, '--only', 'default ('], runs: 3, images: [GUEST_1G], commands: ['taskset']},
  {name: 'prefetch-scattered', script: 'bench/prefetch.ts', args: ['--image', GUEST_1G], runs: 5, images: [GUEST_1G], commands: []},
  {name: 'prefetch-clusters', script: 'bench/prefetch.ts', args: ['--image', GUEST_1G, '--cluster', '16', '--no-populate'], runs: 7, images: [GUEST_1G], commands: []},
  {name: 'codecs-1g', script: 'bench/codecs.ts', args: ['--image', GUEST_1G], runs: 5, quick: ['--chunks', '256K', '--codecs', 'zstd:1,lz4'], images: [GUEST_1G], commands: ['zstd', 'lz4']},
  {name: 'codecs-2g', script: 'bench/codecs.ts', args: ['--image', GUEST_2G], runs: 5, quick: ['--chunks', '256K', '--codecs', 'zstd:1,lz4'], images: [GUEST_2G], commands: ['zstd', 'lz4']},
  {name: 'remote', script: 'bench/remote.ts', args: ['--image', GUEST_1G], runs: 3, images: [GUEST_1G], commands: ['curl', 'ip', 'tc'], root: true},
  {name: 'frames', script: 'bench/frames.ts', args: ['--image', GUEST_1G], runs: 5, images: [GUEST_1G], commands: []},
  {name: 'first-touch', script: 'bench/first-touch.ts', args: ['--image', GUEST_1G], runs: 5, quick: ['--placements', 'free'], images: [GUEST_1G], commands: ['taskset'], root: true},
  {name: 'startup', script: 'bench/startup.ts', args: ['--image', GUEST_1G], runs: 15, images: [GUEST_1G], commands: []},
  {name: 'layers', script: 'bench/layers.ts', args: ['--image', GUEST_1G], runs: 5, images: [GUEST_1G], commands: []},
  {name: 'sealed', script: 'bench/sealed.ts', args: ['--image', GUEST_1G], runs: 5, images: [GUEST_1G], commands: ['openssl']},
  {name: 'memory', script: 'bench/memory.ts', args: ['--image', GUEST_1G], runs: 3, images: [GUEST_1G], commands: ['dd'], root: true},
  {name: 'criu', script: 'bench/criu.ts', args: ['--mib', '512'], runs: 3, images: [], commands: ['criu'], root: true},
]

/** The benchmarks named in a comma-separated list: a name, or a prefix before '-' ("prefetch", "codecs"). */
export function select(list: string): Benchmark[] {
  if (!list) return BENCHMARKS
  const names = list.split(',').filter(Boolean)
  for (const n of names) if (!BENCHMARKS.some((b) => b.name === n || b.name.startsWith(`${n}-`))) throw new Error(`unknown benchmark ${n}: one of ${BENCHMARKS.map((b) => b.name).join(', ')}`)
  return BENCHMARKS.filter((b) => names.some((n) => b.name === n || b.name.startsWith(`${n}-`)))
}

export function commandLine(b: Benchmark, args: string[]): string {
  return ['node', '--import', 'tsx', b.script, ...args].map((a) => (/^[\w./:,=-]+$/.test(a) ? a : `"${a}"`)).join(' ')
}

/** What the selected benchmarks lack that this script cannot make: commands, root. */
export function missingPrerequisites(benches: Benchmark[]): string[] {
  const missing = new Set<string>()
  for (const b of benches) {
    for (const c of b.commands) if (spawnSync('sh', ['-c', `command -v ${c}`]).status !== 0) missing.add(`${c} (for ${b.name})`)
    if (b.root && process.getuid?.() !== 0) missing.add(`root (for ${b.name})`)
  }
  return [...missing]
}

/** Makes a missing guest image with the shared tool (root, 2-3 min) and checks its PASS line. */
export function ensureGuestImage(file: string): void {
  if (fs.existsSync(file)) return
  const mib = GUEST_IMAGES[file]
  if (!mib) throw new Error(`${file} is missing and no guest-image size is known for it`)
  if (process.getuid?.() !== 0) throw new Error(`${file} is missing; making it needs root: sudo bash ${GUEST_IMAGE_TOOL} ${mib} ${file}`)
  console.error(`making ${file}: bash ${GUEST_IMAGE_TOOL} ${mib} ${file}`)
  const r = spawnSync('bash', [GUEST_IMAGE_TOOL, String(mib), file], {stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8'})
  process.stderr.write(r.stdout ?? '')
  const last = (r.stdout ?? '').trim().split('\n').pop() ?? ''
  if (r.status !== 0 || !last.startsWith('PASS') || !fs.existsSync(file)) throw new Error(`making ${file} failed (exit ${r.status}): ${last}`)
}
