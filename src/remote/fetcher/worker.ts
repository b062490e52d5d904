import {constants} from 'node:os'
import {type MessagePort, parentPort, workerData} from 'node:worker_threads'

import {UffdError} from '../../core/errors.js'
import {eventfdSignal} from '../../sys/index.js'
import {extentAt} from '../coalesce.js'
import {DiskCache, evict} from '../disk-cache.js'
import {remoteObject} from '../objects.js'
import {EXTENT_ABSENT, EXTENT_ASKED, EXTENT_FAILED, EXTENT_PRESENT, FAILED_HOLD_MS, type Priority, recordFailure, RemoteCounters, type RemoteShare} from '../shared.js'
import {FetchScheduler} from './scheduler.js'

/**
 * The fetcher: the one thread of a handler that talks to the object store. Readers (the fault
 * loop, decoders, the main thread) each hold a MessagePort to it and ask for extents by number;
 * it fetches them (FetchScheduler), publishes them into the cache directory and wakes the readers
 * through the extents' shared states. It runs an event loop (the AWS SDK and fetch are
 * asynchronous) and nothing else, so no reader's synchronous wait can stall it.
 */
const share = workerData as RemoteShare
const states = new Int32Array(share.states)
const counters = new RemoteCounters(share.counters)
const latency = new BigInt64Array(share.latency)
const cache = new DiskCache(share.cacheDir)
const table = {offsets: share.extentOffsets, lengths: share.extentLengths, crcs: share.extentCrcs}
const scheduler = new FetchScheduler(table, await remoteObject(share.location, share.s3, 1, share.fetch.concurrency), share.identity, share.fetch, counters, latency)

/** A want message: extents to fetch at a priority; a port message: a new reader's channel. */
export type FetcherMessage = {type: 'want'; priority: Priority; extents: number[]} | {type: 'port'; port: MessagePort}

function onMessage(message: FetcherMessage): void {
  if (message.type === 'port') {
    message.port.on('message', onMessage)
    return
  }
  for (const extent of message.extents) want(extent, message.priority)
}

function land(extent: number, state: number): void {
  Atomics.store(states, extent, state)
  Atomics.notify(states, extent)
  if (share.landedFd >= 0) eventfdSignal(share.landedFd)
}

/** Extents on their way (fetch, then store), so a second ask only raises the fetch's priority. */
const landing = new Set<number>()

function want(extent: number, priority: Priority): void {
  if (landing.has(extent)) {
    scheduler.promote(extent, priority)
    return
  }
  const state = Atomics.load(states, extent)
  if (state === EXTENT_PRESENT || state === EXTENT_FAILED) return
  const range = {offset: share.extentOffsets[extent], length: share.extentLengths[extent]}
  // Another handler sharing the cache may have fetched it since the reader looked.
  if (state !== EXTENT_ASKED && cache.has(range)) {
    counters.add('diskHits')
    land(extent, EXTENT_PRESENT)
    return
  }
  Atomics.store(states, extent, EXTENT_ASKED)
  landing.add(extent)
  scheduler
    .want(extent, priority)
    .then((bytes) => store(range, bytes))
    .then(
      () => land(extent, EXTENT_PRESENT),
      (error: Error) => fail(extent, error),
    )
    .finally(() => landing.delete(extent))
}

function fail(extent: number, error: Error & {code?: string}): void {
  recordFailure(share.failure, {code: error.code ?? 'INTERNAL', message: error.message})
  land(extent, EXTENT_FAILED)
  // Whoever waited has been woken and failed; a later ask tries the store again.
  setTimeout(() => Atomics.compareExchange(states, extent, EXTENT_FAILED, EXTENT_ABSENT), FAILED_HOLD_MS).unref()
}

let writtenSinceScan = 0
let scanning: Promise<void> | undefined

/** Writes a verified extent into the cache; on a full disk, evicts half of what the cache holds and tries once more. */
async function store(range: {offset: number; length: number}, bytes: Buffer): Promise<void> {
  try {
    cache.publish(range, bytes)
  } catch (error) {
    counters.add('cacheWriteErrors')
    const {code, errno} = error as {code?: string; errno?: number}
    // A quota is a full disk for this user: eviction frees it the same way. libuv has no name for
    // EDQUOT (Node reports it as an unknown system error), so it is matched by number.
    if (code !== 'ENOSPC' && errno !== -constants.errno.EDQUOT) throw cacheError(error)
    const held = await evict(share.cacheRoot, Infinity)
    const freed = await evict(share.cacheRoot, held.bytes / 2)
    forgetEvicted(freed)
    try {
      cache.publish(range, bytes)
    } catch (again) {
      throw cacheError(again)
    }
  }
  writtenSinceScan += bytes.length
  if (writtenSinceScan > share.cacheMaxBytes / 10) scheduleEviction()
}

function cacheError(error: unknown): UffdError {
  return new UffdError('CACHE_DIR', `cache directory ${share.cacheDir}: cannot store a fetched chunk (${(error as Error).message})`, {cause: error})
}

/**
 * Sets this snapshot's evicted extents back to ABSENT: readers that trust PRESENT (the fault
 * loop's isLocal) would otherwise go to the disk for a file that is gone.
 */
function forgetEvicted(result: {evictedBytes: number; evicted: {dir: string; extent: {offset: number; length: number}}[]}): void {
  counters.add('evictedBytes', result.evictedBytes)
  for (const {dir, extent} of result.evicted) {
    if (dir !== share.cacheDir) continue
    const e = extentAt(table, extent.offset, extent.length)
    if (e >= 0) Atomics.compareExchange(states, e, EXTENT_PRESENT, EXTENT_ABSENT)
  }
}

function scheduleEviction(): void {
  if (scanning) return
  writtenSinceScan = 0
  scanning = evict(share.cacheRoot, share.cacheMaxBytes)
    .then(forgetEvicted)
    .catch(() => {})
    .finally(() => {
      scanning = undefined
    })
}

parentPort!.on('message', onMessage)
scheduleEviction()
// Up: modules loaded, so the owner may terminate this thread safely from now on.
parentPort!.postMessage({type: 'up'})
