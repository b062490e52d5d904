import {COMPAT_WORKING_SET} from '../format/constants.js'
import {type PackedSetLocation} from '../format/packed-set.js'
import {type Geometry} from '../format/geometry.js'
import {type WorkingSetFile} from '../format/working-set.js'
import {type SnapshotReader} from './reader.js'

// Apart from relayout.ts, which writes sets and loads the encoders: `uffd resume` asks whether a
// snapshot carries a set before it listens, and must not pay for those to find out.

/** What an attached working set records in the snapshot's metadata (docs/FORMAT.md). */
export interface AttachedWorkingSet {
  /** Chunks in the order the working set first touches them; stored first in the file. */
  chunks: number[]
  pages: number
  runs: number
  /** Where the packed copy of the set's pages is described (compat feature bit 1). */
  packed?: Omit<PackedSetLocation, 'crc'> & {crc: string; codec: string}
  /** The runs `uffd resume --learn` remembers, the set being their majority (docs/FORMAT.md). */
  learned?: LearnedRunsLocation
}

/** Where a snapshot's learned runs are stored: `length` bytes at `offset`, `rawLength` once decoded. */
export interface LearnedRunsLocation {
  offset: number
  length: number
  rawLength: number
  /** CRC-32 of the stored bytes, 8 lowercase hex digits. */
  crc: string
  codec: 'zstd' | 'raw'
  /** Runs remembered, and the most that will be. */
  runs: number
  keep: number
  /** memoryDigest of the image: a run learned on a relayout of the same image may be folded in. */
  memory: string
}

/** The working set a snapshot carries, if any. */
export function attachedWorkingSet(reader: SnapshotReader): AttachedWorkingSet | undefined {
  if ((reader.header.compatFeatures & COMPAT_WORKING_SET) === 0n) return undefined
  const ws = reader.header.metadata.workingSet as AttachedWorkingSet | undefined
  if (!ws || !Array.isArray(ws.chunks) || ws.chunks.some((c) => !Number.isInteger(c) || c < 0 || c >= reader.index.length)) return undefined
  return ws
}

/** What a working set recorded on this snapshot names it by (and is checked against). */
export function workingSetIdentity(reader: {geometry: Geometry; header: {headerCrc: number}}): WorkingSetFile['snapshot'] {
  return {logicalSize: reader.geometry.logicalSize, pageSize: reader.geometry.pageSize, headerCrc: reader.header.headerCrc}
}
