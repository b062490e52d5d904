/**
 * bench/remote-shared: two handlers on one host resuming the same snapshot from one URL at once,
 * each with a client touching the same pages, with their cache directories apart (the baseline:
 * each fetches what its client needs) and with one shared --cache-dir (a handler that finds a
 * chunk claimed by the other waits for its file instead of fetching it again). Measured side by
 * side, interleaved: bytes and requests the server answered (the handlers' remote stats, summed)
 * and the time from the start until both clients have touched their pages.
 *
 * The server is bench/range-server on loopback, holding every answer back --delay-ms (an object
 * store's per-request latency); the link itself is not shaped (no network namespace: it may run
 * beside bench/remote). The clients touch --fraction of the image's pages in runs of --cluster,
 * in the same random order, every touched byte checked; no working set is attached, so every
 * chunk is fetched as it faults.
 *
 *   node --import tsx bench/remote-shared.ts --image /work/data/guest-1g.raw [--runs 3]
 *        [--delay-ms 20] [--fraction 0.1] [--cluster 16]
 * Needs root (fc_client's kernel-mode faults).
 */
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {arg, median, NATIVE, ROOT, run, start, table, tempDir, UFFD, waitForFile, workingSetTraces, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '3'))
const delayMs = Number(arg('delay-ms', '20'))
const fraction = Number(arg('fraction', '0.1'))
const cluster = Number(arg('cluster', '16'))
const work = tempDir('uffd-bench-shared-')
const snapshot = path.join(work, 'vm.uffd')
const {replayTrace} = workingSetTraces(Math.ceil(fs.statSync(image).size / 4096), fraction, cluster, work)

interface Outcome {
  ms: number
  bytesFetched: number
  requests: number
  claimWaits: number
}

/** One handler and its client; resolves with the handler's remote stats once the client is done. */
async function pair(url: string, cacheDir: string, tag: string): Promise<{touchedAt: number; remote: {bytesFetched: number; requests: number; claimWaits: number}}> {
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const statsFile = path.join(work, `${tag}.json`)
  const handler = start(process.execPath, [UFFD, 'resume', url, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--cache-dir', cacheDir])
  try {
    await waitForFile(ready, 60_000, handler.child)
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', image, '--touch', `trace:${replayTrace}`, '--verify']).done
    const touchedAt = performance.now()
    const out = JSON.parse(c.stdout.trim().split('\n').pop() ?? '{}')
    if (c.code !== 0 || !out.ok) throw new Error(`fc_client failed (${c.code}): ${c.stderr.trim()} ${c.stdout.trim()}`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`uffd resume exited ${h.code}: ${h.stderr}`)
    return {touchedAt, remote: JSON.parse(fs.readFileSync(statsFile, 'utf8')).remote}
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function scenario(url: string, shared: boolean, round: number): Promise<Outcome> {
  const caches = shared ? [fs.mkdtempSync(path.join(work, 'cache-'))] : [fs.mkdtempSync(path.join(work, 'cache-')), fs.mkdtempSync(path.join(work, 'cache-'))]
  const t0 = performance.now()
  const both = await Promise.all([0, 1].map((i) => pair(url, caches[i % caches.length], `${shared ? 's' : 'a'}${round}-${i}`)))
  for (const c of caches) fs.rmSync(c, {recursive: true, force: true})
  return {
    ms: Math.max(...both.map((b) => b.touchedAt)) - t0,
    bytesFetched: both.reduce((n, b) => n + b.remote.bytesFetched, 0),
    requests: both.reduce((n, b) => n + b.remote.requests, 0),
    claimWaits: both.reduce((n, b) => n + b.remote.claimWaits, 0),
  }
}

async function startServer(): Promise<{url: string; stop: () => void}> {
  const server = spawn(process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench/range-server.ts'), '--delay-ms', String(delayMs), `vm.uffd=${snapshot}`], {stdio: ['ignore', 'pipe', 'inherit']})
  const port = await new Promise<number>((resolve, reject) => {
    let out = ''
    server.stdout.on('data', (d) => {
      out += d
      const m = /listening (\d+)/.exec(out)
      if (m) resolve(Number(m[1]))
    })
    server.on('exit', (code) => reject(new Error(`the range server exited (${code}) before it listened`)))
  })
  return {url: `http://127.0.0.1:${port}/vm.uffd`, stop: () => server.kill('SIGTERM')}
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench/remote-shared needs root (fc_client traps kernel-mode faults)')
  const made = run(process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', snapshot, '--force'])
  if (made.code !== 0) throw new Error(`uffd snapshot failed: ${made.stderr}`)
  const server = await startServer()
  const results: {apart: Outcome[]; shared: Outcome[]} = {apart: [], shared: []}
  try {
    for (let i = 0; i < runs; i++) {
      // Interleaved, the order alternating, so that drift on a shared machine hits both alike.
      for (const shared of i % 2 === 0 ? [false, true] : [true, false]) {
        const o = await scenario(server.url, shared, i)
        results[shared ? 'shared' : 'apart'].push(o)
        process.stderr.write(`run ${i + 1}/${runs} ${shared ? 'shared' : 'apart'}: ${o.ms.toFixed(0)} ms, ${(o.bytesFetched / 2 ** 20).toFixed(1)} MiB in ${o.requests} requests, ${o.claimWaits} claim waits\n`)
      }
    }
  } finally {
    server.stop()
  }
  const med = (os: Outcome[], k: keyof Outcome): number => median(os.map((o) => o[k]))
  const rows = (['apart', 'shared'] as const).map((k) => {
    const os = results[k]
    return [k === 'apart' ? 'two cache directories (baseline)' : 'one shared cache directory', med(os, 'ms').toFixed(0), (med(os, 'bytesFetched') / 2 ** 20).toFixed(1), med(os, 'requests'), med(os, 'claimWaits')]
  })
  console.log(`\n${image}, ${(fraction * 100).toFixed(0)}% of pages in runs of ${cluster}, ${delayMs} ms per request (medians of ${runs} runs)\n`)
  console.log(table(['two handlers at once', 'ms until both touched', 'MiB fetched', 'requests', 'claim waits'], rows))
  const ratio = (k: keyof Outcome): string => (med(results.shared, k) / med(results.apart, k)).toFixed(2)
  console.log(`\nshared / apart: bytes fetched ${ratio('bytesFetched')}x, requests ${ratio('requests')}x, time ${ratio('ms')}x`)
  console.log(`\nresults: ${writeResults('remote-shared', {image, runs, delayMs, fraction, cluster, results})}`)
}

await main()
