import fs from 'node:fs'

import {UffdError} from '../../core/errors.js'
import {type Geometry} from '../../format/geometry.js'
import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {attachedWorkingSet} from '../../snapshot/relayout.js'
import {closeFd, isUserfaultfd, peerCredentials, pidfdOpen, readSome, recvWithFds, SysError} from '../../sys/index.js'
import {type GuestRegion, HandshakeError, handshakeComplete, MAX_HANDSHAKE_BYTES, parseHandshake, SnapshotMismatchError, validateRegions} from './handshake.js'
import {type ClientIntake, type ClientSummary, type FrontEnd, killQuietly, type ResumeResult, serveClients, type SessionOptions, writeStatsFile} from './serving-session.js'
import {checkMatches, chunksInTouchOrder, parseWorkingSet, type WorkingSetFile} from '../../format/working-set.js'

export interface ResumeOptions extends SessionOptions {
  socketPath: string
  /** Keep accepting clients until stopped, instead of serving one. */
  serve: boolean
  populateAll: boolean
  /** Write the pages that faulted, in first-touch order, here at exit. */
  recordFile?: string
  /** Prefetch this recorded working set for every client. */
  workingSetFile?: string
  /** Count prefetch hits (clears prefetched pages' accessed bits, samples /proc/PID/smaps). */
  countHits?: boolean
}

/** Handshake JSON can arrive after an empty first read; Firecracker's own handlers retry. */
const HANDSHAKE_READ_TRIES = 3

/**
 * Runs `uffd resume`: listens on the socket, takes each client's handshake and uffd, and hands
 * them to the fault-loop worker; ends when the (single) client is gone, or on a signal. On a fatal
 * error a client is killed (unless kill is off, in which case its uffd stays open so it stays
 * frozen: a frozen VM is better than one reading zeros from a released uffd).
 */
export async function runResume(options: ResumeOptions): Promise<ResumeResult> {
  const {geometry, identity, workingSetUnits} = prefetchPlan(options)
  const {result, recording} = await serveClients(options, new FirecrackerClients(options, geometry), {
    populateAll: options.populateAll,
    record: options.recordFile !== undefined,
    countHits: options.countHits ?? false,
    workingSetUnits,
    keepWorkingSet: options.serve,
  })
  if (options.recordFile) {
    if (!recording) throw new UffdError('NO_RECORDING', 'the fault loop ended without handing over its recording')
    const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, ...recording}
    writeFileAtomically(options.recordFile, `${JSON.stringify(set)}\n`)
  }
  writeStatsFile(options.statsFile, result.stats)
  return result
}

/** The snapshot's geometry and identity, and the units to prefetch for every client. */
function prefetchPlan(options: ResumeOptions): {geometry: Geometry; identity: WorkingSetFile['snapshot']; workingSetUnits: number[]} {
  const {reader} = options.snapshot
  {
    const {geometry} = reader
    const identity = {logicalSize: geometry.logicalSize, pageSize: geometry.pageSize, headerCrc: reader.header.headerCrc}
    if (options.workingSetFile === 'none') return {geometry, identity, workingSetUnits: []}
    if (options.workingSetFile) {
      // A working set given on the command line wins over one attached to the snapshot.
      const set = parseWorkingSet(fs.readFileSync(options.workingSetFile, 'utf8'), options.workingSetFile)
      checkMatches(set, identity, options.workingSetFile)
      return {geometry, identity, workingSetUnits: chunksInTouchOrder(set.pages, geometry.pagesPerChunk)}
    }
    // An attached set is prefetched from its packed blocks when it has them (units after the
    // chunks, see SnapshotReader.unitCount), else as whole chunks.
    const packedUnits = reader.packed?.blocks.map((_, b) => reader.index.length + b)
    return {geometry, identity, workingSetUnits: packedUnits ?? attachedWorkingSet(reader)?.chunks ?? []}
  }
}

/**
 * Firecracker's clients: each connects, sends its regions as JSON with its uffd in SCM_RIGHTS,
 * and is known by its SO_PEERCRED pid, which is what gets killed.
 */
class FirecrackerClients implements FrontEnd {
  readonly socketPath: string
  /** The VMM goes on using its uffd (balloon removals fault back in), so it needs the handler until it exits. */
  readonly completionFreesClient = false

  constructor(
    private readonly options: ResumeOptions,
    private readonly geometry: Geometry,
  ) {
    this.socketPath = options.socketPath
  }

  async admit(intake: ClientIntake): Promise<void> {
    const {options} = this
    let deadline = options.timeoutMs > 0 ? Date.now() + options.timeoutMs : Infinity
    for (;;) {
      const connection = await intake.accept(deadline, `no client connected to ${options.socketPath} within ${options.timeoutMs / 1000} s`)
      if (connection === null) return
      try {
        const accepted = takeHandshake(connection, options.timeoutMs, this.geometry)
        if (accepted === null) {
          // Connected and closed without a byte: a liveness probe (another `uffd resume` checking
          // whether this socket is in use, a health check), not a VMM. Keep waiting for the client.
          closeFd(connection)
          intake.log('a connection closed without sending anything (a probe?); still waiting for a client')
          continue
        }
        const id = intake.add({...accepted, socket: connection, nonCooperative: false})
        intake.log(`client ${id}${accepted.pid ? ` (pid ${accepted.pid})` : ''}: ${accepted.regions.length} region(s), ${accepted.regions.reduce((s, r) => s + r.size, 0)} bytes`)
      } catch (error) {
        // A well-formed handshake for another snapshot: the VMM registered its memory with the
        // uffd it sent, and with nobody serving it, its first fault waits forever.
        const refusedPid = error instanceof SnapshotMismatchError && options.kill ? peerCredentials(connection).pid : 0
        closeFd(connection)
        if (!(error instanceof HandshakeError || error instanceof SysError || error instanceof UffdError)) throw error
        if (refusedPid > 0) {
          intake.log(`killing the refused client (pid ${refusedPid}) rather than leave it waiting on memory nobody serves`)
          killQuietly(refusedPid)
        }
        if (!options.serve) throw error
        intake.reject({code: error.code, message: error.message})
        intake.log(`rejected a client: ${error.message}`)
      }
      if (!options.serve) {
        // One client: stop listening so the socket path no longer accepts anyone.
        intake.stopListening()
        return
      }
      deadline = Infinity
    }
  }

  servingDone(clients: readonly ClientSummary[]): boolean {
    return !clients.some((c) => c.ended === 'running')
  }

  killFailed(failed: ClientSummary): number[] {
    if (!failed.pid) return []
    this.options.log(`killing client ${failed.id} (pid ${failed.pid}) rather than let it run on without its memory`)
    killQuietly(failed.pid)
    return [failed.id]
  }

  killDependents(dependents: readonly ClientSummary[]): number[] {
    const killed: number[] = []
    for (const c of dependents) {
      if (!c.pid) continue
      this.options.log(`stopping: killing client ${c.id} (pid ${c.pid}), which cannot run on without this handler`)
      killQuietly(c.pid)
      killed.push(c.id)
    }
    return killed
  }

  killAfterError(_error: unknown, running: readonly ClientSummary[]): void {
    for (const c of running) if (c.pid) killQuietly(c.pid)
  }

  release(): void {}
}

/** Set by takeHandshake to the pid of a VMM whose well-formed handshake does not fit the snapshot. */
interface AcceptedClient {
  uffd: number
  pid: number | null
  pidfd: number
  regions: GuestRegion[]
}

/**
 * Reads and validates one handshake; on any failure closes what it received and throws. Returns
 * null when the peer closed the connection without sending anything (not a client).
 */
function takeHandshake(connection: number, timeoutMs: number, geometry: Geometry): AcceptedClient | null {
  let received: {data: Buffer; fds: number[]} = {data: Buffer.alloc(0), fds: []}
  for (let attempt = 0; attempt < HANDSHAKE_READ_TRIES && received.data.length === 0; attempt++) {
    received = recvWithFds(connection, MAX_HANDSHAKE_BYTES, 3, timeoutMs > 0 ? timeoutMs : -1)
    if (received.data.length === 0 && received.fds.length === 0 && attempt === HANDSHAKE_READ_TRIES - 1) return null
  }
  const [uffd, ...extra] = received.fds
  // Forks send a memfd or guest_memfd after the uffd: only the uffd is ours to use.
  for (const fd of extra) closeFd(fd)
  try {
    if (uffd === undefined) throw new HandshakeError('no file descriptor came with the message (expected the uffd)')
    const data = readRest(connection, received.data, timeoutMs)
    // Anything else would be polled and read as the client's uffd: a pipe's bytes decode as
    // events (a fork event names an fd number the handler would then close or serve).
    if (!isUserfaultfd(uffd)) throw new HandshakeError('the file descriptor that came with the message is not a userfaultfd')
    const announced = parseHandshake(data)
    const {pid} = peerCredentials(connection)
    const regions = validateRegions(announced, geometry)
    let pidfd = -1
    if (pid > 0) {
      try {
        pidfd = pidfdOpen(pid)
      } catch (error) {
        if (error instanceof SysError && error.code === 'ESRCH') throw new HandshakeError(`the client (pid ${pid}) exited right after the handshake`)
        throw error
      }
    }
    return {uffd, pid: pid > 0 ? pid : null, pidfd, regions}
  } catch (error) {
    if (uffd !== undefined) closeFd(uffd)
    throw error
  }
}


/**
 * The rest of a handshake whose first read was `first`: reads on until the JSON value is closed,
 * the peer stops sending (end of stream), or there are more bytes than MAX_HANDSHAKE_BYTES (which
 * parseHandshake refuses), within `timeoutMs` in all. The fds rode on the first read; later ones
 * are not taken.
 */
function readRest(connection: number, first: Buffer, timeoutMs: number): Buffer {
  const parts = [first]
  let length = first.length
  const deadline = timeoutMs > 0 ? Date.now() + timeoutMs : Infinity
  while (length <= MAX_HANDSHAKE_BYTES && !handshakeComplete(parts.length === 1 ? parts[0] : Buffer.concat(parts))) {
    const remaining = deadline === Infinity ? -1 : Math.max(0, deadline - Date.now())
    let more: Buffer
    try {
      more = readSome(connection, MAX_HANDSHAKE_BYTES + 1 - length, remaining)
    } catch (error) {
      if (error instanceof SysError && error.code === 'ETIMEDOUT') throw new HandshakeError(`the message was still incomplete after ${timeoutMs / 1000} s (${length} bytes)`)
      throw error
    }
    if (more.length === 0) break
    parts.push(more)
    length += more.length
  }
  return Buffer.concat(parts)
}
