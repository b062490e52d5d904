import {crc32} from 'node:zlib'

import {CHUNK_FLAG_SHARED, Codec, FOOTER_MAGIC, FOOTER_SIZE, INDEX_ENTRY_SIZE, maxStoredLength} from './constants.js'
import {SnapshotFormatError} from './errors.js'
import {Geometry} from './geometry.js'
import {hex} from './header.js'
import {TAG_BYTES} from './seal.js'
import {ZeroMap} from './zero-map.js'

export interface ChunkEntry {
  dataOffset: number
  storedLength: number
  payloadLength: number
  storedCrc: number
  codec: Codec
  flags: number
  /**
   * Encrypted files: the number of the chunk whose place the stored bytes were sealed for (the
   * chunk's own, or for a deduplicated chunk the first chunk with those bytes). Else undefined.
   */
  sealedAs?: number
}

export interface Footer {
  indexOffset: number
  chunkCount: number
  zeroMapOffset: number
  zeroMapSize: number
  indexCrc: number
  zeroMapCrc: number
  headerCrc: number
}

/** Writes the first 22 bytes of an index entry (a packed block entry shares them). */
export function writeEntryFields(buf: Buffer, at: number, e: ChunkEntry): void {
  // A safe integer as two 32-bit halves (no BigInt per entry: indexes run to 65536 entries).
  buf.writeUInt32LE(e.dataOffset % 2 ** 32, at)
  buf.writeUInt32LE(Math.floor(e.dataOffset / 2 ** 32), at + 4)
  buf.writeUInt32LE(e.storedLength, at + 8)
  buf.writeUInt32LE(e.payloadLength, at + 12)
  buf.writeUInt32LE(e.storedCrc, at + 16)
  buf.writeUInt8(e.codec, at + 20)
  buf.writeUInt8(e.flags, at + 21)
}

/** `sealed`: the file is encrypted, and each entry records whose place its bytes were sealed for. */
export function encodeIndex(entries: readonly ChunkEntry[], sealed = false): Buffer {
  const buf = Buffer.alloc(entries.length * INDEX_ENTRY_SIZE)
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i]
    writeEntryFields(buf, i * INDEX_ENTRY_SIZE, e)
    if (sealed && e.codec !== Codec.None) buf.writeUInt32LE(e.sealedAs ?? i, i * INDEX_ENTRY_SIZE + 24)
  }
  return buf
}

export function encodeFooter(f: Footer): Buffer {
  const buf = Buffer.alloc(FOOTER_SIZE)
  buf.write(FOOTER_MAGIC, 0, 'ascii')
  buf.writeBigUInt64LE(BigInt(f.indexOffset), 8)
  buf.writeBigUInt64LE(BigInt(f.chunkCount), 16)
  buf.writeBigUInt64LE(BigInt(f.zeroMapOffset), 24)
  buf.writeBigUInt64LE(BigInt(f.zeroMapSize), 32)
  buf.writeUInt32LE(f.indexCrc, 40)
  buf.writeUInt32LE(f.zeroMapCrc, 44)
  buf.writeUInt32LE(f.headerCrc, 48)
  buf.writeUInt32LE(crc32(buf.subarray(0, 60)), 60)
  return buf
}

function u64(buf: Buffer, at: number, part: string, field: string): number {
  const v = buf.readBigUInt64LE(at)
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new SnapshotFormatError('CORRUPT', part, `${field} ${v} is out of range`)
  return Number(v)
}

/**
 * Decodes the footer and checks that the index and zero map it points at lie between the header
 * and the footer and agree with the header's geometry, before anyone allocates for them.
 */
export function decodeFooter(buf: Buffer, fileSize: number, headerSize: number, headerCrc: number, geometry: Geometry, layered = false): Footer {
  if (buf.length !== FOOTER_SIZE) throw new SnapshotFormatError('TRUNCATED', 'footer', `file is too short for a footer`)
  if (buf.toString('latin1', 0, 8) !== FOOTER_MAGIC) {
    throw new SnapshotFormatError('TRUNCATED', 'footer', 'no footer at the end of the file (truncated or still being written?)')
  }
  const storedCrc = buf.readUInt32LE(60)
  const actualCrc = crc32(buf.subarray(0, 60))
  if (storedCrc !== actualCrc) throw new SnapshotFormatError('CORRUPT', 'footer', `checksum mismatch (stored ${hex(storedCrc)}, computed ${hex(actualCrc)})`)
  if (buf.readBigUInt64LE(52) !== 0n) throw new SnapshotFormatError('CORRUPT', 'footer', 'reserved field is not zero')
  const f: Footer = {
    indexOffset: u64(buf, 8, 'footer', 'index offset'),
    chunkCount: u64(buf, 16, 'footer', 'chunk count'),
    zeroMapOffset: u64(buf, 24, 'footer', 'zero map offset'),
    zeroMapSize: u64(buf, 32, 'footer', 'zero map size'),
    indexCrc: buf.readUInt32LE(40),
    zeroMapCrc: buf.readUInt32LE(44),
    headerCrc: buf.readUInt32LE(48),
  }
  if (f.headerCrc !== headerCrc) throw new SnapshotFormatError('CORRUPT', 'footer', 'belongs to a different header (header checksum differs)')
  // A layer keeps its pages in blocks and has no chunk index.
  const chunkCount = layered ? 0 : geometry.chunkCount
  if (f.chunkCount !== chunkCount) {
    throw new SnapshotFormatError('CORRUPT', 'footer', `chunk count ${f.chunkCount} does not match the header's geometry (${chunkCount}${layered ? ': a layer has no chunk index' : ''})`)
  }
  if (f.zeroMapSize !== ZeroMap.byteLength(geometry.pageCount)) {
    throw new SnapshotFormatError('CORRUPT', 'footer', `zero map size ${f.zeroMapSize} does not match ${geometry.pageCount} pages`)
  }
  const footerAt = fileSize - FOOTER_SIZE
  const indexEnd = f.indexOffset + f.chunkCount * INDEX_ENTRY_SIZE
  const zeroMapEnd = f.zeroMapOffset + f.zeroMapSize
  if (f.indexOffset < headerSize || indexEnd > footerAt) {
    throw new SnapshotFormatError('CORRUPT', 'footer', `index [${f.indexOffset}, ${indexEnd}) lies outside the file's data area [${headerSize}, ${footerAt})`)
  }
  if (f.zeroMapOffset < headerSize || zeroMapEnd > footerAt) {
    throw new SnapshotFormatError('CORRUPT', 'footer', `zero map [${f.zeroMapOffset}, ${zeroMapEnd}) lies outside the file's data area [${headerSize}, ${footerAt})`)
  }
  if (f.zeroMapOffset < indexEnd && f.indexOffset < zeroMapEnd && f.chunkCount > 0 && f.zeroMapSize > 0) {
    throw new SnapshotFormatError('CORRUPT', 'footer', 'index and zero map overlap')
  }
  return f
}

export function decodeZeroMap(buf: Buffer, footer: Footer, geometry: Geometry): ZeroMap {
  const crc = crc32(buf)
  if (crc !== footer.zeroMapCrc) throw new SnapshotFormatError('CORRUPT', 'zero map', `checksum mismatch (stored ${hex(footer.zeroMapCrc)}, computed ${hex(crc)})`)
  const map = new ZeroMap(geometry.pageCount, new Uint8Array(buf.buffer, buf.byteOffset, buf.length))
  if (!map.paddingIsClear()) throw new SnapshotFormatError('CORRUPT', 'zero map', 'bits past the last page are set')
  return map
}

/**
 * What is wrong with a unit that stores `storedLength` bytes with `codec` (not none) for
 * `payloadLength` bytes of pages, or undefined. A sealed unit stores its ciphertext (as long as
 * the codec's bytes) and a tag.
 */
export function storedLengthProblem(codec: Codec, storedLength: number, payloadLength: number, sealed: boolean): string | undefined {
  const overhead = sealed ? TAG_BYTES : 0
  switch (codec) {
    case Codec.Raw:
      return storedLength === payloadLength + overhead ? undefined : `raw data of ${storedLength} bytes for a ${payloadLength}-byte payload${sealed ? ' (and its tag)' : ''}`
    case Codec.Lz4:
    case Codec.Zstd:
      return storedLength > overhead && storedLength <= maxStoredLength(payloadLength) + overhead ? undefined : `stored length ${storedLength} is impossible for a ${payloadLength}-byte payload`
    default:
      return `unknown codec ${codec as number}`
  }
}

/**
 * A chunk index in its encoded form (INDEX_ENTRY_SIZE bytes an entry), read an entry at a time.
 * An object per chunk would cost ~90 bytes of V8 heap each (6 MiB for a 16 GiB image), in every
 * thread that opens the snapshot; the encoded form costs 32 bytes, once per thread.
 */
export class ChunkIndex {
  readonly length: number

  /** `bytes`: an index checked by decodeIndex, or encoded by encodeIndex. */
  constructor(
    private readonly bytes: Buffer,
    /** The file is encrypted: an entry with data records whose place it was sealed for. */
    private readonly sealed: boolean,
  ) {
    this.length = bytes.length / INDEX_ENTRY_SIZE
  }

  /** An index of `entries` (a derived index: a chain's resolved chunks), encoded as a file holds them. */
  static of(entries: readonly ChunkEntry[], sealed = false): ChunkIndex {
    return new ChunkIndex(encodeIndex(entries, sealed), sealed)
  }

  /**
   * An index of chunks held raw, chunk c's payload `payloadLengths[c]` bytes (0: all zero pages,
   * codec none), written straight into its bytes: a chain's resolved chunks, which every thread
   * serving a chain makes for itself.
   */
  static ofRawChunks(payloadLengths: Uint32Array): ChunkIndex {
    const bytes = Buffer.alloc(payloadLengths.length * INDEX_ENTRY_SIZE)
    // One entry, rewritten for each chunk with data (an all-zero chunk's entry is all zeros).
    const entry: ChunkEntry = {dataOffset: 0, storedLength: 0, payloadLength: 0, storedCrc: 0, codec: Codec.Raw, flags: 0}
    for (let c = 0; c < payloadLengths.length; c++) {
      if (payloadLengths[c] === 0) continue
      entry.storedLength = entry.payloadLength = payloadLengths[c]
      writeEntryFields(bytes, c * INDEX_ENTRY_SIZE, entry)
    }
    return new ChunkIndex(bytes, false)
  }

  /** Chunk `c`'s entry (a new object each call: changing it changes nothing here). */
  at(c: number): ChunkEntry {
    if (!Number.isInteger(c) || c < 0 || c >= this.length) throw new RangeError(`chunk ${c} is outside 0..${this.length - 1}`)
    return entryAt(this.bytes, c * INDEX_ENTRY_SIZE, this.sealed)
  }

  codec(c: number): Codec {
    return this.bytes[c * INDEX_ENTRY_SIZE + 20]
  }

  *keys(): IterableIterator<number> {
    for (let c = 0; c < this.length; c++) yield c
  }

  *[Symbol.iterator](): IterableIterator<ChunkEntry> {
    for (let c = 0; c < this.length; c++) yield this.at(c)
  }
}

const entryPart = (c: number): string => `index entry ${c}`

/** The entry at byte `at` of an encoded index (its offset checked to fit a safe integer by decodeIndex). */
function entryAt(buf: Buffer, at: number, sealed: boolean): ChunkEntry {
  const e: ChunkEntry = {
    dataOffset: buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * 2 ** 32,
    storedLength: buf.readUInt32LE(at + 8),
    payloadLength: buf.readUInt32LE(at + 12),
    storedCrc: buf.readUInt32LE(at + 16),
    codec: buf.readUInt8(at + 20),
    flags: buf.readUInt8(at + 21),
  }
  if (sealed && e.codec !== Codec.None) e.sealedAs = buf.readUInt32LE(at + 24)
  return e
}

/**
 * Decodes and cross-checks every index entry: codec, lengths against the zero map, stored bytes
 * inside the data section. After this, reading chunk N needs no further validation but the
 * decoder's output length and the payload checksum. The index keeps `buf`: the caller must not
 * change it.
 */
export function decodeIndex(buf: Buffer, footer: Footer, headerSize: number, geometry: Geometry, zeroMap: ZeroMap, sealed = false): ChunkIndex {
  const crc = crc32(buf)
  if (crc !== footer.indexCrc) throw new SnapshotFormatError('CORRUPT', 'index', `checksum mismatch (stored ${hex(footer.indexCrc)}, computed ${hex(crc)})`)
  if (buf.length !== footer.chunkCount * INDEX_ENTRY_SIZE) throw new RangeError(`an index of ${footer.chunkCount} entries needs ${footer.chunkCount * INDEX_ENTRY_SIZE} bytes, got ${buf.length}`)
  const dataEnd = Math.min(footer.indexOffset, footer.zeroMapOffset)
  // Fields read into locals, not an entry object each: a 16 GiB image has 65,536 chunks, and the
  // garbage would grow the thread's young generation for good.
  for (let c = 0; c < footer.chunkCount; c++) {
    const at = c * INDEX_ENTRY_SIZE
    const dataOffset = buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * 2 ** 32
    if (!Number.isSafeInteger(dataOffset)) throw new SnapshotFormatError('CORRUPT', entryPart(c), `data offset ${buf.readBigUInt64LE(at)} is out of range`)
    const storedLength = buf.readUInt32LE(at + 8)
    const payloadLength = buf.readUInt32LE(at + 12)
    const codec: Codec = buf[at + 20]
    const flags = buf[at + 21]
    const sealedAs = sealed && codec !== Codec.None ? buf.readUInt32LE(at + 24) : c
    if (buf.readUInt16LE(at + 22) !== 0 || buf.readUInt32LE(at + 28) !== 0 || (!sealed || codec === Codec.None ? buf.readUInt32LE(at + 24) !== 0 : false)) {
      throw new SnapshotFormatError('CORRUPT', entryPart(c), 'reserved field is not zero')
    }
    if (sealedAs !== c) {
      // Sealed for another chunk's place: only a deduplicated chunk, sharing an earlier chunk's bytes.
      if (sealedAs > c) throw new SnapshotFormatError('CORRUPT', entryPart(c), `sealed for chunk ${sealedAs}, after its own place`)
      const owner = entryAt(buf, sealedAs * INDEX_ENTRY_SIZE, sealed)
      if (!(flags & CHUNK_FLAG_SHARED) || owner.dataOffset !== dataOffset || owner.storedLength !== storedLength || owner.codec !== codec || owner.payloadLength !== payloadLength) {
        throw new SnapshotFormatError('CORRUPT', entryPart(c), `sealed for chunk ${sealedAs}, whose stored bytes it does not share`)
      }
    }
    if ((flags & ~CHUNK_FLAG_SHARED) !== 0) throw new SnapshotFormatError('CORRUPT', entryPart(c), `unknown flags 0x${flags.toString(16)}`)
    const nonZeroPages = geometry.pagesInChunk(c) - zeroMap.countZero(geometry.firstPageOfChunk(c), geometry.pagesInChunk(c))
    const expectedPayload = nonZeroPages * geometry.pageSize
    if (payloadLength !== expectedPayload) {
      throw new SnapshotFormatError('CORRUPT', entryPart(c), `payload of ${payloadLength} bytes disagrees with the zero map (${nonZeroPages} non-zero pages)`)
    }
    if (codec === Codec.None) {
      if (payloadLength !== 0 || storedLength !== 0 || dataOffset !== 0) throw new SnapshotFormatError('CORRUPT', entryPart(c), 'codec none on a chunk that has data')
      continue
    }
    const problem = storedLengthProblem(codec, storedLength, payloadLength, sealed)
    if (problem) throw new SnapshotFormatError('CORRUPT', entryPart(c), problem)
    if (payloadLength === 0) throw new SnapshotFormatError('CORRUPT', entryPart(c), 'an all-zero chunk must use codec none')
    if (dataOffset < headerSize || dataOffset + storedLength > dataEnd) {
      throw new SnapshotFormatError('CORRUPT', entryPart(c), `stored bytes [${dataOffset}, ${dataOffset + storedLength}) lie outside the data section [${headerSize}, ${dataEnd})`)
    }
  }
  return new ChunkIndex(buf, sealed)
}
