/**
 * bench/memory: the handler's peak resident memory serving one client of a 16 GiB snapshot (the
 * first-resume issue's target: at most 128 MiB by default, any pattern). The 16 GiB image is sparse:
 * the 1 GiB guest image at 0 and again at 8 GiB, the rest holes (what a large, mostly idle guest
 * looks like; the snapshot stores ~222 MiB). native/fc_client touches it without a working set:
 * random 1% and 5% of its pages, the first 2 GiB in order, and 10% of the pages of the first
 * 2 GiB in runs of 16, every touched byte checked. Side by side in every run, order rotated:
 * `uffd resume` with its defaults, with `--decoders 0` (the fault loop alone), and with
 * `--cache-mb 256` (the cache of every handler before it was sized for one client). Peak RSS is
 * the handler process's VmHWM (every thread), read from /proc while it runs; medians over --runs.
 *
 *   node --import tsx bench/memory.ts --image /work/data/guest-1g.raw [--runs 3] [--keep]
 */
import fs from 'node:fs'
import path from 'node:path'

import {arg, flag, median, NATIVE, run, shuffled, start, table, UFFD, waitForFile, workingSetTraces, writeResults} from './lib.js'

const PAGE = 4096
const GIB = 1024 ** 3
const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '3'))
const keep = flag('keep')
const work = fs.mkdtempSync(path.join('/tmp', 'uffd-bench-memory-'))
const at = (name: string): string => path.join(work, name)
const SIZE = 16 * GIB
const PAGES = SIZE / PAGE

/** VmHWM of `pid` in KiB, or 0 once it is gone. */
function peakKib(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m ? Number(m[1]) : 0
  } catch {
    return 0
  }
}

async function resume(flags: string[], client: string[], tag: string): Promise<{peakMib: number; touchMs: number}> {
  const socket = at(`${tag}.sock`)
  const ready = at(`${tag}.ready`)
  fs.rmSync(ready, {force: true})
  const handler = start(process.execPath, [UFFD, 'resume', at('g16.uffd'), '--socket', socket, '--ready-file', ready, ...flags])
  let peak = 0
  const poll = setInterval(() => (peak = Math.max(peak, peakKib(handler.child.pid!))), 20)
  try {
    await waitForFile(ready, 30_000, handler.child)
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', at('g16.raw'), '--verify', ...client]).done
    peak = Math.max(peak, peakKib(handler.child.pid!))
    if (c.code !== 0) throw new Error(`fc_client (${tag}) failed (${c.code}): ${c.stderr}${c.stdout}`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`resume (${tag}) exited ${h.code}: ${h.stderr}`)
    const out = JSON.parse(c.stdout.trim().split('\n').pop()!) as {touch_ns: number; verify_errors: number}
    if (out.verify_errors !== 0) throw new Error(`${tag}: ${out.verify_errors} wrong bytes`)
    return {peakMib: peak / 1024, touchMs: out.touch_ns / 1e6}
  } finally {
    clearInterval(poll)
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  const guest = fs.statSync(image).size
  const fd = fs.openSync(at('g16.raw'), 'w')
  fs.ftruncateSync(fd, SIZE)
  fs.closeSync(fd)
  for (const seek of [0, 8 * GIB]) {
    const r = run('dd', [`if=${image}`, `of=${at('g16.raw')}`, 'bs=4M', `seek=${seek / (4 << 20)}`, 'conv=notrunc,sparse', 'status=none'])
    if (r.code !== 0) throw new Error(`dd: ${r.stderr}`)
  }
  const s = run(process.execPath, [UFFD, 'snapshot', '--mem-file', at('g16.raw'), '-o', at('g16.uffd'), '--json'])
  if (s.code !== 0) throw new Error(`snapshot: ${s.stderr}`)
  console.log(`${at('g16.raw')}: 16 GiB (the ${guest} byte guest image at 0 and at 8 GiB); snapshot ${fs.statSync(at('g16.uffd')).size} bytes`)

  const clustered = workingSetTraces((2 * GIB) / PAGE, 0.1, 16, work).replayTrace
  const patterns = [
    {name: 'random 1% of pages', args: ['--touch', 'random', '--seed', '3', '--count', String(Math.round(PAGES * 0.01))]},
    {name: 'random 5% of pages', args: ['--touch', 'random', '--seed', '3', '--count', String(Math.round(PAGES * 0.05))]},
    {name: 'first 2 GiB in order', args: ['--touch', 'sequential', '--count', String((2 * GIB) / PAGE)]},
    {name: '10% of the first 2 GiB, runs of 16', args: ['--touch', `trace:${clustered}`]},
  ]
  const handlers = [
    {name: 'defaults', flags: [] as string[]},
    {name: '--decoders 0', flags: ['--decoders', '0']},
    {name: '--cache-mb 256', flags: ['--cache-mb', '256']},
  ]
  const results: Record<string, Record<string, {peakMib: number[]; touchMs: number[]}>> = {}
  for (let r = 0; r < runs; r++) {
    for (const [p, pattern] of patterns.entries()) {
      for (const h of shuffled(handlers, r * 7 + p)) {
        const m = await resume(h.flags, pattern.args, `r${r}`)
        const cell = ((results[pattern.name] ??= {})[h.name] ??= {peakMib: [], touchMs: []})
        cell.peakMib.push(m.peakMib)
        cell.touchMs.push(m.touchMs)
        console.log(`run ${r + 1}/${runs} ${pattern.name} / ${h.name}: peak ${m.peakMib.toFixed(0)} MiB, touch ${m.touchMs.toFixed(0)} ms`)
      }
    }
  }
  const rows = patterns.flatMap((pattern) =>
    handlers.map((h) => {
      const cell = results[pattern.name][h.name]
      const base = results[pattern.name].defaults
      return [pattern.name, h.name, median(cell.peakMib).toFixed(0), `${(median(cell.peakMib) / median(base.peakMib)).toFixed(2)}x`, median(cell.touchMs).toFixed(0), `${(median(cell.touchMs) / median(base.touchMs)).toFixed(2)}x`]
    }),
  )
  console.log(`\nhandler peak RSS serving one client of a 16 GiB snapshot, medians of ${runs}\n`)
  console.log(table(['pattern', 'handler', 'peak RSS MiB', 'vs defaults', 'touch ms', 'vs defaults'], rows))
  console.log(`\nresults: ${writeResults('memory', {image, runs, results})}`)
}

main()
  .catch((error) => {
    console.error(error)
    process.exitCode = 1
  })
  .finally(() => {
    if (keep) console.log(`kept ${work}`)
    else fs.rmSync(work, {recursive: true, force: true})
  })
