// Working-set prefetch and population with real clients: fc_client (a Firecracker-like client
// touching pages and checking every byte) and kvm_vmm (a real KVM guest restored lazily). Record
// a run, attach the working set, resume again: the bytes must be right and demand faults must drop.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {cliEnv, isRoot, NATIVE, UFFD_BIN, uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {SnapshotReader} from '../src/snapshot/reader.js'

const skip = !isRoot() || !fs.existsSync('/dev/userfaultfd') ? 'needs root and userfaultfd (kernel-mode faults)' : undefined
if (skip) console.warn(`test/prefetch-e2e.test.ts skipped: ${skip}`)
const kvmSkip = skip ?? (fs.existsSync('/dev/kvm') ? undefined : 'no /dev/kvm')
if (!skip && kvmSkip) console.warn(`test/prefetch-e2e.test.ts KVM cases skipped: ${kvmSkip}`)

let dir: string
const children: ReturnType<typeof spawn>[] = []
beforeAll(() => {
  dir = tempDir('uffd-prefetch-')
})
afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

interface Finished {
  code: number | null
  stdout: string
  stderr: string
}

function start(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Finished> {
  const child = spawn(cmd, args, {stdio: ['ignore', 'pipe', 'pipe'], env: {...cliEnv(), ...env}})
  children.push(child)
  let stdout = ''
  let stderr = ''
  child.stdout!.on('data', (d) => (stdout += d))
  child.stderr!.on('data', (d) => (stderr += d))
  return new Promise((resolve) => child.on('close', (code) => resolve({code, stdout, stderr})))
}

async function waitFor(file: string): Promise<void> {
  for (let i = 0; i < 600 && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 50))
  if (!fs.existsSync(file)) throw new Error(`${file} did not appear`)
}

/** Runs `uffd resume` with `args` and a client; returns both results and the statistics file. */
async function resumeWith(snapshot: string, args: string[], client: [string, string[]], tag: string, env: NodeJS.ProcessEnv = {}) {
  const socket = path.join(dir, `${tag}.sock`)
  const ready = path.join(dir, `${tag}.ready`)
  const stats = path.join(dir, `${tag}.stats.json`)
  const handler = start(process.execPath, [UFFD_BIN, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', stats, ...args], env)
  await waitFor(ready)
  const c = await start(client[0], client[1].map((a) => a.replace('$SOCKET', socket)))
  const h = await handler
  expect(h.code, h.stderr).toBe(0)
  return {client: c, handler: h, stats: JSON.parse(fs.readFileSync(stats, 'utf8'))}
}

function trace(file: string, pages: number[]): string {
  fs.writeFileSync(file, pages.map((p) => String(p * 4096)).join('\n'))
  return file
}

/** A snapshot of a `mib` MiB mixed image and a working set of 1 page in `oneIn`, scattered. */
function scatteredSet(name: string, mib: number, seed: number, oneIn: number): {raw: string; snapshot: string; pages: number[]} {
  const raw = path.join(dir, `${name}.raw`)
  const snapshot = path.join(dir, `${name}.uffd`)
  fs.writeFileSync(raw, makeImage('mixed', mib * 1024 * 1024, seed))
  expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
  const pages = Array.from({length: (mib * 1024 * 1024) / 4096}, (_, p) => p).filter((p) => (p * 2654435761) % oneIn === 0)
  return {raw, snapshot, pages}
}

describe.skipIf(skip)('working-set prefetch with fc_client', () => {
  it('records a run, attaches the set, and replays it in another order with fewer faults and the right bytes', async () => {
    const raw = path.join(dir, 'mixed.raw')
    const snapshot = path.join(dir, 'mixed.uffd')
    fs.writeFileSync(raw, makeImage('mixed', 48 * 1024 * 1024, 21))
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot, '--chunk-size', '64K']).status).toBe(0)
    // A working set of 1 page in 40: spread over most chunks, like a guest touching scattered memory.
    const pages = Array.from({length: (48 * 1024 * 1024) / 4096}, (_, p) => p).filter((p) => (p * 2654435761) % 40 === 0)
    const first = trace(path.join(dir, 'first.trace'), pages)
    const second = trace(path.join(dir, 'second.trace'), [...pages].reverse())
    const ws = path.join(dir, 'run.ws')

    const recorded = await resumeWith(snapshot, ['--record', ws, '--readahead', '0'], [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${first}`, '--verify']], 'record')
    expect(JSON.parse(recorded.client.stdout).verify_errors).toBe(0)
    const set = JSON.parse(fs.readFileSync(ws, 'utf8'))
    expect(set.kind).toBe('uffd-working-set')
    // Each fault's whole window is recorded (faulting page first), as fault-around installed it.
    expect(set.pages.length).toBeGreaterThanOrEqual(recorded.stats.faults.data + recorded.stats.faults.zero)
    // (A window is recorded whole even if the client exited before all of it was installed.)
    expect(set.pages.length).toBeLessThanOrEqual((48 * 1024 * 1024) / 4096)

    const attach = uffd(['working-set', 'attach', snapshot, ws, '--json'])
    expect(attach.status, attach.stderr).toBe(0)
    expect(uffd(['verify', snapshot, '--against', raw]).status).toBe(0)

    const replay = await resumeWith(snapshot, [], [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${second}`, '--verify', '--delay-ms', '500']], 'replay')
    const out = JSON.parse(replay.client.stdout)
    expect(out.verify_errors).toBe(0)
    expect(replay.stats.workingSetChunks).toBeGreaterThan(0)
    expect(replay.stats.pages.prefetched).toBeGreaterThan(0)
    // Prefetch starts at the handshake; the client waits a moment before touching (as a guest
    // busy elsewhere does), so recorded faults must be gone. How many depends on how much CPU
    // the decoders got meanwhile (bench/prefetch measures it); here: strictly fewer.
    expect(replay.stats.faults.total).toBeLessThan(recorded.stats.faults.total)
  })

  it('packs an exact working set: the replay installs only its pages, right bytes, and a corrupt packed block kills the client', async () => {
    // 1 page in 16, scattered: every 256 KiB chunk is touched, but only 1/16 of its pages.
    const {raw, snapshot, pages} = scatteredSet('packed', 32, 33, 16)
    const ws = path.join(dir, 'packed.ws')
    const client = (tr: string, extra: string[] = []): [string, string[]] => [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${tr}`, '--verify', ...extra]]
    // Page-granular serving records exactly the touched pages.
    const recorded = await resumeWith(snapshot, ['--record', ws, '--fault-around', 'page', '--readahead', '0'], client(trace(path.join(dir, 'p1.trace'), pages)), 'packed-record')
    expect(JSON.parse(recorded.client.stdout).verify_errors).toBe(0)
    expect(new Set(JSON.parse(fs.readFileSync(ws, 'utf8')).pages)).toEqual(new Set(pages))

    const attached = path.join(dir, 'packed-ws.uffd')
    const attach = uffd(['working-set', 'attach', snapshot, ws, '-o', attached, '--json'])
    expect(attach.status, attach.stderr).toBe(0)
    expect(JSON.parse(attach.stdout).packedBlocks).toBe(Math.ceil(pages.length / 64))
    const stats = JSON.parse(uffd(['stats', attached, '--json']).stdout)
    expect(stats.workingSet.packed.pages).toBe(pages.length)
    const verify = uffd(['verify', attached, '--against', raw])
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.stdout).toMatch(/packed working-set blocks match their chunks/)

    // Replayed in reverse, touching from the handshake on: whatever the race, every byte is right,
    // and only the set's pages are installed (no chunk windows), in far fewer faults. Blocks are
    // installed by native/libuffd_fill, half of them by a helper thread where there are 2 CPUs,
    // or page by page in JavaScript without the library: the same.
    const reversed = trace(path.join(dir, 'p2.trace'), [...pages].reverse())
    const env: Record<string, Record<string, string>> = {native: {}, 'native, no helper': {UFFD_INSTALL_HELPER: '0'}, javascript: {UFFD_NATIVE_FILL: '0'}}
    for (const fill of ['native', 'native, no helper', 'javascript']) {
      const replay = await resumeWith(attached, [], client(reversed), `packed-replay-${fill.replace(/\W+/g, '-')}`, env[fill])
      expect(JSON.parse(replay.client.stdout).verify_errors, fill).toBe(0)
      expect(replay.handler.stderr).toMatch(fill === 'javascript' ? /installed page by page in JavaScript/ : /installed by native\/libuffd_fill/)
      // Racing the reversed replay, the helper may find its part (the set's end, touched first)
      // already faulted in: how much it installs is timing (below, with the client waiting).
      if (fill !== 'native') expect(replay.stats.pages.byHelper ?? 0, fill).toBe(0)
      expect(replay.stats.timeToWorkingSetMs, fill).toBeGreaterThan(0)
      // (Zero pages are mapped as whole zero runs around set pages: only data pages are counted.)
      expect(replay.stats.pages.copied, fill).toBeLessThan(pages.length * 1.5)
      expect(replay.stats.faults.total, fill).toBeLessThan(pages.length / 4)
    }

    // With the client waiting before it touches, the helper installs its part of the set (the
    // last 70%) where there are 2 CPUs; the faults left are for pages nobody prefetched yet.
    const waited = await resumeWith(attached, [], client(reversed, ['--delay-ms', '400']), 'packed-replay-waited')
    expect(JSON.parse(waited.client.stdout).verify_errors).toBe(0)
    if (os.availableParallelism() > 1) expect(waited.stats.pages.byHelper).toBeGreaterThan(pages.length / 2)
    else expect(waited.stats.pages.byHelper ?? 0).toBe(0)

    // A balloon inflating over set pages while their blocks are being prefetched: whatever the
    // race, the removed range reads zeros afterwards (never refilled from a block), the rest right.
    const ballooned = await resumeWith(attached, [], client(path.join(dir, 'p2.trace'), ['--balloon', '8M:4M', '--balloon-concurrent']), 'packed-balloon')
    const b = JSON.parse(ballooned.client.stdout)
    expect(b.verify_errors).toBe(0)
    expect(b.balloon_ok).toBe(true)
    expect(ballooned.stats.events.removedPages).toBeGreaterThan(0)

    // One flipped byte in a packed block's stored bytes (the last one is just before the table):
    // verify names it, and resume kills the client rather than install anything from it.
    const broken = path.join(dir, 'packed-broken.uffd')
    fs.copyFileSync(attached, broken)
    const header = JSON.parse(uffd(['stats', broken, '--json']).stdout)
    const lastBlockByte = header.metadata.workingSet.packed.offset - 1
    const fd = fs.openSync(broken, 'r+')
    const byte = Buffer.alloc(1)
    fs.readSync(fd, byte, 0, 1, lastBlockByte)
    byte[0] ^= 0xff
    fs.writeSync(fd, byte, 0, 1, lastBlockByte)
    fs.closeSync(fd)
    const bad = uffd(['verify', broken])
    expect(bad.status).toBe(1)
    expect(bad.stdout + bad.stderr).toMatch(/packed working set block \d+: checksum mismatch/)
    const socket = path.join(dir, 'broken.sock')
    const ready = path.join(dir, 'broken.ready')
    const handler = start(process.execPath, [UFFD_BIN, 'resume', broken, '--socket', socket, '--ready-file', ready])
    await waitFor(ready)
    const killed = spawn(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', 'none', '--hold-ms', '5000', '--verify-all'], {stdio: 'ignore'})
    children.push(killed)
    const signal = await new Promise((resolve) => killed.on('close', (_code, sig) => resolve(sig)))
    expect(signal).toBe('SIGKILL')
    const h = await handler
    expect(h.code).toBe(1)
    expect(h.stderr).toMatch(/packed working set block \d+/)
  })

  it('stages the packed set before it is ready, within --cache-mb, and keeps it for every client with --serve', async () => {
    const {raw, snapshot, pages} = scatteredSet('staged', 16, 5, 8)
    const ws = path.join(dir, 'staged.ws')
    const client = (tr: string): [string, string[]] => [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${tr}`, '--verify']]
    await resumeWith(snapshot, ['--record', ws, '--fault-around', 'page', '--readahead', '0'], client(trace(path.join(dir, 's1.trace'), pages)), 'staged-record')
    const attached = path.join(dir, 'staged-ws.uffd')
    expect(uffd(['working-set', 'attach', snapshot, ws, '-o', attached]).status).toBe(0)
    const image = fs.readFileSync(raw)
    const dataPages = pages.filter((p) => image.subarray(p * 4096, (p + 1) * 4096).some((b) => b !== 0)).length
    const blocks = Math.ceil(pages.length / 64)
    const reversed = trace(path.join(dir, 's2.trace'), [...pages].reverse())

    // Every block that holds data is decoded before the ready file appears: exactly the set's data pages.
    const replay = await resumeWith(attached, [], client(reversed), 'staged-replay')
    expect(JSON.parse(replay.client.stdout).verify_errors).toBe(0)
    expect(replay.stats.staged.bytes).toBe(dataPages * 4096)
    expect(replay.stats.staged.units).toBeGreaterThan(0)
    expect(replay.stats.staged.units).toBeLessThanOrEqual(blocks)
    expect(replay.handler.stderr).toMatch(/working set staged: \d+ units, [\d.]+ [KM]iB decoded in \d+ ms/)
    expect(uffd(['stats', path.join(dir, 'staged-replay.stats.json')]).stdout).toMatch(/^staged +working set decoded before the first client: \d+ units/m)

    // --cache-mb bounds what is staged (1 MiB: four 256 KiB slots); the rest is decoded on the way.
    const small = await resumeWith(attached, ['--cache-mb', '1'], client(reversed), 'staged-small')
    expect(JSON.parse(small.client.stdout).verify_errors).toBe(0)
    expect(small.stats.staged.units).toBe(4)

    // --serve keeps the staged blocks for every client: the second one gets them from memory too.
    const socket = path.join(dir, 'staged-serve.sock')
    const ready = path.join(dir, 'staged-serve.ready')
    const statsFile = path.join(dir, 'staged-serve.stats.json')
    const handler = start(process.execPath, [UFFD_BIN, 'resume', attached, '--serve', '--socket', socket, '--ready-file', ready, '--stats-file', statsFile])
    const handlerChild = children[children.length - 1]
    await waitFor(ready)
    for (const tag of ['first', 'second']) {
      const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', `trace:${reversed}`, '--verify'])
      expect(c.code, `${tag} client: ${c.stderr}`).toBe(0)
      expect(JSON.parse(c.stdout).verify_errors, `${tag} client`).toBe(0)
    }
    handlerChild.kill('SIGTERM')
    expect((await handler).code).toBe(130)
    const served = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    expect(served.clients).toEqual({served: 2, ended: 2})
    expect(served.staged.bytes).toBe(dataPages * 4096)
    // Each block decoded once, for both clients.
    expect(served.chunks.decoded).toBe(served.staged.units)
    expect(served.pages.copied).toBe(2 * dataPages)
    expect(served.faults.total).toBeLessThan(pages.length / 2)
  })

  it('--count-hits counts which prefetched pages the client touched, from its accessed bits', async () => {
    const {raw, snapshot, pages} = scatteredSet('hits', 16, 8, 8)
    const ws = path.join(dir, 'hits.ws')
    const fc = (args: string[]): [string, string[]] => [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, ...args]]
    await resumeWith(snapshot, ['--record', ws, '--fault-around', 'page', '--readahead', '0'], fc(['--touch', `trace:${trace(path.join(dir, 'h1.trace'), pages)}`]), 'hits-record')
    expect(uffd(['working-set', 'attach', snapshot, ws]).status).toBe(0)

    // The client waits until the set is in, then touches half of it and stays alive for a sample.
    const half = trace(path.join(dir, 'h2.trace'), pages.filter((_, i) => i % 2 === 0))
    const r = await resumeWith(snapshot, ['--count-hits'], fc(['--delay-ms', '800', '--touch', `trace:${half}`, '--verify', '--hold-ms', '1200']), 'hits-half')
    expect(JSON.parse(r.client.stdout).verify_errors).toBe(0)
    const h = r.stats.prefetchHits
    expect(h.copiedPages).toBeGreaterThan(0)
    expect(h.hits + h.wasted).toBe(h.copiedPages)
    // Pages were installed before any touch, so about half of the data pages are hits.
    expect(h.hits / h.copiedPages).toBeGreaterThan(0.35)
    expect(h.hits / h.copiedPages).toBeLessThan(0.65)

    const none = await resumeWith(snapshot, ['--count-hits'], fc(['--touch', 'none', '--hold-ms', '1200']), 'hits-none')
    expect(none.stats.prefetchHits.hits).toBe(0)
    expect(none.stats.prefetchHits.wasted).toBe(none.stats.prefetchHits.copiedPages)
    // Without the flag nothing is cleared or counted.
    const off = await resumeWith(snapshot, [], fc(['--touch', 'none', '--hold-ms', '300']), 'hits-off')
    expect(off.stats.prefetchHits).toBeNull()
  })

  it('--learn: a snapshot learns its working set from its resumes by majority, concurrent learners lose no run, damage teaches nothing', async () => {
    const {raw, snapshot, pages} = scatteredSet('learn', 16, 31, 16)
    fs.chmodSync(snapshot, 0o640)
    const hand = path.join(dir, 'learn-hand.uffd')
    fs.copyFileSync(snapshot, hand)
    const touch = trace(path.join(dir, 'learn.trace'), pages)
    const fc = (t: string, extra: string[] = []): [string, string[]] => [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${t}`, '--verify', ...extra]]
    const attachedPages = (file: string): number[] => {
      const reader = SnapshotReader.open(file)
      try {
        return [...(reader.packed?.pages ?? [])].sort((a, b) => a - b)
      } finally {
        reader.close()
      }
    }
    // Page-exact serving, so that what a run records does not depend on timing.
    const exact = ['--fault-around', 'page', '--readahead', '0']
    const learnedRuns = (file: string): number | undefined => JSON.parse(uffd(['stats', file, '--json']).stdout).workingSet?.learned?.runs

    // First resume: nothing attached yet, every touch faults; at exit the run is attached.
    const first = await resumeWith(snapshot, ['--learn', ...exact], fc(touch), 'learn-1')
    expect(JSON.parse(first.client.stdout).verify_errors).toBe(0)
    expect(first.handler.stderr).toMatch(/learned: .* now remembers 1 run\(s\)/)
    expect(learnedRuns(snapshot)).toBe(1)
    expect(fs.statSync(snapshot).mode & 0o777).toBe(0o640)
    expect(uffd(['verify', snapshot, '--against', raw]).status).toBe(0)
    expect(uffd(['stats', snapshot]).stdout).toMatch(/^learned +the majority of the last 1 of at most 5 runs/m)
    // The same as recording by hand and attaching.
    const ws = path.join(dir, 'learn-hand.ws')
    await resumeWith(hand, ['--record', ws, ...exact], fc(touch), 'learn-hand')
    expect(uffd(['working-set', 'attach', hand, ws]).status).toBe(0)
    const learned = attachedPages(snapshot)
    expect(learned.length).toBeGreaterThan(0)
    expect(learned).toEqual(attachedPages(hand))

    // The second resume of the same pattern is prefetched as with the hand-made set.
    const second = await resumeWith(snapshot, ['--learn', ...exact], fc(touch, ['--delay-ms', '500']), 'learn-2')
    const byHand = await resumeWith(hand, exact, fc(touch, ['--delay-ms', '500']), 'learn-hand-2')
    expect(JSON.parse(second.client.stdout).verify_errors).toBe(0)
    expect(second.stats.pages.prefetched).toBe(byHand.stats.pages.prefetched)
    expect(second.stats.faults.total).toBeLessThan(first.stats.faults.total / 2)
    expect(learnedRuns(snapshot)).toBe(2)

    // A run that also touches far-away pages: one run in three is no majority, so they stay out.
    const imagePages = (16 * 1024 * 1024) / 4096
    const noise = [imagePages - 1, imagePages - 700, imagePages - 1400].filter((p) => !learned.includes(p))
    const noisy = await resumeWith(snapshot, ['--learn', ...exact], fc(trace(path.join(dir, 'learn-noise.trace'), [...pages, ...noise])), 'learn-3')
    expect(JSON.parse(noisy.client.stdout).verify_errors).toBe(0)
    expect(learnedRuns(snapshot)).toBe(3)
    expect(attachedPages(snapshot)).toEqual(learned)

    // Two handlers serving and learning from the same file at once: both runs are kept.
    const both = await Promise.all(['learn-4a', 'learn-4b'].map((tag) => resumeWith(snapshot, ['--learn', ...exact], fc(touch), tag)))
    for (const r of both) expect(r.handler.stderr).toMatch(/learned: /)
    expect(learnedRuns(snapshot)).toBe(5)
    // At most --learn-runs runs are remembered (5 unless the snapshot says otherwise).
    // A fold killed mid-write (SIGKILL) left its temporary: the next fold removes it, not a live writer's.
    const stale = path.join(dir, '.learn.uffd.4194305.abc.tmp')
    const live = path.join(dir, `.learn.uffd.${process.pid}.abc.tmp`)
    fs.writeFileSync(stale, 'partial')
    fs.writeFileSync(live, 'in progress')
    await resumeWith(snapshot, ['--learn', ...exact], fc(touch), 'learn-5')
    expect(learnedRuns(snapshot)).toBe(5)
    expect(fs.existsSync(stale)).toBe(false)
    expect(fs.existsSync(live)).toBe(true)
    fs.rmSync(live)
    expect(uffd(['verify', snapshot, '--against', raw]).status).toBe(0)

    // Damaged learned runs: the VM is served, nothing is folded, the file is left as it was.
    const damaged = path.join(dir, 'learn-damaged.uffd')
    const bytes = fs.readFileSync(snapshot)
    const reader = SnapshotReader.open(snapshot)
    const at = (reader.header.metadata.workingSet as {learned: {offset: number; length: number}}).learned
    reader.close()
    bytes[at.offset + (at.length >> 1)] ^= 0xff
    fs.writeFileSync(damaged, bytes)
    const hurt = await resumeWith(damaged, ['--learn', ...exact], fc(touch), 'learn-damaged')
    expect(JSON.parse(hurt.client.stdout).verify_errors).toBe(0)
    expect(hurt.handler.stderr).toMatch(/not learned: .*learned runs: checksum mismatch/)
    expect(fs.readFileSync(damaged).equals(bytes)).toBe(true)
    expect(uffd(['verify', damaged]).stdout + uffd(['verify', damaged]).stderr).toMatch(/learned runs: checksum mismatch/)
  })

  it('large zero ranges are handed to the kernel: touching them costs no fault, and a balloon removal there reads zeros', async () => {
    // 16 MiB: data, then 8 MiB of zeros at [4 MiB, 12 MiB), then data.
    const raw = path.join(dir, 'holes.raw')
    const image = makeImage('mixed', 16 << 20, 9)
    image.fill(0, 4 << 20, 12 << 20)
    fs.writeFileSync(raw, image)
    const snapshot = path.join(dir, 'holes.uffd')
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
    const zeroPages = Array.from({length: 2048}, (_, i) => 1024 + ((i * 37) % 2048))
    const touch = trace(path.join(dir, 'holes.trace'), zeroPages)
    // Handed over when the client is added, before its first fault is served: it touches at once.
    const client = (extra: string[]): [string, string[]] => [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', `trace:${touch}`, '--verify-all', '--balloon', '6M:1M', ...extra]]
    const handed = await resumeWith(snapshot, ['--fault-around', 'page', '--readahead', '0'], client([]), 'holes')
    const out = JSON.parse(handed.client.stdout)
    expect(out.verify_errors).toBe(0)
    // The removal inside the handed range is the kernel's alone (no REMOVE event comes), and the
    // pages read zeros afterwards, as they would if served.
    expect(out.balloon_ok).toBe(true)
    expect(handed.stats.events.remove).toBe(0)
    expect(handed.stats.pages.toKernel).toBe(2048)
    expect(uffd(['stats', path.join(dir, 'holes.stats.json')]).stdout).toMatch(/2048 zero pages left to the kernel/)

    const served = await resumeWith(snapshot, ['--fault-around', 'page', '--readahead', '0', '--no-kernel-zeros'], client([]), 'holes-served')
    expect(JSON.parse(served.client.stdout)).toMatchObject({verify_errors: 0, balloon_ok: true})
    expect(served.stats.events.remove).toBe(1)
    expect(served.stats.pages.toKernel ?? 0).toBe(0)
    // Page by page, every zero page touched faults when served; handed over, none of the 2048 in
    // the range did (the zero pages inside the data parts, read by --verify-all, still do).
    expect(served.stats.faults.zero).toBeGreaterThanOrEqual(2048)
    expect(handed.stats.faults.zero).toBeLessThanOrEqual(served.stats.faults.zero - 2048)
  })

  it('--populate all fills all memory, reports completion, and never refills removed memory', async () => {
    const raw = path.join(dir, 'pop.raw')
    const snapshot = path.join(dir, 'pop.uffd')
    fs.writeFileSync(raw, makeImage('mixed', 32 * 1024 * 1024, 5))
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
    // The client touches nothing, waits for population (faults served at once would otherwise
    // install everything first), then balloons 1 MiB away and re-touches it.
    const r = await resumeWith(snapshot, ['--populate', 'all'], [path.join(NATIVE, 'fc_client'), ['--socket', '$SOCKET', '--image', raw, '--touch', 'none', '--delay-ms', '1500', '--verify-all', '--balloon', '4M:1M']], 'populate')
    const out = JSON.parse(r.client.stdout)
    expect(out.verify_errors).toBe(0)
    expect(out.balloon_ok).toBe(true)
    expect(r.stats.timeToMemoryCompleteMs).toBeGreaterThan(0)
    expect(r.stats.pages.prefetched).toBeGreaterThan(0)
    expect(r.stats.pages.copied + r.stats.pages.zeroed).toBeGreaterThanOrEqual((32 * 1024 * 1024) / 4096)
  })
})

describe.skipIf(kvmSkip)('working-set prefetch with a KVM guest', () => {
  it('records a lazy restore, then restores with the working set: same checksum, fewer demand faults', async () => {
    const snapDir = path.join(dir, 'vm')
    fs.mkdirSync(snapDir)
    const run = await start(path.join(NATIVE, 'kvm_vmm'), ['run', '--mem-mib', '64', '--snapshot-dir', snapDir])
    expect(run.code, run.stderr).toBe(0)
    const checksum = JSON.parse(run.stdout.trim().split('\n').pop()!).checksum
    const snapshot = path.join(dir, 'vm.uffd')
    expect(uffd(['snapshot', '--mem-file', path.join(snapDir, 'mem.raw'), '-o', snapshot]).status).toBe(0)
    const ws = path.join(dir, 'vm.ws')
    const vmm = (tag: string): [string, string[]] => [path.join(NATIVE, 'kvm_vmm'), ['restore', '--snapshot-dir', snapDir, '--uffd-socket', '$SOCKET', '--timeout-ms', '60000', '--regions', tag === 'replay' ? '2' : '1']]

    const lazy = await resumeWith(snapshot, ['--record', ws, '--readahead', '0'], vmm('record'), 'vm-record')
    expect(lazy.client.code, lazy.client.stderr).toBe(0)
    expect(JSON.parse(lazy.client.stdout.trim().split('\n').pop()!).checksum).toBe(checksum)

    const replay = await resumeWith(snapshot, ['--working-set', ws, '--readahead', '0'], vmm('replay'), 'vm-replay')
    expect(replay.client.code, replay.client.stderr).toBe(0)
    expect(JSON.parse(replay.client.stdout.trim().split('\n').pop()!).checksum).toBe(checksum)
    expect(replay.stats.pages.prefetched).toBeGreaterThan(0)
    expect(replay.stats.faults.total).toBeLessThan(lazy.stats.faults.total)

    // The same set attached, so its pages are packed: the guest's memory comes from the packed
    // blocks (prefetched and on faults), and its checksum is still right.
    const attached = path.join(dir, 'vm-ws.uffd')
    expect(uffd(['working-set', 'attach', snapshot, ws, '-o', attached]).status).toBe(0)
    const packed = await resumeWith(attached, ['--readahead', '0'], vmm('replay'), 'vm-packed')
    expect(packed.client.code, packed.client.stderr).toBe(0)
    expect(JSON.parse(packed.client.stdout.trim().split('\n').pop()!).checksum).toBe(checksum)
    expect(packed.stats.timeToWorkingSetMs).toBeGreaterThan(0)
    expect(packed.stats.faults.total).toBeLessThan(lazy.stats.faults.total)
  })
})
