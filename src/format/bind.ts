import {crc32} from 'node:zlib'

/**
 * Bound units (docs/FORMAT.md, incompat bit 2): in a file with the bit, a stored unit's CRC-32
 * covers a record of its place followed by its stored bytes, so bytes moved to another place
 * (another chunk's index entry, another block's table entry, another file's learned runs) fail
 * their check although their own CRC came with them. Pure: zlib's CRC-32 over a 16-byte record.
 */

/** What a unit is, as its place record names it (the numbers of UnitKind in seal.ts). */
export enum BoundKind {
  Chunk = 1,
  PackedBlock = 2,
  LayerBlock = 3,
  LearnedRuns = 4,
}

/** Where a unit belongs: what its bound CRC is seeded with. */
export interface BoundPlace {
  kind: BoundKind
  /** A chunk's index (its own: a deduplicated chunk's too), a block's position in its table, 0 for learned runs. */
  number: number
  codec: number
  /** Bytes once decoded (learned runs: their rawLength). */
  payloadLength: number
  /** A block's image pages, as its table lists them (a chunk's follow from its number; learned runs have none). */
  pages?: ArrayLike<number>
}

export const PLACE_RECORD_SIZE = 16

/**
 * kind (u8), codec (u8), reserved (u16, 0), number (u32), payload length (u32), the CRC-32 of the
 * block's page list (u32 LE each; 0 without one); little-endian. Two chunks' records of one codec
 * and payload length differ in the 32 bits of their numbers only, and a CRC-32 tells apart any
 * two inputs that differ within 32 consecutive bits: no chunk's bytes pass at another chunk's place.
 */
export function placeRecord(place: BoundPlace): Buffer {
  const record = Buffer.alloc(PLACE_RECORD_SIZE)
  record.writeUInt8(place.kind, 0)
  record.writeUInt8(place.codec, 1)
  record.writeUInt32LE(place.number, 4)
  record.writeUInt32LE(place.payloadLength, 8)
  if (place.pages) {
    const list = Buffer.alloc(place.pages.length * 4)
    for (let i = 0; i < place.pages.length; i++) list.writeUInt32LE(place.pages[i], 4 * i)
    record.writeUInt32LE(crc32(list), 12)
  }
  return record
}

/**
 * The value a bound unit's CRC starts from: crc32(stored bytes, seed) is the CRC-32 of the
 * record followed by the stored bytes. For fixed stored bytes, continuing a CRC from a seed is a
 * one-to-one map of the seed, so bytes moved between two places pass exactly when the two
 * places' seeds are equal.
 */
export function placeSeed(place: BoundPlace): number {
  return crc32(placeRecord(place))
}

/** A unit's stored CRC: bound to `place` in a file with the bit, else of its stored bytes alone. */
export function unitCrc(plainCrc: number, storedLength: number, place: BoundPlace | undefined): number {
  return place === undefined ? plainCrc : crc32Combine(placeSeed(place), plainCrc, storedLength)
}

// crc32_combine as zlib 1.2.12 computes it: the CRC of A then B from the CRCs of A and of B and
// B's length, by multiplying A's CRC by x^(8 * length) modulo the CRC polynomial. A writer that
// only has the plain CRC its compression workers computed binds it without a pass over the bytes.
const POLY = 0xedb88320

function multModP(a: number, b: number): number {
  let m = 0x80000000
  let p = 0
  for (;;) {
    if (a & m) {
      p ^= b
      if ((a & (m - 1)) === 0) break
    }
    m >>>= 1
    b = b & 1 ? (b >>> 1) ^ POLY : b >>> 1
  }
  return p >>> 0
}

/** X2N[k] = x^(2^k) modulo the polynomial (reflected). */
const X2N: number[] = (() => {
  const table = new Array<number>(32)
  let p = 0x40000000 // x^1
  table[0] = p
  for (let n = 1; n < 32; n++) table[n] = p = multModP(p, p)
  return table
})()

/** x^(n * 2^k) modulo the polynomial. */
function x2nModP(n: number, k: number): number {
  let p = 0x80000000 // x^0
  while (n > 0) {
    if (n % 2 === 1) p = multModP(X2N[k & 31], p)
    n = Math.floor(n / 2)
    k++
  }
  return p
}

/** crc32(A || B) from crc32(A), crc32(B) and B's length. */
export function crc32Combine(crcA: number, crcB: number, lengthB: number): number {
  return (multModP(x2nModP(lengthB, 3), crcA) ^ crcB) >>> 0
}

/** The place of a file's learned runs (one unit, number 0): `codec` as stored, `rawLength` decoded. */
export function learnedPlace(codec: number, rawLength: number): BoundPlace {
  return {kind: BoundKind.LearnedRuns, number: 0, codec, payloadLength: rawLength}
}
