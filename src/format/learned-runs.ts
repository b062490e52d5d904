/**
 * Learned runs: what `uffd resume --learn` keeps inside a snapshot so that the working set it
 * attaches is the majority of the last few resumes, not whatever the latest one touched. Each
 * run is the pages it touched in first-touch order with their times. Pure: no I/O (the bytes are
 * stored zstd-compressed in the data section, docs/FORMAT.md "Learned runs").
 */
import {createHash} from 'node:crypto'

import {MAX_LEARN_RUNS} from './constants.js'
import {type Geometry} from './geometry.js'
import {type ChunkEntry} from './index-table.js'
import {mergeWorkingSets, WorkingSetError, type WorkingSetFile} from './working-set.js'

export interface LearnedRun {
  /** Image page numbers in first-touch order, each once. */
  pages: number[]
  /** Milliseconds from the start of the run to each page's first touch. */
  firstTouchMs: number[]
}

/** How many runs a snapshot remembers by default: an odd number, so a majority is never a tie. */
export const DEFAULT_LEARN_RUNS = 5
// In constants.ts, so that `uffd resume`'s flags can name it without loading the working-set parser.
export {MAX_LEARN_RUNS}

const KIND = 'uffd-learned-runs'

/** The stored form of `runs` (oldest first), before compression. */
export function encodeLearnedRuns(runs: readonly LearnedRun[]): Buffer {
  return Buffer.from(JSON.stringify({kind: KIND, version: 1, runs}), 'utf8')
}

/** Parses and checks the stored form of learned runs of a snapshot of `pageCount` pages. */
export function decodeLearnedRuns(bytes: Buffer, source: string, pageCount: number): LearnedRun[] {
  let parsed: unknown
  try {
    parsed = JSON.parse(bytes.toString('utf8'))
  } catch (error) {
    throw new WorkingSetError(`${source}: learned runs are not JSON (${(error as Error).message})`)
  }
  const doc = parsed as {kind?: unknown; version?: unknown; runs?: unknown}
  if (doc?.kind !== KIND || doc.version !== 1 || !Array.isArray(doc.runs)) throw new WorkingSetError(`${source}: not learned runs (version 1)`)
  if (doc.runs.length > MAX_LEARN_RUNS) throw new WorkingSetError(`${source}: ${doc.runs.length} learned runs is more than ${MAX_LEARN_RUNS}`)
  return doc.runs.map((run: unknown, i: number) => checkRun(run, `${source}: learned run ${i + 1}`, pageCount))
}

function checkRun(run: unknown, where: string, pageCount: number): LearnedRun {
  const r = run as Partial<LearnedRun> | null
  if (!r || !Array.isArray(r.pages) || !Array.isArray(r.firstTouchMs) || r.pages.length !== r.firstTouchMs.length) {
    throw new WorkingSetError(`${where}: pages and firstTouchMs must be arrays of equal length`)
  }
  const seen = new Uint8Array(pageCount)
  for (const p of r.pages) {
    if (!Number.isInteger(p) || p < 0 || p >= pageCount) throw new WorkingSetError(`${where}: page ${p} is outside the snapshot's ${pageCount} pages`)
    if (seen[p]) throw new WorkingSetError(`${where}: page ${p} appears twice`)
    seen[p] = 1
  }
  for (const t of r.firstTouchMs) if (typeof t !== 'number' || !Number.isFinite(t) || t < 0) throw new WorkingSetError(`${where}: first-touch time ${t} is not a non-negative number`)
  return {pages: r.pages, firstTouchMs: r.firstTouchMs}
}

/**
 * What a run touched: the pages that faulted, and the pages it was handed ahead of need. The
 * kernel tells a handler nothing about which prefetched pages a client then used (no per-page
 * accessed bit reaches it), so those count as touched, at the time the set they came from gives
 * them: a learned set takes on new pages at once and drops a page only once a majority of the
 * remembered runs neither faulted on it nor were handed it.
 */
export function touchedInRun(faulted: LearnedRun, prefetched: LearnedRun): LearnedRun {
  const at = new Map<number, number>()
  prefetched.pages.forEach((p, i) => at.set(p, prefetched.firstTouchMs[i]))
  faulted.pages.forEach((p, i) => at.set(p, Math.min(at.get(p) ?? Infinity, faulted.firstTouchMs[i])))
  const pages = [...at.entries()].sort((a, b) => a[1] - b[1] || a[0] - b[0])
  return {pages: pages.map(([p]) => p), firstTouchMs: pages.map(([, t]) => t)}
}

/**
 * Adds `run` to the remembered `runs` (oldest first), keeps the last `keep`, and returns them with
 * the working set they now stand for: the pages touched in more than half of them, ordered by
 * median first touch.
 */
export function foldRun(runs: readonly LearnedRun[], run: LearnedRun, keep: number, snapshot: WorkingSetFile['snapshot']): {runs: LearnedRun[]; set: WorkingSetFile} {
  if (!Number.isInteger(keep) || keep < 1 || keep > MAX_LEARN_RUNS) throw new RangeError(`keep must be 1 to ${MAX_LEARN_RUNS}, got ${keep}`)
  const kept = [...runs, run].slice(-keep)
  return {runs: kept, set: learnedSet(kept, snapshot)}
}

/** The working set remembered runs stand for (see foldRun); empty for no runs. */
export function learnedSet(runs: readonly LearnedRun[], snapshot: WorkingSetFile['snapshot']): WorkingSetFile {
  if (runs.length === 0) return {kind: 'uffd-working-set', version: 1, snapshot, runs: 0, pages: [], firstTouchMs: []}
  return mergeWorkingSets(
    runs.map((r) => ({kind: 'uffd-working-set', version: 1, snapshot, runs: 1, pages: r.pages, firstTouchMs: r.firstTouchMs})),
    'majority',
  )
}

/**
 * A digest of the memory a snapshot holds that survives attaching a working set (which rewrites
 * the header and moves stored bytes, but copies them unchanged): the geometry, the zero map and
 * each chunk's codec, lengths and checksum. Two files with the same digest are relayouts of one
 * image, so a run learned on one may be folded into the other.
 */
export function memoryDigest(geometry: Geometry, index: Iterable<ChunkEntry> & {readonly length: number}, zeroMap: Uint8Array): string {
  const hash = createHash('sha256')
  const head = Buffer.alloc(24)
  head.writeUInt32LE(geometry.pageSize, 0)
  head.writeUInt32LE(geometry.chunkSize, 4)
  head.writeBigUInt64LE(BigInt(geometry.logicalSize), 8)
  head.writeBigUInt64LE(BigInt(index.length), 16)
  hash.update(head)
  const entry = Buffer.alloc(16)
  for (const e of index) {
    entry.writeUInt32LE(e.storedLength, 0)
    entry.writeUInt32LE(e.payloadLength, 4)
    entry.writeUInt32LE(e.storedCrc, 8)
    entry.writeUInt32LE(e.codec, 12)
    hash.update(entry)
  }
  hash.update(zeroMap)
  return hash.digest('hex')
}
