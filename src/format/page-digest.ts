// Page digests (docs/FORMAT.md, Page digests): a keyed 128-bit digest of each non-zero 4 KiB page
// a file stores, and the table that holds them. Pure: the digest in JavaScript (the reference,
// and the fallback when native/libuffd_digest is not built), key expansion, the table's layout.

import crypto from 'node:crypto'

import {SnapshotFormatError} from './errors.js'

/** Pages digests are defined for (a snapshot of 2 MiB pages has no table). */
export const DIGEST_PAGE_SIZE = 4096
export const PAGE_DIGEST_BYTES = 16
/** The table's trailer: its row count (u32 LE) and the CRC-32 of the rows and that count (u32 LE). */
export const DIGEST_TRAILER_BYTES = 8
/** Bytes of a chain's digest key, as metadata.pageDigests.key holds it (hex). */
export const DIGEST_KEY_BYTES = 32
/** NH key words: one per word of the page, and the two words the second pass is shifted by. */
export const DIGEST_KEY_WORDS = DIGEST_PAGE_SIZE / 4 + 2
export const DIGEST_HASH = 'nh128'
const LABEL_DIGEST_KEY = 'uffd page digest v1 nh key'

/** What metadata.pageDigests says: the hash and the chain's key. */
export interface PageDigestInfo {
  hash: typeof DIGEST_HASH
  /** 64 lowercase hex digits. */
  key: string
}

/** A fresh key for a new chain (a base); its layers reuse it. */
export function newDigestInfo(): PageDigestInfo {
  return {hash: DIGEST_HASH, key: crypto.randomBytes(DIGEST_KEY_BYTES).toString('hex')}
}

/** metadata.pageDigests checked, or what is wrong with it. */
export function checkDigestInfo(value: unknown): PageDigestInfo {
  const v = value as Record<string, unknown> | null
  if (typeof v !== 'object' || v === null) throw new SnapshotFormatError('CORRUPT', 'page digests', 'metadata.pageDigests is not an object')
  if (v.hash !== DIGEST_HASH) throw new SnapshotFormatError('CORRUPT', 'page digests', `hash ${JSON.stringify(v.hash)} is not ${DIGEST_HASH}`)
  if (typeof v.key !== 'string' || !/^[0-9a-f]{64}$/.test(v.key)) throw new SnapshotFormatError('CORRUPT', 'page digests', 'key is not 64 hex digits')
  return {hash: DIGEST_HASH, key: v.key}
}

/** The NH key words a chain's key expands to: HKDF-SHA256(ikm = key, salt = empty, info = the label), as u32 LE. */
export function expandDigestKey(key: string): Uint32Array {
  const okm = Buffer.from(crypto.hkdfSync('sha256', Buffer.from(key, 'hex'), Buffer.alloc(0), LABEL_DIGEST_KEY, DIGEST_KEY_WORDS * 4))
  const words = new Uint32Array(DIGEST_KEY_WORDS)
  for (let i = 0; i < words.length; i++) words[i] = okm.readUInt32LE(4 * i)
  return words
}

const TWO_32 = 2 ** 32

/** (a * b) for u32 a, b as [low, high] u32 halves, exactly (a double holds 53 bits). */
function product(a: number, b: number): [number, number] {
  const p1 = a * (b & 0xffff)
  const p2 = a * (b >>> 16)
  const t = p1 + (p2 % 65536) * 65536
  const lo = t % TWO_32
  return [lo, Math.floor(p2 / 65536) + Math.floor(t / TWO_32)]
}

/**
 * Digests of `count` consecutive 4 KiB pages of `pages` into `out` (16 bytes each), in JavaScript:
 * NH over the page's u32 LE words m, twice, with key words k shifted by 2 the second time:
 * pass j = sum over even i of ((m[i] + k[i+2j]) mod 2^32) * ((m[i+1] + k[i+1+2j]) mod 2^32) mod 2^64,
 * written pass 0 then pass 1, u64 LE. native/libuffd_digest computes the same, fast.
 */
export function pageDigestsJs(pages: Uint8Array, count: number, key: Uint32Array, out: Uint8Array): void {
  const view = new DataView(pages.buffer, pages.byteOffset, pages.byteLength)
  const o = new DataView(out.buffer, out.byteOffset, out.byteLength)
  const words = DIGEST_PAGE_SIZE / 4
  for (let p = 0; p < count; p++) {
    const base = p * DIGEST_PAGE_SIZE
    for (let pass = 0; pass < 2; pass++) {
      let lo = 0
      let hi = 0
      const shift = 2 * pass
      for (let i = 0; i < words; i += 2) {
        const m0 = view.getUint32(base + 4 * i, true)
        const m1 = view.getUint32(base + 4 * i + 4, true)
        const [l, h] = product((m0 + key[i + shift]) >>> 0, (m1 + key[i + 1 + shift]) >>> 0)
        lo += l
        hi += h
      }
      // Both sums stay below 2^53: 512 terms of less than 2^33.
      hi = (hi + Math.floor(lo / TWO_32)) % TWO_32
      lo %= TWO_32
      o.setUint32(p * PAGE_DIGEST_BYTES + 8 * pass, lo, true)
      o.setUint32(p * PAGE_DIGEST_BYTES + 8 * pass + 4, hi, true)
    }
  }
}

/** The bytes of a table of `count` rows. */
export function digestTableLength(count: number): number {
  return count * PAGE_DIGEST_BYTES + DIGEST_TRAILER_BYTES
}

/** The table for `rows` (16 bytes per page, in the file's order): the rows, their count, the CRC-32 of both. */
export function encodeDigestTable(rows: Uint8Array, crc32: (data: Uint8Array) => number): Buffer {
  if (rows.length % PAGE_DIGEST_BYTES !== 0) throw new RangeError(`digest rows of ${rows.length} bytes are not whole rows`)
  const table = Buffer.alloc(rows.length + DIGEST_TRAILER_BYTES)
  table.set(rows, 0)
  table.writeUInt32LE(rows.length / PAGE_DIGEST_BYTES, rows.length)
  table.writeUInt32LE(crc32(table.subarray(0, rows.length + 4)), rows.length + 4)
  return table
}

/** The rows of a table that must hold `count` rows, or a CORRUPT error saying what is wrong. */
export function decodeDigestTable(table: Buffer, count: number, crc32: (data: Uint8Array) => number): Buffer {
  if (table.length !== digestTableLength(count)) throw new SnapshotFormatError('CORRUPT', 'page digest table', `${table.length} bytes cannot hold ${count} rows`)
  const rows = count * PAGE_DIGEST_BYTES
  const stored = table.readUInt32LE(rows + 4)
  const computed = crc32(table.subarray(0, rows + 4))
  if (stored !== computed) throw new SnapshotFormatError('CORRUPT', 'page digest table', `checksum mismatch (stored ${stored.toString(16).padStart(8, '0')}, computed ${computed.toString(16).padStart(8, '0')})`)
  if (table.readUInt32LE(rows) !== count) throw new SnapshotFormatError('CORRUPT', 'page digest table', `records ${table.readUInt32LE(rows)} rows, the file stores ${count} pages`)
  return table.subarray(0, rows)
}

/**
 * Where a file's table of `count` rows lies: it ends where the index (or, in a layer, the zero
 * map) starts, since the header cannot say. A problem (it would start inside the header) as a string.
 */
export function digestTableLocation(count: number, dataEnd: number, headerSize: number): {offset: number; length: number} | string {
  const length = digestTableLength(count)
  const offset = dataEnd - length
  if (offset < headerSize) return `${length} bytes for ${count} pages do not fit before the index at ${dataEnd}`
  return {offset, length}
}
