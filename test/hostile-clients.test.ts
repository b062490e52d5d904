// `uffd resume` against peers that do not behave: connections that send nothing or dribble
// their handshake, a restore peer that hands over something other than a userfaultfd, and a
// snapshot file that fails under the handler. Real handler processes, real clients
// (native/build/fc_client), real sockets and uffds; this process plays the hostile peers.
import {type ChildProcess, execFileSync, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'

import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {FaultLoopHost} from '../src/resume/main/fault-loop-host.js'
import {type FromWorker, type GuestRegion} from '../src/resume/protocol.js'
import {closeFd, connectUnix, createUserfaultfd, isUserfaultfd, poll, POLLIN, readSome, sendWithFds, SysError, uffdApi, writeAll} from '../src/sys/index.js'
import {NATIVE, uffd, uffdSpawn} from './helpers/cli.js'
import {fcClientSkipReason, type Handler, startFcClient, startHandler} from './helpers/fc-handlers.js'
import {makeImage, tempDir} from './helpers/images.js'
import {exitWithin, killAll, type Running, track, waitFor} from './helpers/processes.js'

const MiB = 1024 * 1024

const skip = fcClientSkipReason()
if (skip) console.warn(`test/hostile-clients.test.ts skipped: ${skip}`)

const live = new Set<ChildProcess>()
afterEach(() => killAll(live))

let dir: string
let image: string
let snapshot: string
let names = 0
beforeAll(() => {
  dir = tempDir('uffd-hostile-')
  image = path.join(dir, 'mixed.raw')
  fs.writeFileSync(image, makeImage('mixed', 8 * MiB, 21))
  snapshot = path.join(dir, 'mixed.uffd')
  const made = uffd(['snapshot', '--mem-file', image, '-o', snapshot])
  if (made.status !== 0) throw new Error(`uffd snapshot failed:\n${made.stderr}`)
})
afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

const startResume = (file: string, args: string[]): Promise<Handler> => startHandler(live, dir, file, args)
const startClient = (handler: Handler, args: string[], timeoutMs = 15_000): Running => startFcClient(live, handler, image, args, timeoutMs)

/**
 * Whether the handler closed its end of `fd` (a read gives end of file, or ECONNRESET: closed with
 * bytes of ours still unread, the kernel resets the connection), without waiting.
 */
function closedByPeer(fd: number): boolean {
  if ((poll([{fd, events: POLLIN}], 0)[0] ?? 0) === 0) return false
  try {
    return readSome(fd, 4096, 0).length === 0
  } catch (error) {
    if (error instanceof SysError && error.code === 'ECONNRESET') return true
    throw error
  }
}

/**
 * A connection that sends nothing, made without blocking this process (a handler that stops
 * accepting would leave a blocking connect() waiting on a full backlog forever).
 */
interface Silent {
  socket: net.Socket
  /** Whether the handler has closed it. */
  closed: () => boolean
}

async function connectSilently(socketPath: string): Promise<Silent> {
  for (let attempt = 0; ; attempt++) {
    const socket = net.createConnection({path: socketPath})
    const connected = await new Promise<Error | undefined>((resolve) => {
      socket.once('connect', () => resolve(undefined))
      socket.once('error', resolve)
    })
    if (connected === undefined) {
      let closed = false
      socket.on('end', () => (closed = true))
      socket.on('close', () => (closed = true))
      socket.on('error', () => (closed = true))
      return {socket, closed: () => closed}
    }
    socket.destroy()
    // A full backlog: libuv reports EAGAIN instead of waiting for the handler to accept.
    if ((connected as NodeJS.ErrnoException).code !== 'EAGAIN' || attempt > 500) throw connected
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

describe.skipIf(skip !== undefined)('handshakes are read side by side, never waited for', () => {
  it('--serve --timeout 0: a connection that sends nothing holds up no VM, is refused after 10 s, and SIGTERM still exits 130 at once', async () => {
    const handler = await startResume(snapshot, ['--serve', '--timeout', '0', '--json'])
    const silent = await connectSilently(handler.socket)
    const connectedAt = Date.now()
    let lateSilent: Silent | undefined
    try {
      // Connected first, yet the VM behind it is served in full, twice over.
      for (const seed of [1, 2]) {
        const client = await exitWithin(startClient(handler, ['--touch', 'random', '--seed', String(seed), '--verify-all']), 20_000, 'fc_client')
        expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
        expect(client.json).toMatchObject({ok: true, verify_errors: 0})
      }
      expect(silent.closed(), 'the silent connection is still pending').toBe(false)
      // --timeout 0 waits forever for a client, but never for one connection's handshake.
      await waitFor('the silent connection to be refused', silent.closed, 15_000)
      const refusedAfter = Date.now() - connectedAt
      expect(refusedAfter).toBeGreaterThanOrEqual(9_500)
      expect(refusedAfter).toBeLessThan(13_000)
      // The socket closes before the handler's log line has come through its stderr pipe.
      await waitFor('the refusal to be logged', () => handler.proc.stderr().includes('rejected a client: a connection sent no handshake within 10 s'), 5_000)
      // Stopping with a connection still pending does not wait for it.
      lateSilent = await connectSilently(handler.socket)
      await new Promise((resolve) => setTimeout(resolve, 200))
      const signalledAt = Date.now()
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
      expect(Date.now() - signalledAt).toBeLessThan(2_000)
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json).toMatchObject({interrupted: true, clients: [{id: 1, ended: 'exited'}, {id: 2, ended: 'exited'}], rejected: [{code: 'TIMEOUT'}]})
      await waitFor('the pending connection to be closed at exit', lateSilent.closed, 2_000)
    } finally {
      silent.socket.destroy()
      lateSilent?.socket.destroy()
    }
  })

  it('a connection dribbling its handshake a byte at a time is refused when its own deadline passes, not later', async () => {
    const handler = await startResume(snapshot, ['--serve', '--timeout', '3', '--json'])
    const connection = connectUnix(handler.socket)
    const fake = fs.openSync('/dev/null', 'r')
    const connectedAt = Date.now()
    let sent = 0
    // '[' then spaces: never a whole JSON value, never more than the size limit.
    sendWithFds(connection, Buffer.from('['), [fake])
    const dribble = setInterval(() => {
      try {
        writeAll(connection, Buffer.from(' '))
        sent++
      } catch {
        clearInterval(dribble)
      }
    }, 50)
    try {
      // Served while the other connection is still dribbling, not after it.
      const client = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
      expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      expect(closedByPeer(connection), 'the dribbling connection is still pending').toBe(false)
      await waitFor('the dribbling connection to be refused', () => closedByPeer(connection), 10_000)
      const refusedAfter = Date.now() - connectedAt
      expect(sent, 'bytes kept coming until the end').toBeGreaterThan(20)
      expect(refusedAfter).toBeGreaterThanOrEqual(2_900)
      expect(refusedAfter).toBeLessThan(5_000)
      // The socket closes before the handler's log line has come through its stderr pipe.
      const refusal = /rejected a client: invalid handshake: the message was still incomplete after 3 s \(\d+ bytes\)/
      await waitFor('the refusal to be logged', () => refusal.test(handler.proc.stderr()), 5_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json).toMatchObject({clients: [{id: 1, ended: 'exited'}], rejected: [{code: 'BAD_HANDSHAKE'}]})
    } finally {
      clearInterval(dribble)
      closeFd(connection)
      fs.closeSync(fake)
    }
  })

  it('one client: a silent connection before it does not stop it being served, nor SIGINT being obeyed at once', async () => {
    const handler = await startResume(snapshot, [])
    const silent = await connectSilently(handler.socket)
    try {
      const client = await exitWithin(startClient(handler, ['--touch', 'sequential', '--verify-all']), 20_000, 'fc_client')
      expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      const resume = await exitWithin(handler.proc, 10_000, 'uffd resume')
      expect(resume.code, resume.stderr).toBe(0)
      await waitFor('the other connection to be closed once the client is taken', silent.closed, 2_000)
    } finally {
      silent.socket.destroy()
    }
    const second = await startResume(snapshot, [])
    const waiting = await connectSilently(second.socket)
    try {
      await new Promise((resolve) => setTimeout(resolve, 200))
      const signalledAt = Date.now()
      second.proc.child.kill('SIGINT')
      const resume = await exitWithin(second.proc, 5_000, 'uffd resume (SIGINT)')
      expect(Date.now() - signalledAt).toBeLessThan(2_000)
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.stderr).toContain('interrupted by SIGINT')
    } finally {
      waiting.socket.destroy()
    }
  })

  it('more connections pending than allowed: the oldest is refused, a VM arriving last is served', async () => {
    const handler = await startResume(snapshot, ['--serve', '--json'])
    const silent: Silent[] = []
    try {
      // One after another, so that the order they are accepted in is known.
      for (let i = 0; i < 70; i++) silent.push(await connectSilently(handler.socket))
      await waitFor('the six oldest to be refused', () => (handler.proc.stderr().match(/connections were sending their handshakes at once/g) ?? []).length === 6, 10_000)
      await waitFor('the oldest six to be closed', () => silent.slice(0, 6).every((c) => c.closed()), 2_000)
      expect(silent.slice(6).some((c) => c.closed()), 'the rest still pending').toBe(false)
      // One more connection refuses the oldest pending one, never the newcomer.
      const client = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
      expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      await waitFor('the next oldest to be closed', silent[6].closed, 2_000)
      await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 1 ended (exited)'), 5_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited'}])
      expect(resume.json.rejected).toHaveLength(7)
    } finally {
      for (const c of silent) c.socket.destroy()
    }
  })

  it('out of descriptors (EMFILE): accepting pauses and resumes, serving goes on, a VM connecting later is served', async () => {
    const handler = await startResume(snapshot, ['--serve', '--json'])
    const pid = handler.proc.child.pid!
    // Its threads open what they need as they start: wait for the count to settle.
    let open = -1
    await waitFor('its descriptors to settle', () => {
      const now = fs.readdirSync(`/proc/${pid}/fd`).length
      const settled = now === open
      open = now
      return settled
    }, 10_000, 300)
    const limit = /^Max open files\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]
    // Room for a few more descriptors only (soft limit): the silent connections below use them up.
    execFileSync('prlimit', ['--pid', String(pid), `--nofile=${open + 4}:`])
    const silent: Silent[] = []
    try {
      for (let i = 0; i < 8; i++) silent.push(await connectSilently(handler.socket))
      await waitFor('the handler to run out of descriptors', () => handler.proc.stderr().includes('cannot accept a connection now (EMFILE)'), 10_000)
      expect(handler.proc.exited).toBe(false)
      // Descriptors come back when the peers give up; the handler accepts again by itself.
      for (const c of silent.splice(0)) c.socket.destroy()
      execFileSync('prlimit', ['--pid', String(pid), `--nofile=${limit}:`])
      const client = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
      expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      expect(handler.proc.stderr().match(/cannot accept a connection now/g)).toHaveLength(1)
      await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 1 ended (exited)'), 5_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json.clients).toMatchObject([{id: 1, ended: 'exited'}])
    } finally {
      for (const c of silent) c.socket.destroy()
    }
  })
})

/** One uffd_msg as the kernel writes it for UFFD_EVENT_FORK: event 0x13, the child's uffd at offset 8. */
function forkRecord(ufd: number): Buffer {
  const record = Buffer.alloc(32)
  record[0] = 0x13
  record.writeUInt32LE(ufd, 8)
  return record
}

/** A FIFO opened read-write (so opening it waits for nobody), holding `bytes`. */
function fifoHolding(bytes: Buffer): number {
  const fifo = path.join(dir, `fifo-${names++}`)
  execFileSync('mkfifo', [fifo])
  const fd = fs.openSync(fifo, 'r+')
  fs.writeSync(fd, bytes)
  return fd
}

function escaped(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

function readableNow(fd: number): boolean {
  return (poll([{fd, events: POLLIN}], 0)[0] ?? 0) !== 0
}

describe.skipIf(skip !== undefined)('a client\'s uffd as it sends it', () => {
  it('a blocking uffd (no O_NONBLOCK) that never has an event does not stall the loop for the other VMs', async () => {
    // --no-kill: the client is this process, and stopping the handler must not kill it.
    const handler = await startResume(snapshot, ['--serve', '--no-kill', '--json'])
    const blocking = createUserfaultfd({nonBlocking: false})
    uffdApi(blocking, 0)
    const connection = connectUnix(handler.socket)
    try {
      const regions = [{base_host_virt_addr: 0x7f00_0000_0000, size: 8 * MiB, offset: 0, page_size: 4096}]
      sendWithFds(connection, Buffer.from(JSON.stringify(regions)), [blocking])
      await waitFor('the client to be taken', () => /client 1 \(pid \d+\)/.test(handler.proc.stderr()), 10_000)
      const client = await exitWithin(startClient(handler, ['--touch', 'random', '--verify-all']), 20_000, 'fc_client')
      expect(client.code, `${client.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
      await waitFor('the VM to be noticed gone', () => handler.proc.stderr().includes('client 2 ended (exited)'), 5_000)
      handler.proc.child.kill('SIGTERM')
      const resume = await exitWithin(handler.proc, 5_000, 'uffd resume (SIGTERM)')
      expect(resume.code, resume.stderr).toBe(130)
      expect(resume.json.clients).toMatchObject([{id: 1, ended: 'running'}, {id: 2, ended: 'exited'}])
    } finally {
      closeFd(connection)
      closeFd(blocking)
    }
  })
})

describe.skipIf(skip !== undefined)('fork events', () => {
  // The kernel cannot be made to forge a fork event, and both front ends refuse anything but a
  // userfaultfd: the fault loop is driven here directly, as the main thread drives it, with a FIFO
  // in place of a client's uffd. Its bytes are read and decoded like any uffd's.
  it('a fork event naming an fd the handler holds, or no userfaultfd at all, fails that client alone and closes nothing', async () => {
    const region: GuestRegion = {baseHostVirtAddr: 0x7f00_0000_0000, size: 8 * MiB, offset: 0, pageSize: 4096}
    const host = new FaultLoopHost({snapshot: {kind: 'file', path: snapshot}, cacheBytes: 1 << 20, stageBytes: 1 << 20, faultAroundBytes: 4096, spinMicros: 0, decoders: 0, readaheadBytes: 0, populateAll: false, record: false, countHits: false, workingSetUnits: [], keepWorkingSet: false})
    const messages: FromWorker[] = []
    const held: number[] = []
    try {
      await host.events.next((m) => m.type === 'ready')
      host.events.onMessage = (m) => messages.push(m)
      const served = createUserfaultfd()
      held.push(served)
      uffdApi(served, 0)
      host.send({type: 'add', id: 1, uffd: served, pidfd: -1, socket: -1, regions: [region], nonCooperative: false})
      const devNull = fs.openSync('/dev/null', 'r')
      held.push(devNull)
      const fresh = createUserfaultfd()
      // Clients 2-4 name client 1's uffd (as a VMM and as a restored task) and a file of this process.
      const bogus: [number, number, boolean][] = [
        [2, served, false],
        [3, served, true],
        [4, devNull, false],
      ]
      for (const [id, named, nonCooperative] of bogus) {
        const fake = fifoHolding(forkRecord(named))
        held.push(fake)
        host.send({type: 'add', id, uffd: fake, pidfd: -1, socket: -1, regions: [region], nonCooperative})
      }
      // Client 5's event names a userfaultfd nobody held, as a genuine fork's does: it is taken.
      held.push(fifoHolding(forkRecord(fresh)))
      host.send({type: 'add', id: 5, uffd: held.at(-1)!, pidfd: -1, socket: -1, regions: [region], nonCooperative: false})
      await waitFor('the three bogus forks to be refused', () => messages.filter((m) => m.type === 'fatal').length === 3, 10_000)
      await new Promise((resolve) => setTimeout(resolve, 200))
      const fatal = messages.filter((m) => m.type === 'fatal')
      expect(fatal.map((m) => m.id).sort()).toEqual([2, 3, 4])
      for (const m of fatal) expect(m).toMatchObject({code: 'UNSUPPORTED_EVENT'})
      expect(fatal.find((m) => m.id === 2)!.message).toBe(`a fork event named fd ${served}, which this handler already uses: not a userfaultfd the kernel made for a child; neither served nor closed`)
      expect(fatal.find((m) => m.id === 4)!.message).toContain(`fd ${devNull}, which is not a userfaultfd`)
      expect(messages.filter((m) => m.type === 'forked'), 'no child served through a borrowed fd').toEqual([])
      // Nothing of the handler's was closed: client 1's uffd and the file are still open.
      expect(isUserfaultfd(served)).toBe(true)
      expect(fs.fstatSync(devNull).isCharacterDevice()).toBe(true)
      // The fresh one was the child's, of a VMM the handler does not follow into forks: closed.
      expect(isUserfaultfd(fresh)).toBe(false)
    } finally {
      await host.stop()
      for (const fd of held) closeFd(fd)
    }
  })
})

const criuSkip = ((): string | undefined => {
  if (skip) return skip
  if (process.arch !== 'x64') return 'not x86_64 (criu)'
  const check = spawnSync('criu', ['check', '--feature', 'uffd-noncoop'], {encoding: 'utf8'})
  if (check.error) return 'criu is not installed (bash scripts/install-criu.sh installs it)'
  if (check.status !== 0) return 'criu has no non-cooperative userfaultfd here'
  if (!fs.existsSync(path.join(NATIVE, 'memory_pattern'))) return 'native/build/memory_pattern is not built'
  return undefined
})()
if (criuSkip && !skip) console.warn(`test/hostile-clients.test.ts: the criu test skipped: ${criuSkip}`)

describe.skipIf(criuSkip !== undefined)('a restore peer that sends no userfaultfd', () => {
  it('is turned away (CRIU_PROTOCOL) before a byte of what it sent is read as events, and the handler waits on for the restore', async () => {
    const out = path.join(dir, 'pattern.out')
    spawn('sh', ['-c', `exec ${path.join(NATIVE, 'memory_pattern')} --mib 4 --seed 5 --verify-loop > ${out}`], {detached: true, stdio: 'ignore', cwd: dir}).unref()
    await waitFor('memory_pattern to start', () => fs.existsSync(out) && fs.readFileSync(out, 'utf8').includes('\n'), 10_000)
    const {pid} = JSON.parse(fs.readFileSync(out, 'utf8').split('\n')[0]) as {pid: number}
    const fake = fifoHolding(forkRecord(1))
    try {
      const dump = path.join(dir, 'pattern-dump')
      fs.mkdirSync(dump)
      // --leave-running: the task must be alive for the handler to take it.
      const dumped = spawnSync('criu', ['dump', '-t', String(pid), '-D', dump, '--shell-job', '--leave-running', '-o', 'dump.log'], {encoding: 'utf8', timeout: 60_000})
      expect(dumped.status, dumped.stderr).toBe(0)
      const converted = path.join(dir, 'pattern.uffd')
      expect(uffd(['snapshot', '--criu-dir', dump, '-o', converted]).status).toBe(0)
      const ready = path.join(dir, 'criu.ready')
      const handler = track(live, uffdSpawn(['resume', converted, '--criu-dir', dump, '--ready-file', ready, '--json']), true)
      await waitFor('the handler to listen', () => fs.existsSync(ready) || handler.exited, 30_000)
      // What criu restore sends for a task: its pid, then one byte carrying the uffd; here a FIFO
      // whose first 32 bytes are a fork event naming the handler's stdout.
      const connection = connectUnix(path.join(dump, 'lazy-pages.socket'))
      try {
        const pidBytes = Buffer.alloc(4)
        pidBytes.writeInt32LE(pid)
        writeAll(connection, pidBytes)
        sendWithFds(connection, Buffer.from([0]), [fake])
        // Not the restore: turned away, while the handler goes on waiting for criu restore.
        await waitFor('the connection to be turned away', () => handler.stderr().includes(`rejected a connection on the lazy-pages socket: task ${pid} came with a file descriptor that is not a userfaultfd`), 10_000)
        expect(handler.exited).toBe(false)
        handler.child.kill('SIGTERM')
        const resume = await exitWithin(handler, 10_000, 'uffd resume --criu-dir')
        expect(resume.code, resume.stderr).toBe(130)
        expect(resume.json.rejected).toMatchObject([{code: 'CRIU_PROTOCOL', message: `task ${pid} came with a file descriptor that is not a userfaultfd`}])
      } finally {
        closeFd(connection)
      }
      expect(readableNow(fake), 'the forged event was never read').toBe(true)
      expect(fs.readSync(fake, Buffer.alloc(64))).toBe(32)
    } finally {
      closeFd(fake)
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // Killed with the restored tree already.
      }
    }
  })
})

const loopSkip = ((): string | undefined => {
  if (skip) return skip
  for (const tool of ['losetup', 'mkfs.ext4', 'mount', 'umount', 'filefrag', 'dd']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed`
  }
  if (!fs.existsSync('/dev/loop-control')) return 'no loop devices (/dev/loop-control)'
  return undefined
})()
if (loopSkip && !skip) console.warn(`test/hostile-clients.test.ts: the EIO test skipped: ${loopSkip}`)

describe.skipIf(skip !== undefined)('the snapshot failing under the handler', () => {
  /** 8 MiB: the first half zero pages (served with nothing read), the second random data. */
  let halfZero: string
  beforeAll(() => {
    halfZero = path.join(dir, 'half-zero.raw')
    fs.writeFileSync(halfZero, Buffer.concat([Buffer.alloc(4 * MiB), makeImage('random', 4 * MiB, 22)]))
  })

  /**
   * Two VMs under --serve: the first has all of its memory, then `breakIt` makes the snapshot's
   * chunks unreadable and the second faults. The second is killed with `message`, never fed a
   * byte; the first runs on; the handler still serves a third VM whose memory needs no read.
   */
  async function oneFailsAlone(file: string, breakIt: () => void, code: string, message: RegExp): Promise<void> {
    const handler = await startResume(file, ['--serve', '--cache-mb', '1', '--readahead', '0', '--json'])
    const vm = (args: string[]): Running => startFcClient(live, handler, halfZero, args, 60_000)
    const first = vm(['--touch', 'sequential', '--verify-all', '--hold-ms', '60000'])
    await waitFor('the first VM to have all its memory', () => first.stdout().includes('"ok":true') || first.exited, 20_000)
    expect(first.exited, first.stderr()).toBe(false)
    breakIt()
    const second = await exitWithin(vm(['--touch', 'random', '--verify-all']), 20_000, 'the second fc_client')
    expect(second.signal, `the second VM should have been killed:\n${second.stdout}${second.stderr}`).toBe('SIGKILL')
    expect(second.stdout, 'it never reported bytes, let alone wrong ones').toBe('')
    await waitFor('the failure to be logged', () => new RegExp(`client 2: ${message.source}`).test(handler.proc.stderr()), 5_000)
    expect(first.exited, 'the first VM runs on').toBe(false)
    expect(handler.proc.exited, handler.proc.stderr()).toBe(false)
    const third = await exitWithin(vm(['--size', '4M', '--touch', 'random', '--verify-all']), 20_000, 'the third fc_client')
    expect(third.code, `${third.stderr}\nuffd resume:\n${handler.proc.stderr()}`).toBe(0)
    expect(first.exited, 'the first VM still runs').toBe(false)
    await waitFor('the third VM to be noticed gone', () => handler.proc.stderr().includes('client 3 ended (exited)'), 5_000)
    handler.proc.child.kill('SIGTERM')
    const resume = await exitWithin(handler.proc, 10_000, 'uffd resume (SIGTERM)')
    // A client that could not be served is the run's error (docs/ERRORS.md): exit 1.
    expect(resume.code, resume.stderr).toBe(1)
    expect(resume.json.error).toEqual({code, message: expect.stringMatching(message)})
    expect(resume.json.clients).toMatchObject([{id: 1, ended: 'killed'}, {id: 2, ended: 'killed', error: {code, message: expect.stringMatching(message)}}, {id: 3, ended: 'exited'}])
    expect(resume.json.clients[0].error).toBeUndefined()
    expect(resume.json.clients[2].error).toBeUndefined()
  }

  it('truncated: the VM that needs the lost chunks is killed with TRUNCATED naming the file, the others go on', async () => {
    const file = path.join(dir, 'truncated.uffd')
    expect(uffd(['snapshot', '--mem-file', halfZero, '-o', file]).status).toBe(0)
    await oneFailsAlone(file, () => fs.truncateSync(file, 64 * 1024), 'TRUNCATED', new RegExp(`${escaped(file)}: unexpected end of file at \\d+ `))
  })

  it.skipIf(loopSkip !== undefined)('EIO from the disk: the VM that needs the data is killed with EIO naming the file and chunk, the others go on', async () => {
    const image = path.join(dir, 'fs.img')
    const mnt = path.join(dir, 'mnt')
    fs.mkdirSync(mnt)
    fs.writeFileSync(image, '')
    fs.truncateSync(image, 64 * MiB)
    execFileSync('mkfs.ext4', ['-q', '-F', image])
    const device = execFileSync('losetup', ['-f', '--show', image], {encoding: 'utf8'}).trim()
    let mounted = false
    try {
      execFileSync('mount', [device, mnt])
      mounted = true
      const file = path.join(mnt, 'vm.uffd')
      expect(uffd(['snapshot', '--mem-file', halfZero, '-o', file]).status).toBe(0)
      execFileSync('umount', [mnt])
      execFileSync('mount', ['-o', 'ro', device, mnt])
      // The device shrinks below the file's first block: reading its data is now an I/O error
      // ("access beyond end of device"), once its cached pages are dropped.
      const extents = [...execFileSync('filefrag', ['-v', file], {encoding: 'utf8'}).matchAll(/^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\./gm)].map((m) => Number(m[1]))
      const blockSize = Number(/blocks of (\d+) bytes/.exec(execFileSync('filefrag', ['-v', file], {encoding: 'utf8'}))![1])
      const firstByte = Math.min(...extents) * blockSize
      expect(firstByte, 'the file lies past the first MiB of the filesystem').toBeGreaterThan(MiB)
      const breakIt = (): void => {
        fs.truncateSync(image, Math.floor(firstByte / MiB) * MiB)
        execFileSync('losetup', ['-c', device])
        execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'])
      }
      await oneFailsAlone(file, breakIt, 'EIO', new RegExp(`uffd: read failed while reading chunk \\d+ of ${escaped(file)} \\(EIO: `))
    } finally {
      // (A handler still running after a failure holds the file open.)
      await killAll(live)
      if (mounted) spawnSync('umount', [mnt])
      spawnSync('losetup', ['-d', device])
    }
  })
})
