import crypto from 'node:crypto'
import {MessageChannel, type MessagePort, type Worker} from 'node:worker_threads'

import {UffdError} from '../core/errors.js'
import {startWorker} from '../core/workers.js'
import {Codec} from '../format/constants.js'
import {percentileUs} from '../resume/run-stats.js'
import {type ByteSource} from '../snapshot/byte-source.js'
import {SnapshotReader} from '../snapshot/reader.js'
import {NO_READ_KEYS, type ReadKeys} from '../snapshot/sealing.js'
import {closeFd, createEventfd, eventfdSignal} from '../sys/index.js'
import {crc32} from '../sys/crc.js'
import {backoffMs, type ExtentTable} from './coalesce.js'
import {DiskCache} from './disk-cache.js'
import {type FetcherMessage} from './fetcher/worker.js'
import {describeLocation, type Location} from './location.js'
import {type ObjectIdentity, RemoteError, type RemoteObject} from './object.js'
import {remoteObject} from './objects.js'
import {RemoteByteSource} from './remote-source.js'
import {type S3Settings} from './s3-object.js'
import {EXTENT_FAILED, EXTENT_IN_MEMORY, EXTENT_PRESENT, type FetchOptions, readFromSegments, recordFailure, type RemoteCounter, RemoteCounters, type RemoteShare, sharedBuffers} from './shared.js'

/** How remote snapshots are read: the store's client settings, the cache directory, the fetch policy. */
export interface RemoteOptions {
  s3: S3Settings
  cacheRoot: string
  cacheMaxBytes: number
  fetch: FetchOptions
}

/** How long closing waits for the fetcher to give up its claims. */
const CLOSE_WAIT_MS = 1000

/** The first request reads this much: the header and, for small snapshots, everything else. */
const OPEN_BYTES = 256 * 1024
/** When a structure near the end is needed, this much of the tail is read at once (index, zero map and footer together). */
const TAIL_BYTES = 1024 * 1024

/** Thrown by the open-time source when the reader needs bytes not read yet. */
class NeedBytes {
  constructor(
    readonly position: number,
    readonly length: number,
  ) {}
}

/**
 * The bytes read so far while opening, recording what the reader asked for: those ranges (header,
 * footer, zero map, index, packed table) are the snapshot's identity and, for every thread, the
 * segments it reads from memory.
 */
class SegmentSource implements ByteSource {
  readonly reads: {offset: number; bytes: Uint8Array}[] = []
  constructor(
    readonly name: string,
    readonly size: number,
    readonly segments: {offset: number; bytes: Uint8Array}[],
  ) {}

  readAt(dst: Uint8Array, position: number): void {
    if (!readFromSegments(this.segments, dst, position)) throw new NeedBytes(position, dst.length)
    this.reads.push({offset: position, bytes: dst.slice()})
  }

  close(): void {}
}

/**
 * A snapshot in an object store, opened: its header and index read with one or two ranged
 * requests and validated exactly as a local file is, a fetcher thread started for its chunks, and
 * a reader for the calling thread. Other threads get their own readers through spec().
 */
export class RemoteSnapshot {
  private constructor(
    readonly share: RemoteShare,
    readonly reader: SnapshotReader,
    private readonly fetcher: Worker,
    private readonly mainPort: MessagePort,
    /** Settles once the fetcher has loaded its modules (or stopped). */
    private readonly fetcherUp: Promise<void>,
    /** Whether landedFd is this snapshot's own (else a chain's, closed by whoever made it). */
    private readonly ownsLandedFd: boolean,
  ) {}

  /**
   * `landedFd`: an eventfd to signal when an extent lands, shared by every remote file of a
   * chain (the fault loop polls one); by default the snapshot makes its own.
   */
  static async open(location: Exclude<Location, {kind: 'file'}>, options: RemoteOptions, landedFd?: number, keys: ReadKeys = NO_READ_KEYS, locked = false): Promise<RemoteSnapshot> {
    // One connection: opening asks one thing at a time, and it is closed once the structures are
    // read (the fetcher thread has its own pool for the chunks), so it adds none to theirs.
    const object = await remoteObject(location, options.s3, undefined, 1)
    let structures: Awaited<ReturnType<typeof readStructures>>
    try {
      structures = await readStructures(object, options.fetch)
    } finally {
      object.close()
    }
    const {identity, segments, reads} = structures
    // Probes find the structures; the reader below checks them with the keys.
    const probe = SnapshotReader.fromSource(new SegmentSource(object.name, identity.size, segments), NO_READ_KEYS, true)
    const extents = extentTable(probe)
    const digest = identityDigest(identity.size, reads)
    const cache = DiskCache.prepare(options.cacheRoot, digest)
    const states = sharedBuffers(extents.offsets.length, extents.lengths.reduce((a, b) => Math.max(a, b), 0))
    keepOpenedExtents(cache, extents, segments, new Int32Array(states.states))
    const share: RemoteShare = {
      location,
      name: describeLocation(location),
      s3: options.s3,
      identity,
      // Only what the reader reads at open: the chunk bytes of the first request are fetched
      // (and cached) like any other, not held in every thread's memory.
      segments: reads.map((r) => ({offset: r.offset, bytes: r.bytes})),
      extentOffsets: extents.offsets,
      extentLengths: extents.lengths,
      extentCrcs: extents.crcs,
      extentSeeds: extents.seeds,
      cacheDir: cache.dir,
      cacheRoot: options.cacheRoot,
      cacheMaxBytes: options.cacheMaxBytes,
      fetch: options.fetch,
      ...states,
      landedFd: landedFd ?? createEventfd(),
    }
    const fetcher = startWorker(import.meta.url, 'fetcher/worker', share)
    fetcher.unref()
    const fetcherUp = new Promise<void>((resolve) => {
      fetcher.once('message', () => resolve())
      fetcher.once('exit', () => resolve())
    })
    // Readers wait on extent states: a fetcher that died must fail them, or they wait forever.
    const died = (detail: string): void => failEverything(share, {code: 'WORKER_EXIT', message: `${share.name}: the fetcher thread stopped (${detail})`})
    fetcher.on('error', (error) => died(error.message))
    fetcher.on('exit', (code) => died(`exit code ${code}`))
    const {port1, port2} = new MessageChannel()
    const message: FetcherMessage = {type: 'port', port: port1}
    fetcher.postMessage(message, [port1])
    let reader: SnapshotReader
    try {
      reader = SnapshotReader.fromSource(new RemoteByteSource(share, port2), keys, locked)
    } catch (error) {
      port2.close()
      await fetcher.terminate()
      if (landedFd === undefined) closeFd(share.landedFd)
      throw error
    }
    return new RemoteSnapshot(share, reader, fetcher, port2, fetcherUp, landedFd === undefined)
  }

  /** What another thread needs to read this snapshot: the share and a port of its own to the fetcher. */
  threadShare(): {share: RemoteShare; port: MessagePort} {
    const {port1, port2} = new MessageChannel()
    const message: FetcherMessage = {type: 'port', port: port1}
    this.fetcher.postMessage(message, [port1])
    return {share: this.share, port: port2}
  }

  /** What fetching cost, for this snapshot and `others` (the other remote files of its chain). */
  report(...others: RemoteSnapshot[]): RemoteReport {
    return remoteReport(this.share, ...others.map((o) => o.share))
  }

  async close(): Promise<void> {
    this.reader.close()
    // A worker terminated while it still loads a native module (koffi) aborts the whole process:
    // a command done before its fetcher is up (stats of a chain) waits for it first.
    await this.fetcherUp
    this.mainPort.close()
    this.fetcher.removeAllListeners('exit')
    this.fetcher.removeAllListeners('error')
    this.fetcher.on('error', () => {})
    // Its claims on fetches under way go first (briefly: a fetcher that does not answer is stopped anyway).
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, CLOSE_WAIT_MS)
      this.fetcher.once('message', () => {
        clearTimeout(timer)
        resolve()
      })
      this.fetcher.once('exit', () => {
        clearTimeout(timer)
        resolve()
      })
      const message: FetcherMessage = {type: 'close'}
      this.fetcher.postMessage(message)
    })
    await this.fetcher.terminate()
    if (this.ownsLandedFd) closeFd(this.share.landedFd)
  }
}

/**
 * Stores the extents the open's requests brought whole (a small file, a layer, comes entirely
 * with its header and tail) into the cache directory, checked against their CRC, and marks them
 * present: they are not fetched again. One that fails its check is left to be fetched.
 */
function keepOpenedExtents(cache: DiskCache, extents: ExtentTable, segments: readonly {offset: number; bytes: Uint8Array}[], states: Int32Array): void {
  for (let e = 0; e < extents.offsets.length; e++) {
    const range = {offset: extents.offsets[e], length: extents.lengths[e]}
    const within = segments.find((s) => range.offset >= s.offset && range.offset + range.length <= s.offset + s.bytes.length)
    if (!within) continue
    const bytes = within.bytes.subarray(range.offset - within.offset, range.offset - within.offset + range.length)
    if (crc32(bytes, extents.seeds[e]) !== extents.crcs[e]) continue
    try {
      if (!cache.has(range)) cache.publish(range, bytes)
      states[e] = EXTENT_PRESENT
    } catch {
      // A full or unwritable cache: the fetcher stores it when it is asked for (and says why it cannot).
    }
  }
}

/** Fails every extent not on disk yet, waking whoever waits for one. */
function failEverything(share: RemoteShare, failure: {code: string; message: string}): void {
  recordFailure(share.failure, failure)
  const states = new Int32Array(share.states)
  for (let e = 0; e < states.length; e++) {
    const state = Atomics.load(states, e)
    if (state === EXTENT_PRESENT || state === EXTENT_IN_MEMORY) continue
    Atomics.store(states, e, EXTENT_FAILED)
    Atomics.notify(states, e)
  }
  eventfdSignal(share.landedFd)
}

/** What a remote snapshot cost: requests, bytes and where extents came from. */
export interface RemoteReport {
  location: string
  requests: number
  bytesFetched: number
  extentsFetched: number
  retries: number
  badResponses: number
  /** Extents read from the cache directory that this run did not fetch. */
  diskHits: number
  /** Readers that had to wait for the network, and for how long in all and at most (ms). */
  waits: number
  waitMs: number
  maxWaitMs: number
  latencyMs: {p50: number | null; p90: number | null; p99: number | null}
  cacheDir: string
  evictedBytes: number
  cacheWriteErrors: number
  /** Extents handed to readers in memory because the cache directory could not store them. */
  memoryHandovers: number
  /** Extents another handler sharing the cache directory was fetching, waited for instead of fetched again. */
  claimWaits: number
}

/** What fetching cost, summed over remote files (a chain's): counters added, latency histograms merged. */
export function remoteReport(...shares: RemoteShare[]): RemoteReport {
  const counters = shares.map((share) => new RemoteCounters(share.counters))
  const c = {get: (name: RemoteCounter): number => counters.reduce((sum, one) => sum + one.get(name), 0)}
  const histogram = shares.map((share) => Array.from(new BigInt64Array(share.latency), Number)).reduce((sum, h) => sum.map((n, i) => n + h[i]))
  const ms = (q: number): number | null => {
    const us = percentileUs(histogram, q)
    return us === null ? null : us / 1000
  }
  return {
    location: shares.map((share) => share.name).join(', '),
    requests: c.get('requests'),
    bytesFetched: c.get('bytesFetched'),
    extentsFetched: c.get('extentsFetched'),
    retries: c.get('retries'),
    badResponses: c.get('badResponses'),
    diskHits: c.get('diskHits'),
    waits: c.get('waits'),
    waitMs: c.get('waitUs') / 1000,
    maxWaitMs: Math.max(...counters.map((one) => one.get('maxWaitUs'))) / 1000,
    latencyMs: {p50: ms(0.5), p90: ms(0.9), p99: ms(0.99)},
    // One file's own directory; a chain's files each have theirs, under one --cache-dir.
    cacheDir: shares.length === 1 ? shares[0].cacheDir : shares[0].cacheRoot,
    evictedBytes: c.get('evictedBytes'),
    cacheWriteErrors: c.get('cacheWriteErrors'),
    memoryHandovers: c.get('memoryHandovers'),
    claimWaits: c.get('claimWaits'),
  }
}

/**
 * Reads the header, then whatever else the reader asks for (footer, index, zero map, packed
 * table: the tail in one request when it fits), until a reader opens over the fetched bytes.
 * Every request is retried like a chunk fetch, within the fetch deadline.
 */
async function readStructures(object: RemoteObject, fetch: FetchOptions): Promise<{identity: ObjectIdentity; segments: {offset: number; bytes: Uint8Array}[]; reads: {offset: number; bytes: Uint8Array}[]}> {
  const deadline = performance.now() + fetch.deadlineMs
  const first = await retried(() => object.openRange(OPEN_BYTES, {idleTimeoutMs: fetch.idleTimeoutMs}), deadline, fetch.deadlineMs)
  const {identity} = first
  const segments = [{offset: 0, bytes: first.bytes as Uint8Array}]
  for (let round = 0; round < 16; round++) {
    const source = new SegmentSource(object.name, identity.size, segments)
    try {
      SnapshotReader.fromSource(source, NO_READ_KEYS, true)
      return {identity, segments, reads: source.reads}
    } catch (error) {
      if (!(error instanceof NeedBytes)) throw error
      // Near the end: the tail at once (the footer points back at the index and zero map).
      const tailStart = Math.max(0, identity.size - TAIL_BYTES)
      const offset = error.position >= tailStart ? tailStart : error.position
      const end = error.position >= tailStart ? identity.size : Math.min(identity.size, error.position + Math.max(error.length, OPEN_BYTES))
      const bytes = await retried(() => object.read(offset, end - offset, identity, {idleTimeoutMs: fetch.idleTimeoutMs}), deadline, fetch.deadlineMs)
      segments.push({offset, bytes})
    }
  }
  throw new UffdError('INTERNAL', `${object.name}: opening read more structures than a snapshot has`)
}

async function retried<T>(attempt: () => Promise<T>, deadline: number, deadlineMs: number): Promise<T> {
  for (let n = 0; ; n++) {
    try {
      return await attempt()
    } catch (error) {
      const delay = backoffMs(n, Math.random())
      if (!(error instanceof RemoteError) || !error.retryable) throw error
      if (performance.now() + delay > deadline) throw new UffdError('FETCH_DEADLINE', `${error.message} (still failing after ${n + 1} attempts within ${deadlineMs / 1000} s)`, {cause: error})
      await new Promise((resolve) => setTimeout(resolve, delay))
    }
  }
}

/**
 * The distinct stored byte ranges of a snapshot (chunks and packed blocks; deduplicated chunks
 * share one), sorted by offset, each with the CRC and seed of one unit stored there: in a bound
 * file the entries sharing bytes have CRCs bound to their own places, and any one of them checks
 * the bytes (the reader checks each unit against its own when it reads it).
 */
function extentTable(reader: SnapshotReader): ExtentTable {
  const byRange = new Map<string, {offset: number; length: number; crc: number; seed: number}>()
  for (let unit = 0; unit < reader.unitCount; unit++) {
    const entry = reader.entry(unit)
    if (entry.codec === Codec.None || entry.storedLength === 0) continue
    byRange.set(`${entry.dataOffset}:${entry.storedLength}`, {offset: entry.dataOffset, length: entry.storedLength, crc: entry.storedCrc, seed: reader.crcSeed(unit)})
  }
  const extents = [...byRange.values()].sort((a, b) => a.offset - b.offset || a.length - b.length)
  return {
    offsets: Float64Array.from(extents, (e) => e.offset),
    lengths: Int32Array.from(extents, (e) => e.length),
    crcs: Uint32Array.from(extents, (e) => e.crc),
    seeds: Uint32Array.from(extents, (e) => e.seed),
  }
}

/** A digest of everything the reader validated at open (header, index, zero map, packed table, footer) and the size. */
function identityDigest(size: number, reads: {offset: number; bytes: Uint8Array}[]): string {
  const hash = crypto.createHash('sha256').update(`uffd-cache-v1:${size}`)
  for (const r of reads) hash.update(`:${r.offset}:${r.bytes.length}:`).update(r.bytes)
  return hash.digest('hex').slice(0, 32)
}
