import {type Worker} from 'node:worker_threads'

import {UffdError} from '../../core/errors.js'
import {formatBytes} from '../../core/units.js'
import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {type LearnOutcome} from '../../snapshot/learn.js'
import {type OpenedSnapshot} from '../../snapshot/open.js'
import {acceptUnix, nativeBlockFill, poll, POLLIN, SysError} from '../../sys/index.js'
import {type FromWorker, type WorkerConfig} from '../protocol.js'
import {buildReport, type ResumeReport} from '../run-stats.js'
import {FaultLoopHost, servingSettings, type ServingSettings} from './fault-loop-host.js'
import {type GuestRegion} from './handshake.js'
import {Listener, removeStaleReadyFile} from './listener.js'
import {PrefetchHitSampler} from './prefetch-hits.js'

/** What every `uffd resume`, for a VMM or for CRIU, takes from the command line. */
export interface SessionOptions extends ServingSettings {
  /** For the first connection (and each Firecracker handshake, see handshakeTimeoutMs); 0 waits forever. */
  timeoutMs: number
  readyFile?: string
  /** Kill a client that can no longer be served correctly rather than leave it frozen. */
  kill: boolean
  statsFile?: string
  /** A fault-loop worker started early (prestartFaultLoop), for this session to give its settings to. */
  faultLoop?: Worker
  signal: AbortSignal
  log: (line: string) => void
  /** Receives a function that reports the statistics so far (for SIGUSR1). */
  onStats?: (current: () => ResumeReport) => void
  /**
   * The socket, already listening (and the ready file written): given when there is nothing to
   * stage before the first client, so that a VMM can connect while the fault-loop worker starts.
   * Its handshake is read meanwhile and the client queued for the worker. Without it the session
   * listens once the worker is ready (the working set staged). The session closes it. Serving
   * several snapshots (`also`), one listener per socket, the first's first.
   */
  listeners?: Listener[]
  /**
   * More snapshots served by this handler beside `snapshot`, each to the clients of its own
   * socket (a VMM's handshake does not name a snapshot, so the socket does): one fault loop and
   * one decode pool for all, so layers over a common base share its decoded units.
   */
  also?: readonly AlsoServed[]
}

/** A snapshot served beside the first (--also SNAP=SOCKET). */
export interface AlsoServed {
  snapshot: OpenedSnapshot
  socketPath: string
}

export interface ClientSummary {
  id: number
  /** With --also: the socket it came on (which says the snapshot that served it). */
  socket?: string
  pid: number | null
  regions: GuestRegion[]
  /**
   * 'running' while it is served; 'frozen' once serving it failed and it was not killed
   * (--no-kill, or its process is unknown): its uffd is held, unread, until its process ends;
   * 'killed' from the moment this handler signalled it; else how the fault loop saw it end.
   */
  ended: 'exited' | 'gone' | 'socket-closed' | 'killed' | 'frozen' | 'running'
  /** Every page of its memory was delivered (it no longer depends on the handler). */
  complete?: boolean
  error?: {code: string; message: string}
}

export interface ResumeResult {
  socket: string
  clients: ClientSummary[]
  stats: ResumeReport
  /** The first fatal error, if any: the command exits non-zero with it. */
  error?: {code: string; message: string}
  /** Clients refused before they were served (--serve goes on without them), in arrival order. */
  rejected: {code: string; message: string}[]
  interrupted: boolean
  /** With --learn: whether this run was folded into the snapshot, and if not why. */
  learned?: LearnOutcome
}

/** What the fault-loop worker does beyond serving faults; each front end asks for its own. */
export type Prefetching = Pick<WorkerConfig, 'populateAll' | 'record' | 'countHits' | 'workingSetUnits' | 'keepWorkingSet' | 'also'>

/** accept4 errors that mean "no descriptors or memory for now", not a broken socket. */
const ACCEPT_EXHAUSTED = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM'])
/** How long accepting pauses after one of them: the pending connection stays queued meanwhile. */
const ACCEPT_PAUSE_MS = 200

/** How long a blocking accept or read lasts before it lets the event loop run (signals, worker messages). */
export const ACCEPT_SLICE_MS = 50
/** After killing a client, how long to wait for it to exit before giving up on it. */
export const KILL_WAIT_MS = 5000

/** A client as its front end hands it over: the fds are the worker's from then on. */
export interface ArrivingClient {
  pid: number | null
  uffd: number
  /** -1 if the pid is unknown. */
  pidfd: number
  /** The client's handshake socket, or -1. */
  socket: number
  regions: GuestRegion[]
  nonCooperative: boolean
  /** Which snapshot serves it: the index of the socket it came on (0: the first; see SessionOptions.also). */
  image?: number
}

/** The session as a front end sees it while it takes clients. */
export interface ClientIntake {
  readonly signal: AbortSignal
  log(line: string): void
  /**
   * The next connection on the socket, or null once stopped by a signal. Throws TIMEOUT, with
   * `timeoutMessage`, when none came before `deadline` (a Date.now() time; Infinity waits forever).
   */
  accept(deadline: number, timeoutMessage: string): Promise<number | null>
  /**
   * Waits up to one slice for a connection on the sockets or input on one of `watched` (fds of
   * the front end's own, such as connections whose handshakes are still arriving), then lets
   * signals and worker messages through. Returns the connection accepted, if any, with the index
   * of the socket it came on, and the watched fds that are readable (or hung up); null once
   * stopped by a signal.
   */
  waitForInput(watched: readonly number[]): Promise<{connection: number | null; socket: number; readable: number[]} | null>
  /** Closes the listening socket and removes its path: nobody else can connect. */
  stopListening(): void
  /** For a front end polling its own fds: lets signals and worker messages through. */
  yieldToEventLoop(): Promise<void>
  /** Hands a client to the fault loop. Returns its id. */
  add(client: ArrivingClient): number
  /**
   * A client that could not be taken, while the session goes on serving others: counted in the
   * result, not the session's error (one connecting peer must not decide how the run ends).
   */
  reject(error: {code: string; message: string}): void
  /** From now on every client's remaining memory is filled in the background. */
  populate(): void
}

/**
 * What differs between serving a VMM and serving CRIU's restored tasks: how clients arrive, when
 * serving is done, and how clients are killed when they must not run on (which the session only
 * asks for with kill on).
 */
export interface FrontEnd {
  readonly socketPath: string
  /** Whether a client whose memory is all present (the worker's 'complete') no longer depends on the handler. */
  readonly completionFreesClient: boolean
  /** Takes clients until no more will come or the session is stopped; the socket listens meanwhile. */
  admit(intake: ClientIntake): Promise<void>
  servingDone(clients: readonly ClientSummary[]): boolean
  /** `failed` can no longer be served. Returns the ids of the clients killed with it: none leaves it frozen. */
  killFailed(failed: ClientSummary, clients: readonly ClientSummary[]): number[]
  /** Stopping while `dependents` still need the handler. Returns the ids of the clients killed. */
  killDependents(dependents: readonly ClientSummary[], clients: readonly ClientSummary[]): number[]
  /** Serving failed with `error` while `running` still ran. */
  killAfterError(error: unknown, running: readonly ClientSummary[]): void
  /** The fault loop saw client `id` end (and closed its descriptors). */
  clientEnded(id: number): void
  /** Closes what admit kept open for the length of the session. */
  release(): void
}

export interface ServedSession {
  result: ResumeResult
  /** The worker's recording, when Prefetching.record asked for one. */
  recording?: {pages: number[]; firstTouchMs: number[]}
}

/**
 * Serves the clients `frontEnd` brings until it says serving is done, or a signal: starts the
 * fault-loop worker, listens once the worker is ready, follows the worker's reports on each
 * client, and returns what happened. Whatever ends it, no client is left running on a released
 * uffd (the kernel would fill its missing pages with zeros): with kill on, clients that still
 * depend on the handler are killed; with kill off, they stay frozen until the handler ends.
 */
export async function serveClients(options: SessionOptions, frontEnd: FrontEnd, prefetching: Prefetching): Promise<ServedSession> {
  return new ServingSession(options, frontEnd, prefetching).run()
}

export function writeStatsFile(statsFile: string | undefined, report: ResumeReport): void {
  if (statsFile) writeFileAtomically(statsFile, `${JSON.stringify(report, null, 2)}\n`)
}

class ServingSession implements ClientIntake {
  readonly signal: AbortSignal
  private readonly startedAt = new Date()
  private readonly host: FaultLoopHost
  private readonly clients = new Map<number, ClientSummary>()
  /** Clients this handler killed: they end as 'killed', and are waited for. */
  private readonly killed = new Set<number>()
  /** Clients whose end the fault loop has not reported yet (whatever their summary says). */
  private readonly live = new Set<number>()
  private readonly hitSampler: PrefetchHitSampler | undefined
  private firstError: {code: string; message: string} | undefined
  private readonly rejected: {code: string; message: string}[] = []
  private recording: ServedSession['recording']
  /** The sockets, once listening: the first snapshot's, then each of `also`'s. */
  private listeners: Listener[] | undefined
  private nextId = 1
  /** Until when accepting is paused after accept4 ran out of descriptors or memory. */
  private acceptPausedUntil = 0
  private acceptExhausted = false

  constructor(
    private readonly options: SessionOptions,
    private readonly frontEnd: FrontEnd,
    prefetching: Prefetching,
  ) {
    this.signal = options.signal
    this.listeners = options.listeners
    this.host = new FaultLoopHost({...servingSettings(options), ...prefetching}, options.faultLoop)
    options.onStats?.(() => this.report())
    this.hitSampler = prefetching.countHits ? new PrefetchHitSampler(this.host.stats, this.clients) : undefined
  }

  async run(): Promise<ServedSession> {
    const {options, frontEnd, host} = this
    const {events} = host
    let interrupted = false
    if (options.readyFile && !this.listeners) removeStaleReadyFile(options.readyFile)
    try {
      // Listening already: the worker's messages, 'ready' among them, arrive while clients are
      // admitted, and an added client is queued on its channel until it runs.
      if (!this.listeners) await events.next((m) => m.type === 'ready')
      events.onMessage = (m) => this.onWorkerMessage(m)
      if (!this.listeners) this.listen()
      this.hitSampler?.start()
      await frontEnd.admit(this)
      while (!options.signal.aborted && !frontEnd.servingDone(this.summaries())) await events.nextOrAbort(options.signal)
      interrupted = options.signal.aborted
      if (interrupted && options.kill) this.killDependents()
      await this.waitForKilled()
    } catch (error) {
      if (options.kill) frontEnd.killAfterError(error, this.summaries().filter((c) => c.ended === 'running'))
      throw error
    } finally {
      this.hitSampler?.stop()
      frontEnd.release()
      for (const listener of this.listeners ?? []) listener.close()
      await host.stop()
    }
    const stats = this.report()
    return {result: {socket: frontEnd.socketPath, clients: this.summaries(), stats, error: this.firstError, rejected: this.rejected, interrupted}, recording: this.recording}
  }

  private report(): ResumeReport {
    const {snapshot, also = []} = this.options
    return buildReport(
      this.host.stats,
      snapshot.name,
      this.startedAt,
      Date.now(),
      snapshot.report(...also.map((a) => a.snapshot)),
      also.map((a) => a.snapshot.name),
    )
  }

  async accept(deadline: number, timeoutMessage: string): Promise<number | null> {
    for (;;) {
      if (this.signal.aborted) return null
      if (Date.now() > deadline) throw new UffdError('TIMEOUT', timeoutMessage)
      const connection = this.tryAccept(ACCEPT_SLICE_MS)
      if (connection !== null) return connection
      // Paused (out of descriptors): tryAccept returned at once; wait out the pause, not spin.
      if (this.acceptPaused()) await new Promise((resolve) => setTimeout(resolve, Math.min(ACCEPT_SLICE_MS, this.acceptPausedUntil - performance.now())))
      await this.yieldToEventLoop()
    }
  }

  async waitForInput(watched: readonly number[]): Promise<{connection: number | null; socket: number; readable: number[]} | null> {
    if (this.signal.aborted) return null
    // poll ignores a negative fd: while accepting is paused, only the pending handshakes are watched.
    const listening = this.listenFds().map((fd) => (this.acceptPaused() ? -1 : fd))
    const revents = poll([...listening.map((fd) => ({fd, events: POLLIN})), ...watched.map((fd) => ({fd, events: POLLIN}))], ACCEPT_SLICE_MS)
    // One connection a wait: one waiting on another socket is accepted on the next.
    const socket = listening.findIndex((_, i) => revents[i] !== 0)
    const connection = socket >= 0 ? this.tryAccept(0, socket) : null
    const readable = watched.filter((_, i) => revents[listening.length + i] !== 0)
    await this.yieldToEventLoop()
    return {connection, socket: Math.max(0, socket), readable}
  }

  /**
   * Accepts a connection, or returns null: none came, or the handler is out of descriptors or
   * memory for now. A peer holding many connections open (each pending handshake is a descriptor)
   * must not end serving for everyone: accepting pauses a moment and resumes on its own.
   */
  private tryAccept(timeoutMs: number, socket = 0): number | null {
    if (this.acceptPaused()) return null
    try {
      const connection = acceptUnix(this.listenFds()[socket], timeoutMs)
      if (connection !== null) this.acceptExhausted = false
      return connection
    } catch (error) {
      if (!(error instanceof SysError) || !ACCEPT_EXHAUSTED.has(error.code)) throw error
      this.acceptPausedUntil = performance.now() + ACCEPT_PAUSE_MS
      // Said once until a connection is accepted again, not every pause.
      if (!this.acceptExhausted) this.log(`cannot accept a connection now (${error.code}); serving goes on, accepting again every ${ACCEPT_PAUSE_MS} ms`)
      this.acceptExhausted = true
      return null
    }
  }

  private acceptPaused(): boolean {
    return performance.now() < this.acceptPausedUntil
  }

  stopListening(): void {
    for (const listener of this.listeners ?? []) listener.stop()
  }

  private listenFds(): number[] {
    if (!this.listeners) throw new Error('the session accepts connections before it listens')
    return this.listeners.map((l) => l.fd)
  }

  async yieldToEventLoop(): Promise<void> {
    await this.host.events.yieldToEventLoop()
  }

  add(client: ArrivingClient): number {
    const id = this.nextId++
    const image = client.image ?? 0
    const socket = this.options.also?.length ? {socket: this.socketPaths()[image]} : {}
    this.clients.set(id, {id, ...socket, pid: client.pid, regions: client.regions, ended: 'running'})
    this.live.add(id)
    this.host.send({type: 'add', id, uffd: client.uffd, pidfd: client.pidfd, socket: client.socket, regions: client.regions, nonCooperative: client.nonCooperative, image})
    return id
  }

  reject(error: {code: string; message: string}): void {
    this.rejected.push(error)
  }

  populate(): void {
    this.host.send({type: 'populate'})
  }

  log(line: string): void {
    this.options.log(line)
  }

  private listen(): void {
    const {options, host} = this
    const staged = host.stats.get('stagedUnits')
    if (staged) {
      const fill = nativeBlockFill ? 'installed by native/libuffd_fill' : 'installed page by page in JavaScript (native/libuffd_fill not loaded)'
      this.log(`working set staged: ${staged} units, ${formatBytes(host.stats.get('stagedBytes'))} decoded in ${Math.round(host.stats.get('stagedMs'))} ms; ${fill}`)
    }
    this.listeners = Listener.openAll(this.socketPaths(), options.readyFile, (line) => this.log(line))
  }

  /** Every socket served: the first snapshot's, then each of `also`'s. */
  private socketPaths(): string[] {
    return [this.frontEnd.socketPath, ...(this.options.also ?? []).map((a) => a.socketPath)]
  }

  private onWorkerMessage(m: FromWorker): void {
    switch (m.type) {
      case 'client-ended': {
        const c = this.clients.get(m.id)
        // A frozen client's process is gone now: that is how it ended.
        if (c && (c.ended === 'running' || c.ended === 'frozen')) c.ended = this.killed.has(m.id) ? 'killed' : m.reason
        this.live.delete(m.id)
        this.frontEnd.clientEnded(m.id)
        this.log(`client ${m.id} ended (${m.reason})`)
        break
      }
      case 'forked': {
        const killed = this.killed.has(m.parent)
        // The fork happened before the event was read: a child of a killed client was killed with it.
        this.clients.set(m.id, {id: m.id, pid: null, regions: this.clients.get(m.parent)?.regions ?? [], ended: killed ? 'killed' : 'running'})
        this.live.add(m.id)
        if (killed) this.killed.add(m.id)
        this.log(`client ${m.parent} forked: its child is client ${m.id}`)
        break
      }
      case 'complete': {
        const c = this.clients.get(m.id)
        if (c && this.frontEnd.completionFreesClient) c.complete = true
        this.log(`client ${m.id}: all memory present`)
        break
      }
      case 'recording': {
        this.recording = {pages: m.pages, firstTouchMs: m.firstTouchMs}
        break
      }
      case 'fatal': {
        this.onFatal(m.id, {code: m.code, message: m.message})
        break
      }
    }
  }

  private onFatal(id: number, error: {code: string; message: string}): void {
    const c = this.clients.get(id)
    if (c) c.error = error
    this.firstError ??= error
    this.log(`client ${id}: ${error.message}`)
    if (this.killed.has(id)) return
    const killed = this.options.kill && c ? this.frontEnd.killFailed(c, this.summaries()) : []
    this.markKilled(killed)
    // Not served any more whatever happens next: killed, or frozen until its process ends.
    if (c && c.ended === 'running') {
      c.ended = 'frozen'
      this.log(`client ${id} left frozen (${this.options.kill ? 'it could not be killed' : '--no-kill'}): its faults will not be served`)
    }
  }

  private killDependents(): void {
    const dependents = this.summaries().filter((c) => c.ended === 'running' && !c.complete && !this.killed.has(c.id))
    if (dependents.length > 0) this.markKilled(this.frontEnd.killDependents(dependents, this.summaries()))
  }

  /** A killed client's uffd is closed by the worker once its pidfd reports the exit. */
  private async waitForKilled(): Promise<void> {
    const until = Date.now() + KILL_WAIT_MS
    while (this.summaries().some((c) => c.pid !== null && this.killed.has(c.id) && this.live.has(c.id)) && Date.now() < until) {
      await this.host.events.nextOrTimeout(until - Date.now())
    }
  }

  /** Signalled clients are 'killed' from now on: their exit is only waited for. */
  private markKilled(ids: readonly number[]): void {
    for (const id of ids) {
      this.killed.add(id)
      const c = this.clients.get(id)
      if (c && this.live.has(id)) c.ended = 'killed'
    }
  }

  private summaries(): ClientSummary[] {
    return [...this.clients.values()]
  }
}
