import {type Geometry} from '../../format/geometry.js'
import {type WorkingSetFile} from '../../format/working-set.js'
import {attachedWorkingSet, workingSetIdentity} from '../../snapshot/attached-set.js'
import {type ImageReader} from '../../snapshot/layered-reader.js'
import {SnapshotReader} from '../../snapshot/reader.js'

/** The snapshot's geometry and identity (what a recorded set is checked against), and the units to prefetch for every client. */
export interface PrefetchPlan {
  geometry: Geometry
  identity: WorkingSetFile['snapshot']
  workingSetUnits: number[]
  /** The set given on the command line (--working-set FILE), as it was read. */
  givenSet?: WorkingSetFile
}

/**
 * Whether the session listens only once it has planned (and the fault-loop worker staged) the
 * working set: a set given on the command line is parsed and checked first, so that a bad one is
 * an error before anyone is told to connect; an attached set of a local file is staged (decoded
 * into memory) when there are decoders, so that a client is served at full speed from its first
 * fault. A remote snapshot's set is not waited for: its blocks come over the network while the
 * VMM connects and loads its own state, and faults are served as their bytes land meanwhile.
 * Asked before the session is loaded, so it reads only the snapshot's header.
 */
export function listensAfterWorkingSet(reader: ImageReader, workingSetFile: string | undefined, decoders: number): boolean {
  if (workingSetFile === 'none') return false
  if (workingSetFile) return true
  return decoders > 0 && !reader.remote && attachedUnits(reader).length > 0
}

/** The plan for `workingSetFile` (a path, "none", or undefined for the snapshot's own set). */
export async function prefetchPlan(reader: ImageReader, workingSetFile: string | undefined): Promise<PrefetchPlan> {
  const {geometry} = reader
  const identity = workingSetIdentity(reader)
  if (workingSetFile === 'none') return {geometry, identity, workingSetUnits: []}
  if (workingSetFile) {
    // Loaded only for a set on the command line: its schema validation is a large module graph.
    const [fs, {checkMatches, chunksInTouchOrder, parseWorkingSet}] = await Promise.all([import('node:fs'), import('../../format/working-set.js')])
    // A working set given on the command line wins over one attached to the snapshot.
    const set = parseWorkingSet(fs.readFileSync(workingSetFile, 'utf8'), workingSetFile)
    checkMatches(set, identity, workingSetFile)
    return {geometry, identity, workingSetUnits: chunksInTouchOrder(set.pages, geometry.pagesPerChunk), givenSet: set}
  }
  return {geometry, identity, workingSetUnits: attachedUnits(reader)}
}

/**
 * An attached set is prefetched from its packed blocks when it has them (units after the chunks,
 * see SnapshotReader.unitCount), else as whole chunks.
 */
function attachedUnits(reader: ImageReader): number[] {
  const packedUnits = reader.packed?.blocks.map((_, b) => reader.index.length + b)
  // A chain's set is its top layer's packed one (a layer has no chunks to put first).
  const attached = reader instanceof SnapshotReader ? attachedWorkingSet(reader) : undefined
  return packedUnits ?? attached?.chunks ?? []
}
