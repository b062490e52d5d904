// The fault loop's parts in one thread, without a real client: the installer, the fault server
// and the prefetcher run against a simulated kernel (FillCalls that keep their own page table
// and copy from the real payload addresses they are given) and a payload source that can be told
// to fail or to hold a unit back. The snapshots are real files written by `uffd snapshot`.
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {UffdError} from '../src/core/errors.js'
import {Codec} from '../src/format/constants.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {Client} from '../src/resume/fault-loop/client.js'
import {FaultServer} from '../src/resume/fault-loop/fault-server.js'
import {type FillCalls, fillErrnoMeaning, Installer, ZEROS} from '../src/resume/fault-loop/installer.js'
import {FaultLoop} from '../src/resume/fault-loop/loop.js'
import {PAGE_MISSING, PAGE_PRESENT, PAGE_REMOVED} from '../src/resume/fault-loop/page-states.js'
import {DecodedUnits, type PayloadSource} from '../src/resume/fault-loop/payload-source.js'
import {Prefetcher} from '../src/resume/fault-loop/prefetch.js'
import {type GuestRegion} from '../src/resume/protocol.js'
import {RunClock, RunStats} from '../src/resume/run-stats.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {SysError} from '../src/sys/index.js'
import {addressOf, bufferAt, Errno} from '../src/sys/index.js'
import {uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

const PAGE = 4096
/** Where the simulated client maps its one region (any page-aligned address: nothing is touched there). */
const BASE = 0x7f00_0000_0000
const UFFD = 99

/**
 * A client's page table as the kernel keeps it, for the installer's calls: a copy installs pages
 * until it meets a present one (EEXIST at the first page, else EAGAIN with the bytes done), a
 * queued event makes every call fail with EAGAIN (mmap_changing), a gone mm with ESRCH.
 */
class SimulatedKernel implements FillCalls {
  readonly memory: Buffer
  readonly present: Uint8Array
  /** How often each page was installed: never more than once, or a page was copied twice. */
  readonly installs: Uint16Array
  eventQueued = false
  gone = false
  /** Pages outside every registered VMA (a restored process unmapped or unregistered them). */
  readonly unregistered = new Set<number>()
  /** Pages that begin a VMA: a fill over one fails whole with ENOENT (it must lie inside one VMA). */
  readonly vmaStarts = new Set<number>()
  /** Stop a copy after this many pages with EAGAIN (a partial copy), once. */
  stopAfterPages: number | undefined
  readonly wakes: number[] = []
  calls = 0
  fillBlock = undefined
  startHelper = undefined

  constructor(readonly pages: number) {
    this.memory = Buffer.alloc(pages * PAGE)
    this.present = new Uint8Array(pages)
    this.installs = new Uint16Array(pages)
  }

  copy(fd: number, dst: number, src: number, length: number): {done: number; error: number} {
    return this.install(fd, dst, length, (page, offset) => bufferAt(src + offset, PAGE).copy(this.memory, page * PAGE))
  }

  zeropage(fd: number, start: number, length: number): {done: number; error: number} {
    return this.install(fd, start, length, (page) => this.memory.fill(0, page * PAGE, (page + 1) * PAGE))
  }

  wake(fd: number, start: number, _length?: number): void {
    expect(fd).toBe(UFFD)
    this.wakes.push((start - BASE) / PAGE)
  }

  /**
   * Ranges handed back with UNREGISTER, in pages; refuseUnregister makes the kernel say ENOMEM.
   * With unregisterFailsAt, it says ENOMEM after unregistering the range's pages before that
   * page (the VMAs before the one it could not split: the kernel does not undo them).
   */
  readonly handedBack: [number, number][] = []
  refuseUnregister = false
  unregisterFailsAt: number | undefined
  unregister(fd: number, start: number, length: number): void {
    expect(fd).toBe(UFFD)
    if (this.refuseUnregister) throw new SysError('UFFDIO_UNREGISTER', 12, 'unregistering')
    const first = (start - BASE) / PAGE
    const stop = this.unregisterFailsAt
    for (let p = first; p < first + length / PAGE && (stop === undefined || p < stop); p++) this.unregistered.add(p)
    if (stop !== undefined && stop < first + length / PAGE) throw new SysError('UFFDIO_UNREGISTER', 12, 'unregistering')
    this.handedBack.push([first, first + length / PAGE])
  }

  /** Ranges registered again, in pages; refuseRegister makes the kernel say ENOMEM. */
  readonly registeredAgain: [number, number][] = []
  refuseRegister = false
  register(fd: number, start: number, length: number): void {
    expect(fd).toBe(UFFD)
    if (this.refuseRegister) throw new SysError('UFFDIO_REGISTER', 12, 'registering')
    const first = (start - BASE) / PAGE
    this.registeredAgain.push([first, first + length / PAGE])
    for (let p = first; p < first + length / PAGE; p++) this.unregistered.delete(p)
  }

  /** A balloon's MADV_DONTNEED: the pages are zapped (read as zeros, missing again). */
  zap(first: number, count: number): void {
    for (let p = first; p < first + count; p++) this.present[p] = 0
    this.memory.fill(0, first * PAGE, (first + count) * PAGE)
  }

  private install(fd: number, start: number, length: number, put: (page: number, offset: number) => void): {done: number; error: number} {
    expect(fd).toBe(UFFD)
    this.calls++
    if (this.gone) return {done: 0, error: Errno.ESRCH}
    if (this.eventQueued) return {done: 0, error: Errno.EAGAIN}
    const first = (start - BASE) / PAGE
    // A request must lie inside one registered VMA, checked before anything is installed.
    for (let p = first; p < first + length / PAGE; p++) if (this.unregistered.has(p) || (p > first && this.vmaStarts.has(p))) return {done: 0, error: Errno.ENOENT}
    let done = 0
    for (let p = first; p < first + length / PAGE; p++) {
      if (this.present[p]) return done === 0 ? {done: 0, error: Errno.EEXIST} : {done: done * PAGE, error: Errno.EAGAIN}
      if (this.stopAfterPages !== undefined && done === this.stopAfterPages) {
        this.stopAfterPages = undefined
        return {done: done * PAGE, error: Errno.EAGAIN}
      }
      put(p, done * PAGE)
      this.present[p] = 1
      this.installs[p]++
      done++
    }
    return {done: length, error: 0}
  }
}

/** A payload source over a real reader that can fail a unit (as a corrupt one would) or hold one back. */
class ScriptedSource implements PayloadSource {
  readonly eventFd = -1
  readonly landedFd = -1
  retainReleased = false
  corrupt = new Set<number>()
  notReady = new Set<number>()
  /** Units whose bytes are still in object storage, and the ones fetchNow asked for (at demand, and around them at prefetch). */
  remote = new Set<number>()
  readonly fetched: number[] = []
  readonly fetchedAround: number[] = []
  readonly asked: number[] = []
  readonly released: number[] = []
  constructor(private readonly reader: SnapshotReader) {}
  payload(unit: number): Buffer {
    if (this.corrupt.has(unit)) throw new SnapshotFormatError('CORRUPT', `chunk ${unit}`, 'stored bytes do not match their checksum')
    return this.reader.readPayload(unit)
  }
  private readonly frameScratch = Buffer.alloc(4 << 20)
  framesOf(chunk: number, first: number, end: number): number | 'ready' | 'whole' | undefined {
    if (this.corrupt.has(chunk)) throw new SnapshotFormatError('CORRUPT', `chunk ${chunk}`, 'stored bytes do not match their checksum')
    if (this.remote.has(chunk)) return undefined
    const got = this.reader.readFramesIfLocal(chunk, first, end, this.frameScratch)
    return got === undefined || got === 'whole' ? got : addressOf(got.payload) - got.payloadPage * this.reader.geometry.pageSize
  }
  isReady(unit: number): boolean {
    return !this.notReady.has(unit)
  }
  isLocal(unit: number): boolean {
    return !this.remote.has(unit)
  }
  fetchNow(units: readonly number[], around: readonly number[] = []): void {
    this.fetched.push(...units)
    this.fetchedAround.push(...around)
  }
  isRequested(unit: number): boolean {
    return this.asked.includes(unit)
  }
  needsRequest(): boolean {
    return true
  }
  isClaimedBy(_owner: number, unit: number): boolean {
    return this.asked.includes(unit) && !this.released.includes(unit)
  }
  prefetch(_owner: number, unit: number): 'asked' | 'unneeded' | 'full' {
    this.asked.push(unit)
    return 'asked'
  }
  release(_owner: number, unit: number): void {
    this.released.push(unit)
  }
  releaseOwner(): void {}
  reap(): void {}
  readyAddress(_unit: number): number | undefined {
    return undefined
  }
  adoptStaged(): void {}
}

let dir: string
let image: Buffer
let reader: SnapshotReader

beforeAll(() => {
  dir = tempDir()
  // 2 MiB of mixed pages (data and zeros), 64 KiB chunks: 32 chunks of 16 pages.
  image = makeImage('mixed', 2 << 20, 11)
  fs.writeFileSync(path.join(dir, 'mem.raw'), image)
  const made = uffd(['snapshot', '--mem-file', path.join(dir, 'mem.raw'), '-o', path.join(dir, 'mem.uffd'), '--chunk-size', '64K'])
  expect(made.status, made.stderr).toBe(0)
  reader = SnapshotReader.open(path.join(dir, 'mem.uffd'))
})

afterAll(() => {
  reader?.close()
  fs.rmSync(dir, {recursive: true, force: true})
})

function setup(options: {faultAroundBytes?: number; source?: 'scripted' | 'decoded'} = {}) {
  const pages = reader.geometry.pageCount
  const kernel = new SimulatedKernel(pages)
  const stats = new RunStats()
  const clock = new RunClock()
  const scripted = new ScriptedSource(reader)
  const source = options.source === 'decoded' ? new DecodedUnits(reader, undefined, stats, 1 << 20) : scripted
  const installer = new Installer(kernel, stats, PAGE, reader.zeroMap, 1)
  const server = new FaultServer(reader, source, installer, stats, clock, {faultAroundBytes: options.faultAroundBytes ?? 64 * 1024})
  const regions: GuestRegion[] = [{baseHostVirtAddr: BASE, size: pages * PAGE, offset: 0, pageSize: PAGE}]
  const client = new Client(1, UFFD, regions, reader.geometry)
  return {kernel, stats, clock, scripted, source, installer, server, client, regions}
}

/** The client's memory equals the image wherever the kernel has a page (and is zero elsewhere). */
function expectImageWherePresent(kernel: SimulatedKernel): void {
  for (let p = 0; p < kernel.pages; p++) {
    const want = kernel.present[p] ? image.subarray(p * PAGE, (p + 1) * PAGE) : Buffer.alloc(PAGE)
    if (!kernel.memory.subarray(p * PAGE, (p + 1) * PAGE).equals(want)) throw new Error(`page ${p} holds the wrong bytes`)
  }
}

function firstDataPage(from = 0): number {
  for (let p = from; p < reader.geometry.pageCount; p++) if (!reader.zeroMap.isZero(p)) return p
  throw new Error('no data page')
}

describe('fillErrnoMeaning: one triage of every fill errno', () => {
  it('reads ENOENT as a range not registered whole (the installer decides what that means) and ESRCH as gone', () => {
    expect(fillErrnoMeaning(0)).toBe('installed')
    expect(fillErrnoMeaning(Errno.EEXIST)).toBe('already-present')
    expect(fillErrnoMeaning(Errno.EAGAIN)).toBe('address-space-changing')
    expect(fillErrnoMeaning(Errno.ENOENT)).toBe('not-registered')
    expect(fillErrnoMeaning(Errno.ESRCH)).toBe('gone')
    expect(fillErrnoMeaning(Errno.EINVAL)).toBe('unexpected')
  })
})

describe('Installer against a simulated kernel', () => {
  it('EEXIST in the middle of a run: installs the rest, wakes the present page, copies nothing twice', () => {
    const {kernel, installer, client, regions, stats} = setup()
    const first = firstDataPage()
    // Another thread's fault installed page first+5 behind our back (our states say missing).
    kernel.present[first + 5] = 1
    kernel.installs[first + 5] = 1
    const payload = Buffer.alloc(8 * PAGE)
    for (let k = 0; k < 8; k++) image.copy(payload, k * PAGE, (first + k) * PAGE, (first + k + 1) * PAGE)
    kernel.memory.set(image.subarray((first + 5) * PAGE, (first + 6) * PAGE), (first + 5) * PAGE)
    const result = installer.fill(client, regions[0], first, 8, addressOf(payload))
    expect(result).toEqual({outcome: 'served', pages: 7})
    for (let k = 0; k < 8; k++) expect(client.states.get(first + k)).toBe(PAGE_PRESENT)
    expect(kernel.wakes).toEqual([first + 5])
    expect(Math.max(...kernel.installs)).toBe(1)
    expect(stats.get('eexist')).toBe(1)
    expect(stats.get('pagesCopied')).toBe(7)
    expectImageWherePresent(kernel)
  })

  it('EAGAIN after a partial copy, then a queued event: retry, with what was copied kept', () => {
    const {kernel, installer, client, regions} = setup()
    const first = firstDataPage()
    const payload = Buffer.alloc(8 * PAGE)
    for (let k = 0; k < 8; k++) image.copy(payload, k * PAGE, (first + k) * PAGE, (first + k + 1) * PAGE)
    kernel.stopAfterPages = 3
    // The partial copy stops after 3 pages; the next call finds an event queued.
    const calls = kernel.calls
    const copy = kernel.copy.bind(kernel)
    kernel.copy = (fd, dst, src, length) => {
      const r = copy(fd, dst, src, length)
      if (r.error === Errno.EAGAIN && r.done > 0) kernel.eventQueued = true
      return r
    }
    const result = installer.fill(client, regions[0], first, 8, addressOf(payload))
    expect(kernel.calls - calls).toBe(2)
    expect(result).toEqual({outcome: 'retry', pages: 3})
    for (let k = 0; k < 8; k++) expect(client.states.get(first + k)).toBe(k < 3 ? PAGE_PRESENT : PAGE_MISSING)
    // The events read, the same request again installs only the rest.
    kernel.eventQueued = false
    expect(installer.fill(client, regions[0], first + 3, 5, addressOf(payload) + 3 * PAGE)).toEqual({outcome: 'served', pages: 5})
    expect(Math.max(...kernel.installs)).toBe(1)
    expectImageWherePresent(kernel)
  })

  it('ENOENT on one page: a restored process settles it as unregistered; a VMM\'s memory not registered while it runs cannot be served (ENOENT)', () => {
    for (const nonCooperative of [true, false]) {
      const {kernel, installer, regions, stats} = setup()
      const client = new Client(1, UFFD, regions, reader.geometry, undefined, nonCooperative)
      kernel.unregistered.add(10 + 3)
      if (nonCooperative) {
        const result = installer.fill(client, regions[0], 10, 8, ZEROS)
        expect(result).toEqual({outcome: 'served', pages: 7})
        expect(client.states.get(13)).toBe(PAGE_REMOVED)
        expect(kernel.wakes).toEqual([13])
        for (const p of [10, 12, 14, 17]) expect(kernel.present[p]).toBe(1)
        // Pieces halved around the page and grown back after it: 8, 4, 2, 4, 2, 1, 2, 1 (page
        // 13, refused), then 1, 2, 1 pages.
        expect(stats.get('zeropageIoctls')).toBe(11)
      } else {
        // The pages before it are in; at the page that is not registered serving it has failed
        // (an exited process gives ESRCH, below): not taken for gone, and left 'running'.
        expect(() => installer.fill(client, regions[0], 10, 8, ZEROS)).toThrow(expect.objectContaining({code: 'ENOENT', message: expect.stringMatching(/UFFDIO_ZEROPAGE failed while installing client 1's memory at 0x[0-9a-f]+ \(ENOENT: not registered with the uffd it sent/)}))
        for (const p of [10, 11, 12]) expect(client.states.get(p)).toBe(PAGE_PRESENT)
        expect(client.states.get(13)).toBe(PAGE_MISSING)
      }
    }
  })

  it('ESRCH: gone, nothing marked', () => {
    const {kernel, installer, client, regions} = setup()
    kernel.gone = true
    expect(installer.fill(client, regions[0], 0, 4, ZEROS)).toEqual({outcome: 'gone', pages: 0})
    expect(client.states.presentCount).toBe(0)
  })
})

describe('FaultServer with a scripted payload source', () => {
  it('serves a data fault with its window and returns the window instead of keeping it', () => {
    const {kernel, server, client, stats} = setup({faultAroundBytes: 64 * 1024})
    const page = firstDataPage(40)
    const served = server.serve(client, {address: BASE + page * PAGE + 123, readAt: performance.now()})
    const first = page - (page % 16)
    expect(served).toEqual({outcome: 'served', window: {page, first, end: first + 16}})
    expect(stats.get('faultAroundPages')).toBe(15)
    for (let p = first; p < first + 16; p++) expect(client.states.get(p)).toBe(PAGE_PRESENT)
    expectImageWherePresent(kernel)
  })

  it('a fault whose bytes are still in object storage waits (asked at demand priority) and installs nothing until they land', () => {
    const {kernel, server, client, scripted} = setup({faultAroundBytes: 64 * 1024})
    const page = firstDataPage(40)
    const chunk = Math.floor(page / 16)
    scripted.remote.add(chunk)
    const fault = {address: BASE + page * PAGE, readAt: performance.now()}
    expect(server.serve(client, fault)).toEqual({outcome: 'wait', window: undefined})
    expect(scripted.fetched).toEqual([chunk])
    scripted.fetched.length = 0
    expect(kernel.present.some((x) => x)).toBe(false)
    scripted.remote.delete(chunk)
    expect(server.serve(client, fault).outcome).toBe('served')
    expect(client.states.get(page)).toBe(PAGE_PRESENT)
    expectImageWherePresent(kernel)
  })

  it('a fault whose chunk is still in object storage asks for its own at demand, the rest of its widest window around it at prefetch', () => {
    // A 256 KiB window: four 64 KiB chunks, asked in one go (one round trip to the store), but
    // only the fault's own chunk is demand: the neighbours must not go ahead of a later fault.
    const {server, client, scripted} = setup({faultAroundBytes: 256 * 1024})
    const page = firstDataPage(100)
    const chunk = Math.floor(page / 16)
    scripted.remote.add(chunk)
    expect(server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()}).outcome).toBe('wait')
    const first = Math.floor(page / 64) * 4
    expect(scripted.fetched).toEqual([chunk])
    expect([...scripted.fetchedAround].sort((a, b) => a - b)).toEqual([first, first + 1, first + 2, first + 3].filter((c) => c !== chunk))
  })

  it('fault-around never waits on the network: chunks not here yet are left missing', () => {
    // A 128 KiB window spans two 64 KiB chunks; the second is still remote.
    const {kernel, server, client, scripted} = setup({faultAroundBytes: 128 * 1024})
    const page = firstDataPage(64)
    const windowFirst = page - (page % 32)
    const other = Math.floor(windowFirst / 16) + (Math.floor(page / 16) === Math.floor(windowFirst / 16) ? 1 : 0)
    scripted.remote.add(other)
    expect(server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()}).outcome).toBe('served')
    for (let p = other * 16; p < other * 16 + 16; p++) if (!reader.zeroMap.isZero(p)) expect(client.states.get(p)).toBe(PAGE_MISSING)
    expect(scripted.fetched).toEqual([])
    expectImageWherePresent(kernel)
  })

  it('a unit that fails its check is fatal for the client and installs nothing of it', () => {
    const {kernel, server, client, scripted} = setup({faultAroundBytes: 64 * 1024})
    const page = firstDataPage(64)
    const chunk = Math.floor(page / 16)
    scripted.corrupt.add(chunk)
    let caught: unknown
    try {
      server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()})
    } catch (error) {
      caught = error
    }
    expect(caught).toBeInstanceOf(UffdError)
    expect((caught as UffdError).code).toBe('CORRUPT')
    expect(kernel.present[page]).toBe(0)
    expect(kernel.installs.slice(chunk * 16, chunk * 16 + 16).every((n, k) => n === 0 || reader.zeroMap.isZero(chunk * 16 + k))).toBe(true)
  })

  it('a fault on removed memory gets zeros, not snapshot data', () => {
    const {kernel, server, client} = setup()
    const page = firstDataPage(100)
    client.states.markRemoved(page, 1)
    expect(server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()}).outcome).toBe('served')
    expect(client.states.get(page)).toBe(PAGE_PRESENT)
    expect(kernel.memory.subarray(page * PAGE, (page + 1) * PAGE).equals(Buffer.alloc(PAGE))).toBe(true)
  })

  it('a fault outside every region is refused with its code', () => {
    const {server, client} = setup()
    expect(() => server.serve(client, {address: BASE - PAGE, readAt: 0})).toThrow(expect.objectContaining({code: 'FAULT_OUTSIDE_REGIONS'}))
  })
})

describe('FaultServer over framed chunks (adaptive window)', () => {
  it('serves isolated faults from their frames, and a grown window clipped by a small region across a chunk boundary from each chunk\'s own bytes', () => {
    // 256 KiB chunks of 64 KiB frames; regions of 60, 10 and the rest of the pages: the middle one
    // straddles the boundary between chunks 0 and 1 (page 64).
    const sub = tempDir()
    const bytes = makeImage('compressible', 1 << 20, 5)
    fs.writeFileSync(path.join(sub, 'mem.raw'), bytes)
    const made = uffd(['snapshot', '--mem-file', path.join(sub, 'mem.raw'), '-o', path.join(sub, 'mem.uffd'), '--chunk-size', '256K'])
    expect(made.status, made.stderr).toBe(0)
    const framed = SnapshotReader.open(path.join(sub, 'mem.uffd'))
    try {
      expect(framed.framePages).toBe(16)
      const pages = framed.geometry.pageCount
      const kernel = new SimulatedKernel(pages)
      const stats = new RunStats()
      const source = new DecodedUnits(framed, undefined, stats, 1 << 20)
      const installer = new Installer(kernel, stats, PAGE, framed.zeroMap, 1)
      const server = new FaultServer(framed, source, installer, stats, new RunClock(), {faultAroundBytes: 2 << 20, faultAroundMinBytes: 64 * 1024})
      const regions: GuestRegion[] = [
        {baseHostVirtAddr: BASE, size: 60 * PAGE, offset: 0, pageSize: PAGE},
        {baseHostVirtAddr: BASE + 60 * PAGE, size: 10 * PAGE, offset: 60 * PAGE, pageSize: PAGE},
        {baseHostVirtAddr: BASE + 70 * PAGE, size: (pages - 70) * PAGE, offset: 70 * PAGE, pageSize: PAGE},
      ]
      const client = new Client(1, UFFD, regions, framed.geometry)
      // 100: an isolated fault, its frame alone; 80, 115: nearby, the window grows past a chunk;
      // 60: the grown window clipped to [60, 70), pages of chunks 0 and 1.
      for (const page of [100, 80, 115, 60]) expect(server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()} as never).outcome).toBe('served')
      expect(stats.get('framesDecoded')).toBeGreaterThan(0)
      for (let p = 0; p < pages; p++) {
        if (kernel.present[p] && !kernel.memory.subarray(p * PAGE, (p + 1) * PAGE).equals(bytes.subarray(p * PAGE, (p + 1) * PAGE))) throw new Error(`page ${p} holds the wrong bytes`)
      }
      expect(kernel.present.subarray(60, 70).every((x) => x === 1)).toBe(true)
    } finally {
      framed.close()
      fs.rmSync(sub, {recursive: true, force: true})
    }
  })
})

describe('Prefetcher: population, readiness and REMOVE', () => {
  it('waits for a unit that is not ready, and never refills memory removed while it populates', () => {
    const {kernel, server, installer, source, scripted, client, stats, clock} = setup()
    const prefetcher = new Prefetcher(server, installer, source, reader, stats, clock, {readaheadBytes: 0, populateAll: true, decodeAhead: 4})
    scripted.notReady.add(0)
    prefetcher.addClient(client)
    // Chunk 0 is not ready: the step installs nothing of it and says what it waits for.
    const steps: string[] = []
    for (let i = 0; i < 5; i++) steps.push(prefetcher.step().result)
    expect(steps.every((s) => s === 'waiting')).toBe(true)
    expect(kernel.calls).toBe(0)
    scripted.notReady.clear()
    for (let i = 0; i < 10; i++) expect(prefetcher.step().result).toBe('busy')
    // A balloon removes a range the population has not reached yet, and one it has filled. The
    // kernel zaps them; while the REMOVE is unread it fails copies with EAGAIN.
    kernel.eventQueued = true
    const step = prefetcher.step()
    expect(step).toMatchObject({result: 'outcome', outcome: 'retry'})
    const loop = new FaultLoop(
      {config: {keepWorkingSet: false, countHits: false, spinMicros: 0}, images: [{reader, source: new DecodedUnits(reader, undefined, stats, 1 << 20), server, prefetcher, workingSetUnits: [], stagedSlots: 0}], stats, clock, pool: undefined, decodersAtOnce: false, recorder: undefined},
      {controlFd: -1, receive: () => undefined, post: () => {}},
    )
    // Part of a chunk population has not reached (the rest of it must still be filled), and a
    // stretch across two chunks it has filled.
    const removed = [
      [20 * 16 + 3, 5],
      [2 * 16 + 10, 12],
    ]
    for (const [first, count] of removed) {
      kernel.zap(first, count)
      loop.applyMessage(client, {kind: 'remove', start: BASE + first * PAGE, end: BASE + (first + count) * PAGE}, performance.now())
    }
    kernel.eventQueued = false
    for (let i = 0; i < 100 && prefetcher.step().result === 'busy'; i++);
    const completed = prefetcher.completedClients()
    expect(completed.map((c) => c.id)).toEqual([1])
    for (const [first, count] of removed) {
      for (let p = first; p < first + count; p++) {
        expect(client.states.get(p)).toBe(PAGE_REMOVED)
        expect(kernel.present[p]).toBe(0)
      }
    }
    expect(Math.max(...kernel.installs)).toBe(1)
    expect(stats.get('removedPages')).toBe(17)
    for (const p of [20 * 16, 20 * 16 + 2, 20 * 16 + 8, 20 * 16 + 15]) expect(kernel.present[p]).toBe(1)
    expectImageWherePresent(kernel)
  })

  it('counts the pages each step installed from what the installer returned', () => {
    const {server, installer, client, stats, clock} = setup({source: 'decoded'})
    const source = new DecodedUnits(reader, undefined, stats, 1 << 20)
    const prefetcher = new Prefetcher(server, installer, source, reader, stats, clock, {readaheadBytes: 0, populateAll: true, decodeAhead: 4})
    prefetcher.addClient(client)
    while (prefetcher.step().result === 'busy');
    expect(client.isComplete).toBe(true)
    expect(stats.get('prefetchedPages')).toBe(reader.geometry.pageCount)
    expect(stats.get('pagesCopied') + stats.get('pagesZeroed')).toBe(reader.geometry.pageCount)
  })
})


describe('DecodedUnits: cache, decoder slots and owners behind one source', () => {
  it('decodes ahead for owners, frees a slot when the last owner releases it, keeps it in the cache when asked to', async () => {
    const {DecodePool} = await import('../src/resume/fault-loop/decode-pool.js')
    const stats = new RunStats()
    const pool = new DecodePool({kind: 'file', path: path.join(dir, 'mem.uffd')}, 1, 2, reader.geometry.chunkSize)
    try {
      expect(pool.waitUntilStarted(10_000)).toBe(true)
      const source = new DecodedUnits(reader, pool, stats, 1 << 20)
      const data = [...Array(reader.index.length).keys()].filter((c) => reader.entry(c).codec !== Codec.None)
      const [a, b, c] = data
      expect(source.prefetch(1, a)).toBe('asked')
      expect(source.prefetch(2, a)).toBe('asked')
      expect(source.prefetch(1, b)).toBe('asked')
      // Two slots: a third unit waits for room.
      expect(source.prefetch(1, c)).toBe('full')
      for (const unit of [a, b]) {
        const deadline = Date.now() + 10_000
        while (!source.isReady(unit) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2))
        expect(source.isReady(unit)).toBe(true)
        expect(source.readyAddress(unit)).toBeGreaterThan(0)
      }
      expect(source.payload(a)!.equals(reader.readPayload(a))).toBe(true)
      // Owner 1 lets go of a: owner 2 still holds it.
      source.release(1, a)
      expect(source.isRequested(a)).toBe(true)
      source.retainReleased = true
      source.release(2, a)
      expect(source.isRequested(a)).toBe(false)
      // Kept in the cache: ready without a slot, and a fault finds it there.
      expect(source.isReady(a)).toBe(true)
      expect(source.prefetch(3, a)).toBe('unneeded')
      const hits = stats.get('cacheHits')
      expect(source.payload(a)!.equals(reader.readPayload(a))).toBe(true)
      expect(stats.get('cacheHits')).toBe(hits + 1)
      // An owner that ends releases everything it held: room again.
      source.releaseOwner(1)
      expect(source.isRequested(b)).toBe(false)
      expect(source.prefetch(1, c)).toBe('asked')
      expect(stats.get('chunksDecoded')).toBe(2)
    } finally {
      await pool.close()
    }
  })

  it('a corrupt unit in a decoder slot is decoded again by the caller, which raises its error', async () => {
    const {DecodePool} = await import('../src/resume/fault-loop/decode-pool.js')
    const corrupt = path.join(dir, 'corrupt.uffd')
    const bytes = fs.readFileSync(path.join(dir, 'mem.uffd'))
    const unit = [...Array(reader.index.length).keys()].find((c) => reader.entry(c).codec !== Codec.None)!
    const entry = reader.entry(unit)
    bytes[entry.dataOffset + Math.floor(entry.storedLength / 2)] ^= 0xff
    fs.writeFileSync(corrupt, bytes)
    const corruptReader = SnapshotReader.open(corrupt)
    const pool = new DecodePool({kind: 'file', path: corrupt}, 1, 2, reader.geometry.chunkSize)
    try {
      expect(pool.waitUntilStarted(10_000)).toBe(true)
      const source = new DecodedUnits(corruptReader, pool, new RunStats(), 1 << 20)
      expect(source.prefetch(1, unit)).toBe('asked')
      const deadline = Date.now() + 10_000
      while (!source.isReady(unit) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2))
      expect(source.readyAddress(unit)).toBeUndefined()
      expect(() => source.payload(unit)).toThrow(expect.objectContaining({code: 'CORRUPT'}))
    } finally {
      await pool.close()
      corruptReader.close()
    }
  })
})

/**
 * An install helper thread as native/libuffd_fill runs one, played synchronously: run() installs
 * its jobs' missing pages into the simulated kernel (moving page states missing -> present, as
 * the native thread does by compare-and-swap) and can stop on an errno after some pages.
 */
class PlayedHelper {
  finished = false
  error = 0
  stopped = false
  gateHeld = 0
  private readonly jobDone: boolean[]
  private totals = {pagesCopied: 0, pagesZeroed: 0, copyIoctls: 0, zeropageIoctls: 0, eexist: 0, newlyPresent: 0}
  private taken = {...this.totals}

  constructor(
    private readonly kernel: SimulatedKernel,
    private readonly states: Uint8Array,
    private readonly jobs: readonly {runs: Int32Array; payload: number}[],
  ) {
    this.jobDone = jobs.map(() => false)
  }

  run(options: {failAfterPages?: number} = {}): void {
    let installed = 0
    for (const [k, job] of this.jobs.entries()) {
      for (let i = 0; i < job.runs.length; i += 3) {
        for (let p = job.runs[i]; p < job.runs[i] + job.runs[i + 1]; p++) {
          if (this.states[p] !== PAGE_MISSING) continue
          if (options.failAfterPages !== undefined && installed === options.failAfterPages) {
            this.error = Errno.EINVAL
            this.finished = true
            return
          }
          const zero = job.runs[i + 2] < 0
          const r = zero ? this.kernel.zeropage(UFFD, BASE + p * PAGE, PAGE) : this.kernel.copy(UFFD, BASE + p * PAGE, job.payload + (job.runs[i + 2] + p - job.runs[i]) * PAGE, PAGE)
          expect(r.error).toBe(0)
          this.states[p] = PAGE_PRESENT
          this.totals[zero ? 'pagesZeroed' : 'pagesCopied']++
          this.totals[zero ? 'zeropageIoctls' : 'copyIoctls']++
          this.totals.newlyPresent++
          installed++
        }
      }
      this.jobDone[k] = true
    }
    this.finished = true
  }

  done(k: number): boolean {
    return this.jobDone[k]
  }

  takeProgress() {
    const d = Object.fromEntries(Object.entries(this.totals).map(([key, v]) => [key, v - this.taken[key as keyof typeof this.taken]])) as typeof this.totals
    this.taken = {...this.totals}
    return {error: this.error, stopPage: 0, ...d}
  }

  holdGate(): void {
    this.gateHeld++
  }

  releaseGate(): void {}

  stop(): number {
    this.stopped = true
    return this.error
  }
}

describe('a packed working set: blocks, the install helper and its share', () => {
  let packedReader: SnapshotReader
  beforeAll(() => {
    // Every third page of the image, in reverse order: a set scattered over many chunks.
    const pages = [...Array(reader.geometry.pageCount).keys()].filter((p) => p % 3 === 0).reverse()
    const set = {kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: reader.geometry.logicalSize, pageSize: PAGE, headerCrc: reader.header.headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}
    fs.writeFileSync(path.join(dir, 'set.ws'), JSON.stringify(set))
    const attached = uffd(['working-set', 'attach', path.join(dir, 'mem.uffd'), path.join(dir, 'set.ws'), '-o', path.join(dir, 'packed.uffd')])
    expect(attached.status, attached.stderr).toBe(0)
    packedReader = SnapshotReader.open(path.join(dir, 'packed.uffd'))
    expect(packedReader.packed!.blocks.length).toBeGreaterThanOrEqual(4)
  })
  afterAll(() => packedReader?.close())

  /** Parts over the packed snapshot, with a source that has every unit decoded (as staged ones are). */
  function packedSetup(helper: 'played' | 'none', fillBlock?: FillCalls['fillBlock']) {
    const r = packedReader
    const kernel = new SimulatedKernel(r.geometry.pageCount)
    const stats = new RunStats()
    const clock = new RunClock()
    // (The loop starts the clock when the first client arrives; times before that read 0.)
    clock.start()
    const payloads = new Map<number, Buffer>()
    const source = new ScriptedSource(r)
    Object.assign(source, {eventFd: 1000})
    source.readyAddress = (unit: number) => addressOf(payloads.get(unit) ?? payloads.set(unit, Buffer.from(r.readPayload(unit))).get(unit)!)
    let played: PlayedHelper | undefined
    const calls: FillCalls = {
      copy: (...a) => kernel.copy(...a),
      zeropage: (...a) => kernel.zeropage(...a),
      wake: (...a) => kernel.wake(...a),
      fillBlock,
      startHelper:
        helper === 'played'
          ? (_fd, states, _zeroMap, _pageSize, _regions, jobs) => {
              played = new PlayedHelper(kernel, states, jobs)
              return played
            }
          : undefined,
    }
    const installer = new Installer(calls, stats, PAGE, r.zeroMap, 1)
    const server = new FaultServer(r, source, installer, stats, clock, {faultAroundBytes: 64 * 1024, packedWorkingSet: true})
    const prefetcher = new Prefetcher(server, installer, source, r, stats, clock, {readaheadBytes: 0, populateAll: false, decodeAhead: 4, installHelper: true})
    const client = new Client(1, UFFD, [{baseHostVirtAddr: BASE, size: r.geometry.pageCount * PAGE, offset: 0, pageSize: PAGE}], r.geometry)
    const units = r.packed!.blocks.map((_, b) => r.index.length + b)
    return {kernel, stats, source, server, prefetcher, client, units, played: () => played}
  }

  function expectPackedImage(kernel: SimulatedKernel): void {
    for (let p = 0; p < kernel.pages; p++) {
      const want = kernel.present[p] ? image.subarray(p * PAGE, (p + 1) * PAGE) : Buffer.alloc(PAGE)
      if (!kernel.memory.subarray(p * PAGE, (p + 1) * PAGE).equals(want)) throw new Error(`page ${p} holds the wrong bytes`)
    }
  }

  it('a fault on a set page installs its block, faulting page first, and returns a one-page window', () => {
    const {kernel, server, client} = packedSetup('none')
    const page = [...Array(kernel.pages).keys()].find((p) => p % 3 === 0 && !packedReader.zeroMap.isZero(p) && p > 100)!
    const order: number[] = []
    const copy = kernel.copy.bind(kernel)
    kernel.copy = (fd, dst, src, length) => {
      order.push((dst - BASE) / PAGE)
      return copy(fd, dst, src, length)
    }
    expect(server.serve(client, {address: BASE + page * PAGE, readAt: performance.now()})).toEqual({outcome: 'served', window: {page, first: page, end: page + 1}})
    expect(order[0]).toBe(page)
    expect(order.length).toBeGreaterThan(1)
    expectPackedImage(kernel)
  })

  it('a native block fill that meets ENOENT (a VMA boundary) is retried through fill(), not taken for a gone VMM; native fills stay off for the client', () => {
    // The native fill gives up on a range over a VMA boundary as a whole, installing nothing.
    let nativeCalls = 0
    const refusing: FillCalls['fillBlock'] = () => {
      nativeCalls++
      return {error: Errno.ENOENT, stopPage: 0, pagesCopied: 0, pagesZeroed: 0, copyIoctls: 1, zeropageIoctls: 0, eexist: 0, newlyPresent: 0}
    }
    const {kernel, server, client} = packedSetup('none', refusing)
    const page = [...Array(kernel.pages).keys()].find((p) => p % 3 === 0 && !packedReader.zeroMap.isZero(p) && p > 100)!
    // The client's mapping has a VMA boundary right after the faulting page.
    kernel.vmaStarts.add(page + 1)
    const fault = {address: BASE + page * PAGE, readAt: performance.now()}
    expect(server.serve(client, fault).outcome).toBe('retry')
    expect(client.nativeFillsOff).toBe(true)
    expect(server.serve(client, fault)).toEqual({outcome: 'served', window: {page, first: page, end: page + 1}})
    expect(nativeCalls).toBe(1)
    expect(kernel.present[page]).toBe(1)
    expect(Math.max(...kernel.installs)).toBe(1)
    expectPackedImage(kernel)
  })

  it('the helper takes the later 70% of the set, the loop the first 30%; both are counted and the set completes', () => {
    const {kernel, stats, prefetcher, client, units, played, source} = packedSetup('played')
    prefetcher.addClient(client, units)
    const helper = played()!
    expect(helper).toBeDefined()
    expect(client.states.shared).toBe(true)
    for (let i = 0; i < 200 && prefetcher.step().result === 'busy'; i++);
    // The loop's share is in; the set is not complete while the helper runs.
    expect(stats.get('workingSetDoneMs')).toBe(0)
    helper.run()
    for (let i = 0; i < 10; i++) prefetcher.step()
    expect(helper.stopped).toBe(true)
    expect(client.states.shared).toBe(false)
    expect(stats.get('workingSetDoneMs')).toBeGreaterThan(0)
    const setPages = packedReader.packed!.pages.length
    expect(stats.get('helperPages')).toBeGreaterThan(setPages / 2)
    expect(stats.get('prefetchedPages')).toBe(stats.get('pagesCopied') + stats.get('pagesZeroed'))
    for (const p of packedReader.packed!.pages) expect(kernel.present[p]).toBe(1)
    expect(Math.max(...kernel.installs)).toBe(1)
    // Every unit the helper was given is released once it finished.
    for (const unit of units.slice(Math.ceil(units.length * 0.3))) expect(source.released).toContain(unit)
    expectPackedImage(kernel)
  })

  it('a helper that stops on an unexpected errno fails the client, its pages counted, the set not recorded complete', () => {
    const {stats, prefetcher, client, units, played} = packedSetup('played')
    prefetcher.addClient(client, units)
    const helper = played()!
    helper.run({failAfterPages: 5})
    let step = prefetcher.step()
    for (let i = 0; i < 200 && step.result === 'busy'; i++) step = prefetcher.step()
    expect(step.result).toBe('failed')
    expect(step.result === 'failed' && (step.error as Error & {code: string}).code).toBe('EINVAL')
    expect(stats.get('helperPages')).toBe(5)
    prefetcher.removeClient(client)
    expect(helper.stopped).toBe(true)
    expect(stats.get('workingSetDoneMs')).toBe(0)
  })
})

describe('zero ranges handed to the kernel', () => {
  // 8 MiB: data, 4 MiB of zeros at [2, 6) MiB (handed over), data, 1 MiB of zeros (too short).
  let holes: SnapshotReader
  beforeAll(() => {
    const raw = makeImage('mixed', 8 << 20, 12)
    raw.fill(0, 2 << 20, 6 << 20)
    raw.fill(0, 7 << 20, 8 << 20)
    fs.writeFileSync(path.join(dir, 'holes.raw'), raw)
    expect(uffd(['snapshot', '--mem-file', path.join(dir, 'holes.raw'), '-o', path.join(dir, 'holes.uffd'), '--chunk-size', '64K']).status).toBe(0)
    holes = SnapshotReader.open(path.join(dir, 'holes.uffd'))
  })
  afterAll(() => holes.close())

  function parts(faultAroundBytes = 64 * 1024) {
    const pages = holes.geometry.pageCount
    const kernel = new SimulatedKernel(pages)
    const stats = new RunStats()
    const installer = new Installer(kernel, stats, PAGE, holes.zeroMap, 1)
    const server = new FaultServer(holes, new DecodedUnits(holes, undefined, stats, 1 << 20), installer, stats, new RunClock(), {faultAroundBytes})
    const client = new Client(1, UFFD, [{baseHostVirtAddr: BASE, size: pages * PAGE, offset: 0, pageSize: PAGE}], holes.geometry)
    return {kernel, stats, server, client}
  }

  it('unregisters the long runs, marks them present, and leaves the short ones to faults', () => {
    const {kernel, stats, server, client} = parts()
    expect(server.handZerosToKernel(client)).toBe(1024)
    expect(kernel.handedBack).toEqual([[512, 1536]])
    for (const p of [512, 1000, 1535]) expect(client.states.get(p)).toBe(PAGE_PRESENT)
    for (const p of [511, 1536, 1800, 2047]) expect(client.states.get(p)).toBe(PAGE_MISSING)
    expect(stats.get('kernelZeroPages')).toBe(1024)
    expect(stats.get('kernelZeroRanges')).toBe(1)
    // Nothing installs there afterwards: a fault read before the hand-over only wakes its thread.
    expect(server.serve(client, {address: BASE + 700 * PAGE, readAt: performance.now()}).outcome).toBe('served')
    expect(kernel.installs[700]).toBe(0)
    expect(kernel.wakes).toContain(700)
  })

  it('keeps a run with a page already present, and one the kernel refuses, served by faults', () => {
    const first = parts()
    first.client.states.markPresent(900, 1)
    expect(first.server.handZerosToKernel(first.client)).toBe(0)
    expect(first.kernel.handedBack).toEqual([])
    const refused = parts()
    refused.kernel.refuseUnregister = true
    expect(refused.server.handZerosToKernel(refused.client)).toBe(0)
    expect(refused.client.states.get(1000)).toBe(PAGE_MISSING)
    expect(refused.stats.get('kernelZeroPages')).toBe(0)
  })

  it('a range over two VMAs is handed over whole; a fill over a VMA boundary goes in pieces, the VMM not taken for gone', () => {
    const {kernel, server, client} = parts()
    // The client's region is two mappings, the second from page 1000: inside the zero run.
    kernel.vmaStarts.add(1000)
    expect(server.handZerosToKernel(client)).toBe(1024)
    expect(kernel.handedBack).toEqual([[512, 1536]])
    // Without the hand-over, the zero window of a fault next to the boundary ([992, 1008)) is
    // filled in two pieces, each inside one VMA.
    const other = parts()
    other.kernel.vmaStarts.add(1000)
    const served = other.server.serve(other.client, {address: BASE + 995 * PAGE, readAt: performance.now()})
    expect(served.outcome).toBe('served')
    for (let p = 992; p < 1008; p++) expect(other.client.states.get(p)).toBe(PAGE_PRESENT)
    expect(Math.max(...other.kernel.installs)).toBe(1)
    expect(other.stats.get('zeropageIoctls')).toBe(3)
  })

  it('an UNREGISTER that fails midway (ENOMEM splitting the second VMA) is undone: the range is registered again and served by faults', () => {
    const {kernel, stats, server, client} = parts()
    // The kernel cleared the first VMA's part of the range ([2, 4) MiB), then could not split the second.
    kernel.unregisterFailsAt = 1024
    expect(server.handZerosToKernel(client)).toBe(0)
    expect(kernel.registeredAgain).toEqual([[512, 1536]])
    expect(kernel.unregistered.size).toBe(0)
    expect(stats.get('kernelZeroPages')).toBe(0)
    for (const p of [512, 900, 1200]) expect(client.states.get(p)).toBe(PAGE_MISSING)
    expect(server.serve(client, {address: BASE + 900 * PAGE, readAt: performance.now()}).outcome).toBe('served')
    expect(client.states.get(900)).toBe(PAGE_PRESENT)
    expect(kernel.present[900]).toBe(1)
  })

  it('when registering again fails too, pages the kernel kept are left to it (zeros), not taken for a gone client', () => {
    const {kernel, server, client} = parts(2 * 1024 * 1024)
    // The kernel took [512, 900) (the first VMA's part), then failed.
    kernel.unregisterFailsAt = 900
    kernel.refuseRegister = true
    expect(server.handZerosToKernel(client)).toBe(0)
    expect(client.kernelZerosUnsure).toEqual([{first: 512, end: 1536}])
    // A fault in the part still registered: its 2 MiB zero window [512, 1024) reaches into the
    // part the kernel took, whose pages are settled as the kernel's.
    expect(server.serve(client, {address: BASE + 950 * PAGE, readAt: performance.now()}).outcome).toBe('served')
    for (let p = 900; p < 1024; p++) expect(kernel.present[p]).toBe(1)
    for (let p = 512; p < 900; p++) {
      expect(client.states.get(p)).toBe(PAGE_PRESENT)
      expect(kernel.present[p]).toBe(0)
    }
    // Outside that range an unregistered page still means the VMM's memory cannot be served.
    kernel.unregistered.add(1800)
    expect(() => server.serve(client, {address: BASE + 1800 * PAGE, readAt: performance.now()})).toThrow(expect.objectContaining({code: 'ENOENT'}))
  })
})
