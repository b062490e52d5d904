import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../../core/errors.js'
import {formatBytes} from '../../core/units.js'
import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {SnapshotReader} from '../../snapshot/reader.js'
import {attachedWorkingSet} from '../../snapshot/relayout.js'
import {parseSmaps, referencedPages} from './smaps.js'
import {
  acceptUnix,
  closeFd,
  listenUnix,
  nativeBlockFill,
  peerCredentials,
  pidfdOpen,
  recvWithFds,
  SysError,
} from '../../sys/index.js'
import {type GuestRegion, HandshakeError, MAX_HANDSHAKE_BYTES, parseHandshake, validateRegions} from './handshake.js'
import {FaultLoopHost, servingSettings} from './fault-loop-host.js'
import {type FromWorker, type ToWorker} from '../protocol.js'
import {buildReport, type ResumeReport, type RunStats} from '../run-stats.js'
import {checkMatches, chunksInTouchOrder, parseWorkingSet, type WorkingSetFile} from '../../format/working-set.js'

export interface ResumeOptions {
  snapshotPath: string
  socketPath: string
  /** For the first connection and each handshake; 0 waits forever. */
  timeoutMs: number
  readyFile?: string
  /** Keep accepting clients until stopped, instead of serving one. */
  serve: boolean
  /** Kill a client that can no longer be served correctly rather than leave it frozen. */
  kill: boolean
  cacheBytes: number
  faultAroundBytes: number
  spinMicros: number
  decoders: number
  readaheadBytes: number
  populateAll: boolean
  /** Write the pages that faulted, in first-touch order, here at exit. */
  recordFile?: string
  /** Prefetch this recorded working set for every client. */
  workingSetFile?: string
  statsFile?: string
  /** Count prefetch hits (clears prefetched pages' accessed bits, samples /proc/PID/smaps). */
  countHits?: boolean
  signal: AbortSignal
  log: (line: string) => void
  /** Receives a function that reports the statistics so far (for SIGUSR1). */
  onStats?: (current: () => ResumeReport) => void
}

export interface ClientSummary {
  id: number
  pid: number | null
  regions: GuestRegion[]
  ended: 'exited' | 'gone' | 'socket-closed' | 'killed' | 'running'
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
  interrupted: boolean
}

/** Handshake JSON can arrive after an empty first read; Firecracker's own handlers retry. */
const HANDSHAKE_READ_TRIES = 3
/** How long the accept loop blocks before it lets the event loop run (signals, worker messages). */
export const ACCEPT_SLICE_MS = 50
/** After killing a client, how long to wait for it to exit before giving up on it. */
export const KILL_WAIT_MS = 5000

/**
 * Runs `uffd resume`: listens on the socket, takes each client's handshake and uffd, and hands
 * them to the fault-loop worker; ends when the (single) client is gone, or on a signal. On a fatal
 * error a client is killed (unless kill is off, in which case its uffd stays open so it stays
 * frozen: a frozen VM is better than one reading zeros from a released uffd).
 */
export async function runResume(options: ResumeOptions): Promise<ResumeResult> {
  const reader = SnapshotReader.open(options.snapshotPath)
  const geometry = reader.geometry
  const identity = {logicalSize: geometry.logicalSize, pageSize: geometry.pageSize, headerCrc: reader.header.headerCrc}
  let workingSetUnits: number[]
  try {
    // A working set given on the command line wins over one attached to the snapshot.
    // An attached set is prefetched from its packed blocks when it has them (units after the
    // chunks, see SnapshotReader.unitCount), else as whole chunks.
    const packedUnits = reader.packed?.blocks.map((_, b) => reader.index.length + b)
    workingSetUnits = options.workingSetFile === 'none' ? [] : (packedUnits ?? attachedWorkingSet(reader)?.chunks ?? [])
    if (options.workingSetFile && options.workingSetFile !== 'none') {
      const set = parseWorkingSet(fs.readFileSync(options.workingSetFile, 'utf8'), options.workingSetFile)
      checkMatches(set, identity, options.workingSetFile)
      workingSetUnits = chunksInTouchOrder(set.pages, geometry.pagesPerChunk)
    }
  } finally {
    reader.close()
  }
  let recording: {pages: number[]; firstTouchMs: number[]} | undefined

  const startedAtDate = new Date()
  const loop = new FaultLoopHost({
    ...servingSettings(options),
    populateAll: options.populateAll,
    record: options.recordFile !== undefined,
    countHits: options.countHits ?? false,
    workingSetUnits,
    keepWorkingSet: options.serve,
  })
  const {stats, events} = loop
  const send = (message: ToWorker): void => loop.send(message)
  options.onStats?.(() => buildReport(stats, options.snapshotPath, startedAtDate))
  const clients = new Map<number, ClientSummary>()
  const pids = new Map<number, number>()
  let firstError: {code: string; message: string} | undefined

  let listenFd = -1
  let interrupted = false
  let hitSampler: NodeJS.Timeout | undefined
  /** Each client's last count of referenced pages in its guest memory. */
  const referenced = new Map<number, number>()
  const clock0 = performance.now()
  try {
    await events.next((m) => m.type === 'ready')
    listenFd = listenUnix(options.socketPath, {mode: 0o600})
    if (options.readyFile) writeFileAtomically(options.readyFile, `${JSON.stringify({socket: options.socketPath, pid: process.pid})}\n`)
    const staged = stats.get('stagedUnits')
    if (staged) {
      const fill = nativeBlockFill ? 'installed by native/libuffd_fill' : 'installed page by page in JavaScript (native/libuffd_fill not loaded)'
      options.log(`working set staged: ${staged} units, ${formatBytes(stats.get('stagedBytes'))} decoded in ${Math.round(stats.get('stagedMs'))} ms; ${fill}`)
    }
    options.log(`listening on ${options.socketPath}`)

    const onWorkerMessage = (m: FromWorker): void => {
      if (m.type === 'client-ended') {
        const c = clients.get(m.id)
        if (c && c.ended === 'running') c.ended = pids.has(m.id) && c.error && options.kill ? 'killed' : m.reason
        options.log(`client ${m.id} ended (${m.reason})`)
      } else if (m.type === 'recording') {
        recording = {pages: m.pages, firstTouchMs: m.firstTouchMs}
      } else if (m.type === 'complete') {
        options.log(`client ${m.id}: all memory present`)
      } else if (m.type === 'fatal') {
        const c = clients.get(m.id)
        const error = {code: m.code, message: m.message}
        if (c) c.error = error
        firstError ??= error
        const pid = pids.get(m.id)
        options.log(`client ${m.id}: ${m.message}`)
        if (options.kill && pid) {
          options.log(`killing client ${m.id} (pid ${pid}) rather than let it run on without its memory`)
          killQuietly(pid)
        } else {
          options.log(`client ${m.id} left frozen (--no-kill): its faults will not be served`)
        }
      }
    }
    events.onMessage = onWorkerMessage
    if (options.countHits) hitSampler = setInterval(() => sampleHits(stats, clients, referenced, geometry.pageSize, clock0), HIT_SAMPLE_MS)

    let nextId = 1
    let deadline = options.timeoutMs > 0 ? Date.now() + options.timeoutMs : Infinity
    while (!options.signal.aborted) {
      if (!options.serve && clients.size > 0) break
      if (Date.now() > deadline) throw new UffdError('TIMEOUT', `no client connected to ${options.socketPath} within ${options.timeoutMs / 1000} s`)
      const connection = acceptUnix(listenFd, ACCEPT_SLICE_MS)
      if (connection === null) {
        await events.yieldToEventLoop()
        continue
      }
      try {
        const accepted = takeHandshake(connection, options.timeoutMs, geometry)
        if (accepted === null) {
          // Connected and closed without a byte: a liveness probe (another `uffd resume` checking
          // whether this socket is in use, a health check), not a VMM. Keep waiting for the client.
          closeFd(connection)
          options.log('a connection closed without sending anything (a probe?); still waiting for a client')
          continue
        }
        const id = nextId++
        clients.set(id, {id, pid: accepted.pid, regions: accepted.regions, ended: 'running'})
        if (accepted.pid) pids.set(id, accepted.pid)
        send({type: 'add', id, uffd: accepted.uffd, pidfd: accepted.pidfd, socket: connection, regions: accepted.regions, nonCooperative: false})
        options.log(`client ${id}${accepted.pid ? ` (pid ${accepted.pid})` : ''}: ${accepted.regions.length} region(s), ${accepted.regions.reduce((s, r) => s + r.size, 0)} bytes`)
      } catch (error) {
        closeFd(connection)
        if (!(error instanceof HandshakeError || error instanceof SysError || error instanceof UffdError)) throw error
        if (!options.serve) throw error
        firstError ??= {code: error.code, message: error.message}
        options.log(`rejected a client: ${error.message}`)
      }
      if (!options.serve) {
        // One client: stop listening so the socket path no longer accepts anyone.
        closeFd(listenFd)
        listenFd = -1
        fs.rmSync(options.socketPath, {force: true})
      }
      deadline = Infinity
    }

    // Serve until every client is gone, or a signal.
    while (!options.signal.aborted && [...clients.values()].some((c) => c.ended === 'running')) {
      await events.nextOrAbort(options.signal)
    }
    interrupted = options.signal.aborted
    if (interrupted) {
      for (const [id, c] of clients) {
        if (c.ended !== 'running') continue
        const pid = pids.get(id)
        if (options.kill && pid) {
          options.log(`stopping: killing client ${id} (pid ${pid}), which cannot run on without this handler`)
          killQuietly(pid)
          c.ended = 'killed'
        }
      }
    }
    // A killed client's uffd is closed by the worker once its pidfd reports the exit.
    const killWait = Date.now() + KILL_WAIT_MS
    while (firstError && [...clients.values()].some((c) => c.ended === 'running' && c.error && options.kill) && Date.now() < killWait) {
      await events.nextOrTimeout(killWait - Date.now())
    }
  } catch (error) {
    // Whatever went wrong, a client must not outlive this handler with missing pages: once our
    // uffd is released the kernel fills them with zeros.
    if (options.kill) for (const [id, c] of clients) if (c.ended === 'running' && pids.has(id)) killQuietly(pids.get(id)!)
    throw error
  } finally {
    if (hitSampler) clearInterval(hitSampler)
    // A last sample while interrupted clients still live (an ended client keeps its last one).
    if (options.countHits) sampleHits(stats, clients, referenced, geometry.pageSize, clock0)
    if (listenFd >= 0) {
      closeFd(listenFd)
      fs.rmSync(options.socketPath, {force: true})
    }
    await loop.stop()
  }

  const report = buildReport(stats, options.snapshotPath, startedAtDate)
  if (options.recordFile) {
    if (!recording) throw new UffdError('NO_RECORDING', 'the fault loop ended without handing over its recording')
    const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, ...recording}
    writeFileAtomically(options.recordFile, `${JSON.stringify(set)}\n`)
  }
  if (options.statsFile) writeFileAtomically(options.statsFile, `${JSON.stringify(report, null, 2)}\n`)
  return {socket: options.socketPath, clients: [...clients.values()], stats: report, error: firstError, interrupted}
}

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
function takeHandshake(connection: number, timeoutMs: number, geometry: SnapshotReader['geometry']): AcceptedClient | null {
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
    const regions = validateRegions(parseHandshake(received.data), geometry)
    const {pid} = peerCredentials(connection)
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

/** How often a client's accessed bits are read for prefetch hits (~9 ms per GiB mapped). */
const HIT_SAMPLE_MS = 500

/**
 * Prefetch hits as of now: pages installed on demand are referenced by definition (UFFDIO_COPY
 * installs them accessed, and nothing clears them), prefetched ones only once touched (the
 * prefetcher clears their bits). So hits = referenced pages - demand-copied pages, summed over
 * clients, each client's count from its last sample while it lived.
 */
function sampleHits(stats: RunStats, clients: Map<number, ClientSummary>, referenced: Map<number, number>, pageSize: number, clock0: number): void {
  if (!stats.get('hitsTracked')) return
  for (const c of clients.values()) {
    if (c.ended !== 'running' || !c.pid) continue
    let text: string
    try {
      text = fs.readFileSync(`/proc/${c.pid}/smaps`, 'utf8')
    } catch {
      continue // exited meanwhile: its last sample stands
    }
    referenced.set(c.id, referencedPages(parseSmaps(text), c.regions.map((r) => ({start: r.baseHostVirtAddr, end: r.baseHostVirtAddr + r.size})), pageSize))
  }
  const prefetched = stats.get('prefetchCopiedPages')
  const demand = stats.get('pagesCopied') - prefetched
  const total = [...referenced.values()].reduce((a, b) => a + b, 0)
  const hits = Math.max(0, Math.min(prefetched, total - demand))
  stats.set('prefetchHits', hits)
  stats.set('prefetchWasted', prefetched - hits)
  stats.set('hitsSampledMs', performance.now() - clock0)
}

export function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL')
  } catch {
    // Already gone.
  }
}
