// uffd reading snapshots from HTTP range servers: a real node:http server on loopback (started
// here, with injectable faults: 5xx, resets, truncated and corrupted bodies, stalls, a server
// that ignores ranges, an object replaced mid-resume), real `uffd` processes, and fc_client,
// which faults real memory through a real userfaultfd and verifies every byte.
import {type ChildProcess, execFileSync, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {type ResumeReport} from '../src/resume/run-stats.js'
import {NATIVE, uffd, uffdAsync, uffdSpawn} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {FaultProxy} from './helpers/fault-proxy.js'
import {RangeServer} from './helpers/range-server.js'

const FC_CLIENT = path.join(NATIVE, 'fc_client')
const skip = process.getuid?.() !== 0 ? 'needs root (fc_client traps kernel-mode faults)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built` : undefined
if (skip) console.warn(`remote-http: resume tests skipped: ${skip}`)

/** Why a tmpfs cannot be mounted here (for a cache directory that turns read-only), or undefined. */
function cannotMount(): string | undefined {
  if (skip) return skip
  const at = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-mount-probe-'))
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', at], {stdio: 'pipe'})
    execFileSync('umount', [at], {stdio: 'pipe'})
    return undefined
  } catch (error) {
    return `cannot mount a tmpfs (${((error as {stderr?: Buffer}).stderr ?? '').toString().trim() || (error as Error).message})`
  } finally {
    fs.rmSync(at, {recursive: true, force: true})
  }
}
const skipMount = cannotMount()
if (skipMount && !skip) console.warn(`remote-http: read-only cache directory test skipped: ${skipMount}`)

let dir: string
let imageFile: string
let snapshot: string
let other: string
let server: RangeServer
let proxy: FaultProxy | undefined

/** The range server for `file` with a fault-injecting proxy in front; the URL is the proxy's. */
async function serveThroughProxy(file: string): Promise<string> {
  server = await RangeServer.start(file)
  proxy = await FaultProxy.start(server.url())
  return proxy.url('/snapshot.uffd')
}
const live = new Set<ChildProcess>()

beforeAll(() => {
  dir = tempDir('uffd-http-')
  imageFile = path.join(dir, 'mem.raw')
  // 8 MiB of mixed pages, 64 KiB chunks: many chunks, so coalescing and concurrency matter.
  fs.writeFileSync(imageFile, makeImage('mixed', 8 << 20, 5))
  snapshot = path.join(dir, 'mem.uffd')
  const made = uffd(['snapshot', '--mem-file', imageFile, '-o', snapshot, '--chunk-size', '64K'])
  expect(made.status, made.stderr).toBe(0)
  const otherImage = path.join(dir, 'other.raw')
  fs.writeFileSync(otherImage, makeImage('mixed', 8 << 20, 6))
  other = path.join(dir, 'other.uffd')
  expect(uffd(['snapshot', '--mem-file', otherImage, '-o', other, '--chunk-size', '64K']).status).toBe(0)
})

afterEach(async () => {
  for (const child of live) child.kill('SIGKILL')
  live.clear()
  await proxy?.close()
  proxy = undefined
  await server?.close()
})

afterAll(() => {
  fs.rmSync(dir, {recursive: true, force: true})
})

interface Finished {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

function run(child: ChildProcess): Promise<Finished> {
  live.add(child)
  let stdout = ''
  let stderr = ''
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  return new Promise((resolve) =>
    child.on('close', (code, signal) => {
      live.delete(child)
      resolve({code, signal, stdout, stderr})
    }),
  )
}

async function waitFor(what: string, condition: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

let names = 0

/** One `uffd resume URL` and one fc_client touching every page in random order and verifying all of memory. */
async function resumeOnce(url: string, cacheDir: string, args: string[] = [], clientArgs: string[] = ['--touch', 'random', '--verify-all'], onReady?: () => void) {
  const name = `h${names++}`
  const socket = path.join(dir, `${name}.sock`)
  const ready = path.join(dir, `${name}.ready`)
  const statsFile = path.join(dir, `${name}.json`)
  const handler = run(uffdSpawn(['resume', url, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--cache-dir', cacheDir, '--timeout', '30', ...args]))
  let handlerDone: Finished | undefined
  void handler.then((r) => (handlerDone = r))
  await waitFor('the ready file', () => fs.existsSync(ready) || handlerDone !== undefined, 30_000)
  if (handlerDone) return {handler: handlerDone, client: undefined, stats: undefined, statsFile}
  onReady?.()
  const client = await run(spawn(FC_CLIENT, ['--socket', socket, '--image', imageFile, '--timeout-ms', '60000', ...clientArgs], {stdio: ['ignore', 'pipe', 'pipe']}))
  const finished = await handler
  const stats = fs.existsSync(statsFile) ? (JSON.parse(fs.readFileSync(statsFile, 'utf8')) as ResumeReport) : undefined
  return {handler: finished, client, stats, statsFile}
}

function expectVerified(r: Awaited<ReturnType<typeof resumeOnce>>): void {
  expect(r.client?.code, `fc_client: ${r.client?.stderr}\nuffd: ${r.handler.stderr}`).toBe(0)
  const result = JSON.parse(r.client!.stdout.trim().split('\n').at(-1)!)
  expect(result).toMatchObject({ok: true, verify_errors: 0})
  expect(r.handler.code, r.handler.stderr).toBe(0)
}

describe.skipIf(skip)('uffd resume from an HTTP URL', () => {
  it('serves every byte lazily, fetching only through ranged requests, and fills the cache directory', async () => {
    server = await RangeServer.start(snapshot)
    const cache = path.join(dir, 'cache-lazy')
    const r = await resumeOnce(server.url(), cache)
    expectVerified(r)
    expect(server.requests.every((q) => q.status === 206 && q.range !== undefined)).toBe(true)
    const remote = r.stats!.remote!
    expect(remote.requests).toBeGreaterThan(0)
    expect(remote.bytesFetched).toBeLessThanOrEqual(fs.statSync(snapshot).size)
    expect(remote.retries).toBe(0)
    expect(remote.latencyMs.p50).not.toBeNull()
    // Coalescing: fewer requests than extents fetched.
    expect(remote.requests).toBeLessThan(remote.extentsFetched)

    // A second resume on the warm cache asks the server only for the header and index.
    server.requests.length = 0
    const warm = await resumeOnce(server.url(), cache)
    expectVerified(warm)
    expect(warm.stats!.remote!.requests).toBe(0)
    expect(warm.stats!.remote!.diskHits).toBeGreaterThan(0)
    expect(server.requests.length).toBeLessThanOrEqual(2)

    // A cached chunk gone bad on disk (bit rot, a torn file after a crash) fails its CRC, is
    // dropped and fetched again: the client still reads the right bytes.
    const [digest] = fs.readdirSync(cache)
    const files = fs.readdirSync(path.join(cache, digest)).sort()
    for (const name of files.slice(0, 3)) {
      const file = path.join(cache, digest, name)
      const bytes = fs.readFileSync(file)
      bytes[bytes.length >> 1] ^= 0x40
      fs.writeFileSync(file, bytes)
    }
    const healed = await resumeOnce(server.url(), cache)
    expectVerified(healed)
    expect(healed.stats!.remote!.extentsFetched).toBe(3)
  })

  it('rides out 503s, resets, truncated and corrupted bodies: retries, and never serves a wrong byte', async () => {
    const url = await serveThroughProxy(snapshot)
    const p = proxy!
    const cache = path.join(dir, 'cache-faults')
    // The first two requests open the snapshot; faults start after them.
    const started = resumeOnce(url, cache, ['--fetch-timeout', '2s'])
    await waitFor('the snapshot to be opened', () => p.requests.length >= 2, 20_000)
    p.faults = {status: {code: 503, count: 3}, resetAfterHeaders: 2, truncate: 2, corrupt: 3, delayMs: 2}
    const r = await started
    expectVerified(r)
    expect(r.stats!.remote!.retries).toBeGreaterThanOrEqual(5)
    expect(r.stats!.remote!.badResponses).toBeGreaterThanOrEqual(1)
    // The corrupted bodies never reached the cache either: every cached file matches the snapshot.
    const file = fs.readFileSync(snapshot)
    const [digest] = fs.readdirSync(cache)
    for (const name of fs.readdirSync(path.join(cache, digest))) {
      const [offset, length] = name.split('-').map((h) => Number.parseInt(h, 16))
      expect(fs.readFileSync(path.join(cache, digest, name)).equals(file.subarray(offset, offset + length)), name).toBe(true)
    }
  })

  it('a stalled server: the faulting client waits, then the fetch deadline fails the resume and kills it', async () => {
    const url = await serveThroughProxy(snapshot)
    const p = proxy!
    const started = resumeOnce(url, path.join(dir, 'cache-stall'), ['--fetch-timeout', '300ms', '--fetch-deadline', '2s'])
    await waitFor('the snapshot to be opened', () => p.requests.length >= 2, 20_000)
    p.faults = {stall: 1_000_000}
    const r = await started
    expect(r.handler.code).toBe(1)
    expect(r.handler.stderr).toMatch(/could not be fetched within 2 s/)
    expect(r.client?.signal).toBe('SIGKILL')
  })

  it('a stale ready file is removed before the snapshot is opened, not when the socket listens', async () => {
    const url = await serveThroughProxy(snapshot)
    const p = proxy!
    p.faults = {delayMs: 1500}
    const ready = path.join(dir, 'stale.ready')
    fs.writeFileSync(ready, 'left by an earlier run\n')
    const handler = run(uffdSpawn(['resume', url, '--socket', path.join(dir, 'stale.sock'), '--ready-file', ready, '--cache-dir', path.join(dir, 'cache-stale'), '--timeout', '30']))
    await waitFor('the stale ready file to go', () => !fs.existsSync(ready), 20_000)
    // Still opening: the server has not answered its first request.
    expect(p.requests.length).toBe(0)
    await waitFor('the new ready file', () => fs.existsSync(ready), 30_000)
    expect(JSON.parse(fs.readFileSync(ready, 'utf8'))).toMatchObject({socket: path.join(dir, 'stale.sock')})
    for (const child of live) child.kill('SIGTERM')
    expect((await handler).code).toBe(130)
  })

  it('an object replaced mid-resume: REMOTE_CHANGED, and no byte of the new one reaches the client', async () => {
    server = await RangeServer.start(snapshot)
    const s = server
    const started = resumeOnce(server.url(), path.join(dir, 'cache-changed'), ['--no-kill'], ['--touch', 'random', '--verify-all', '--timeout-ms', '4000'])
    await waitFor('the snapshot to be opened', () => s.requests.length >= 2, 20_000)
    server.replace(other)
    const r = await started
    expect(r.handler.stderr).toMatch(/changed while it was in use/)
    // Frozen (--no-kill) until its own watchdog gives up: it never read a wrong byte.
    expect(r.client?.code).toBe(3)
    expect(r.handler.code).toBe(1)
  })

  it('with a working set attached: fetched at start-up while the client connects, installed, every byte right', async () => {
    // Record what a client touching a random quarter of memory faults, locally, and attach it.
    const name = `ws${names++}`
    const socket = path.join(dir, `${name}.sock`)
    const ready = path.join(dir, `${name}.ready`)
    const recording = path.join(dir, `${name}.ws`)
    const recorder = run(uffdSpawn(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--record', recording, '--fault-around', 'page']))
    await waitFor('the recording handler', () => fs.existsSync(ready), 30_000)
    const touch = ['--touch', 'random', '--count', '512', '--seed', '3']
    expect((await run(spawn(FC_CLIENT, ['--socket', socket, '--image', imageFile, ...touch], {stdio: ['ignore', 'pipe', 'pipe']}))).code).toBe(0)
    expect((await recorder).code).toBe(0)
    const withSet = path.join(dir, `${name}.uffd`)
    const attached = await uffdAsync(['working-set', 'attach', snapshot, recording, '-o', withSet])
    expect(attached.status, attached.stderr).toBe(0)

    // Every answer after those that open the snapshot takes 1.5 s: the handler must listen
    // (and say so in its ready file) before its working set has arrived, since a VMM can connect
    // and load its own state meanwhile; the set's bytes are served as they land.
    const url = await serveThroughProxy(withSet)
    const p = proxy!
    // What opening the snapshot takes (stats opens it as resume does).
    expect((await uffdAsync(['stats', url])).status).toBe(0)
    const toOpen = p.requests.length
    p.requests.length = 0
    const opened = waitFor('the snapshot to be opened', () => p.requests.length >= toOpen, 30_000).then(() => (p.faults = {delayMs: 1500}))
    let answeredAtReady = -1
    const onReady = (): void => {
      answeredAtReady = p.requests.length
      p.faults = {}
    }
    const r = await resumeOnce(url, path.join(dir, 'cache-ws'), [], [...touch, '--verify-all'], onReady)
    await opened
    expectVerified(r)
    expect(answeredAtReady).toBe(toOpen)
    expect(r.stats!.pages.prefetched).toBeGreaterThan(0)
    expect(r.stats!.remote!.extentsFetched).toBeGreaterThan(0)
    // The stats file renders its remote section.
    const shown = await uffdAsync(['stats', r.statsFile])
    expect(shown.stdout).toMatch(/remote\s+http:\/\/127\.0\.0\.1:\d+\/snapshot\.uffd: \d+ requests/)
  })

  it('a cached chunk evicted under the handler: its fault waits for the network while other VMs are served', async () => {
    const url = await serveThroughProxy(snapshot)
    const p = proxy!
    const cache = path.join(dir, 'cache-evicted')
    const name = `ev${names++}`
    const socket = path.join(dir, `${name}.sock`)
    const ready = path.join(dir, `${name}.ready`)
    // --cache-mb 1: decoded chunks stay in memory for the last MiB touched only, so the others
    // must be read from the cache directory again.
    const child = uffdSpawn(['resume', url, '--socket', socket, '--ready-file', ready, '--cache-dir', cache, '--serve', '--cache-mb', '1'])
    const handler = run(child)
    let early: Finished | undefined
    void handler.then((r) => (early = r))
    await waitFor('the ready file', () => fs.existsSync(ready) || early !== undefined, 30_000)
    expect(early?.stderr).toBeUndefined()
    const client = (args: string[]): Promise<Finished> => run(spawn(FC_CLIENT, ['--socket', socket, '--image', imageFile, '--timeout-ms', '60000', ...args], {stdio: ['ignore', 'pipe', 'pipe']}))
    // Every chunk fetched and published: the handler knows them all as in the cache directory.
    const first = await client(['--touch', 'sequential', '--verify-all'])
    expect(first.code, first.stderr).toBe(0)
    // Another handler sharing the directory evicts the files of the first half of the snapshot;
    // fetching takes 4 s from now on.
    const [digest] = fs.readdirSync(cache)
    const half = fs.statSync(snapshot).size / 2
    for (const file of fs.readdirSync(path.join(cache, digest))) {
      if (Number.parseInt(file.split('-')[0], 16) < half) fs.rmSync(path.join(cache, digest, file))
    }
    p.faults = {delayMs: 4000}
    const image = fs.readFileSync(imageFile)
    const dataPage = (from: number, step: number): number => {
      for (let at = from; ; at += step) if (image.subarray(at, at + 4096).some((b) => b !== 0)) return at
    }
    const trace = (name: string, offset: number): string => {
      const file = path.join(dir, name)
      fs.writeFileSync(file, `${offset}\n`)
      return `trace:${file}`
    }
    // A VM whose page is in a chunk that is gone (2 MiB in: long out of the decoded-chunk cache):
    // refetched, through the 4 s delay.
    const slowFrom = Date.now()
    const slow = client(['--touch', trace(`${name}-slow`, dataPage(2 << 20, 4096)), '--verify'])
    await new Promise((resolve) => setTimeout(resolve, 300))
    // Meanwhile a VM whose page is in a chunk still in the cache directory is served at once: the
    // fault loop does not wait on the network for the other VM's chunk (nor for evicted chunks
    // around its own page, which fault-around leaves for later).
    const fastFrom = Date.now()
    const fast = await client(['--touch', trace(`${name}-fast`, dataPage(image.length - 4096, -4096)), '--verify'])
    const fastMs = Date.now() - fastFrom
    const slowDone = await slow
    const slowMs = Date.now() - slowFrom
    expect(fast.code, fast.stderr).toBe(0)
    expect(slowDone.code, slowDone.stderr).toBe(0)
    expect(slowMs).toBeGreaterThan(3500)
    expect(fastMs).toBeLessThan(2500)
    p.faults = {}
    const again = await client(['--touch', 'random', '--verify-all'])
    expect(again.code, again.stderr).toBe(0)
    child.kill('SIGTERM')
    const ended = await handler
    expect(ended.stderr).not.toMatch(/error|warning/i)
  })

  it.skipIf(skipMount)('a cache directory that turns read-only mid-run: fetched chunks reach the client in memory, with one warning', async () => {
    const url = await serveThroughProxy(snapshot)
    proxy!.faults = {delayMs: 30}
    const cache = path.join(dir, 'cache-ro')
    fs.mkdirSync(cache)
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m,mode=0700', 'tmpfs', cache])
    try {
      // Faults page by page in random order: a request per chunk, so the run outlasts the remount.
      const started = resumeOnce(url, cache, ['--fault-around', 'page'])
      const stored = (): number => {
        const [digest] = fs.readdirSync(cache)
        return digest ? fs.readdirSync(path.join(cache, digest)).length : 0
      }
      await waitFor('some chunks in the cache directory', () => stored() >= 8, 30_000)
      // EBUSY while a chunk is being written: again until it takes.
      await waitFor('the remount', () => {
        try {
          execFileSync('mount', ['-o', 'remount,ro', cache], {stdio: 'pipe'})
          return true
        } catch {
          return false
        }
      }, 10_000)
      const r = await started
      expectVerified(r)
      const remote = r.stats!.remote!
      expect(remote.memoryHandovers).toBeGreaterThan(0)
      expect(remote.cacheWriteErrors).toBeGreaterThanOrEqual(remote.memoryHandovers!)
      expect(r.handler.stderr.match(/warning: cache directory .*read-only file system/g), r.handler.stderr).toHaveLength(1)
      // What the directory kept is intact, and the rest never reached it.
      expect(stored()).toBeLessThan(remote.extentsFetched)
      const shown = await uffdAsync(['stats', r.statsFile])
      expect(shown.stdout).toMatch(/cache directory write errors, [1-9]\d* chunks handed over in memory/)
    } finally {
      execFileSync('umount', ['-l', cache])
    }
  })

  it('two handlers sharing one cache directory fetch each chunk once between them', async () => {
    const url = await serveThroughProxy(snapshot)
    const s = server
    // Fetches that take a while, so that both handlers want the same chunks while they are on their way.
    proxy!.faults = {delayMs: 150}
    const cache = path.join(dir, 'cache-claims')
    const touch = ['--touch', 'sequential', '--verify-all']
    const [a, b] = await Promise.all([resumeOnce(url, cache, [], touch), resumeOnce(url, cache, [], touch)])
    expectVerified(a)
    expectVerified(b)
    // Every byte of chunk data was asked of the server once (the header and index are read by
    // each handler when it opens the snapshot: the requests from byte 0, and to the last byte).
    const size = fs.statSync(snapshot).size
    const ranges = s.requests.map((q) => /^bytes=(\d+)-(\d+)$/.exec(q.range ?? '')!).map((m) => [Number(m[1]), Number(m[2])])
    const chunkRanges = ranges.filter(([first, last]) => first !== 0 && last !== size - 1).sort((x, y) => x[0] - y[0])
    for (let i = 1; i < chunkRanges.length; i++) expect(chunkRanges[i][0], `requests ${JSON.stringify(chunkRanges[i - 1])} and ${JSON.stringify(chunkRanges[i])}`).toBeGreaterThan(chunkRanges[i - 1][1])
    expect(a.stats!.remote!.claimWaits! + b.stats!.remote!.claimWaits!).toBeGreaterThan(0)
    expect(fs.readdirSync(path.join(cache, fs.readdirSync(cache)[0])).filter((f) => f.startsWith('.claim-'))).toEqual([])
  })

  it('a handler killed (SIGKILL) while it fetches blocks no other handler sharing the cache directory', async () => {
    const url = await serveThroughProxy(snapshot)
    const p = proxy!
    const cache = path.join(dir, 'cache-killed')
    // The first handler's chunk requests never get an answer: it holds their claims until killed.
    const stuck = resumeOnce(url, cache, ['--fetch-timeout', '60s'], ['--touch', 'random'])
    await waitFor('the snapshot to be opened', () => p.requests.length >= 2, 20_000)
    p.faults = {stall: 1_000_000}
    const claims = (): string[] => {
      const [digest] = fs.existsSync(cache) ? fs.readdirSync(cache) : []
      return digest ? fs.readdirSync(path.join(cache, digest)).filter((f) => f.startsWith('.claim-')) : []
    }
    await waitFor('claims of the stalled fetches', () => claims().length > 0, 20_000)
    // (Its client too: it holds its own uffd, so its faults would wait for good.)
    for (const child of live) child.kill('SIGKILL')
    await stuck
    expect(claims().length).toBeGreaterThan(0)
    // A second handler, with a --fetch-timeout far beyond the test's bound: the dead holder's
    // claims are free (its flocks went with it), so it fetches at once instead of waiting them out.
    p.faults = {}
    const started = Date.now()
    const r = await resumeOnce(url, cache, ['--fetch-timeout', '60s'])
    expectVerified(r)
    expect(Date.now() - started).toBeLessThan(20_000)
    expect(r.stats!.remote!.claimWaits).toBe(0)
    // It took over the dead handler's claim files and removed them with its own.
    expect(claims()).toEqual([])

    // A handler stopped by SIGTERM while its fetches hang gives its claims up on the way out.
    fs.rmSync(cache, {recursive: true})
    p.faults = {after: p.requests.length + 2, stall: 1_000_000}
    const stopped = resumeOnce(url, cache, ['--fetch-timeout', '60s'], ['--touch', 'random'])
    await waitFor('claims of the stalled fetches', () => claims().length > 0, 20_000)
    for (const child of live) if (child.spawnargs.includes(url)) child.kill('SIGTERM')
    const ended = await stopped
    expect(ended.handler.code).toBe(130)
    expect(claims()).toEqual([])
  })

  it('opens at most --fetch-concurrency connections to the server, the opening request included', async () => {
    const url = await serveThroughProxy(snapshot)
    // Slow answers, and four vCPUs faulting page by page: more demand fetches wanted at once than allowed.
    proxy!.faults = {delayMs: 30}
    const r = await resumeOnce(url, path.join(dir, 'cache-pool'), ['--fetch-concurrency', '2', '--fault-around', 'page'], ['--touch', 'random', '--threads', '4', '--verify-all'])
    expectVerified(r)
    expect(proxy!.requests.length).toBeGreaterThan(20)
    expect(proxy!.maxOpenConnections).toBe(2)
  })

  it('two handlers sharing one cache directory at once both serve every byte right', async () => {
    server = await RangeServer.start(snapshot)
    const cache = path.join(dir, 'cache-shared')
    const [a, b] = await Promise.all([resumeOnce(server.url(), cache), resumeOnce(server.url(), cache, [], ['--touch', 'sequential', '--verify-all'])])
    expectVerified(a)
    expectVerified(b)
  })
})

const KVM_VMM = path.join(NATIVE, 'kvm_vmm')
const kvmSkip = skip ?? (!fs.existsSync('/dev/kvm') ? 'no /dev/kvm on this machine' : !fs.existsSync(KVM_VMM) ? `${KVM_VMM} is not built` : undefined)
if (kvmSkip && !skip) console.warn(`remote-http: KVM guest test skipped: ${kvmSkip}`)

describe.skipIf(kvmSkip)('a KVM guest resumed from an HTTP URL', () => {
  it('passes its checksum served lazily through a store that fails and lies on the way', async () => {
    // A real guest (kvm_vmm: CPL3 code under KVM) computes a checksum over its memory after the
    // restore: one wrong page and it differs. Its snapshot is fetched through the fault proxy.
    const snapDir = path.join(dir, 'kvm')
    const guestRun = spawnSync(KVM_VMM, ['run', '--mem-mib', '64', '--snapshot-dir', snapDir, '--timeout-ms', '30000'], {encoding: 'utf8', timeout: 60_000})
    expect(guestRun.status, guestRun.stderr).toBe(0)
    const {checksum} = JSON.parse(guestRun.stdout.trim().split('\n').at(-1)!)
    const guest = path.join(snapDir, 'mem.uffd')
    expect(uffd(['snapshot', '--mem-file', path.join(snapDir, 'mem.raw'), '-o', guest, '--chunk-size', '64K']).status).toBe(0)
    const url = await serveThroughProxy(guest)
    const p = proxy!
    const socket = path.join(dir, 'kvm.sock')
    const ready = path.join(dir, 'kvm.ready')
    const statsFile = path.join(dir, 'kvm.json')
    const handler = run(uffdSpawn(['resume', url, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--cache-dir', path.join(dir, 'cache-kvm'), '--timeout', '30', '--fetch-timeout', '2s']))
    await waitFor('the ready file', () => fs.existsSync(ready), 30_000)
    // Once open, the store answers some requests with 503s, resets, cut and corrupted bodies.
    p.faults = {status: {code: 503, count: 2}, resetAfterHeaders: 1, truncate: 1, corrupt: 2}
    const vm = await run(spawn(KVM_VMM, ['restore', '--snapshot-dir', snapDir, '--uffd-socket', socket, '--regions', '2', '--timeout-ms', '60000'], {stdio: ['ignore', 'pipe', 'pipe']}))
    const done = await handler
    expect(vm.code, `kvm_vmm restore:\n${vm.stderr}\nresume:\n${done.stderr}`).toBe(0)
    expect(JSON.parse(vm.stdout.trim().split('\n').at(-1)!)).toMatchObject({ok: true, mode: 'uffd', regions: 2, checksum})
    expect(done.code, done.stderr).toBe(0)
    const remote = (JSON.parse(fs.readFileSync(statsFile, 'utf8')) as ResumeReport).remote!
    expect(remote.retries).toBeGreaterThan(0)
    expect(remote.bytesFetched).toBeLessThan(fs.statSync(guest).size)
  }, 120_000)
})

describe('stats and verify of an HTTP URL', () => {
  it('stats reads only the header and index; verify streams every chunk through retries', async () => {
    const url = await serveThroughProxy(snapshot)
    const cache = path.join(dir, 'cache-verify')
    const stats = await uffdAsync(['stats', url, '--json', '--cache-dir', cache])
    expect(stats.status, stats.stderr).toBe(0)
    expect((stats.json as {chunkCount: number}).chunkCount).toBe(128)
    expect(server.requests.length).toBeLessThanOrEqual(2)
    proxy!.faults = {corrupt: 2, status: {code: 500, count: 2}}
    const verify = await uffdAsync(['verify', url, '--json', '--cache-dir', cache])
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.json).toMatchObject({ok: true, chunksChecked: 128})
  })

  it('clear errors: 404, 403, a server that ignores ranges, an object that is not a snapshot, an unknown scheme', async () => {
    const url = await serveThroughProxy(snapshot)
    const cache = path.join(dir, 'cache-errors')
    const code = async (args: string[]): Promise<{code: string; exit: number | null}> => {
      const r = await uffdAsync([...args, '--json', '--cache-dir', cache])
      return {code: (r.json as {error?: {code: string}})?.error?.code ?? '?', exit: r.status}
    }
    proxy!.faults = {status: {code: 404, count: 1}}
    expect(await code(['stats', url])).toEqual({code: 'REMOTE_NOT_FOUND', exit: 1})
    proxy!.faults = {status: {code: 403, count: 1}}
    expect(await code(['verify', url])).toEqual({code: 'REMOTE_DENIED', exit: 1})
    server.ignoreRange = true
    expect(await code(['stats', url])).toEqual({code: 'REMOTE_PROTOCOL', exit: 1})
    await proxy!.close()
    proxy = undefined
    await server.close()
    server = await RangeServer.start(imageFile)
    expect(await code(['stats', server.url()])).toEqual({code: 'NOT_A_SNAPSHOT', exit: 1})
    expect(await code(['stats', 'ftp://example.com/x.uffd'])).toEqual({code: 'USAGE', exit: 2})
    expect(await code(['stats', 's3://'])).toEqual({code: 'USAGE', exit: 2})
  })
})
