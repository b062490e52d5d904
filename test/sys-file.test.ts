// src/sys file, memory, process, poll/eventfd and error helpers against the real kernel.

import {spawn} from 'node:child_process'
import {closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {join} from 'node:path'

import {afterEach, beforeEach, describe, expect, it} from 'vitest'

import {
  Errno,
  MADV,
  PAGE_SIZE,
  POLLIN,
  POLLNVAL,
  PollSet,
  SysError,
  addressOf,
  bufferAt,
  closeFd,
  createEventfd,
  errnoName,
  eventfdDrain,
  eventfdSignal,
  fsyncDir,
  madvise,
  mmapAnonymous,
  mmapFile,
  munmap,
  SIGKILL,
  createUserfaultfd,
  dupFd,
  pidfdOpen,
  pidfdSendSignal,
  poll,
  preadInto,
  processVmReadv,
  sameOpenFile,
  seekData,
  seekHole,
} from '../src/sys/index.js'

let dir: string
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'uffd-sys-file-'))
})
afterEach(() => {
  rmSync(dir, {recursive: true, force: true})
})

const MiB = 1024 * 1024

describe('seekData / seekHole', () => {
  it('finds the data extents of a sparse file', () => {
    const path = join(dir, 'sparse')
    const fd = openSync(path, 'w+')
    try {
      ftruncateSync(fd, 4 * MiB)
      writeSync(fd, Buffer.alloc(PAGE_SIZE, 1), 0, PAGE_SIZE, 1 * MiB)
      writeSync(fd, Buffer.alloc(2 * PAGE_SIZE, 2), 0, 2 * PAGE_SIZE, 3 * MiB)
      const extents: Array<[number, number]> = []
      for (let at = seekData(fd, 0); at !== null; at = seekData(fd, seekHole(fd, at))) {
        extents.push([at, seekHole(fd, at)])
      }
      expect(extents).toEqual([
        [1 * MiB, 1 * MiB + PAGE_SIZE],
        [3 * MiB, 3 * MiB + 2 * PAGE_SIZE],
      ])
      // The end of the file is a hole; past it, there is neither data nor hole.
      expect(seekHole(fd, 3 * MiB + 2 * PAGE_SIZE)).toBe(3 * MiB + 2 * PAGE_SIZE)
      expect(seekData(fd, 4 * MiB)).toBeNull()
      expect(() => seekHole(fd, 4 * MiB)).toThrow(expect.objectContaining({syscall: 'lseek', code: 'ENXIO'}))
    } finally {
      closeSync(fd)
    }
  })
})

describe('memory', () => {
  it('maps anonymous memory, views it without copying and drops it with madvise', () => {
    const address = mmapAnonymous(4 * PAGE_SIZE)
    try {
      expect(address % PAGE_SIZE).toBe(0)
      const view = bufferAt(address, 4 * PAGE_SIZE)
      view.fill(0x11)
      expect(addressOf(view)).toBe(address)
      expect(bufferAt(address + PAGE_SIZE, 1)[0]).toBe(0x11) // same memory through another view
      madvise(address, 2 * PAGE_SIZE, MADV.DONTNEED)
      expect(view.subarray(0, 2 * PAGE_SIZE).equals(Buffer.alloc(2 * PAGE_SIZE))).toBe(true)
      expect(view[2 * PAGE_SIZE]).toBe(0x11)
    } finally {
      munmap(address, 4 * PAGE_SIZE)
    }
  })

  it('maps a file read-only and preads a file straight into raw memory', () => {
    const path = join(dir, 'image')
    const content = Buffer.alloc(3 * PAGE_SIZE)
    for (let i = 0; i < content.length; i++) content[i] = (i * 13) & 0xff
    const fd = openSync(path, 'w+')
    try {
      writeSync(fd, content)
      const mapped = mmapFile(fd, 2 * PAGE_SIZE, PAGE_SIZE)
      try {
        expect(bufferAt(mapped, 2 * PAGE_SIZE).equals(content.subarray(PAGE_SIZE))).toBe(true)
      } finally {
        munmap(mapped, 2 * PAGE_SIZE)
      }
      const staging = mmapAnonymous(4 * PAGE_SIZE)
      try {
        // Asking for more than the file holds stops at end of file.
        expect(preadInto(fd, staging, 4 * PAGE_SIZE, PAGE_SIZE)).toBe(2 * PAGE_SIZE)
        expect(bufferAt(staging, 2 * PAGE_SIZE).equals(content.subarray(PAGE_SIZE))).toBe(true)
      } finally {
        munmap(staging, 4 * PAGE_SIZE)
      }
    } finally {
      closeSync(fd)
    }
    fsyncDir(dir)
  })

  it('validates lengths and alignment before calling the kernel', () => {
    expect(() => mmapAnonymous(0)).toThrow(RangeError)
    expect(() => mmapAnonymous(PAGE_SIZE + 1)).toThrow(RangeError)
    expect(() => mmapAnonymous(PAGE_SIZE, {hugepages: true})).toThrow(RangeError)
    expect(() => bufferAt(0, 16)).toThrow(RangeError)
  })
})

describe('processVmReadv', () => {
  it('reads memory of a process (here: our own) at a given address', () => {
    const remote = Buffer.from('memory of the target process')
    const local = Buffer.alloc(64)
    expect(processVmReadv(process.pid, local, addressOf(remote), remote.length)).toBe(remote.length)
    expect(local.subarray(0, remote.length)).toEqual(remote)
  })

  it('fails with EFAULT on an unmapped remote address', () => {
    const address = mmapAnonymous(PAGE_SIZE)
    munmap(address, PAGE_SIZE)
    expect(() => processVmReadv(process.pid, Buffer.alloc(16), address, 16)).toThrow(
      expect.objectContaining({syscall: 'process_vm_readv', code: 'EFAULT'}),
    )
  })
})

describe('pidfdOpen', () => {
  it('becomes readable when the process exits', async () => {
    const child = spawn('sleep', ['30'], {stdio: 'ignore'})
    const exited = new Promise((resolve) => child.once('exit', resolve))
    const pidfd = pidfdOpen(child.pid ?? -1)
    try {
      expect(poll([{fd: pidfd, events: POLLIN}], 0)).toEqual([0])
      child.kill('SIGKILL')
      await exited
      // POLLIN once it exited (POLLHUP too once it has been reaped, as Node does at 'exit').
      const [revents = 0] = poll([{fd: pidfd, events: POLLIN}], 5000)
      expect(revents & POLLIN).toBe(POLLIN)
    } finally {
      closeFd(pidfd)
    }
  })

  it('fails with ESRCH for a process that does not exist', () => {
    expect(() => pidfdOpen(0x3fff_fff0)).toThrow(expect.objectContaining({syscall: 'pidfd_open', code: 'ESRCH'}))
  })
})

describe('pidfdSendSignal', () => {
  it('kills the process the pidfd names, and reports one that has already exited', async () => {
    const child = spawn('sleep', ['30'], {stdio: 'ignore'})
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)))
    const pidfd = pidfdOpen(child.pid ?? -1)
    try {
      expect(pidfdSendSignal(pidfd, SIGKILL)).toBe(true)
      expect(await exited).toBe('SIGKILL')
      // Reaped by Node: its pid may name another process by now; the pidfd still names this one.
      expect(pidfdSendSignal(pidfd, SIGKILL)).toBe(false)
    } finally {
      closeFd(pidfd)
    }
  })
})

describe('sameOpenFile (kcmp)', () => {
  it('tells a dup of a userfaultfd from another userfaultfd', () => {
    const a = createUserfaultfd()
    const b = createUserfaultfd()
    const copy = dupFd(a, 'test')
    try {
      expect(sameOpenFile(a, copy)).toBe(true)
      expect(sameOpenFile(a, b)).toBe(false)
      expect(() => sameOpenFile(a, 0x7fff_fff0)).toThrow(expect.objectContaining({syscall: 'kcmp', code: 'EBADF'}))
    } finally {
      for (const fd of [a, b, copy]) closeFd(fd)
    }
  })
})

describe('poll and eventfd', () => {
  it('wakes a poll through an eventfd and drains the count', () => {
    const fd = createEventfd()
    try {
      const set = new PollSet([{fd, events: POLLIN}])
      expect(set.wait(0)).toBe(0)
      expect(set.revents(0)).toBe(0)
      eventfdSignal(fd)
      eventfdSignal(fd)
      expect(set.wait(1000)).toBe(1)
      expect(set.revents(0)).toBe(POLLIN)
      expect(eventfdDrain(fd)).toBe(2)
      expect(eventfdDrain(fd)).toBe(0)
      expect(poll([{fd, events: POLLIN}], 10)).toEqual([0])
    } finally {
      closeFd(fd)
    }
  })

  it('reports POLLNVAL for a closed fd', () => {
    const fd = createEventfd()
    closeFd(fd)
    expect(poll([{fd, events: POLLIN}], 0)).toEqual([POLLNVAL])
  })
})

describe('SysError', () => {
  it('carries the syscall, errno name, errno and step', () => {
    let caught: unknown
    try {
      closeFd(1_000_000)
    } catch (error) {
      caught = error
    }
    expect(caught).toBeInstanceOf(SysError)
    expect(caught).toMatchObject({name: 'SysError', syscall: 'close', code: 'EBADF', errno: Errno.EBADF, step: 'closing fd 1000000'})
    expect((caught as Error).message).toBe('uffd: close failed while closing fd 1000000 (EBADF: Bad file descriptor)')
  })

  it('names errno values', () => {
    expect(errnoName(Errno.EEXIST)).toBe('EEXIST')
    expect(errnoName(Errno.EAGAIN)).toBe('EAGAIN')
    expect(errnoName(9999)).toBe('E9999')
  })
})
