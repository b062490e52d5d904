import {UffdError} from '../../core/errors.js'
import {type Geometry} from '../../format/geometry.js'
import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {type LearnedRun} from '../../format/learned-runs.js'
import {type LearnOutcome} from '../../snapshot/learn.js'
import {SnapshotReader} from '../../snapshot/reader.js'
import {closeFd, dupFd, isUserfaultfd, sameOpenFile, SysError, uffdApiCompleted} from '../../sys/index.js'
import {type GuestRegion, HandshakeError, parseHandshake, SnapshotMismatchError, validateRegions} from './handshake.js'
import {PendingHandshake} from './pending-handshake.js'
import {killPeer, PEER_PIDFD, type Peer, peerAgain, peerOf} from './peer.js'
import {prefetchPlan} from './prefetch-plan.js'
import {type ClientIntake, type ClientSummary, type FrontEnd, type ResumeResult, serveClients, type SessionOptions, writeStatsFile} from './serving-session.js'
import {type ReadKeys} from '../../snapshot/sealing.js'
import {type WorkingSetFile} from '../../format/working-set.js'

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
  /** --learn: fold this run into the snapshot file at `path` at exit (remembering `keep` runs); `signal` stops the rewrite. */
  /** `keys`: the snapshot's, when it is sealed: the rewrite is sealed with them again. */
  learn?: {path: string; keep?: number; signal: AbortSignal; keys: ReadKeys}
}

/**
 * With --serve, the longest any connection may take to send its whole handshake, whatever
 * --timeout says: a VMM sends it right after it connects, and a peer that does not must not hold
 * a descriptor (or, dribbling, the main thread's attention) for long.
 */
export const SERVE_HANDSHAKE_MS = 10_000
/** Connections reading their handshakes at once; beyond, the oldest is refused (each holds fds). */
export const MAX_PENDING_HANDSHAKES = 64

/** How long one connection has to send its handshake (0: forever): --timeout, at most SERVE_HANDSHAKE_MS with --serve. */
export function handshakeTimeoutMs(options: Pick<ResumeOptions, 'timeoutMs' | 'serve'>): number {
  if (!options.serve) return options.timeoutMs
  return options.timeoutMs > 0 ? Math.min(options.timeoutMs, SERVE_HANDSHAKE_MS) : SERVE_HANDSHAKE_MS
}

/**
 * Runs `uffd resume`: listens on the socket, takes each client's handshake and uffd, and hands
 * them to the fault-loop worker; ends when the (single) client is gone, or on a signal. On a fatal
 * error a client is killed (unless kill is off, in which case its uffd stays open so it stays
 * frozen: a frozen VM is better than one reading zeros from a released uffd).
 */
export async function runResume(options: ResumeOptions): Promise<ResumeResult> {
  const {geometry, identity, workingSetUnits, givenSet} = await prefetchPlan(options.snapshot.reader, options.workingSetFile)
  // (--working-set FILE names one snapshot: resume refuses it with --also.)
  const also = await Promise.all((options.also ?? []).map(async (a) => ({served: a, plan: await prefetchPlan(a.snapshot.reader, options.workingSetFile)})))
  const geometries = [geometry, ...also.map((a) => a.plan.geometry)]
  const {result, recording} = await serveClients(options, new FirecrackerClients(options, geometries), {
    populateAll: options.populateAll,
    record: options.recordFile !== undefined || options.learn !== undefined,
    countHits: options.countHits ?? false,
    workingSetUnits,
    keepWorkingSet: options.serve,
    also: also.map((a) => ({snapshot: a.served.snapshot.spec(), workingSetUnits: a.plan.workingSetUnits})),
  })
  if ((options.recordFile || options.learn) && !recording) throw new UffdError('NO_RECORDING', 'the fault loop ended without handing over its recording')
  if (options.recordFile) {
    const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, ...recording!}
    writeFileAtomically(options.recordFile, `${JSON.stringify(set)}\n`)
  }
  writeStatsFile(options.statsFile, result.stats)
  if (options.learn) result.learned = await learn(options, options.learn, recording!, result, givenSet)
  return result
}

/**
 * Folds what this run touched into the snapshot (--learn). A run that failed, or served nobody,
 * teaches nothing; one interrupted after serving its clients does (CI stops handlers with SIGTERM).
 */
async function learn(options: ResumeOptions, learnOptions: NonNullable<ResumeOptions['learn']>, recording: LearnedRun, result: ResumeResult, givenSet: LearnedRun | undefined): Promise<LearnOutcome> {
  const {path} = learnOptions
  let outcome: LearnOutcome
  if (result.error) outcome = {folded: false, reason: `a client failed (${result.error.message})`, ms: 0}
  else if (result.clients.length === 0) outcome = {folded: false, reason: 'no client was served', ms: 0}
  else {
    // Loaded only with --learn: the rewrite loads the encoders and the working-set parser.
    const [{touchedInRun}, {foldIntoSnapshot}] = await Promise.all([import('../../format/learned-runs.js'), import('../../snapshot/learn.js')])
    let prefetched: LearnedRun | Error
    try {
      prefetched = await prefetchedInRun(options, givenSet)
    } catch (error) {
      // Whatever stops this run being learned (damaged learned runs, an unreadable file) must not
      // fail a resume that served its clients.
      if (!(error instanceof UffdError || error instanceof SysError || typeof (error as NodeJS.ErrnoException).code === 'string')) throw error
      prefetched = error as Error
    }
    outcome =
      prefetched instanceof Error
        ? {folded: false, reason: prefetched.message, ms: 0}
        : await foldIntoSnapshot(path, singleReader(options), touchedInRun(recording, prefetched), {keep: learnOptions.keep, signal: learnOptions.signal, keys: learnOptions.keys})
  }
  options.log(outcome.folded ? `learned: ${path} now remembers ${outcome.runs} run(s); ${outcome.pages} pages attached (${outcome.ms} ms)` : `not learned: ${outcome.reason}`)
  return outcome
}

/** The pages this run prefetched for its clients (`givenSet`: the --working-set FILE it read), with the times their set gives them. */
async function prefetchedInRun(options: ResumeOptions, givenSet: LearnedRun | undefined): Promise<LearnedRun> {
  if (options.workingSetFile === 'none') return {pages: [], firstTouchMs: []}
  if (givenSet) return givenSet
  const {prefetchedPages} = await import('../../snapshot/learn.js')
  return prefetchedPages(singleReader(options))
}

/** The snapshot as one file: --learn rewrites it (resume refuses --learn on a layer before serving). */
function singleReader(options: ResumeOptions): SnapshotReader {
  const {reader} = options.snapshot
  if (!(reader instanceof SnapshotReader)) throw new UffdError('INTERNAL', 'a layer reached --learn')
  return reader
}

/**
 * Firecracker's clients: each connects, sends its regions as JSON with its uffd in SCM_RIGHTS,
 * and is known by the process that connected (a pidfd taken at accept), which is what gets killed.
 */
class FirecrackerClients implements FrontEnd {
  readonly socketPath: string
  /** The VMM goes on using its uffd (balloon removals fault back in), so it needs the handler until it exits. */
  readonly completionFreesClient = false
  /**
   * What this thread keeps of each client being served (the worker has its own descriptors,
   * closed when it sees the client end): the peer to kill, and a duplicate of its uffd that
   * later handshakes are compared with. Dropped once the client ended.
   */
  private readonly served = new Map<number, {peer: Peer; uffd: number}>()
  /** kcmp is not available here: duplicate uffds go undetected (said once). */
  private kcmpMissing = false

  constructor(
    private readonly options: ResumeOptions,
    /** Of each socket's snapshot (the first's, then --also's): what its handshakes are checked against. */
    private readonly geometries: readonly Geometry[],
  ) {
    this.socketPath = options.socketPath
    if (!PEER_PIDFD) options.log("UFFD_PEERPIDFD=0: each client's pidfd is taken with pidfd_open of its pid, as before Linux 6.5")
  }

  /**
   * Accepts connections and reads their handshakes side by side, none waited for: a peer that
   * connects and sends nothing, or sends a byte at a time, holds up neither the other VMs nor a
   * signal. Each has its own deadline (handshakeTimeoutMs) from the moment it was accepted.
   */
  async admit(intake: ClientIntake): Promise<void> {
    const {options} = this
    const firstBy = options.timeoutMs > 0 ? Date.now() + options.timeoutMs : Infinity
    const handshakeMs = handshakeTimeoutMs(options)
    // In accept order, so that the oldest is the one given up when too many are pending.
    const pending = new Map<number, PendingHandshake>()
    /** The socket each pending connection came on (which snapshot its VMM is resumed from). */
    const socketOf = new Map<number, number>()
    // Once a peer other than a probe has connected, --timeout no longer bounds the wait for one.
    let connected = false
    try {
      for (;;) {
        if (!connected && pending.size === 0 && Date.now() > firstBy) {
          throw new UffdError('TIMEOUT', `no client connected to ${options.socketPath} within ${options.timeoutMs / 1000} s`)
        }
        const input = await intake.waitForInput([...pending.keys()])
        if (input === null) return
        if (input.connection !== null) {
          if (pending.size >= MAX_PENDING_HANDSHAKES) this.giveUpOldest(intake, pending)
          pending.set(input.connection, this.pendingHandshake(input.connection, handshakeMs))
          socketOf.set(input.connection, input.socket)
        }
        const now = Date.now()
        for (const [connection, handshake] of [...pending]) {
          const progress = handshake.step(input.readable.includes(connection), now)
          if (progress.state === 'reading') continue
          pending.delete(connection)
          if (progress.state === 'probe') {
            this.close(intake, connection, handshake.peer, false)
            intake.log('a connection closed without sending anything (a probe?); still waiting for a client')
            continue
          }
          connected = true
          const socket = socketOf.get(connection) ?? 0
          socketOf.delete(connection)
          const taken = progress.state === 'received' ? this.take(intake, connection, handshake.peer, progress, socket) : this.refuse(intake, connection, handshake.peer, progress.error, progress.clientWaits)
          if (taken && !options.serve) {
            // One client: stop listening so the socket path no longer accepts anyone.
            intake.stopListening()
            return
          }
        }
      }
    } finally {
      // Stopped (a signal, one client taken, an error) with handshakes still arriving: a VMM
      // that already sent its uffd waits on memory nobody will serve.
      for (const [connection, handshake] of pending) this.abandon(intake, connection, handshake)
    }
  }

  /** The handshake of a connection just accepted, with the process that made it (taken now: see peerOf). */
  private pendingHandshake(connection: number, handshakeMs: number): PendingHandshake {
    let peer: Peer
    try {
      peer = peerOf(connection)
    } catch (error) {
      closeFd(connection)
      throw error
    }
    return new PendingHandshake(connection, peer, handshakeMs > 0 ? Date.now() + handshakeMs : Infinity, handshakeMs)
  }

  /** Serves the client whose handshake `connection` received, or refuses it (see refuse); returns whether it is served. */
  private take(intake: ClientIntake, connection: number, acceptedPeer: Peer, received: {uffd: number; data: Buffer}, socket: number): boolean {
    let accepted: AcceptedClient
    try {
      accepted = acceptHandshake(received.uffd, received.data, this.geometries[socket])
    } catch (error) {
      return this.refuse(intake, connection, acceptedPeer, error, false)
    }
    let peer = acceptedPeer
    try {
      peer = peerAgain(connection, acceptedPeer)
      this.refuseIfServed(intake, accepted.uffd, peer)
    } catch (error) {
      closeFd(accepted.uffd)
      return this.refuse(intake, connection, peer, error, false)
    }
    // The worker closes its descriptors when it sees the client end; this thread keeps its own.
    let workerPidfd = -1
    let kept = -1
    try {
      if (peer.pidfd >= 0) workerPidfd = dupFd(peer.pidfd, 'duplicating a client\'s pidfd for the fault loop')
      kept = dupFd(accepted.uffd, 'keeping a client\'s userfaultfd to compare later handshakes with')
    } catch (error) {
      for (const fd of [workerPidfd, kept, accepted.uffd]) if (fd >= 0) closeFd(fd)
      return this.refuse(intake, connection, peer, error, true)
    }
    const id = intake.add({pid: peer.pid, uffd: accepted.uffd, pidfd: workerPidfd, socket: connection, regions: accepted.regions, nonCooperative: false, image: socket})
    this.served.set(id, {peer, uffd: kept})
    const on = this.geometries.length > 1 ? ` on ${socket === 0 ? this.socketPath : this.options.also![socket - 1].socketPath}` : ''
    intake.log(`client ${id}${peer.pid ? ` (pid ${peer.pid})` : ''}${on}: ${accepted.regions.length} region(s), ${accepted.regions.reduce((s, r) => s + r.size, 0)} bytes`)
    return true
  }

  /**
   * Throws DuplicateUffdError if `uffd` is the open file of a client already served: a client
   * that dup()ed its uffd and connected twice, or two processes sharing one. Served twice, each
   * client's faults and events would be read by whichever read first, and its memory installed
   * twice over. The first stays served, the second is refused and not killed: it is that very
   * client, or a process whose memory is not registered with a uffd made by another.
   */
  private refuseIfServed(intake: ClientIntake, uffd: number, peer: Peer): void {
    if (this.kcmpMissing) return
    for (const [id, client] of this.served) {
      let same: boolean
      try {
        same = sameOpenFile(uffd, client.uffd)
      } catch (error) {
        // A kernel without kcmp (CONFIG_KCMP off) or a policy that forbids it: the check is
        // skipped rather than every later VMM refused (fstat cannot stand in: before 5.12 all
        // userfaultfds share one inode).
        if (!(error instanceof SysError) || (error.code !== 'ENOSYS' && error.code !== 'EPERM')) throw error
        this.kcmpMissing = true
        intake.log(`cannot compare userfaultfds (kcmp: ${error.code}): a uffd sent on two connections would be served twice`)
        return
      }
      if (!same) continue
      const who = peer.pid === client.peer.pid ? 'by the same process' : `by pid ${peer.pid ?? 'unknown'}, where client ${id} is pid ${client.peer.pid ?? 'unknown'}`
      throw new DuplicateUffdError(`the userfaultfd that came with the message is the one client ${id} is already served through (sent again ${who}); it is served once`)
    }
  }

  /**
   * Closes a connection whose handshake failed with `error`: counted with --serve, else the run's
   * error (thrown). Returns false. Unless --no-kill, its sender is killed when it is a VMM left
   * waiting: its well-formed handshake does not fit the snapshot (it registered its memory with
   * the uffd it sent), or `clientWaits` (it sent an initialised uffd and the rest never came).
   */
  private refuse(intake: ClientIntake, connection: number, peer: Peer, error: unknown, clientWaits: boolean): false {
    this.close(intake, connection, peer, this.options.kill && (clientWaits || error instanceof SnapshotMismatchError))
    if (!(error instanceof SysError || error instanceof UffdError)) throw error
    if (!this.options.serve) throw error
    intake.reject({code: error.code, message: error.message})
    intake.log(`rejected a client: ${error.message}`)
    return false
  }

  /** Closes a connection not served and its peer's pidfd, killing the peer first if `kill`. */
  private close(intake: ClientIntake, connection: number, acceptedPeer: Peer, kill: boolean): void {
    let peer = acceptedPeer
    try {
      if (kill) {
        peer = peerAgain(connection, acceptedPeer)
        if (killPeer(peer)) intake.log(`killing the refused client (pid ${peer.pid}) rather than leave it waiting on memory nobody serves`)
        else if (peer.pidfd < 0) intake.log(`the refused client${peer.pid ? ` (pid ${peer.pid})` : ''} cannot be killed (no pidfd for it): it waits on memory nobody serves`)
      }
    } finally {
      closeFd(connection)
      if (peer.pidfd >= 0) closeFd(peer.pidfd)
    }
  }

  /**
   * Stopping with a handshake still arriving: not a refusal of the peer (not counted), but a VMM
   * that already sent its initialised uffd (read by now, or still in the socket) waits on memory
   * nobody will serve, so it is killed.
   */
  private abandon(intake: ClientIntake, connection: number, handshake: PendingHandshake): void {
    const clientWaits = handshake.abandon()
    if (clientWaits) intake.log(`no longer taking clients: closing a handshake still arriving${handshake.peer.pid ? ` (pid ${handshake.peer.pid})` : ''}, whose uffd came`)
    this.close(intake, connection, handshake.peer, this.options.kill && clientWaits)
  }

  /** Makes room for one more pending handshake: the connection waiting longest is refused. */
  private giveUpOldest(intake: ClientIntake, pending: Map<number, PendingHandshake>): void {
    const [connection, handshake] = pending.entries().next().value as [number, PendingHandshake]
    pending.delete(connection)
    const clientWaits = handshake.abandon()
    this.refuse(intake, connection, handshake.peer, new HandshakeError(`more than ${MAX_PENDING_HANDSHAKES} connections were sending their handshakes at once; the one waiting longest was closed`), clientWaits)
  }

  servingDone(clients: readonly ClientSummary[]): boolean {
    return !clients.some((c) => c.ended === 'running' || c.ended === 'frozen')
  }

  killFailed(failed: ClientSummary): number[] {
    return this.kill(failed, `killing client ${failed.id} (pid ${failed.pid}) rather than let it run on without its memory`) ? [failed.id] : []
  }

  killDependents(dependents: readonly ClientSummary[]): number[] {
    return dependents.filter((c) => this.kill(c, `stopping: killing client ${c.id} (pid ${c.pid}), which cannot run on without this handler`)).map((c) => c.id)
  }

  killAfterError(_error: unknown, running: readonly ClientSummary[]): void {
    for (const c of running) this.kill(c, undefined)
  }

  clientEnded(id: number): void {
    const client = this.served.get(id)
    if (!client) return
    this.served.delete(id)
    closeFd(client.uffd)
    if (client.peer.pidfd >= 0) closeFd(client.peer.pidfd)
  }

  release(): void {
    for (const id of [...this.served.keys()]) this.clientEnded(id)
  }

  /** SIGKILLs a client through its pidfd (never by pid: see peerOf). Returns whether a signal was sent. */
  private kill(client: ClientSummary, line: string | undefined): boolean {
    const peer = this.served.get(client.id)?.peer
    if (!peer || peer.pidfd < 0) return false
    if (line) this.options.log(line)
    try {
      return killPeer(peer)
    } catch (error) {
      this.options.log(`client ${client.id} could not be killed: ${(error as Error).message}`)
      return false
    }
  }
}

/** The uffd of a handshake is one a client is already served through. */
class DuplicateUffdError extends HandshakeError {}

/** A VMM whose handshake was accepted, with what it sent. */
interface AcceptedClient {
  uffd: number
  regions: GuestRegion[]
}

/**
 * Validates the handshake `data` that came with `uffd`; on any failure closes the uffd and
 * throws.
 */
function acceptHandshake(uffd: number, data: Buffer, geometry: Geometry): AcceptedClient {
  try {
    // Anything else would be polled and read as the client's uffd: a pipe's bytes decode as
    // events (a fork event names an fd number the handler would then close or serve).
    if (!isUserfaultfd(uffd)) throw new HandshakeError('the file descriptor that came with the message is not a userfaultfd')
    // Reading events from a uffd without UFFDIO_API fails (EINVAL), and no memory can have been
    // registered with it: a VMM completes the API and registers guest memory before it sends.
    if (!uffdApiCompleted(uffd)) throw new HandshakeError('the userfaultfd that came with the message was never initialised (UFFDIO_API), so no memory can be registered with it')
    const announced = parseHandshake(data)
    const regions = validateRegions(announced, geometry)
    return {uffd, regions}
  } catch (error) {
    closeFd(uffd)
    throw error
  }
}
