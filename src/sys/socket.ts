// Unix stream sockets through libc, because Node's `net` cannot send or receive file descriptors
// (SCM_RIGHTS), and the Firecracker handshake hands the handler its uffd that way. Also
// SO_PEERCRED (the VMM's pid) and a socket-file setup that never exposes a half-made socket.
//
// All fds are plain numbers owned by the caller; close them with closeFd(). Every fd created or
// received here is close-on-exec.

import {chmodSync, lstatSync, renameSync, unlinkSync} from 'node:fs'
import {randomBytes} from 'node:crypto'
import {dirname, join} from 'node:path'
import {performance} from 'node:perf_hooks'

import {Errno, SysError, rethrowAsSysError} from './errors.js'
import * as libc from './libc.js'
import {POLLIN, POLLOUT, poll} from './poll.js'
import {IOVEC_LAYOUT, RawStruct} from './raw.js'

export const AF_UNIX = 1
export const SOCK_STREAM = 1
export const SOCK_CLOEXEC = 0o2000000
export const SOCK_NONBLOCK = 0o4000
export const SOL_SOCKET = 1
export const SO_PEERCRED = 17
/** Linux >= 6.5: a pidfd for the peer process, taken from the credentials of connect(). */
export const SO_PEERPIDFD = 77
export const SCM_RIGHTS = 1
export const MSG_CTRUNC = 0x8
export const MSG_DONTWAIT = 0x40
export const MSG_NOSIGNAL = 0x4000
export const MSG_CMSG_CLOEXEC = 0x4000_0000

export const SOCKADDR_UN_LAYOUT = {size: 110, family: 0, path: 2} as const
export const MSGHDR_LAYOUT = {size: 56, name: 0, namelen: 8, iov: 16, iovlen: 24, control: 32, controllen: 40, flags: 48} as const
/** struct cmsghdr; `data` is CMSG_LEN(0), `align` is CMSG_ALIGN(1) (records are 8-byte aligned). */
export const CMSGHDR_LAYOUT = {size: 16, len: 0, level: 8, type: 12, data: 16, align: 8} as const
export const UCRED_LAYOUT = {size: 12, pid: 0, uid: 4, gid: 8} as const

/** The kernel's limit on fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const MAX_FDS_PER_MESSAGE = 253
/** sun_path holds 108 bytes including the terminating NUL. */
const MAX_PATH_BYTES = SOCKADDR_UN_LAYOUT.size - SOCKADDR_UN_LAYOUT.path - 1

function cmsgSpace(dataBytes: number): number {
  const a = CMSGHDR_LAYOUT.align
  return CMSGHDR_LAYOUT.data + Math.ceil(dataBytes / a) * a
}

// Structs for sendmsg/recvmsg/getsockopt, one set per thread. They embed each other's addresses
// (msghdr -> iovec, msghdr -> control), so they must not move: RawStruct memory never does.
const msghdr = new RawStruct(MSGHDR_LAYOUT.size)
const iovec = new RawStruct(IOVEC_LAYOUT.size)
const control = new RawStruct(cmsgSpace(4 * MAX_FDS_PER_MESSAGE))
const ucred = new RawStruct(UCRED_LAYOUT.size)
const ucredLength = new Uint32Array(1)

export interface ListenOptions {
  /** Permission bits of the socket file; connecting needs write permission. Default 0o600. */
  mode?: number
  /** listen(2) backlog. Default 16. */
  backlog?: number
}

/**
 * Creates a listening Unix stream socket at `path` and returns its fd (non-blocking, for
 * acceptUnix). The socket is bound under a temporary name in the same directory, chmod'ed to
 * `mode` and put in the listening state, then renamed over `path`: a client never finds the path
 * with the wrong permissions or not yet accepting. An existing socket file at `path` is replaced
 * only if stale (connecting to it is refused); a live one fails with EADDRINUSE, and anything
 * that is not a socket fails with EEXIST and is left alone.
 */
export function listenUnix(path: string, options: ListenOptions = {}): number {
  const mode = options.mode ?? 0o600
  const backlog = options.backlog ?? 16
  const step = `listening on ${path}`
  sockaddrUn(path) // validates the length before touching the filesystem
  checkReplaceable(path, step)
  const temporary = join(dirname(path), `.uffd-${process.pid}-${randomBytes(6).toString('hex')}.sock`)
  const address = sockaddrUn(temporary)
  const fd = libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)
  if (fd < 0) libc.fail('socket', step)
  let bound = false
  try {
    if (libc.bind(fd, address.bytes, address.length) !== 0) libc.fail('bind', `${step} (binding ${temporary})`)
    bound = true
    try {
      chmodSync(temporary, mode)
    } catch (error) {
      rethrowAsSysError(error, 'chmod', `${step} (chmod ${mode.toString(8)} ${temporary})`)
    }
    if (libc.listen(fd, backlog) !== 0) libc.fail('listen', step)
    try {
      renameSync(temporary, path)
    } catch (error) {
      rethrowAsSysError(error, 'rename', `${step} (renaming ${temporary})`)
    }
    return fd
  } catch (error) {
    libc.close(fd)
    if (bound) unlinkQuietly(temporary)
    throw error
  }
}

function checkReplaceable(path: string, step: string): void {
  let isSocket: boolean
  try {
    isSocket = lstatSync(path).isSocket()
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return
    rethrowAsSysError(error, 'lstat', step)
  }
  if (!isSocket) throw new SysError('bind', Errno.EEXIST, step, `${path} exists and is not a socket; refusing to replace it`)
  // A socket file outlives its process. It is stale if nothing accepts connections on it. The
  // probe is non-blocking so that a live listener with a full backlog (EAGAIN) cannot stall us.
  const probe = libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)
  if (probe < 0) libc.fail('socket', step)
  try {
    const address = sockaddrUn(path)
    if (libc.connect(probe, address.bytes, address.length) === 0) {
      throw new SysError('bind', Errno.EADDRINUSE, step, `another process is listening on ${path}`)
    }
    const errno = libc.lastErrno()
    if (errno === Errno.EAGAIN) throw new SysError('bind', Errno.EADDRINUSE, step, `another process is listening on ${path}`)
    if (errno !== Errno.ECONNREFUSED) throw new SysError('connect', errno, `${step} (probing the existing socket)`)
  } finally {
    libc.close(probe)
  }
}

/**
 * Accepts one connection on a socket from listenUnix, waiting up to `timeoutMs` (-1: forever).
 * Returns the connection's fd (blocking, close-on-exec), or null on timeout.
 */
export function acceptUnix(listenFd: number, timeoutMs: number): number | null {
  const deadline = deadlineAfter(timeoutMs)
  for (;;) {
    const fd = libc.accept4(listenFd, 0, 0, SOCK_CLOEXEC)
    if (fd >= 0) return fd
    const errno = libc.lastErrno()
    // ECONNABORTED: a client gave up between poll and accept; wait for the next one.
    if (errno !== Errno.EAGAIN && errno !== Errno.EINTR && errno !== Errno.ECONNABORTED) {
      throw new SysError('accept4', errno, `accepting a connection on fd ${listenFd}`)
    }
    const remaining = remainingMs(deadline)
    if (remaining === 0) return null
    poll([{fd: listenFd, events: POLLIN}], remaining)
  }
}

/** Connects a blocking, close-on-exec Unix stream socket to `path` and returns its fd. */
export function connectUnix(path: string): number {
  const step = `connecting to ${path}`
  const address = sockaddrUn(path)
  const fd = libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)
  if (fd < 0) libc.fail('socket', step)
  if (libc.connect(fd, address.bytes, address.length) !== 0) {
    const errno = libc.lastErrno()
    libc.close(fd)
    throw new SysError('connect', errno, step)
  }
  return fd
}

export interface Received {
  /** The bytes received; empty at end of stream (the peer closed its end). */
  data: Buffer
  /** The fds that came with them, in the order sent; close-on-exec, owned by the caller. */
  fds: number[]
}

/**
 * Receives up to `maxBytes` and up to `maxFds` SCM_RIGHTS fds in one recvmsg, waiting up to
 * `timeoutMs` (-1: forever) for data; on timeout throws SysError ETIMEDOUT. On a stream socket
 * the fds arrive with the first byte of the sendmsg that carried them. If the peer sent more fds
 * than `maxFds`, the kernel truncates the control data (MSG_CTRUNC) and drops what did not fit;
 * the ones received are closed too and SysError EMSGSIZE is thrown: the message is unusable.
 */
export function recvWithFds(fd: number, maxBytes: number, maxFds: number, timeoutMs: number): Received {
  checkCount('maxBytes', maxBytes, 1, 0x7fff_ffff)
  checkCount('maxFds', maxFds, 1, MAX_FDS_PER_MESSAGE)
  const step = `receiving a message with file descriptors on fd ${fd}`
  const data = Buffer.alloc(maxBytes)
  const controlLength = cmsgSpace(4 * maxFds)
  control.bytes.fill(0, 0, controlLength)
  setMessage(data, maxBytes, controlLength)
  const deadline = deadlineAfter(timeoutMs)
  let n: number
  for (;;) {
    n = libc.recvmsg(fd, msghdr.bytes, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
    if (n >= 0) break
    const errno = libc.lastErrno()
    if (errno === Errno.EINTR) continue
    if (errno !== Errno.EAGAIN) throw new SysError('recvmsg', errno, step)
    const remaining = remainingMs(deadline)
    if (remaining === 0) throw new SysError('recvmsg', Errno.ETIMEDOUT, step, `nothing received within ${timeoutMs} ms`)
    poll([{fd, events: POLLIN}], remaining)
  }
  const fds = parseRights(msghdr.get64(MSGHDR_LAYOUT.controllen))
  // The control buffer can hold one fd more than asked (records are 8-byte aligned), so check
  // the count as well as the kernel's truncation flag.
  if ((msghdr.view.getInt32(MSGHDR_LAYOUT.flags, true) & MSG_CTRUNC) !== 0 || fds.length > maxFds) {
    for (const received of fds) libc.close(received)
    throw new SysError(
      'recvmsg',
      Errno.EMSGSIZE,
      step,
      `the peer sent more than ${maxFds} file descriptor(s); closed the ${fds.length} received`,
    )
  }
  return {data: data.subarray(0, n), fds}
}

/** The fds of every SCM_RIGHTS record in the first `length` bytes of `control`. */
function parseRights(length: number): number[] {
  const fds: number[] = []
  const view = control.view
  const C = CMSGHDR_LAYOUT
  for (let offset = 0; offset + C.data <= length; ) {
    const recordLength = control.get64(offset + C.len)
    if (recordLength < C.data || offset + recordLength > length) break
    if (view.getInt32(offset + C.level, true) === SOL_SOCKET && view.getInt32(offset + C.type, true) === SCM_RIGHTS) {
      for (let at = offset + C.data; at + 4 <= offset + recordLength; at += 4) fds.push(view.getInt32(at, true))
    }
    offset += Math.ceil(recordLength / C.align) * C.align
  }
  return fds
}

/**
 * Sends `data` (at least one byte: on a stream socket the fds ride on data) with `fds` attached
 * as one SCM_RIGHTS record. The fds stay open here; the peer gets duplicates. Blocks until all
 * of `data` is written.
 */
export function sendWithFds(fd: number, data: Buffer, fds: readonly number[]): void {
  checkCount('data length', data.length, 1, 0x7fff_ffff)
  checkCount('number of fds', fds.length, 1, MAX_FDS_PER_MESSAGE)
  const step = `sending ${fds.length} file descriptor(s) on fd ${fd}`
  const C = CMSGHDR_LAYOUT
  const controlLength = cmsgSpace(4 * fds.length)
  control.bytes.fill(0, 0, controlLength)
  control.set64(C.len, C.data + 4 * fds.length)
  control.view.setInt32(C.level, SOL_SOCKET, true)
  control.view.setInt32(C.type, SCM_RIGHTS, true)
  fds.forEach((passed, i) => {
    checkCount('fd', passed, 0, 0x7fff_ffff)
    control.view.setInt32(C.data + 4 * i, passed, true)
  })
  setMessage(data, data.length, controlLength)
  let n: number
  for (;;) {
    // MSG_NOSIGNAL: a closed peer gives EPIPE rather than SIGPIPE.
    n = libc.sendmsg(fd, msghdr.bytes, MSG_NOSIGNAL)
    if (n >= 0) break
    const errno = libc.lastErrno()
    if (errno === Errno.EAGAIN) poll([{fd, events: POLLOUT}], -1)
    else if (errno !== Errno.EINTR) throw new SysError('sendmsg', errno, step)
  }
  // A stream socket may take part of the data; the fds went with the part sent.
  if (n < data.length) writeAll(fd, data.subarray(n))
}

function setMessage(data: Buffer, dataLength: number, controlLength: number): void {
  iovec.set64(IOVEC_LAYOUT.base, libc.addressOfView(data))
  iovec.set64(IOVEC_LAYOUT.len, dataLength)
  const M = MSGHDR_LAYOUT
  msghdr.bytes.fill(0)
  msghdr.set64(M.iov, iovec.address)
  msghdr.set64(M.iovlen, 1)
  msghdr.set64(M.control, control.address)
  msghdr.set64(M.controllen, controlLength)
}

export interface PeerCredentials {
  pid: number
  uid: number
  gid: number
}

/** The pid, uid and gid of the process at the other end of a connected Unix socket (SO_PEERCRED, as of connect()). */
export function peerCredentials(fd: number): PeerCredentials {
  ucredLength[0] = UCRED_LAYOUT.size
  if (libc.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred.bytes, ucredLength) !== 0) {
    libc.fail('getsockopt', `reading the peer credentials of fd ${fd}`)
  }
  const view = ucred.view
  return {
    pid: view.getInt32(UCRED_LAYOUT.pid, true),
    uid: view.getUint32(UCRED_LAYOUT.uid, true),
    gid: view.getUint32(UCRED_LAYOUT.gid, true),
  }
}

const pidfdValue = new RawStruct(4)
const pidfdLength = new Uint32Array(1)

/**
 * A pidfd (close-on-exec) for the process at the other end of a connected Unix socket
 * (SO_PEERPIDFD): the process that connected, for good, whatever its pid becomes. Throws SysError:
 * ENOPROTOOPT before Linux 6.5; ENODATA if the peer has no process (a socketpair made in the
 * kernel); ESRCH or EINVAL if it has exited and the kernel keeps no pidfd for it.
 */
export function peerPidfd(fd: number): number {
  pidfdLength[0] = 4
  if (libc.getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, pidfdValue.bytes, pidfdLength) !== 0) {
    libc.fail('getsockopt', `reading the peer pidfd of fd ${fd}`)
  }
  return pidfdValue.view.getInt32(0, true)
}

/**
 * Reads what is available, up to `max` bytes, waiting up to `timeoutMs` (-1: forever) for
 * something to read; returns an empty Buffer at end of file, throws SysError ETIMEDOUT on timeout.
 */
export function readSome(fd: number, max: number, timeoutMs = -1): Buffer {
  checkCount('max', max, 1, 0x7fff_ffff)
  const step = `reading from fd ${fd}`
  const buffer = Buffer.alloc(max)
  const deadline = deadlineAfter(timeoutMs)
  for (;;) {
    const remaining = remainingMs(deadline)
    const ready = poll([{fd, events: POLLIN}], remaining)[0] ?? 0
    if (ready === 0) {
      if (remaining === 0) throw new SysError('read', Errno.ETIMEDOUT, step, `nothing to read within ${timeoutMs} ms`)
      continue // EINTR
    }
    const n = libc.read(fd, buffer, max)
    if (n >= 0) return buffer.subarray(0, n)
    const errno = libc.lastErrno()
    if (errno !== Errno.EAGAIN && errno !== Errno.EINTR) throw new SysError('read', errno, step)
  }
}

/** Writes all of `data`, retrying short writes and EINTR, waiting for room if the fd is non-blocking. */
export function writeAll(fd: number, data: Uint8Array): void {
  let done = 0
  while (done < data.length) {
    const n = libc.write(fd, done === 0 ? data : data.subarray(done), data.length - done)
    if (n >= 0) {
      done += n
      continue
    }
    const errno = libc.lastErrno()
    if (errno === Errno.EAGAIN) poll([{fd, events: POLLOUT}], -1)
    else if (errno !== Errno.EINTR) throw new SysError('write', errno, `writing ${data.length - done} bytes to fd ${fd}`)
  }
}

/**
 * close(2). EINTR is ignored: Linux releases the fd before it can be interrupted, so retrying
 * could close an fd another thread just opened. Throws on EBADF (a double close is a bug).
 */
export function closeFd(fd: number): void {
  if (libc.close(fd) === 0) return
  const errno = libc.lastErrno()
  if (errno !== Errno.EINTR) throw new SysError('close', errno, `closing fd ${fd}`)
}

/**
 * Removes `path` if it is a socket file (what a listener leaves behind); returns whether it did.
 * A missing path or any other kind of file is left alone.
 */
export function unlinkIfSocket(path: string): boolean {
  const step = `removing the socket file ${path}`
  try {
    if (!lstatSync(path).isSocket()) return false
    unlinkSync(path)
    return true
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false
    rethrowAsSysError(error, 'unlink', step)
  }
}

function unlinkQuietly(path: string): void {
  try {
    unlinkSync(path)
  } catch {
    // Best effort while already failing: the original error is the one worth reporting.
  }
}

function sockaddrUn(path: string): {bytes: Buffer; length: number} {
  const encoded = Buffer.from(path, 'utf8')
  if (encoded.length === 0 || encoded.length > MAX_PATH_BYTES || encoded.includes(0)) {
    throw new RangeError(`socket path must be 1 to ${MAX_PATH_BYTES} bytes without NUL, got ${encoded.length} bytes: ${path}`)
  }
  const bytes = Buffer.alloc(SOCKADDR_UN_LAYOUT.size)
  bytes.writeUInt16LE(AF_UNIX, SOCKADDR_UN_LAYOUT.family)
  encoded.copy(bytes, SOCKADDR_UN_LAYOUT.path)
  return {bytes, length: SOCKADDR_UN_LAYOUT.path + encoded.length + 1}
}

function checkCount(what: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${what} must be an integer in [${min}, ${max}], got ${value}`)
  }
}

/** A deadline on the monotonic clock; Infinity for a negative timeout (wait forever). */
function deadlineAfter(timeoutMs: number): number {
  if (!Number.isInteger(timeoutMs) || timeoutMs < -1) throw new RangeError(`timeout must be an integer >= -1 ms, got ${timeoutMs}`)
  return timeoutMs < 0 ? Infinity : performance.now() + timeoutMs
}

/** Milliseconds left before `deadline` for poll(): -1 for no deadline, 0 once passed. */
function remainingMs(deadline: number): number {
  if (deadline === Infinity) return -1
  return Math.max(0, Math.ceil(deadline - performance.now()))
}
