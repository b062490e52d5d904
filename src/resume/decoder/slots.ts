import {type SnapshotSpec} from '../../snapshot/spec.js'

// The shared memory between the fault loop's DecodePool and the decoder threads: slot states,
// the control cells and the settings each decoder starts with: the one file both sides share.

export const SLOT_FREE = 0
export const SLOT_PENDING = 1
export const SLOT_READY = 2
export const SLOT_ERROR = 3

/** Nice value of decoder threads (0 is the fault loop's and usually the client's). */
export const DECODER_NICE = 10

/** Int32 cells of DecoderConfig.control. */
export const CONTROL_STARTED = 0 // decoders that have loaded their modules and opened the snapshot
export const CONTROL_GENERATION = 1 // bumped on every request: idle decoders sleep on it
export const CONTROL_STOP = 2 // 1: decoders exit
export const CONTROL_CELLS = 3

export interface DecoderConfig {
  /** The snapshots the handler serves (one, or several with --also), opened in this one thread so chains over a common base share its decoded units. */
  snapshots: SnapshotSpec[]
  arena: SharedArrayBuffer
  slotBytes: number
  /** Per slot: state, payload length, unit to decode, request order, claimed by a decoder. */
  states: SharedArrayBuffer
  lengths: SharedArrayBuffer
  /** Per slot: stored units its decode read, and of them taken already decoded by another snapshot's chain. */
  decodes: SharedArrayBuffer
  shared: SharedArrayBuffer
  /** Per slot: which snapshot (index into snapshots) its unit is of. */
  images: SharedArrayBuffer
  units: SharedArrayBuffer
  order: SharedArrayBuffer
  claims: SharedArrayBuffer
  control: SharedArrayBuffer
  eventFd: number
  /**
   * Serving several snapshots: this decoder's number, of `decoders`. It takes the requests for
   * units numbered `index` modulo `decoders` first (the same unit of sibling layers assembles from
   * the same base chunk, which it then has decoded), others when it has none of its own.
   */
  affinity?: {index: number; decoders: number}
}
