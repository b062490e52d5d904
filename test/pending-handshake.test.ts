// A handshake given up on when the handler stops taking clients: whether its sender waits on
// memory nobody will serve (and is then killed) must not depend on whether the main thread had
// read the message yet. Real sockets, real userfaultfds.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {afterEach, beforeEach, describe, expect, it} from 'vitest'

import {PendingHandshake} from '../src/resume/main/pending-handshake.js'
import {peerOf} from '../src/resume/main/peer.js'
import {acceptUnix, closeFd, connectUnix, createEventfd, createUserfaultfd, isUserfaultfd, listenUnix, sendWithFds, uffdApi} from '../src/sys/index.js'
import {uffdUnavailableReason} from './helpers/uffd.js'

const skipReason = uffdUnavailableReason()
if (skipReason !== undefined) console.log(`[pending-handshake] skipping: ${skipReason}`)

let dir: string
const fds: number[] = []
const own = (fd: number): number => (fds.push(fd), fd)

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-pending-'))
})
afterEach(() => {
  for (const fd of fds.splice(0)) closeFd(fd)
  fs.rmSync(dir, {recursive: true, force: true})
})

/** A handshake accepted by the handler, nothing of it read yet, and the client's end. */
let sockets = 0
function accepted(): {handshake: PendingHandshake; client: number} {
  const at = path.join(dir, `h${sockets++}.sock`)
  const listener = own(listenUnix(at))
  const client = own(connectUnix(at))
  const server = acceptUnix(listener, 5000)
  if (server === null) throw new Error('accept timed out')
  own(server)
  const peer = peerOf(server)
  if (peer.pidfd >= 0) own(peer.pidfd)
  return {handshake: new PendingHandshake(server, peer, Infinity, 0), client}
}

describe.skipIf(skipReason !== undefined)('PendingHandshake.abandon', () => {
  it('an initialised uffd still unread in the socket means the sender waits (the VMM is then killed), and it is closed', () => {
    const {handshake, client} = accepted()
    const uffd = own(createUserfaultfd())
    uffdApi(uffd, 0)
    sendWithFds(client, Buffer.from('[{"base_host_virt_addr":'), [uffd])
    // The handler stops before its loop read anything of this connection.
    expect(handshake.abandon()).toBe(true)
    // What it received is closed: abandoning again finds nothing.
    expect(handshake.abandon()).toBe(false)
  })

  it('so does one already read; a uffd never initialised, another kind of fd or nothing at all does not', () => {
    const read = accepted()
    const uffd = own(createUserfaultfd())
    uffdApi(uffd, 0)
    sendWithFds(read.client, Buffer.from('[{"base_host'), [uffd])
    expect(read.handshake.step(true, Date.now()).state).toBe('reading')
    expect(read.handshake.abandon()).toBe(true)

    const raw = accepted()
    const fresh = own(createUserfaultfd())
    expect(isUserfaultfd(fresh)).toBe(true)
    sendWithFds(raw.client, Buffer.from('['), [fresh])
    expect(raw.handshake.abandon()).toBe(false)

    const other = accepted()
    sendWithFds(other.client, Buffer.from('['), [own(createEventfd())])
    expect(other.handshake.abandon()).toBe(false)

    expect(accepted().handshake.abandon()).toBe(false)
  })
})
