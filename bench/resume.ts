/**
 * bench/resume: `uffd resume` against the baseline handler (Firecracker's example: one 4 KiB
 * UFFDIO_COPY per fault from the mmap'd raw file), same image, same client (native/fc_client),
 * same run, scenarios interleaved so machine noise hits all of them alike. Reports medians and
 * ratios against the baseline.
 *
 * CPU placement decides a fault round trip's cost (~10 µs when handler and client share a CPU, ~20 µs
 * across CPUs), so every run measures each placement (--placements, comma-separated):
 *   split   client on CPU 1, handler confined to CPU 0 (a pinned vCPU, its handler on another core)
 *   shared  client and handler both confined to CPU 0 (the handler's best case for the baseline)
 *   client  client on CPU 1, handler free to use every CPU (uffd's decoders spread out)
 *   free    nothing pinned: wherever the scheduler puts them
 *
 *   node --import tsx bench/resume.ts --image /work/data/guest-1g.raw [--runs 5] [--sparse 0.05]
 *        [--placements split,shared,client,free] [--touches sequential,random,sparse] [--only NAME,...] [--chunk-size 256K] [--codec zstd] [--level 1] [--cold]
 */
import fs from 'node:fs'
import path from 'node:path'

import {arg, dropCaches, flag, median, NATIVE, run, start, table, tempDir, UFFD, waitForFile, writeResults, pinned, type Placement, placementsOf} from './lib.js'

interface Scenario {
  name: string
  handler: 'baseline' | 'uffd'
  handlerArgs: string[]
}

interface Measurement {
  touchMs: number
  faults: number | null
}

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
const sparse = Number(arg('sparse', '0.05'))
const cold = flag('cold')

const placements = placementsOf(arg('placements', 'split,shared,client,free'))

const work = tempDir('uffd-bench-resume-')
const snapshot = path.join(work, 'image.uffd')
const pageCount = Math.ceil(fs.statSync(image).size / 4096)

function snapshotImage(): void {
  const r = run(process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', snapshot, '--force', '--json', '--chunk-size', arg('chunk-size', '256K'), '--codec', arg('codec', 'zstd'), '--level', arg('level', '1')])
  if (r.code !== 0) throw new Error(`snapshot failed: ${r.stderr}`)
  const s = JSON.parse(r.stdout) as {fileSize: number; logicalSize: number; chunkSize: number; codecs: unknown}
  console.log(`snapshot: ${image} ${s.logicalSize} -> ${s.fileSize} bytes (${(s.logicalSize / s.fileSize).toFixed(2)}x), chunk ${s.chunkSize}`)
}

const only = arg('only', '')
const allScenarios: Scenario[] = [
  {name: 'baseline (4 KiB copy per fault, raw file)', handler: 'baseline', handlerArgs: []},
  {name: 'uffd lazy: page per fault', handler: 'uffd', handlerArgs: ['--fault-around', 'page', '--readahead', '0', '--decoders', '0']},
  {name: 'uffd fault-around = chunk', handler: 'uffd', handlerArgs: ['--fault-around', 'chunk', '--readahead', '0', '--decoders', '0']},
  {name: 'uffd fault-around 2M', handler: 'uffd', handlerArgs: ['--fault-around', '2M', '--readahead', '0', '--decoders', '0']},
  {name: 'uffd default (fault-around auto = 2M, readahead)', handler: 'uffd', handlerArgs: []},
  {name: 'uffd --populate all', handler: 'uffd', handlerArgs: ['--populate', 'all']},
  {name: 'uffd default + --record', handler: 'uffd', handlerArgs: ['--record', path.join(work, 'bench.ws')]},
]

const scenarios = only ? allScenarios.filter((s, i) => i === 0 || only.split(',').some((o) => s.name.includes(o))) : allScenarios

const allTouches: {id: string; name: string; args: string[]}[] = [
  {id: 'sequential', name: 'sequential, every page', args: ['--touch', 'sequential']},
  {id: 'random', name: 'random order, every page', args: ['--touch', 'random', '--seed', '7']},
  {id: 'sparse', name: `random ${(sparse * 100).toFixed(0)}% of pages`, args: ['--touch', 'random', '--seed', '7', '--count', String(Math.round(pageCount * sparse))]},
]
const touchIds = arg('touches', 'sequential,random,sparse').split(',')
const touches = allTouches.filter((t) => touchIds.includes(t.id))

async function measure(scenario: Scenario, touch: string[], runIndex: number, placement: Placement): Promise<Measurement> {
  const socket = path.join(work, `s-${runIndex}.sock`)
  const ready = path.join(work, `ready-${runIndex}`)
  const statsFile = path.join(work, `stats-${runIndex}.json`)
  fs.rmSync(ready, {force: true})
  if (cold) dropCaches()
  const handler =
    scenario.handler === 'baseline'
      ? start(...pinned(placement.handler, path.join(NATIVE, 'baseline_handler'), ['--socket', socket, '--mem-file', image, '--ready-file', ready]))
      : start(...pinned(placement.handler, process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, ...scenario.handlerArgs]))
  try {
    await waitForFile(ready, 30_000, handler.child)
    const client = start(...pinned(placement.client, path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', image, ...touch]))
    const c = await client.done
    if (c.code !== 0) throw new Error(`fc_client failed (${c.code}): ${c.stderr}${c.stdout}`)
    const result = JSON.parse(c.stdout.trim().split('\n').pop()!) as {touch_ns: number}
    const h = await handler.done
    if (h.code !== 0) throw new Error(`${scenario.name} exited ${h.code}: ${h.stderr}`)
    let faults: number | null = null
    if (scenario.handler === 'uffd') faults = (JSON.parse(fs.readFileSync(statsFile, 'utf8')) as {faults: {total: number}}).faults.total
    else faults = (JSON.parse(h.stdout.trim().split('\n').pop()!) as {faults?: number}).faults ?? null
    return {touchMs: result.touch_ns / 1e6, faults}
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  snapshotImage()
  const results: Record<string, Record<string, Measurement[]>> = {}
  const key = (touch: string, placement: Placement): string => `${touch} | ${placement.name}`
  for (let i = 0; i < runs; i++) {
    for (const touch of touches) {
      for (const placement of placements) {
        for (const scenario of scenarios) {
          const m = await measure(scenario, touch.args, i, placement)
          ;((results[key(touch.name, placement)] ??= {})[scenario.name] ??= []).push(m)
          process.stderr.write(`run ${i + 1}/${runs} ${touch.name} / ${placement.name} / ${scenario.name}: ${m.touchMs.toFixed(1)} ms, ${m.faults} faults\n`)
        }
      }
    }
  }
  const summary: Record<string, unknown> = {}
  for (const touch of touches) {
    for (const placement of placements) {
      const r = results[key(touch.name, placement)]
      const base = median(r[scenarios[0].name].map((m) => m.touchMs))
      const rows = scenarios.map((s) => {
        const ms = median(r[s.name].map((m) => m.touchMs))
        const faults = median(r[s.name].map((m) => m.faults ?? NaN))
        return [s.name, ms.toFixed(1), Number.isNaN(faults) ? '-' : String(Math.round(faults)), Number.isNaN(faults) ? '-' : String(Math.round(faults / (ms / 1000))), `${(base / ms).toFixed(2)}x`]
      })
      console.log(`\n${touch.name}, ${placement.name} (${image}, medians of ${runs} runs${cold ? ', caches dropped before each' : ''})\n`)
      console.log(table(['handler', 'touch ms', 'faults', 'faults/s', 'speed vs baseline'], rows))
      summary[key(touch.name, placement)] = rows
    }
  }
  console.log(`\nresults: ${writeResults('resume', {image, runs, sparse, cold, placements, argv: process.argv.slice(2), results, summary})}`)
  fs.rmSync(work, {recursive: true, force: true})
}

await main()
