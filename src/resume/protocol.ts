import {type SnapshotSpec} from '../snapshot/spec.js'
import {type MessagePort} from 'node:worker_threads'

import {type GuestRegion} from './main/handshake.js'

export type {GuestRegion}

/** What the main thread tells the fault-loop worker (over a MessagePort, with an eventfd poke). */
export type ToWorker =
  | {
      type: 'add'
      id: number
      uffd: number
      /** Becomes readable when the client process exits; -1 if its pid is unknown. */
      pidfd: number
      /** The client's handshake socket: EOF ends the client when there is no pidfd. */
      socket: number
      regions: GuestRegion[]
      /** A CRIU-restored task: follow fork/mremap/munmap (see Client). */
      nonCooperative: boolean
      /** The snapshot that serves it: 0 (also when absent), or 1 + its index in WorkerConfig.also. */
      image?: number
    }
  /** CRIU's restore finished: fill every client's remaining memory in the background from now on. */
  | {type: 'populate'}
  | {type: 'stop'}

/** What the worker tells the main thread. */
export type FromWorker =
  | {type: 'ready'}
  | {type: 'client-ended'; id: number; reason: 'exited' | 'gone' | 'socket-closed'}
  /** A client forked (UFFD_EVENT_FORK): the child is served as client `id`; its pid is unknown. */
  | {type: 'forked'; id: number; parent: number}
  /** Every page of the client's memory is present (or removed): it no longer faults. */
  | {type: 'complete'; id: number}
  /** The recorded working set (--record), sent when the worker stops. */
  | {type: 'recording'; pages: number[]; firstTouchMs: number[]}
  /** Serving this client failed; its uffd is kept open (so it stays frozen) until it is killed. */
  | {type: 'fatal'; id: number; message: string; code: string}

export interface WorkerConfig {
  /** How the worker opens the snapshot (its decoders get specs of their own from it). */
  snapshot: SnapshotSpec
  /** The decoded-chunk cache, shared by the snapshots served. */
  cacheBytes: number
  /** Decode-pool room for working sets decoded before the first client, shared likewise. */
  stageBytes: number
  /**
   * The largest fault-around window; it starts at faultAroundMinBytes (when given) and grows to
   * this while faults land near each other. 'unit': at each snapshot's smallest part that decodes
   * on its own (smallestWindowBytes: a frame of a framed file, else a chunk).
   */
  faultAroundBytes: number
  faultAroundMinBytes?: number | 'unit'
  /** Hand a VMM's large all-zero ranges to the kernel at connect (FaultServer.handZerosToKernel). */
  kernelZeros?: boolean
  /** Threads decoding chunks ahead of need (readahead, population); 0 decodes in the fault loop only. */
  decoders: number
  readaheadBytes: number
  populateAll: boolean
  /** Record first touches for --record. */
  record: boolean
  /** Clear the accessed bits of prefetched pages so the main thread can count prefetch hits. */
  countHits: boolean
  /**
   * Units to prefetch for every client as soon as it connects (--working-set), in order: chunks,
   * or packed working-set blocks (numbered after the chunks).
   */
  workingSetUnits: number[]
  /**
   * More snapshots to serve beside `snapshot` (--also), each with its own working set: one
   * worker and one decode pool for all, so chains over a common base share its decoded units.
   */
  also?: {snapshot: SnapshotSpec; workingSetUnits: number[]}[]
  /** Keep the staged working set in memory for later clients (--serve) instead of freeing it as it is installed. */
  keepWorkingSet: boolean
  /** Keep polling this long after the last message before sleeping (cuts cross-CPU wake-ups). */
  spinMicros: number
  stats: SharedArrayBuffer
  control: MessagePort
  controlFd: number
}
