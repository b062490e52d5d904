import {execFileSync} from 'node:child_process'
import fs from 'node:fs'
import http from 'node:http'
import https from 'node:https'
import {type AddressInfo} from 'node:net'
import os from 'node:os'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {backoffMs, extentAt, type ExtentTable, planRun} from '../src/remote/coalesce.js'
import {DiskCache, evict} from '../src/remote/disk-cache.js'
import {FetchScheduler} from '../src/remote/fetcher/scheduler.js'
import {parseLocation} from '../src/remote/location.js'
import {HttpObject} from '../src/remote/http-object.js'
import {checkRangeResponse, type ObjectIdentity, parseContentRange, RemoteError, type RemoteObject} from '../src/remote/object.js'
import {EXTENT_ABSENT, EXTENT_IN_MEMORY, Handover, PRIORITY_DEMAND, PRIORITY_PREFETCH, RemoteCounters, sharedBuffers} from '../src/remote/shared.js'
import {Client} from '../src/resume/fault-loop/client.js'
import {FaultServer} from '../src/resume/fault-loop/fault-server.js'
import {Installer, kernelFillCalls} from '../src/resume/fault-loop/installer.js'
import {DecodedUnits} from '../src/resume/fault-loop/payload-source.js'
import {BUCKETS, RunClock, RunStats} from '../src/resume/run-stats.js'
import {openSnapshot} from '../src/snapshot/open.js'
import {crc32} from '../src/sys/crc.js'
import {cliEnv, uffd, uffdAsync} from './helpers/cli.js'
import {FaultProxy} from './helpers/fault-proxy.js'
import {makeImage, tempDir} from './helpers/images.js'
import {RangeServer} from './helpers/range-server.js'

function table(lengths: number[], gaps: number[] = []): ExtentTable {
  const offsets: number[] = []
  let at = 100
  for (const [i, length] of lengths.entries()) {
    offsets.push(at)
    at += length + (gaps[i] ?? 0)
  }
  return {offsets: Float64Array.from(offsets), lengths: Int32Array.from(lengths), crcs: new Uint32Array(lengths.length), seeds: new Uint32Array(lengths.length)}
}

describe('planRun: which neighbours one ranged request takes', () => {
  it('takes wanted, back-to-back neighbours forward then backward, within the byte bound', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({min: 1, max: 1000}), {minLength: 1, maxLength: 40}), fc.array(fc.constantFrom(0, 0, 0, 7), {maxLength: 40}), fc.array(fc.boolean(), {minLength: 40, maxLength: 40}), fc.nat(39), fc.integer({min: 1, max: 5000}), (lengths, gaps, wantedBits, headSeed, maxBytes) => {
        const t = table(lengths, gaps)
        const head = headSeed % lengths.length
        const wanted = (e: number): boolean => e === head || wantedBits[e]
        const [first, end] = planRun(t, head, wanted, maxBytes)
        expect(first).toBeLessThanOrEqual(head)
        expect(end).toBeGreaterThan(head)
        let bytes = 0
        for (let e = first; e < end; e++) {
          expect(wanted(e)).toBe(true)
          bytes += lengths[e]
          if (e > first) expect(t.offsets[e]).toBe(t.offsets[e - 1] + lengths[e - 1])
        }
        if (end - first > 1) expect(bytes).toBeLessThanOrEqual(maxBytes)
      }),
    )
  })

  it('finds extents by exact offset and length', () => {
    const t = table([10, 20, 30])
    expect(extentAt(t, 110, 20)).toBe(1)
    expect(extentAt(t, 110, 21)).toBe(-1)
    expect(extentAt(t, 111, 20)).toBe(-1)
  })

  it('backs off from 5-10 ms up to 1-2 s', () => {
    expect(backoffMs(0, 0)).toBe(5)
    expect(backoffMs(0, 1)).toBe(10)
    expect(backoffMs(30, 1)).toBe(2000)
  })
})

describe('locations and range answers', () => {
  it('parses paths, URLs and s3://BUCKET/KEY, and refuses what is neither', () => {
    expect(parseLocation('vm.uffd')).toEqual({kind: 'file', path: 'vm.uffd'})
    expect(parseLocation('host:1/vm.uffd')).toEqual({kind: 'file', path: 'host:1/vm.uffd'})
    expect(parseLocation('s3://b/a/b.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'a/b.uffd'})
    expect(parseLocation('HTTPS://h/x?sig=1')).toMatchObject({kind: 'http', url: 'https://h/x?sig=1'})
    for (const bad of ['s3://', 's3://bucket', 's3://bucket/', 'ftp://h/x', 'http://']) expect(() => parseLocation(bad), bad).toThrow(/scheme|bucket|key|URL|host/)
  })

  it('accepts only the range asked for, of the object first seen', () => {
    const identity: ObjectIdentity = {size: 1000, etag: '"a"'}
    expect(parseContentRange('bytes 0-9/1000')).toEqual({first: 0, last: 9, size: 1000})
    expect(parseContentRange('bytes 9-0/1000')).toBeUndefined()
    expect(parseContentRange('bytes 0-1000/1000')).toBeUndefined()
    expect(checkRangeResponse('x', {offset: 10, length: 10}, 'bytes 10-19/1000', {etag: '"a"'}, identity)).toEqual({size: 1000})
    const code = (f: () => unknown): string | undefined => {
      try {
        f()
      } catch (error) {
        return (error as RemoteError).code
      }
      return undefined
    }
    expect(code(() => checkRangeResponse('x', {offset: 10, length: 10}, 'bytes 10-18/1000', {}, identity))).toBe('REMOTE_PROTOCOL')
    expect(code(() => checkRangeResponse('x', {offset: 10, length: 10}, 'bytes 10-19/1001', {}, identity))).toBe('REMOTE_CHANGED')
    expect(code(() => checkRangeResponse('x', {offset: 10, length: 10}, 'bytes 10-19/1000', {etag: '"b"'}, identity))).toBe('REMOTE_CHANGED')
    expect(code(() => checkRangeResponse('x', {offset: 10, length: 10}, undefined, {}, identity))).toBe('REMOTE_PROTOCOL')
  })
})

/** An object whose reads the test answers by hand, in any order. */
class HeldObject implements RemoteObject {
  readonly name = 'held'
  readonly reads: {offset: number; length: number; answer: (bytes: Buffer | Error) => void}[] = []
  async openRange(): Promise<never> {
    throw new Error('not used')
  }
  read(offset: number, length: number): Promise<Buffer> {
    return new Promise((resolve, reject) => this.reads.push({offset, length, answer: (b) => (b instanceof Error ? reject(b) : resolve(b))}))
  }
  close(): void {}
}

function schedulerOver(data: Buffer, lengths: number[], options: {concurrency: number; deadlineMs?: number; maxRequestBytes?: number; take?: (extent: number) => boolean}) {
  const t = table(lengths)
  for (let e = 0; e < lengths.length; e++) t.crcs[e] = crc32(data.subarray(t.offsets[e], t.offsets[e] + lengths[e]))
  const object = new HeldObject()
  const shared = sharedBuffers(lengths.length)
  const counters = new RemoteCounters(shared.counters)
  const scheduler = new FetchScheduler(t, object, {size: data.length}, {concurrency: options.concurrency, maxRequestBytes: options.maxRequestBytes ?? 1 << 20, idleTimeoutMs: 1000, deadlineMs: options.deadlineMs ?? 10_000}, counters, new BigInt64Array(BUCKETS), () => 0, options.take)
  const answer = (i: number, corrupt = false): void => {
    const r = object.reads[i]
    const bytes = Buffer.from(data.subarray(r.offset, r.offset + r.length))
    if (corrupt) bytes[0] ^= 1
    r.answer(bytes)
  }
  return {t, object, scheduler, counters, answer}
}

const flush = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 0))

describe('FetchScheduler', () => {
  const data = Buffer.from(Array.from({length: 2000}, (_, i) => (i * 7) & 0xff))

  it('takes each extent as its request is sent, not when wanted; one taken elsewhere resolves undefined and splits the run', async () => {
    const taken: number[] = []
    const elsewhere = new Set([2])
    const {object, scheduler, answer} = schedulerOver(data, [100, 100, 100, 100, 100], {concurrency: 1, take: (e) => (taken.push(e), !elsewhere.has(e))})
    const wants = [0, 1, 2, 3, 4].map((e) => scheduler.want(e, PRIORITY_DEMAND))
    // One request at a time: extents queued behind it are not taken (no other handler waits on them).
    await flush()
    expect(object.reads.map((r) => [r.offset, r.length])).toEqual([[100, 100]])
    expect(taken).toEqual([0])
    answer(0)
    expect((await wants[0])!.equals(data.subarray(100, 200))).toBe(true)
    await flush()
    // The next run stops at 2, which another handler holds.
    expect(object.reads.map((r) => [r.offset, r.length]).at(-1)).toEqual([200, 100])
    answer(1)
    expect((await wants[1])!.equals(data.subarray(200, 300))).toBe(true)
    expect(await wants[2]).toBeUndefined()
    await flush()
    expect(object.reads.map((r) => [r.offset, r.length]).at(-1)).toEqual([400, 200])
    answer(2)
    expect((await wants[4])!.equals(data.subarray(500, 600))).toBe(true)
    expect(taken).toEqual([0, 1, 2, 2, 3, 4])
    expect(scheduler.idle).toBe(true)
  })

  it('fetches each extent once, coalesces neighbours wanted together, and keeps a slot for demand', async () => {
    const {object, scheduler, answer} = schedulerOver(data, [100, 100, 100, 100, 100, 100], {concurrency: 3})
    const got = [scheduler.want(0, PRIORITY_PREFETCH), scheduler.want(0, PRIORITY_PREFETCH)]
    expect(got[0]).toBe(got[1])
    // Prefetch may use one of three slots (two are kept for demand): extent 0 alone is in flight.
    scheduler.want(3, PRIORITY_PREFETCH)
    expect(object.reads.map((r) => r.offset)).toEqual([100])
    // A demand want goes ahead at once.
    const demanded = scheduler.want(5, PRIORITY_DEMAND)
    expect(object.reads.map((r) => r.offset)).toEqual([100, 600])
    answer(1)
    expect((await demanded)!.equals(data.subarray(600, 700))).toBe(true)
    answer(0)
    await got[0]
    await flush()
    // Extent 3 went out after a prefetch slot freed.
    expect(object.reads.at(-1)!.offset).toBe(400)
  })

  it('extents wanted together while held go out in one ranged request, not the first alone', async () => {
    const {object, scheduler, answer} = schedulerOver(data, [100, 100, 100, 100], {concurrency: 4})
    scheduler.hold()
    const got = [2, 0, 1].map((e) => scheduler.want(e, PRIORITY_DEMAND))
    expect(object.reads).toEqual([])
    scheduler.release()
    // (Extent e lies at 100 + 100e.)
    expect(object.reads.map((r) => [r.offset, r.length])).toEqual([[100, 300]])
    answer(0)
    for (const [i, e] of [2, 0, 1].entries()) expect((await got[i])!.equals(data.subarray(100 + e * 100, 200 + e * 100))).toBe(true)
    // Unheld, each want goes out as it comes.
    scheduler.want(3, PRIORITY_DEMAND)
    expect(object.reads.length).toBe(2)
  })

  it("a fault's neighbours wanted with it at prefetch share its ranged request; the rest wait behind a later demand elsewhere", async () => {
    // Extents 0..7 back to back; 3 fit one request. One request at a time, so order shows.
    const {object, scheduler, answer} = schedulerOver(data, [100, 100, 100, 100, 100, 100, 100, 100, 100, 100], {concurrency: 1, maxRequestBytes: 300})
    scheduler.hold()
    const fault = scheduler.want(3, PRIORITY_DEMAND)
    const around = [1, 2, 4, 5, 6].map((e) => scheduler.want(e, PRIORITY_PREFETCH))
    scheduler.release()
    // The fault's request takes its neighbours forward first (faults walk memory upwards).
    expect(object.reads.map((r) => [r.offset, r.length])).toEqual([[400, 300]])
    const later = scheduler.want(9, PRIORITY_DEMAND)
    answer(0)
    expect((await fault)!.equals(data.subarray(400, 500))).toBe(true)
    expect((await around[2])!.equals(data.subarray(500, 600))).toBe(true)
    await flush()
    // The later fault goes next, ahead of the neighbours still queued.
    expect(object.reads.at(-1)!.offset).toBe(1000)
    answer(1)
    expect((await later)!.equals(data.subarray(1000, 1100))).toBe(true)
    await flush()
    // Then the rest of the neighbours (6 alone: 1, 2 and 6 are not back to back).
    answer(2)
    await flush()
    answer(3)
    await Promise.all(around)
    expect(object.reads.slice(2).map((r) => [r.offset, r.length]).sort((a, b) => a[0] - b[0])).toEqual([
      [200, 200],
      [700, 100],
    ])
    expect(scheduler.idle).toBe(true)
  })

  it('retries a corrupt body, then fails what cannot be had within the deadline', async () => {
    const {object, scheduler, counters, answer} = schedulerOver(data, [100, 100], {concurrency: 4, deadlineMs: 30})
    const first = scheduler.want(0, PRIORITY_DEMAND)
    answer(0, true)
    await new Promise((resolve) => setTimeout(resolve, 20))
    expect(object.reads.length).toBe(2)
    answer(1)
    expect((await first)!.equals(data.subarray(100, 200))).toBe(true)
    expect(counters.get('badResponses')).toBe(1)
    expect(counters.get('retries')).toBe(1)
    const second = scheduler.want(1, PRIORITY_DEMAND)
    const failed = expect(second).rejects.toMatchObject({code: 'FETCH_DEADLINE'})
    for (let i = 0; i < 10 && !scheduler.idle; i++) {
      object.reads.at(-1)!.answer(new RemoteError('REMOTE_UNAVAILABLE', 'HTTP 503', true))
      await new Promise((resolve) => setTimeout(resolve, 15))
    }
    await failed
  })

  it('counts the deadline from when a request is sent, not from when the extent was queued', async () => {
    // One request at a time, extents too far apart to share one: extent 1 waits its turn past
    // the deadline, then its first answer is a 503. Counted from its want it would fail at once.
    const {object, scheduler, answer} = schedulerOver(data, [100, 100], {concurrency: 1, deadlineMs: 60, maxRequestBytes: 100})
    const first = scheduler.want(0, PRIORITY_DEMAND)
    const second = scheduler.want(1, PRIORITY_DEMAND)
    await new Promise((resolve) => setTimeout(resolve, 100))
    answer(0)
    await first
    await flush()
    expect(object.reads.length).toBe(2)
    object.reads[1].answer(new RemoteError('REMOTE_UNAVAILABLE', 'HTTP 503', true))
    for (let i = 0; i < 20 && object.reads.length < 3; i++) await new Promise((resolve) => setTimeout(resolve, 5))
    expect(object.reads.length).toBe(3)
    answer(2)
    expect((await second)!.equals(data.subarray(200, 300))).toBe(true)
  })

  it('fails at once on an error no retry can fix', async () => {
    const {object, scheduler} = schedulerOver(data, [100], {concurrency: 2})
    const wanted = scheduler.want(0, PRIORITY_DEMAND)
    object.reads[0].answer(new RemoteError('REMOTE_NOT_FOUND', 'gone', false))
    await expect(wanted).rejects.toMatchObject({code: 'REMOTE_NOT_FOUND'})
    expect(object.reads.length).toBe(1)
  })
})

describe('a remote fault through the fetcher thread', () => {
  // 8 MiB of incompressible pages in 64 KiB chunks, stored back to back (each ~64 KiB), served
  // by a real range server behind a proxy that answers each request 150 ms late. (Opening reads
  // the head and the last MiB, whose chunks it keeps: the chunks used here lie between.)
  let dir: string
  let server: RangeServer
  let proxy: FaultProxy
  beforeAll(async () => {
    dir = tempDir('uffd-neighbours-')
    fs.writeFileSync(path.join(dir, 'mem.raw'), makeImage('random', 8 << 20, 3))
    const made = uffd(['snapshot', '--mem-file', path.join(dir, 'mem.raw'), '-o', path.join(dir, 'mem.uffd'), '--chunk-size', '64K'])
    expect(made.status, made.stderr).toBe(0)
    server = await RangeServer.start(path.join(dir, 'mem.uffd'))
    proxy = await FaultProxy.start(server.url())
  })
  afterAll(async () => {
    await proxy?.close()
    await server?.close()
    fs.rmSync(dir, {recursive: true, force: true})
  })

  it("asks its neighbours at prefetch: they share its request, and a later fault elsewhere goes before those that did not fit", async () => {
    // One request at a time, at most three chunks per request.
    const fetch = {concurrency: 1, maxRequestBytes: 3 * 66 * 1024, idleTimeoutMs: 5000, deadlineMs: 20_000}
    const opened = await openSnapshot(proxy.url('/snapshot.uffd'), {s3: {}, cacheRoot: path.join(dir, 'cache'), cacheMaxBytes: 1 << 30, fetch})
    try {
      const reader = opened.reader
      const stats = new RunStats()
      const source = new DecodedUnits(reader, undefined, stats, 1 << 20)
      // 256 KiB windows: a fault on chunk 41 wants chunks 40..43 (its own at demand).
      const server = new FaultServer(reader, source, new Installer(kernelFillCalls, stats, 4096, reader.zeroMap, 1), stats, new RunClock(), {faultAroundBytes: 256 * 1024})
      const base = 0x7f00_0000_0000
      const client = new Client(1, -1, [{baseHostVirtAddr: base, size: 8 << 20, offset: 0, pageSize: 4096}], reader.geometry)
      const chunkPages = 16
      proxy.faults = {delayMs: 150}
      const before = proxy.requests.length
      expect(server.serve(client, {address: base + 41 * chunkPages * 4096, readAt: performance.now()}).outcome).toBe('wait')
      expect(server.serve(client, {address: base + 70 * chunkPages * 4096, readAt: performance.now()}).outcome).toBe('wait')
      for (let i = 0; i < 400 && ![40, 41, 42, 43, 69, 70, 71].every((c) => reader.isLocal(c)); i++) await new Promise((resolve) => setTimeout(resolve, 10))
      const chunkAt = (offset: number): number => [...reader.index].findIndex((e) => e.dataOffset === offset)
      const asked = proxy.requests.slice(before).map((r) => {
        const [from, to] = r.range!.replace('bytes=', '').split('-').map(Number)
        return [chunkAt(from), chunkAt(to + 1) < 0 ? reader.index.length : chunkAt(to + 1)]
      })
      // The fault's chunk with the neighbours after it; the later fault with its own (its window
      // is 68..71); only then the first fault's neighbour before it, which did not fit.
      expect(asked.slice(0, 3)).toEqual([
        [41, 44],
        [69, 72],
        [40, 41],
      ])
    } finally {
      await opened.close()
    }
  })
})

describe('DiskCache: the directory it owns', () => {
  const digest = 'ab'.repeat(16)

  it('evicts only the extent files it made, and says which', async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cache-'))
    try {
      const cache = DiskCache.prepare(root, digest)
      cache.publish({offset: 0x100, length: 4000}, Buffer.alloc(4000, 1))
      cache.publish({offset: 0x2000, length: 4000}, Buffer.alloc(4000, 2))
      // What a user keeps beside the cache (a --cache-dir of /var/tmp, say) is not the cache's.
      fs.writeFileSync(path.join(cache.dir, 'notes.txt'), Buffer.alloc(50_000))
      fs.mkdirSync(path.join(root, 'other'))
      fs.writeFileSync(path.join(root, 'other', '100-fa0'), Buffer.alloc(50_000))
      const old = new Date(Date.now() - 3600_000)
      fs.utimesSync(cache.pathOf({offset: 0x100, length: 4000}), old, old)
      const result = await evict(root, 5000)
      expect(result.evictedBytes).toBe(4000)
      expect(result.evicted).toEqual([{dir: cache.dir, extent: {offset: 0x100, length: 4000}}])
      expect(cache.has({offset: 0x100, length: 4000})).toBe(false)
      expect(cache.has({offset: 0x2000, length: 4000})).toBe(true)
      expect(fs.statSync(path.join(cache.dir, 'notes.txt')).size).toBe(50_000)
      expect(fs.statSync(path.join(root, 'other', '100-fa0')).size).toBe(50_000)
    } finally {
      fs.rmSync(root, {recursive: true, force: true})
    }
  })

  it('makes its directory again when it was removed under it', () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cache-'))
    try {
      const cache = DiskCache.prepare(root, digest)
      fs.rmSync(root, {recursive: true})
      cache.publish({offset: 0, length: 10}, Buffer.alloc(10, 7))
      const back = Buffer.alloc(10)
      expect(cache.read({offset: 0, length: 10}, back)).toBe(true)
      expect(back.equals(Buffer.alloc(10, 7))).toBe(true)
      expect(fs.readdirSync(cache.dir)).toEqual(['0-a'])
    } finally {
      fs.rmSync(root, {recursive: true, force: true})
    }
  })

  it('claims an extent for one fetcher at a time; a claim ends with its holder, and eviction removes only unheld stale claims', async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cache-'))
    try {
      const cache = DiskCache.prepare(root, digest)
      const other = new DiskCache(cache.dir)
      const extent = {offset: 0x100, length: 4000}
      const mine = cache.claim(extent)
      expect(typeof mine).toBe('number')
      // Another handler (another open file description) finds it held, for any extent but others.
      expect(other.claim(extent)).toBe('held')
      const elsewhere = other.claim({offset: 0x2000, length: 10})
      expect(typeof elsewhere).toBe('number')
      other.unclaim({offset: 0x2000, length: 10}, elsewhere as number)
      cache.unclaim(extent, mine as number)
      expect(fs.readdirSync(cache.dir)).toEqual([])
      // A holder that dies leaves its file, unlocked: the next claimer takes it.
      const dead = cache.claim(extent) as number
      fs.closeSync(dead)
      const next = other.claim(extent)
      expect(typeof next).toBe('number')
      // Eviction leaves a held claim alone, however old, and removes one nobody holds.
      const stale = {offset: 0x3000, length: 10}
      fs.closeSync(cache.claim(stale) as number)
      const old = new Date(Date.now() - 3600_000)
      for (const name of fs.readdirSync(cache.dir)) fs.utimesSync(path.join(cache.dir, name), old, old)
      await evict(root, Infinity)
      expect(fs.readdirSync(cache.dir)).toEqual(['.claim-100-fa0'])
      other.unclaim(extent, next as number)
      expect(fs.readdirSync(cache.dir)).toEqual([])
    } finally {
      fs.rmSync(root, {recursive: true, force: true})
    }
  })

  it('refuses a directory another user owns, or that group or others may write', () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-cache-'))
    try {
      fs.chmodSync(root, 0o777)
      expect(() => DiskCache.prepare(root, digest)).toThrow(expect.objectContaining({code: 'CACHE_DIR', message: expect.stringContaining('writable by group or others (mode 777)')}))
      fs.chmodSync(root, 0o700)
      expect(DiskCache.prepare(root, digest).dir).toBe(path.join(root, digest))
      fs.chownSync(path.join(root, digest), 65534, 65534)
      expect(() => DiskCache.prepare(root, digest)).toThrow(expect.objectContaining({code: 'CACHE_DIR', message: expect.stringContaining('owned by uid 65534')}))
    } finally {
      fs.rmSync(root, {recursive: true, force: true})
    }
  })
})

/** A loopback server answering every request with `answer`; records how many came and when their responses closed. */
async function answering(answer: (req: http.IncomingMessage, res: http.ServerResponse) => void, tls?: {key: Buffer; cert: Buffer}, onConnection?: (socket: import('node:net').Socket) => void) {
  const seen = {requests: 0, closed: 0}
  const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    seen.requests++
    res.on('close', () => seen.closed++)
    answer(req, res)
  }
  const server = tls ? https.createServer(tls, handler) : http.createServer(handler)
  if (onConnection) server.on('connection', onConnection)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const url = `${tls ? 'https' : 'http'}://127.0.0.1:${(server.address() as AddressInfo).port}`
  const close = (): Promise<void> => {
    server.closeAllConnections()
    return new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return {url, seen, close}
}

describe('remote failures: what is retried, what it is called, what is released', () => {
  const read = {idleTimeoutMs: 2000}

  it('does not retry a certificate that does not verify', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-tls-'))
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-days', '1', '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem')], {stdio: 'ignore'})
    const server = await answering((_, res) => res.writeHead(206).end(), {key: fs.readFileSync(path.join(dir, 'key.pem')), cert: fs.readFileSync(path.join(dir, 'cert.pem'))})
    try {
      const object = new HttpObject(`${server.url}/x`, 'https://host/x')
      await expect(object.read(0, 10, {size: 100}, read)).rejects.toMatchObject({code: 'REMOTE_PROTOCOL', retryable: false, message: expect.stringContaining('TLS failed')})
      expect(server.seen.requests).toBe(0)
    } finally {
      await server.close()
      fs.rmSync(dir, {recursive: true, force: true})
    }
  })

  it('refuses a redirect from https to plain http (run as uffd, trusting the test certificate)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-tls-'))
    const [key, cert] = [path.join(dir, 'key.pem'), path.join(dir, 'cert.pem')]
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-days', '1', '-keyout', key, '-out', cert], {stdio: 'ignore'})
    const plain = await answering((_, res) => res.writeHead(404).end())
    const secure = await answering((req, res) => res.writeHead(302, {location: `${plain.url}${req.url}`}).end(), {key: fs.readFileSync(key), cert: fs.readFileSync(cert)})
    try {
      const r = await uffdAsync(['stats', `${secure.url}/x.uffd`, '--json'], {env: {...cliEnv(), NODE_EXTRA_CA_CERTS: cert}})
      expect(r.json?.error, r.stderr).toMatchObject({code: 'REMOTE_PROTOCOL', message: expect.stringContaining('redirected from https to plain http')})
      // The https server was asked (its certificate trusted), the plain one never.
      expect(secure.seen.requests).toBeGreaterThan(0)
      expect(plain.seen.requests).toBe(0)
    } finally {
      await Promise.all([plain.close(), secure.close()])
      fs.rmSync(dir, {recursive: true, force: true})
    }
  })

  it('calls expired S3 session credentials REMOTE_DENIED', async () => {
    const server = await answering((_, res) => {
      res.writeHead(400, {'content-type': 'application/xml'}).end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>')
    })
    const saved = {id: process.env.AWS_ACCESS_KEY_ID, secret: process.env.AWS_SECRET_ACCESS_KEY}
    Object.assign(process.env, {AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test'})
    try {
      const {S3Object, s3Client} = await import('../src/remote/s3-object.js')
      const object = new S3Object(s3Client({endpoint: server.url}, 1), 'bucket', 'key')
      await expect(object.read(0, 10, {size: 100}, read)).rejects.toMatchObject({code: 'REMOTE_DENIED', retryable: false, message: expect.stringContaining('ExpiredToken')})
    } finally {
      for (const [k, v] of [['AWS_ACCESS_KEY_ID', saved.id], ['AWS_SECRET_ACCESS_KEY', saved.secret]] as const) {
        if (v === undefined) delete process.env[k]
        else process.env[k] = v
      }
      await server.close()
    }
  })

  it('releases the connection of an answer it refuses, without reading its body', async () => {
    // A wrong Content-Range, then a body that never ends: kept unread, its socket stays busy for good.
    const server = await answering((_, res) => {
      res.writeHead(206, {'content-range': 'bytes 0-999999999/2000000000'})
      res.write(Buffer.alloc(65536))
    })
    try {
      const object = new HttpObject(`${server.url}/x`, 'http://host/x')
      await expect(object.read(100, 10, {size: 2_000_000_000}, read)).rejects.toMatchObject({code: 'REMOTE_PROTOCOL'})
      for (let i = 0; i < 100 && server.seen.closed === 0; i++) await new Promise((resolve) => setTimeout(resolve, 20))
      expect(server.seen.closed).toBe(1)
    } finally {
      await server.close()
    }
  })

  it('names the object and the range in an extent that failed for good', async () => {
    const server = await answering((_, res) => res.writeHead(404).end())
    try {
      const t = table([100, 100])
      const object = new HttpObject(`${server.url}/x`, 'http://host/x')
      const scheduler = new FetchScheduler(t, object, {size: 1000}, {concurrency: 2, maxRequestBytes: 1 << 20, idleTimeoutMs: 1000, deadlineMs: 5000}, new RemoteCounters(sharedBuffers(2).counters), new BigInt64Array(BUCKETS))
      await expect(scheduler.want(1, PRIORITY_DEMAND)).rejects.toMatchObject({code: 'REMOTE_NOT_FOUND', message: 'http://host/x: not found (HTTP 404) (fetching bytes 200-299)'})
    } finally {
      await server.close()
    }
  })
})

describe('the HTTP connection pool', () => {
  it('keeps at most the connections it is given, however many reads are under way, and reuses them', async () => {
    let open = 0
    let most = 0
    let connections = 0
    const server = await answering((req, res) => {
      const [first, last] = /bytes=(\d+)-(\d+)/.exec(req.headers.range!)!.slice(1).map(Number)
      setTimeout(() => res.writeHead(206, {'content-range': `bytes ${first}-${last}/1000`}).end(Buffer.alloc(last - first + 1, first & 0xff)), 20)
    }, undefined, (socket) => {
      connections++
      most = Math.max(most, ++open)
      socket.on('close', () => open--)
    })
    const object = new HttpObject(`${server.url}/x`, 'http://host/x', 2)
    try {
      const reads = await Promise.all(Array.from({length: 12}, (_, i) => object.read(i * 10, 10, {size: 1000}, {idleTimeoutMs: 5000})))
      reads.forEach((bytes, i) => expect(bytes.equals(Buffer.alloc(10, (i * 10) & 0xff))).toBe(true))
      expect(most).toBe(2)
      expect(connections).toBe(2)
    } finally {
      object.close()
      await server.close()
    }
  })
})

describe('HTTP redirects', () => {
  it('follows a redirect to the object, keeps the range, and gives up after five', async () => {
    let hops = 0
    const server = await answering((req, res) => {
      if (req.url === '/loop') {
        hops++
        res.writeHead(302, {location: '/loop'}).end()
      } else if (req.url === '/x') res.writeHead(307, {location: '/stored/x'}).end()
      else res.writeHead(206, {'content-range': `bytes 10-19/1000`}).end(Buffer.alloc(10, req.headers.range === 'bytes=10-19' ? 5 : 0))
    })
    try {
      expect((await new HttpObject(`${server.url}/x`, 'http://host/x').read(10, 10, {size: 1000}, {idleTimeoutMs: 5000})).equals(Buffer.alloc(10, 5))).toBe(true)
      await expect(new HttpObject(`${server.url}/loop`, 'http://host/loop').read(10, 10, {size: 1000}, {idleTimeoutMs: 5000})).rejects.toMatchObject({code: 'REMOTE_PROTOCOL', retryable: false, message: 'http://host/loop: more than 5 redirects'})
      expect(hops).toBe(6)
    } finally {
      await server.close()
    }
  })
})

describe('the S3 connection pool', () => {
  it('opens as many connections as --fetch-concurrency asks for, past the SDK default of 50', async () => {
    const held: http.ServerResponse[] = []
    const server = await answering((_, res) => held.push(res))
    const saved = {id: process.env.AWS_ACCESS_KEY_ID, secret: process.env.AWS_SECRET_ACCESS_KEY}
    Object.assign(process.env, {AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test'})
    try {
      const {S3Object, s3Client} = await import('../src/remote/s3-object.js')
      const object = new S3Object(s3Client({endpoint: server.url}, 1, 64), 'bucket', 'key')
      const reads = Array.from({length: 64}, (_, i) => object.read(i * 10, 10, {size: 1000}, {idleTimeoutMs: 5000}).catch(() => {}))
      for (let i = 0; i < 150 && server.seen.requests < 64; i++) await new Promise((resolve) => setTimeout(resolve, 20))
      expect(server.seen.requests).toBe(64)
      for (const res of held) res.writeHead(503).end()
      await Promise.all(reads)
    } finally {
      for (const [k, v] of [['AWS_ACCESS_KEY_ID', saved.id], ['AWS_SECRET_ACCESS_KEY', saved.secret]] as const) {
        if (v === undefined) delete process.env[k]
        else process.env[k] = v
      }
      await server.close()
    }
  })
})

describe('Handover: verified extents passed to readers in memory when the cache directory fails', () => {
  it('a read gives exactly the bytes put, or nothing; the newest extent is always there; the ring bounds what is held', () => {
    fc.assert(
      fc.property(fc.integer({min: 64, max: 4096}), fc.array(fc.tuple(fc.nat(15), fc.integer({min: 1, max: 64})), {minLength: 1, maxLength: 60}), (capacity, puts) => {
        const extents = 16
        const lengths = Int32Array.from({length: extents}, (_, e) => 1 + ((e * 37) % 64))
        const share = {handover: new SharedArrayBuffer(capacity), handoverIndex: new SharedArrayBuffer(extents * 8), states: new SharedArrayBuffer(extents * 4), extentLengths: lengths}
        const states = new Int32Array(share.states)
        const writer = new Handover(share)
        const reader = new Handover(share)
        const bytesOf = (e: number, version: number): Uint8Array => Uint8Array.from({length: lengths[e]}, (_, i) => (e * 31 + i * 7 + version) & 0xff)
        const version = new Array<number>(extents).fill(0)
        for (const [e, v] of puts) {
          // (The fetcher hands over only an extent that is not in memory: a reader discarded it.)
          Atomics.store(states, e, EXTENT_ABSENT)
          version[e] = v
          expect(writer.put(e, bytesOf(e, v))).toBe(true)
          Atomics.store(states, e, EXTENT_IN_MEMORY)
          let held = 0
          for (let x = 0; x < extents; x++) {
            const dst = new Uint8Array(lengths[x])
            const got = reader.read(x, dst)
            expect(got).toBe(Atomics.load(states, x) === EXTENT_IN_MEMORY)
            if (got) {
              expect(dst).toEqual(bytesOf(x, version[x]))
              held += lengths[x]
            }
          }
          expect(reader.read(e, new Uint8Array(lengths[e]))).toBe(true)
          expect(held).toBeLessThanOrEqual(capacity)
        }
      }),
    )
  })

  it('refuses bytes larger than the whole ring (the fetcher then fails the extent with CACHE_DIR)', () => {
    const share = {handover: new SharedArrayBuffer(16), handoverIndex: new SharedArrayBuffer(8), states: new SharedArrayBuffer(4), extentLengths: Int32Array.of(32)}
    expect(new Handover(share).put(0, new Uint8Array(32))).toBe(false)
  })

  it('a copy overwritten while it is read is refused (its generation moved)', () => {
    const lengths = Int32Array.of(8, 8)
    const share = {handover: new SharedArrayBuffer(8), handoverIndex: new SharedArrayBuffer(16), states: new SharedArrayBuffer(8), extentLengths: lengths}
    const states = new Int32Array(share.states)
    const writer = new Handover(share)
    writer.put(0, new Uint8Array(8).fill(1))
    Atomics.store(states, 0, EXTENT_IN_MEMORY)
    // A reader that copies extent 0 while the writer puts extent 1 over it sees the move.
    const dst = new Uint8Array(8)
    const ring = new Uint8Array(share.handover)
    const set = dst.set.bind(dst)
    dst.set = (source: ArrayLike<number>, offset?: number): void => {
      writer.put(1, new Uint8Array(8).fill(2))
      set(ring, offset)
      void source
    }
    expect(new Handover(share).read(0, dst)).toBe(false)
    expect(Atomics.load(states, 0)).toBe(EXTENT_ABSENT)
  })
})
