import {Codec, COMPAT_PACKED_WORKING_SET, FOOTER_SIZE, INDEX_ENTRY_SIZE} from '../format/constants.js'
import {SnapshotFormatError} from '../format/errors.js'
import {decodeFooter} from '../format/index-table.js'
import {checkLayerLocation} from '../format/layer.js'
import {checkPackedLocation} from '../format/packed-set.js'
import {encodeDigestTable, PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {readFileDigests} from './page-digests.js'
import {learnedLocation} from './opened-seal.js'
import {crc32} from '../sys/crc.js'
import {type OutputSink} from './output-sink.js'
import {ReadAhead} from './read-ahead.js'
import {type SnapshotReader} from './reader.js'

export interface CopyResult {
  /** Bytes copied: the snapshot's size. */
  bytes: number
  /** Stored units (chunks and packed blocks) whose bytes were checked and decoded on the way. */
  unitsVerified: number
}

/** One run of the file: a structure the reader validated at open, or a stored extent and the units that share it. */
interface Piece {
  offset: number
  length: number
  /** A structure: its name, and how to check that the bytes read now are the ones validated. */
  structure?: {part: string; check: (bytes: Buffer) => boolean}
  /** A stored extent: the units whose stored bytes these are (deduplicated chunks share one). */
  units?: number[]
}

/** Between turns of the event loop, at most this much is copied (SIGINT, an upload's parts). */
const TURN_BYTES = 16 << 20

/**
 * Copies an opened snapshot to `out` byte for byte, verifying as it goes, so a corrupt source
 * leaves nothing behind: the header, index, zero map, packed table and footer were validated when
 * the reader opened the file (each is checked again, by its checksum, as it is copied, since a
 * local file can change after that); every stored unit's bytes are checked against their CRC
 * and decoded, as verify does, in file order, as they pass. A byte that belongs to no structure
 * and no unit is refused (INVALID): uffd never writes one, and nothing could vouch for it.
 *
 * Memory stays bounded: one extent at a time here, and what the sink holds (an upload's few
 * parts). A remote source's extents are fetched ahead in a window, with the fetcher's
 * concurrency. `out` is committed on success and discarded on any failure or abort.
 */
export async function copySnapshot(reader: SnapshotReader, out: OutputSink, options: {signal?: AbortSignal; onProgress?: (done: number, total: number) => void} = {}): Promise<CopyResult> {
  const {signal} = options
  try {
    const pieces = layout(reader)
    const extentUnits = pieces.filter((p) => p.units).map((p) => p.units![0])
    const ahead = new ReadAhead(reader, extentUnits)
    const size = reader.fileSize
    let cursor = 0
    let extent = 0
    let unitsVerified = 0
    let sinceTurn = 0
    for (const piece of pieces) {
      signal?.throwIfAborted()
      if (piece.offset > cursor) {
        throw new SnapshotFormatError('INVALID', `bytes ${cursor}-${piece.offset - 1}`, 'belong to no chunk and no structure of the snapshot (uffd cp copies only bytes it can verify)', reader.source.name)
      }
      let bytes: Buffer
      if (piece.units) {
        await ahead.ready(extent++, signal)
        bytes = reader.storedBytes(piece.units[0], true)
        // Units sharing the extent may still declare other codecs or lengths: each is decoded.
        for (const unit of piece.units.slice(1)) reader.storedBytes(unit, true)
        unitsVerified += piece.units.length
      } else {
        bytes = Buffer.alloc(piece.length)
        reader.source.readAt(bytes, piece.offset)
        if (!piece.structure!.check(bytes)) throw new SnapshotFormatError('CORRUPT', piece.structure!.part, 'changed since the snapshot was opened (its checksum differs)', reader.source.name)
      }
      const end = piece.offset + piece.length
      if (end > cursor) {
        out.append(bytes.subarray(cursor - piece.offset))
        sinceTurn += end - cursor
        cursor = end
      }
      options.onProgress?.(cursor, size)
      await out.drain(signal)
      if (sinceTurn >= TURN_BYTES) {
        sinceTurn = 0
        await new Promise((resolve) => setImmediate(resolve))
      }
    }
    if (cursor !== size) throw new SnapshotFormatError('INVALID', 'footer', `the structures end at ${cursor}, the file at ${size}`, reader.source.name)
    signal?.throwIfAborted()
    await out.commit()
    return {bytes: out.size, unitsVerified}
  } finally {
    await out.discard()
  }
}

/** Every structure and stored extent of the snapshot, in file order. */
function layout(reader: SnapshotReader): Piece[] {
  const {header, footer, geometry} = reader
  const size = reader.fileSize
  const headerCrcAt = header.headerSize - 8
  const pieces: Piece[] = [
    {offset: 0, length: header.headerSize, structure: {part: 'header', check: (b) => b.readUInt32LE(headerCrcAt) === header.headerCrc && crc32(b.subarray(0, headerCrcAt)) === header.headerCrc}},
    {offset: footer.indexOffset, length: footer.chunkCount * INDEX_ENTRY_SIZE, structure: {part: 'index', check: (b) => crc32(b) === footer.indexCrc}},
    {offset: footer.zeroMapOffset, length: footer.zeroMapSize, structure: {part: 'zero map', check: (b) => crc32(b) === footer.zeroMapCrc}},
    {
      offset: size - FOOTER_SIZE,
      length: FOOTER_SIZE,
      structure: {
        part: 'footer',
        check: (b) => {
          const again = decodeFooter(b, size, header.headerSize, header.headerCrc, geometry, reader.layer !== undefined)
          return (Object.keys(footer) as (keyof typeof footer)[]).every((k) => again[k] === footer[k])
        },
      },
    },
  ]
  if ((header.compatFeatures & COMPAT_PACKED_WORKING_SET) !== 0n) {
    const at = checkPackedLocation((header.metadata.workingSet as {packed?: unknown} | undefined)?.packed, header.headerSize, Math.min(footer.indexOffset, footer.zeroMapOffset), geometry)
    pieces.push({offset: at.offset, length: at.length, structure: {part: 'packed working set', check: (b) => crc32(b) === at.crc}})
  }
  if (reader.layer) {
    // A layer's block and run tables (its blocks are its units, below).
    const dataEnd = Math.min(footer.indexOffset, footer.zeroMapOffset)
    const meta = header.metadata.layer as {blocks?: unknown} | undefined
    const runs = checkLayerLocation(meta, header.headerSize, dataEnd, geometry).runs
    const blocks = checkPackedLocation(meta?.blocks, header.headerSize, dataEnd, geometry, 'layer')
    pieces.push({offset: blocks.offset, length: blocks.length, structure: {part: 'layer block table', check: (b) => crc32(b) === blocks.crc}})
    pieces.push({offset: runs.offset, length: runs.length, structure: {part: 'layer run table', check: (b) => crc32(b) === runs.crc}})
  }
  const learned = learnedLocation(header.metadata, header.headerSize, Math.min(footer.indexOffset, footer.zeroMapOffset))
  const learnedAt = (header.metadata.workingSet as {learned?: {crc?: unknown; codec?: unknown; rawLength?: unknown}} | undefined)?.learned
  const learnedCrc = learnedAt?.crc
  if (learned && typeof learnedCrc === 'string') {
    // Bound to its place in a bound file, by its codec and decoded length (as readLearnedRuns checks it).
    const seed = reader.learnedSeed(learnedAt?.codec === 'zstd' ? Codec.Zstd : Codec.Raw, typeof learnedAt?.rawLength === 'number' ? learnedAt.rawLength : 0)
    pieces.push({offset: learned.offset, length: learned.length, structure: {part: 'learned runs', check: (b) => crc32(b, seed).toString(16).padStart(8, '0') === learnedCrc}})
  }
  const digests = readFileDigests(reader)
  if (digests) {
    const rows = digests.rows.length / PAGE_DIGEST_BYTES
    pieces.push({offset: digests.offset, length: digests.length, structure: {part: 'page digest table', check: (b) => b.equals(encodeDigestTable(b.subarray(0, rows * PAGE_DIGEST_BYTES), crc32))}})
  }
  if (reader.seal) {
    // A sealed or signed file's unit digests and seal record, as the reader checked them at open.
    const tail = reader.seal.tail
    pieces.push({offset: size - FOOTER_SIZE - tail.length, length: tail.length, structure: {part: 'seal record', check: (b) => b.equals(tail)}})
  }
  const extents = new Map<string, Piece>()
  for (let unit = 0; unit < reader.unitCount; unit++) {
    const e = reader.entry(unit)
    if (e.codec === Codec.None || e.storedLength === 0) continue
    const key = `${e.dataOffset}:${e.storedLength}`
    const piece = extents.get(key)
    if (piece) piece.units!.push(unit)
    else extents.set(key, {offset: e.dataOffset, length: e.storedLength, units: [unit]})
  }
  return [...pieces.filter((p) => p.length > 0), ...extents.values()].sort((a, b) => a.offset - b.offset || a.length - b.length)
}
