// `uffd resume --learn`: at exit, this run's touched pages are folded into the runs the snapshot
// remembers and the snapshot is rewritten with their majority attached. Several handlers may
// serve (and learn from) one file at once: each fold holds an flock on the file it read while it
// writes the replacement, and a fold that finds the path replaced meanwhile starts over on the
// new file, so no run is lost and none is folded into another image.
import fs from 'node:fs'
import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {Codec} from '../format/constants.js'
import {decodeLearnedRuns, DEFAULT_LEARN_RUNS, MAX_LEARN_RUNS, foldRun, type LearnedRun, learnedSet, memoryDigest} from '../format/learned-runs.js'
import {WorkingSetError} from '../format/working-set.js'
import {SysError, tryLockExclusive} from '../sys/index.js'
import {AtomicFile, removeStaleTemporaries} from './atomic-file.js'
import {ChunkDecompressor} from './decompressor.js'
import {SnapshotReader} from './reader.js'
import {NO_READ_KEYS, type ReadKeys} from './sealing.js'
import {workingSetIdentity} from './attached-set.js'
import {attachedWorkingSet, type LearnedRunsLocation, packOptionsFor, writeAttached} from './relayout.js'

/** The most bytes learned runs may take decoded (a run is its pages as JSON numbers). */
const MAX_LEARNED_BYTES = 256 * 1024 * 1024
/** How long a fold waits for another handler's fold of the same file before giving up. */
export const LEARN_LOCK_WAIT_MS = 120_000
const LOCK_POLL_MS = 50

/** The runs a snapshot remembers (oldest first) and how many it keeps; none if it has none. Throws if they are damaged. */
export function readLearnedRuns(reader: SnapshotReader): {runs: LearnedRun[]; keep: number | undefined} {
  const location = attachedWorkingSet(reader)?.learned
  if (location === undefined) return {runs: [], keep: undefined}
  const where = `${reader.source.name}: learned runs`
  const {offset, length, rawLength, crc, codec, keep} = location as Partial<LearnedRunsLocation>
  const dataEnd = reader.footer.indexOffset
  const isCount = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 0
  if (!isCount(offset) || !isCount(length) || !isCount(rawLength) || offset < reader.header.headerSize || offset + length > dataEnd) {
    throw new UffdError('CORRUPT', `${where}: the location in the metadata is not inside the data section`)
  }
  if (rawLength > MAX_LEARNED_BYTES || (codec !== 'zstd' && codec !== 'raw') || typeof crc !== 'string' || !isCount(keep) || keep < 1 || keep > MAX_LEARN_RUNS) {
    throw new UffdError('CORRUPT', `${where}: the metadata describing them is malformed`)
  }
  const stored = Buffer.alloc(length)
  reader.source.readAt(stored, offset)
  const codecNumber = codec === 'zstd' ? Codec.Zstd : Codec.Raw
  if (crc32(stored, reader.learnedSeed(codecNumber, rawLength)).toString(16).padStart(8, '0') !== crc) throw new UffdError('CORRUPT', `${where}: checksum mismatch`)
  const raw = Buffer.alloc(rawLength)
  new ChunkDecompressor().decompress(codecNumber, reader.learnedPlain(stored, codecNumber, rawLength), raw)
  return {runs: decodeLearnedRuns(raw, where, reader.geometry.pageCount), keep}
}

/**
 * The pages a resume of this snapshot is handed ahead of need, with the times they stand for:
 * the majority of its learned runs, else its packed set (all at time 0: prefetched at once).
 */
export function prefetchedPages(reader: SnapshotReader): LearnedRun {
  const {runs} = readLearnedRuns(reader)
  if (runs.length > 0) {
    const set = learnedSet(runs, workingSetIdentity(reader))
    return {pages: set.pages, firstTouchMs: set.firstTouchMs}
  }
  const pages = Array.from(reader.packed?.pages ?? [])
  return {pages, firstTouchMs: pages.map(() => 0)}
}

export interface LearnOutcome {
  /** Whether the snapshot now holds this run. */
  folded: boolean
  /** Why not, when it does not. */
  reason?: string
  /** Runs remembered and pages attached after the fold. */
  runs?: number
  pages?: number
  ms: number
}

/**
 * Folds `run` (learned while serving `served`, whose file is `path`) into the file now at `path`
 * and rewrites it atomically with the new majority attached. A file at `path` holding another
 * image is left alone. Never throws for what it finds: the outcome says why nothing was folded.
 */
export async function foldIntoSnapshot(path: string, served: SnapshotReader, run: LearnedRun, options: {keep?: number; signal?: AbortSignal; keys?: ReadKeys}): Promise<LearnOutcome> {
  const started = performance.now()
  const outcome = (o: Omit<LearnOutcome, 'ms'>): LearnOutcome => ({...o, ms: Math.round(performance.now() - started)})
  let lock: number | undefined
  let reader: SnapshotReader | undefined
  try {
    // A symlinked snapshot: the file it points at is the one rewritten (a rename onto the link
    // would replace the link itself and leave its target unlearned).
    path = fs.realpathSync(path)
    lock = await lockCurrentFile(path, options.signal)
    if (lock === undefined) return outcome({folded: false, reason: `another handler held ${path} for more than ${LEARN_LOCK_WAIT_MS / 1000} s`})
    // Under the lock: a fold killed with SIGKILL left its snapshot-sized temporary behind.
    removeStaleTemporaries(path)
    const keys = options.keys ?? NO_READ_KEYS
    reader = SnapshotReader.open(path, path, keys)
    if (memoryDigest(reader.geometry, reader.index, reader.zeroMap.bytes) !== memoryDigest(served.geometry, served.index, served.zeroMap.bytes)) {
      return outcome({folded: false, reason: `${path} now holds another memory image than the one this resume served`})
    }
    const history = readLearnedRuns(reader)
    const keep = options.keep ?? history.keep ?? DEFAULT_LEARN_RUNS
    const {runs, set} = foldRun(history.runs, run, keep, workingSetIdentity(reader))
    const mode = fs.fstatSync(lock).mode & 0o7777
    // An encrypted snapshot is rewritten under the key it was opened with (a signed one cannot be: no signing key here).
    const seal = keys.keys[0] ? {key: keys.keys[0]} : {}
    await writeAttached(reader, new AtomicFile(path, {mode}), {pages: set.pages, runs: set.runs, learned: {runs, keep}}, {...packOptionsFor(reader.header.metadata, undefined), seal}, options.signal)
    return outcome({folded: true, runs: runs.length, pages: set.pages.length})
  } catch (error) {
    if (error instanceof UffdError || error instanceof SysError || error instanceof WorkingSetError) return outcome({folded: false, reason: error.message})
    if ((error as Error).name === 'AbortError') return outcome({folded: false, reason: 'interrupted while rewriting the snapshot (left as it was)'})
    // The file removed or made unreadable under us (fs's own errors, with their errno code).
    if (typeof (error as NodeJS.ErrnoException).code === 'string') return outcome({folded: false, reason: `${path}: ${(error as Error).message}`})
    throw error
  } finally {
    reader?.close()
    if (lock !== undefined) fs.closeSync(lock)
  }
}


/**
 * Opens the file at `path` and takes its flock, waiting while another fold holds it; once taken,
 * checks the path still names that file (the holder may have replaced it, and a lock on the
 * replaced file guards nothing) and otherwise starts over. Returns the locked descriptor, or
 * undefined after LEARN_LOCK_WAIT_MS.
 */
async function lockCurrentFile(path: string, signal: AbortSignal | undefined): Promise<number | undefined> {
  const deadline = Date.now() + LEARN_LOCK_WAIT_MS
  for (;;) {
    signal?.throwIfAborted()
    const fd = fs.openSync(path, 'r')
    let keep = false
    try {
      if (tryLockExclusive(fd)) {
        const locked = fs.fstatSync(fd)
        const now = fs.statSync(path, {throwIfNoEntry: false})
        if (now && now.dev === locked.dev && now.ino === locked.ino) {
          keep = true
          return fd
        }
        continue
      }
    } finally {
      if (!keep) fs.closeSync(fd)
    }
    if (Date.now() > deadline) return undefined
    await new Promise((resolve) => setTimeout(resolve, LOCK_POLL_MS))
  }
}
