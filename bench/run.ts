/**
 * bench/run: the one script behind `npm run bench`. It makes the inputs the benchmarks need (the
 * guest images, with the shared tool, when they are missing) and runs every benchmark in bench/
 * with the command docs/BENCHMARKS.md gives for it (bench/suite.ts), one after the other, then
 * prints how long each took and where its results went (bench/results/*.json).
 *
 *   node --import tsx bench/run.ts [--quick] [--only NAME,...] [--list]
 *
 * --quick runs each benchmark once (--runs 1; bench/codecs on 256 KiB chunks, zstd 1 and lz4 only):
 *   a check that everything runs, not figures. --only takes names from bench/suite.ts (snapshot,
 *   resume, prefetch-scattered, prefetch-clusters, codecs-1g, codecs-2g, remote, frames, first-touch, startup, layers, criu) or a prefix
 *   ("prefetch", "codecs"). --list prints the commands and runs nothing. Build first (`npm run
 *   bench` does). Everything takes ~50 min on a quiet machine (bench/codecs ~15 min per image),
 *   about twice that under load; making a missing guest image 2-3 min more (5-6 min the first time,
 *   when the tool installs QEMU).
 */
import {flag, arg, ROOT, runBenchmark, table} from './lib.js'
import {commandLine, ensureGuestImage, missingPrerequisites, select} from './suite.js'

const quick = flag('quick')
const benches = select(arg('only', ''))
const argsOf = (b: (typeof benches)[number]): string[] => [...b.args, '--runs', String(quick ? 1 : b.runs), ...(quick ? (b.quick ?? []) : [])]

if (flag('list')) {
  for (const b of benches) console.log(`${b.name}: ${commandLine(b, argsOf(b))}`)
  process.exit(0)
}
const missing = missingPrerequisites(benches)
if (missing.length) {
  console.error(`missing: ${missing.join(', ')} (leave those benchmarks out with --only)`)
  process.exit(1)
}
for (const image of new Set(benches.flatMap((b) => b.images))) ensureGuestImage(image)

const done: {name: string; code: number | null; seconds: number; results: string}[] = []
for (const b of benches) {
  console.log(`\n## ${b.name}: ${commandLine(b, argsOf(b))}\n`)
  const r = await runBenchmark(ROOT, b.script, argsOf(b), process.stdout, process.stderr)
  done.push({name: b.name, code: r.code, seconds: r.seconds, results: r.resultsFile ?? '-'})
}
console.log(`\n${quick ? 'quick run (--runs 1): not figures\n\n' : ''}${table(['benchmark', 'exit', 'seconds', 'results'], done.map((d) => [d.name, String(d.code), d.seconds.toFixed(0), d.results]))}`)
process.exitCode = done.every((d) => d.code === 0) ? 0 : 1
