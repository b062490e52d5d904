import {crc32} from 'node:zlib'

import {
  FIXED_HEADER_SIZE,
  FORMAT_MAJOR,
  FORMAT_MINOR,
  HEADER_MAGIC,
  HEADER_TRAILER_SIZE,
  KNOWN_INCOMPAT_FEATURES,
  MAX_HEADER_SIZE,
  MAX_REGION_COUNT,
  REGION_ENTRY_SIZE,
  RegionKind,
} from './constants.js'
import {SnapshotFormatError} from './errors.js'
import {Geometry, geometryProblem} from './geometry.js'

/** A named range of the image and where it lived in its source (see docs/FORMAT.md). */
export interface Region {
  kind: RegionKind
  imageOffset: number
  size: number
  /** Process: the VMA's start address. Guest memory: guest-physical address, or 0 if unknown. */
  address: number
  fileOffset: number
  prot: number
  flags: number
  /** Process: pid (or CRIU task id) owning the VMA; guest memory: 0. */
  owner: number
  name: string
}

export type SnapshotMetadata = Record<string, unknown>

export interface HeaderFields {
  incompatFeatures: bigint
  compatFeatures: bigint
  pageSize: number
  chunkSize: number
  logicalSize: number
  regions: Region[]
  metadata: SnapshotMetadata
}

export interface SnapshotHeader extends HeaderFields {
  major: number
  minor: number
  headerSize: number
  headerCrc: number
}

function readSafeU64(buf: Buffer, offset: number, part: string, field: string): number {
  const value = buf.readBigUInt64LE(offset)
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new SnapshotFormatError('INVALID', part, `${field} ${value} is out of range`)
  return Number(value)
}

/** Checks regions against the image: sorted, page-aligned, non-overlapping, inside the padded image. */
export function regionProblem(regions: readonly Region[], geometry: Geometry): {index: number; problem: string} | undefined {
  let previousEnd = 0
  for (const [index, r] of regions.entries()) {
    if (r.imageOffset % geometry.pageSize !== 0) return {index, problem: `image offset ${r.imageOffset} is not page-aligned`}
    if (r.size <= 0 || r.size % geometry.pageSize !== 0) return {index, problem: `size ${r.size} is not a positive multiple of the page size`}
    if (r.imageOffset < previousEnd) return {index, problem: `starts at ${r.imageOffset}, before the end of the previous region (${previousEnd})`}
    if (r.imageOffset + r.size > geometry.paddedSize) return {index, problem: `ends at ${r.imageOffset + r.size}, past the image (${geometry.paddedSize} bytes)`}
    if (r.kind !== RegionKind.GuestMemory && r.kind !== RegionKind.ProcessVma) return {index, problem: `unknown region kind ${r.kind}`}
    previousEnd = r.imageOffset + r.size
  }
  return undefined
}

export function encodeHeader(fields: HeaderFields): Buffer {
  const problem = geometryProblem(fields.pageSize, fields.chunkSize, fields.logicalSize)
  if (problem) throw new RangeError(problem)
  const geometry = new Geometry(fields.pageSize, fields.chunkSize, fields.logicalSize)
  const bad = regionProblem(fields.regions, geometry)
  if (bad) throw new RangeError(`region ${bad.index}: ${bad.problem}`)
  if (fields.regions.length > MAX_REGION_COUNT) throw new RangeError(`${fields.regions.length} regions is more than ${MAX_REGION_COUNT}`)

  const names = fields.regions.map((r) => Buffer.from(r.name, 'utf8'))
  const strings = Buffer.concat(names)
  const metadata = Buffer.from(JSON.stringify(fields.metadata), 'utf8')
  const unpadded = FIXED_HEADER_SIZE + REGION_ENTRY_SIZE * fields.regions.length + strings.length + metadata.length + HEADER_TRAILER_SIZE
  const headerSize = Math.ceil(unpadded / 8) * 8
  if (headerSize > MAX_HEADER_SIZE) throw new RangeError(`header of ${headerSize} bytes is larger than ${MAX_HEADER_SIZE}`)

  const buf = Buffer.alloc(headerSize)
  buf.write(HEADER_MAGIC, 0, 'ascii')
  buf.writeUInt16LE(FORMAT_MAJOR, 8)
  buf.writeUInt16LE(FORMAT_MINOR, 10)
  buf.writeUInt32LE(headerSize, 12)
  buf.writeBigUInt64LE(fields.incompatFeatures, 16)
  buf.writeBigUInt64LE(fields.compatFeatures, 24)
  buf.writeUInt32LE(fields.pageSize, 32)
  buf.writeUInt32LE(fields.chunkSize, 36)
  buf.writeBigUInt64LE(BigInt(fields.logicalSize), 40)
  buf.writeUInt32LE(fields.regions.length, 48)
  buf.writeUInt32LE(strings.length, 52)
  buf.writeUInt32LE(metadata.length, 56)

  let nameOffset = 0
  for (const [i, r] of fields.regions.entries()) {
    const at = FIXED_HEADER_SIZE + i * REGION_ENTRY_SIZE
    buf.writeBigUInt64LE(BigInt(r.imageOffset), at)
    buf.writeBigUInt64LE(BigInt(r.size), at + 8)
    buf.writeBigUInt64LE(BigInt(r.address), at + 16)
    buf.writeBigUInt64LE(BigInt(r.fileOffset), at + 24)
    buf.writeUInt32LE(r.prot, at + 32)
    buf.writeUInt32LE(r.flags, at + 36)
    buf.writeUInt32LE(r.owner, at + 40)
    buf.writeUInt32LE(nameOffset, at + 44)
    buf.writeUInt32LE(names[i].length, at + 48)
    buf.writeUInt32LE(r.kind, at + 52)
    nameOffset += names[i].length
  }
  const stringsAt = FIXED_HEADER_SIZE + REGION_ENTRY_SIZE * fields.regions.length
  strings.copy(buf, stringsAt)
  metadata.copy(buf, stringsAt + strings.length)
  buf.writeUInt32LE(crc32(buf.subarray(0, headerSize - HEADER_TRAILER_SIZE)), headerSize - HEADER_TRAILER_SIZE)
  return buf
}

/**
 * Reads `headerSize` from the fixed part so the caller knows how much to read; validates only
 * what is needed to trust that number.
 */
export function peekHeaderSize(fixed: Buffer, fileSize: number): number {
  // The magic first, on as many bytes as there are: a short file of something else is not a
  // truncated snapshot.
  const magic = fixed.toString('latin1', 0, Math.min(HEADER_MAGIC.length, fixed.length))
  if (magic !== HEADER_MAGIC.slice(0, magic.length)) throw new SnapshotFormatError('NOT_A_SNAPSHOT', 'header', 'not a uffd snapshot (bad magic)')
  if (fixed.length < FIXED_HEADER_SIZE) throw new SnapshotFormatError('TRUNCATED', 'header', `file is ${fileSize} bytes, too short for a snapshot header`)
  const major = fixed.readUInt16LE(8)
  const minor = fixed.readUInt16LE(10)
  if (major !== FORMAT_MAJOR) {
    throw new SnapshotFormatError('UNSUPPORTED_VERSION', 'header', `format version ${major}.${minor} is not supported by this uffd (it reads ${FORMAT_MAJOR}.x)`)
  }
  const headerSize = fixed.readUInt32LE(12)
  if (headerSize % 8 !== 0 || headerSize < FIXED_HEADER_SIZE + HEADER_TRAILER_SIZE || headerSize > MAX_HEADER_SIZE) {
    throw new SnapshotFormatError('CORRUPT', 'header', `header size ${headerSize} is invalid`)
  }
  if (headerSize > fileSize) throw new SnapshotFormatError('TRUNCATED', 'header', `header of ${headerSize} bytes runs past the end of the ${fileSize}-byte file`)
  return headerSize
}

export function decodeHeader(buf: Buffer, fileSize: number): SnapshotHeader {
  const headerSize = peekHeaderSize(buf, fileSize)
  if (buf.length < headerSize) throw new SnapshotFormatError('TRUNCATED', 'header', `got ${buf.length} of ${headerSize} header bytes`)
  const crcAt = headerSize - HEADER_TRAILER_SIZE
  const storedCrc = buf.readUInt32LE(crcAt)
  const actualCrc = crc32(buf.subarray(0, crcAt))
  if (storedCrc !== actualCrc) {
    throw new SnapshotFormatError('CORRUPT', 'header', `checksum mismatch (stored ${hex(storedCrc)}, computed ${hex(actualCrc)})`)
  }
  if (buf.readUInt32LE(crcAt + 4) !== 0 || buf.readUInt32LE(60) !== 0) throw new SnapshotFormatError('CORRUPT', 'header', 'reserved field is not zero')

  const major = buf.readUInt16LE(8)
  const minor = buf.readUInt16LE(10)
  const incompatFeatures = buf.readBigUInt64LE(16)
  const compatFeatures = buf.readBigUInt64LE(24)
  const unknown = incompatFeatures & ~KNOWN_INCOMPAT_FEATURES
  if (unknown !== 0n) {
    throw new SnapshotFormatError('UNSUPPORTED_VERSION', 'header', `uses incompatible features this uffd does not know (bits 0x${unknown.toString(16)})`)
  }
  const pageSize = buf.readUInt32LE(32)
  const chunkSize = buf.readUInt32LE(36)
  const logicalSize = readSafeU64(buf, 40, 'header', 'logical size')
  const problem = geometryProblem(pageSize, chunkSize, logicalSize)
  if (problem) throw new SnapshotFormatError('INVALID', 'header', problem)
  const geometry = new Geometry(pageSize, chunkSize, logicalSize)

  const regionCount = buf.readUInt32LE(48)
  const stringsSize = buf.readUInt32LE(52)
  const metadataSize = buf.readUInt32LE(56)
  if (regionCount > MAX_REGION_COUNT) throw new SnapshotFormatError('INVALID', 'header', `${regionCount} regions is more than ${MAX_REGION_COUNT}`)
  const stringsAt = FIXED_HEADER_SIZE + regionCount * REGION_ENTRY_SIZE
  const metadataAt = stringsAt + stringsSize
  const contentEnd = metadataAt + metadataSize
  if (contentEnd > crcAt || Math.ceil((contentEnd + HEADER_TRAILER_SIZE) / 8) * 8 !== headerSize) {
    throw new SnapshotFormatError('CORRUPT', 'header', `region table, strings and metadata (${contentEnd} bytes) do not match the header size ${headerSize}`)
  }
  for (let i = contentEnd; i < crcAt; i++) {
    if (buf[i] !== 0) throw new SnapshotFormatError('CORRUPT', 'header', 'padding is not zero')
  }

  const regions: Region[] = []
  for (let i = 0; i < regionCount; i++) {
    const at = FIXED_HEADER_SIZE + i * REGION_ENTRY_SIZE
    const part = `region ${i}`
    const nameOffset = buf.readUInt32LE(at + 44)
    const nameLength = buf.readUInt32LE(at + 48)
    if (nameOffset + nameLength > stringsSize) throw new SnapshotFormatError('CORRUPT', part, 'name lies outside the string table')
    if (buf.readBigUInt64LE(at + 56) !== 0n) throw new SnapshotFormatError('CORRUPT', part, 'reserved field is not zero')
    regions.push({
      imageOffset: readSafeU64(buf, at, part, 'image offset'),
      size: readSafeU64(buf, at + 8, part, 'size'),
      address: readSafeU64(buf, at + 16, part, 'address'),
      fileOffset: readSafeU64(buf, at + 24, part, 'file offset'),
      prot: buf.readUInt32LE(at + 32),
      flags: buf.readUInt32LE(at + 36),
      owner: buf.readUInt32LE(at + 40),
      name: decodeUtf8(buf.subarray(stringsAt + nameOffset, stringsAt + nameOffset + nameLength), part),
      kind: buf.readUInt32LE(at + 52),
    })
  }
  const bad = regionProblem(regions, geometry)
  if (bad) throw new SnapshotFormatError('INVALID', `region ${bad.index}`, bad.problem)

  let metadata: SnapshotMetadata
  try {
    const parsed: unknown = JSON.parse(decodeUtf8(buf.subarray(metadataAt, contentEnd), 'metadata'))
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new SnapshotFormatError('CORRUPT', 'metadata', 'invalid JSON (not a JSON object)')
    metadata = parsed as SnapshotMetadata
  } catch (error) {
    if (error instanceof SnapshotFormatError) throw error
    throw new SnapshotFormatError('CORRUPT', 'metadata', `invalid JSON (${(error as Error).message})`)
  }

  return {major, minor, headerSize, headerCrc: storedCrc, incompatFeatures, compatFeatures, pageSize, chunkSize, logicalSize, regions, metadata}
}

const utf8 = new TextDecoder('utf-8', {fatal: true})
function decodeUtf8(bytes: Uint8Array, part: string): string {
  try {
    return utf8.decode(bytes)
  } catch {
    throw new SnapshotFormatError('CORRUPT', part, 'text is not valid UTF-8')
  }
}

export function hex(n: number): string {
  return '0x' + n.toString(16).padStart(8, '0')
}
