// File operations Node's fs lacks: SEEK_DATA/SEEK_HOLE extent discovery, pread straight into
// raw memory (e.g. a staging mapping used as UFFDIO_COPY's source), fsync of a directory, and
// making a descriptor someone else created non-blocking.

import {closeSync, fsyncSync, openSync} from 'node:fs'

import {Errno, SysError, rethrowAsSysError} from './errors.js'
import * as libc from './libc.js'
import {checkUnsigned, hex} from './raw.js'
import {O_NONBLOCK} from './uffd.js'

/** lseek whence values for sparse files (Linux >= 3.1; ext4, xfs, btrfs, tmpfs support them). */
export const SEEK_DATA = 3
export const SEEK_HOLE = 4
/** fcntl commands that read and set the file status flags (O_NONBLOCK among them). */
export const F_GETFL = 3
export const F_SETFL = 4
export const F_DUPFD_CLOEXEC = 1030

/** posix_fadvise advice: read the range into the page cache now. */
const POSIX_FADV_WILLNEED = 3

/** flock(2) operations. */
export const LOCK_EX = 2
export const LOCK_NB = 4

/**
 * Takes an exclusive flock(2) on the open file behind `fd` without waiting: true if taken, false
 * if another open file description holds it. The lock belongs to the open file (not the path,
 * not the process) and goes when the last descriptor of it is closed, so a holder that dies
 * leaves no stale lock behind.
 */
export function tryLockExclusive(fd: number): boolean {
  for (;;) {
    if (libc.flock(fd, LOCK_EX | LOCK_NB) === 0) return true
    const errno = libc.lastErrno()
    if (errno === Errno.EAGAIN) return false
    if (errno !== Errno.EINTR) throw new SysError('flock', errno, `locking fd ${fd}`)
  }
}

/**
 * The offset of the first byte of data at or after `offset`, or null if there is none (the
 * kernel answers ENXIO when only a hole, or nothing, follows). Filesystems without hole
 * tracking report the whole file as data.
 */
export function seekData(fd: number, offset: number): number | null {
  checkUnsigned('offset', offset)
  const at = libc.lseek(fd, offset, SEEK_DATA)
  if (at >= 0) return at
  const errno = libc.lastErrno()
  if (errno === Errno.ENXIO) return null
  throw new SysError('lseek', errno, `seeking data from offset ${offset} of fd ${fd}`)
}

/**
 * The offset of the first hole at or after `offset` (< file size); the end of the file counts as
 * a hole, so within the file there always is one. Throws SysError ENXIO if offset >= file size.
 */
export function seekHole(fd: number, offset: number): number {
  checkUnsigned('offset', offset)
  const at = libc.lseek(fd, offset, SEEK_HOLE)
  if (at < 0) libc.fail('lseek', `seeking a hole from offset ${offset} of fd ${fd}`)
  return at
}

/**
 * Reads `len` bytes at file `offset` into raw memory at `address` (which we own and which is
 * not uffd-registered: a fault there would block this thread forever). Retries short reads and
 * EINTR; returns the bytes read, which is less than `len` only at end of file.
 */
export function preadInto(fd: number, address: number, len: number, offset: number): number {
  checkUnsigned('address', address)
  checkUnsigned('len', len)
  checkUnsigned('offset', offset)
  let done = 0
  while (done < len) {
    const n = libc.preadAddr(fd, address + done, len - done, offset + done)
    if (n > 0) {
      done += n
    } else if (n === 0) {
      break
    } else {
      const errno = libc.lastErrno()
      if (errno !== Errno.EINTR) {
        throw new SysError('pread', errno, `reading ${len - done} bytes at offset ${offset + done} of fd ${fd} into ${hex(address + done)}`)
      }
    }
  }
  return done
}

/**
 * fsync(2) of a directory, so that a rename or create inside it survives a crash. Node has no
 * call for it, but opening a directory read-only and fsyncing that fd works on Linux.
 */
export function fsyncDir(path: string): void {
  let fd: number
  try {
    fd = openSync(path, 'r')
  } catch (error) {
    rethrowAsSysError(error, 'open', `opening directory ${path} to fsync it`)
  }
  try {
    fsyncSync(fd)
  } catch (error) {
    rethrowAsSysError(error, 'fsync', `syncing directory ${path}`)
  } finally {
    closeSync(fd)
  }
}

/**
 * A second descriptor (close-on-exec) for the open file behind `fd`: closing either leaves the
 * file open through the other.
 */
export function dupFd(fd: number, step: string): number {
  const copy = libc.fcntl(fd, F_DUPFD_CLOEXEC, 0)
  if (copy < 0) libc.fail('fcntl', step)
  return copy
}

/**
 * Sets O_NONBLOCK on `fd`. The flag belongs to the open file, so a descriptor passed to us by
 * another process (a client's uffd) changes for its sender too: for a uffd that only means its
 * own reads no longer wait either.
 */
export function setNonBlocking(fd: number, step: string): void {
  const flags = libc.fcntl(fd, F_GETFL, 0)
  if (flags < 0) libc.fail('fcntl', step)
  if ((flags & O_NONBLOCK) !== 0) return
  if (libc.fcntl(fd, F_SETFL, flags | O_NONBLOCK) !== 0) libc.fail('fcntl', step)
}

/**
 * Has the kernel read the whole file behind `fd` (`size` bytes) into the page cache, `step` bytes
 * at a time, each asked for only once the one before it has been read (native/libuffd_preread,
 * on a libuv thread): other reads of the file then wait behind at most two steps, where a
 * WILLNEED of the whole file queues all of it ahead of them. Setting stop[0] ends it between
 * steps. Resolves with the bytes asked for; undefined when the library is not there (then use
 * adviseWillNeed).
 */
export function prereadPaced(fd: number, size: number, step: number, stop: Int32Array): Promise<number> | undefined {
  checkUnsigned('size', size)
  const paced = libc.prereadPacedNative()
  if (!paced) return undefined
  return new Promise((resolve, reject) => {
    // `stop` is read by the native loop until it returns: the closure keeps it alive until then.
    paced(fd, size, step, libc.addressOfView(stop), (error, result) => {
      void stop
      if (error) reject(error as Error)
      else if (result < 0) reject(new SysError('posix_fadvise', -result, 'reading ahead'))
      else resolve(result)
    })
  })
}

/**
 * Has the kernel read [offset, +length) of the file behind `fd` into the page cache
 * (posix_fadvise WILLNEED), from a libuv thread so the caller's thread never waits on the disk:
 * resolves once the reads are submitted, not when they complete. Pages already cached are left
 * as they are; the kernel may drop any of them again under memory pressure.
 */
export function adviseWillNeed(fd: number, offset: number, length: number): Promise<void> {
  checkUnsigned('offset', offset)
  checkUnsigned('length', length)
  return new Promise((resolve, reject) => {
    libc.posixFadviseAsync(fd, offset, length, POSIX_FADV_WILLNEED, (error, result) => {
      if (error) reject(error as Error)
      else if (result !== 0) reject(new SysError('posix_fadvise', result, `reading ahead at ${hex(offset)}`))
      else resolve()
    })
  })
}
