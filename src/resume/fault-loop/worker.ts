import {availableParallelism} from 'node:os'
import {parentPort, receiveMessageOnPort, workerData} from 'node:worker_threads'

import {SnapshotReader} from '../../snapshot/reader.js'
import {
  closeFd,
  decodeUffdMessage,
  eventfdDrain,
  POLLERR,
  POLLHUP,
  POLLIN,
  type PollEntry,
  PollSet,
  readSome,
  readUffdMessages,
  SysError,
  UFFD_MSG_SIZE,
} from '../../sys/index.js'
import {DecodePool} from './decode-pool.js'
import {Client, FatalServeError, FaultServer} from './fault-server.js'
import {Prefetcher} from './prefetch.js'
import {type FromWorker, type ToWorker, type WorkerConfig} from '../protocol.js'
import {RunClock, RunStats} from '../run-stats.js'
import {WorkingSetRecorder} from '../../format/working-set.js'

/**
 * The fault loop: one worker thread, synchronous system calls, every client's uffd in one poll
 * set. Synchronous calls in a worker cost about what C does (platform.md: 10.8 vs 11.9 µs per
 * 4 KiB fault); async calls or the main thread's event loop would add a wake-up per fault.
 */
const config = workerData as WorkerConfig
const stats = new RunStats(config.stats)
const reader = SnapshotReader.open(config.snapshotPath)
const clock = new RunClock()
// Faults on packed working-set pages are served from their blocks only while those blocks are
// being prefetched (not with --working-set none, nor for CRIU's restored processes).
const packedWorkingSet = config.workingSetUnits.some((unit) => unit >= reader.index.length)
const server = new FaultServer(reader, stats, config.cacheBytes, {faultAroundBytes: config.faultAroundBytes, packedWorkingSet}, clock)
const messages = Buffer.alloc(64 * UFFD_MSG_SIZE)
/** Longest wait for the decoders to start, and again for them to stage the working set. */
const STARTUP_WAIT_MS = 10_000
/** Longest stretch of prefetch work between two checks for demand faults. */
const PREFETCH_SLICE_MS = 0.5
const {chunkSize} = reader.geometry
// Enough slots to keep every decoder busy with readahead queued behind, within ~64 MiB.
const readaheadSlots = Math.max(4 * config.decoders, Math.min(64, Math.floor((64 << 20) / chunkSize)))
// Plus one per working-set unit staged before the first client, within --cache-mb. Slots are
// chunk-sized, but only the decoded bytes are ever touched, so only those take memory.
const stagedSlots = config.decoders > 0 ? Math.min(config.workingSetUnits.length, Math.floor(config.cacheBytes / chunkSize)) : 0
const pool = config.decoders > 0 ? new DecodePool(config.snapshotPath, config.decoders, readaheadSlots + stagedSlots, chunkSize) : undefined
if (config.countHits) stats.set('hitsTracked', 1)
const recorder = config.record ? new WorkingSetRecorder(reader.geometry.pageCount) : undefined
// A helper thread installs most of each client's staged working set beside this one: single-page
// copies cost ~2-3 µs each in the kernel and two threads copying run side by side.
const installHelper = pool !== undefined && availableParallelism() > 1 && process.env.UFFD_INSTALL_HELPER !== '0'
const prefetcher = new Prefetcher(server, reader, pool, stats, {readaheadBytes: config.readaheadBytes, populateAll: config.populateAll, decodeAhead: readaheadSlots, installHelper}, clock, (client) =>
  post({type: 'complete', id: client.id}),
)
const startedAt = performance.now()
prefetcher.stage(config.workingSetUnits, stagedSlots, config.keepWorkingSet)

interface ClientState {
  client: Client
  pidfd: number
  socket: number
  /** Serving failed: the uffd stays open but unread, so the client stays frozen, never fed zeros. */
  failed: boolean
}

const clients = new Map<number, ClientState>()
/** Forked children get ids the main thread never hands out (it counts up from 1). */
let nextForkId = 1 << 30
/** After CRIU's restore finished: every client, forked ones too, is populated in the background. */
let populating = false
let pollSet: PollSet
let polled: {kind: 'control' | 'decoded' | 'uffd' | 'pidfd' | 'socket'; state?: ClientState}[] = []
let stopping = false

function post(message: FromWorker): void {
  parentPort!.postMessage(message)
}

function rebuildPollSet(): void {
  const entries: PollEntry[] = [{fd: config.controlFd, events: POLLIN}]
  polled = [{kind: 'control'}]
  if (pool) {
    entries.push({fd: pool.eventFd, events: POLLIN})
    polled.push({kind: 'decoded'})
  }
  for (const state of clients.values()) {
    if (!state.failed) {
      entries.push({fd: state.client.uffd, events: POLLIN})
      polled.push({kind: 'uffd', state})
    }
    if (state.pidfd >= 0) {
      entries.push({fd: state.pidfd, events: POLLIN})
      polled.push({kind: 'pidfd', state})
    } else if (state.socket >= 0) {
      entries.push({fd: state.socket, events: POLLIN})
      polled.push({kind: 'socket', state})
    }
  }
  pollSet = new PollSet(entries)
}

/** Returns true when a client was added. */
function handleControl(): boolean {
  let added = false
  eventfdDrain(config.controlFd)
  for (let m = receiveMessageOnPort(config.control); m; m = receiveMessageOnPort(config.control)) {
    const message = m.message as ToWorker
    if (message.type === 'stop') {
      stopping = true
    } else if (message.type === 'populate') {
      populating = true
      for (const state of clients.values()) if (!state.failed) prefetcher.populate(state.client)
    } else {
      clock.start()
      const client = new Client(message.id, message.uffd, message.regions, reader.geometry, message.nonCooperative)
      if (config.countHits && message.pidfd >= 0) client.hitTrackingPidfd = message.pidfd
      const state: ClientState = {client, pidfd: message.pidfd, socket: message.socket, failed: false}
      clients.set(message.id, state)
      // Its first fault is likely queued already (a vCPU runs right after the handshake): serve
      // it before the bookkeeping below. What is left queued is served by the loop.
      guarded(state, () => {
        drain(state)
        servePending(state)
      })
      // (A client that could not be served stays frozen: nothing is prefetched into it.)
      if (!state.failed) prefetcher.addClient(client, config.workingSetUnits)
      stats.add('clients')
      added = true
    }
  }
  rebuildPollSet()
  return added
}

/**
 * A restored process forked: serve the child through the uffd the event carried. The child's
 * pid is not in the event, so there is no pidfd: the child is gone when copies into it fail
 * with ESRCH (its mm is gone); a uffd never reports the end of its process by itself.
 */
function addForkedClient(parent: ClientState, ufd: number): void {
  const child = parent.client.fork(nextForkId++, ufd, reader.geometry)
  clients.set(child.id, {client: child, pidfd: -1, socket: -1, failed: false})
  prefetcher.addClient(child)
  if (populating) prefetcher.populate(child)
  stats.add('clients')
  post({type: 'forked', id: child.id, parent: parent.client.id})
  rebuildPollSet()
}

function endClient(state: ClientState, reason: 'exited' | 'gone' | 'socket-closed'): void {
  clients.delete(state.client.id)
  prefetcher.removeClient(state.client)
  for (const fd of [state.client.uffd, state.pidfd, state.socket]) {
    if (fd >= 0) closeFd(fd)
  }
  stats.add('clientsEnded')
  post({type: 'client-ended', id: state.client.id, reason})
  rebuildPollSet()
}

function fail(state: ClientState, error: Error, code: string): void {
  state.failed = true
  state.client.pending.length = 0
  prefetcher.removeClient(state.client)
  post({type: 'fatal', id: state.client.id, message: error.message, code})
  rebuildPollSet()
}

/** Reads every queued message. Removals are applied at once; faults are queued to serve after. */
function drain(state: ClientState): void {
  const {client} = state
  // A helper thread installing into this client waits while events are read and applied (a
  // REMOVE must not be applied between its check of a page and its copy).
  const helper = client.installHelper
  helper?.holdGate()
  try {
    drainHeld(state)
  } finally {
    helper?.releaseGate()
  }
}

function drainHeld(state: ClientState): void {
  const {client} = state
  const {pageSize} = reader.geometry
  for (;;) {
    const count = readUffdMessages(client.uffd, messages)
    const now = performance.now()
    for (let i = 0; i < count; i++) {
      const m = decodeUffdMessage(messages, i)
      switch (m.kind) {
        case 'pagefault':
          client.pending.push({address: m.address, readAt: now})
          break
        case 'remove':
        case 'unmap': {
          stats.add(m.kind === 'remove' ? 'removeEvents' : 'unmapEvents')
          // From now on these pages read as zeros if touched: mark them removed in every
          // region they overlap, so no prefetch or fault-around refills them with snapshot data.
          for (const r of client.map.all) {
            const start = Math.max(m.start, r.baseHostVirtAddr)
            const end = Math.min(m.end, r.baseHostVirtAddr + r.size)
            if (start >= end) continue
            const first = (r.offset + start - r.baseHostVirtAddr) / pageSize
            const pages = Math.ceil((end - start) / pageSize)
            client.states.markRemoved(Math.floor(first), pages)
            stats.add('removedPages', pages)
          }
          if (m.kind === 'unmap' && client.nonCooperative) client.map.unmap(m.start, m.end)
          break
        }
        case 'remap':
          stats.add('remapEvents')
          if (!client.nonCooperative) throw new FatalServeError(`the client moved memory with mremap (0x${m.from.toString(16)} -> 0x${m.to.toString(16)}), which this handler does not follow`, 'UNSUPPORTED_EVENT')
          client.map.remap(m.from, m.to, m.len)
          break
        case 'fork':
          stats.add('forkEvents')
          if (client.nonCooperative) addForkedClient(state, m.ufd)
          // A child's uffd we do not serve; closing it lets the child's faults be handled normally.
          else closeFd(m.ufd)
          break
        case 'unknown':
          throw new FatalServeError(`unknown userfaultfd event 0x${m.event.toString(16)}`, 'UNSUPPORTED_EVENT')
      }
    }
    if (count < messages.length / UFFD_MSG_SIZE) return
  }
}

/** Serves queued faults in arrival order; stops at one that must wait for queued events. */
function servePending(state: ClientState): 'ok' | 'retry' | 'gone' {
  const {client} = state
  while (client.pending.length > 0) {
    server.lastWindow.page = -1
    const outcome = server.serve(client, client.pending[0])
    if (outcome === 'retry') return 'retry'
    // 'gone' can come after the faulting page was served (the client exited while its window
    // was being filled): that fault still belongs to the working set.
    if (server.lastWindow.page >= 0) {
      // The whole window, faulting page first: a replay must prefetch what this fault
      // installed, or the same fault (on another page of the window) happens again.
      const now = clock.now()
      recorder?.record(server.lastWindow.page, now)
      for (let p = server.lastWindow.first; recorder && p < server.lastWindow.end; p++) recorder.record(p, now)
      if (outcome === 'served') prefetcher.noteFault(client, server.lastWindow.page, server.lastWindow.end)
    }
    if (outcome === 'gone') return 'gone'
    client.pending.shift()
  }
  return 'ok'
}

function guarded(state: ClientState, body: () => void): void {
  try {
    body()
  } catch (error) {
    if (error instanceof FatalServeError) fail(state, error, error.code)
    else if (error instanceof SysError) fail(state, error, error.code)
    else throw error
  }
}

/**
 * Demand faults always go first: prefetch work runs one chunk at a time, only when no fault is
 * queued, and the loop polls (without sleeping) between chunks.
 */
function loop(): void {
  rebuildPollSet()
  // Ready means ready to serve at full speed: decoders that are still loading would hold up the
  // first faults that need them. If they never start, faults are decoded here.
  const started = pool?.waitUntilStarted(STARTUP_WAIT_MS) ?? false
  // And the working set decoded: after a handshake, installing it then costs only the copies.
  const staged = started ? prefetcher.waitUntilStaged(STARTUP_WAIT_MS) : {units: 0, bytes: 0}
  if (staged.units > 0) {
    stats.set('stagedUnits', staged.units)
    stats.set('stagedBytes', staged.bytes)
    stats.set('stagedMs', performance.now() - startedAt)
  }
  post({type: 'ready'})
  let retry = false
  let prefetchState: 'busy' | 'waiting' | 'idle' = 'idle'
  let lastActivity = performance.now()
  while (!stopping) {
    let timeout = -1
    if (retry) timeout = 1
    else if (prefetchState === 'busy' || (prefetchState === 'idle' && prefetcher.hasWork())) timeout = 0
    // Waiting for decoders: their eventfd wakes the loop; the bound is only a safety net.
    else if (prefetchState === 'waiting') timeout = 50
    else if (config.spinMicros > 0 && (performance.now() - lastActivity) * 1000 < config.spinMicros) timeout = 0
    const ready = pollSet.wait(timeout)
    if (ready > 0) lastActivity = performance.now()
    retry = false
    // Handlers below may rebuild the poll set (a client added or ended): read this wait's
    // results from the set that was waited on, index for index with its entries.
    const waited = pollSet
    const snapshot = polled
    let clientAdded = false
    for (let i = 0; ready > 0 && i < snapshot.length; i++) {
      const revents = waited.revents(i)
      if (revents === 0) continue
      const entry = snapshot[i]
      if (entry.kind === 'control') {
        if (handleControl()) clientAdded = true
      } else if (entry.kind === 'decoded') {
        prefetcher.reap()
        prefetchState = 'idle'
      } else if (entry.kind === 'uffd' && clients.has(entry.state!.client.id)) {
        if (revents & (POLLERR | POLLHUP)) endClient(entry.state!, 'gone')
        else guarded(entry.state!, () => drain(entry.state!))
      } else if (entry.kind === 'pidfd' && clients.has(entry.state!.client.id)) {
        endClient(entry.state!, 'exited')
      } else if (entry.kind === 'socket' && clients.has(entry.state!.client.id)) {
        // Without a pidfd, the handshake socket closing is the only sign the client is gone.
        if (readSome(entry.state!.socket, 256, 0).length === 0) endClient(entry.state!, 'socket-closed')
      }
    }
    let faultsQueued = false
    for (const state of [...clients.values()]) {
      if (state.failed || state.client.pending.length === 0) continue
      guarded(state, () => {
        const outcome = servePending(state)
        if (outcome === 'retry') retry = true
        if (outcome === 'gone') {
          state.client.pending.length = 0
          if (state.pidfd < 0 && state.socket < 0) endClient(state, 'gone')
        }
      })
      if (state.client.pending.length > 0) faultsQueued = true
    }
    // A new client faults at once (a vCPU resumes right after its handshake): poll its uffd
    // before starting on its prefetch.
    if (faultsQueued || retry || clientAdded) continue
    // Prefetch in slices: enough work per wake-up to outrun a client that faults continuously,
    // short enough that a fault arriving meanwhile waits well under a millisecond.
    const sliceEnd = performance.now() + PREFETCH_SLICE_MS
    do {
      const step = prefetcher.step()
      if (step.result === 'failed') {
        const state = clients.get(step.client.id)
        if (state) guarded(state, () => {
          throw step.error
        })
        prefetchState = 'busy'
      } else if (step.result === 'outcome') {
        const state = clients.get(step.client.id)
        if (step.outcome === 'retry') retry = true
        else if (state && step.outcome === 'gone') {
          // Without a pidfd (a forked child), a failed copy is the only sign the process is gone.
          if (state.pidfd < 0 && state.socket < 0) endClient(state, 'gone')
          else prefetcher.removeClient(state.client)
        }
        prefetchState = 'busy'
      } else {
        prefetchState = step.result
      }
    } while (prefetchState === 'busy' && !retry && performance.now() < sliceEnd)
  }
  // Install helpers stop before the decode pool's eventfd and the clients' uffds close.
  for (const state of clients.values()) prefetcher.removeClient(state.client)
  reader.close()
  if (recorder) post({type: 'recording', ...recorder.result()})
}

loop()
// Stop the decoders before this thread exits: a worker torn down while it is still loading its
// native modules can abort the process.
await pool?.close()
process.exit(0)
