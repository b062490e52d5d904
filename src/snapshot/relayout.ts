import {Codec, COMPAT_WORKING_SET} from '../format/constants.js'
import {encodeHeader} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {AtomicFile, appendTail} from './atomic-file.js'
import {SnapshotReader} from './reader.js'

/** What an attached working set records in the snapshot's metadata (docs/FORMAT.md). */
export interface AttachedWorkingSet {
  /** Chunks in the order the working set first touches them; stored first in the file. */
  chunks: number[]
  pages: number
  runs: number
}

/**
 * Rewrites a snapshot with a working set attached: the working set's chunks are stored first, in
 * first-touch order, so prefetching them is one sequential read, and the set is recorded in the
 * metadata (compat feature bit). Stored bytes are copied, not recompressed; the result is written
 * atomically (to `outputPath`, which may be the input itself).
 */
export function attachWorkingSet(inputPath: string, outputPath: string, set: AttachedWorkingSet): {fileSize: number; chunksFirst: number} {
  const reader = SnapshotReader.open(inputPath)
  const out = new AtomicFile(outputPath)
  try {
    const {header, index} = reader
    for (const c of set.chunks) if (!Number.isInteger(c) || c < 0 || c >= index.length) throw new RangeError(`working-set chunk ${c} is outside the snapshot's ${index.length} chunks`)
    const chunks = [...new Set(set.chunks)].filter((c) => index[c].codec !== Codec.None)
    const first = new Set(chunks)
    const order = [...chunks, ...index.keys()].filter((c, i) => i < chunks.length || !first.has(c))
    const encoded = encodeHeader({
      incompatFeatures: header.incompatFeatures,
      compatFeatures: header.compatFeatures | COMPAT_WORKING_SET,
      pageSize: header.pageSize,
      chunkSize: header.chunkSize,
      logicalSize: header.logicalSize,
      regions: header.regions,
      metadata: {...header.metadata, workingSet: {chunks, pages: set.pages, runs: set.runs} satisfies AttachedWorkingSet},
    })
    out.append(encoded)
    const entries: ChunkEntry[] = [...index]
    // Deduplicated chunks share stored bytes: copy each stored range once.
    const moved = new Map<number, number>()
    for (const c of order) {
      const e = index[c]
      if (e.codec === Codec.None) continue
      let at = moved.get(e.dataOffset)
      if (at === undefined) {
        const stored = Buffer.alloc(e.storedLength)
        reader.source.readAt(stored, e.dataOffset)
        at = out.append(stored)
        moved.set(e.dataOffset, at)
      }
      entries[c] = {...e, dataOffset: at}
    }
    appendTail(out, entries, reader.zeroMap, encoded.readUInt32LE(encoded.length - 8))
    out.commit()
    return {fileSize: out.size, chunksFirst: chunks.length}
  } finally {
    out.discard()
    reader.close()
  }
}

/** The working set a snapshot carries, if any. */
export function attachedWorkingSet(reader: SnapshotReader): AttachedWorkingSet | undefined {
  if ((reader.header.compatFeatures & COMPAT_WORKING_SET) === 0n) return undefined
  const ws = reader.header.metadata.workingSet as AttachedWorkingSet | undefined
  if (!ws || !Array.isArray(ws.chunks) || ws.chunks.some((c) => !Number.isInteger(c) || c < 0 || c >= reader.index.length)) return undefined
  return ws
}
