// SIGINT/SIGTERM while a working set is being attached (`uffd working-set attach`, and the attach
// step of `uffd snapshot --working-set`): the built CLI runs as a real process and gets a real
// signal once its temporary file exists. It must exit 130 saying so, leave no temporary file and
// leave the destination as it was. Packing at zstd level 19 makes the attach take seconds.
import {createHash} from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {SnapshotReader} from '../src/snapshot/reader.js'
import {uffd, uffdSpawn} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {exitWithin, killAll, track, waitFor} from './helpers/processes.js'
import {type ChildProcess} from 'node:child_process'

const MiB = 1024 * 1024
const live = new Set<ChildProcess>()
afterEach(() => killAll(live))

let dir: string
let image: string
let snapshot: string
let workingSet: string
beforeAll(() => {
  dir = tempDir('uffd-attach-signals-')
  image = path.join(dir, 'vm.mem')
  fs.writeFileSync(image, makeImage('compressible', 64 * MiB, 3))
  snapshot = path.join(dir, 'vm.uffd')
  // lz4 writes it fast; the level it records (19) is what attach packs with under --pack zstd.
  const made = uffd(['snapshot', '--mem-file', image, '-o', snapshot, '--codec', 'lz4', '--level', '19'])
  if (made.status !== 0) throw new Error(`uffd snapshot failed:\n${made.stderr}`)
  const reader = SnapshotReader.open(snapshot)
  const {logicalSize, pageSize, pageCount} = reader.geometry
  const headerCrc = reader.header.headerCrc
  reader.close()
  const pages = [...Array(pageCount).keys()]
  workingSet = path.join(dir, 'vm.ws')
  fs.writeFileSync(workingSet, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize, pageSize, headerCrc}, runs: 1, pages, firstTouchMs: pages.map(() => 0)}))
})
afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

function digest(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex')
}

/** The temporary file an AtomicFile of process `pid` writes before it becomes `destination`. */
function temporaryOf(destination: string, pid: number): string | undefined {
  const base = path.basename(destination)
  return fs.readdirSync(path.dirname(destination)).find((f) => f.startsWith(`.${base}.${pid}.`) && f.endsWith('.tmp') && !f.endsWith('.unattached.tmp'))
}

/** Starts `args`, waits until it writes the attached file's temporary, then sends `signal`. */
async function interruptAttach(args: string[], destination: string, signal: NodeJS.Signals, json = false) {
  const proc = track(live, uffdSpawn(args), json)
  const pid = proc.child.pid!
  await waitFor('the attach to start writing', () => temporaryOf(destination, pid) !== undefined || proc.exited, 30_000)
  expect(proc.exited, `exited before attaching:\n${proc.stderr()}`).toBe(false)
  // Well inside the packing (seconds of zstd level 19), not at its first step.
  await new Promise((resolve) => setTimeout(resolve, 300))
  expect(proc.exited, `finished before the signal; the test needs a slower attach:\n${proc.stderr()}`).toBe(false)
  const signalledAt = Date.now()
  proc.child.kill(signal)
  const out = await exitWithin(proc, 10_000, `${args.slice(0, 2).join(' ')} (${signal})`)
  return {out, tookMs: Date.now() - signalledAt}
}

function temporaries(): string[] {
  return fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))
}

describe('a signal while a working set is attached', () => {
  it('working-set attach in place, SIGINT: exit 130 at once, the snapshot as it was, no temporary file', async () => {
    const target = path.join(dir, 'in-place.uffd')
    fs.copyFileSync(snapshot, target)
    const before = digest(target)
    const {out, tookMs} = await interruptAttach(['working-set', 'attach', target, workingSet, '--pack', 'zstd'], target, 'SIGINT')
    expect(out.code, out.stderr).toBe(130)
    expect(out.signal).toBeNull()
    expect(tookMs).toBeLessThan(3_000)
    expect(out.stderr.trim()).toBe(`uffd working-set attach: interrupted by SIGINT; ${target} left as it was`)
    expect(temporaries()).toEqual([])
    expect(digest(target)).toBe(before)
  })

  it('working-set attach -o over an existing file, SIGTERM, --json: the INTERRUPTED error object, the old file kept', async () => {
    const output = path.join(dir, 'attached.uffd')
    fs.writeFileSync(output, 'the previous output')
    const {out} = await interruptAttach(['working-set', 'attach', snapshot, workingSet, '-o', output, '--pack', 'zstd', '--json'], output, 'SIGTERM', true)
    expect(out.code, out.stderr).toBe(130)
    expect(out.json).toEqual({error: {code: 'INTERRUPTED', message: `interrupted by SIGTERM; ${output} left as it was`, exitCode: 130}})
    expect(temporaries()).toEqual([])
    expect(fs.readFileSync(output, 'utf8')).toBe('the previous output')
  })

  it('snapshot --working-set --force, SIGINT while attaching: exit 130, the old output kept, neither the unattached snapshot nor a temporary left', async () => {
    const output = path.join(dir, 'fresh.uffd')
    fs.writeFileSync(output, 'the previous output')
    const args = ['snapshot', '--mem-file', image, '-o', output, '--force', '--codec', 'lz4', '--level', '19', '--working-set', workingSet, '--pack', 'zstd']
    const {out, tookMs} = await interruptAttach(args, output, 'SIGINT')
    expect(out.code, out.stderr).toBe(130)
    expect(tookMs).toBeLessThan(3_000)
    expect(out.stderr).toContain(`uffd snapshot: interrupted by SIGINT; ${output} left as it was`)
    expect(temporaries()).toEqual([])
    expect(fs.readFileSync(output, 'utf8')).toBe('the previous output')
  })
})
