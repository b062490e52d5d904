import {workerData} from 'node:worker_threads'

import {ChunkDecompressor} from '../../snapshot/decompressor.js'
import {openSpec} from '../../snapshot/spec.js'
import {eventfdSignal, setThreadNice} from '../../sys/index.js'
import {DECODER_NICE, CONTROL_GENERATION, CONTROL_STARTED, CONTROL_STOP, SLOT_ERROR, SLOT_PENDING, SLOT_READY, type DecoderConfig} from './slots.js'

/**
 * A decoder: reads and verifies chunks into shared slots for the fault loop, so decompression
 * runs on other cores while the fault loop copies. Requests arrive and completions leave through
 * shared memory (the fault loop never runs an event loop); completion also pokes an eventfd to
 * wake the fault loop's poll. This thread never returns to its own event loop: it sleeps in
 * Atomics.wait until a request or the stop flag arrives.
 */
const config = workerData as DecoderConfig
// Decoding ahead must never take a core from the fault loop or the client: they preempt us,
// from the start (loading the codecs takes a while, and the fault loop may be serving already).
setThreadNice(DECODER_NICE)
// The codecs' native modules load first: a thread torn down while it loads them can abort the
// process, so the pool lets a decoder that has not said it started end by itself (close()), and a
// fault loop that stages a working set waits for this much before it serves.
new ChunkDecompressor()
const states = new Int32Array(config.states)
const lengths = new Int32Array(config.lengths)
const decodes = new Int32Array(config.decodes)
const shared = new Int32Array(config.shared)
const images = new Int32Array(config.images)
const units = new Int32Array(config.units)
const order = new Int32Array(config.order)
const claims = new Int32Array(config.claims)
const control = new Int32Array(config.control)
Atomics.add(control, CONTROL_STARTED, 1)
Atomics.notify(control, CONTROL_STARTED)
// Opened after saying so: unless it stages a working set first (which waits for the decoders'
// work), the fault loop serves meanwhile, decoding what faults itself, while a chain of layers
// takes a while to open and check here, at this thread's lower priority.
const readers = config.snapshots.map((spec) => openSpec(spec))
for (const reader of readers) reader.prepareDecoding()

const {affinity} = config

/** Claims the oldest unclaimed request (the oldest of this decoder's own units first, see DecoderConfig.affinity), or returns -1. */
function claim(): number {
  for (;;) {
    let best = -1
    let own = -1
    for (let s = 0; s < states.length; s++) {
      if (Atomics.load(states, s) !== SLOT_PENDING || Atomics.load(claims, s) !== 0) continue
      if (best < 0 || order[s] < order[best]) best = s
      if (affinity && units[s] % affinity.decoders === affinity.index && (own < 0 || order[s] < order[own])) own = s
    }
    const pick = own >= 0 ? own : best
    if (pick < 0) return -1
    // Another decoder may have claimed it between the scan and here: scan again.
    if (Atomics.compareExchange(claims, pick, 0, 1) === 0) return pick
  }
}

while (Atomics.load(control, CONTROL_STOP) === 0) {
  const generation = Atomics.load(control, CONTROL_GENERATION)
  const slot = claim()
  if (slot < 0) {
    Atomics.wait(control, CONTROL_GENERATION, generation)
    continue
  }
  const view = Buffer.from(config.arena, slot * config.slotBytes, config.slotBytes)
  const reader = readers[images[slot]]
  const before = reader.unitsDecoded
  const sharedBefore = reader.unitsShared
  try {
    lengths[slot] = reader.readPayload(units[slot], view).length
    decodes[slot] = reader.unitsDecoded - before
    shared[slot] = reader.unitsShared - sharedBefore
    Atomics.store(states, slot, SLOT_READY)
  } catch {
    // The fault loop decodes the chunk itself on ERROR and reports the real error with context.
    Atomics.store(states, slot, SLOT_ERROR)
  }
  Atomics.notify(states, slot)
  eventfdSignal(config.eventFd)
}
for (const reader of readers) reader.close()
