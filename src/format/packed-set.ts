import {crc32} from 'node:zlib'

import {Codec, PACKED_BLOCK_ENTRY_SIZE} from './constants.js'
import {SnapshotFormatError} from './errors.js'
import {type Geometry} from './geometry.js'
import {hex} from './header.js'
import {type ChunkEntry, storedLengthProblem, writeEntryFields} from './index-table.js'
import {indexOfPage} from './layer.js'
import {type ZeroMap} from './zero-map.js'

/**
 * The packed working set (docs/FORMAT.md): a working set's pages copied a second time into
 * blocks of their own, in first-touch order, so prefetching a set scattered over the whole image
 * decodes only its pages instead of every chunk it touches. Pure: no I/O.
 */
export interface PackedBlock extends ChunkEntry {
  /** Position of the block's first page in the page list. */
  listStart: number
  pageCount: number
}

export interface PackedSet {
  blocks: PackedBlock[]
  /** Image page numbers: each block's pages, ascending within a block, blocks in touch order. */
  pages: Uint32Array
}

/** Where the table lives, recorded in the metadata (`workingSet.packed`, the CRC as 8 hex digits). */
export interface PackedSetLocation {
  offset: number
  length: number
  crc: number
  blocks: number
  pages: number
}

export function packedTableLength(blocks: number, pages: number): number {
  return blocks * PACKED_BLOCK_ENTRY_SIZE + pages * 4
}

export function encodePackedTable(set: PackedSet): Buffer {
  const buf = Buffer.alloc(packedTableLength(set.blocks.length, set.pages.length))
  for (const [i, b] of set.blocks.entries()) {
    const at = i * PACKED_BLOCK_ENTRY_SIZE
    writeEntryFields(buf, at, {...b, flags: 0})
    buf.writeUInt32LE(b.listStart, at + 24)
    buf.writeUInt32LE(b.pageCount, at + 28)
  }
  const listAt = set.blocks.length * PACKED_BLOCK_ENTRY_SIZE
  for (let i = 0; i < set.pages.length; i++) buf.writeUInt32LE(set.pages[i], listAt + 4 * i)
  return buf
}

/** Checks a location from the (untrusted) metadata before anything is read or allocated for it. */
export function checkPackedLocation(value: unknown, dataStart: number, dataEnd: number, geometry: Geometry, what = 'packed working set'): PackedSetLocation {
  const fail = (detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', what, detail)
  }
  if (typeof value !== 'object' || value === null) return fail('its location in the metadata is not an object')
  const v = value as Record<string, unknown>
  const n = (key: string, max: number): number => {
    const x = v[key]
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0 || x > max) return fail(`${key} ${String(x)} is not an integer in 0..${max}`)
    return x
  }
  // The CRC is 8 hex digits: fixed width, so the header's size does not depend on its value.
  if (typeof v.crc !== 'string' || !/^[0-9a-f]{8}$/.test(v.crc)) fail(`crc ${String(v.crc)} is not 8 hex digits`)
  const crc = Number.parseInt(v.crc as string, 16)
  const location = {offset: n('offset', dataEnd), length: n('length', dataEnd), crc, blocks: n('blocks', geometry.pageCount), pages: n('pages', geometry.pageCount)}
  if (location.length !== packedTableLength(location.blocks, location.pages)) fail(`table of ${location.length} bytes cannot hold ${location.blocks} blocks and ${location.pages} pages`)
  if (location.offset < dataStart || location.offset + location.length > dataEnd) {
    fail(`table [${location.offset}, ${location.offset + location.length}) lies outside the data section [${dataStart}, ${dataEnd})`)
  }
  return location
}

/**
 * Decodes and cross-checks the table: every block's codec and lengths against its pages (from the
 * zero map), its stored bytes inside the data section, its pages ascending, in the image, each in
 * one block only, and at most a chunk's worth per block (so any decode buffer fits a chunk).
 */
export function decodePackedTable(buf: Buffer, location: PackedSetLocation, dataStart: number, dataEnd: number, geometry: Geometry, zeroMap: ZeroMap, what = 'packed working set', sealed = false): PackedSet {
  const crc = crc32(buf)
  if (crc !== location.crc) throw new SnapshotFormatError('CORRUPT', what, `checksum mismatch (stored ${hex(location.crc)}, computed ${hex(crc)})`)
  const listAt = location.blocks * PACKED_BLOCK_ENTRY_SIZE
  const pages = new Uint32Array(location.pages)
  for (let i = 0; i < pages.length; i++) pages[i] = buf.readUInt32LE(listAt + 4 * i)
  const seen = new Uint8Array(geometry.pageCount)
  const blocks: PackedBlock[] = []
  let nextListStart = 0
  // The block being checked, for the error (no closure or string made per block until one fails).
  let i = 0
  const fail = (detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', `${what} block ${i}`, detail)
  }
  for (; i < location.blocks; i++) {
    const at = i * PACKED_BLOCK_ENTRY_SIZE
    const dataOffset = buf.readBigUInt64LE(at)
    if (dataOffset > BigInt(Number.MAX_SAFE_INTEGER)) fail(`data offset ${dataOffset} is out of range`)
    const b: PackedBlock = {
      dataOffset: Number(dataOffset),
      storedLength: buf.readUInt32LE(at + 8),
      payloadLength: buf.readUInt32LE(at + 12),
      storedCrc: buf.readUInt32LE(at + 16),
      codec: buf.readUInt8(at + 20),
      flags: 0,
      listStart: buf.readUInt32LE(at + 24),
      pageCount: buf.readUInt32LE(at + 28),
    }
    if (buf.readUInt8(at + 21) !== 0 || buf.readUInt16LE(at + 22) !== 0) fail('reserved field is not zero')
    // Blocks partition the list in order, so a reader can walk both together.
    if (b.listStart !== nextListStart) fail(`pages start at ${b.listStart}, expected ${nextListStart}`)
    if (b.pageCount === 0 || b.pageCount > geometry.pagesPerChunk || b.listStart + b.pageCount > pages.length) {
      fail(`${b.pageCount} pages from ${b.listStart} do not fit (at most ${geometry.pagesPerChunk} per block, ${pages.length} listed)`)
    }
    nextListStart += b.pageCount
    let nonZero = 0
    for (let k = b.listStart; k < b.listStart + b.pageCount; k++) {
      const p = pages[k]
      if (p >= geometry.pageCount) fail(`page ${p} is outside the image's ${geometry.pageCount} pages`)
      if (k > b.listStart && p <= pages[k - 1]) fail(`pages are not ascending (${pages[k - 1]} then ${p})`)
      if (seen[p]) fail(`page ${p} is packed twice`)
      seen[p] = 1
      if (!zeroMap.isZero(p)) nonZero++
    }
    if (b.payloadLength !== nonZero * geometry.pageSize) fail(`payload of ${b.payloadLength} bytes disagrees with its ${nonZero} non-zero pages`)
    if (b.codec === Codec.None) {
      if (b.payloadLength !== 0 || b.storedLength !== 0 || b.dataOffset !== 0) fail('codec none on a block that has data')
    } else {
      const problem = storedLengthProblem(b.codec, b.storedLength, b.payloadLength, sealed)
      if (problem) fail(problem)
    }
    if (b.codec !== Codec.None && b.payloadLength === 0) fail('a block of zero pages must use codec none')
    if (b.codec !== Codec.None && (b.dataOffset < dataStart || b.dataOffset + b.storedLength > dataEnd)) {
      fail(`stored bytes [${b.dataOffset}, ${b.dataOffset + b.storedLength}) lie outside the data section [${dataStart}, ${dataEnd})`)
    }
    blocks.push(b)
  }
  if (nextListStart !== pages.length) throw new SnapshotFormatError('CORRUPT', what, `blocks cover ${nextListStart} of ${pages.length} listed pages`)
  return {blocks, pages}
}

/**
 * Cuts a working set (pages in first-touch order) into blocks of at most `pagesPerBlock` pages,
 * keeping touch order between blocks and sorting pages within one, so consecutive image pages in
 * a block are adjacent in its payload and install with one UFFDIO_COPY.
 */
export function planPackedBlocks(pagesInTouchOrder: readonly number[], pagesPerBlock: number): {listStart: number; pageCount: number; pages: number[]}[] {
  const blocks: {listStart: number; pageCount: number; pages: number[]}[] = []
  for (let i = 0; i < pagesInTouchOrder.length; i += pagesPerBlock) {
    const pages = pagesInTouchOrder.slice(i, i + pagesPerBlock).sort((a, b) => a - b)
    blocks.push({listStart: i, pageCount: pages.length, pages})
  }
  return blocks
}

/**
 * A block's pages as runs of consecutive image pages of one kind, for installing it with one
 * ioctl per run: (first page, page count, payload page) triples, the payload page being the run's
 * position among the block's stored (non-zero) pages, or -1 for a run of zero pages. A block's
 * pages ascend and its payload holds its non-zero pages in that order, so a data run is contiguous
 * in the payload too.
 */
export function packedBlockRuns(set: PackedSet, block: number, zeroMap: ZeroMap): Int32Array {
  const {listStart, pageCount} = set.blocks[block]
  const runs: number[] = []
  let payloadPage = 0
  for (let k = listStart; k < listStart + pageCount; k++) {
    const page = set.pages[k]
    const zero = zeroMap.isZero(page)
    const n = runs.length
    if (n > 0 && runs[n - 3] + runs[n - 2] === page && runs[n - 1] < 0 === zero) runs[n - 2]++
    else runs.push(page, 1, zero ? -1 : payloadPage)
    if (!zero) payloadPage++
  }
  return Int32Array.from(runs)
}

/**
 * How far zero runs around a packed set's pages grow when installed, in bytes. A zero page costs
 * one page-table entry; an ioctl costs ~3 µs. Where most of the set's pages are isolated (no set
 * neighbour), its zero pages are too, and growing each over its 2 MiB window saves an ioctl per
 * zero page; where the set comes in runs, so do its zero pages, and a 256 KiB window avoids mapping
 * memory nobody touches (bench/prefetch: 64 KiB clusters ~15% faster with 256 KiB, scattered
 * pages ~10% faster with 2 MiB).
 */
export function zeroRunWindowBytes(set: PackedSet): number {
  const sorted = Uint32Array.from(set.pages).sort()
  let adjacent = 0
  for (let i = 1; i < sorted.length; i++) if (sorted[i] === sorted[i - 1] + 1) adjacent++
  return adjacent * 2 < sorted.length ? 2 * 1024 * 1024 : 256 * 1024
}

/** For each position of a set's page list, the block holding it (blocks partition the list in order). */
export function blockOfListIndex(set: PackedSet): Int32Array {
  const of = new Int32Array(set.pages.length)
  set.blocks.forEach((b, i) => of.fill(i, b.listStart, b.listStart + b.pageCount))
  return of
}

/**
 * Which block of a packed set holds each of its pages, as the set's pages sorted with their
 * blocks beside them and found by bisection: a table of every page of the image would cost 4
 * bytes per page (16 MiB for 16 GiB) where this costs 8 per packed page.
 */
export class PackedPageLookup {
  private readonly pages: Uint32Array
  private readonly blocks: Int32Array

  constructor(set: PackedSet) {
    const order = Uint32Array.from(set.pages.keys()).sort((a, b) => set.pages[a] - set.pages[b])
    this.pages = order.map((k) => set.pages[k])
    const blockOf = blockOfListIndex(set)
    this.blocks = Int32Array.from(order, (k) => blockOf[k])
  }

  /** The block holding `page`, or -1 when the set has no such page. */
  blockOf(page: number): number {
    const i = indexOfPage(this.pages, page)
    return i < 0 ? -1 : this.blocks[i]
  }
}
