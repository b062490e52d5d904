// uffd reading snapshots from HTTP range servers: a real node:http server on loopback (started
// here, with injectable faults: 5xx, resets, truncated and corrupted bodies, stalls, a server
// that ignores ranges, an object replaced mid-resume), real `uffd` processes, and fc_client,
// which faults real memory through a real userfaultfd and verifies every byte.
import {type ChildProcess, spawn} from 'node:child_process'
import fs from 'node:fs'
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

  it('two handlers sharing one cache directory at once both serve every byte right', async () => {
    server = await RangeServer.start(snapshot)
    const cache = path.join(dir, 'cache-shared')
    const [a, b] = await Promise.all([resumeOnce(server.url(), cache), resumeOnce(server.url(), cache, [], ['--touch', 'sequential', '--verify-all'])])
    expectVerified(a)
    expectVerified(b)
  })
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
