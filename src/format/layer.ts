import {createHash} from 'node:crypto'
import {crc32} from 'node:zlib'

import {LAYER_RUN_ENTRY_SIZE, SOURCE_ZERO} from './constants.js'
import {SnapshotFormatError} from './errors.js'
import {type Geometry} from './geometry.js'
import {hex} from './header.js'
import {type PackedSet} from './packed-set.js'
import {type ZeroMap} from './zero-map.js'

/**
 * Layers (docs/FORMAT.md, incompatible bit 0): a snapshot that stores only the pages that differ
 * from its parent's, and a run table saying, for every page of the image, which file of the
 * chain holds it. The table is flattened when the layer is written (the parent's table with this
 * layer's changes laid over it), so finding a page costs one binary search whatever the depth.
 * Pure: no I/O.
 */

/** Pages [firstPage, firstPage + pageCount) come from `source`: an ancestor (0 = the base), this layer (= the parent count) or SOURCE_ZERO. */
export interface LayerRun {
  firstPage: number
  pageCount: number
  source: number
}

/** One ancestor of a layer, base first: how it is found (its file name) and how it is recognised (identity). */
export interface LayerParent {
  name: string
  /** Its content identity (a base: memoryDigest; a layer: layerIdentity), 64 lowercase hex digits. */
  id: string
}

/** Where a layer's structures live, from the (untrusted) metadata's `layer` object. */
export interface LayerLocation {
  runs: {offset: number; length: number; crc: number; count: number}
  parents: LayerParent[]
}

/** Most ancestors a chain may have: bounds how many files a reader opens for one top layer. */
export const MAX_LAYER_DEPTH = 64

/** The runs of an ordinary snapshot seen as a parent: its non-zero pages from itself (source 0), its zero pages zero. */
export function baseRuns(zeroMap: ZeroMap): LayerRun[] {
  const runs: LayerRun[] = []
  const {bytes, pageCount} = zeroMap
  for (let p = 0; p < pageCount; ) {
    const zero = zeroMap.isZero(p)
    let q = p + 1
    while (q < pageCount && (q & 7) !== 0 && zeroMap.isZero(q) === zero) q++
    // Whole bytes of the map at a time while they continue the run (a guest's zero ranges are long).
    const same = zero ? 0xff : 0
    while (q + 8 <= pageCount && (q & 7) === 0 && bytes[q >>> 3] === same) q += 8
    while (q < pageCount && zeroMap.isZero(q) === zero) q++
    runs.push({firstPage: p, pageCount: q - p, source: zero ? SOURCE_ZERO : 0})
    p = q
  }
  return runs
}

/** Appends a run, merging it into the previous one when it continues it with the same source (the table stays normalised). */
function push(runs: LayerRun[], firstPage: number, pageCount: number, source: number): void {
  if (pageCount <= 0) return
  const last = runs.at(-1)
  if (last && last.source === source && last.firstPage + last.pageCount === firstPage) last.pageCount += pageCount
  else runs.push({firstPage, pageCount, source})
}

/**
 * The flattened table of a layer: `parent` (a flattened table covering the image) with
 * `overrides` (sorted, non-overlapping runs: the pages this layer changed, each with its new
 * source) laid over it. One sweep over both, O(parent + overrides).
 */
export function composeRuns(parent: readonly LayerRun[], overrides: readonly LayerRun[]): LayerRun[] {
  const out: LayerRun[] = []
  let i = 0
  let cursor = 0
  const end = parent.length === 0 ? 0 : parent.at(-1)!.firstPage + parent.at(-1)!.pageCount
  const copyParent = (upTo: number): void => {
    while (cursor < upTo) {
      while (parent[i].firstPage + parent[i].pageCount <= cursor) i++
      const r = parent[i]
      const stop = Math.min(upTo, r.firstPage + r.pageCount)
      push(out, cursor, stop - cursor, r.source)
      cursor = stop
    }
  }
  for (const o of overrides) {
    if (o.firstPage < cursor || o.firstPage + o.pageCount > end) throw new RangeError(`override [${o.firstPage}, ${o.firstPage + o.pageCount}) is out of order or outside ${end} pages`)
    copyParent(o.firstPage)
    push(out, o.firstPage, o.pageCount, o.source)
    cursor = o.firstPage + o.pageCount
  }
  copyParent(end)
  return out
}

/** Index of the run holding `page` (the table covers the image, so there is one). */
export function findRun(runs: readonly LayerRun[], page: number): number {
  let lo = 0
  let hi = runs.length - 1
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1
    if (runs[mid].firstPage <= page) lo = mid
    else hi = mid - 1
  }
  return lo
}

/**
 * Why a table is not a flattened table of a layer with `parents` ancestors over `pageCount`
 * pages, or undefined: runs must be sorted, adjacent (no gap, no overlap), cover the image
 * exactly, be non-empty, name a known source, and be normalised (neighbours differ in source).
 */
export function runTableProblem(runs: readonly LayerRun[], pageCount: number, parents: number): string | undefined {
  let next = 0
  // Indexed loops in these checks: every thread serving a chain runs them once, on code not yet
  // optimised, where an iterator per run costs several times the check.
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]
    if (r.firstPage !== next) return `run ${i} starts at page ${r.firstPage}, expected ${next}`
    if (r.pageCount <= 0) return `run ${i} is empty`
    if (r.source !== SOURCE_ZERO && r.source > parents) return `run ${i} names source ${r.source}, but the chain has ${parents + 1} files`
    if (i > 0 && runs[i - 1].source === r.source) return `runs ${i - 1} and ${i} have the same source (the table is not normalised)`
    next = r.firstPage + r.pageCount
    if (next > pageCount) return `run ${i} ends at page ${next}, past the image's ${pageCount} pages`
  }
  if (next !== pageCount) return `the runs cover ${next} of ${pageCount} pages`
  return undefined
}

export function encodeRunTable(runs: readonly LayerRun[]): Buffer {
  const buf = Buffer.alloc(runs.length * LAYER_RUN_ENTRY_SIZE)
  for (const [i, r] of runs.entries()) {
    const at = i * LAYER_RUN_ENTRY_SIZE
    buf.writeUInt32LE(r.firstPage, at)
    buf.writeUInt32LE(r.pageCount, at + 4)
    buf.writeUInt32LE(r.source, at + 8)
  }
  return buf
}

export function decodeRunTable(buf: Buffer, location: LayerLocation, pageCount: number): LayerRun[] {
  const crc = crc32(buf)
  if (crc !== location.runs.crc) throw new SnapshotFormatError('CORRUPT', 'layer run table', `checksum mismatch (stored ${hex(location.runs.crc)}, computed ${hex(crc)})`)
  const runs: LayerRun[] = new Array(location.runs.count)
  for (let i = 0; i < runs.length; i++) {
    const at = i * LAYER_RUN_ENTRY_SIZE
    if (buf.readUInt32LE(at + 12) !== 0) throw new SnapshotFormatError('CORRUPT', 'layer run table', `run ${i}: reserved field is not zero`)
    runs[i] = {firstPage: buf.readUInt32LE(at), pageCount: buf.readUInt32LE(at + 4), source: buf.readUInt32LE(at + 8)}
  }
  const problem = runTableProblem(runs, pageCount, location.parents.length)
  if (problem) throw new SnapshotFormatError('CORRUPT', 'layer run table', problem)
  return runs
}

/** Checks `metadata.layer` before anything is read or allocated for it. */
export function checkLayerLocation(value: unknown, dataStart: number, dataEnd: number, geometry: Geometry): LayerLocation {
  const fail = (detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', 'layer', detail)
  }
  if (typeof value !== 'object' || value === null) return fail('metadata.layer is not an object')
  const v = value as Record<string, unknown>
  if (typeof v.runs !== 'object' || v.runs === null) return fail('metadata.layer.runs is not an object')
  const r = v.runs as Record<string, unknown>
  const n = (key: string, max: number): number => {
    const x = r[key]
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0 || x > max) return fail(`runs.${key} ${String(x)} is not an integer in 0..${max}`)
    return x
  }
  // 8 hex digits, fixed width, as for the packed working set: the header's size does not depend on the value.
  if (typeof r.crc !== 'string' || !/^[0-9a-f]{8}$/.test(r.crc)) fail(`runs.crc ${String(r.crc)} is not 8 hex digits`)
  const runs = {offset: n('offset', dataEnd), length: n('length', dataEnd), crc: Number.parseInt(r.crc as string, 16), count: n('count', geometry.pageCount)}
  if (runs.length !== runs.count * LAYER_RUN_ENTRY_SIZE) fail(`run table of ${runs.length} bytes cannot hold ${runs.count} runs`)
  if (runs.offset < dataStart || runs.offset + runs.length > dataEnd) fail(`run table [${runs.offset}, ${runs.offset + runs.length}) lies outside the data section [${dataStart}, ${dataEnd})`)
  if (!Array.isArray(v.parents) || v.parents.length === 0 || v.parents.length > MAX_LAYER_DEPTH) fail(`parents is not a list of 1 to ${MAX_LAYER_DEPTH} ancestors`)
  const parents = (v.parents as unknown[]).map((p, i): LayerParent => {
    const o = p as Record<string, unknown> | null
    if (typeof o?.name !== 'string' || o.name === '' || o.name.includes('/') || o.name === '.' || o.name === '..') return fail(`parent ${i}: name ${JSON.stringify(o?.name)} is not a file name`)
    if (typeof o.id !== 'string' || !/^[0-9a-f]{64}$/.test(o.id)) return fail(`parent ${i}: id is not 64 hex digits`)
    return {name: o.name, id: o.id}
  })
  return {runs, parents}
}

/**
 * Cross-checks a layer's own pages (its packed blocks) against its table and zero map: the pages
 * it stores are exactly those its table says it provides, ascending through the whole list (a
 * reader finds a page by binary search), and none is a zero page (zero pages are a zero source);
 * every page the table calls zero is zero in the zero map, and every other page is not.
 */
export function layerPagesProblem(runs: readonly LayerRun[], self: number, set: PackedSet, zeroMap: ZeroMap): string | undefined {
  let k = 0
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]
    // A whole run at once when it agrees with the zero map (counted a byte of the map at a time:
    // every thread that opens a chain checks each of its layers), page by page to say where not.
    const zeros = zeroMap.countZero(r.firstPage, r.pageCount)
    if (zeros !== (r.source === SOURCE_ZERO ? r.pageCount : 0)) {
      for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) {
        if ((r.source === SOURCE_ZERO) !== zeroMap.isZero(p)) return `page ${p} is ${zeroMap.isZero(p) ? '' : 'not '}zero in the zero map, but its run's source is ${r.source === SOURCE_ZERO ? 'zero' : r.source}`
      }
    }
    if (r.source !== self) continue
    for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) {
      if (k >= set.pages.length || set.pages[k] !== p) return `page ${p} comes from this layer but is not the next stored page (${k < set.pages.length ? set.pages[k] : 'none'})`
      k++
    }
  }
  if (k !== set.pages.length) return `${set.pages.length - k} stored pages are not provided by this layer's runs`
  return undefined
}

/** Position of `page` in an ascending page list, or -1. */
export function indexOfPage(pages: Uint32Array, page: number): number {
  let lo = 0
  let hi = pages.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1
    if (pages[mid] === page) return mid
    if (pages[mid] < page) lo = mid + 1
    else hi = mid - 1
  }
  return -1
}

/**
 * What fraction of the image each file of a chain provides: pages per source (index = source,
 * the last entry = this layer), and zero pages.
 */
export function pagesBySource(runs: readonly LayerRun[], files: number): {pages: number[]; zero: number} {
  const pages = new Array<number>(files).fill(0)
  let zero = 0
  for (const r of runs) {
    if (r.source === SOURCE_ZERO) zero += r.pageCount
    else pages[r.source] += r.pageCount
  }
  return {pages, zero}
}

/**
 * The content identity of a layer (docs/FORMAT.md, Layers), as memoryDigest is a base's: what its
 * pages are, not where its bytes lie. SHA-256 of "uffd-layer\0", the page size and logical size
 * (u32, u64), the ancestors' identities (as ASCII hex, base first), the run table (as encoded),
 * each block's stored length, payload length, stored CRC, codec, list start and page count (u32
 * LE each), the page list (u32 LE each), then the zero map.
 */
export function layerIdentity(geometry: Geometry, parents: readonly LayerParent[], runs: readonly LayerRun[], set: PackedSet, zeroMap: Uint8Array): string {
  const hash = createHash('sha256').update('uffd-layer\0')
  const head = Buffer.alloc(12)
  head.writeUInt32LE(geometry.pageSize, 0)
  head.writeBigUInt64LE(BigInt(geometry.logicalSize), 4)
  hash.update(head)
  for (const p of parents) hash.update(p.id)
  hash.update(encodeRunTable(runs))
  const entry = Buffer.alloc(24)
  for (const b of set.blocks) {
    entry.writeUInt32LE(b.storedLength, 0)
    entry.writeUInt32LE(b.payloadLength, 4)
    entry.writeUInt32LE(b.storedCrc, 8)
    entry.writeUInt32LE(b.codec, 12)
    entry.writeUInt32LE(b.listStart, 16)
    entry.writeUInt32LE(b.pageCount, 20)
    hash.update(entry)
  }
  hash.update(Buffer.from(set.pages.buffer, set.pages.byteOffset, set.pages.byteLength))
  hash.update(zeroMap)
  return hash.digest('hex')
}
