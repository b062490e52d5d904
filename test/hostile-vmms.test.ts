// `uffd resume` against real VMM-like processes (native/build/fc_client --hostile) that send a
// well-formed uffd and then misbehave: a handshake that never completes, a fault outside the
// regions announced, one uffd sent on two connections. Real handler processes, real uffds.
import {type ChildProcess} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {uffd} from './helpers/cli.js'
import {fcClientSkipReason, type Handler, startFcClient, startHandler} from './helpers/fc-handlers.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {makeImage, tempDir} from './helpers/images.js'
import {exitWithin, killAll, type Running, waitFor} from './helpers/processes.js'

const MiB = 1024 * 1024

const skip = fcClientSkipReason()
if (skip) console.warn(`test/hostile-vmms.test.ts skipped: ${skip}`)

const live = new Set<ChildProcess>()
afterEach(() => killAll(live))

let dir: string
let image: string
let snapshot: string
beforeAll(() => {
  if (skip) return
  dir = tempDir('uffd-hostile-vmm-')
  image = path.join(dir, 'mixed.raw')
  fs.writeFileSync(image, makeImage('mixed', 8 * MiB, 23))
  snapshot = path.join(dir, 'mixed.uffd')
  const made = uffd(['snapshot', '--mem-file', image, '-o', snapshot])
  if (made.status !== 0) throw new Error(`uffd snapshot failed:\n${made.stderr}`)
})
afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

const startResume = (args: string[]): Promise<Handler> => startHandler(live, dir, snapshot, args)
const startClient = (handler: Handler, args: string[], timeoutMs = 30_000): Running => startFcClient(live, handler, image, args, timeoutMs)

/** Whether process `pid` still runs (a zombie counts as gone). */
function alive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
  } catch {
    return false
  }
}

function headerCrcOf(file: string): number {
  const reader = SnapshotReader.open(file)
  try {
    return reader.header.headerCrc
  } finally {
    reader.close()
  }
}

/** Waits until the handler has accepted `count` connections in all (fdinfo cannot tell; its log cannot either): a short settle. */
async function settle(ms = 500): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms))
}

describe.skipIf(skip !== undefined)('a VMM whose handshake never completes', () => {
  it('--serve: refused at its deadline and killed; one still arriving at SIGTERM is killed too; the VMs beside them are served', async () => {
    const handler = await startResume(['--serve', '--timeout', '2', '--json'])
    const first = startClient(handler, ['--hostile', 'partial-handshake', '--touch', 'sequential'])
    const firstEnd = await exitWithin(first, 6_000, 'fc_client --hostile partial-handshake (refused at its deadline)')
    expect(firstEnd.signal, `${firstEnd.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe('SIGKILL')
    await waitFor('the kill to be logged', () => /killing the refused client \(pid \d+\)/.test(handler.proc.stderr()), 5_000)
    // (Logged after the kill: waited for, not expected at once, on a busy machine.)
    await waitFor('the refusal to be logged', () => /rejected a client: invalid handshake: the message was still incomplete after 2 s/.test(handler.proc.stderr()), 5_000)
    const vm = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(vm.code, `${vm.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    const second = startClient(handler, ['--hostile', 'partial-handshake', '--touch', 'sequential'])
    await settle()
    expect(second.exited).toBe(false)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
    expect(resume.code, resume.stderr).toBe(130)
    const secondEnd = await exitWithin(second, 3_000, 'fc_client --hostile partial-handshake (handler stopped)')
    expect(secondEnd.signal).toBe('SIGKILL')
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited'}])
    // Only the refusal counts: a handshake cut short by stopping is not the peer's fault.
    expect(resume.json.rejected.map((r: {code: string}) => r.code)).toEqual(['BAD_HANDSHAKE'])
    expect(resume.stderr).toMatch(/no longer taking clients: closing a handshake still arriving \(pid \d+\), whose uffd came/)
  })

  it('one client: stopped with SIGINT while its handshake arrives, the VMM is killed; with --no-kill it is left alone', async () => {
    for (const kill of [true, false]) {
      const handler = await startResume(kill ? [] : ['--no-kill'])
      const client = startClient(handler, ['--hostile', 'partial-handshake', '--touch', 'sequential'])
      await settle()
      handler.proc.child.kill('SIGINT')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGINT)')
      expect(resume.code, resume.stderr).toBe(130)
      if (kill) {
        const end = await exitWithin(client, 3_000, 'fc_client --hostile partial-handshake')
        expect(end.signal, resume.stderr).toBe('SIGKILL')
        expect(resume.stderr).toMatch(/killing the refused client \(pid \d+\)/)
      } else {
        await settle()
        expect(alive(client.child.pid!), 'with --no-kill the client is not killed').toBe(true)
        expect(resume.stderr).not.toMatch(/killing/)
      }
    }
  })

  it('one client: a VMM still sending its handshake when another is taken is killed, the one taken is served', async () => {
    const handler = await startResume([])
    const partial = startClient(handler, ['--hostile', 'partial-handshake', '--touch', 'sequential'])
    await settle()
    const vm = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(vm.code, `${vm.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    const end = await exitWithin(partial, 5_000, 'fc_client --hostile partial-handshake')
    expect(end.signal).toBe('SIGKILL')
    const resume = await exitWithin(handler.proc, 10_000, 'uffd resume')
    expect(resume.code, resume.stderr).toBe(0)
  })
})

describe.skipIf(skip !== undefined)('a VMM accepted, then found unservable', () => {
  it('a fault outside its announced regions: the VMM is killed through its pidfd, the next VM served; with --no-kill it is reported frozen, not running', async () => {
    const handler = await startResume(['--serve', '--json'])
    const hostile = startClient(handler, ['--hostile', 'fault-outside', '--touch', 'sequential'])
    const end = await exitWithin(hostile, 10_000, 'fc_client --hostile fault-outside')
    expect(end.signal, `${end.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe('SIGKILL')
    expect(handler.proc.stderr()).toMatch(/client 1: fault at 0x[0-9a-f]+ lies outside every memory region the client announced/)
    const vm = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(vm.code, `${vm.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
    expect(resume.json.clients).toMatchObject([
      {id: 1, ended: 'killed', error: {code: 'FAULT_OUTSIDE_REGIONS'}},
      {id: 2, ended: 'exited'},
    ])

    // --no-kill: the client is left frozen and says so in the live statistics' client list, at
    // once; it is no longer one of the clients being served when the handler stops.
    const frozenHandler = await startResume(['--serve', '--no-kill', '--json'])
    const frozen = startClient(frozenHandler, ['--hostile', 'fault-outside', '--touch', 'sequential'])
    await waitFor('the client to be left frozen', () => /client 1 left frozen \(--no-kill\)/.test(frozenHandler.proc.stderr()), 10_000)
    expect(alive(frozen.child.pid!)).toBe(true)
    frozenHandler.proc.child.kill('SIGTERM')
    const stopped = await exitWithin(frozenHandler.proc, 5_000, 'uffd resume --no-kill (SIGTERM)')
    expect(stopped.json.clients).toMatchObject([{id: 1, ended: 'frozen', error: {code: 'FAULT_OUTSIDE_REGIONS'}}])
    expect(alive(frozen.child.pid!), '--no-kill: not killed').toBe(true)
  })

  it('one client, --no-kill: the handler waits for the frozen client to exit and ends with its error', async () => {
    const handler = await startResume(['--no-kill', '--json'])
    const frozen = startClient(handler, ['--hostile', 'fault-outside', '--touch', 'sequential'])
    await waitFor('the client to be left frozen', () => /client 1 left frozen/.test(handler.proc.stderr()), 10_000)
    await settle()
    expect(handler.proc.exited, 'it still holds the frozen client\'s uffd').toBe(false)
    frozen.child.kill('SIGKILL')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume')
    expect(resume.code).toBe(1)
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited', error: {code: 'FAULT_OUTSIDE_REGIONS'}}])
  })
})

describe.skipIf(skip !== undefined)('a VMM whose memory is not registered with the uffd it sends', () => {
  it('--serve --populate all: the first fill finds it unregistered (ENOENT, its process alive): killed and reported so, not left running; the next VM served', async () => {
    const handler = await startResume(['--serve', '--populate', 'all', '--json'])
    // It would stay 20 s: long past what the handler needs to find it out.
    const hostile = startClient(handler, ['--hostile', 'unregistered', '--hold-ms', '20000'])
    const end = await exitWithin(hostile, 8_000, 'fc_client --hostile unregistered')
    expect(end.signal, `${end.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe('SIGKILL')
    expect(handler.proc.stderr()).toMatch(/client 1: uffd: UFFDIO_(COPY|ZEROPAGE) failed while installing client 1's memory at 0x[0-9a-f]+ \(ENOENT: not registered with the uffd it sent/)
    const vm = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(vm.code, `${vm.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 2 ended (exited)'), 5_000)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
    expect(resume.json.clients).toMatchObject([
      {id: 1, ended: 'killed', error: {code: 'ENOENT'}},
      {id: 2, ended: 'exited'},
    ])
  })

  it('one client, --no-kill, its working set installed at connect: reported frozen at once, and the run ends with its error when it exits', async () => {
    const pages = Array.from({length: 300}, (_, i) => (i * 7) % 2048)
    const withSet = path.join(dir, 'with-set.uffd')
    fs.writeFileSync(path.join(dir, 'set.ws'), JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 8 * MiB, pageSize: 4096, headerCrc: headerCrcOf(snapshot)}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    const attached = uffd(['working-set', 'attach', snapshot, path.join(dir, 'set.ws'), '-o', withSet])
    expect(attached.status, attached.stderr).toBe(0)
    const handler = await startHandler(live, dir, withSet, ['--no-kill', '--json'])
    const frozen = startClient(handler, ['--hostile', 'unregistered', '--hold-ms', '20000'])
    await waitFor('the client to be left frozen', () => /client 1 left frozen/.test(handler.proc.stderr()), 8_000)
    expect(handler.proc.stderr()).toMatch(/\(ENOENT: not registered with the uffd it sent/)
    expect(alive(frozen.child.pid!), '--no-kill: not killed').toBe(true)
    frozen.child.kill('SIGKILL')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume')
    expect(resume.code).toBe(1)
    expect(resume.json.error.code).toBe('ENOENT')
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited', error: {code: 'ENOENT'}}])
  })

  it('a VMM that exits right after sending it, before anything is filled: ended as exited, no error', async () => {
    const handler = await startResume(['--json'])
    const gone = await exitWithin(startClient(handler, ['--hostile', 'unregistered']), 5_000, 'fc_client --hostile unregistered')
    expect(gone.code).toBe(0)
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume')
    expect(resume.code, resume.stderr).toBe(0)
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited'}])
    expect(resume.json.error).toBeUndefined()
  })
})

describe.skipIf(skip !== undefined)('pidfds taken without SO_PEERPIDFD (UFFD_PEERPIDFD=0: pidfd_open of the peer\'s pid, as before Linux 6.5)', () => {
  it('--serve: a refused VMM and one found unservable are killed through those pidfds; the VM beside them is served', async () => {
    const handler = await startHandler(live, dir, snapshot, ['--serve', '--json'], {UFFD_PEERPIDFD: '0'})
    // A well-formed handshake that does not fit the snapshot (16 MiB of memory, 8 MiB served): refused.
    const refused = await exitWithin(startClient(handler, ['--size', '16M', '--regions', '2', '--count', '1']), 10_000, 'fc_client (refused)')
    expect(refused.signal, `${refused.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe('SIGKILL')
    await waitFor('the kill to be logged', () => /killing the refused client \(pid \d+\)/.test(handler.proc.stderr()), 5_000)
    // (Logged once the session is up, after the socket listens.)
    expect(handler.proc.stderr()).toMatch(/UFFD_PEERPIDFD=0: each client's pidfd is taken with pidfd_open of its pid/)
    // Accepted, then unservable: killed through the pidfd its lifeline holds.
    const outside = await exitWithin(startClient(handler, ['--hostile', 'fault-outside', '--touch', 'sequential']), 10_000, 'fc_client --hostile fault-outside')
    expect(outside.signal, `${outside.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe('SIGKILL')
    const vm = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(vm.code, `${vm.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 2 ended (exited)'), 5_000)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
    // (A client that failed once accepted is the run's error: exit 1, interrupted.)
    expect(resume.json.interrupted, resume.stderr).toBe(true)
    expect(resume.json.rejected.map((r: {code: string}) => r.code)).toEqual(['BAD_HANDSHAKE'])
    // Ended through the pidfd (its exit seen on it), not by its socket closing.
    expect(resume.json.clients).toMatchObject([
      {id: 1, ended: 'killed', error: {code: 'FAULT_OUTSIDE_REGIONS'}},
      {id: 2, ended: 'exited'},
    ])
  })
})

describe.skipIf(skip !== undefined)('one userfaultfd on two connections', () => {
  it('a VMM that dup()s its uffd and connects twice is served once; the second connection is refused, and nobody is killed', async () => {
    const handler = await startResume(['--serve', '--json'])
    const client = await exitWithin(startClient(handler, ['--hostile', 'connect-twice', '--touch', 'random', '--verify-all']), 20_000, 'fc_client --hostile connect-twice')
    expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    expect(client.json).toMatchObject({ok: true, verify_errors: 0})
    await waitFor('the refusal to be logged', () => /rejected a client: invalid handshake: the userfaultfd that came with the message is the one client 1 is already served through \(sent again by the same process\)/.test(handler.proc.stderr()), 5_000)
    await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 1 ended (exited)'), 5_000)
    // Once client 1 has ended, its uffd is no longer one being served: a new VM is taken as usual.
    const next = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
    expect(next.code, next.stderr).toBe(0)
    // Its exit seen by the handler before it is stopped (else stopping kills what it takes for a live VM).
    await waitFor('the second VM to be noticed gone', () => handler.proc.stderr().includes('client 2 ended (exited)'), 5_000)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
    expect(resume.code, resume.stderr).toBe(130)
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited'}, {id: 2, ended: 'exited'}])
    expect(resume.json.rejected).toMatchObject([{code: 'BAD_HANDSHAKE'}])
    expect(resume.stderr).not.toMatch(/killing/)
  })
})
