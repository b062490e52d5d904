import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {UffdError} from '../../core/errors.js'
import {isLazyVma, readCriuDump} from '../../criu/images.js'
import {RegionKind} from '../../format/constants.js'
import {type ImageReader} from '../../snapshot/layered-reader.js'
import {closeFd, isUserfaultfd, peerCredentials, pidfdOpen, pidfdSendSignal, poll, POLLIN, recvWithFds, SIGKILL, SysError} from '../../sys/index.js'
import {type GuestRegion} from './handshake.js'
import {ACCEPT_SLICE_MS, type ClientIntake, type ClientSummary, type FrontEnd, type ResumeResult, serveClients, type SessionOptions, writeStatsFile} from './serving-session.js'

/** The socket name CRIU connects to, relative to its working directory (criu/uffd.c). */
export const LAZY_PAGES_SOCKET = 'lazy-pages.socket'
/** "RSTF": sent by `criu restore` once every task is restored (LAZY_PAGES_RESTORE_FINISHED). */
export const RESTORE_FINISHED = 0x52535446

export type RestoreMessage = {kind: 'task'; pid: number; uffd: number} | {kind: 'zombie'; pid: number} | {kind: 'finished'}

/**
 * The stream `criu restore --lazy-pages` writes to the lazy-pages socket (send_uffd and
 * lazy_pages_finish_restore in criu/uffd.c): per task a native-endian int32 pid, then for a live
 * task a one-byte sendmsg carrying its uffd in SCM_RIGHTS (a zombie is sent as -pid with no fd);
 * at the end the uint32 RESTORE_FINISHED. No pid reaches 0x52535446 (pid_max is at most 2^22),
 * so the two cannot be confused. Bytes may arrive split or merged; each fd arrives with its byte.
 */
export class RestoreStream {
  private bytes = Buffer.alloc(0)
  private readonly fds: number[] = []
  private readonly little = os.endianness() === 'LE'

  push(data: Buffer, fds: readonly number[]): void {
    this.bytes = Buffer.concat([this.bytes, data])
    this.fds.push(...fds)
  }

  /** The next complete message, or undefined until more arrives. Throws on a malformed stream. */
  next(): RestoreMessage | undefined {
    if (this.bytes.length < 4) return undefined
    const word = this.little ? this.bytes.readInt32LE(0) : this.bytes.readInt32BE(0)
    if (word === RESTORE_FINISHED) {
      this.bytes = this.bytes.subarray(4)
      return {kind: 'finished'}
    }
    if (word === 0) throw new UffdError('CRIU_PROTOCOL', 'criu sent pid 0 on the lazy-pages socket')
    if (word < 0) {
      this.bytes = this.bytes.subarray(4)
      return {kind: 'zombie', pid: -word}
    }
    if (this.bytes.length < 5) return undefined
    const uffd = this.fds.shift()
    if (uffd === undefined) throw new UffdError('CRIU_PROTOCOL', `criu sent task ${word} without its userfaultfd`)
    this.bytes = this.bytes.subarray(5)
    return {kind: 'task', pid: word, uffd}
  }

  /** The next complete message without taking it (its fd stays the stream's); undefined until it is whole. */
  peek(): RestoreMessage | undefined {
    const bytes = this.bytes
    const fds = [...this.fds]
    try {
      return this.next()
    } finally {
      this.bytes = bytes
      this.fds.splice(0, this.fds.length, ...fds)
    }
  }

  /** Closes fds received but not handed out. */
  close(): void {
    for (const fd of this.fds.splice(0)) closeFd(fd)
  }
}

/** Connections read at once while waiting for the restore's; one more closes the oldest. */
export const MAX_RESTORE_CANDIDATES = 16

/** Where telling one connection from the restore's stands. */
export type CandidateVerdict = {state: 'waiting'} | {state: 'refused'; code: 'CRIU_PROTOCOL' | 'RESTORE_FAILED'; reason: string} | {state: 'restore'}

/**
 * A connection on the lazy-pages socket not yet known to be criu restore's: what it sent so far,
 * judged by its first message (see RestoredTasks.admit). Reads never wait.
 */
export class RestoreCandidate {
  readonly stream = new RestoreStream()

  constructor(
    /**
     * Whether the peer runs the criu binary (its /proc/PID/exe when it connected): then it is the
     * restore, and its failure is the run's error; anything else is only turned away.
     */
    readonly fromCriu: boolean,
  ) {}

  /** Reads what has arrived on `connection` (poll said it is readable) and judges the first message. */
  read(connection: number, regionsByTask: ReadonlyMap<number, GuestRegion[]>): CandidateVerdict {
    let received: {data: Buffer; fds: number[]}
    try {
      received = recvWithFds(connection, 4096, 8, 0)
    } catch (error) {
      if (error instanceof SysError && error.code === 'ETIMEDOUT') return {state: 'waiting'}
      if (error instanceof SysError) return {state: 'refused', code: 'CRIU_PROTOCOL', reason: `reading it failed (${error.code})`}
      throw error
    }
    if (received.data.length === 0) return {state: 'refused', code: 'RESTORE_FAILED', reason: 'it closed before sending a task'}
    this.stream.push(received.data, received.fds)
    return this.judge(regionsByTask)
  }

  /** The first message decides, without taking it from the stream (it is served once chosen). */
  judge(regionsByTask: ReadonlyMap<number, GuestRegion[]>): CandidateVerdict {
    let first: RestoreMessage | undefined
    try {
      first = this.stream.peek()
    } catch (error) {
      if (error instanceof UffdError) return {state: 'refused', code: 'CRIU_PROTOCOL', reason: `not the lazy-pages protocol (${error.message})`}
      throw error
    }
    if (!first) return {state: 'waiting'}
    if (first.kind === 'finished') return {state: 'refused', code: 'CRIU_PROTOCOL', reason: 'it announced the end of a restore before any task'}
    if (!regionsByTask.has(first.pid)) return {state: 'refused', code: 'CRIU_PROTOCOL', reason: `its first task, pid ${first.pid}, is not a task of this dump`}
    if (first.kind === 'task' && !isUserfaultfd(first.uffd)) return {state: 'refused', code: 'CRIU_PROTOCOL', reason: `task ${first.pid} came with a file descriptor that is not a userfaultfd`}
    return {state: 'restore'}
  }
}

export interface CriuResumeOptions extends SessionOptions {
  /** The dump the snapshot was made from (`uffd snapshot --criu-dir`), which `criu restore` reads. */
  criuDir: string
  /** Where the socket goes: criu restore's working directory (its --work-dir, else the dump dir). */
  workDir: string
}

/**
 * The memory the handler serves for each task: the snapshot regions of the VMAs CRIU registers
 * with the task's uffd (isLazyVma). Everything else (file mappings, shared memory, the vdso) CRIU
 * restores itself. Checks that the snapshot was made from this dump.
 */
export function lazyRegionsByTask(reader: ImageReader, snapshotPath: string, criuDir: string): Map<number, GuestRegion[]> {
  const dump = readCriuDump(criuDir)
  const {pageSize} = reader.geometry
  const meta = reader.header.metadata
  const snapshotPids = Array.isArray(meta.tasks) ? (meta.tasks as {pid: number}[]).map((t) => t.pid) : []
  const dumpPids = dump.tasks.map((t) => t.pid)
  if (meta.source !== 'criu' || snapshotPids.join(',') !== dumpPids.join(',')) {
    throw new UffdError('NOT_THIS_DUMP', `${snapshotPath} was not made from the CRIU dump in ${criuDir} (uffd snapshot --criu-dir ${criuDir}): its tasks are [${snapshotPids.join(', ')}], the dump's [${dumpPids.join(', ')}]`)
  }
  const byTask = new Map<number, GuestRegion[]>()
  for (const task of dump.tasks) {
    const lazy = new Set(task.vmas.filter(isLazyVma).map((v) => `${v.start}:${v.end - v.start}`))
    const regions = reader.header.regions
      .filter((r) => r.kind === RegionKind.ProcessVma && r.owner === task.pid && lazy.has(`${r.address}:${r.size}`))
      .map((r) => ({baseHostVirtAddr: r.address, size: r.size, offset: r.imageOffset, pageSize}))
    byTask.set(task.pid, regions)
  }
  return byTask
}

/**
 * Whether process `pid` runs a binary named criu, read at accept. A peer already gone by then
 * (exited, or a zombie: no exe) counts as criu: `criu restore` that fails at once connects and
 * exits before the handler gets to its connection, and that failure must end the run rather
 * than leave it waiting for a restore that will never come.
 */
function runsCriu(pid: number): boolean {
  try {
    return path.basename(fs.readlinkSync(`/proc/${pid}/exe`)) === 'criu'
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT'
  }
}

/** One process of the restored tree, held by a pidfd opened while it was known to be that process. */
interface TreeProcess {
  pid: number
  pidfd: number
}

/** The parent pid /proc gives for `pid`, or undefined if it is gone. */
function parentOf(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, the last ')' ends it.
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
  } catch {
    return undefined
  }
}

/**
 * The restored tasks (`roots`: pid -> the pidfd opened when criu sent it, -1 if none) and their
 * live descendants, each held by a pidfd, so that a pid freed and reused meanwhile is never
 * signalled: a child found in its parent's /proc children list gets a pidfd, and is kept only if
 * it is still that parent's child then (its ppid), the parent held by a pidfd that says it still
 * runs (POLLIN: exited). Children's pidfds are opened here; the caller closes them.
 */
function openProcessTree(roots: ReadonlyMap<number, number>): {tree: TreeProcess[]; opened: number[]} {
  const tree: TreeProcess[] = []
  const opened: number[] = []
  const queue: TreeProcess[] = [...roots].filter(([, pidfd]) => pidfd >= 0).map(([pid, pidfd]) => ({pid, pidfd}))
  const seen = new Set<number>()
  while (queue.length > 0) {
    const parent = queue.shift()!
    if (seen.has(parent.pid)) continue
    seen.add(parent.pid)
    tree.push(parent)
    if ((poll([{fd: parent.pidfd, events: POLLIN}], 0)[0] ?? 0) !== 0) continue // exited: its pid names nobody of ours
    let tids: string[] = []
    try {
      tids = fs.readdirSync(`/proc/${parent.pid}/task`)
    } catch {
      continue // gone
    }
    for (const tid of tids) {
      let children: number[] = []
      try {
        children = fs.readFileSync(`/proc/${parent.pid}/task/${tid}/children`, 'utf8').split(' ').filter((c) => c.trim()).map(Number)
      } catch {
        // The thread exited meanwhile.
      }
      for (const pid of children) {
        let pidfd: number
        try {
          pidfd = pidfdOpen(pid)
        } catch {
          continue // exited meanwhile
        }
        opened.push(pidfd)
        if (parentOf(pid) === parent.pid) queue.push({pid, pidfd})
      }
    }
  }
  return {tree, opened}
}

/**
 * Runs `uffd resume --criu-dir`: CRIU's lazy-pages daemon protocol. Listens on
 * WORKDIR/lazy-pages.socket, takes the one connection of `criu restore --lazy-pages`, serves each
 * task's faults from the time its uffd arrives (tasks can fault before the restore finishes),
 * follows forks, mremaps and munmaps (the uffds are opened with the non-cooperative events),
 * and once the restore finished fills all remaining memory in the background. Ends when every
 * task's memory is delivered (the uffds are then closed: the kernel serves any later faults
 * normally) or every task is gone. On a fatal error the restored tree is killed (unless kill is
 * off): a task whose uffd is released would read zeros where its memory should be.
 */
export async function runCriuResume(options: CriuResumeOptions): Promise<ResumeResult> {
  const regionsByTask = lazyRegionsByTask(options.snapshot.reader, options.snapshot.name, options.criuDir)
  const {result} = await serveClients(options, new RestoredTasks(options, regionsByTask), {
    // Population starts when the restore finished (the 'populate' message), as CRIU's daemon does.
    populateAll: false,
    record: false,
    countHits: false,
    workingSetUnits: [],
    keepWorkingSet: false,
  })
  writeStatsFile(options.statsFile, result.stats)
  return result
}

/**
 * CRIU's restored tasks: they arrive one by one on the single connection of `criu restore`, and
 * are killed as one tree, since a forked child's pid is not in its uffd event: a failure of any
 * client can only be contained by killing every task and its descendants.
 */
class RestoredTasks implements FrontEnd {
  readonly socketPath: string
  /** Once all its memory is present a task never faults again; the kernel serves it once the uffd closes. */
  readonly completionFreesClient = true
  private connection = -1
  private stream = new RestoreStream()
  /** The tasks CRIU restored, the roots of what is killed: pid -> this thread's pidfd for it (-1: none). */
  private readonly tasks = new Map<number, number>()
  private treeKilled = false

  constructor(
    private readonly options: CriuResumeOptions,
    private readonly regionsByTask: ReadonlyMap<number, GuestRegion[]>,
  ) {
    this.socketPath = path.join(options.workDir, LAZY_PAGES_SOCKET)
  }

  /**
   * Takes the connection of `criu restore --lazy-pages`, and only that one. Anyone who can open
   * the socket may connect first: connections are read side by side until one proves to be the
   * restore, which is then served, and the others are closed without a word to the restore.
   * Proof is what CRIU does at once (criu/uffd.c: prepare_lazy_pages_socket connects from the
   * restoring criu process, then the first restored task sends its pid and its uffd): a peer
   * running as this handler's user or root, whose first message names a task of this dump and
   * carries a userfaultfd (or announces a zombie of the dump). A peer that passes as root with
   * the dump's pids cannot be told from CRIU by what it sends.
   */
  async admit(intake: ClientIntake): Promise<void> {
    const {timeoutMs} = this.options
    const deadline = timeoutMs > 0 ? Date.now() + timeoutMs : Infinity
    const candidates = new Map<number, RestoreCandidate>()
    let chosen: {connection: number; stream: RestoreStream} | undefined
    try {
      while (!chosen) {
        if (Date.now() > deadline) throw new UffdError('TIMEOUT', `criu restore --lazy-pages did not connect to ${this.socketPath} within ${timeoutMs / 1000} s`)
        const input = await intake.waitForInput([...candidates.keys()])
        if (input === null) return
        if (input.connection !== null) {
          if (candidates.size >= MAX_RESTORE_CANDIDATES) {
            const [oldest] = candidates.keys()
            this.rejectCandidate(intake, candidates, oldest, `more than ${MAX_RESTORE_CANDIDATES} connections were waiting to be told from the restore; the oldest was closed`)
          }
          const peer = this.judgePeer(input.connection)
          if (peer.refusal) {
            closeFd(input.connection)
            this.rejectConnection(intake, peer.refusal)
          } else {
            candidates.set(input.connection, new RestoreCandidate(peer.criu))
          }
        }
        for (const connection of input.readable) {
          const candidate = candidates.get(connection)
          if (!candidate) continue
          const verdict = candidate.read(connection, this.regionsByTask)
          if (verdict.state === 'waiting') continue
          if (verdict.state === 'refused') {
            // criu restore itself failing (it hung up early: see its log) ends the run, as before.
            if (candidate.fromCriu) throw new UffdError(verdict.code, verdict.code === 'RESTORE_FAILED' ? 'criu restore closed the lazy-pages socket before the restore finished (see its log)' : `criu restore: ${verdict.reason}`)
            this.rejectCandidate(intake, candidates, connection, verdict.reason)
            continue
          }
          candidates.delete(connection)
          chosen = {connection, stream: candidate.stream}
          break
        }
      }
    } finally {
      for (const [connection, candidate] of candidates) {
        candidate.stream.close()
        closeFd(connection)
      }
    }
    // CRIU makes one connection; nobody else is served.
    intake.stopListening()
    await this.follow(intake, chosen.connection, chosen.stream)
  }

  /** Why the peer of `connection` cannot be the restore (its user), if it cannot; whether it runs criu. */
  private judgePeer(connection: number): {refusal?: string; criu: boolean} {
    const {pid, uid} = peerCredentials(connection)
    const own = process.geteuid?.() ?? 0
    if (uid !== own && uid !== 0) return {refusal: `a connection from uid ${uid} (pid ${pid}), neither this handler's user (${own}) nor root, cannot be criu restore`, criu: false}
    return {criu: pid > 0 && runsCriu(pid)}
  }

  private rejectCandidate(intake: ClientIntake, candidates: Map<number, RestoreCandidate>, connection: number, reason: string): void {
    candidates.get(connection)?.stream.close()
    candidates.delete(connection)
    closeFd(connection)
    this.rejectConnection(intake, reason)
  }

  private rejectConnection(intake: ClientIntake, reason: string): void {
    intake.reject({code: 'CRIU_PROTOCOL', message: reason})
    intake.log(`rejected a connection on the lazy-pages socket: ${reason}; still waiting for criu restore`)
  }

  /** Serves the restore's tasks as their uffds arrive on `connection`, until the restore finished. */
  private async follow(intake: ClientIntake, connection: number, stream: RestoreStream): Promise<void> {
    this.connection = connection
    this.stream = stream
    let restoreFinished = this.takeMessages(intake)
    while (!restoreFinished && !intake.signal.aborted) {
      let received: {data: Buffer; fds: number[]}
      try {
        received = recvWithFds(connection, 4096, 8, ACCEPT_SLICE_MS)
      } catch (error) {
        if (error instanceof SysError && error.code === 'ETIMEDOUT') {
          await intake.yieldToEventLoop()
          continue
        }
        throw error
      }
      if (received.data.length === 0) throw new UffdError('RESTORE_FAILED', 'criu restore closed the lazy-pages socket before the restore finished (see its log)')
      this.stream.push(received.data, received.fds)
      restoreFinished = this.takeMessages(intake)
    }
  }

  /** Acts on every complete message received; returns whether the restore finished. */
  private takeMessages(intake: ClientIntake): boolean {
    for (let m = this.stream.next(); m; m = this.stream.next()) {
      if (m.kind === 'finished') {
        intake.log('restore finished: filling the remaining memory in the background')
        intake.populate()
        return true
      }
      if (m.kind === 'zombie') intake.log(`task ${m.pid} is a zombie: no memory to serve`)
      else this.addTask(intake, m.pid, m.uffd)
    }
    return false
  }

  private addTask(intake: ClientIntake, pid: number, uffd: number): void {
    // Held before anything else: even a task refused below is killed with the tree, by this pidfd.
    this.keepTask(pid)
    // Anything else would be polled and read as the task's uffd: its bytes would decode as
    // events, and a fork event names an fd number the loop would then serve as a child's.
    if (!isUserfaultfd(uffd)) {
      closeFd(uffd)
      throw new UffdError('CRIU_PROTOCOL', `criu sent task ${pid} a file descriptor that is not a userfaultfd`)
    }
    const regions = this.regionsByTask.get(pid)
    if (!regions) {
      closeFd(uffd)
      throw new UffdError('NOT_THIS_DUMP', `criu restored task ${pid}, which is not in the snapshot`)
    }
    let pidfd: number
    try {
      pidfd = pidfdOpen(pid)
    } catch (error) {
      closeFd(uffd)
      throw error
    }
    const id = intake.add({pid, uffd, pidfd, socket: -1, regions, nonCooperative: true})
    intake.log(`client ${id} (pid ${pid}): ${regions.length} lazy VMA(s), ${regions.reduce((s, r) => s + r.size, 0)} bytes`)
  }

  /**
   * After a fatal error with --no-kill the failed task stays frozen (its uffd open, unread) until
   * it is killed from outside or this handler is stopped. Once the tree is killed, only the wait
   * for the tasks' exits is left: forked children, whose pids are unknown, are not waited for.
   */
  servingDone(clients: readonly ClientSummary[]): boolean {
    return this.treeKilled || !clients.some((c) => (c.ended === 'running' || c.ended === 'frozen') && !c.complete)
  }

  killFailed(_failed: ClientSummary, clients: readonly ClientSummary[]): number[] {
    this.killTree('a task can no longer be served correctly')
    return clients.map((c) => c.id)
  }

  killDependents(_dependents: readonly ClientSummary[], clients: readonly ClientSummary[]): number[] {
    this.killTree('stopped while they still depend on this handler')
    return clients.map((c) => c.id)
  }

  killAfterError(error: unknown): void {
    this.killTree(error instanceof Error ? error.message : String(error))
  }

  clientEnded(): void {}

  release(): void {
    this.stream.close()
    if (this.connection >= 0) closeFd(this.connection)
    for (const pidfd of this.tasks.values()) if (pidfd >= 0) closeFd(pidfd)
    this.tasks.clear()
  }

  /** A pidfd of this thread's for a task criu just sent (it is restoring then, so its pid is its own). */
  private keepTask(pid: number): void {
    if (this.tasks.has(pid)) return
    let pidfd = -1
    try {
      pidfd = pidfdOpen(pid)
    } catch (error) {
      if (!(error instanceof SysError)) throw error
      // Gone already: nothing of it to kill.
    }
    this.tasks.set(pid, pidfd)
  }

  private killTree(why: string): void {
    if (this.treeKilled) return
    this.treeKilled = true
    const {tree, opened} = openProcessTree(this.tasks)
    try {
      this.options.log(`killing the restored tasks (${tree.map((p) => p.pid).join(', ')}): ${why}`)
      for (const p of tree) {
        try {
          pidfdSendSignal(p.pidfd, SIGKILL)
        } catch (error) {
          this.options.log(`task ${p.pid} could not be killed: ${(error as Error).message}`)
        }
      }
    } finally {
      for (const pidfd of opened) closeFd(pidfd)
    }
  }
}
