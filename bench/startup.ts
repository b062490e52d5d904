/**
 * bench/startup: how long a VMM waits for `uffd resume` before it can connect. Exec to listening
 * (the ready file appears: it is written once the socket listens) of `uffd resume SNAPSHOT` with no
 * working set, against exec to exit of a bare `node -e ''`, the two run alternately so that both
 * see the same machine load; medians of --runs, and their ratio (target: at most 2.5x). With a
 * recorded working set attached the handler listens only once the set is decoded: that case is
 * reported apart, with the staging time the handler logs. The handler is stopped with SIGTERM
 * once ready, and must exit as an interrupted resume (130) with its socket and ready file gone.
 * Also exec to the first fault served, for a client that connects the moment the ready file appears.
 * Readiness is polled every 1 ms.
 *
 *   node --import tsx bench/startup.ts --image /work/data/guest-1g.raw [--runs 15] [--mib 256]
 */
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {arg, median, NATIVE, run, start, table, tempDir, UFFD, workingSetTraces, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '15'))
/** The first MiB of the image are snapshotted: start-up reads only the header and index, so size matters little. */
const mib = Number(arg('mib', '256'))
const work = tempDir('uffd-bench-startup-')
const raw = path.join(work, 'image.raw')
const snapshot = path.join(work, 'image.uffd')
const attached = path.join(work, 'image-ws.uffd')

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

/** Exec to exit of `node -e ''`. */
async function bareNode(): Promise<number> {
  const t0 = performance.now()
  const child = spawn(process.execPath, ['-e', ''], {stdio: 'ignore'})
  await new Promise((resolve) => child.on('exit', resolve))
  return performance.now() - t0
}

/** Exec to the ready file of `uffd resume FILE`, then SIGTERM; returns the time and the handler's stderr. */
async function resumeReady(file: string, tag: string): Promise<{ms: number; stderr: string}> {
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const t0 = performance.now()
  const handler = start(process.execPath, [UFFD, 'resume', file, '--socket', socket, '--ready-file', ready, '--timeout', '30'])
  try {
    while (!fs.existsSync(ready)) {
      if (handler.child.exitCode !== null) throw new Error(`uffd resume exited (${handler.child.exitCode}) before it was ready: ${(await handler.done).stderr}`)
      if (performance.now() - t0 > 30_000) throw new Error('uffd resume was not ready within 30 s')
      await sleep(1)
    }
    const ms = performance.now() - t0
    if (!fs.existsSync(socket)) throw new Error(`the ready file appeared before the socket ${socket}`)
    handler.child.kill('SIGTERM')
    const out = await handler.done
    if (out.code !== 130) throw new Error(`uffd resume exited ${out.code} on SIGTERM, not 130: ${out.stderr}`)
    if (fs.existsSync(socket) || fs.existsSync(ready)) throw new Error('uffd resume left its socket or ready file behind')
    return {ms, stderr: out.stderr}
  } finally {
    handler.child.kill('SIGKILL')
  }
}

/**
 * Exec to the first fault served: fc_client connects the moment the ready file appears and
 * touches one page (that the page holds the image's bytes is checked); its handshake and touch
 * end the time. What a VMM that connects at once waits before its first page is there.
 */
async function resumeFirstFault(file: string, tag: string, onePage: string): Promise<number> {
  const socket = path.join(work, `${tag}.sock`)
  const ready = path.join(work, `${tag}.ready`)
  const t0 = performance.now()
  const handler = start(process.execPath, [UFFD, 'resume', file, '--socket', socket, '--ready-file', ready, '--timeout', '30'])
  try {
    while (!fs.existsSync(ready)) {
      if (handler.child.exitCode !== null) throw new Error(`uffd resume exited (${handler.child.exitCode}) before it was ready: ${(await handler.done).stderr}`)
      if (performance.now() - t0 > 30_000) throw new Error('uffd resume was not ready within 30 s')
      await sleep(1)
    }
    const spawnedAt = performance.now()
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', `trace:${onePage}`, '--verify']).done
    const out = JSON.parse(c.stdout.trim().split('\n').pop() ?? '{}') as {ok?: boolean; handshake_ns: number; touch_ns: number}
    if (c.code !== 0 || !out.ok) throw new Error(`fc_client failed (${c.code}): ${c.stderr} ${c.stdout}`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`uffd resume exited ${h.code}: ${h.stderr}`)
    return spawnedAt + (out.handshake_ns + out.touch_ns) / 1e6 - t0
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  fs.writeFileSync(raw, fs.readFileSync(image).subarray(0, mib * 1024 * 1024))
  const s = run(process.execPath, [UFFD, 'snapshot', '--mem-file', raw, '-o', snapshot])
  if (s.code !== 0) throw new Error(s.stderr)
  // A working set to attach: 10% of the pages in runs of 16, recorded by one resume.
  const pages = (mib * 1024 * 1024) / 4096
  const {recordTrace} = workingSetTraces(pages, 0.1, 16, work)
  const ws = path.join(work, 'ws.json')
  const socket = path.join(work, 'record.sock')
  const ready = path.join(work, 'record.ready')
  const recorder = start(process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--record', ws, '--fault-around', 'page', '--readahead', '0'])
  while (!fs.existsSync(ready)) {
    if (recorder.child.exitCode !== null) throw new Error((await recorder.done).stderr)
    await sleep(5)
  }
  const client = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', `trace:${recordTrace}`]).done
  if (client.code !== 0) throw new Error(`fc_client failed: ${client.stderr}`)
  if ((await recorder.done).code !== 0) throw new Error('recording resume failed')
  fs.copyFileSync(snapshot, attached)
  const a = run(process.execPath, [UFFD, 'working-set', 'attach', attached, ws])
  if (a.code !== 0) throw new Error(a.stderr)

  // A page in the middle of the image that holds data (not zeros), so its chunk is decoded.
  const onePage = path.join(work, 'one-page.trace')
  const bytes = fs.readFileSync(raw)
  let page = Math.floor(pages / 2)
  while (page < pages - 1 && bytes.subarray(page * 4096, (page + 1) * 4096).every((b) => b === 0)) page++
  fs.writeFileSync(onePage, String(page * 4096))

  const node: number[] = []
  const bare: number[] = []
  const firstFault: number[] = []
  const staged: number[] = []
  const stagingMs: number[] = []
  // One warm-up of each, not counted: the first exec of anything pays for a cold page cache.
  await bareNode()
  await resumeReady(snapshot, 'warm')
  for (let i = 0; i < runs; i++) {
    node.push(await bareNode())
    bare.push((await resumeReady(snapshot, `bare${i}`)).ms)
    firstFault.push(await resumeFirstFault(snapshot, `first${i}`, onePage))
    const withSet = await resumeReady(attached, `staged${i}`)
    staged.push(withSet.ms)
    const m = /decoded in (\d+) ms/.exec(withSet.stderr)
    if (!m) throw new Error(`no staging line from uffd resume with an attached working set:\n${withSet.stderr}`)
    stagingMs.push(Number(m[1]))
  }
  const ratio = median(bare) / median(node)
  console.log(`\nexec to listening, ${mib} MiB of ${image}, medians of ${runs} runs, alternating\n`)
  console.log(
    table(
      ['what', 'median ms', 'min ms', 'max ms', 'x node -e \'\''],
      [
        ["node -e '' (exec to exit)", median(node).toFixed(0), Math.min(...node).toFixed(0), Math.max(...node).toFixed(0), '1.00'],
        ['uffd resume, no working set', median(bare).toFixed(0), Math.min(...bare).toFixed(0), Math.max(...bare).toFixed(0), ratio.toFixed(2)],
        ['uffd resume, no working set: exec to first fault served', median(firstFault).toFixed(0), Math.min(...firstFault).toFixed(0), Math.max(...firstFault).toFixed(0), (median(firstFault) / median(node)).toFixed(2)],
        ['uffd resume, attached set staged', median(staged).toFixed(0), Math.min(...staged).toFixed(0), Math.max(...staged).toFixed(0), (median(staged) / median(node)).toFixed(2)],
      ],
    ),
  )
  console.log(`\nratio (no working set): ${ratio.toFixed(2)}x; staging the attached set (the handler's own timing): median ${median(stagingMs)} ms`)
  const file = writeResults('startup', {image, mib, runs, nodeMs: node, resumeMs: bare, firstFaultMs: firstFault, stagedMs: staged, stagingMs, ratio})
  console.log(`results: ${path.relative(process.cwd(), file)}`)
}

try {
  await main()
} finally {
  fs.rmSync(work, {recursive: true, force: true})
}
