import {type Worker} from 'node:worker_threads'

import {RESUME_THREAD_LIMITS, startWorker} from '../../core/workers.js'
import {childSpec, type SnapshotSpec, specTransfer} from '../../snapshot/spec.js'
import {createEventfd, closeFd, eventfdDrain} from '../../sys/index.js'
import {CONTROL_CELLS, CONTROL_GENERATION, CONTROL_STARTED, CONTROL_STOP, type DecoderConfig, SLOT_ERROR, SLOT_FREE, SLOT_PENDING, SLOT_READY} from '../decoder/slots.js'

export {SLOT_ERROR, SLOT_FREE, SLOT_PENDING, SLOT_READY}

/**
 * Decoder threads that fill fixed slots of shared memory with verified chunk payloads, ahead of
 * the faults that will need them. Used from the synchronous fault loop, entirely through shared
 * memory: a request is a few stores and a futex wake (postMessage cost ~50 µs per request here,
 * more than decoding a small block); idle decoders sleep in Atomics.wait; completions come back
 * through slot states and an eventfd the fault loop polls. Decoders take the oldest request first.
 */
/** How long a stopped decoder may take to end by itself before it is terminated. */
const DECODER_STOP_MS = 10_000

export class DecodePool {
  readonly eventFd: number
  private readonly workers: Worker[] = []
  private readonly arena: SharedArrayBuffer
  private readonly states: Int32Array
  private readonly lengths: Int32Array
  /** Per slot: stored units its decode read (a chain's chunk is assembled from several files' units). */
  private readonly decodes: Int32Array
  /** Per slot: of those, units another snapshot's chain had decoded (shared through the thread's unit cache). */
  private readonly shared: Int32Array
  /** Per slot: the snapshot (of those the pool was made for) its unit is of. */
  private readonly slotImage: Int32Array
  private readonly slotChunk: Int32Array
  private readonly order: Int32Array
  private readonly claims: Int32Array
  private readonly control: Int32Array
  /** Slots by slotKey(image, unit). */
  private readonly bySlotChunk = new Map<number, number>()
  /** Per slot: its current decode has been counted (countOnce). */
  private readonly counted: Uint8Array
  private requests = 0
  /** What the decoders decode, one spec per snapshot (see start()). */
  private readonly served: readonly SnapshotSpec[]

  /**
   * `snapshots`: what the decoders decode, one snapshot or several (--also): each decoder opens
   * them all in its one thread, so that chains over a common base share its decoded units there.
   */
  constructor(
    snapshots: SnapshotSpec | readonly SnapshotSpec[],
    private readonly decoders: number,
    readonly slots: number,
    private readonly slotBytes: number,
  ) {
    this.eventFd = createEventfd()
    this.arena = new SharedArrayBuffer(slots * slotBytes)
    const states = new SharedArrayBuffer(slots * 4)
    const lengths = new SharedArrayBuffer(slots * 4)
    const decodes = new SharedArrayBuffer(slots * 4)
    const shared = new SharedArrayBuffer(slots * 4)
    const images = new SharedArrayBuffer(slots * 4)
    this.states = new Int32Array(states)
    this.lengths = new Int32Array(lengths)
    this.decodes = new Int32Array(decodes)
    this.shared = new Int32Array(shared)
    this.slotImage = new Int32Array(images)
    const units = new SharedArrayBuffer(slots * 4)
    const order = new SharedArrayBuffer(slots * 4)
    const claims = new SharedArrayBuffer(slots * 4)
    const control = new SharedArrayBuffer(CONTROL_CELLS * 4)
    this.slotChunk = new Int32Array(units).fill(-1)
    this.order = new Int32Array(order)
    this.claims = new Int32Array(claims)
    this.control = new Int32Array(control)
    this.counted = new Uint8Array(slots)
    this.served = Array.isArray(snapshots) ? snapshots : [snapshots as SnapshotSpec]
  }

  /**
   * Starts the decoder threads (once): on the first request, unless the owner knows they will be
   * wanted from the start. Until a request comes (a scan's readahead, a working set, a remote
   * chunk) there is nothing for them to do, and each thread's start-up (~100 ms of CPU, before
   * it can lower its priority) would compete with the first faults, which the fault loop decodes
   * itself meanwhile: scattered faults alone never start them.
   */
  start(): void {
    if (this.workers.length > 0) return
    const {served, decoders} = this
    const buffer = (view: Int32Array): SharedArrayBuffer => view.buffer as SharedArrayBuffer
    for (let i = 0; i < decoders; i++) {
      const specs = served.map((spec) => childSpec(spec))
      // (Several snapshots: a unit of one goes to the decoder that has the same unit of the others.)
      const affinity = served.length > 1 && decoders > 1 ? {index: i, decoders} : undefined
      const config: DecoderConfig = {
        snapshots: specs,
        arena: this.arena,
        slotBytes: this.slotBytes,
        states: buffer(this.states),
        lengths: buffer(this.lengths),
        decodes: buffer(this.decodes),
        shared: buffer(this.shared),
        images: buffer(this.slotImage),
        units: buffer(this.slotChunk),
        order: buffer(this.order),
        claims: buffer(this.claims),
        control: buffer(this.control),
        eventFd: this.eventFd,
        affinity,
      }
      this.workers.push(startWorker(import.meta.url, '../decoder/worker', config, specs.flatMap((spec) => specTransfer(spec)), RESUME_THREAD_LIMITS))
    }
  }

  /**
   * Blocks until every decoder thread is up (a thread takes ~100 ms to load its modules here):
   * a fault that waited for a decoder still starting would wait that long.
   */
  waitUntilStarted(timeoutMs: number): boolean {
    const deadline = performance.now() + timeoutMs
    for (let n = Atomics.load(this.control, CONTROL_STARTED); n < this.workers.length; n = Atomics.load(this.control, CONTROL_STARTED)) {
      const left = deadline - performance.now()
      if (left <= 0) return false
      Atomics.wait(this.control, CONTROL_STARTED, n, left)
    }
    return true
  }

  /** The slot holding (or decoding) `chunk` of snapshot `image`, if any. */
  slotOf(chunk: number, image = 0): number | undefined {
    return this.bySlotChunk.get(slotKey(image, chunk))
  }

  get freeSlots(): number {
    let free = 0
    for (let s = 0; s < this.slots; s++) if (Atomics.load(this.states, s) === SLOT_FREE) free++
    return free
  }

  /** Starts decoding `chunk` of snapshot `image` if it is not already; false when no slot is free. */
  request(chunk: number, image = 0): boolean {
    const key = slotKey(image, chunk)
    if (this.bySlotChunk.has(key)) return true
    this.start()
    // The lowest free slot: the arena's pages are touched (made resident) only as deep as the
    // most requests ever in flight at once, not all of them over time.
    for (let slot = 0; slot < this.slots; slot++) {
      if (Atomics.load(this.states, slot) !== SLOT_FREE) continue
      this.slotChunk[slot] = chunk
      this.slotImage[slot] = image
      this.counted[slot] = 0
      this.order[slot] = ++this.requests
      Atomics.store(this.claims, slot, 0)
      Atomics.store(this.states, slot, SLOT_PENDING)
      this.bySlotChunk.set(key, slot)
      Atomics.add(this.control, CONTROL_GENERATION, 1)
      Atomics.notify(this.control, CONTROL_GENERATION, 1)
      return true
    }
    return false
  }

  state(slot: number): number {
    return Atomics.load(this.states, slot)
  }

  /**
   * Takes a pending request back from the decoders when none has started on it, so a demand
   * fault that needs the chunk decodes it at once instead of waiting behind every request queued
   * before it. The caller then fills the slot and calls finish().
   */
  takeBack(slot: number): boolean {
    return Atomics.load(this.states, slot) === SLOT_PENDING && Atomics.compareExchange(this.claims, slot, 0, 1) === 0
  }

  /**
   * Hands a slot taken back, unfilled, to the decoders again: its bytes were not on this host,
   * and a decoder may wait for them where the fault loop must not.
   */
  giveBack(slot: number): void {
    Atomics.store(this.claims, slot, 0)
    Atomics.add(this.control, CONTROL_GENERATION, 1)
    Atomics.notify(this.control, CONTROL_GENERATION, 1)
  }

  /** The whole buffer of a slot, to decode into after takeBack(). */
  slotBuffer(slot: number): Buffer {
    return Buffer.from(this.arena, slot * this.slotBytes, this.slotBytes)
  }

  /** Publishes a slot filled by the caller after takeBack(): its payload length, or -1 on failure, and the stored units it read (`shared` of them decoded by another snapshot's chain). */
  finish(slot: number, length: number, decodes: number, shared = 0): void {
    if (length >= 0) this.lengths[slot] = length
    this.decodes[slot] = decodes
    this.shared[slot] = shared
    Atomics.store(this.states, slot, length >= 0 ? SLOT_READY : SLOT_ERROR)
  }

  /**
   * Blocks until a pending slot is decoded (a demand fault needs exactly this chunk), or at most
   * `timeoutMs`; returns its state.
   */
  waitFor(slot: number, timeoutMs = Infinity): number {
    const deadline = performance.now() + timeoutMs
    for (let left = timeoutMs; Atomics.load(this.states, slot) === SLOT_PENDING && left > 0; left = deadline - performance.now()) {
      Atomics.wait(this.states, slot, SLOT_PENDING, Math.min(1000, left))
    }
    return Atomics.load(this.states, slot)
  }

  /** The decoded payload of a READY slot: valid until release(slot). */
  payload(slot: number): Buffer {
    return Buffer.from(this.arena, slot * this.slotBytes, this.lengths[slot])
  }

  chunkIn(slot: number): number {
    return this.slotChunk[slot]
  }

  /** The snapshot whose unit the slot holds. */
  imageIn(slot: number): number {
    return this.slotImage[slot]
  }

  /**
   * The payload length of a READY slot the first time it is asked for since its request, else -1:
   * each decode is counted once, whether its slot is released or kept.
   */
  /** Stored units the decode of a slot read (count with countOnce's result). */
  unitsDecodedIn(slot: number): number {
    return this.decodes[slot]
  }

  /** Of those, the units another snapshot's chain had decoded. */
  unitsSharedIn(slot: number): number {
    return this.shared[slot]
  }

  countOnce(slot: number): number {
    if (this.counted[slot] || Atomics.load(this.states, slot) !== SLOT_READY) return -1
    this.counted[slot] = 1
    return this.lengths[slot]
  }

  release(slot: number): void {
    this.bySlotChunk.delete(slotKey(this.slotImage[slot], this.slotChunk[slot]))
    this.slotChunk[slot] = -1
    Atomics.store(this.states, slot, SLOT_FREE)
  }

  /** Slots whose decoding finished (READY or ERROR), in slot order. */
  finished(): number[] {
    eventfdDrain(this.eventFd)
    const done: number[] = []
    for (let s = 0; s < this.slots; s++) {
      const state = Atomics.load(this.states, s)
      if (state === SLOT_READY || state === SLOT_ERROR) done.push(s)
    }
    return done
  }

  async close(): Promise<void> {
    Atomics.store(this.control, CONTROL_STOP, 1)
    Atomics.add(this.control, CONTROL_GENERATION, 1)
    Atomics.notify(this.control, CONTROL_GENERATION)
    // A thread torn down while it loads its native modules (koffi, zstd-napi) can abort the whole
    // process, and a run can end before its decoders have loaded (faults do not always wait for
    // them): until every decoder has started, they are left to see the stop and end by
    // themselves (within a bound). Started ones are terminated at once: one may be waiting for a
    // remote chunk that never comes.
    const deadline = performance.now() + DECODER_STOP_MS
    while (Atomics.load(this.control, CONTROL_STARTED) < this.workers.length && this.workers.some((w) => w.threadId >= 0) && performance.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 5))
    }
    await Promise.all(this.workers.map((w) => w.terminate()))
    closeFd(this.eventFd)
  }
}

/** One number per (snapshot, unit): units are below 2^32 (u32 counts in the format). */
function slotKey(image: number, unit: number): number {
  return image * 2 ** 32 + unit
}
