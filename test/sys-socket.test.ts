// src/sys/socket.ts: Unix sockets with SCM_RIGHTS fd passing, SO_PEERCRED, and the socket-file
// handling of listenUnix, over real sockets in a temporary directory.

import {closeSync, fstatSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {join} from 'node:path'
import {performance} from 'node:perf_hooks'

import {afterEach, beforeEach, describe, expect, it} from 'vitest'

import {
  Errno,
  SysError,
  acceptUnix,
  closeFd,
  connectUnix,
  createEventfd,
  listenUnix,
  peerCredentials,
  peerPidfd,
  readSome,
  recvWithFds,
  sendWithFds,
  unlinkIfSocket,
  writeAll,
} from '../src/sys/index.js'

let dir: string
const fds: number[] = []

/** Registers an fd for closing after the test. */
function own(fd: number): number {
  fds.push(fd)
  return fd
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'uffd-sys-socket-'))
})
afterEach(() => {
  for (const fd of fds.splice(0)) closeFd(fd)
  rmSync(dir, {recursive: true, force: true})
})

/** A connected (client, server) pair through a listening socket at `path`. */
function connectedPair(path = join(dir, 'handler.sock')): {client: number; server: number; listener: number} {
  const listener = own(listenUnix(path))
  const client = own(connectUnix(path))
  const server = acceptUnix(listener, 5000)
  if (server === null) throw new Error('accept timed out')
  own(server)
  return {client, server, listener}
}

/** Whether two fds refer to the same open file (same device and inode). */
function sameFile(a: number, b: number): boolean {
  const x = fstatSync(a)
  const y = fstatSync(b)
  return x.dev === y.dev && x.ino === y.ino
}

function catchError(run: () => unknown): unknown {
  try {
    run()
  } catch (error) {
    return error
  }
  throw new Error('expected an exception')
}

describe('listenUnix', () => {
  it('creates the socket file with the requested mode, only once it is listening', () => {
    const path = join(dir, 'a.sock')
    own(listenUnix(path))
    expect(statSync(path).isSocket()).toBe(true)
    expect(statSync(path).mode & 0o777).toBe(0o600)
    const other = join(dir, 'b.sock')
    own(listenUnix(other, {mode: 0o660}))
    expect(statSync(other).mode & 0o777).toBe(0o660)
    // No temporary names are left behind.
    expect(readdirSync(dir).sort()).toEqual(['a.sock', 'b.sock'])
  })

  it('replaces a stale socket file but not a live one, and never a non-socket', () => {
    const path = join(dir, 'handler.sock')
    closeFd(listenUnix(path)) // the process "died": its socket file remains, nobody listens
    const live = own(listenUnix(path))
    expect(catchError(() => listenUnix(path))).toMatchObject({code: 'EADDRINUSE', errno: Errno.EADDRINUSE})
    closeFd(fds.splice(fds.indexOf(live), 1)[0] ?? -1)

    const file = join(dir, 'data')
    writeFileSync(file, 'keep me')
    const error = catchError(() => listenUnix(file))
    expect(error).toBeInstanceOf(SysError)
    expect(error).toMatchObject({code: 'EEXIST', syscall: 'bind'})
    expect((error as Error).message).toContain('is not a socket')
    expect(statSync(file).isFile()).toBe(true)
  })

  it('rejects paths that do not fit in sockaddr_un', () => {
    expect(() => listenUnix(join(dir, 'x'.repeat(120)))).toThrow(RangeError)
  })
})

describe('accept, connect and peer credentials', () => {
  it('accepts a connection and reports the peer pid', () => {
    const {client, server} = connectedPair()
    expect(peerCredentials(server)).toEqual({pid: process.pid, uid: process.getuid?.(), gid: process.getgid?.()})
    expect(peerCredentials(client).pid).toBe(process.pid)
  })

  it('gives a pidfd for the peer process (SO_PEERPIDFD)', () => {
    const {server} = connectedPair()
    const pidfd = own(peerPidfd(server))
    expect(readlinkSync(`/proc/self/fd/${pidfd}`)).toBe('anon_inode:[pidfd]')
    expect(readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8')).toMatch(new RegExp(`^Pid:\\s+${process.pid}$`, 'm'))
  })

  it('returns null when nobody connects before the timeout', () => {
    const listener = own(listenUnix(join(dir, 'idle.sock')))
    const start = performance.now()
    expect(acceptUnix(listener, 100)).toBeNull()
    expect(performance.now() - start).toBeGreaterThanOrEqual(90)
  })

  it('fails to connect to a missing socket with ENOENT', () => {
    expect(catchError(() => connectUnix(join(dir, 'missing.sock')))).toMatchObject({syscall: 'connect', code: 'ENOENT'})
  })
})

describe('fd passing with SCM_RIGHTS', () => {
  it('passes one fd with its data', () => {
    const {client, server} = connectedPair()
    const file = openSync(join(dir, 'payload'), 'w+')
    try {
      sendWithFds(client, Buffer.from('[{"size":4096}]'), [file])
      const received = recvWithFds(server, 4096, 3, 5000)
      received.fds.forEach(own)
      expect(received.data.toString()).toBe('[{"size":4096}]')
      expect(received.fds).toHaveLength(1)
      expect(received.fds[0]).not.toBe(file)
      expect(sameFile(received.fds[0] ?? -1, file)).toBe(true)
    } finally {
      closeSync(file)
    }
  })

  it('passes three fds in order', () => {
    const {client, server} = connectedPair()
    const sent = ['uffd', 'memfd', 'bitmap'].map((name) => own(openSync(join(dir, name), 'w+')))
    sendWithFds(client, Buffer.from('x'), sent)
    const received = recvWithFds(server, 16, 3, 5000)
    received.fds.forEach(own)
    expect(received.data.toString()).toBe('x')
    expect(received.fds).toHaveLength(3)
    received.fds.forEach((fd, i) => {
      sent.forEach((original, j) => expect(sameFile(fd, original)).toBe(i === j))
    })
  })

  it('closes what it got and throws EMSGSIZE when more fds arrive than expected', () => {
    const {client, server} = connectedPair()
    const eventfds = [own(createEventfd()), own(createEventfd()), own(createEventfd())]
    // Three fds overflow the control buffer sized for one (MSG_CTRUNC; the kernel drops the excess).
    sendWithFds(client, Buffer.from('y'), eventfds)
    const truncated = catchError(() => recvWithFds(server, 16, 1, 5000))
    expect(truncated).toMatchObject({syscall: 'recvmsg', code: 'EMSGSIZE'})
    expect((truncated as Error).message).toMatch(/closed the \d received/)
    // Two fit in CMSG_SPACE(4) (records are 8-byte aligned) but are still more than asked for.
    sendWithFds(client, Buffer.from('z'), eventfds.slice(0, 2))
    expect((catchError(() => recvWithFds(server, 16, 1, 5000)) as Error).message).toContain('closed the 2 received')
  })

  it('returns empty data at end of stream and times out when nothing comes', () => {
    const {client, server} = connectedPair()
    expect(catchError(() => recvWithFds(server, 16, 1, 50))).toMatchObject({code: 'ETIMEDOUT'})
    closeFd(fds.splice(fds.indexOf(client), 1)[0] ?? -1)
    expect(recvWithFds(server, 16, 1, 5000)).toEqual({data: Buffer.alloc(0), fds: []})
  })

  it('carries plain data both ways with writeAll and readSome', () => {
    const {client, server} = connectedPair()
    const big = Buffer.alloc(1 << 20, 0xab)
    const chunks: Buffer[] = []
    // One thread plays both ends: write pieces small enough to fit in the socket buffer.
    for (let offset = 0; offset < big.length; offset += 64 * 1024) {
      writeAll(client, big.subarray(offset, offset + 64 * 1024))
      let got = 0
      while (got < 64 * 1024) {
        const chunk = readSome(server, 64 * 1024, 5000)
        got += chunk.length
        chunks.push(chunk)
      }
    }
    expect(Buffer.concat(chunks).equals(big)).toBe(true) // (toEqual on 1 MiB takes seconds)
    expect(catchError(() => readSome(server, 16, 20))).toMatchObject({code: 'ETIMEDOUT'})
  })
})

describe('unlinkIfSocket', () => {
  it('removes socket files only', () => {
    const path = join(dir, 'gone.sock')
    own(listenUnix(path))
    expect(unlinkIfSocket(path)).toBe(true)
    expect(unlinkIfSocket(path)).toBe(false)
    const file = join(dir, 'regular')
    writeFileSync(file, '')
    expect(unlinkIfSocket(file)).toBe(false)
    expect(statSync(file).isFile()).toBe(true)
  })
})
