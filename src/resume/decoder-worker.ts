import {parentPort, workerData} from 'node:worker_threads'

import {SnapshotReader} from '../snapshot/reader.js'
import {eventfdSignal} from '../sys/index.js'
import {SLOT_ERROR, SLOT_READY, type DecoderConfig, type DecodeRequest} from './decode-pool.js'

/**
 * A decoder: reads and verifies chunks into shared slots for the fault loop, so decompression
 * runs on other cores while the fault loop copies. Completion is published with Atomics (the
 * fault loop never runs an event loop to receive messages) and an eventfd poke to wake its poll.
 */
const config = workerData as DecoderConfig
const reader = SnapshotReader.open(config.snapshotPath)
const states = new Int32Array(config.states)
const lengths = new Int32Array(config.lengths)

parentPort!.on('message', (request: DecodeRequest) => {
  const view = Buffer.from(config.arena, request.slot * config.slotBytes, config.slotBytes)
  try {
    lengths[request.slot] = reader.readPayload(request.chunk, view).length
    Atomics.store(states, request.slot, SLOT_READY)
  } catch {
    // The fault loop decodes the chunk itself on ERROR and reports the real error with context.
    Atomics.store(states, request.slot, SLOT_ERROR)
  }
  Atomics.notify(states, request.slot)
  eventfdSignal(config.eventFd)
})
