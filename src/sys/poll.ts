// poll(2) and eventfd(2): the waiting primitives of a fault loop that runs synchronously in a
// worker thread. The loop polls the uffd together with an eventfd; another thread signals the
// eventfd to wake the loop (to stop it, or to hand it work) without any signal handling.

import {Errno, SysError} from './errors.js'
import * as libc from './libc.js'

export const POLLIN = 0x001
export const POLLOUT = 0x004
export const POLLERR = 0x008
export const POLLHUP = 0x010
export const POLLNVAL = 0x020

/** struct pollfd: int fd; short events; short revents. */
export const POLLFD_LAYOUT = {size: 8, fd: 0, events: 4, revents: 6} as const

export const EFD_CLOEXEC = 0o2000000
export const EFD_NONBLOCK = 0o4000

export interface PollEntry {
  fd: number
  /** POLLIN / POLLOUT bits; POLLERR, POLLHUP and POLLNVAL are always reported. */
  events: number
}

/**
 * A fixed set of fds to poll repeatedly without allocating: the pollfd array is built once and
 * only `revents` change between waits. One per polling loop (and per thread).
 */
export class PollSet {
  private readonly bytes: Buffer
  private readonly view: DataView
  readonly size: number

  constructor(entries: readonly PollEntry[]) {
    this.size = entries.length
    this.bytes = Buffer.alloc(Math.max(1, entries.length) * POLLFD_LAYOUT.size)
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.length)
    fillPollfds(this.view, entries)
  }

  /**
   * Waits up to `timeoutMs` (-1: forever, 0: just check) and returns how many entries have
   * events; 0 on timeout. A signal interrupting the wait (EINTR) also returns 0 with no revents
   * set, rather than retrying with the full timeout again: callers loop anyway and can recompute
   * what remains of their deadline.
   */
  wait(timeoutMs: number): number {
    return pollFds(this.bytes, this.view, this.size, timeoutMs)
  }

  /** The revents of entry `index` after the last wait(). */
  revents(index: number): number {
    return this.view.getUint16(index * POLLFD_LAYOUT.size + POLLFD_LAYOUT.revents, true)
  }
}

// The pollfd array of poll(), grown when needed and reused (one per thread).
let scratch = Buffer.alloc(4 * POLLFD_LAYOUT.size)
let scratchView = new DataView(scratch.buffer, scratch.byteOffset, scratch.length)

/**
 * Polls `entries` once, waiting up to `timeoutMs` (-1: forever), and returns each entry's
 * revents (all 0 on timeout or on EINTR, see PollSet.wait). Loops should keep a PollSet instead.
 */
export function poll(entries: readonly PollEntry[], timeoutMs: number): number[] {
  if (scratch.length < entries.length * POLLFD_LAYOUT.size) {
    scratch = Buffer.alloc(entries.length * POLLFD_LAYOUT.size)
    scratchView = new DataView(scratch.buffer, scratch.byteOffset, scratch.length)
  }
  fillPollfds(scratchView, entries)
  pollFds(scratch, scratchView, entries.length, timeoutMs)
  return entries.map((_, i) => scratchView.getUint16(i * POLLFD_LAYOUT.size + POLLFD_LAYOUT.revents, true))
}

function fillPollfds(view: DataView, entries: readonly PollEntry[]): void {
  entries.forEach((entry, i) => {
    const base = i * POLLFD_LAYOUT.size
    view.setInt32(base + POLLFD_LAYOUT.fd, entry.fd, true)
    view.setInt16(base + POLLFD_LAYOUT.events, entry.events, true)
  })
}

function pollFds(bytes: Buffer, view: DataView, count: number, timeoutMs: number): number {
  if (!Number.isInteger(timeoutMs) || timeoutMs < -1 || timeoutMs > 0x7fff_ffff) {
    throw new RangeError(`poll timeout must be an integer number of ms >= -1, got ${timeoutMs}`)
  }
  for (let i = 0; i < count; i++) view.setInt16(i * POLLFD_LAYOUT.size + POLLFD_LAYOUT.revents, 0, true)
  const n = libc.poll(bytes, count, timeoutMs)
  if (n >= 0) return n
  const errno = libc.lastErrno()
  if (errno === Errno.EINTR) return 0
  throw new SysError('poll', errno, `polling ${count} fds`)
}

// eventfd counters are u64 read and written as 8 bytes; one buffer per thread for each direction.
const eventfdOne = new BigUint64Array([1n])
const eventfdRead = new BigUint64Array(1)

/** Creates a non-blocking, close-on-exec eventfd with counter 0 and returns its fd. */
export function createEventfd(): number {
  const fd = libc.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
  if (fd < 0) libc.fail('eventfd', 'creating an eventfd')
  return fd
}

/** Adds 1 to the counter, making the eventfd readable (POLLIN) until drained. Safe from any thread. */
export function eventfdSignal(fd: number): void {
  for (;;) {
    if (libc.write(fd, eventfdOne, 8) === 8) return
    const errno = libc.lastErrno()
    // EAGAIN would mean the counter is at its maximum (2^64 - 2): it is readable already.
    if (errno === Errno.EAGAIN) return
    if (errno !== Errno.EINTR) throw new SysError('write', errno, `signalling eventfd ${fd}`)
  }
}

/** Reads and resets the counter; returns how many signals were pending (0 if none). */
export function eventfdDrain(fd: number): number {
  for (;;) {
    if (libc.read(fd, eventfdRead, 8) === 8) return Number(eventfdRead[0])
    const errno = libc.lastErrno()
    if (errno === Errno.EAGAIN) return 0
    if (errno !== Errno.EINTR) throw new SysError('read', errno, `draining eventfd ${fd}`)
  }
}
