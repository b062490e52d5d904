/**
 * bench/sealed: what sealing costs, against the same snapshot unsealed, side by side in every run
 * (order rotated), medians over --runs. One image, snapshotted plain, encrypted (--encrypt), and
 * encrypted and signed (--sign-key, resumed with --verify-key: every unit's digest checked too):
 *
 *   (a) `uffd snapshot` wall time (target: encrypted within 1.2x of plain)
 *   (b) resume with a recorded working set attached (10% of pages in runs of 16, replayed in
 *       another order by native/fc_client): exec of `uffd resume` until the set is touched
 *       (target: within 1.10x)
 *   (c) a sequential touch of the whole image without a working set: exec until every page is
 *       touched (target: within 1.15x)
 *
 * Every resume's client checks every byte it touches against the image (fc_client --verify).
 *
 *   node --import tsx bench/sealed.ts --image /work/data/guest-1g.raw [--runs 5] [--keep]
 *
 * Files live in a tmpfs directory (/dev/shm), so the disk does not decide.
 */
import crypto from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {arg, flag, median, NATIVE, run, start, table, UFFD, waitForFile, workingSetTraces, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
const keep = flag('keep')
const work = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'uffd-bench-sealed-'))
const at = (name: string): string => path.join(work, name)
const pages = Math.ceil(fs.statSync(image).size / 4096)

interface Variant {
  name: string
  /** Flags of `uffd snapshot` and `working-set attach`. */
  write: string[]
  /** Flags of every reading command. */
  read: string[]
}

const KEY = at('key')
const SIGN = at('sign.pem')
const PUB = at('sign.pub')
const VARIANTS: Variant[] = [
  {name: 'plain', write: [], read: []},
  {name: 'encrypted', write: ['--encrypt', '--key-file', KEY], read: ['--key-file', KEY]},
  {name: 'encrypted + signed', write: ['--encrypt', '--key-file', KEY, '--sign-key', SIGN], read: ['--key-file', KEY, '--verify-key', PUB]},
]
const file = (v: Variant, kind: 'full' | 'ws'): string => at(`${v.name.replace(/\W+/g, '-')}.${kind}.uffd`)

function uffd(args: string[]): {wallMs: number; json: any} {
  const t0 = performance.now()
  const r = run(process.execPath, [UFFD, ...args, '--json'])
  const wallMs = performance.now() - t0
  if (r.code !== 0) throw new Error(`uffd ${args.join(' ')} failed (${r.code}): ${r.stderr}${r.stdout}`)
  return {wallMs, json: JSON.parse(r.stdout)}
}

/** Exec of the handler until fc_client has touched what `touch` says (its bytes checked). */
async function resume(snapshot: string, read: string[], touch: string[], tag: string, extra: string[] = []): Promise<number> {
  const socket = at(`${tag}.sock`)
  const ready = at(`${tag}.ready`)
  fs.rmSync(ready, {force: true})
  const t0 = performance.now()
  const handler = start(process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready, ...read, ...extra])
  try {
    await waitForFile(ready, 60_000, handler.child)
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', image, '--verify', ...touch]).done
    const ms = performance.now() - t0
    if (c.code !== 0) throw new Error(`fc_client on ${snapshot} failed (${c.code}): ${c.stderr}${c.stdout}`)
    const out = JSON.parse(c.stdout.trim().split('\n').pop()!)
    if (out.verify_errors !== 0) throw new Error(`${snapshot}: fc_client found ${out.verify_errors} wrong pages`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`uffd resume of ${snapshot} exited ${h.code}: ${h.stderr}`)
    return ms
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  fs.writeFileSync(KEY, crypto.randomBytes(32), {mode: 0o600})
  for (const [cmd, args] of [
    ['openssl', ['genpkey', '-algorithm', 'ed25519', '-out', SIGN]],
    ['openssl', ['pkey', '-in', SIGN, '-pubout', '-out', PUB]],
  ] as const) {
    const r = run(cmd, [...args])
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`)
  }
  const {recordTrace, replayTrace, set} = workingSetTraces(pages, 0.1, 16, work)
  const snapshotMs: Record<string, number[]> = {}
  const withSetMs: Record<string, number[]> = {}
  const sequentialMs: Record<string, number[]> = {}
  for (let i = 0; i < runs; i++) {
    const order = VARIANTS.map((_, k) => VARIANTS[(k + i) % VARIANTS.length])
    for (const v of order) (snapshotMs[v.name] ??= []).push(uffd(['snapshot', '--mem-file', image, '-o', file(v, 'full'), '--force', ...v.write]).wallMs)
    if (i === 0) {
      // The set is recorded page by page on each snapshot (a set names the header it was recorded on), and attached.
      for (const [k, v] of VARIANTS.entries()) {
        const ws = at(`set-${k}.ws`)
        await resume(file(v, 'full'), v.read, ['--touch', `trace:${recordTrace}`], `record${k}`, ['--record', ws, '--fault-around', 'page', '--readahead', '0'])
        uffd(['working-set', 'attach', file(v, 'full'), ws, '-o', file(v, 'ws'), ...v.write.filter((a) => a !== '--encrypt')])
      }
      for (const v of VARIANTS) uffd(['verify', file(v, 'ws'), '--against', image, ...v.read])
      console.log(`${image}: ${pages} pages, working set ${set.length} pages (10% in runs of 16); snapshots verified against the image`)
    }
    for (const v of order) (withSetMs[v.name] ??= []).push(await resume(file(v, 'ws'), v.read, ['--touch', `trace:${replayTrace}`], `w${i}`))
    for (const v of order) (sequentialMs[v.name] ??= []).push(await resume(file(v, 'full'), v.read, ['--touch', 'sequential'], `s${i}`))
    process.stderr.write(`run ${i + 1}/${runs}: ${VARIANTS.map((v) => `${v.name} snapshot ${snapshotMs[v.name][i].toFixed(0)} ms, set ${withSetMs[v.name][i].toFixed(0)} ms, sequential ${sequentialMs[v.name][i].toFixed(0)} ms`).join('; ')}\n`)
  }
  const base = VARIANTS[0].name
  const ratio = (m: Record<string, number[]>, name: string): string => `${(median(m[name]) / median(m[base])).toFixed(3)}x`
  console.log(`\nmedians of ${runs} runs (ratio to plain; targets: snapshot <= 1.2x, resume with working set <= 1.10x, sequential <= 1.15x)\n`)
  console.log(
    table(
      ['variant', '(a) snapshot ms', 'ratio', '(b) resume + working set ms', 'ratio', '(c) sequential touch ms', 'ratio'],
      VARIANTS.map((v) => [v.name, median(snapshotMs[v.name]).toFixed(0), ratio(snapshotMs, v.name), median(withSetMs[v.name]).toFixed(0), ratio(withSetMs, v.name), median(sequentialMs[v.name]).toFixed(0), ratio(sequentialMs, v.name)]),
    ),
  )
  console.log(`\nresults: ${writeResults('sealed', {image, runs, snapshotMs, withSetMs, sequentialMs})}`)
}

main()
  .catch((error) => {
    console.error(error)
    process.exitCode = 1
  })
  .finally(() => {
    if (keep) console.log(`work directory kept: ${work}`)
    else fs.rmSync(work, {recursive: true, force: true})
  })
