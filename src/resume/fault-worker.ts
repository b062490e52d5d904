import {parentPort, receiveMessageOnPort, workerData} from 'node:worker_threads'

import {SnapshotReader} from '../snapshot/reader.js'
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
} from '../sys/index.js'
import {Client, FatalServeError, FaultServer} from './fault-server.js'
import {type FromWorker, type ToWorker, type WorkerConfig} from './protocol.js'
import {RunStats} from './run-stats.js'

/**
 * The fault loop: one worker thread, synchronous system calls, every client's uffd in one poll
 * set. Synchronous calls in a worker cost about what C does (platform.md: 10.8 vs 11.9 µs per
 * 4 KiB fault); async calls or the main thread's event loop would add a wake-up per fault.
 */
const config = workerData as WorkerConfig
const stats = new RunStats(config.stats)
const reader = SnapshotReader.open(config.snapshotPath)
const server = new FaultServer(reader, stats, config.cacheBytes, {faultAroundBytes: config.faultAroundBytes}, config.startedAt)
const messages = Buffer.alloc(64 * UFFD_MSG_SIZE)

interface ClientState {
  client: Client
  pidfd: number
  socket: number
  /** Serving failed: the uffd stays open but unread, so the client stays frozen, never fed zeros. */
  failed: boolean
}

const clients = new Map<number, ClientState>()
let pollSet: PollSet
let polled: {kind: 'control' | 'uffd' | 'pidfd' | 'socket'; state?: ClientState}[] = []
let stopping = false

function post(message: FromWorker): void {
  parentPort!.postMessage(message)
}

function rebuildPollSet(): void {
  const entries: PollEntry[] = [{fd: config.controlFd, events: POLLIN}]
  polled = [{kind: 'control'}]
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

function handleControl(): void {
  eventfdDrain(config.controlFd)
  for (let m = receiveMessageOnPort(config.control); m; m = receiveMessageOnPort(config.control)) {
    const message = m.message as ToWorker
    if (message.type === 'stop') {
      stopping = true
    } else {
      const client = new Client(message.id, message.uffd, message.regions, reader.geometry)
      clients.set(message.id, {client, pidfd: message.pidfd, socket: message.socket, failed: false})
      stats.add('clients')
    }
  }
  rebuildPollSet()
}

function endClient(state: ClientState, reason: 'exited' | 'gone' | 'socket-closed'): void {
  clients.delete(state.client.id)
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
  post({type: 'fatal', id: state.client.id, message: error.message, code})
  rebuildPollSet()
}

/** Reads every queued message. Removals are applied at once; faults are queued to serve after. */
function drain(state: ClientState): void {
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
          break
        }
        case 'remap':
          stats.add('remapEvents')
          throw new FatalServeError(`the client moved memory with mremap (0x${m.from.toString(16)} -> 0x${m.to.toString(16)}), which this handler does not follow`, 'UNSUPPORTED_EVENT')
        case 'fork':
          stats.add('forkEvents')
          // A child's uffd we do not serve; closing it lets the child's faults be handled normally.
          closeFd(m.ufd)
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
    const outcome = server.serve(client, client.pending[0])
    if (outcome === 'retry') return 'retry'
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

function loop(): void {
  rebuildPollSet()
  post({type: 'ready'})
  let retry = false
  let lastActivity = performance.now()
  while (!stopping) {
    let timeout = -1
    if (retry) timeout = 1
    else if (config.spinMicros > 0 && (performance.now() - lastActivity) * 1000 < config.spinMicros) timeout = 0
    if (pollSet.wait(timeout) === 0 && !retry) continue
    lastActivity = performance.now()
    retry = false
    const snapshot = polled
    for (let i = 0; i < snapshot.length; i++) {
      const revents = pollSet.revents(i)
      if (revents === 0) continue
      const entry = snapshot[i]
      if (entry.kind === 'control') {
        handleControl()
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
    for (const state of [...clients.values()]) {
      if (state.failed || state.client.pending.length === 0) continue
      guarded(state, () => {
        const outcome = servePending(state)
        if (outcome === 'retry') retry = true
        if (outcome === 'gone') state.client.pending.length = 0
      })
    }
  }
  reader.close()
}

loop()
process.exit(0)
