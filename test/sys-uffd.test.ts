// src/sys/uffd.ts against a real userfaultfd: faults are raised by worker threads of this process
// (a uffd serves its whole mm, so a Worker touching registered memory faults into our uffd while
// the test's thread, or another Worker, handles it). No C client involved.

import {readFileSync} from 'node:fs'
import {createRequire} from 'node:module'
import {performance} from 'node:perf_hooks'
import {Worker} from 'node:worker_threads'

import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import * as libc from '../src/sys/libc.js'
import {
  Errno,
  HUGE_PAGE_SIZE,
  PAGE_SIZE,
  POLLIN,
  SysError,
  UFFD_EVENT,
  UFFD_FEATURE,
  UFFD_MSG_SIZE,
  UFFD_PAGEFAULT_FLAG,
  UFFDIO_BIT,
  UFFDIO_REGISTER_MODE,
  addressOf,
  bufferAt,
  closeFd,
  createEventfd,
  createUserfaultfd,
  decodeCopyResult,
  decodeUffdMessage,
  eventfdSignal,
  hasIoctl,
  mmapAnonymous,
  munmap,
  poll,
  readUffdMessages,
  uffdApi,
  uffdCopy,
  fillRegions,
  nativeBlockFill,
  uffdFillBlock,
  InstallHelper,
  uffdRegister,
  uffdUnregister,
  uffdWake,
  uffdZeropage,
} from '../src/sys/index.js'
import {UFFDIO_COPY, UFFDIO_COPY_LAYOUT} from '../src/sys/uffd.js'
import {RawStruct} from '../src/sys/raw.js'
import {reserveHugePages} from './helpers/hugepages.js'
import {uffdUnavailableReason} from './helpers/uffd.js'

// --- can this machine run the real-uffd tests? --------------------------------------------------
const skipReason = uffdUnavailableReason()
if (skipReason !== undefined) console.log(`[sys-uffd] skipping real-uffd tests: ${skipReason}`)


// --- worker threads that load src/sys themselves ------------------------------------------------
const require = createRequire(import.meta.url)

// Plain CommonJS run with `eval`; it loads src/sys through tsx, exactly as the fault loop's
// worker will load the compiled module.
const workerSource = `
const {parentPort, workerData} = require('node:worker_threads')
const {tsImport} = require(workerData.tsxApi)
async function main() {
  const sys = await tsImport(workerData.sysUrl, workerData.parentUrl)
  const job = workerData.job
  if (job.kind === 'touch') {
    parentPort.postMessage({ready: true})
    const view = sys.bufferAt(job.address, job.length)
    if (job.write !== undefined) view[job.write.offset] = job.write.value
    parentPort.postMessage({bytes: Buffer.from(view)})
  } else if (job.kind === 'madvise') {
    parentPort.postMessage({ready: true})
    sys.madvise(job.address, job.length, sys.MADV.DONTNEED)
    parentPort.postMessage({done: true})
  } else if (job.kind === 'pin') {
    const allowed = () => require('node:fs').readFileSync('/proc/thread-self/status', 'utf8').split('\\n').find((l) => l.startsWith('Cpus_allowed_list:')).split(':')[1].trim()
    const before = allowed()
    const cpu = sys.pinThreadToCurrentCpu()
    parentPort.postMessage({pinned: {cpu, before, after: allowed()}})
  } else if (job.kind === 'handler') {
    // The fault loop in miniature: poll the uffd and a stop eventfd, serve each fault with
    // a page whose bytes are its page number + 1.
    const set = new sys.PollSet([{fd: job.uffd, events: sys.POLLIN}, {fd: job.stopFd, events: sys.POLLIN}])
    const messages = Buffer.alloc(16 * sys.UFFD_MSG_SIZE)
    const page = Buffer.alloc(sys.PAGE_SIZE)
    const faults = []
    parentPort.postMessage({ready: true})
    for (;;) {
      set.wait(job.timeoutMs)
      if (set.revents(1) !== 0) {
        sys.eventfdDrain(job.stopFd)
        break
      }
      if (set.revents(0) === 0) continue
      const count = sys.readUffdMessages(job.uffd, messages)
      for (let i = 0; i < count; i++) {
        const m = sys.decodeUffdMessage(messages, i)
        if (m.kind !== 'pagefault') throw new Error('unexpected event ' + m.kind)
        const index = (m.address - job.base) / sys.PAGE_SIZE
        page.fill(index + 1)
        const r = sys.uffdCopy(job.uffd, m.address, sys.addressOf(page), sys.PAGE_SIZE)
        if (r.error !== 0 && r.error !== sys.Errno.EEXIST) throw new Error('copy failed with errno ' + r.error)
        faults.push(index)
      }
    }
    parentPort.postMessage({faults})
  }
}
main().catch((error) => parentPort.postMessage({error: String(error && error.stack || error)}))
`

type Job =
  | {kind: 'touch'; address: number; length: number; write?: {offset: number; value: number}}
  | {kind: 'madvise'; address: number; length: number}
  | {kind: 'pin'}
  | {kind: 'handler'; uffd: number; stopFd: number; base: number; timeoutMs: number}

interface WorkerMessage {
  ready?: true
  done?: true
  bytes?: Uint8Array
  faults?: number[]
  pinned?: {cpu: number; before: string; after: string}
  error?: string
}

class TestWorker {
  private readonly worker: Worker
  private readonly queue: WorkerMessage[] = []
  private readonly waiters: Array<(m: WorkerMessage) => void> = []
  private failure: Error | undefined

  constructor(job: Job) {
    this.worker = new Worker(workerSource, {
      eval: true,
      workerData: {
        job,
        tsxApi: require.resolve('tsx/esm/api'),
        sysUrl: new URL('../src/sys/index.ts', import.meta.url).href,
        parentUrl: import.meta.url,
      },
    })
    const deliver = (m: WorkerMessage): void => {
      const waiter = this.waiters.shift()
      if (waiter) waiter(m)
      else this.queue.push(m)
    }
    this.worker.on('message', deliver)
    this.worker.on('error', (error) => {
      this.failure = error
      deliver({error: String(error)})
    })
  }

  /** The worker's next message; rejects on a worker error or after `timeoutMs`. */
  async next(timeoutMs = 10_000): Promise<WorkerMessage> {
    if (this.failure) throw this.failure
    const queued = this.queue.shift()
    const message =
      queued ??
      (await new Promise<WorkerMessage>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`worker sent nothing within ${timeoutMs} ms`)), timeoutMs)
        this.waiters.push((m) => {
          clearTimeout(timer)
          resolve(m)
        })
      }))
    if (message.error !== undefined) throw new Error(`worker failed: ${message.error}`)
    return message
  }

  async stop(): Promise<void> {
    await this.worker.terminate()
  }
}

// --- per-test resources, released even when an assertion fails ---------------------------------
// Closing the uffd first matters: it wakes any thread still blocked on a fault of ours (the
// kernel then resolves the fault as if the range were not registered), so workers can exit.
const cleanups: Array<() => void | Promise<void>> = []
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()?.()
})

function newUffd(features: number): number {
  const fd = createUserfaultfd()
  cleanups.push(() => closeFd(fd))
  uffdApi(fd, features)
  return fd
}

function newRegion(pages: number): number {
  const address = mmapAnonymous(pages * PAGE_SIZE)
  cleanups.push(() => munmap(address, pages * PAGE_SIZE))
  return address
}

function newWorker(job: Job): TestWorker {
  const worker = new TestWorker(job)
  cleanups.push(() => worker.stop())
  return worker
}

function pattern(seed: number, length = PAGE_SIZE): Buffer {
  const b = Buffer.alloc(length)
  for (let i = 0; i < length; i++) b[i] = (seed * 31 + i * 7) & 0xff
  return b
}

/** Waits (blocking this thread) until the uffd has a message, then reads and decodes all queued. */
function nextMessages(uffd: number, timeoutMs = 10_000): ReturnType<typeof decodeUffdMessage>[] {
  const [revents] = poll([{fd: uffd, events: POLLIN}], timeoutMs)
  expect(revents, 'uffd became readable').toBe(POLLIN)
  const buffer = Buffer.alloc(8 * UFFD_MSG_SIZE)
  const count = readUffdMessages(uffd, buffer)
  return Array.from({length: count}, (_, i) => decodeUffdMessage(buffer, i))
}

// --- pure decoders ------------------------------------------------------------------------------
describe('pinThreadToCurrentCpu', () => {
  it('pins the calling thread, and only it, to the CPU it runs on', async () => {
    const threadAllowed = (): string => /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync('/proc/thread-self/status', 'utf8'))![1]
    const mine = threadAllowed()
    const worker = newWorker({kind: 'pin'})
    const {pinned} = await worker.next()
    expect(pinned!.before).toBe(mine)
    expect(pinned!.after).toBe(String(pinned!.cpu))
    expect(threadAllowed()).toBe(mine)
  })
})

describe('decodeCopyResult', () => {
  it('reports a complete copy', () => {
    expect(decodeCopyResult(0, 0, 8192)).toEqual({done: 8192, error: 0})
  })
  it('decodes -errno in the copy field when nothing was done', () => {
    expect(decodeCopyResult(-1, Errno.EEXIST, -Errno.EEXIST)).toEqual({done: 0, error: Errno.EEXIST})
    expect(decodeCopyResult(-1, Errno.EAGAIN, -Errno.EAGAIN)).toEqual({done: 0, error: Errno.EAGAIN})
  })
  it('reports the bytes done of a partial copy with the ioctl errno', () => {
    expect(decodeCopyResult(-1, Errno.EAGAIN, 3 * 4096)).toEqual({done: 12288, error: Errno.EAGAIN})
  })
  it('falls back to errno when the kernel failed before writing the field', () => {
    expect(decodeCopyResult(-1, Errno.ESRCH, 0)).toEqual({done: 0, error: Errno.ESRCH})
  })
})

describe('decodeUffdMessage', () => {
  function message(event: number, words: Array<[number, number]>): Buffer {
    const b = Buffer.alloc(2 * UFFD_MSG_SIZE, 0xee) // message 1 is the one decoded; 0 is noise
    b.fill(0, UFFD_MSG_SIZE)
    b[UFFD_MSG_SIZE] = event
    for (const [offset, value] of words) b.writeBigUInt64LE(BigInt(value), UFFD_MSG_SIZE + offset)
    return b
  }
  const high = 0x7fff_ffff_f000 // a typical top-of-address-space page: needs more than 32 bits

  it('decodes each event kind', () => {
    expect(decodeUffdMessage(message(UFFD_EVENT.PAGEFAULT, [[8, UFFD_PAGEFAULT_FLAG.WRITE], [16, high], [24, 4242]]), 1)).toEqual({
      kind: 'pagefault',
      address: high,
      flags: UFFD_PAGEFAULT_FLAG.WRITE,
      tid: 4242,
    })
    expect(decodeUffdMessage(message(UFFD_EVENT.REMOVE, [[8, high], [16, high + 8192]]), 1)).toEqual({kind: 'remove', start: high, end: high + 8192})
    expect(decodeUffdMessage(message(UFFD_EVENT.UNMAP, [[8, 4096], [16, 8192]]), 1)).toEqual({kind: 'unmap', start: 4096, end: 8192})
    expect(decodeUffdMessage(message(UFFD_EVENT.REMAP, [[8, 4096], [16, high], [24, 65536]]), 1)).toEqual({
      kind: 'remap',
      from: 4096,
      to: high,
      len: 65536,
    })
    expect(decodeUffdMessage(message(UFFD_EVENT.FORK, [[8, 17]]), 1)).toEqual({kind: 'fork', ufd: 17})
    expect(decodeUffdMessage(message(0x7f, []), 1)).toEqual({kind: 'unknown', event: 0x7f})
  })

  it('rejects indexes outside the buffer and values beyond 2^53', () => {
    const b = message(UFFD_EVENT.PAGEFAULT, [[16, high]])
    expect(() => decodeUffdMessage(b, 2)).toThrow(RangeError)
    b.writeBigUInt64LE(1n << 60n, UFFD_MSG_SIZE + 16)
    expect(() => decodeUffdMessage(b, 1)).toThrow(RangeError)
  })
})

// --- the real thing -----------------------------------------------------------------------------
describe.skipIf(skipReason !== undefined)('userfaultfd round trips', () => {
  it('creates uffds by syscall and through /dev/userfaultfd and negotiates the API', () => {
    for (const via of ['syscall', 'device'] as const) {
      const fd = createUserfaultfd({via})
      cleanups.push(() => closeFd(fd))
      const api = uffdApi(fd, UFFD_FEATURE.EVENT_REMOVE | UFFD_FEATURE.THREAD_ID)
      expect(api.features & UFFD_FEATURE.EVENT_REMOVE).toBe(UFFD_FEATURE.EVENT_REMOVE)
      expect(api.features & UFFD_FEATURE.MISSING_SHMEM).toBe(UFFD_FEATURE.MISSING_SHMEM)
      for (const bit of [UFFDIO_BIT.API, UFFDIO_BIT.REGISTER, UFFDIO_BIT.UNREGISTER]) expect(hasIoctl(api.ioctls, bit)).toBe(true)
    }
  })

  it('serves a read fault raised by a Worker with UFFDIO_COPY, then reports EEXIST', async () => {
    const uffd = newUffd(UFFD_FEATURE.THREAD_ID)
    const base = newRegion(4)
    const ioctls = uffdRegister(uffd, base, 4 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    for (const bit of [UFFDIO_BIT.COPY, UFFDIO_BIT.ZEROPAGE, UFFDIO_BIT.WAKE]) expect(hasIoctl(ioctls, bit)).toBe(true)
    const target = base + PAGE_SIZE

    const faulter = newWorker({kind: 'touch', address: target, length: PAGE_SIZE})
    await faulter.next() // ready: from here on it blocks in the kernel on its first access
    const messages = nextMessages(uffd)
    expect(messages).toHaveLength(1)
    const fault = messages[0]
    if (fault?.kind !== 'pagefault') throw new Error(`expected a pagefault, got ${JSON.stringify(fault)}`)
    expect(fault.address).toBe(target)
    expect(fault.flags & UFFD_PAGEFAULT_FLAG.WRITE).toBe(0)
    expect(fault.tid).toBeGreaterThan(0)
    expect(fault.tid).not.toBe(process.pid) // the worker's thread, not ours

    const data = pattern(1)
    expect(uffdCopy(uffd, target, addressOf(data), PAGE_SIZE)).toEqual({done: PAGE_SIZE, error: 0})
    const {bytes} = await faulter.next()
    expect(Buffer.from(bytes ?? [])).toEqual(data)

    expect(uffdCopy(uffd, target, addressOf(pattern(2)), PAGE_SIZE)).toEqual({done: 0, error: Errno.EEXIST})
    expect(bufferAt(target, PAGE_SIZE)).toEqual(data) // present now: safe to read on this thread
  })

  it('serves a write fault with UFFDIO_ZEROPAGE; the write then lands on a private page', async () => {
    const uffd = newUffd(0)
    const base = newRegion(2)
    uffdRegister(uffd, base, 2 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)

    const faulter = newWorker({kind: 'touch', address: base, length: PAGE_SIZE, write: {offset: 100, value: 0x5a}})
    await faulter.next()
    const [fault] = nextMessages(uffd)
    expect(fault).toMatchObject({kind: 'pagefault', address: base, flags: UFFD_PAGEFAULT_FLAG.WRITE})

    expect(uffdZeropage(uffd, base, PAGE_SIZE)).toEqual({done: PAGE_SIZE, error: 0})
    const expected = Buffer.alloc(PAGE_SIZE)
    expected[100] = 0x5a
    expect(Buffer.from((await faulter.next()).bytes ?? [])).toEqual(expected)
    expect(uffdZeropage(uffd, base, PAGE_SIZE)).toEqual({done: 0, error: Errno.EEXIST})
  })

  it('stops a multi-page copy at a page already present and reports the bytes done', () => {
    const uffd = newUffd(0)
    const base = newRegion(4)
    uffdRegister(uffd, base, 4 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const source = pattern(7, 4 * PAGE_SIZE)
    const src = addressOf(source)

    // Page 2 is served first (as by a demand fault racing a bulk prefetch).
    expect(uffdCopy(uffd, base + 2 * PAGE_SIZE, src + 2 * PAGE_SIZE, PAGE_SIZE)).toEqual({done: PAGE_SIZE, error: 0})
    // The bulk copy of pages 0-3 installs 0 and 1, then stops at 2. The kernel's ioctl fails with
    // EAGAIN (not EEXIST) because some bytes were done; the copy field holds how many.
    expect(uffdCopy(uffd, base, src, 4 * PAGE_SIZE, {dontWake: true})).toEqual({done: 2 * PAGE_SIZE, error: Errno.EAGAIN})
    // Continuing at the stop point: EEXIST with nothing done, so skip that page...
    expect(uffdCopy(uffd, base + 2 * PAGE_SIZE, src + 2 * PAGE_SIZE, 2 * PAGE_SIZE)).toEqual({done: 0, error: Errno.EEXIST})
    // ...and the rest goes in.
    expect(uffdCopy(uffd, base + 3 * PAGE_SIZE, src + 3 * PAGE_SIZE, PAGE_SIZE)).toEqual({done: PAGE_SIZE, error: 0})
    uffdWake(uffd, base, 4 * PAGE_SIZE)
    expect(bufferAt(base, 4 * PAGE_SIZE)).toEqual(source)
  })

  it.skipIf(!nativeBlockFill)('uffdFillBlock installs a packed block: runs split at regions, zero runs grown in their window, present pages skipped', () => {
    // Image pages 0-15 in one mapping, 16-31 in another (two regions of one client).
    const uffd = newUffd(0)
    const low = newRegion(16)
    const high = newRegion(16)
    uffdRegister(uffd, low, 16 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    uffdRegister(uffd, high, 16 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const regions = fillRegions([
      {offset: 0, size: 16 * PAGE_SIZE, base: low},
      {offset: 16 * PAGE_SIZE, size: 16 * PAGE_SIZE, base: high},
    ])
    // Zero pages: 5-8 and 20-31.
    const zeroMap = new Uint8Array(4)
    for (const p of [5, 6, 7, 8, ...Array.from({length: 12}, (_, i) => 20 + i)]) zeroMap[p >> 3] |= 1 << (p & 7)
    // The block: pages 0-4 (payload 0-4), 6 (zero), 14-17 (payload 5-8, across the region
    // boundary), 24 (zero); zero runs grow within aligned windows of 4 pages.
    const runs = Int32Array.from([0, 5, 0, 6, 1, -1, 14, 4, 5, 24, 1, -1])
    const payload = pattern(3, 9 * PAGE_SIZE)
    const states = new Uint8Array(32)
    // Page 2 is already there (a fault served it) though the states do not know yet: EEXIST.
    expect(uffdCopy(uffd, low + 2 * PAGE_SIZE, addressOf(payload) + 2 * PAGE_SIZE, PAGE_SIZE).error).toBe(0)
    // Page 15 is known present: skipped (its bytes must stay as they are: zeros from the source).
    states[15] = 1
    expect(uffdCopy(uffd, low + 15 * PAGE_SIZE, addressOf(Buffer.alloc(PAGE_SIZE)), PAGE_SIZE).error).toBe(0)

    // Pages 0-1 go in, the copy stops at 2 (EAGAIN after progress), 2 reports EEXIST, 3-4 go in:
    // three copies; 14, and 16-17 in the other region: two more.
    const result = uffdFillBlock(uffd, states, zeroMap, PAGE_SIZE, regions, runs, addressOf(payload), 2, 4)
    expect(result).toEqual({error: 0, stopPage: 0, pagesCopied: 7, pagesZeroed: 7, copyIoctls: 5, zeropageIoctls: 2, eexist: 1, newlyPresent: 15})
    const present = [...states.keys()].filter((p) => states[p] === 1)
    expect(present).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 24, 25, 26, 27])
    expect(bufferAt(low, 5 * PAGE_SIZE)).toEqual(payload.subarray(0, 5 * PAGE_SIZE))
    expect(bufferAt(low + 5 * PAGE_SIZE, 3 * PAGE_SIZE).every((b) => b === 0)).toBe(true)
    expect(bufferAt(low + 14 * PAGE_SIZE, PAGE_SIZE)).toEqual(payload.subarray(5 * PAGE_SIZE, 6 * PAGE_SIZE))
    expect(bufferAt(low + 15 * PAGE_SIZE, PAGE_SIZE).every((b) => b === 0)).toBe(true)
    expect(bufferAt(high, 2 * PAGE_SIZE)).toEqual(payload.subarray(7 * PAGE_SIZE, 9 * PAGE_SIZE))
    expect(bufferAt(high + 8 * PAGE_SIZE, 4 * PAGE_SIZE).every((b) => b === 0)).toBe(true)

    // Again: nothing missing, nothing done.
    expect(uffdFillBlock(uffd, states, zeroMap, PAGE_SIZE, regions, runs, addressOf(payload), -1, 4)).toMatchObject({error: 0, copyIoctls: 0, zeropageIoctls: 0, newlyPresent: 0})

    // A region reaching past the pages the states cover (into a snapshot's padding): the zero run
    // around page 4 grows back to its window's start but stops at the 6 known pages, not 8.
    const padded = newRegion(8)
    uffdRegister(uffd, padded, 8 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const six = new Uint8Array(6)
    expect(uffdFillBlock(uffd, six, Uint8Array.of(0xff), PAGE_SIZE, fillRegions([{offset: 0, size: 8 * PAGE_SIZE, base: padded}]), Int32Array.of(4, 1, -1), 0, -1, 8)).toMatchObject({error: 0, pagesZeroed: 6, newlyPresent: 6})
    expect([...six]).toEqual([1, 1, 1, 1, 1, 1])
  })

  it.skipIf(!nativeBlockFill)('an InstallHelper installs its blocks on its own thread, makes no progress while the gate is held, counts each page once', async () => {
    // 2048 blocks of 8 scattered data pages each: block b holds pages b, b + 2048, ..., b + 7 * 2048
    // (one run each; payload page k is its k-th page). Enough single-page copies to outlast the
    // moment between starting the helper and raising the gate.
    const blockCount = 2048
    const pages = blockCount * 8
    const uffd = newUffd(0)
    const base = newRegion(pages)
    uffdRegister(uffd, base, pages * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const regions = fillRegions([{offset: 0, size: pages * PAGE_SIZE, base}])
    const states = new Uint8Array(pages)
    const zeroMap = new Uint8Array(pages / 8)
    const payloads = Array.from({length: blockCount}, (_, b) => pattern(b, 8 * PAGE_SIZE))
    const runsOf = (b: number): Int32Array => Int32Array.from({length: 24}, (_, i) => [b + blockCount * Math.floor(i / 3), 1, Math.floor(i / 3)][i % 3])
    const jobs = payloads.map((payload, b) => ({runs: runsOf(b), payload: addressOf(payload)}))
    const notify = createEventfd()
    cleanups.push(() => closeFd(notify))
    const helper = InstallHelper.start(uffd, states, zeroMap, PAGE_SIZE, regions, jobs, 1, notify)
    expect(helper).toBeDefined()
    // Held: whatever page the helper was on goes in, then nothing more until released.
    helper!.holdGate()
    const installed = (): number => states.reduce((n, state) => n + state, 0)
    const atHold = installed()
    await new Promise((resolve) => setTimeout(resolve, 50))
    expect(installed()).toBe(atHold)
    expect(atHold).toBeLessThan(pages)
    // Meanwhile this thread installs the last block itself, as a fault would: counted here, once.
    const last = blockCount - 1
    expect(uffdFillBlock(uffd, states, zeroMap, PAGE_SIZE, regions, runsOf(last), addressOf(payloads[last]), -1, 1)).toMatchObject({error: 0, newlyPresent: 8})
    helper!.releaseGate()
    expect(poll([{fd: notify, events: POLLIN}], 20_000)[0] & POLLIN).toBeTruthy()
    expect(helper!.finished).toBe(true)
    expect(helper!.stop()).toBe(0)
    // Every page once: 8 by this thread, the rest by the helper, none twice.
    expect(helper!.takeProgress()).toMatchObject({error: 0, pagesCopied: pages - 8, newlyPresent: pages - 8, eexist: 0})
    expect(installed()).toBe(pages)
    for (const b of [0, 1000, last]) {
      for (let k = 0; k < 8; k++) expect(bufferAt(base + (b + blockCount * k) * PAGE_SIZE, PAGE_SIZE)).toEqual(payloads[b].subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE))
    }
    expect(jobs.every((_, k) => helper!.done(k))).toBe(true)
  })

  it('delivers REMOVE for madvise(MADV_DONTNEED), with EAGAIN on copies until it is read', async () => {
    const uffd = newUffd(UFFD_FEATURE.EVENT_REMOVE)
    const base = newRegion(4)
    uffdRegister(uffd, base, 4 * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const data = pattern(3, 2 * PAGE_SIZE)
    expect(uffdCopy(uffd, base, addressOf(data), 2 * PAGE_SIZE)).toEqual({done: 2 * PAGE_SIZE, error: 0})

    // madvise blocks in the kernel until we read the REMOVE event, so a Worker makes the call.
    const remover = newWorker({kind: 'madvise', address: base, length: 2 * PAGE_SIZE})
    await remover.next()
    const [revents] = poll([{fd: uffd, events: POLLIN}], 10_000)
    expect(revents).toBe(POLLIN)
    // While the event is queued and unread, the mm is "changing": every fill fails with EAGAIN.
    const other = pattern(4)
    expect(uffdCopy(uffd, base + 3 * PAGE_SIZE, addressOf(other), PAGE_SIZE)).toEqual({done: 0, error: Errno.EAGAIN})

    expect(nextMessages(uffd)).toEqual([{kind: 'remove', start: base, end: base + 2 * PAGE_SIZE}])
    expect((await remover.next()).done).toBe(true)
    // The madvise has returned: copies work again, and the removed pages are missing again.
    expect(uffdCopy(uffd, base + 3 * PAGE_SIZE, addressOf(other), PAGE_SIZE)).toEqual({done: PAGE_SIZE, error: 0})
    expect(uffdZeropage(uffd, base, 2 * PAGE_SIZE)).toEqual({done: 2 * PAGE_SIZE, error: 0})
    expect(bufferAt(base, 2 * PAGE_SIZE)).toEqual(Buffer.alloc(2 * PAGE_SIZE))
  })

  it('runs a poll + uffd fault loop inside a Worker, stopped through an eventfd', async () => {
    const pages = 8
    const uffd = newUffd(0)
    const base = newRegion(pages)
    uffdRegister(uffd, base, pages * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    const stopFd = createEventfd()
    cleanups.push(() => closeFd(stopFd))

    const handler = newWorker({kind: 'handler', uffd, stopFd, base, timeoutMs: 1000})
    await handler.next()
    const faulter = newWorker({kind: 'touch', address: base, length: pages * PAGE_SIZE})
    await faulter.next()
    const {bytes} = await faulter.next()
    const expected = Buffer.concat(Array.from({length: pages}, (_, i) => Buffer.alloc(PAGE_SIZE, i + 1)))
    expect(Buffer.from(bytes ?? [])).toEqual(expected)

    eventfdSignal(stopFd)
    expect((await handler.next()).faults).toEqual(Array.from({length: pages}, (_, i) => i))
    uffdUnregister(uffd, base, pages * PAGE_SIZE)
  })

  it('throws SysError with the syscall, errno name and step for unexpected failures', () => {
    const uffd = newUffd(0)
    const address = mmapAnonymous(PAGE_SIZE)
    munmap(address, PAGE_SIZE)
    let caught: unknown
    try {
      uffdRegister(uffd, address, PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING, 'registering region 0')
    } catch (error) {
      caught = error
    }
    expect(caught).toBeInstanceOf(SysError)
    expect(caught).toMatchObject({syscall: 'UFFDIO_REGISTER', code: 'EINVAL', errno: Errno.EINVAL, step: 'registering region 0'})
    expect((caught as Error).message).toBe('uffd: UFFDIO_REGISTER failed while registering region 0 (EINVAL: Invalid argument)')
    // A second UFFDIO_API on the same uffd is refused.
    expect(() => uffdApi(uffd, 0)).toThrow(expect.objectContaining({syscall: 'UFFDIO_API', code: 'EINVAL'}))
    // Copies into a range that is no longer mapped are an expected outcome, not an exception.
    const src = pattern(0)
    expect(uffdCopy(uffd, address, addressOf(src), PAGE_SIZE)).toEqual({done: 0, error: Errno.ENOENT})
  })

  it('rejects unaligned ranges before calling the kernel', () => {
    const uffd = newUffd(0)
    expect(() => uffdCopy(uffd, 4096 + 1, 0x1000, PAGE_SIZE)).toThrow(RangeError)
    expect(() => uffdZeropage(uffd, 4096, 100)).toThrow(RangeError)
    expect(() => readUffdMessages(uffd, Buffer.alloc(UFFD_MSG_SIZE + 1))).toThrow(RangeError)
  })

  it('measures the per-call cost of uffdCopy and uffdZeropage (4 KiB, no waiter)', () => {
    // Each variant fills its own fresh registered region, in blocks of calls that alternate
    // between variants, so that the noise of a busy 2-core machine hits them all alike; the
    // report gives the median per-call time over the blocks.
    const n = 10_000
    const block = 250
    const uffd = newUffd(0)
    const source = pattern(5)
    const src = addressOf(source)
    const region = (): number => {
      const base = newRegion(n)
      uffdRegister(uffd, base, n * PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
      return base
    }
    // The raw ioctl through koffi with a pre-filled struct: the floor our wrapper adds to.
    const raw = new RawStruct(UFFDIO_COPY_LAYOUT.size)
    raw.set64(UFFDIO_COPY_LAYOUT.src, src)
    raw.set64(UFFDIO_COPY_LAYOUT.len, PAGE_SIZE)
    const rawCopy = (dst: number): number => {
      raw.set64(UFFDIO_COPY_LAYOUT.dst, dst)
      return libc.ioctlAddr(uffd, UFFDIO_COPY, raw.address)
    }
    type Variant = {name: string; base: number; run: (dst: number) => boolean; samples: number[]}
    const variant = (name: string, base: number, run: (dst: number) => boolean): Variant => ({name, base, run, samples: []})
    const rawBase = region()
    const copyBase = region()
    const variants: Variant[] = [
      variant('raw koffi ioctl UFFDIO_COPY', rawBase, (dst) => rawCopy(dst) === 0),
      variant('uffdCopy', copyBase, (dst) => uffdCopy(uffd, dst, src, PAGE_SIZE).error === 0),
      variant('uffdZeropage', region(), (dst) => uffdZeropage(uffd, dst, PAGE_SIZE).error === 0),
    ]
    // The same calls again on the now-present pages: EEXIST (the kernel still allocates and fills
    // a page for the copy before it finds the slot taken, then frees it).
    variants.push(
      variant('raw koffi ioctl -> EEXIST', rawBase, (dst) => rawCopy(dst) === -1),
      variant('uffdCopy -> EEXIST', copyBase, (dst) => uffdCopy(uffd, dst, src, PAGE_SIZE).error === Errno.EEXIST),
    )
    for (const pass of [variants.slice(0, 3), variants.slice(3)]) {
      for (let first = 0; first < n; first += block) {
        for (const v of pass) {
          const start = performance.now()
          for (let i = first; i < first + block; i++) {
            if (!v.run(v.base + i * PAGE_SIZE)) throw new Error(`${v.name} failed at page ${i}`)
          }
          v.samples.push(((performance.now() - start) * 1000) / block)
        }
      }
    }
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1] ?? NaN
    console.log(
      `[sys-uffd] per 4 KiB call, N=${n}, median of ${n / block} blocks: ` +
        variants.map((v) => `${v.name} ${median(v.samples).toFixed(2)} µs`).join(', '),
    )
    expect(bufferAt(copyBase + (n - 1) * PAGE_SIZE, PAGE_SIZE)).toEqual(source)
  })
})

describe.skipIf(skipReason !== undefined)('userfaultfd on hugetlbfs memory', () => {
  let reservation: ReturnType<typeof reserveHugePages> | undefined
  beforeAll(() => {
    reservation = reserveHugePages(1)
    if (reservation.reason) console.log(`[sys-uffd] skipping the hugetlbfs test: ${reservation.reason}`)
  })
  afterAll(() => reservation?.release())

  it('installs whole 2 MiB pages with UFFDIO_COPY and has no UFFDIO_ZEROPAGE', (ctx) => {
    if (reservation?.reason) ctx.skip()
    const uffd = newUffd(0)
    const base = mmapAnonymous(HUGE_PAGE_SIZE, {hugepages: true})
    cleanups.push(() => munmap(base, HUGE_PAGE_SIZE))
    const ioctls = uffdRegister(uffd, base, HUGE_PAGE_SIZE, UFFDIO_REGISTER_MODE.MISSING)
    expect(hasIoctl(ioctls, UFFDIO_BIT.COPY)).toBe(true)
    expect(hasIoctl(ioctls, UFFDIO_BIT.ZEROPAGE)).toBe(false)
    expect(() => uffdZeropage(uffd, base, HUGE_PAGE_SIZE)).toThrow(expect.objectContaining({syscall: 'UFFDIO_ZEROPAGE', code: 'EINVAL'}))

    const staging = newRegion(HUGE_PAGE_SIZE / PAGE_SIZE)
    const source = bufferAt(staging, HUGE_PAGE_SIZE)
    source.set(pattern(9, HUGE_PAGE_SIZE))
    // Copies into hugetlbfs must cover whole huge pages.
    expect(() => uffdCopy(uffd, base, staging, PAGE_SIZE)).toThrow(expect.objectContaining({code: 'EINVAL'}))
    expect(uffdCopy(uffd, base, staging, HUGE_PAGE_SIZE)).toEqual({done: HUGE_PAGE_SIZE, error: 0})
    expect(bufferAt(base, HUGE_PAGE_SIZE).equals(source)).toBe(true)
  })
})
