import {type Worker} from 'node:worker_threads'

import {startWorker} from '../core/workers.js'
import {createEventfd, closeFd, eventfdDrain} from '../sys/index.js'

export const SLOT_FREE = 0
export const SLOT_PENDING = 1
export const SLOT_READY = 2
export const SLOT_ERROR = 3

export interface DecoderConfig {
  snapshotPath: string
  arena: SharedArrayBuffer
  slotBytes: number
  states: SharedArrayBuffer
  lengths: SharedArrayBuffer
  eventFd: number
}

export interface DecodeRequest {
  slot: number
  chunk: number
}

/**
 * Decoder threads that fill fixed slots of shared memory with verified chunk payloads, ahead of
 * the faults that will need them. Used from the synchronous fault loop: requests go out with
 * postMessage (never blocks), completions come back through slot states in shared memory and an
 * eventfd the fault loop polls.
 */
export class DecodePool {
  readonly eventFd: number
  private readonly workers: Worker[] = []
  private readonly arena: SharedArrayBuffer
  private readonly states: Int32Array
  private readonly lengths: Int32Array
  private readonly slotChunk: Int32Array
  private readonly bySlotChunk = new Map<number, number>()
  private next = 0

  constructor(
    snapshotPath: string,
    decoders: number,
    readonly slots: number,
    private readonly slotBytes: number,
  ) {
    this.eventFd = createEventfd()
    this.arena = new SharedArrayBuffer(slots * slotBytes)
    const states = new SharedArrayBuffer(slots * 4)
    const lengths = new SharedArrayBuffer(slots * 4)
    this.states = new Int32Array(states)
    this.lengths = new Int32Array(lengths)
    this.slotChunk = new Int32Array(slots).fill(-1)
    const config: DecoderConfig = {snapshotPath, arena: this.arena, slotBytes, states, lengths, eventFd: this.eventFd}
    for (let i = 0; i < decoders; i++) this.workers.push(startWorker(import.meta.url, 'decoder-worker', config))
  }

  /** The slot holding (or decoding) `chunk`, if any. */
  slotOf(chunk: number): number | undefined {
    return this.bySlotChunk.get(chunk)
  }

  get freeSlots(): number {
    let free = 0
    for (let s = 0; s < this.slots; s++) if (Atomics.load(this.states, s) === SLOT_FREE) free++
    return free
  }

  /** Starts decoding `chunk` if it is not already; false when no slot is free. */
  request(chunk: number): boolean {
    if (this.bySlotChunk.has(chunk)) return true
    for (let i = 0; i < this.slots; i++) {
      const slot = (this.next + i) % this.slots
      if (Atomics.load(this.states, slot) !== SLOT_FREE) continue
      this.next = slot + 1
      Atomics.store(this.states, slot, SLOT_PENDING)
      this.slotChunk[slot] = chunk
      this.bySlotChunk.set(chunk, slot)
      this.workers[chunk % this.workers.length].postMessage({slot, chunk} satisfies DecodeRequest)
      return true
    }
    return false
  }

  state(slot: number): number {
    return Atomics.load(this.states, slot)
  }

  /** Blocks until a pending slot is decoded (a demand fault needs exactly this chunk). */
  waitFor(slot: number): number {
    while (Atomics.load(this.states, slot) === SLOT_PENDING) Atomics.wait(this.states, slot, SLOT_PENDING, 1000)
    return Atomics.load(this.states, slot)
  }

  /** The decoded payload of a READY slot: valid until release(slot). */
  payload(slot: number): Buffer {
    return Buffer.from(this.arena, slot * this.slotBytes, this.lengths[slot])
  }

  chunkIn(slot: number): number {
    return this.slotChunk[slot]
  }

  release(slot: number): void {
    this.bySlotChunk.delete(this.slotChunk[slot])
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
    await Promise.all(this.workers.map((w) => w.terminate()))
    closeFd(this.eventFd)
  }
}
