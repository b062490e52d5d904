// How the handler takes a client's pidfd (src/resume/main/peer.ts): SO_PEERPIDFD, or pidfd_open of
// the SO_PEERCRED pid on kernels before 6.5 (forced with peerOf's second argument here, and with
// UFFD_PEERPIDFD=0 for a whole handler in test/hostile-vmms.test.ts). Real sockets, real pidfds.
import {mkdtempSync, readFileSync, rmSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {join} from 'node:path'

import {afterEach, beforeEach, describe, expect, it} from 'vitest'

import {afterPeerPidfd, peerOf} from '../src/resume/main/peer.js'
import {acceptUnix, closeFd, connectUnix, listenUnix} from '../src/sys/index.js'

let dir: string
const fds: number[] = []
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'uffd-peer-'))
})
afterEach(() => {
  for (const fd of fds.splice(0)) closeFd(fd)
  rmSync(dir, {recursive: true, force: true})
})

/** The process a pidfd names, as its fdinfo says. */
function pidOf(pidfd: number): number {
  return Number(/^Pid:\s*(-?\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8'))?.[1])
}

describe('afterPeerPidfd: what SO_PEERPIDFD\'s answer leaves to do', () => {
  it('keeps a pidfd; takes one later when out of descriptors or memory; else opens the pid it connected with', () => {
    expect(afterPeerPidfd(7)).toBe('have')
    expect(afterPeerPidfd(0)).toBe('have')
    for (const code of ['EMFILE', 'ENFILE', 'ENOMEM']) expect(afterPeerPidfd(code), code).toBe('later')
    // ENOPROTOOPT: a kernel before 6.5; the others: no pidfd for the peer.
    for (const code of ['ENOPROTOOPT', 'ESRCH', 'EINVAL', 'ENODATA']) expect(afterPeerPidfd(code), code).toBe('by-pid')
  })
})

describe.skipIf(process.platform !== 'linux')('peerOf over a real connection', () => {
  it('with SO_PEERPIDFD and through the pidfd_open fallback alike: a pidfd naming the process that connected', () => {
    const listener = listenUnix(join(dir, 'peer.sock'))
    fds.push(listener)
    for (const peerPidfdFirst of [true, false]) {
      fds.push(connectUnix(join(dir, 'peer.sock')))
      const server = acceptUnix(listener, 5000)
      if (server === null) throw new Error('accept timed out')
      fds.push(server)
      const peer = peerOf(server, peerPidfdFirst)
      expect(peer.pid, `SO_PEERPIDFD first: ${peerPidfdFirst}`).toBe(process.pid)
      expect(peer.pidfd).toBeGreaterThanOrEqual(0)
      fds.push(peer.pidfd)
      expect(pidOf(peer.pidfd)).toBe(process.pid)
    }
  })
})
