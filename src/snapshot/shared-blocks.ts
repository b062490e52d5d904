import {type SnapshotReader} from './reader.js'

/**
 * Bytes of decoded layer blocks a chain keeps in memory every thread of the process reads. A
 * block of scattered pages serves many resolved chunks, in whatever order they fault, on
 * whichever thread (the fault loop, each decoder): decoded once per thread, a resume of a chain
 * of three scattered layers decoded every block three times. A layer's blocks hold its changed
 * pages only, so this holds every block of a chain of a few small layers.
 */
export const SHARED_BLOCK_BYTES_PER_CHAIN = 64 * 1024 * 1024

/** Structured-cloneable: posting it to a thread shares the memory, not a copy. */
export interface SharedBlocksShare {
  data: SharedArrayBuffer
  states: SharedArrayBuffer
}

const EMPTY = 0
const DECODING = 1
const READY = 2

/** How long a waiting thread sleeps before it looks again whether the decoding thread gave up. */
const WAIT_MS = 50

/**
 * The decoded layer blocks of one chain, in shared memory: each block that fits the budget has a
 * fixed place (the same in every thread: computed from the chain's files, in order), and a state
 * word. The first thread to want a block claims it, decodes it there after verifying its stored
 * bytes, and publishes it; the others wait for it (a decode of one block) or, when they must not
 * wait, decode it themselves. A published block is never written again: views handed out stay
 * valid for the life of the chain.
 */
export class SharedLayerBlocks {
  readonly share: SharedBlocksShare
  private readonly states: Int32Array
  /** Per file of the chain, per block: its slot number, or -1 when it has no room here. */
  private readonly slots: Int32Array[]
  private readonly places: {offset: number; length: number; source: number; block: number}[] = []
  /** The next slot this thread's warmOne looks at. */
  private warmCursor = 0

  constructor(files: readonly SnapshotReader[], share?: SharedBlocksShare, budget = SHARED_BLOCK_BYTES_PER_CHAIN) {
    let used = 0
    this.slots = files.map((file, source) => {
      const blocks = file.layer?.set.blocks ?? []
      return Int32Array.from(blocks, (entry, block) => {
        if (used + entry.payloadLength > budget) return -1
        this.places.push({offset: used, length: entry.payloadLength, source, block})
        used += entry.payloadLength
        return this.places.length - 1
      })
    })
    this.share = share ?? {data: new SharedArrayBuffer(used), states: new SharedArrayBuffer(4 * this.places.length)}
    if (this.share.data.byteLength !== used || this.share.states.byteLength !== 4 * this.places.length) {
      throw new RangeError(`shared layer blocks of ${this.share.data.byteLength} bytes / ${this.share.states.byteLength / 4} blocks do not fit this chain (${used} / ${this.places.length})`)
    }
    this.states = new Int32Array(this.share.states)
  }

  /**
   * Block `block` of `file` (the chain's file `source`), decoded and verified. 'no-room' when it
   * has no place here, or when another thread is decoding it and this one must not wait: the
   * caller decodes it into memory of its own. Undefined, without `wait`, when its stored bytes
   * are not on this host (see SnapshotReader.readPayloadIfLocal). A decode that throws leaves the
   * block unclaimed, for the next reader to fail on with its own report.
   */
  take(file: SnapshotReader, source: number, block: number, wait: boolean): Buffer | undefined | 'no-room' {
    const slot = this.slots[source]?.[block] ?? -1
    if (slot < 0) return 'no-room'
    const {offset, length} = this.places[slot]
    const view = Buffer.from(this.share.data, offset, length)
    for (;;) {
      const state = Atomics.compareExchange(this.states, slot, EMPTY, DECODING)
      if (state === READY) return view
      if (state === EMPTY) break
      if (!wait) return 'no-room'
      Atomics.wait(this.states, slot, DECODING, WAIT_MS)
    }
    let published = false
    try {
      const payload = wait ? file.readPayload(block, view) : file.readPayloadIfLocal(block, view)
      if (!payload) return undefined
      published = true
      return view
    } finally {
      Atomics.store(this.states, slot, published ? READY : EMPTY)
      Atomics.notify(this.states, slot)
    }
  }

  /**
   * Decodes one block no thread has decoded or claimed yet, without waiting on the network
   * (`files`: the chain's readers in this thread). False when none is left to do here. For a
   * decoder with nothing asked of it: the blocks are then decoded when a fault needs them.
   */
  warmOne(files: readonly SnapshotReader[]): boolean {
    while (this.warmCursor < this.places.length) {
      const slot = this.warmCursor++
      if (Atomics.load(this.states, slot) !== EMPTY) continue
      const {source, block} = this.places[slot]
      if (!files[source].isLocal(block)) continue
      this.take(files[source], source, block, false)
      return true
    }
    return false
  }
}
