import {availableParallelism} from 'node:os'
import {receiveMessageOnPort} from 'node:worker_threads'

import {UffdError} from '../../core/errors.js'
import {WorkingSetRecorder} from '../../format/working-set-recorder.js'
import {type ImageReader} from '../../snapshot/layered-reader.js'
import {openSpec, sharingDecoded, specLandedFd} from '../../snapshot/spec.js'
import {threadUnitCache} from '../../snapshot/unit-cache.js'
import {
  closeFd,
  decodeUffdMessage,
  eventfdDrain,
  isUserfaultfd,
  POLLERR,
  POLLHUP,
  POLLIN,
  pinThreadToCurrentCpu,
  type PollEntry,
  PollSet,
  readSome,
  readUffdMessages,
  setNonBlocking,
  SysError,
  UFFD_MSG_SIZE,
  type UffdMessage,
} from '../../sys/index.js'
import {type FromWorker, type ToWorker, type WorkerConfig} from '../protocol.js'
import {RunClock, RunStats} from '../run-stats.js'
import {Client, type PendingFault} from './client.js'
import {DecodePool} from './decode-pool.js'
import {FaultServer, smallestWindowBytes, zeroRunWindowPages} from './fault-server.js'
import {Installer, kernelFillCalls} from './installer.js'
import {DecodedUnits} from './payload-source.js'
import {Prefetcher} from './prefetch.js'

/** Longest wait for the decoders to start, and again for them to stage the working set. */
const STARTUP_WAIT_MS = 10_000
/** Longest stretch of prefetch work between two checks for demand faults. */
const PREFETCH_SLICE_MS = 0.5
/** Forked children get ids the main thread never hands out (it counts up from 1). */
const FIRST_FORK_ID = 1 << 30

/** How the loop talks to the main thread: control messages in (with an eventfd poke, since the loop sleeps in poll()), reports out. */
export interface LoopChannel {
  controlFd: number
  receive(): ToWorker | undefined
  post(message: FromWorker): void
}

/** What serves one snapshot's clients: its reader, units, fault policy and prefetch. */
export interface ImageParts {
  reader: ImageReader
  source: DecodedUnits
  server: FaultServer
  prefetcher: Prefetcher
  /** Units to prefetch for each of its clients as soon as it connects, in order. */
  workingSetUnits: number[]
  /** Working-set units to stage before the first client, at most. */
  stagedSlots: number
}

/** Everything the loop serves with, built from its settings by FaultLoop.start (or by a test). */
export interface LoopParts {
  config: Pick<WorkerConfig, 'keepWorkingSet' | 'countHits' | 'spinMicros' | 'kernelZeros'>
  /** The snapshots served: one, or several (--also); a client is served by images[client.image]. */
  images: ImageParts[]
  stats: RunStats
  clock: RunClock
  pool: DecodePool | undefined
  /**
   * The decoders are wanted from the first client on (--populate all, --serve, a working set,
   * object storage): they start with the loop, which is ready once they are. Else the first
   * request for one starts them (DecodePool.start) and the loop serves at once.
   */
  decodersAtOnce: boolean
  /** Records the first snapshot's clients (--record takes one snapshot). */
  recorder: WorkingSetRecorder | undefined
}

type Polled = {kind: 'control'} | {kind: 'decoded'} | {kind: 'landed'; fd: number} | {kind: 'uffd' | 'pidfd' | 'socket'; client: Client}

/**
 * The fault loop: one worker thread, synchronous system calls, every client's uffd in one poll
 * set. Synchronous calls in a worker cost about what C does; async calls or the main thread's
 * event loop would add a wake-up per fault. Demand faults always go first: prefetch work runs one
 * unit at a time, only when no fault is queued, and the loop polls (without sleeping) between
 * units.
 */
export class FaultLoop {
  private readonly clients = new Map<number, Client>()
  private readonly messages = Buffer.alloc(64 * UFFD_MSG_SIZE)
  private nextForkId = FIRST_FORK_ID
  /** After CRIU's restore finished: every client, forked ones too, is populated in the background. */
  private populating = false
  private stopping = false
  private pollSet = new PollSet([])
  private polled: Polled[] = []
  private readonly startedAt = performance.now()
  /** Clients whose queued faults all wait for bytes from object storage: served again when something lands. */
  private readonly waitingForBytes = new Set<Client>()

  /** Builds the loop's parts from the worker's settings: the snapshots, decoders, caches, installers, policies. */
  static start(config: WorkerConfig, channel: LoopChannel): FaultLoop {
    const stats = new RunStats(config.stats)
    const served = [{snapshot: config.snapshot, workingSetUnits: config.workingSetUnits}, ...(config.also ?? [])]
    // Opened in this one thread: chains over a common base share its decoded units here.
    const readers = served.map(({snapshot}) => openSpec(snapshot))
    for (const reader of readers) reader.prepareDecoding()
    const clock = new RunClock()
    const chunkSize = Math.max(...readers.map((r) => r.geometry.chunkSize))
    // Enough slots to keep every decoder busy with readahead queued behind, within ~8 MiB: a
    // decoded slot is installed as soon as the loop gets to it, so more in flight buys nothing
    // but resident memory (the arena's pages are touched as deep as requests ever queue).
    const readaheadSlots = Math.max(4 * config.decoders, Math.min(64, Math.floor((8 << 20) / chunkSize)))
    // Plus one per working-set unit staged before the first client, within stageBytes. Slots are
    // chunk-sized, but only the decoded bytes are ever touched, so only those take memory.
    // (Several snapshots share stageBytes, and --cache-mb in their caches below.)
    const cacheBytes = Math.floor(config.cacheBytes / served.length)
    const stageBytes = Math.floor(config.stageBytes / served.length)
    const stagedSlots = served.map(({workingSetUnits}) => (config.decoders > 0 ? Math.min(workingSetUnits.length, Math.floor(stageBytes / chunkSize)) : 0))
    const pool =
      config.decoders > 0
        ? new DecodePool(
            served.map(({snapshot}, image) => sharingDecoded(snapshot, readers[image])),
            config.decoders,
            readaheadSlots + stagedSlots.reduce((a, b) => a + b, 0),
            chunkSize,
          )
        : undefined
    const decodersAtOnce = pool !== undefined && (config.populateAll || config.keepWorkingSet || served.some(({snapshot, workingSetUnits}) => workingSetUnits.length > 0 || specLandedFd(snapshot) >= 0))
    if (decodersAtOnce) pool.start()
    // A helper thread installs most of each client's staged working set beside this one:
    // single-page copies cost ~2-3 µs each in the kernel and two threads copying run side by side.
    const installHelper = pool !== undefined && availableParallelism() > 1 && process.env.UFFD_INSTALL_HELPER !== '0'
    // Several snapshots: the decoded units of their files (a common base's chunks, which every
    // layer over it assembles its chunks from) are kept within --cache-mb again, so that a base
    // chunk one VMM faulted in is still decoded when a VMM of another layer faults on it.
    if (served.length > 1) threadUnitCache.reserveBaseEntries(config.cacheBytes / chunkSize)
    const images = served.map(({snapshot, workingSetUnits}, image): ImageParts => {
      const reader = readers[image]
      const source = new DecodedUnits(reader, pool, stats, cacheBytes, specLandedFd(snapshot), image)
      const installer = new Installer(kernelFillCalls, stats, reader.geometry.pageSize, reader.zeroMap, zeroRunWindowPages(reader))
      // Faults on packed working-set pages are served from their blocks only while those blocks are
      // being prefetched (not with --working-set none, nor for CRIU's restored processes).
      const packedWorkingSet = workingSetUnits.some((unit) => unit >= reader.index.length)
      const server = new FaultServer(reader, source, installer, stats, clock, {faultAroundBytes: config.faultAroundBytes, faultAroundMinBytes: config.faultAroundMinBytes === 'unit' ? smallestWindowBytes(reader) : config.faultAroundMinBytes, packedWorkingSet})
      const prefetcher = new Prefetcher(server, installer, source, reader, stats, clock, {readaheadBytes: config.readaheadBytes, populateAll: config.populateAll, decodeAhead: readaheadSlots, installHelper})
      return {reader, source, server, prefetcher, workingSetUnits, stagedSlots: stagedSlots[image]}
    })
    const recorder = config.record ? new WorkingSetRecorder(readers[0].geometry.pageCount) : undefined
    if (config.countHits) stats.set('hitsTracked', pinnedForHitCounting() ? 1 : 0)
    return new FaultLoop({config, images, stats, clock, pool, decodersAtOnce, recorder}, channel)
  }

  /** The worker's channel over a MessagePort and its eventfd. */
  static channelOf(config: WorkerConfig, post: (message: FromWorker) => void): LoopChannel {
    return {controlFd: config.controlFd, receive: () => receiveMessageOnPort(config.control)?.message as ToWorker | undefined, post}
  }

  constructor(
    private readonly parts: LoopParts,
    private readonly channel: LoopChannel,
  ) {
    for (const image of parts.images) image.source.stage(image.workingSetUnits, image.stagedSlots, parts.config.keepWorkingSet)
  }

  /** What serves `client`. */
  private imageOf(client: Client): ImageParts {
    return this.parts.images[client.image]
  }

  /** Serves until told to stop. */
  run(): void {
    const {pool, stats, images} = this.parts
    this.rebuildPollSet()
    // Ready means ready to serve at full speed: decoders wanted from the first client on are
    // waited for (if they never start, faults are decoded here), and a local snapshot's working
    // set is decoded before the socket listens (after a handshake, installing it then costs only
    // the copies); from object storage the set is fetched while the client connects: nothing
    // waits for the network. Decoders started by a first request are not waited for: until one
    // claims a request the loop takes it back for a fault that needs it and decodes it here (a
    // wait for them was most of a first fault's latency), and the pool lets a decoder still
    // loading its native modules end by itself (close()).
    const started = this.parts.decodersAtOnce && (pool?.waitUntilStarted(STARTUP_WAIT_MS) ?? false)
    const staged = {units: 0, bytes: 0}
    for (const image of images) {
      if (!started || image.stagedSlots === 0 || image.reader.remote) continue
      const done = image.source.waitUntilStaged(STARTUP_WAIT_MS)
      staged.units += done.units
      staged.bytes += done.bytes
    }
    if (staged.units > 0) {
      stats.set('stagedUnits', staged.units)
      stats.set('stagedBytes', staged.bytes)
      stats.set('stagedMs', performance.now() - this.startedAt)
    }
    this.channel.post({type: 'ready'})
    let retry = false
    let prefetchState: 'busy' | 'waiting' | 'idle' = 'idle'
    let lastActivity = performance.now()
    while (!this.stopping) {
      let timeout = -1
      if (retry) timeout = 1
      else if (prefetchState === 'busy' || (prefetchState === 'idle' && images.some((image) => image.prefetcher.hasWork()))) timeout = 0
      // Waiting for decoders: their eventfd wakes the loop; the bound is only a safety net.
      else if (prefetchState === 'waiting') timeout = 50
      // Faults set aside for remote bytes are woken by landedFd; the bound is a safety net for a
      // landing nobody signalled (another handler published the file, a reader saw it first).
      else if (this.waitingForBytes.size > 0) timeout = 200
      else if (this.parts.config.spinMicros > 0 && (performance.now() - lastActivity) * 1000 < this.parts.config.spinMicros) timeout = 0
      const ready = this.pollSet.wait(timeout)
      if (ready > 0) lastActivity = performance.now()
      const woken = this.handleReady(ready)
      if (woken.decoded) prefetchState = 'idle'
      const faults = this.serveQueuedFaults()
      retry = faults.retry
      // A new client faults at once (a vCPU resumes right after its handshake): poll its uffd
      // before starting on its prefetch.
      if (faults.stillQueued || retry || woken.clientAdded) continue
      const slice = this.prefetchSlice()
      prefetchState = slice.state
      retry = slice.retry
    }
    // Install helpers stop before the decode pool's eventfd and the clients' uffds close.
    for (const client of this.clients.values()) this.imageOf(client).prefetcher.removeClient(client)
    for (const image of images) image.reader.close()
    if (this.parts.recorder) this.channel.post({type: 'recording', ...this.parts.recorder.result()})
  }

  /** Stops the decoders: a worker torn down while one is still loading its native modules can abort the process. */
  async close(): Promise<void> {
    await this.parts.pool?.close()
  }

  /** Handles one poll's results; reports whether a client was added and whether decodes finished. */
  private handleReady(ready: number): {clientAdded: boolean; decoded: boolean} {
    // Handlers below may rebuild the poll set (a client added or ended): read this wait's
    // results from the set that was waited on, index for index with its entries.
    const waited = this.pollSet
    const entries = this.polled
    let clientAdded = false
    let decoded = false
    for (let i = 0; ready > 0 && i < entries.length; i++) {
      const revents = waited.revents(i)
      if (revents === 0) continue
      const entry = entries[i]
      if (entry.kind === 'control') {
        if (this.handleControl()) clientAdded = true
        continue
      }
      if (entry.kind === 'decoded') {
        // One pool decodes for every snapshot: each frees its own finished slots.
        for (const image of this.parts.images) image.source.reap()
        decoded = true
        continue
      }
      if (entry.kind === 'landed') {
        eventfdDrain(entry.fd)
        this.waitingForBytes.clear()
        continue
      }
      const {client} = entry
      if (!this.clients.has(client.id)) continue
      if (entry.kind === 'uffd') {
        if (revents & (POLLERR | POLLHUP)) this.endClient(client, 'gone')
        else {
          this.guarded(client, () => this.drain(client))
          // New faults may need only local bytes: try this client again, not only after a landing.
          this.waitingForBytes.delete(client)
        }
      } else if (entry.kind === 'pidfd') {
        this.endClient(client, 'exited')
      } else if (readSome(client.lifeline.socket, 256, 0).length === 0) {
        // Without a pidfd, the handshake socket closing is the only sign the client is gone.
        this.endClient(client, 'socket-closed')
      }
    }
    return {clientAdded, decoded}
  }

  private serveQueuedFaults(): {retry: boolean; stillQueued: boolean} {
    let retry = false
    let stillQueued = false
    for (const client of [...this.clients.values()]) {
      if (client.failed || client.pending.length === 0 || this.waitingForBytes.has(client)) continue
      this.guarded(client, () => {
        const outcome = this.servePending(client)
        if (outcome === 'wait') this.waitingForBytes.add(client)
        if (outcome === 'retry') retry = true
        if (outcome === 'gone') {
          client.pending.length = 0
          if (client.endsOnlyByFailedCopies) this.endClient(client, 'gone')
        }
      })
      if (client.pending.length > 0 && !this.waitingForBytes.has(client)) stillQueued = true
    }
    return {retry, stillQueued}
  }

  /**
   * Prefetch in slices: enough work per wake-up to outrun a client that faults continuously,
   * short enough that a fault arriving meanwhile waits well under a millisecond.
   */
  private prefetchSlice(): {state: 'busy' | 'waiting' | 'idle'; retry: boolean} {
    const sliceEnd = performance.now() + PREFETCH_SLICE_MS
    let state: 'busy' | 'waiting' | 'idle'
    let retry = false
    do {
      // One step of each snapshot's prefetch in turn: one with much to do does not starve another.
      state = 'idle'
      for (const {prefetcher} of this.parts.images) {
        const step = this.prefetchStep(prefetcher)
        if (step.retry) retry = true
        if (step.state === 'busy' || (step.state === 'waiting' && state === 'idle')) state = step.state
      }
    } while (state === 'busy' && !retry && performance.now() < sliceEnd)
    return {state, retry}
  }

  private prefetchStep(prefetcher: Prefetcher): {state: 'busy' | 'waiting' | 'idle'; retry: boolean} {
    let state: 'busy' | 'waiting' | 'idle'
    let retry = false
    const step = prefetcher.step()
    if (step.result === 'failed') {
      const client = this.clients.get(step.client.id)
      if (client) {
        this.guarded(client, () => {
          throw step.error
        })
      }
      state = 'busy'
    } else if (step.result === 'outcome') {
      const client = this.clients.get(step.client.id)
      if (step.outcome === 'retry') retry = true
      else if (client) {
        if (client.endsOnlyByFailedCopies) this.endClient(client, 'gone')
        else prefetcher.removeClient(client)
      }
      state = 'busy'
    } else {
      state = step.result
    }
    for (const client of prefetcher.completedClients()) this.channel.post({type: 'complete', id: client.id})
    return {state, retry}
  }

  private rebuildPollSet(): void {
    const entries: PollEntry[] = [{fd: this.channel.controlFd, events: POLLIN}]
    this.polled = [{kind: 'control'}]
    const {eventFd} = this.parts.images[0].source
    if (eventFd >= 0) {
      entries.push({fd: eventFd, events: POLLIN})
      this.polled.push({kind: 'decoded'})
    }
    for (const landedFd of this.landedFds()) {
      entries.push({fd: landedFd, events: POLLIN})
      this.polled.push({kind: 'landed', fd: landedFd})
    }
    for (const client of this.clients.values()) {
      if (!client.failed) {
        entries.push({fd: client.uffd, events: POLLIN})
        this.polled.push({kind: 'uffd', client})
      }
      if (client.lifeline.pidfd >= 0) {
        entries.push({fd: client.lifeline.pidfd, events: POLLIN})
        this.polled.push({kind: 'pidfd', client})
      } else if (client.lifeline.socket >= 0) {
        entries.push({fd: client.lifeline.socket, events: POLLIN})
        this.polled.push({kind: 'socket', client})
      }
    }
    this.pollSet = new PollSet(entries)
  }

  /** Each snapshot's landing eventfd, once (snapshots of one handler may share remote files' fetchers). */
  private landedFds(): number[] {
    return [...new Set(this.parts.images.map((image) => image.source.landedFd).filter((fd) => fd >= 0))]
  }

  /** Returns true when a client was added. */
  private handleControl(): boolean {
    let added = false
    eventfdDrain(this.channel.controlFd)
    for (let message = this.channel.receive(); message; message = this.channel.receive()) {
      if (message.type === 'stop') {
        this.stopping = true
      } else if (message.type === 'populate') {
        this.populating = true
        for (const client of this.clients.values()) if (!client.failed) this.imageOf(client).prefetcher.populate(client)
      } else {
        this.addClient(message)
        added = true
      }
    }
    this.rebuildPollSet()
    return added
  }

  private addClient(message: Extract<ToWorker, {type: 'add'}>): void {
    const {stats, clock, config} = this.parts
    const which = message.image ?? 0
    const image = this.parts.images[which]
    if (!image) throw new UffdError('INTERNAL', `client ${message.id} names snapshot ${which}, of ${this.parts.images.length} served`)
    const {reader, prefetcher} = image
    clock.start()
    const client = new Client(message.id, message.uffd, message.regions, reader.geometry, {pidfd: message.pidfd, socket: message.socket}, message.nonCooperative, undefined, which)
    if (config.countHits && message.pidfd >= 0) client.hitTrackingPidfd = message.pidfd
    this.clients.set(client.id, client)
    // Before anything is read or installed, while every page is missing: the zero ranges are
    // whole then (a first fault's window would make part of one present, and a run with a present
    // page is not handed over). A fault already queued in one finds it present and is woken.
    if (config.kernelZeros && !client.nonCooperative) this.guarded(client, () => image.server.handZerosToKernel(client))
    // Its first fault is likely queued already (a vCPU runs right after the handshake): serve
    // it before the bookkeeping below. What is left queued is served by the loop.
    this.guarded(client, () => {
      // A uffd created without O_NONBLOCK would make a read with nothing queued wait, and with
      // it every other client: this thread reads each one until it is empty.
      setNonBlocking(client.uffd, `making client ${client.id}'s userfaultfd non-blocking`)
      this.drain(client)
      if (this.servePending(client) === 'wait') this.waitingForBytes.add(client)
    })
    // (A client that could not be served stays frozen: nothing is prefetched into it.)
    if (!client.failed) prefetcher.addClient(client, image.workingSetUnits)
    stats.add('clients')
  }

  /** A restored process forked: serve the child through the uffd the event carried. */
  private addForkedClient(parent: Client, ufd: number): void {
    const {stats} = this.parts
    const {reader, prefetcher} = this.imageOf(parent)
    const child = parent.fork(this.nextForkId++, ufd, reader.geometry)
    this.clients.set(child.id, child)
    prefetcher.addClient(child)
    if (this.populating) prefetcher.populate(child)
    stats.add('clients')
    this.channel.post({type: 'forked', id: child.id, parent: parent.id})
    this.rebuildPollSet()
  }

  private endClient(client: Client, reason: 'exited' | 'gone' | 'socket-closed'): void {
    this.clients.delete(client.id)
    this.waitingForBytes.delete(client)
    this.imageOf(client).prefetcher.removeClient(client)
    for (const fd of [client.uffd, client.lifeline.pidfd, client.lifeline.socket]) {
      if (fd >= 0) closeFd(fd)
    }
    this.parts.stats.add('clientsEnded')
    this.channel.post({type: 'client-ended', id: client.id, reason})
    this.rebuildPollSet()
  }

  /** Serving this client is impossible: it stays frozen (its uffd open, unread) until the main thread kills it. */
  private failOn(client: Client, error: Error & {code?: string}): void {
    client.failed = true
    client.pending.length = 0
    this.imageOf(client).prefetcher.removeClient(client)
    this.channel.post({type: 'fatal', id: client.id, message: error.message, code: error.code ?? 'INTERNAL'})
    this.rebuildPollSet()
  }

  private guarded(client: Client, body: () => void): void {
    try {
      body()
    } catch (error) {
      if (error instanceof UffdError || error instanceof SysError) this.failOn(client, error)
      else throw error
    }
  }

  /** Reads every queued message. Removals are applied at once; faults are queued to serve after. */
  private drain(client: Client): void {
    // A helper thread installing into this client waits while events are read and applied (a
    // REMOVE must not be applied between its check of a page and its copy).
    const helper = client.helper
    helper?.holdGate()
    try {
      for (;;) {
        const count = readUffdMessages(client.uffd, this.messages)
        const now = performance.now()
        for (let i = 0; i < count; i++) this.applyMessage(client, decodeUffdMessage(this.messages, i), now)
        if (count < this.messages.length / UFFD_MSG_SIZE) return
      }
    } finally {
      helper?.releaseGate()
    }
  }

  /** Applies one message read from a client's uffd at time `readAt`. */
  applyMessage(client: Client, m: UffdMessage, readAt: number): void {
    const {stats} = this.parts
    const {pageSize} = this.imageOf(client).reader.geometry
    switch (m.kind) {
      case 'pagefault':
        client.pending.push({address: m.address, readAt})
        break
      case 'remove':
      case 'unmap': {
        stats.add(m.kind === 'remove' ? 'removeEvents' : 'unmapEvents')
        // From now on these pages read as zeros if touched: mark them removed in every region
        // they overlap, so no prefetch or fault-around refills them with snapshot data.
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
        if (!client.nonCooperative) throw new UffdError('UNSUPPORTED_EVENT', `the client moved memory with mremap (0x${m.from.toString(16)} -> 0x${m.to.toString(16)}), which this handler does not follow`)
        client.map.remap(m.from, m.to, m.len)
        break
      case 'fork': {
        stats.add('forkEvents')
        const problem = this.forkedUffdProblem(m.ufd)
        if (problem) throw new UffdError('UNSUPPORTED_EVENT', `a fork event named fd ${m.ufd}, ${problem}: not a userfaultfd the kernel made for a child; neither served nor closed`)
        // (The child's uffd has the flags its parent's was created with.)
        if (client.nonCooperative) {
          setNonBlocking(m.ufd, `making the userfaultfd of client ${client.id}'s child non-blocking`)
          this.addForkedClient(client, m.ufd)
        }
        // A child's uffd we do not serve; closing it lets the child's faults be handled normally.
        else closeFd(m.ufd)
        break
      }
      case 'unknown':
        throw new UffdError('UNSUPPORTED_EVENT', `unknown userfaultfd event 0x${m.event.toString(16)}`)
    }
  }

  /**
   * Why `fd`, named by a fork event, cannot be the child's uffd; undefined if it can. The kernel
   * delivers UFFD_EVENT_FORK by installing a new userfaultfd in the reader's fd table while the
   * event is read, so a genuine one is a userfaultfd this loop did not hold before. Any other
   * number names a descriptor of the handler's own (another client's uffd, an eventfd, the
   * snapshot, a socket): serving it would read another client's events, closing it would pull
   * it from under its owner.
   */
  private forkedUffdProblem(fd: number): string | undefined {
    const held = [this.channel.controlFd, this.parts.images[0].source.eventFd, ...this.landedFds()]
    for (const c of this.clients.values()) held.push(c.uffd, c.lifeline.pidfd, c.lifeline.socket)
    if (held.includes(fd)) return 'which this handler already uses'
    if (!isUserfaultfd(fd)) return 'which is not a userfaultfd'
    return undefined
  }

  /**
   * Serves queued faults in arrival order; stops at one that must wait for queued events. Faults
   * whose bytes are still in object storage are set aside (each vCPU waits for its own page, so
   * the others go ahead) and stay queued: 'wait' when only those are left.
   */
  private servePending(client: Client): 'ok' | 'retry' | 'gone' | 'wait' {
    const waiting: PendingFault[] = []
    try {
      return this.serveInOrder(client, waiting)
    } finally {
      client.pending.unshift(...waiting)
    }
  }

  private serveInOrder(client: Client, waiting: PendingFault[]): 'ok' | 'retry' | 'gone' | 'wait' {
    const {clock} = this.parts
    const {server, prefetcher} = this.imageOf(client)
    // (--record takes one snapshot: the first.)
    const recorder = client.image === 0 ? this.parts.recorder : undefined
    while (client.pending.length > 0) {
      const {outcome, window} = server.serve(client, client.pending[0])
      if (outcome === 'wait') {
        waiting.push(client.pending.shift()!)
        continue
      }
      if (outcome === 'retry') return 'retry'
      // 'gone' can come after the faulting page was served (the client exited while its window
      // was being filled): that fault still belongs to the working set.
      if (window) {
        // The whole window, faulting page first: a replay must prefetch what this fault
        // installed, or the same fault (on another page of the window) happens again.
        if (recorder) {
          const now = clock.now()
          recorder.record(window.page, now)
          for (let p = window.first; p < window.end; p++) recorder.record(p, now)
        }
        if (outcome === 'served') prefetcher.noteFault(client, window)
      }
      if (outcome === 'gone') return 'gone'
      client.pending.shift()
    }
    return waiting.length > 0 ? 'wait' : 'ok'
  }
}

/**
 * Hit counting clears the accessed bits of prefetched pages right after installing them, which
 * is exact only while this thread stays on one CPU (pinThreadToCurrentCpu says why). If it
 * cannot be pinned, hits are not counted: a count off by a batch of pages would be a wrong one.
 */
function pinnedForHitCounting(): boolean {
  try {
    pinThreadToCurrentCpu()
    return true
  } catch (error) {
    if (error instanceof SysError || error instanceof RangeError) return false
    throw error
  }
}
