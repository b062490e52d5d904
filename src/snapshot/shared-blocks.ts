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

/**
 * The decoded layer blocks of one chain, in shared memory: each block that fits the budget has a
 * fixed place (the same in every thread: computed from the chain's files, in order), and a state
 * word. The first thread to want a block claims it, decodes it there after verifying its stored
 * bytes, and publishes it. A thread that finds a block being decoded does not wait for it: it
 * decodes the block into memory of its own (a rare duplicate decode), so no thread ever waits on
 * another, one that died or one at a lower priority (the decoders run niced). A published block
 * is never written again: views handed out stay valid for the life of the chain.
 */
export class SharedLayerBlocks {
  readonly share: SharedBlocksShare
  private readonly states: Int32Array
  /** Per file of the chain, per block: its slot number, or -1 when it has no room here. */
  private readonly slots: Int32Array[]
  private readonly places: {offset: number; length: number}[] = []

  constructor(files: readonly SnapshotReader[], share?: SharedBlocksShare, budget = SHARED_BLOCK_BYTES_PER_CHAIN) {
    let used = 0
    this.slots = files.map((file) => {
      const blocks = file.layer?.set.blocks ?? []
      return Int32Array.from(blocks, (entry) => {
        if (used + entry.payloadLength > budget) return -1
        this.places.push({offset: used, length: entry.payloadLength})
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
   * Block `block` of `file` (the chain's file `source`), decoded and verified. 'elsewhere' when
   * it has no place here, or another thread is decoding it now: the caller decodes it into memory
   * of its own. Undefined, without `wait`, when its stored bytes are not on this host (see
   * SnapshotReader.readPayloadIfLocal). A decode that throws leaves the block unclaimed, for the
   * next reader to fail on with its own report.
   */
  take(file: SnapshotReader, source: number, block: number, wait: boolean): Buffer | undefined | 'elsewhere' {
    const slot = this.slots[source]?.[block] ?? -1
    if (slot < 0) return 'elsewhere'
    const {offset, length} = this.places[slot]
    const view = Buffer.from(this.share.data, offset, length)
    const state = Atomics.compareExchange(this.states, slot, EMPTY, DECODING)
    if (state === READY) return view
    if (state === DECODING) return 'elsewhere'
    let published = false
    try {
      // A view of `view` (a block's payload is exactly its length), or undefined.
      const payload = wait ? file.readPayload(block, view) : file.readPayloadIfLocal(block, view)
      published = payload !== undefined
      return payload
    } finally {
      Atomics.store(this.states, slot, published ? READY : EMPTY)
    }
  }
}
