// End-to-end tests of `uffd resume` against real userfaultfd clients: native/build/fc_client
// (behaves like Firecracker restoring a snapshot with the Uffd backend: maps the regions,
// registers a uffd, sends the handshake, touches and verifies every byte against the raw image)
// and native/build/kvm_vmm (a real KVM guest restored lazily through the handler). Every test
// runs the built CLI as a real process, waits for its --ready-file, and checks what the client
// saw (bytes, zeros after a balloon, being killed rather than fed wrong data) together with the
// handler's exit code, messages and --stats-file.
import {type ChildProcess, execFileSync, spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {type ResumeReport} from '../src/resume/run-stats.js'
import {type CompressionCodec} from '../src/snapshot/codecs.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {connectUnix, listenUnix, sendWithFds} from '../src/sys/socket.js'
import {closeFd, createUserfaultfd, uffdApi} from '../src/sys/index.js'
import {NATIVE, uffd, uffdSpawn} from './helpers/cli.js'
import {exitWithin, killAll, type Running, track as trackChild, waitFor} from './helpers/processes.js'
import {reserveHugePages} from './helpers/hugepages.js'
import {makeImage, pseudoRandom, tempDir, writeSparse} from './helpers/images.js'

const FC_CLIENT = path.join(NATIVE, 'fc_client')
const KVM_VMM = path.join(NATIVE, 'kvm_vmm')
const PAGE = 4096
const HUGE = 2 * 1024 * 1024
const MiB = 1024 * 1024
/** fc_client's own watchdog: a handler that stops serving makes it exit 3 instead of hanging. */
const CLIENT_TIMEOUT_MS = 30_000

function skipReason(): string | undefined {
  if (process.platform !== 'linux') return 'not Linux'
  // fc_client's uffd traps kernel-mode faults too (like Firecracker's, for KVM): that needs root.
  if (process.getuid?.() !== 0) return 'not root (a uffd that traps kernel-mode faults needs root)'
  if (!fs.existsSync(FC_CLIENT)) return `${FC_CLIENT} is not built (npm run build)`
  return undefined
}
const skip = skipReason()
if (skip) console.warn(`test/resume-e2e.test.ts skipped: ${skip}`)

// ------------------------------------------------------------------------------------------
// Processes: every child is tracked and SIGKILLed in afterEach, and none may outlive a bound.

const live = new Set<ChildProcess>()

/** Follows a child until afterEach (see helpers/processes.ts). */
function track(child: ChildProcess, jsonWhole = false, killAfterMs = 90_000): Running {
  return trackChild(live, child, jsonWhole, killAfterMs)
}

afterEach(() => killAll(live))

// ------------------------------------------------------------------------------------------
// Images and snapshots

let dir: string
let names = 0

interface Image {
  file: string
  /** The image's bytes (a sparse file's holes as zeros). */
  data: Buffer
}

const images = new Map<string, Image>()

type Kind = 'mixed' | 'random' | 'zero' | 'sparse' | 'huge' | 'holes'

/** Test images, made once: all kinds have zero pages except random, and mixed has an odd size. */
function image(kind: Kind): Image {
  let img = images.get(kind)
  if (img) return img
  const file = path.join(dir, `${kind}.raw`)
  let data: Buffer
  switch (kind) {
    case 'mixed':
      // Zero, compressible, random and repeated (deduplicated) pages, and a partial last page.
      data = makeImage('mixed', 16 * MiB + 1234, 11)
      fs.writeFileSync(file, data)
      break
    case 'random':
      data = makeImage('random', 8 * MiB, 12)
      fs.writeFileSync(file, data)
      break
    case 'zero':
      data = makeImage('zero', 8 * MiB)
      fs.writeFileSync(file, data)
      break
    case 'sparse':
      // Holes around unaligned data extents: pages partly data, partly hole.
      data = writeSparse(file, 16 * MiB, [
        [12345, 100_000],
        [5 * MiB, MiB],
        [9 * MiB + 4000, 3 * PAGE],
        [16 * MiB - 5000, 5000],
      ])
      break
    case 'holes':
      // Random data around one 4 MiB zero run, [2, 6) MiB: long enough to hand to the kernel.
      data = makeImage('random', 8 * MiB, 16)
      data.fill(0, 2 * MiB, 6 * MiB)
      fs.writeFileSync(file, data)
      break
    case 'huge':
      // 2 MiB pages: data, all zeros (hugetlbfs has no UFFDIO_ZEROPAGE), random, compressible.
      data = Buffer.concat([makeImage('mixed', HUGE, 13), Buffer.alloc(HUGE), pseudoRandom(HUGE, 14), makeImage('compressible', HUGE, 15)])
      fs.writeFileSync(file, data)
      break
  }
  img = {file, data}
  images.set(kind, img)
  return img
}

/** Zero and non-zero pages of an image padded to whole pages (what the handler must install). */
function pageCounts(data: Buffer, pageSize = PAGE): {pages: number; zero: number; nonZero: number} {
  const pages = Math.ceil(data.length / pageSize)
  let zero = 0
  for (let p = 0; p < pages; p++) {
    const page = data.subarray(p * pageSize, Math.min(data.length, (p + 1) * pageSize))
    if (page.every((b) => b === 0)) zero++
  }
  return {pages, zero, nonZero: pages - zero}
}

const snapshots = new Map<string, string>()

/**
 * A snapshot of a test image, made with `uffd snapshot` (the same build as the `uffd resume`
 * under test, so writer and reader always agree on the format).
 */
function snapshotOf(kind: Kind, codec: CompressionCodec, chunkSize: number, pageSize = PAGE): string {
  const key = `${kind}-${codec}-${chunkSize}-${pageSize}`
  const existing = snapshots.get(key)
  if (existing) return existing
  const out = path.join(dir, `${key}.uffd`)
  const made = uffd(['snapshot', '--mem-file', image(kind).file, '-o', out, '--codec', codec, '--chunk-size', `${chunkSize / 1024}K`, '--page-size', pageSize === HUGE ? '2M' : '4K'])
  if (made.status !== 0) throw new Error(`uffd snapshot failed (${made.status}):\n${made.stderr}`)
  snapshots.set(key, out)
  return out
}

/** Chunks that have stored bytes (not all-zero): each is decoded once when the cache holds them all. */
function storedChunks(snapshot: string): number {
  const reader = SnapshotReader.open(snapshot)
  try {
    return [...reader.index].filter((e) => e.codec !== Codec.None).length
  } finally {
    reader.close()
  }
}

// ------------------------------------------------------------------------------------------
// Running the handler and its clients

interface Handler {
  proc: Running
  socket: string
  ready: string
  statsFile: string
  name: string
}

/** Starts `uffd resume` and waits for its --ready-file (never sleeps a guessed time). */
async function startResume(snapshot: string, args: string[] = [], options: {json?: boolean} = {}): Promise<Handler> {
  const name = `r${names++}`
  const socket = path.join(dir, `${name}.sock`)
  const ready = path.join(dir, `${name}.ready`)
  const statsFile = path.join(dir, `${name}.stats.json`)
  const proc = track(uffdSpawn(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, ...args]), options.json ?? args.includes('--json'))
  await waitFor(`uffd resume ${name} to write its ready file`, () => fs.existsSync(ready) || proc.exited, 30_000)
  if (!fs.existsSync(ready)) {
    const out = await proc.done
    throw new Error(`uffd resume exited (${out.code}) before it was ready:\n${out.stderr}`)
  }
  return {proc, socket, ready, statsFile, name}
}

function startClient(handler: Handler, img: Image, args: string[], timeoutMs = CLIENT_TIMEOUT_MS): Running {
  return track(spawn(FC_CLIENT, ['--socket', handler.socket, '--image', img.file, '--timeout-ms', String(timeoutMs), ...args], {stdio: ['ignore', 'pipe', 'pipe']}))
}

function readStats(handler: Handler): ResumeReport {
  return JSON.parse(fs.readFileSync(handler.statsFile, 'utf8')) as ResumeReport
}

/** One resume, one client; both must succeed, the client must have verified every byte it read. */
async function serveOne(snapshot: string, img: Image, clientArgs: string[], resumeArgs: string[] = []) {
  const handler = await startResume(snapshot, resumeArgs)
  const client = await exitWithin(startClient(handler, img, clientArgs), 60_000, 'fc_client')
  const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (after its client exited)')
  expect(client.code, `fc_client failed:\n${client.stderr}\nuffd resume:\n${resume.stderr}`).toBe(0)
  expect(client.json, client.stdout).toMatchObject({ok: true, verify_errors: 0, first_bad_offset: null})
  expect(resume.code, `uffd resume failed:\n${resume.stderr}`).toBe(0)
  return {client: client.json, resume, stats: readStats(handler), handler}
}

/** With every page read once, each page is installed exactly once: data pages copied, zero pages zeroed. */
function expectEveryPageOnce(stats: ResumeReport, data: Buffer, pageSize = PAGE): void {
  const {zero, nonZero} = pageCounts(data, pageSize)
  expect(stats.pages.copied, 'pages copied = non-zero pages').toBe(nonZero)
  expect(stats.bytes.copied).toBe(nonZero * pageSize)
  // Large zero ranges are left to the kernel (--kernel-zeros): it fills those without faults.
  expect(stats.pages.zeroed + (stats.pages.toKernel ?? 0), 'pages zeroed or left to the kernel = zero pages').toBe(zero)
  expect(stats.clients).toEqual({served: 1, ended: 1})
}

/** Starts a handler on a snapshot whose every client is refused; returns its outcome and the client's. */
async function refused(snapshot: string, img: Image, clientArgs: string[], clientTimeoutMs = CLIENT_TIMEOUT_MS, resumeArgs: string[] = []) {
  const handler = await startResume(snapshot, resumeArgs)
  const clientProc = startClient(handler, img, clientArgs, clientTimeoutMs)
  const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (refusing a handshake)')
  const client = await exitWithin(clientProc, clientTimeoutMs + 10_000, 'fc_client')
  // Nothing was served: no client was ever registered, no fault counted.
  expect(resume.stderr).not.toMatch(/client 1 \(pid/)
  if (fs.existsSync(handler.statsFile)) expect(readStats(handler).faults.total).toBe(0)
  return {resume, client, handler}
}

const hugeSkip = ((): string | undefined => {
  if (skip) return skip
  if (!fs.existsSync('/proc/sys/vm/nr_hugepages')) return 'no /proc/sys/vm/nr_hugepages (kernel without hugetlbfs)'
  try {
    fs.accessSync('/proc/sys/vm/nr_hugepages', fs.constants.W_OK)
  } catch (error) {
    return `cannot write /proc/sys/vm/nr_hugepages: ${(error as Error).message}`
  }
  return undefined
})()

const kvmSkip = ((): string | undefined => {
  if (skip) return skip
  if (!fs.existsSync('/dev/kvm')) return 'no /dev/kvm on this machine'
  if (!fs.existsSync(KVM_VMM)) return `${KVM_VMM} is not built`
  return undefined
})()

// ------------------------------------------------------------------------------------------

describe.skipIf(skip !== undefined)('uffd resume with real userfaultfd clients', () => {
  beforeAll(() => {
    dir = tempDir('uffd-e2e-')
  })
  afterAll(() => {
    if (dir) fs.rmSync(dir, {recursive: true, force: true})
  })

  describe('byte-exact restore (fc_client --verify-all)', () => {
    // A sensible cut through kinds x codecs x chunk sizes x fault-around x touch order x regions:
    // every kind meets every codec once, every chunk size and fault-around appears with each
    // kind; some rows also vary the prefetch machinery (readahead off, population, no decoders).
    const matrix: {kind: Kind; codec: CompressionCodec; chunk: number; around: string; touch: string; regions: number; extra?: string[]}[] = [
      {kind: 'mixed', codec: 'zstd', chunk: 64 * 1024, around: 'chunk', touch: 'sequential', regions: 1},
      {kind: 'mixed', codec: 'lz4', chunk: 4096, around: 'page', touch: 'random', regions: 2, extra: ['--readahead', '0']},
      {kind: 'mixed', codec: 'raw', chunk: MiB, around: '2M', touch: 'random', regions: 1},
      {kind: 'mixed', codec: 'zstd', chunk: MiB, around: 'page', touch: 'random', regions: 2, extra: ['--decoders', '0']},
      {kind: 'random', codec: 'zstd', chunk: 64 * 1024, around: 'page', touch: 'sequential', regions: 1},
      {kind: 'random', codec: 'lz4', chunk: MiB, around: 'chunk', touch: 'random', regions: 2, extra: ['--populate', 'all']},
      {kind: 'random', codec: 'raw', chunk: 4096, around: '2M', touch: 'sequential', regions: 1, extra: ['--decoders', '0']},
      {kind: 'zero', codec: 'zstd', chunk: 64 * 1024, around: 'chunk', touch: 'random', regions: 2},
      {kind: 'zero', codec: 'lz4', chunk: MiB, around: '2M', touch: 'sequential', regions: 1, extra: ['--populate', 'all']},
      {kind: 'zero', codec: 'raw', chunk: 4096, around: 'page', touch: 'random', regions: 1, extra: ['--readahead', '0']},
      {kind: 'sparse', codec: 'zstd', chunk: MiB, around: 'chunk', touch: 'random', regions: 1},
      {kind: 'sparse', codec: 'lz4', chunk: 64 * 1024, around: '2M', touch: 'sequential', regions: 2},
      {kind: 'sparse', codec: 'raw', chunk: 4096, around: 'page', touch: 'sequential', regions: 1, extra: ['--readahead', '0']},
    ]
    for (const c of matrix) {
      const extra = c.extra ?? []
      const title = `${c.kind} image, ${c.codec}, ${c.chunk / 1024}K chunks, fault-around ${c.around}, ${c.touch} touch, ${c.regions} region(s)${extra.length ? `, ${extra.join(' ')}` : ''}`
      it(title, async () => {
        const snapshot = snapshotOf(c.kind, c.codec, c.chunk)
        const img = image(c.kind)
        const r = await serveOne(snapshot, img, ['--touch', c.touch, '--regions', String(c.regions), '--verify-all'], ['--fault-around', c.around, ...extra])
        const {pages} = pageCounts(img.data)
        expect(r.client).toMatchObject({regions: c.regions, mem_size: pages * PAGE, pages_touched: pages, pages_verified: pages})
        expectEveryPageOnce(r.stats, img.data)
        // Fault-around installs whole windows (clipped to regions); prefetch only makes faults fewer.
        const windowBytes = c.around === 'page' ? PAGE : c.around === 'chunk' ? c.chunk : 2 * MiB
        const windows = Math.ceil((pages * PAGE) / windowBytes) + c.regions - 1
        // Pages served by this handler: long zero ranges are left to the kernel (--kernel-zeros).
        const served = pages - (r.stats.pages.toKernel ?? 0)
        // (Population can install everything before the first touch, and an all-zero image is
        // the kernel's: then there is no fault.)
        if (!extra.includes('--populate') && served > 0) expect(r.stats.faults.total).toBeGreaterThan(0)
        expect(r.stats.faults.total).toBeLessThanOrEqual(windows)
        const prefetching = !extra.includes('--readahead') || extra.includes('--populate')
        if (!prefetching) {
          expect(r.stats.pages.prefetched).toBe(0)
          expect(r.stats.faults.total).toBeGreaterThanOrEqual(Math.ceil((served * PAGE) / windowBytes))
          if (c.around === 'page') expect(r.stats.faults.total, 'one fault per page').toBe(served)
        }
        if (extra.includes('--populate')) {
          expect(r.stats.timeToMemoryCompleteMs).toBeGreaterThan(0)
          expect(r.resume.stderr).toContain('client 1: all memory present')
        }
        // A fault read after prefetch installed its page finds it present; without prefetch, never.
        expect(r.stats.faults.removed).toBe(0)
        if (!prefetching) expect(r.stats.faults.alreadyPresent).toBe(0)
        // Every page came from exactly one of: a fault on a missing page, fault-around, prefetch, the kernel.
        expect(r.stats.faults.data + r.stats.faults.zero + r.stats.pages.faultAround + r.stats.pages.prefetched + (r.stats.pages.toKernel ?? 0)).toBe(pages)
        // Every stored chunk was decoded (at least once: readahead may decode one the fault path had already).
        expect(r.stats.chunks.decoded).toBeGreaterThanOrEqual(storedChunks(snapshot))
        expect(r.stats.ioctls.eexist + r.stats.ioctls.eagain).toBe(0)
      })
    }

    for (const extra of [[], ['--decoders', '0']]) {
      it(`framed chunks (the default): isolated faults under --fault-around auto decode their frames alone, byte-exact (mixed image, random touch, 2 regions${extra.length ? `, ${extra.join(' ')}` : ''})`, async () => {
        const snapshot = snapshotOf('mixed', 'zstd', 256 * 1024)
        const reader = SnapshotReader.open(snapshot)
        expect(reader.framePages).toBe(16)
        reader.close()
        const img = image('mixed')
        const r = await serveOne(snapshot, img, ['--touch', 'random', '--regions', '2', '--verify-all'], ['--fault-around', 'auto', ...extra])
        const {pages} = pageCounts(img.data)
        expect(r.client).toMatchObject({regions: 2, pages_touched: pages, pages_verified: pages})
        expectEveryPageOnce(r.stats, img.data)
        expect(r.stats.chunks.framesDecoded).toBeGreaterThan(0)
        expect(r.stats.ioctls.eexist + r.stats.ioctls.eagain).toBe(0)
      })
    }

    it('framed chunks: a grown window clipped by a region smaller than a chunk, across a chunk boundary, serves each chunk\'s own pages (3 regions of 50 pages, 256K chunks)', async () => {
      // Faults at pages 0, 16, 32 grow the window past a chunk; the fault at 70 lies in the
      // region [50, 100), which straddles the boundary between chunks 0 and 1 at page 64.
      const img = image('mixed')
      const small = path.join(dir, 'small-150.raw')
      fs.writeFileSync(small, img.data.subarray(0, 150 * PAGE))
      const out = path.join(dir, 'small-150.uffd')
      const made = uffd(['snapshot', '--mem-file', small, '-o', out, '--chunk-size', '256K'])
      expect(made.status, made.stderr).toBe(0)
      const trace = path.join(dir, 'small-150.trace')
      fs.writeFileSync(trace, [0, 16, 32, 70].map((p) => String(p * PAGE)).join('\n'))
      const r = await serveOne(out, {file: small, data: img.data.subarray(0, 150 * PAGE)}, ['--touch', `trace:${trace}`, '--regions', '3', '--verify-all'], ['--decoders', '0', '--readahead', '0'])
      expect(r.client).toMatchObject({regions: 3, pages_verified: 150})
    })

    it('evicts and re-decodes chunks with a cache smaller than the image (--cache-mb 1, 1M chunks, random pages, no decoders)', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', MiB)
      const img = image('mixed')
      const r = await serveOne(snapshot, img, ['--touch', 'random', '--verify-all'], ['--fault-around', 'page', '--cache-mb', '1', '--decoders', '0'])
      expectEveryPageOnce(r.stats, img.data)
      expect(r.stats.chunks.decoded).toBeGreaterThan(storedChunks(snapshot))
      expect(r.stats.chunks.cacheMisses).toBe(r.stats.chunks.decoded)
    })

    for (const version of ['1.1', '1.7', '1.12']) {
      it(`takes a Firecracker ${version} handshake (2 regions, random touch)`, async () => {
        const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
        const img = image('mixed')
        const r = await serveOne(snapshot, img, ['--fc-version', version, '--regions', '2', '--touch', 'random', '--verify-all'])
        expect(r.client).toMatchObject({fc_version: version, regions: 2})
        expectEveryPageOnce(r.stats, img.data)
        expect(r.resume.stderr).toMatch(/client 1 \(pid \d+\): 2 region\(s\), 16781312 bytes/)
      })
    }

    for (const fds of ['2', '3']) {
      it(`takes a fork's handshake: unknown fields and ${fds} fds (uffd first)`, async () => {
        const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
        const img = image('mixed')
        const r = await serveOne(snapshot, img, ['--extra-fields', '--fds', fds, '--regions', '2', '--touch', 'random', '--verify-all'])
        expect(r.client).toMatchObject({fds: Number(fds), regions: 2})
        expectEveryPageOnce(r.stats, img.data)
      })
    }

    it('serves kernel-mode faults (write(2), process_vm_readv) from 4 threads at once', async () => {
      const snapshot = snapshotOf('mixed', 'lz4', 64 * 1024)
      const img = image('mixed')
      const r = await serveOne(snapshot, img, ['--threads', '4', '--access', 'mixed', '--touch', 'random', '--regions', '2', '--verify-all'], ['--fault-around', 'page', '--readahead', '0'])
      expect(r.client).toMatchObject({threads: 4, access: 'mixed'})
      expectEveryPageOnce(r.stats, img.data)
      // One page per fault: threads may fault on one page together, and the second fault finds
      // it present (and is woken).
      const {pages} = pageCounts(img.data)
      expect(r.stats.faults.total).toBeGreaterThanOrEqual(pages)
      expect(r.stats.faults.total - r.stats.faults.alreadyPresent).toBe(pages)
    })
  })

  describe('guest memory of two mappings (fc_client --split-at: a region of two VMAs at 5 MiB)', () => {
    // The zero run [2, 6) MiB spans both mappings; with 2 MiB windows, the window [4, 6) MiB too.
    const split = ['--split-at', String(5 * MiB), '--verify-all']

    it('a zero range over both is handed to the kernel whole (one UNREGISTER, both VMAs)', async () => {
      const img = image('holes')
      const r = await serveOne(snapshotOf('holes', 'zstd', 64 * 1024), img, split, ['--fault-around', '2M'])
      expectEveryPageOnce(r.stats, img.data)
      expect(r.stats.pages.toKernel).toBe(1024)
    })

    it('an UNREGISTER that fails at the second VMA (no mapping left under vm.max_map_count) is undone, and every page served', async () => {
      // One mapping left: the kernel splits the first VMA, clears its part of the range, then
      // cannot split the second (ENOMEM) and stops there. Left so, the first part would be
      // unregistered while the handler still thought it its own: the fill of the window
      // [4, 6) MiB would fail with ENOENT and the client be taken for gone, its fault never served.
      const img = image('holes')
      const r = await serveOne(snapshotOf('holes', 'zstd', 64 * 1024), img, [...split, '--map-slots-free', '1'], ['--fault-around', '2M'])
      expectEveryPageOnce(r.stats, img.data)
      expect(r.stats.pages.toKernel ?? 0).toBe(0)
      expect(r.stats.pages.zeroed).toBe(1024)
    })

    it('--no-kernel-zeros: a window over the boundary is filled in pieces, one per VMA, not taken for a gone client', async () => {
      const img = image('holes')
      const r = await serveOne(snapshotOf('holes', 'zstd', 64 * 1024), img, split, ['--fault-around', '2M', '--no-kernel-zeros'])
      expectEveryPageOnce(r.stats, img.data)
      expect(r.stats.pages.toKernel ?? 0).toBe(0)
    })
  })

  describe('balloon (MADV_DONTNEED -> UFFD_EVENT_REMOVE)', () => {
    it('serves zeros for removed pages, never snapshot data, and counts the removes', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const img = image('random')
      // Two ranges: one inside a chunk fault-around has filled, one partly in untouched chunks.
      const r = await serveOne(snapshot, img, ['--touch', 'random', '--count', '100', '--verify', '--balloon', '4096:64K,1M:12K'])
      expect(r.client).toMatchObject({pages_touched: 100, balloon_ok: true, balloon_bytes: 65536 + 12288, balloon_bad_pages: 0})
      expect(r.stats.events).toMatchObject({remove: 2, removedPages: 16 + 3})
      // Each removed page read again faults once and is served zeros (random image: no zero pages).
      expect(r.stats.faults.removed).toBe(19)
      expect(r.stats.pages.zeroed).toBe(19)
    })

    it('keeps removed pages zero when the balloon inflates while 2 threads fault (--balloon-concurrent)', async () => {
      const snapshot = snapshotOf('random', 'lz4', 64 * 1024)
      const img = image('random')
      const balloon = Array.from({length: 20}, (_, i) => `${i * 393216 + 8192}:40K`).join(',')
      const r = await serveOne(snapshot, img, ['--threads', '2', '--touch', 'random', '--verify-all', '--balloon', balloon, '--balloon-concurrent'])
      expect(r.client).toMatchObject({balloon_ok: true, balloon_bytes: 20 * 40960, balloon_bad_pages: 0})
      expect(r.stats.events.remove).toBe(20)
      expect(r.stats.events.removedPages).toBe(20 * 10)
      // Every ballooned page the client reads afterwards is zeroed on demand, none refilled with data.
      expect(r.stats.faults.removed).toBeGreaterThan(0)
      expect(r.stats.pages.copied).toBeLessThanOrEqual(pageCounts(img.data).pages)
    })
    it('background population (--populate all) never refills ballooned memory', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const img = image('mixed')
      // Ranges spread over the image, inflated while 2 threads fault and population runs.
      const balloon = Array.from({length: 16}, (_, i) => `${i * MiB + 12288}:24K`).join(',')
      const r = await serveOne(snapshot, img, ['--threads', '2', '--touch', 'random', '--verify-all', '--balloon', balloon, '--balloon-concurrent'], ['--populate', 'all'])
      expect(r.client).toMatchObject({balloon_ok: true, balloon_bytes: 16 * 24576, balloon_bad_pages: 0})
      expect(r.stats.events).toMatchObject({remove: 16, removedPages: 16 * 6})
      expect(r.stats.pages.prefetched).toBeGreaterThan(0)
    })
  })

  describe('refused handshakes: exit 1 naming the problem, nothing served, connection closed', () => {
    const kinds: [string, RegExp][] = [
      ['not-json', /invalid handshake: not JSON .*this is not JSON/],
      ['unaligned', /invalid handshake: region 0 base_host_virt_addr \d+ is not a multiple of the page size 4096/],
      ['two-page-sizes', /invalid handshake: regions use different page sizes \(4096 and 2097152\)/],
      ['no-fd', /invalid handshake: no file descriptor came with the message \(expected the uffd\)/],
      ['empty-array', /invalid handshake: no memory regions/],
      ['huge-size', /invalid handshake: region 0 "size" is \d+, not a non-negative integer below 2\^53/],
    ]
    for (const [kind, message] of kinds) {
      it(`--malformed ${kind}`, async () => {
        const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
        const {resume, client} = await refused(snapshot, image('mixed'), ['--malformed', kind])
        expect(resume.code, resume.stderr).toBe(1)
        expect(resume.stderr).toMatch(message)
        expect(client.code, client.stderr).toBe(0)
        expect(client.json).toMatchObject({ok: true, malformed: kind, handler_closed: true})
      })
    }

    it('a client with 4 KiB pages against a 2 MiB-page snapshot: killed, never left waiting', async () => {
      const snapshot = snapshotOf('huge', 'zstd', HUGE, HUGE)
      // The client sends a valid handshake and then faults: with its uffd refused, nothing
      // would serve it, so the handler kills it (its watchdog would report the stall with exit 3).
      const {resume, client} = await refused(snapshot, image('huge'), ['--count', '1'], 2000)
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain('invalid handshake: the VMM uses 4096-byte pages but the snapshot was taken with 2097152-byte pages')
      expect(resume.stderr).toMatch(/killing the refused client \(pid \d+\)/)
      expect(client.signal, client.stderr).toBe('SIGKILL')
    })

    it('regions bigger than the snapshot: killed, never left waiting', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const {resume, client} = await refused(snapshot, image('random'), ['--size', '16M', '--regions', '2', '--count', '1'], 2000)
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain('invalid handshake: regions need 16777216 bytes of memory but the snapshot holds 8388608')
      expect(resume.stderr).toMatch(/killing the refused client \(pid \d+\)/)
      expect(client.signal, client.stderr).toBe('SIGKILL')
    })

    it('regions bigger than the snapshot, --no-kill: the client is left alone (it stalls)', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const {resume, client} = await refused(snapshot, image('random'), ['--size', '16M', '--regions', '2', '--count', '1'], 2000, ['--no-kill'])
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain('invalid handshake: regions need 16777216 bytes of memory but the snapshot holds 8388608')
      expect(resume.stderr).not.toContain('killing')
      expect(client.code, client.stderr).toBe(3)
      expect(client.json).toMatchObject({ok: false, phase: 'touch', touches_done: 0})
    })

    for (const kind of ['/dev/null', 'a FIFO', 'a regular file']) {
      it(`a valid handshake whose "uffd" is ${kind}`, async () => {
        const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
        const handler = await startResume(snapshot)
        let path_ = '/dev/null'
        if (kind === 'a FIFO') {
          path_ = path.join(dir, `fifo-${names++}`)
          execFileSync('mkfifo', [path_])
        } else if (kind === 'a regular file') {
          path_ = path.join(dir, `plain-${names++}`)
          fs.writeFileSync(path_, Buffer.alloc(64, 0xff))
        }
        // O_RDWR: a FIFO opened so does not wait for a writer (Linux).
        const fake = fs.openSync(path_, 'r+')
        const connection = connectUnix(handler.socket)
        try {
          const regions = [{base_host_virt_addr: 0x7f00_0000_0000, size: 8 * MiB, offset: 0, page_size: PAGE}]
          sendWithFds(connection, Buffer.from(JSON.stringify(regions)), [fake])
          const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (refusing a fake uffd)')
          expect(resume.code, resume.stderr).toBe(1)
          expect(resume.stderr).toContain('invalid handshake: the file descriptor that came with the message is not a userfaultfd')
          expect(resume.stderr).not.toMatch(/client 1/)
        } finally {
          closeFd(connection)
          fs.closeSync(fake)
        }
      })
    }
  })

  describe('handshakes sent by this process', () => {
    it('takes a valid handshake of 700 regions (more than one recvmsg returns), sent in one sendmsg', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      // The client is this test process: --no-kill, so that stopping the handler does not kill it.
      const handler = await startResume(snapshot, ['--no-kill'])
      const uffd = createUserfaultfd()
      uffdApi(uffd, 0)
      const connection = connectUnix(handler.socket)
      try {
        // Every other page of the VMM's space, so that no two regions touch; offsets a running sum.
        const regions = Array.from({length: 700}, (_, i) => ({base_host_virt_addr: 0x7f00_0000_0000 + 2 * i * PAGE, size: PAGE, offset: i * PAGE, page_size: PAGE}))
        const message = Buffer.from(JSON.stringify(regions))
        expect(message.length).toBeGreaterThan(40 * 1024)
        sendWithFds(connection, message, [uffd])
        await waitFor('the client to be accepted', () => /client 1 \(pid \d+\): 700 region\(s\)/.test(handler.proc.stderr()) || handler.proc.exited, 15_000)
        expect(handler.proc.exited, handler.proc.stderr()).toBe(false)
      } finally {
        closeFd(connection)
        closeFd(uffd)
      }
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.stderr).not.toContain('invalid handshake')
      expect(resume.stderr).toMatch(new RegExp(`client 1 \\(pid ${process.pid}\\): 700 region\\(s\\), ${700 * PAGE} bytes`))
    })
  })

  describe('a corrupted chunk', () => {
    /** A copy of a snapshot with one byte flipped in the middle of a stored, unshared zstd chunk. */
    async function corrupted(): Promise<{snapshot: string; chunk: number; firstPage: number}> {
      const good = snapshotOf('mixed', 'zstd', 64 * 1024)
      const snapshot = path.join(dir, `corrupt-${names++}.uffd`)
      fs.copyFileSync(good, snapshot)
      const reader = SnapshotReader.open(snapshot)
      let chunk: number
      let at: number
      let firstPage: number
      try {
        chunk = [...reader.index].findIndex((e, c) => c >= 40 && e.codec === Codec.Zstd && (e.flags & 1) === 0 && e.storedLength > 64)
        expect(chunk, 'a stored zstd chunk to corrupt').toBeGreaterThan(0)
        const entry = reader.entry(chunk)
        at = entry.dataOffset + Math.floor(entry.storedLength / 2)
        firstPage = reader.geometry.firstPageOfChunk(chunk)
      } finally {
        reader.close()
      }
      const fd = fs.openSync(snapshot, 'r+')
      try {
        const byte = Buffer.alloc(1)
        fs.readSync(fd, byte, 0, 1, at)
        byte[0] ^= 0x5a
        fs.writeSync(fd, byte, 0, 1, at)
      } finally {
        fs.closeSync(fd)
      }
      return {snapshot, chunk, firstPage}
    }

    it('kills the client (SIGKILL, never a wrong byte) and exits 1 naming the chunk', async () => {
      const {snapshot, chunk, firstPage} = await corrupted()
      const handler = await startResume(snapshot)
      const client = await exitWithin(startClient(handler, image('mixed'), ['--touch', 'sequential', '--verify-all']), 30_000, 'fc_client')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume')
      expect(client.signal, `fc_client should have been killed:\n${client.stdout}${client.stderr}`).toBe('SIGKILL')
      expect(client.stdout).toBe('') // it never got to report anything, let alone wrong bytes
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain(`chunk ${chunk}`)
      expect(resume.stderr).toMatch(/checksum mismatch|does not decode/)
      expect(resume.stderr).toMatch(/killing client 1 \(pid \d+\)/)
      // Sequential touch: nothing was copied from the bad chunk (its zero pages may have been
      // mapped before its data was needed: zeros are never wrong there).
      const stats = readStats(handler)
      expect(stats.clients).toEqual({served: 1, ended: 1})
      expect(stats.pages.copied).toBeLessThanOrEqual(pageCounts(image('mixed').data.subarray(0, firstPage * PAGE)).nonZero)
    })

    it('with --no-kill leaves the client frozen, and exits 1 once it is gone', async () => {
      const {snapshot, chunk} = await corrupted()
      const handler = await startResume(snapshot, ['--no-kill'])
      const clientProc = startClient(handler, image('mixed'), ['--touch', 'sequential', '--verify-all'])
      await waitFor('the handler to give up on the client', () => handler.proc.stderr().includes('left frozen'), 30_000)
      await new Promise((resolve) => setTimeout(resolve, 1000))
      expect(clientProc.exited, 'the client must stay frozen, not complete or read zeros').toBe(false)
      expect(handler.proc.exited, 'the handler waits for the frozen client').toBe(false)
      clientProc.child.kill('SIGKILL')
      const client = await exitWithin(clientProc, 10_000, 'fc_client')
      expect(client.signal).toBe('SIGKILL')
      expect(client.stdout).toBe('')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (after the frozen client was killed)')
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain(`chunk ${chunk}`)
      expect(resume.stderr).not.toMatch(/killing client/)
    })
  })

  describe('client lifetime', () => {
    it('exits 0 with its statistics when the client crashes mid-restore (--crash-after)', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      // One page per fault, nothing ahead of them: the client dies with most memory missing.
      const handler = await startResume(snapshot, ['--fault-around', 'page', '--readahead', '0', '--json'])
      const clientProc = startClient(handler, image('mixed'), ['--crash-after', '50'])
      const client = await exitWithin(clientProc, 30_000, 'fc_client')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume')
      expect(client.signal).toBe('SIGABRT')
      expect(resume.code, resume.stderr).toBe(0)
      // --json: the result names the client by the pid SO_PEERCRED gave.
      expect(resume.json).toMatchObject({interrupted: false, clients: [{id: 1, pid: clientProc.child.pid, regions: [{offset: 0}], ended: 'exited'}]})
      expect(resume.json.error).toBeUndefined()
      const stats = readStats(handler)
      expect(stats.clients).toEqual({served: 1, ended: 1})
      expect(stats.faults.total).toBe(50)
      expect(stats.pages.copied + stats.pages.zeroed).toBe(50)
    })

    it('SIGTERM while a client runs: kills it and exits 130', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const handler = await startResume(snapshot, ['--json'])
      const clientProc = startClient(handler, image('mixed'), ['--touch', 'sequential', '--count', '10', '--hold-ms', '60000'])
      await waitFor('the client to be accepted', () => /client 1 \(pid \d+\)/.test(handler.proc.stderr()), 30_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      const client = await exitWithin(clientProc, 10_000, 'fc_client')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json).toMatchObject({interrupted: true, clients: [{ended: 'killed'}]})
      expect(client.signal).toBe('SIGKILL')
      expect(resume.stderr).toMatch(/stopping: killing client 1/)
      expect(fs.existsSync(handler.statsFile)).toBe(true)
    })

    it('--serve: three clients at once share one decoded-chunk cache; SIGTERM ends it with 130', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const img = image('mixed')
      const handler = await startResume(snapshot, ['--serve'])
      const clients = [1, 2, 3].map((seed) => startClient(handler, img, ['--touch', 'random', '--seed', String(seed), '--verify-all']))
      const outcomes = await Promise.all(clients.map((c, i) => exitWithin(c, 60_000, `fc_client ${i + 1}`)))
      for (const out of outcomes) {
        expect(out.code, out.stderr).toBe(0)
        expect(out.json).toMatchObject({ok: true, verify_errors: 0})
      }
      // Still serving after they all left: --serve waits for more clients until a signal.
      await waitFor('all three clients to be noticed gone', () => (handler.proc.stderr().match(/ended \(exited\)/g) ?? []).length === 3, 10_000)
      expect(handler.proc.exited).toBe(false)
      expect(fs.lstatSync(handler.socket).isSocket()).toBe(true)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      // Documented: SIGINT/SIGTERM stop the handler with exit 130, clients running or not.
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.stderr).toContain('interrupted by SIGTERM')
      expect(fs.existsSync(handler.socket), 'socket file removed').toBe(false)
      const stats = readStats(handler)
      expect(stats.clients).toEqual({served: 3, ended: 3})
      const chunks = storedChunks(snapshot)
      // Three clients, yet about one decode per chunk: the clients share the decoded chunks
      // (each chunk at least once; readahead's decoders may repeat a few the cache holds).
      expect(stats.chunks.decoded).toBeGreaterThanOrEqual(chunks)
      expect(stats.chunks.decoded, 'decoded chunks shared between clients').toBeLessThan(1.5 * chunks)
      expect(stats.chunks.cacheHits).toBeGreaterThan(0)
      const {zero, nonZero} = pageCounts(img.data)
      expect(stats.pages.copied).toBe(3 * nonZero)
      expect(stats.pages.zeroed).toBe(3 * zero)
    })
    it('--serve: a client leaving does not disturb the others, and new ones are still served', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const img = image('mixed')
      const handler = await startResume(snapshot, ['--serve'])
      // The first client to connect is the first to leave, while the second is still running.
      const first = startClient(handler, img, ['--touch', 'random', '--count', '20', '--verify', '--hold-ms', '500'])
      await waitFor('the first client to be accepted', () => /client 1 \(pid/.test(handler.proc.stderr()), 30_000)
      const second = startClient(handler, img, ['--touch', 'random', '--count', '20', '--verify', '--hold-ms', '3000'])
      await waitFor('the second client to be accepted', () => /client 2 \(pid/.test(handler.proc.stderr()), 30_000)
      const a = await exitWithin(first, 30_000, 'first fc_client')
      expect(a.code, a.stderr).toBe(0)
      await waitFor('the first client to be noticed gone', () => /client 1 ended/.test(handler.proc.stderr()) || handler.proc.exited, 10_000)
      // The second is still alive (not killed by a handler that fell over), and so is the handler.
      expect(second.exited, `second client:\n${second.stderr()}\nuffd resume:\n${handler.proc.stderr()}`).toBe(false)
      expect(handler.proc.exited, handler.proc.stderr()).toBe(false)
      // A third client, arriving after a departure, is served in full.
      const third = await exitWithin(startClient(handler, img, ['--touch', 'random', '--verify-all']), 30_000, 'third fc_client')
      expect(third.code, `${third.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      const b = await exitWithin(second, 30_000, 'second fc_client')
      expect(b.code, b.stderr).toBe(0)
      await waitFor('all clients to be noticed gone', () => (handler.proc.stderr().match(/ended \(exited\)/g) ?? []).length === 3, 10_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(readStats(handler).clients).toEqual({served: 3, ended: 3})
    })
  })

  describe('--serve and refused clients', () => {
    it('a refused handshake is logged and counted, not the run\'s error: SIGTERM still exits 130', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const img = image('mixed')
      const handler = await startResume(snapshot, ['--serve', '--json'])
      const bad = await exitWithin(startClient(handler, img, ['--malformed', 'not-json']), 30_000, 'malformed fc_client')
      expect(bad.json).toMatchObject({malformed: 'not-json', handler_closed: true})
      await waitFor('the refusal to be logged', () => /rejected a client: invalid handshake: not JSON/.test(handler.proc.stderr()), 10_000)
      // Another client is still served in full.
      const good = await exitWithin(startClient(handler, img, ['--touch', 'random', '--verify-all']), 30_000, 'fc_client')
      expect(good.code, good.stderr).toBe(0)
      await waitFor('the client to be noticed gone', () => /client 1 ended \(exited\)/.test(handler.proc.stderr()), 10_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json).toMatchObject({interrupted: true, clients: [{id: 1, ended: 'exited'}], rejected: [{code: 'BAD_HANDSHAKE'}]})
      expect(resume.json.error).toBeUndefined()
    })
  })

  describe('readiness and the socket', () => {
    it('writes --ready-file only once the socket listens, with mode 0600', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const name = `r${names++}`
      const socket = path.join(dir, `${name}.sock`)
      const ready = path.join(dir, `${name}.ready`)
      const proc = track(uffdSpawn(['resume', snapshot, '--socket', socket, '--ready-file', ready]))
      // Sample as often as possible: whenever the ready file exists, the socket must already.
      let sawReady = false
      const deadline = Date.now() + 30_000
      while (!sawReady) {
        if (proc.exited) throw new Error(`uffd resume exited early:\n${proc.stderr()}`)
        if (Date.now() > deadline) throw new Error(`no ready file within 30 s:\n${proc.stderr()}`)
        sawReady = fs.existsSync(ready)
        if (sawReady) {
          const st = fs.lstatSync(socket)
          expect(st.isSocket()).toBe(true)
          expect(st.mode & 0o777).toBe(0o600)
        }
        await new Promise((resolve) => setImmediate(resolve))
      }
      expect(JSON.parse(fs.readFileSync(ready, 'utf8'))).toEqual({socket, pid: proc.child.pid})
      // And a client connecting right away is served.
      const client = await exitWithin(track(spawn(FC_CLIENT, ['--socket', socket, '--image', image('random').file, '--verify-all', '--timeout-ms', String(CLIENT_TIMEOUT_MS)])), 30_000, 'fc_client')
      expect(client.code, client.stderr).toBe(0)
      const resume = await exitWithin(proc, 15_000, 'uffd resume')
      expect(resume.code, resume.stderr).toBe(0)
      expect(resume.stderr).toContain(`listening on ${socket}`)
      expect(fs.existsSync(socket), 'socket removed').toBe(false)
    })

    it('removes a stale --ready-file before it listens, and its own at exit', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const name = `r${names++}`
      const socket = path.join(dir, `${name}.sock`)
      const ready = path.join(dir, `${name}.ready`)
      fs.writeFileSync(ready, 'left by an earlier run\n')
      const proc = track(uffdSpawn(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30']))
      // A wait loop must not go on before this handler listens: the stale file goes first, so
      // once the socket exists the stale text is never read. (How long the file is absent is the
      // handler's start-up, which may be too short to see: test/remote-http.test.ts checks, with
      // a slow server, that it goes before the snapshot is opened.)
      const deadline = Date.now() + 30_000
      for (;;) {
        if (proc.exited) throw new Error(`uffd resume exited early:\n${proc.stderr()}`)
        if (Date.now() > deadline) throw new Error(`no ready file within 30 s:\n${proc.stderr()}`)
        const listening = fs.existsSync(socket)
        // (The handler removes the file at any moment: exists-then-read would race with it.)
        let text: string | undefined
        try {
          text = fs.readFileSync(ready, 'utf8')
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error
        }
        if (listening) expect(text, 'the stale ready file outlived the socket').not.toBe('left by an earlier run\n')
        if (text !== undefined && text !== 'left by an earlier run\n') break
        await new Promise((resolve) => setImmediate(resolve))
      }
      proc.child.kill('SIGTERM')
      const resume = await exitWithin(proc, 15_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(fs.existsSync(ready), 'ready file removed at exit').toBe(false)
    })

    it('at exit leaves alone whatever replaced its socket at the path', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const handler = await startResume(snapshot, ['--timeout', '30'])
      fs.rmSync(handler.socket)
      fs.writeFileSync(handler.socket, 'not the handler\'s')
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(fs.readFileSync(handler.socket, 'utf8')).toBe('not the handler\'s')
      // Nor another listener's socket made at the same path after it.
      const other = await startResume(snapshot, ['--timeout', '30'])
      const replaced = path.join(dir, `other-${names++}.sock`)
      fs.renameSync(other.socket, replaced)
      closeFd(listenUnix(other.socket))
      const ino = fs.lstatSync(other.socket).ino
      other.proc.child.kill('SIGTERM')
      expect((await exitWithin(other.proc, 15_000, 'second uffd resume (SIGTERM)')).code).toBe(130)
      expect(fs.lstatSync(other.socket).ino).toBe(ino)
    })

    it('replaces a stale socket file left at the path', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const name = `r${names}`
      const socket = path.join(dir, `${name}.sock`)
      closeFd(listenUnix(socket)) // a socket file nobody listens on any more
      expect(fs.lstatSync(socket).isSocket()).toBe(true)
      const handler = await startResume(snapshot)
      expect(handler.socket).toBe(socket)
      const client = await exitWithin(startClient(handler, image('random'), ['--touch', 'random', '--verify-all']), 30_000, 'fc_client')
      expect(client.code, client.stderr).toBe(0)
      expect((await exitWithin(handler.proc, 15_000, 'uffd resume')).code).toBe(0)
    })

    it('refuses to replace a socket another handler listens on (which carries on), or a regular file', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const handler = await startResume(snapshot, ['--timeout', '30'])
      const second = await exitWithin(track(uffdSpawn(['resume', snapshot, '--socket', handler.socket])), 20_000, 'second uffd resume')
      expect(second.code).toBe(1)
      expect(second.stderr).toContain(`another process is listening on ${handler.socket}`)
      // Its probe (connect, close) is not mistaken for a client: the first one still waits and serves.
      await waitFor('the first handler to log the probe', () => handler.proc.stderr().includes('closed without sending anything') || handler.proc.exited, 10_000)
      expect(handler.proc.exited, handler.proc.stderr()).toBe(false)
      const client = await exitWithin(startClient(handler, image('random'), ['--touch', 'random', '--verify-all']), 30_000, 'fc_client')
      expect(client.code, client.stderr).toBe(0)
      const first = await exitWithin(handler.proc, 15_000, 'first uffd resume')
      expect(first.code, first.stderr).toBe(0)
      expect(readStats(handler).clients).toEqual({served: 1, ended: 1})
      const file = path.join(dir, `plain-${names++}.sock`)
      fs.writeFileSync(file, 'not a socket')
      const third = await exitWithin(track(uffdSpawn(['resume', snapshot, '--socket', file])), 20_000, 'third uffd resume')
      expect(third.code).toBe(1)
      expect(third.stderr).toContain('exists and is not a socket')
      expect(fs.readFileSync(file, 'utf8')).toBe('not a socket')
    })

    it('--timeout 1 with no client: exits 1 within ~2 s with a message, socket removed', async () => {
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const handler = await startResume(snapshot, ['--timeout', '1'])
      const readyAt = Date.now()
      const resume = await exitWithin(handler.proc, 10_000, 'uffd resume --timeout 1')
      const elapsed = Date.now() - readyAt
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain(`no client connected to ${handler.socket} within 1 s`)
      expect(elapsed).toBeGreaterThanOrEqual(800)
      expect(elapsed).toBeLessThan(2500)
      expect(fs.existsSync(handler.socket)).toBe(false)
    })
  })

  describe('the statistics file', () => {
    it('is written atomically at exit with faults, pages and latency percentiles', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const img = image('mixed')
      const handler = await startResume(snapshot)
      expect(fs.existsSync(handler.statsFile), 'not before the run ends').toBe(false)
      const client = await exitWithin(startClient(handler, img, ['--touch', 'random', '--verify-all']), 30_000, 'fc_client')
      expect(client.code, client.stderr).toBe(0)
      const resume = await exitWithin(handler.proc, 15_000, 'uffd resume')
      expect(resume.code, resume.stderr).toBe(0)
      // No temporary file left next to it.
      expect(fs.readdirSync(dir).filter((f) => f.includes(path.basename(handler.statsFile)) && f.endsWith('.tmp'))).toEqual([])
      const stats = readStats(handler)
      const {pages, zero, nonZero} = pageCounts(img.data)
      expect(stats).toMatchObject({
        kind: 'uffd-resume-stats',
        version: 1,
        snapshot,
        clients: {served: 1, ended: 1},
        pages: {copied: nonZero, zeroed: zero},
        bytes: {copied: nonZero * PAGE},
        events: {remove: 0, removedPages: 0},
      })
      expect(stats.faults.total).toBe(stats.faults.data + stats.faults.zero + stats.faults.removed + stats.faults.alreadyPresent)
      expect(stats.faults.total).toBeGreaterThan(0)
      expect(stats.faults.total).toBeLessThanOrEqual(pages)
      expect(stats.chunks.decoded).toBeGreaterThanOrEqual(storedChunks(snapshot))
      expect(stats.bytes.decompressed).toBeGreaterThanOrEqual(nonZero * PAGE)
      const l = stats.latencyUs
      for (const v of [l.p50, l.p90, l.p99, l.max, l.mean]) expect(v).toBeGreaterThan(0)
      expect(l.p50!).toBeLessThanOrEqual(l.p90!)
      expect(l.p90!).toBeLessThanOrEqual(l.p99!)
      expect(l.p99!).toBeLessThanOrEqual(l.max!)
      expect(stats.timeToFirstFaultMs!).toBeLessThanOrEqual(stats.timeToLastFaultMs!)
      expect(stats.timeToLastFaultMs!).toBeLessThanOrEqual(stats.durationMs)
      expect(new Date(stats.startedAt).getTime()).toBeGreaterThan(Date.now() - 120_000)
      // The summary line on stdout agrees.
      expect(resume.stdout).toContain(`served ${stats.faults.total} faults: ${nonZero} pages copied`)
    })

    it('renders with `uffd stats RUN.json`', async () => {
      const snapshot = snapshotOf('mixed', 'zstd', 64 * 1024)
      const r = await serveOne(snapshot, image('mixed'), ['--touch', 'random', '--count', '500', '--verify'])
      const shown = uffd(['stats', r.handler.statsFile])
      expect(shown.status, shown.stderr).toBe(0)
      expect(shown.stdout).toContain(String(r.stats.faults.total))
      expect(shown.stdout).toMatch(/fault/i)
      expect(shown.stdout).toMatch(/p99/i)
    })
  })

  describe.skipIf(hugeSkip !== undefined)('2 MiB hugepages', () => {
    // Enough for two 8 MiB clients at once.
    let reservation: ReturnType<typeof reserveHugePages> | undefined
    let reason: string | undefined

    beforeAll(() => {
      reservation = reserveHugePages(8)
      reason = reservation.reason
      if (reason) console.warn(`hugepage tests skipped: ${reason}`)
    })

    afterAll(() => reservation?.release())

    for (const chunk of ['2M', '4M']) {
      it(`serves a --page-size 2M --chunk-size ${chunk} snapshot to a MAP_HUGETLB client (2 regions, mixed access, balloon)`, async (ctx) => {
        if (reason) ctx.skip()
        const img = image('huge')
        const snapshot = path.join(dir, `huge-${chunk}.uffd`)
        const made = uffd(['snapshot', '--mem-file', img.file, '-o', snapshot, '--page-size', '2M', '--chunk-size', chunk, '--codec', 'zstd'])
        expect(made.status, made.stderr).toBe(0)
        const r = await serveOne(snapshot, img, ['--hugepages', '--regions', '2', '--access', 'mixed', '--stride', '64K', '--verify-all', '--balloon', `${2 * HUGE}:${HUGE}`])
        expect(r.client).toMatchObject({page_size: HUGE, mem_size: 4 * HUGE, regions: 2, balloon_ok: true, pages_verified: 4})
        // hugetlbfs has no UFFDIO_ZEROPAGE: the re-touched balloon page is copied from a zero
        // buffer, and so is the zero page unless it was left to the kernel first (2 MiB is long
        // enough; a first fault's window may have covered it before).
        expect(r.stats.ioctls.zeropage).toBe(0)
        expect(r.stats.pages.copied).toBe(3)
        expect(r.stats.pages.zeroed + (r.stats.pages.toKernel ?? 0)).toBe(2)
        expect(r.stats.events).toMatchObject({remove: 1, removedPages: 1})
        expect(r.stats.faults.removed).toBe(1)
      })
    }

    it('refuses a MAP_HUGETLB client on a 4 KiB-page snapshot', async (ctx) => {
      if (reason) ctx.skip()
      const snapshot = snapshotOf('random', 'zstd', 64 * 1024)
      const {resume, client} = await refused(snapshot, image('random'), ['--hugepages', '--count', '1'], 2000)
      expect(resume.code, resume.stderr).toBe(1)
      expect(resume.stderr).toContain('invalid handshake: the VMM uses 2097152-byte pages but the snapshot was taken with 4096-byte pages')
      // Nothing would serve its faults: killed rather than left waiting (its watchdog's exit 3).
      expect(client.signal, client.stderr).toBe('SIGKILL')
    })
  })

  describe.skipIf(kvmSkip !== undefined)('a KVM guest (kvm_vmm) restored lazily', () => {
    let snapDir: string
    let checksum: string
    let snapshot: string

    beforeAll(async () => {
      snapDir = path.join(dir, 'kvm')
      const run = await exitWithin(track(spawn(KVM_VMM, ['run', '--mem-mib', '64', '--snapshot-dir', snapDir, '--timeout-ms', '30000'], {stdio: ['ignore', 'pipe', 'pipe']})), 60_000, 'kvm_vmm run')
      if (run.code !== 0) throw new Error(`kvm_vmm run failed (${run.code}):\n${run.stderr}`)
      checksum = run.json.checksum
      snapshot = path.join(snapDir, 'mem.uffd')
      const made = uffd(['snapshot', '--mem-file', path.join(snapDir, 'mem.raw'), '-o', snapshot])
      if (made.status !== 0) throw new Error(`uffd snapshot failed:\n${made.stderr}`)
    })

    for (const regions of ['1', '2']) {
      it(`resumes with the guest's checksum intact (${regions} region(s))`, async () => {
        const handler = await startResume(snapshot)
        const vm = await exitWithin(
          track(spawn(KVM_VMM, ['restore', '--snapshot-dir', snapDir, '--uffd-socket', handler.socket, '--regions', regions, '--timeout-ms', '30000'], {stdio: ['ignore', 'pipe', 'pipe']})),
          60_000,
          'kvm_vmm restore',
        )
        const resume = await exitWithin(handler.proc, 15_000, 'uffd resume')
        expect(vm.code, `kvm_vmm restore failed:\n${vm.stderr}\nuffd resume:\n${resume.stderr}`).toBe(0)
        expect(vm.json).toMatchObject({ok: true, mode: 'uffd', regions: Number(regions), checksum})
        expect(resume.code, resume.stderr).toBe(0)
        const stats = readStats(handler)
        expect(stats.faults.total).toBeGreaterThan(0)
        // Every resident guest page was installed by the handler (and fault-around installs more).
        expect(stats.pages.copied + stats.pages.zeroed).toBeGreaterThanOrEqual(vm.json.resident_pages)
        expect(stats.pages.copied + stats.pages.zeroed).toBeLessThanOrEqual((64 * MiB) / PAGE)
      })
    }
  })
})
