/**
 * bench/fuzz: the long fuzz run (test/fuzz.test.ts is the bounded one in CI; the engine and what
 * counts as a crash are test/helpers/fuzz.ts). Build first (`npm run build`): the CLI sample runs
 * bin/run.js.
 *
 *   node --import tsx bench/fuzz.ts [--seed N] [--snapshots 12000] [--working-sets 3000]
 *     [--stats-files 3000] [--cli 60] [--handshakes 0] [--from 0] [--hang-ms 10000]
 *
 * --handshakes N plays N hostile handshakes (test/helpers/hostile-handshakes.ts) against one
 * `uffd resume --serve`, a real verifying client every 100.
 *
 * Cases from..from+N of each kind run in-process in a worker thread that reports each case it
 * starts; one that runs past --hang-ms is a hang: the worker is stopped and a new one goes on after
 * it. Then --cli of the snapshot cases (spread over the run) go through `uffd verify` and `uffd
 * stats`, and a quarter as many working sets through `working-set merge` and `attach` and stats
 * files through `uffd stats`. Exits 1 on any crash or hang, each listed with the command that
 * makes it again (--seed, --from, and 1 case). Results: bench/results/fuzz-*.json.
 */
import fs from 'node:fs'
import path from 'node:path'
import {isMainThread, parentPort, workerData, type Worker} from 'node:worker_threads'

import {startWorker} from '../src/core/workers.js'
import {checkAttach, checkCli, checkSnapshot, checkStatsFile, checkWorkingSet, type Corpus, FuzzCrash, jsonCase, makeCorpus, Rng, runCase, snapshotCase, Tally} from '../test/helpers/fuzz.js'
import {runHostileSession} from '../test/helpers/hostile-handshakes.js'
import {makeImage} from '../test/helpers/images.js'
import {arg, NATIVE, table, tempDir, UFFD, writeResults} from './lib.js'

type Kind = 'snapshot' | 'working set' | 'stats file'

interface Job {
  kind: Kind
  seed: number
  from: number
  to: number
  dir: string
}

/** Before each case its number; after it, what it ended in; then that the job is done. */
type FromWorker = {started: number} | {finished: ReturnType<Tally['toJSON']>} | {done: true}

/** One in-process case of `kind`. */
function runOne(tally: Tally, corpus: Corpus, job: Job, i: number): void {
  const {seed, dir} = job
  if (job.kind === 'snapshot') {
    const c = snapshotCase(corpus, seed, i)
    runCase(tally, 'snapshot', seed, i, c.how, () => checkSnapshot(c.bytes, `case-${i}.uffd`))
    if (i % 10 === 0) runCase(tally, 'attach', seed, i, c.how, () => checkAttach(c.bytes, dir, new Rng(seed, 1_000_000 + i)))
  } else if (job.kind === 'working set') {
    const c = jsonCase(corpus.workingSet.text, seed, i, 1)
    runCase(tally, 'working set', seed, i, c.how, () => checkWorkingSet(corpus, c.text, dir, i % 8 === 0))
  } else {
    const c = jsonCase(corpus.report.text, seed, i, 2)
    runCase(tally, 'stats file', seed, i, c.how, () => checkStatsFile(c.text, dir))
  }
}

if (!isMainThread) {
  const job = workerData as Job
  const corpus = await makeCorpus(path.join(job.dir, 'corpus'))
  for (let i = job.from; i < job.to; i++) {
    parentPort!.postMessage({started: i} satisfies FromWorker)
    const tally = new Tally()
    runOne(tally, corpus, job, i)
    parentPort!.postMessage({finished: tally.toJSON()} satisfies FromWorker)
  }
  parentPort!.postMessage({done: true} satisfies FromWorker)
} else {
  await main()
}

async function main(): Promise<void> {
  const seed = Number(arg('seed', String(Date.now() % 1_000_000)))
  const from = Number(arg('from', '0'))
  const counts: Record<Kind, number> = {snapshot: Number(arg('snapshots', '12000')), 'working set': Number(arg('working-sets', '3000')), 'stats file': Number(arg('stats-files', '3000'))}
  const cliCases = Number(arg('cli', '60'))
  const handshakes = Number(arg('handshakes', '0'))
  const hangMs = Number(arg('hang-ms', '10000'))
  const dir = tempDir('uffd-fuzz-')
  const started = performance.now()
  const tally = new Tally()
  const hangs: {kind: Kind; index: number}[] = []
  const seconds: Record<string, number> = {}
  console.log(`seed ${seed}, cases ${from}.. (${Object.entries(counts).map(([k, n]) => `${n} ${k}s`).join(', ')}), ${cliCases} through the CLI; work in ${dir}`)
  try {
    for (const kind of Object.keys(counts) as Kind[]) {
      const kindStarted = performance.now()
      let next = from
      const end = from + counts[kind]
      while (next < end) {
        const r = await runWorker({kind, seed, from: next, to: end, dir: path.join(dir, `worker-${kind.replace(' ', '-')}-${next}`)}, hangMs, tally)
        if (r.stoppedAt === undefined) break
        if (r.error === undefined) {
          hangs.push({kind, index: r.stoppedAt})
          console.log(`${kind} case ${r.stoppedAt}: no progress for ${hangMs} ms (a hang); going on after it`)
        } else {
          // The worker itself died (out of memory, an error outside any case's handling).
          tally.crash(kind, seed, r.stoppedAt, 'the worker died', new FuzzCrash('worker', r.error))
        }
        next = r.stoppedAt + 1
      }
      seconds[kind] = (performance.now() - kindStarted) / 1000
      console.log(`${kind}s: ${counts[kind]} in ${seconds[kind].toFixed(1)} s`)
    }

    const cliStarted = performance.now()
    const corpus = await makeCorpus(path.join(dir, 'cli-corpus'))
    const cli = path.join(dir, 'cli')
    fs.mkdirSync(cli)
    const spread = (n: number, of: number): number[] => Array.from({length: Math.min(n, of)}, (_, k) => from + Math.floor((k * of) / Math.min(n, of)))
    for (const i of spread(cliCases, counts.snapshot)) {
      const c = snapshotCase(corpus, seed, i)
      const file = path.join(cli, `case-${i}.uffd`)
      fs.writeFileSync(file, c.bytes)
      runCase(tally, 'cli verify', seed, i, c.how, () => checkCli(['verify', file], hangMs * 6))
      runCase(tally, 'cli stats', seed, i, c.how, () => checkCli(['stats', file], hangMs * 6))
    }
    for (const i of spread(Math.ceil(cliCases / 4), Math.min(counts['working set'], counts['stats file']))) {
      const c = jsonCase(corpus.workingSet.text, seed, i, 1)
      const ws = path.join(cli, `case-${i}.ws`)
      fs.writeFileSync(ws, c.text)
      runCase(tally, 'cli merge', seed, i, c.how, () => checkCli(['working-set', 'merge', ws, corpus.workingSet.file, '-o', path.join(cli, 'merged.ws')], hangMs * 6))
      runCase(tally, 'cli attach', seed, i, c.how, () => checkCli(['working-set', 'attach', corpus.snapshots[0].file, ws, '-o', path.join(cli, 'attached.uffd')], hangMs * 6))
      const s = jsonCase(corpus.report.text, seed, i, 2)
      const stats = path.join(cli, `case-${i}.json`)
      fs.writeFileSync(stats, s.text)
      runCase(tally, 'cli stats file', seed, i, s.how, () => checkCli(['stats', stats], hangMs * 6))
    }
    seconds.cli = (performance.now() - cliStarted) / 1000
    if (handshakes > 0) {
      const hsStarted = performance.now()
      const image = path.join(dir, 'hostile.raw')
      fs.writeFileSync(image, makeImage('mixed', 8 << 20, 5))
      const snapshot = path.join(dir, 'hostile.uffd')
      checkCli(['snapshot', '--mem-file', image, '-o', snapshot], hangMs * 6)
      const r = await runHostileSession({uffdBin: UFFD, fcClient: path.join(NATIVE, 'fc_client'), snapshot, image, size: 8 << 20, dir, seed, from, count: handshakes, vmEvery: 100, handshakeSeconds: 2})
      seconds.handshakes = (performance.now() - hsStarted) / 1000
      const bad = [...(r.handlerDied ? [`the handler died after ${r.handlerDied}`] : []), ...r.vmFailures.map((f) => `a real VM failed ${f}`), ...r.hangs.map((h) => `held past its deadline: ${h}`), ...(r.exitCode === 130 ? [] : [`SIGTERM exit ${r.exitCode}, not 130`]), ...Object.entries(r.unexpectedCodes).map(([code, m]) => `unexpected code ${code}: ${m}`)]
      console.log(`hostile handshakes: ${r.cases} cases, ${r.result.rejected.length} refused, ${r.result.clients.length} taken as clients, ${r.vms} real VMs verified, in ${seconds.handshakes.toFixed(1)} s: ${bad.length} problems`)
      for (const b of bad) tally.crash('handshake', seed, from, b, new FuzzCrash('handshake', new Error(b)))
    }
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }

  const total = (performance.now() - started) / 1000
  console.log(
    `\n${table(
      ['kind', 'cases', 'outcomes', 'slowest ms'],
      [...tally.counts].map(([kind, outcomes]) => [kind, [...outcomes.values()].reduce((a, b) => a + b, 0), [...outcomes].sort(([a], [b]) => a.localeCompare(b)).map(([o, n]) => `${o} ${n}`).join(', '), (tally.slowest.get(kind)?.ms ?? 0).toFixed(1)]),
    )}`,
  )
  for (const c of tally.crashes) {
    console.log(`\nCRASH ${c.kind} case ${c.index}: ${c.how}\n  ${c.message}\n  again: node --import tsx bench/fuzz.ts --seed ${c.seed} --from ${c.index} ${flagFor(c.kind)} 1 --cli 0\n${c.stack ?? ''}`)
  }
  for (const h of hangs) console.log(`\nHANG ${h.kind} case ${h.index}\n  again: node --import tsx bench/fuzz.ts --seed ${seed} --from ${h.index} ${flagFor(h.kind)} 1 --cli 0`)
  console.log(`\n${tally.cases} cases in ${total.toFixed(1)} s (${Object.entries(seconds).map(([k, s]) => `${k} ${s.toFixed(1)} s`).join(', ')}): ${tally.crashes.length} crashes, ${hangs.length} hangs`)
  const results = writeResults('fuzz', {seed, from, counts, cliCases, hangMs, seconds: {...seconds, total}, cases: tally.cases, outcomes: tally.summary(), slowest: Object.fromEntries(tally.slowest), crashes: tally.crashes, hangs})
  console.log(`results: ${results}`)
  process.exitCode = tally.crashes.length + hangs.length > 0 ? 1 : 0
}

function flagFor(kind: string): string {
  if (kind.includes('working')) return '--snapshots 0 --stats-files 0 --working-sets'
  if (kind.includes('stats file')) return '--snapshots 0 --working-sets 0 --stats-files'
  return '--working-sets 0 --stats-files 0 --snapshots'
}

/**
 * Runs a job in a worker, merging each case's tally as it finishes. Returns where it stopped
 * early: the case that made no progress for `hangMs` (a hang), or that the worker died in.
 */
function runWorker(job: Job, hangMs: number, tally: Tally): Promise<{stoppedAt?: number; error?: unknown}> {
  fs.mkdirSync(job.dir, {recursive: true})
  return new Promise((resolve) => {
    const worker: Worker = startWorker(import.meta.url, 'fuzz', job)
    let current = job.from
    // Starting (tsx, making the corpus: ~4 s) is not a case: a minute before the first one.
    let last = performance.now() + 60_000
    let settled = false
    const settle = (result: {stoppedAt?: number; error?: unknown}): void => {
      if (settled) return
      settled = true
      clearInterval(watchdog)
      void worker.terminate().then(() => resolve(result))
    }
    const watchdog = setInterval(() => {
      if (performance.now() - last > hangMs) settle({stoppedAt: current})
    }, 250)
    worker.on('message', (m: FromWorker) => {
      last = performance.now()
      if ('started' in m) current = m.started
      else if ('finished' in m) tally.merge(m.finished)
      else settle({})
    })
    worker.on('error', (error) => settle({stoppedAt: current, error}))
    worker.on('exit', (code) => settle(code === 0 ? {} : {stoppedAt: current, error: new Error(`the worker exited with ${code}`)}))
  })
}
