/**
 * bench/remote: resuming from a snapshot in an object store, over a shaped link, against
 * downloading first. The "object store" is bench/range-server in a network namespace of its own
 * (bench/netns: veth, TBF limiting what it sends), adding --latency per request before its
 * headers (this kernel has no netem). Links: 1 Gbit/s with 2 ms per request and 200 Mbit/s with
 * 20 ms (--links RATE:MS,...).
 *
 * The guest touches a recorded working set: --fraction of the image's pages in runs of --cluster
 * pages, recorded once (`uffd resume --record --fault-around page`), attached to the snapshot
 * (`uffd working-set attach`), replayed by native/fc_client in another order, every touched byte
 * checked. Scenarios, interleaved, each timed from its start until the working set is touched
 * (when the client's touch phase ends; the client starts as soon as a handler is ready, as a VMM
 * would):
 *   (a) curl the raw memory file, then map it privately (Firecracker's File backend: fc_client
 *       --file-backend; the freshly written file is in the page cache);
 *   (b) curl the whole snapshot (working set attached), then `uffd resume` it from the local file;
 *   (c) `uffd resume URL`, lazily, the snapshot without a working set, empty cache directory;
 *   (d) the same, the snapshot with the working set, empty cache directory;
 *   (e) (d) again with the cache directory (d) left: every extent on local disk;
 *   (local) `uffd resume` of the same snapshot from a local file, the reference for (e).
 * Also recorded: the handler's peak RSS (VmHWM, sampled every 20 ms), bytes and requests fetched.
 *
 *   node --import tsx bench/remote.ts --image /work/data/guest-1g.raw [--runs 3]
 *        [--links 1000:2,200:20] [--fraction 0.1] [--cluster 16] [--only a,d] [--verbose]
 * Needs root (network namespaces, tc), curl and iproute2.
 */
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {arg, flag, median, workingSetTraces, NATIVE, ROOT, run, start, table, tempDir, UFFD, waitForFile, writeResults} from './lib.js'
import {createLink, NETNS, removeLink, SERVER_ADDRESS, shapeLink} from './netns.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '3'))
const fraction = Number(arg('fraction', '0.1'))
const cluster = Number(arg('cluster', '16'))
const only = arg('only', '')
/** --verbose: print each handler's log and its run stats (for looking into a scenario). */
const verbose = flag('verbose')
const links = arg('links', '1000:2,200:20')
  .split(',')
  .map((l) => {
    const [mbit, ms] = l.split(':').map(Number)
    return {mbit, latencyMs: ms, name: `${mbit >= 1000 ? `${mbit / 1000} Gbit/s` : `${mbit} Mbit/s`}, ${ms} ms per request`}
  })
const work = tempDir('uffd-bench-remote-')
const plain = path.join(work, 'plain.uffd')
const withSet = path.join(work, 'ws.uffd')
const pages = Math.ceil(fs.statSync(image).size / 4096)

const {set, recordTrace, replayTrace} = workingSetTraces(pages, fraction, cluster, work)

/** Peak RSS of a process (VmHWM) until it exits, sampled: the last sample is the peak so far. */
function watchPeakRss(pid: number): {stop: () => number} {
  let peak = 0
  const sample = (): void => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
      if (m) peak = Math.max(peak, Number(m[1]) * 1024)
    } catch {
      // exited
    }
  }
  const timer = setInterval(sample, 20)
  return {
    stop: () => {
      clearInterval(timer)
      return peak
    },
  }
}

interface Outcome {
  /** Start of the scenario to the end of the client's touch phase. */
  ms: number
  downloadMs: number
  /** Start of the scenario until the handler was ready (after the download, if any); null without a handler. */
  readyMs: number | null
  rssBytes: number | null
  remote: {bytesFetched: number; requests: number; diskHits: number; waitMs: number} | null
}

/** Runs fc_client against `socket` (or on a file with --file-backend); returns when its touch phase ended. */
async function touch(args: string[], verify: boolean): Promise<number> {
  const spawnedAt = performance.now()
  const c = await start(path.join(NATIVE, 'fc_client'), ['--image', image, '--touch', `trace:${replayTrace}`, ...(verify ? ['--verify'] : []), ...args]).done
  const out = JSON.parse(c.stdout.trim().split('\n').pop() ?? '{}')
  if (c.code !== 0 || !out.ok) throw new Error(`fc_client failed (${c.code}): ${c.stderr.trim()} ${c.stdout.trim()}`)
  return spawnedAt + (out.handshake_ns + out.touch_ns) / 1e6
}

/** `uffd resume SNAPSHOT` with a client touching the working set; times from `t0`. */
async function resume(snapshot: string, extra: string[], t0: number, tag: string): Promise<Omit<Outcome, 'downloadMs'>> {
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const statsFile = path.join(work, `${tag}.stats.json`)
  for (const f of [ready, statsFile]) fs.rmSync(f, {force: true})
  const handler = start(process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, ...extra])
  const rss = watchPeakRss(handler.child.pid!)
  try {
    await waitForFile(ready, 60_000, handler.child)
    const readyMs = performance.now() - t0
    const touched = await touch(['--socket', socket], true)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`uffd resume exited ${h.code}: ${h.stderr}`)
    const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    if (verbose) process.stderr.write(`${tag}: handler said:\n${h.stderr}stats: ${JSON.stringify(stats)}\n`)
    const r = stats.remote
    return {ms: touched - t0, readyMs, rssBytes: rss.stop(), remote: r ? {bytesFetched: r.bytesFetched, requests: r.requests, diskHits: r.diskHits, waitMs: r.waitMs} : null}
  } finally {
    rss.stop()
    handler.child.kill('SIGKILL')
  }
}

function download(url: string, file: string): number {
  const t0 = performance.now()
  const r = run('curl', ['-sSf', '-o', file, url])
  if (r.code !== 0) throw new Error(`curl ${url} failed (${r.code}): ${r.stderr}`)
  return performance.now() - t0
}

type Scenario = {key: string; name: string; go: (base: string, round: number) => Promise<Outcome>}

function scenarios(): Scenario[] {
  const warmCache = path.join(work, 'cache-warm')
  return [
    {
      key: 'a',
      name: '(a) download the raw memory file, then map it (File backend)',
      go: async (base) => {
        const file = path.join(work, 'download.raw')
        const t0 = performance.now()
        const downloadMs = download(`${base}/raw`, file)
        const touched = await touch(['--file-backend', '--image', file], false)
        fs.rmSync(file)
        return {ms: touched - t0, downloadMs, readyMs: null, rssBytes: null, remote: null}
      },
    },
    {
      key: 'b',
      name: '(b) download the snapshot, then uffd resume it',
      go: async (base, round) => {
        const file = path.join(work, 'download.uffd')
        const t0 = performance.now()
        const downloadMs = download(`${base}/ws.uffd`, file)
        const r = await resume(file, [], t0, `b${round}`)
        fs.rmSync(file)
        return {...r, downloadMs}
      },
    },
    {
      key: 'c',
      name: '(c) uffd resume URL, no working set, empty cache',
      go: async (base, round) => {
        const cache = fs.mkdtempSync(path.join(work, 'cache-'))
        const r = await resume(`${base}/plain.uffd`, ['--cache-dir', cache], performance.now(), `c${round}`)
        fs.rmSync(cache, {recursive: true, force: true})
        return {...r, downloadMs: 0}
      },
    },
    {
      key: 'd',
      name: '(d) uffd resume URL, working set, empty cache',
      go: async (base, round) => {
        fs.rmSync(warmCache, {recursive: true, force: true})
        fs.mkdirSync(warmCache)
        return {...(await resume(`${base}/ws.uffd`, ['--cache-dir', warmCache], performance.now(), `d${round}`)), downloadMs: 0}
      },
    },
    {
      key: 'e',
      name: '(e) uffd resume URL, working set, warm cache',
      go: async (base, round) => ({...(await resume(`${base}/ws.uffd`, ['--cache-dir', warmCache], performance.now(), `e${round}`)), downloadMs: 0}),
    },
    {
      key: 'local',
      name: 'uffd resume of the same snapshot from a local file',
      go: async (_base, round) => ({...(await resume(withSet, [], performance.now(), `l${round}`)), downloadMs: 0}),
    },
  ]
}

/** --only a,d,...: a subset of the scenarios, for looking into one; the targets need them all. */
function selected(): Scenario[] {
  const keys = only ? only.split(',') : []
  return scenarios().filter((sc) => !keys.length || keys.includes(sc.key))
}

function uffdOrThrow(args: string[]): string {
  const r = run(process.execPath, [UFFD, ...args])
  if (r.code !== 0) throw new Error(`uffd ${args.join(' ')} failed (${r.code}): ${r.stderr}`)
  return r.stdout
}

async function startServer(latencyMs: number): Promise<{base: string; stop: () => void}> {
  const server = spawn('ip', ['netns', 'exec', NETNS, process.execPath, '--import', 'tsx', path.join(ROOT, 'bench/range-server.ts'), '--host', SERVER_ADDRESS, '--delay-ms', String(latencyMs), `raw=${image}`, `plain.uffd=${plain}`, `ws.uffd=${withSet}`], {stdio: ['ignore', 'pipe', 'inherit']})
  const port = await new Promise<number>((resolve, reject) => {
    let out = ''
    server.stdout.on('data', (d) => {
      out += d
      const m = /listening (\d+)/.exec(out)
      if (m) resolve(Number(m[1]))
    })
    server.on('exit', (code) => reject(new Error(`the range server exited (${code}) before it listened`)))
  })
  return {base: `http://${SERVER_ADDRESS}:${port}`, stop: () => server.kill('SIGTERM')}
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench/remote needs root (network namespaces and tc)')
  uffdOrThrow(['snapshot', '--mem-file', image, '-o', plain, '--force'])
  const workingSet = path.join(work, 'ws.json')
  const socket = path.join(work, 'record.sock')
  const ready = path.join(work, 'record.ready')
  const recorder = start(process.execPath, [UFFD, 'resume', plain, '--socket', socket, '--ready-file', ready, '--record', workingSet, '--fault-around', 'page', '--readahead', '0'])
  await waitForFile(ready, 60_000, recorder.child)
  const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', image, '--touch', `trace:${recordTrace}`]).done
  if (c.code !== 0) throw new Error(`recording client failed: ${c.stderr}`)
  if ((await recorder.done).code !== 0) throw new Error('recording resume failed')
  console.log(uffdOrThrow(['working-set', 'attach', plain, workingSet, '-o', withSet]).trim())
  const sizes = {raw: fs.statSync(image).size, plain: fs.statSync(plain).size, withSet: fs.statSync(withSet).size}
  console.log(`${image}: ${set.length} pages in the working set (${(fraction * 100).toFixed(0)}% in runs of ${cluster}); raw ${sizes.raw} B, snapshot ${sizes.plain} B, with working set ${sizes.withSet} B`)

  const results: Record<string, Record<string, Outcome[]>> = {}
  createLink()
  try {
    for (const link of links) {
      shapeLink(link.mbit * 1e6)
      const server = await startServer(link.latencyMs)
      try {
        for (let i = 0; i < runs; i++) {
          for (const sc of selected()) {
            const o = await sc.go(server.base, i)
            ;((results[link.name] ??= {})[sc.key] ??= []).push(o)
            process.stderr.write(`${link.name} run ${i + 1}/${runs} ${sc.name}: ${o.ms.toFixed(0)} ms${o.rssBytes ? `, RSS ${(o.rssBytes / 2 ** 20).toFixed(0)} MiB` : ''}${o.remote ? `, fetched ${(o.remote.bytesFetched / 2 ** 20).toFixed(1)} MiB in ${o.remote.requests} requests` : ''}\n`)
          }
        }
      } finally {
        server.stop()
      }
    }
  } finally {
    removeLink()
  }

  for (const link of links) {
    const r = results[link.name]
    const med = (k: string): number => (r[k] ? median(r[k].map((o) => o.ms)) : NaN)
    const rows = selected().map((sc) => {
      const os = r[sc.key]
      const rss = os[0].rssBytes === null ? '-' : (median(os.map((o) => o.rssBytes!)) / 2 ** 20).toFixed(0)
      const fetched = os[0].remote ? `${(median(os.map((o) => o.remote!.bytesFetched)) / 2 ** 20).toFixed(1)} MiB / ${median(os.map((o) => o.remote!.requests))}` : '-'
      const readyMs = os[0].readyMs === null ? '-' : median(os.map((o) => o.readyMs!)).toFixed(0)
      const downloadMs = os[0].downloadMs ? median(os.map((o) => o.downloadMs)).toFixed(0) : '-'
      return [sc.name, med(sc.key).toFixed(0), downloadMs, readyMs, `${(med('a') / med(sc.key)).toFixed(1)}x`, `${(med('b') / med(sc.key)).toFixed(1)}x`, rss, fetched]
    })
    console.log(`\n${link.name} (medians of ${runs} runs; time from start until the working set is touched)\n`)
    console.log(table(['scenario', 'ms', 'download ms', 'ready ms', 'speed vs (a)', 'speed vs (b)', 'handler peak RSS MiB', 'fetched / requests'], rows))
    console.log(`\n(d) vs (a): ${(med('a') / med('d')).toFixed(1)}x (target >= 10x); (d) vs (b): ${(med('b') / med('d')).toFixed(1)}x (target >= 3x); (e) / local: ${(med('e') / med('local')).toFixed(2)}x (target <= 1.5x)`)
  }
  console.log(`\nresults: ${writeResults('remote', {image, runs, fraction, cluster, links, sizes, results})}`)
  fs.rmSync(work, {recursive: true, force: true})
}

await main()
