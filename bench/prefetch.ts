/**
 * bench/prefetch: working-set prefetch and background population on a realistic guest image.
 * A client (native/fc_client) touches a random subset of the image (--fraction of its pages, in
 * runs of --cluster pages: 1 is scattered single pages, 16 is 64 KiB extents); one run with
 * `uffd resume --record --fault-around page` records the exact set in one order, `uffd
 * working-set attach` attaches it (packed, and as chunks only), then every scenario replays the
 * same set in another order (the order of faults varies between resumes; the set barely does).
 * Scenarios run interleaved, medians over --runs, ratios against plain lazy serving and the
 * baseline handler (one 4 KiB UFFDIO_COPY per fault from the raw file). The bound is the same C
 * handler prefetching the recorded set in its recorded order straight from the raw file in memory
 * (baseline_handler --prefetch): no decoding, no checksums, the least work any prefetcher can do;
 * once on one thread (as uffd installs) and once on every core (--prefetch-threads: the list cut
 * in one part per thread, no lock against REMOVE events, which this benchmark has none of).
 * `uffd resume --learn` is measured the way a CI user meets it: one resume with the defaults
 * learns a set, timed against `--record` with the same defaults plus `working-set attach`.
 * "ready ms" is start to ready file, as this script sees it (5 ms polls): uffd stages the set
 * (decodes it into memory) before it is ready, the C handlers map and pre-read the whole raw
 * file. Population is timed to
 * "all memory present" against native/copy_floor (bulk UFFDIO_COPY of the same size, no waiter)
 * in the same run, for the zstd snapshot and for the same image snapshotted with --codec lz4
 * (which decodes ~2.5x faster here and makes a ~20% larger file).
 *
 *   node --import tsx bench/prefetch.ts --image /work/data/guest-1g.raw [--runs 5] [--fraction 0.1]
 *        [--cluster 1] [--no-populate]
 */
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {arg, median, workingSetTraces, NATIVE, run, start, table, tempDir, UFFD, waitForFile, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
const fraction = Number(arg('fraction', '0.1'))
const cluster = Number(arg('cluster', '1'))
/** Threads of the parallel bound: one per core, at most baseline_handler's 8. */
const cores = Math.min(8, os.availableParallelism())
const measurePopulation = !process.argv.includes('--no-populate')
const work = tempDir('uffd-bench-prefetch-')
const snapshot = path.join(work, 'image.uffd')
const lz4Snapshot = path.join(work, 'image-lz4.uffd')
const size = fs.statSync(image).size
const pages = Math.ceil(size / 4096)

// Whole clusters of `cluster` pages, picked at random: the set a guest touches is clustered (page
// cache files, kernel text, heaps); cluster 1 is the adversarial case of scattered pages.
const {set, recordTrace, replayTrace} = workingSetTraces(pages, fraction, cluster, work)
const workingSet = path.join(work, 'ws.json')
const packedSnapshot = path.join(work, 'image-packed.uffd')
const packedRawSnapshot = path.join(work, 'image-packed-raw.uffd')
const chunksSnapshot = path.join(work, 'image-ws-chunks.uffd')
// The set a CI user gets without picking flags: recorded by one `resume --learn` with the default
// fault-around (whole windows are recorded), against `--record` with the same defaults and attach.
const learnedSnapshot = path.join(work, 'image-learned.uffd')
const handDefaultsSnapshot = path.join(work, 'image-hand-defaults.uffd')
const handDefaultsSet = path.join(work, 'ws-defaults.json')
const LEARNED = 'uffd + set learned by one --learn resume'
const HAND_DEFAULTS = 'uffd + set from --record (defaults) + attach'

interface Scenario {
  name: string
  handler: 'baseline' | 'bound' | 'bound-threads' | 'uffd'
  args: string[]
  touch: string[]
  snapshot?: string
}

// The client stays alive a moment after touching, so `--count-hits` samples its accessed bits.
const touchReplay = ['--touch', `trace:${replayTrace}`, '--hold-ms', '700']
const scenarios: Scenario[] = [
  {name: 'baseline (4 KiB copy per fault, raw file)', handler: 'baseline', args: [], touch: touchReplay},
  {name: 'bound: C prefetcher, raw file in memory', handler: 'bound', args: [], touch: touchReplay},
  {name: `bound on ${cores} threads (no REMOVE safety)`, handler: 'bound-threads', args: [], touch: touchReplay},
  {name: 'uffd lazy (page per fault)', handler: 'uffd', args: ['--fault-around', 'page', '--readahead', '0', '--decoders', '0'], touch: touchReplay},
  {name: 'uffd fault-around (chunk)', handler: 'uffd', args: ['--fault-around', 'chunk', '--readahead', '0'], touch: touchReplay},
  {name: 'uffd + working set as chunks (--pack none)', handler: 'uffd', args: [], touch: touchReplay, snapshot: chunksSnapshot},
  {name: 'uffd + packed working set (zstd)', handler: 'uffd', args: [], touch: touchReplay, snapshot: packedSnapshot},
  {name: 'uffd + packed working set (raw)', handler: 'uffd', args: [], touch: touchReplay, snapshot: packedRawSnapshot},
  {name: HAND_DEFAULTS, handler: 'uffd', args: [], touch: touchReplay, snapshot: handDefaultsSnapshot},
  {name: LEARNED, handler: 'uffd', args: [], touch: touchReplay, snapshot: learnedSnapshot},
  {name: 'uffd + packed working set (zstd) + populate all', handler: 'uffd', args: ['--populate', 'all'], touch: touchReplay, snapshot: packedSnapshot},
]

/** `args[0]` 'baseline', 'bound' or 'bound-threads' runs the C handler (the bounds prefetch the recorded set). */
async function resume(args: string[], client: string[], tag: string, file = snapshot): Promise<{touchMs: number; readyMs: number; stats: any; clientOut: any}> {
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const statsFile = path.join(work, `${tag}.stats.json`)
  fs.rmSync(ready, {force: true})
  const native = args[0] === 'baseline' || args[0] === 'bound' || args[0] === 'bound-threads'
  const prefetch = args[0] === 'bound' ? ['--prefetch', recordTrace] : args[0] === 'bound-threads' ? ['--prefetch', recordTrace, '--prefetch-threads', String(cores)] : []
  const t0 = performance.now()
  const handler = native
    ? start(path.join(NATIVE, 'baseline_handler'), ['--socket', socket, '--mem-file', image, '--ready-file', ready, ...prefetch])
    : start(process.execPath, [UFFD, 'resume', file, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, ...args])
  try {
    await waitForFile(ready, 30_000, handler.child)
    const readyMs = performance.now() - t0
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', image, ...client]).done
    if (c.code !== 0) throw new Error(`fc_client failed (${c.code}): ${c.stderr}`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`handler exited ${h.code}: ${h.stderr}`)
    const clientOut = JSON.parse(c.stdout.trim().split('\n').pop()!)
    const stats = native ? JSON.parse(h.stdout.trim().split('\n').pop()!) : JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    return {touchMs: clientOut.touch_ns / 1e6, readyMs, stats, clientOut}
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  for (const [file, codec] of [
    [snapshot, 'zstd'],
    [lz4Snapshot, 'lz4'],
  ]) {
    if (codec === 'lz4' && !measurePopulation) continue
    const s = run(process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', file, '--force', '--codec', codec])
    if (s.code !== 0) throw new Error(s.stderr)
  }
  // Record the working set once, in the recording order, page by page: the exact set.
  await resume(['--record', workingSet, '--fault-around', 'page', '--readahead', '0'], ['--touch', `trace:${recordTrace}`], 'record')
  const recorded = JSON.parse(fs.readFileSync(workingSet, 'utf8')) as {pages: number[]}
  for (const [file, pack] of [
    [packedSnapshot, 'zstd'],
    [packedRawSnapshot, 'raw'],
    [chunksSnapshot, 'none'],
  ]) {
    const a = run(process.execPath, [UFFD, 'working-set', 'attach', snapshot, workingSet, '-o', file, '--pack', pack])
    if (a.code !== 0) throw new Error(a.stderr)
    console.log(a.stdout.trim())
  }
  fs.copyFileSync(snapshot, learnedSnapshot)
  await resume(['--learn'], ['--touch', `trace:${recordTrace}`], 'learn', learnedSnapshot)
  await resume(['--record', handDefaultsSet], ['--touch', `trace:${recordTrace}`], 'record-defaults')
  const h = run(process.execPath, [UFFD, 'working-set', 'attach', snapshot, handDefaultsSet, '-o', handDefaultsSnapshot])
  if (h.code !== 0) throw new Error(h.stderr)
  console.log(`${image}: ${set.length} pages touched (${(fraction * 100).toFixed(0)}% in clusters of ${cluster} pages), ${recorded.pages.length} faults recorded`)

  const touch: Record<string, number[]> = {}
  const readyMs: Record<string, number[]> = {}
  const faults: Record<string, number[]> = {}
  const hits: Record<string, {copiedPages: number; hits: number; wasted: number}[]> = {}
  const populate: {uffdMs: number[]; lz4Ms: number[]; floorMs: number[]} = {uffdMs: [], lz4Ms: [], floorMs: []}
  for (let i = 0; i < runs; i++) {
    for (const sc of scenarios) {
      const r = await resume(sc.handler === 'uffd' ? sc.args : [sc.handler], sc.touch, `r${i}`, sc.snapshot)
      ;(touch[sc.name] ??= []).push(r.touchMs)
      ;(readyMs[sc.name] ??= []).push(r.readyMs)
      ;(faults[sc.name] ??= []).push(sc.handler === 'uffd' ? r.stats.faults.total : r.stats.faults)
      process.stderr.write(`run ${i + 1}/${runs} ${sc.name}: ${r.touchMs.toFixed(1)} ms\n`)
      // Hits are counted in a run of their own: clearing accessed bits costs a TLB flush per
      // prefetched block, which the timed runs must not pay.
      if (sc.handler === 'uffd' && sc.snapshot) {
        const counted = await resume([...sc.args, '--count-hits'], sc.touch, `h${i}`, sc.snapshot)
        if (counted.stats.prefetchHits) (hits[sc.name] ??= []).push(counted.stats.prefetchHits)
      }
    }
    if (!measurePopulation) continue
    // Population to completion (the client touches nothing and waits), zstd then lz4, then the floor.
    const p = await resume(['--populate', 'all'], ['--touch', 'none', '--hold-ms', '8000'], `p${i}`)
    populate.uffdMs.push(p.stats.timeToMemoryCompleteMs)
    const p4 = await resume(['--populate', 'all'], ['--touch', 'none', '--hold-ms', '8000'], `q${i}`, lz4Snapshot)
    populate.lz4Ms.push(p4.stats.timeToMemoryCompleteMs)
    const floor = JSON.parse(run(path.join(NATIVE, 'copy_floor'), ['--size', String(size)]).stdout) as {copy_ns: number}
    populate.floorMs.push(floor.copy_ns / 1e6)
    process.stderr.write(`run ${i + 1}/${runs} populate all: zstd ${p.stats.timeToMemoryCompleteMs.toFixed(0)} ms, lz4 ${p4.stats.timeToMemoryCompleteMs.toFixed(0)} ms, copy floor ${(floor.copy_ns / 1e6).toFixed(0)} ms\n`)
  }
  const lazy = median(touch[scenarios.find((sc) => sc.name.startsWith('uffd lazy'))!.name])
  const base = median(touch[scenarios.find((sc) => sc.handler === 'baseline')!.name])
  const rows = scenarios.map((sc) => {
    const ms = median(touch[sc.name])
    const h = hits[sc.name]
    const hitText = h ? `${Math.round(median(h.map((x) => x.hits)))} / ${Math.round(median(h.map((x) => x.wasted)))} of ${Math.round(median(h.map((x) => x.copiedPages)))}` : '-'
    return [sc.name, ms.toFixed(1), String(Math.round(median(faults[sc.name]))), hitText, median(readyMs[sc.name]).toFixed(0), `${(lazy / ms).toFixed(2)}x`, `${(base / ms).toFixed(2)}x`]
  })
  console.log(`\nreplaying a recorded ${(fraction * 100).toFixed(0)}% working set (clusters of ${cluster} pages) in a new order (${image}, medians of ${runs} runs)\n`)
  console.log(`learned set (one --learn resume) against one recorded by hand with the same defaults: ${(median(touch[LEARNED]) / median(touch[HAND_DEFAULTS])).toFixed(2)}x the touch time (target <= 1.2x)`)
  console.log(table(['handler', 'touch ms', 'faults', 'prefetch hits / wasted of data pages', 'ready ms', 'speed vs lazy', 'speed vs baseline'], rows))
  if (measurePopulation) {
    const f = median(populate.floorMs)
    console.log(`\npopulate all (medians of ${runs}; bulk UFFDIO_COPY floor ${f.toFixed(0)} ms)`)
    for (const [codec, ms] of [
      ['zstd', populate.uffdMs],
      ['lz4', populate.lz4Ms],
    ] as const) {
      const perRun = ms.map((m, i) => (m / populate.floorMs[i]).toFixed(2)).join(' ')
      console.log(`  ${codec}: memory complete after ${median(ms).toFixed(0)} ms; ratio ${(median(ms) / f).toFixed(2)}x the floor (per run ${perRun})`)
    }
  }
  console.log(`\nresults: ${writeResults('prefetch', {image, runs, fraction, cluster, touch, readyMs, faults, hits, populate, rows})}`)
  fs.rmSync(work, {recursive: true, force: true})
}

await main()
