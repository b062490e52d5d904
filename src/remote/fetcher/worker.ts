import {constants} from 'node:os'
import {type MessagePort, parentPort, workerData} from 'node:worker_threads'

import {UffdError} from '../../core/errors.js'
import {eventfdSignal} from '../../sys/index.js'
import {extentAt} from '../coalesce.js'
import {DiskCache, evict} from '../disk-cache.js'
import {remoteObject} from '../objects.js'
import {EXTENT_ABSENT, EXTENT_ASKED, EXTENT_FAILED, EXTENT_IN_MEMORY, EXTENT_PRESENT, FAILED_HOLD_MS, Handover, PRIORITY_DEMAND, PRIORITY_PREFETCH, type Priority, recordFailure, RemoteCounters, type RemoteShare} from '../shared.js'
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
const handover = new Handover(share)
const table = {offsets: share.extentOffsets, lengths: share.extentLengths, crcs: share.extentCrcs, seeds: share.extentSeeds}
const scheduler = new FetchScheduler(table, await remoteObject(share.location, share.s3, 1, share.fetch.concurrency), share.identity, share.fetch, counters, latency, Math.random, take)

/**
 * A want message: extents to fetch at a priority, and `around` them (a fault's neighbours) more
 * at prefetch priority; a port message: a new reader's channel; close: the handler is stopping
 * (its claims are given up, then 'closed' is posted back).
 */
export type FetcherMessage = {type: 'want'; priority: Priority; extents: number[]; around?: number[]} | {type: 'port'; port: MessagePort} | {type: 'close'}

function onMessage(message: FetcherMessage): void {
  if (message.type === 'port') {
    message.port.on('message', onMessage)
    return
  }
  if (message.type === 'close') {
    // Fetches still under way are dropped with the thread: their claim files go now, so none
    // is left behind (a handler that dies instead leaves its files unlocked, for the next
    // claimer or eviction to remove).
    for (const extent of [...claims.keys()]) release(extent)
    parentPort!.postMessage('closed')
    return
  }
  // Held while the whole message is taken: a fault's extent and its neighbours (at prefetch
  // priority) are planned together, so those stored back to back go in the fault's request.
  scheduler.hold()
  try {
    for (const extent of message.extents) want(extent, message.priority)
    for (const extent of message.around ?? []) want(extent, PRIORITY_PREFETCH)
  } finally {
    scheduler.release()
  }
}

function land(extent: number, state: number): void {
  Atomics.store(states, extent, state)
  Atomics.notify(states, extent)
  if (share.landedFd >= 0) eventfdSignal(share.landedFd)
}

/** Extents on their way (fetch, then store), so a second ask only raises the fetch's priority. */
const landing = new Set<number>()

/**
 * Extents another handler sharing the cache directory is fetching (it holds their claim): their
 * priority, until when to wait for its file before fetching them here after all, and when to
 * look next (each look costs a stat and a claim attempt: the interval doubles, up to a bound
 * that is shorter for demand, where a vCPU waits).
 */
const awaitingClaim = new Map<number, {priority: Priority; until: number; next: number; interval: number}>()
/** The claims this handler holds: extent, claim file descriptor. */
const claims = new Map<number, number>()
/** Extents take() lets through as they are: claimed already while waited for, or waited for long enough to fetch without a claim. */
const pretaken = new Set<number>()
const CLAIM_POLL_MS = 5
const CLAIM_POLL_MAX_MS = {[PRIORITY_DEMAND]: 20, [PRIORITY_PREFETCH]: 100}
let claimPoll: NodeJS.Timeout | undefined

function want(extent: number, priority: Priority): void {
  const awaiting = awaitingClaim.get(extent)
  if (awaiting) {
    if (priority > awaiting.priority) {
      awaiting.priority = priority
      awaiting.interval = Math.min(awaiting.interval, CLAIM_POLL_MAX_MS[priority])
      awaiting.next = Math.min(awaiting.next, performance.now() + awaiting.interval)
    }
    return
  }
  if (landing.has(extent)) {
    scheduler.promote(extent, priority)
    return
  }
  const state = Atomics.load(states, extent)
  if (state === EXTENT_PRESENT || state === EXTENT_FAILED || state === EXTENT_IN_MEMORY) return
  // Another handler sharing the cache may have fetched it since the reader looked.
  if (state !== EXTENT_ASKED && cache.has(rangeOf(extent))) {
    counters.add('diskHits')
    land(extent, EXTENT_PRESENT)
    return
  }
  Atomics.store(states, extent, EXTENT_ASKED)
  landing.add(extent)
  fetch(extent, priority)
}

function rangeOf(extent: number): {offset: number; length: number} {
  return {offset: share.extentOffsets[extent], length: share.extentLengths[extent]}
}

/**
 * The scheduler's take(): claims an extent as its request is about to be sent. False when
 * another handler holds its claim, or has just published it (found on the next look).
 */
function take(extent: number): boolean {
  if (pretaken.delete(extent)) return true
  const range = rangeOf(extent)
  const claim = cache.claim(range)
  if (claim === 'held') return false
  if (claim === 'none') return true
  if (cache.has(range)) {
    cache.unclaim(range, claim)
    return false
  }
  claims.set(extent, claim)
  return true
}

/** Ends this handler's claim on an extent, if it holds one: after its bytes are published (or failed). */
function release(extent: number): void {
  const claim = claims.get(extent)
  if (claim === undefined) return
  claims.delete(extent)
  cache.unclaim(rangeOf(extent), claim)
}

/** Fetches an extent (unless another handler is: then waits for its file), stores it and lands it. */
function fetch(extent: number, priority: Priority): void {
  scheduler.want(extent, priority).then(
    async (bytes) => {
      if (bytes === undefined) {
        awaitClaim(extent, priority)
        return
      }
      try {
        land(extent, await store(extent, rangeOf(extent), bytes))
      } catch (error) {
        fail(extent, error as Error)
      }
      release(extent)
      landing.delete(extent)
    },
    (error: Error) => {
      release(extent)
      landing.delete(extent)
      fail(extent, error)
    },
  )
}

/** Waits for the file of an extent another handler fetches, within --fetch-timeout (a holder that makes no progress that long is treated like a stalled request: fetch it here). */
function awaitClaim(extent: number, priority: Priority): void {
  const now = performance.now()
  awaitingClaim.set(extent, {priority, until: now + share.fetch.idleTimeoutMs, next: now + CLAIM_POLL_MS, interval: CLAIM_POLL_MS})
  claimPoll ??= setInterval(pollClaims, CLAIM_POLL_MS)
}

/** Looks at the extents other handlers are fetching: landed on disk, claimable (the holder gave up or died), or waited for long enough. */
function pollClaims(): void {
  const now = performance.now()
  for (const [extent, awaiting] of awaitingClaim) {
    const {priority, until} = awaiting
    if (now < awaiting.next) continue
    awaiting.interval = Math.min(awaiting.interval * 2, CLAIM_POLL_MAX_MS[priority])
    awaiting.next = now + awaiting.interval
    const range = rangeOf(extent)
    if (cache.has(range)) {
      landAfterClaimWait(extent)
      continue
    }
    const claim = cache.claim(range)
    if (claim === 'held' && now < until) continue
    // The holder may have published and let go between the look above and the claim.
    if (typeof claim === 'number' && cache.has(range)) {
      cache.unclaim(range, claim)
      landAfterClaimWait(extent)
      continue
    }
    awaitingClaim.delete(extent)
    if (typeof claim === 'number') claims.set(extent, claim)
    pretaken.add(extent)
    fetch(extent, priority)
  }
  if (awaitingClaim.size === 0 && claimPoll) {
    clearInterval(claimPoll)
    claimPoll = undefined
  }
}

/** Another handler's fetch of `extent`, waited for, is on disk: it is present here too. */
function landAfterClaimWait(extent: number): void {
  awaitingClaim.delete(extent)
  landing.delete(extent)
  counters.add('claimWaits')
  counters.add('diskHits')
  land(extent, EXTENT_PRESENT)
}

function fail(extent: number, error: Error & {code?: string}): void {
  recordFailure(share.failure, {code: error.code ?? 'INTERNAL', message: error.message})
  land(extent, EXTENT_FAILED)
  // Whoever waited has been woken and failed; a later ask tries the store again.
  setTimeout(() => Atomics.compareExchange(states, extent, EXTENT_FAILED, EXTENT_ABSENT), FAILED_HOLD_MS).unref()
}

let writtenSinceScan = 0
let scanning: Promise<void> | undefined

/**
 * Writes a verified extent into the cache; on a full disk, evicts half of what the cache holds
 * and tries once more. Bytes the directory will not take (read-only, EIO, EACCES, still full)
 * are handed to the readers in memory instead: the resume goes on without the disk. Returns the
 * state the extent lands in.
 */
async function store(extent: number, range: {offset: number; length: number}, bytes: Buffer): Promise<typeof EXTENT_PRESENT | typeof EXTENT_IN_MEMORY> {
  try {
    cache.publish(range, bytes)
  } catch (error) {
    counters.add('cacheWriteErrors')
    const {code, errno} = error as {code?: string; errno?: number}
    // A quota is a full disk for this user: eviction frees it the same way. libuv has no name for
    // EDQUOT (Node reports it as an unknown system error), so it is matched by number.
    if (code !== 'ENOSPC' && errno !== -constants.errno.EDQUOT) return handOver(extent, bytes, error)
    const held = await evict(share.cacheRoot, Infinity)
    const freed = await evict(share.cacheRoot, held.bytes / 2)
    forgetEvicted(freed)
    try {
      cache.publish(range, bytes)
    } catch (again) {
      counters.add('cacheWriteErrors')
      return handOver(extent, bytes, again)
    }
  }
  writtenSinceScan += bytes.length
  if (writtenSinceScan > share.cacheMaxBytes / 10) scheduleEviction()
  return EXTENT_PRESENT
}

function cacheError(error: unknown): UffdError {
  return new UffdError('CACHE_DIR', `cache directory ${share.cacheDir}: cannot store a fetched chunk (${(error as Error).message})`, {cause: error})
}

let warned = false

/** Puts verified bytes the cache directory refused into the hand-over area; warns once per run. */
function handOver(extent: number, bytes: Buffer, error: unknown): typeof EXTENT_IN_MEMORY {
  if (!handover.put(extent, bytes)) throw cacheError(error)
  counters.add('memoryHandovers')
  if (!warned) {
    warned = true
    const mib = Math.round(handover.capacity / (1 << 20))
    process.stderr.write(
      `uffd: warning: cache directory ${share.cacheDir}: cannot store fetched chunks (${(error as Error).message}); ` +
        `they go to readers in memory instead (the last ${mib} MiB of them kept; an older one is fetched again when read), counted as remote.memoryHandovers\n`,
    )
  }
  return EXTENT_IN_MEMORY
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
