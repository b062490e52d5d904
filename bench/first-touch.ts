/**
 * bench/first-touch: the first resume of a snapshot, before any working set exists, on a fresh
 * host: neither the raw file nor the snapshot is in the page cache. By default (`--evict files`)
 * just those two files are evicted before every run, as on a host that has run uffd (and node)
 * before but never this snapshot; `--evict all` drops the whole page cache, so node and uffd's own
 * code are read from disk too.
 * The same client (native/fc_client) touches the same pages, each once:
 *   random 0.2%, 1% and 5% of the image's pages (scattered first touches), and 10% of them in
 *   runs of 16 pages (clustered), in a shuffled order.
 * Handlers, side by side, interleaved in every run:
 *   File backend   the client maps the raw file privately (Firecracker's File backend);
 *   baseline       native/baseline_handler: one 4 KiB UFFDIO_COPY per fault from the raw file;
 *   uffd           `uffd resume` with its defaults, from the snapshot.
 * Every placement of bench/resume (split, shared, client, free): the baseline ratio must hold in
 * each. Timed from the start of the handler (for the File backend, of the client) until the touch
 * phase ends: the baseline handler maps and pre-reads the whole raw file before it listens (as
 * Firecracker's example does), which a fresh host pays for; uffd reads only what is touched.
 * Reported: medians, the time each handler was ready, and uffd's ratio against the other two.
 *
 *   node --import tsx bench/first-touch.ts --image /work/data/guest-1g.raw [--runs 5]
 *        [--placements split,shared,client,free] [--patterns r0.2,r1,r5,c10] [--uffd-args "..."]
 *        [--evict files|all] [--snapshot-args "--frame-size 0"]
 * Needs root (evicting the page cache; fc_client's uffd).
 */
import fs from 'node:fs'
import path from 'node:path'

import {arg, dropCaches, evictFiles, median, NATIVE, run, shuffled, start, table, tempDir, UFFD, waitForFile, writeResults, pinned, type Placement, placementsOf} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
/** "files": only the raw image and the snapshot evicted (a host that has run uffd before but never
 * this snapshot); "all": the whole page cache dropped (node and uffd's own code read from disk too). */
const evict = arg('evict', 'files')
if (evict !== 'files' && evict !== 'all') throw new Error('--evict is files or all')
const uffdArgs = arg('uffd-args', '').split(' ').filter(Boolean)
/** How the snapshot is written (e.g. "--frame-size 0" for one zstd frame a chunk). */
const snapshotArgs = arg('snapshot-args', '').split(' ').filter(Boolean)
const work = tempDir('uffd-bench-first-touch-')
const snapshot = path.join(work, 'image.uffd')
const pageCount = Math.ceil(fs.statSync(image).size / 4096)

const placements = placementsOf(arg('placements', 'split,shared,client,free'))

/** A pattern's pages in touch order, written as a trace of byte offsets for fc_client. */
function trace(id: string, pages: number[]): string {
  const file = path.join(work, `${id}.trace`)
  fs.writeFileSync(file, pages.map((p) => String(p * 4096)).join('\n'))
  return file
}

function randomPages(fraction: number, seed: number): number[] {
  return shuffled(
    Array.from({length: pageCount}, (_, p) => p),
    seed,
  ).slice(0, Math.round(pageCount * fraction))
}

function clusteredPages(fraction: number, cluster: number, seed: number): number[] {
  const clusters = shuffled(
    Array.from({length: Math.floor(pageCount / cluster)}, (_, c) => c),
    seed,
  ).slice(0, Math.round((pageCount * fraction) / cluster))
  return shuffled(
    clusters.flatMap((c) => Array.from({length: cluster}, (_, i) => c * cluster + i)),
    seed + 1,
  )
}

const ALL_PATTERNS: Record<string, {name: string; pages: () => number[]}> = {
  'r0.2': {name: 'random 0.2% of pages', pages: () => randomPages(0.002, 11)},
  r1: {name: 'random 1% of pages', pages: () => randomPages(0.01, 12)},
  r5: {name: 'random 5% of pages', pages: () => randomPages(0.05, 13)},
  c10: {name: '10% of pages in runs of 16', pages: () => clusteredPages(0.1, 16, 14)},
}
const patterns = arg('patterns', 'r0.2,r1,r5,c10')
  .split(',')
  .map((id) => {
    const p = ALL_PATTERNS[id]
    if (!p) throw new Error(`unknown pattern ${id}: one of ${Object.keys(ALL_PATTERNS).join(', ')}`)
    return {id, name: p.name, trace: trace(id, p.pages())}
  })

type Handler = 'file' | 'baseline' | 'uffd'
const HANDLERS: {id: Handler; name: string}[] = [
  {id: 'file', name: 'File backend (raw file mapped privately)'},
  {id: 'baseline', name: 'baseline (4 KiB copy per fault, raw file)'},
  {id: 'uffd', name: `uffd resume${uffdArgs.length ? ` ${uffdArgs.join(' ')}` : ' (defaults)'}`},
]


/** Start (the handler's exec, or the client's for the File backend) until the client's touch phase ended. */
interface Measured {
  ms: number
  readyMs: number
  /** uffd's run stats: faults served, chunks decoded, bytes copied into the client. */
  uffd?: {faults: number; decoded: number; copiedBytes: number}
}

async function measure(handler: Handler, traceFile: string, placement: Placement, tag: string): Promise<Measured> {
  const touch = ['--image', image, '--touch', `trace:${traceFile}`]
  if (evict === 'all') dropCaches()
  else evictFiles([image, snapshot])
  const client = async (args: string[]): Promise<number> => {
    const spawnedAt = performance.now()
    const c = await start(...pinned(placement.client, path.join(NATIVE, 'fc_client'), [...args, ...touch])).done
    if (c.code !== 0) throw new Error(`fc_client ${args.join(' ')} failed (${c.code}): ${c.stderr}${c.stdout}`)
    const out = JSON.parse(c.stdout.trim().split('\n').pop()!) as {handshake_ns: number; touch_ns: number}
    return spawnedAt + (out.handshake_ns + out.touch_ns) / 1e6
  }
  const t0 = performance.now()
  if (handler === 'file') return {ms: (await client(['--file-backend'])) - t0, readyMs: 0}
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const statsFile = path.join(work, `${tag}.stats.json`)
  fs.rmSync(ready, {force: true})
  const h =
    handler === 'baseline'
      ? start(...pinned(placement.handler, path.join(NATIVE, 'baseline_handler'), ['--socket', socket, '--mem-file', image, '--ready-file', ready]))
      : start(...pinned(placement.handler, process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, ...uffdArgs]))
  try {
    await waitForFile(ready, 30_000, h.child)
    const readyMs = performance.now() - t0
    const touched = await client(['--socket', socket])
    const done = await h.done
    if (done.code !== 0) throw new Error(`${handler} exited ${done.code}: ${done.stderr}`)
    if (handler === 'baseline') return {ms: touched - t0, readyMs}
    const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8')) as {faults: {total: number}; chunks: {decoded: number}; bytes: {copied: number}}
    return {ms: touched - t0, readyMs, uffd: {faults: stats.faults.total, decoded: stats.chunks.decoded, copiedBytes: stats.bytes.copied}}
  } finally {
    h.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench/first-touch needs root (dropping the page cache, fc_client)')
  const made = run(process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', snapshot, '--force', ...snapshotArgs])
  if (made.code !== 0) throw new Error(`snapshot failed: ${made.stderr}`)
  console.log(`${image}: ${pageCount} pages; snapshot ${fs.statSync(snapshot).size} B`)
  const ms: Record<string, Record<Handler, number[]>> = {}
  const readyMs: Record<string, Record<Handler, number[]>> = {}
  const done: Record<string, {faults: number[]; decoded: number[]; copiedBytes: number[]}> = {}
  const key = (pattern: string, placement: Placement): string => `${pattern} | ${placement.name}`
  for (let i = 0; i < runs; i++) {
    for (const pattern of patterns) {
      for (const placement of placements) {
        for (const handler of HANDLERS) {
          const t = await measure(handler.id, pattern.trace, placement, `${pattern.id}-${i}`)
          ;((ms[key(pattern.name, placement)] ??= {file: [], baseline: [], uffd: []})[handler.id]).push(t.ms)
          ;((readyMs[key(pattern.name, placement)] ??= {file: [], baseline: [], uffd: []})[handler.id]).push(t.readyMs)
          if (t.uffd) {
            const w = (done[key(pattern.name, placement)] ??= {faults: [], decoded: [], copiedBytes: []})
            w.faults.push(t.uffd.faults)
            w.decoded.push(t.uffd.decoded)
            w.copiedBytes.push(t.uffd.copiedBytes)
          }
          process.stderr.write(`run ${i + 1}/${runs} ${pattern.name} / ${placement.name} / ${handler.name}: ${t.ms.toFixed(1)} ms (ready at ${t.readyMs.toFixed(0)} ms)\n`)
        }
      }
    }
  }
  const rows: (string | number)[][] = []
  for (const pattern of patterns) {
    for (const placement of placements) {
      const m = ms[key(pattern.name, placement)]
      const r = readyMs[key(pattern.name, placement)]
      const [file, baseline, uffd] = [median(m.file), median(m.baseline), median(m.uffd)]
      const withReady = (total: number, ready: number[]): string => `${total.toFixed(0)} (${median(ready).toFixed(0)})`
      const w = done[key(pattern.name, placement)]
      const served = `${median(w.faults)} / ${median(w.decoded)} / ${(median(w.copiedBytes) / 2 ** 20).toFixed(0)}`
      rows.push([pattern.name, placement.name, file.toFixed(0), withReady(baseline, r.baseline), withReady(uffd, r.uffd), served, `${(baseline / uffd).toFixed(2)}x`, `${(file / uffd).toFixed(2)}x`])
    }
  }
  console.log(`\nfirst touches, page cache dropped before each run (${image}, medians of ${runs} runs; ms from start until touched, (ready at))\n`)
  console.log(table(['pattern', 'placement', 'File backend', 'baseline', HANDLERS[2].name, 'uffd faults / chunks decoded / MiB copied', 'uffd vs baseline (target >= 2x)', 'uffd vs File backend (target >= 1x)'], rows))
  console.log(`\nresults: ${writeResults('first-touch', {image, runs, uffdArgs, snapshotArgs, placements, ms, readyMs, done, rows})}`)
  fs.rmSync(work, {recursive: true, force: true})
}

await main()
