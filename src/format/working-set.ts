/**
 * Working sets: the pages a resumed client touched, in first-touch order. Recorded by
 * `uffd resume --record`, merged across runs (the order of faults varies between resumes; the set
 * barely does), and replayed by `uffd resume --working-set` as prefetch. Pure: no I/O.
 */
import {UffdError} from '../core/errors.js'
import {schemaProblem, WorkingSetSchema} from './schemas.js'

export {WorkingSetRecorder} from './working-set-recorder.js'

export interface WorkingSetFile {
  kind: 'uffd-working-set'
  version: 1
  /** Identifies the snapshot the pages belong to (a set is meaningless for another image). */
  snapshot: {logicalSize: number; pageSize: number; headerCrc: number}
  /** How many recorded runs this set was made from. */
  runs: number
  /** Image page numbers in first-touch order, each once. */
  pages: number[]
  /** Milliseconds from the start of the run to each page's first touch (medians when merged). */
  firstTouchMs: number[]
}

export class WorkingSetError extends UffdError {
  declare readonly code: 'BAD_WORKING_SET'
  constructor(message: string) {
    super('BAD_WORKING_SET', message)
    this.name = 'WorkingSetError'
  }
}

export function parseWorkingSet(text: string, source: string): WorkingSetFile {
  let parsed: Partial<WorkingSetFile>
  try {
    parsed = JSON.parse(text) as Partial<WorkingSetFile>
  } catch (error) {
    throw new WorkingSetError(`${source}: not JSON (${(error as Error).message})`)
  }
  if (parsed?.kind !== 'uffd-working-set' || parsed.version !== 1) throw new WorkingSetError(`${source}: not a uffd working set (version 1)`)
  // Without this, a field of the wrong type flows into arithmetic: "runs":"many" was summed as a string.
  const problem = schemaProblem(WorkingSetSchema, parsed, source)
  if (problem) throw new WorkingSetError(problem)
  const {pages, firstTouchMs, snapshot} = parsed
  if (!Array.isArray(pages) || !Array.isArray(firstTouchMs) || pages.length !== firstTouchMs.length || !snapshot) {
    throw new WorkingSetError(`${source}: pages and firstTouchMs must be arrays of equal length`)
  }
  const maxPage = Math.ceil(snapshot.logicalSize / snapshot.pageSize)
  const seen = new Set<number>()
  for (const p of pages) {
    if (!Number.isInteger(p) || p < 0 || p >= maxPage) throw new WorkingSetError(`${source}: page ${p} is outside the snapshot's ${maxPage} pages`)
    if (seen.has(p)) throw new WorkingSetError(`${source}: page ${p} appears twice`)
    seen.add(p)
  }
  return parsed as WorkingSetFile
}

/** Refuses a working set recorded against another snapshot. */
export function checkMatches(set: WorkingSetFile, snapshot: WorkingSetFile['snapshot'], source: string): void {
  const s = set.snapshot
  if (s.logicalSize !== snapshot.logicalSize || s.pageSize !== snapshot.pageSize || s.headerCrc !== snapshot.headerCrc) {
    throw new WorkingSetError(`${source} was recorded against a different snapshot (size ${s.logicalSize}, page ${s.pageSize}, header CRC ${s.headerCrc})`)
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

/**
 * Merges recordings of one snapshot. `union` keeps every page any run touched; `majority` keeps
 * pages touched in more than half of the runs (one noisy run does not define the set). Pages are
 * ordered by the median of their first-touch times over the runs that touched them. `names` (the
 * files') are what a mismatch reports.
 */
export function mergeWorkingSets(sets: readonly WorkingSetFile[], mode: 'union' | 'majority', names: readonly string[] = sets.map((_, i) => `working set ${i + 1}`)): WorkingSetFile {
  if (sets.length === 0) throw new WorkingSetError('nothing to merge')
  const snapshot = sets[0].snapshot
  sets.forEach((s, i) => checkMatches(s, snapshot, i === 0 ? names[i] : `${names[i]} (unlike ${names[0]})`))
  const runs = sets.reduce((n, s) => n + s.runs, 0)
  const touches = new Map<number, {times: number[]; runs: number}>()
  for (const set of sets) {
    for (let i = 0; i < set.pages.length; i++) {
      const entry = touches.get(set.pages[i]) ?? {times: [], runs: 0}
      entry.times.push(set.firstTouchMs[i])
      entry.runs += set.runs
      touches.set(set.pages[i], entry)
    }
  }
  const kept = [...touches.entries()]
    .filter(([, t]) => mode === 'union' || t.runs * 2 > runs)
    .map(([page, t]) => ({page, at: median(t.times)}))
    .sort((a, b) => a.at - b.at || a.page - b.page)
  return {kind: 'uffd-working-set', version: 1, snapshot, runs, pages: kept.map((k) => k.page), firstTouchMs: kept.map((k) => k.at)}
}

/** The chunks holding a working set's pages, in the order their first page is touched. */
export function chunksInTouchOrder(pages: readonly number[], pagesPerChunk: number): number[] {
  const seen = new Set<number>()
  const chunks: number[] = []
  for (const p of pages) {
    const c = Math.floor(p / pagesPerChunk)
    if (!seen.has(c)) {
      seen.add(c)
      chunks.push(c)
    }
  }
  return chunks
}
