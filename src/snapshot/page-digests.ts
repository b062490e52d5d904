// Reading page digest tables (docs/FORMAT.md, Page digests): a file's own, and the one a chain
// resolves to (each page's digest from the file that holds it), which a layer compares with.

import {SOURCE_ZERO} from '../format/constants.js'
import {SnapshotFormatError} from '../format/errors.js'
import {checkDigestInfo, decodeDigestTable, expandDigestKey, PAGE_DIGEST_BYTES, type PageDigestInfo} from '../format/page-digest.js'
import {crc32} from '../sys/crc.js'
import {pageDigests} from '../sys/digest.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {type SnapshotReader} from './reader.js'

/** A Buffer's bytes as u32 words (copied when not 4-byte aligned). */
function words(bytes: Buffer): Uint32Array {
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : Buffer.from(bytes)
  return new Uint32Array(aligned.buffer, aligned.byteOffset, aligned.length / 4)
}

/** A file's digest table: 16 bytes per page it stores (a base: its non-zero pages in page order; a layer: its page list's). */
export interface FileDigests {
  info: PageDigestInfo
  rows: Buffer
  /** Where the table lies in the file, and its length (trailer included). */
  offset: number
  length: number
}

/** Rows a file's table holds: one per page the file itself stores. */
export function digestRowCount(file: SnapshotReader): number {
  return file.layer ? file.layer.set.pages.length : file.geometry.pageCount - file.zeroMap.countZero(0, file.geometry.pageCount)
}

/**
 * The file's digest table, CRC-checked, or undefined when it has none (the compat bit clear).
 * The table ends where the chunk index starts, so it is found without the header saying where.
 */
export function readFileDigests(file: SnapshotReader): FileDigests | undefined {
  const table = file.pageDigestTable()
  if (!table) return undefined
  try {
    const info = checkDigestInfo(file.header.metadata.pageDigests)
    if ('problem' in table) throw new SnapshotFormatError('CORRUPT', 'page digest table', table.problem)
    return {info, rows: decodeDigestTable(table.bytes, digestRowCount(file), crc32), offset: table.offset, length: table.bytes.length}
  } catch (error) {
    if (error instanceof SnapshotFormatError) throw error.withFile(file.source.name)
    throw error
  }
}

/** The digests of the image a snapshot or chain resolves to: a row per page (zeros for a zero page), under one key. */
export interface ResolvedDigests {
  info: PageDigestInfo
  /** pageCount * 16 bytes. */
  rows: Buffer
}

/**
 * The digests of every page of `image`, each from the table of the file that holds it, when every
 * file of the chain has a table and all share one key; undefined otherwise (compare by decoding).
 * A table that fails its checks is an error (CORRUPT): trusted, it would hide a changed page.
 */
export function resolvedDigests(image: ImageReader): ResolvedDigests | undefined {
  const files = image instanceof LayeredReader ? image.files : [image]
  const tables: FileDigests[] = []
  for (const f of files) {
    const t = readFileDigests(f)
    if (!t || (tables.length > 0 && t.info.key !== tables[0].info.key)) return undefined
    tables.push(t)
  }
  const {pageCount} = image.geometry
  const rows = Buffer.alloc(pageCount * PAGE_DIGEST_BYTES)
  // Rows are copied as four u32 words: a Buffer.copy per page cost more than the copying.
  const out = words(rows)
  const from = tables.map((t) => words(t.rows))
  const copyRow = (source: number, row: number, page: number): void => {
    const f = from[source]
    for (let k = 0; k < 4; k++) out[page * 4 + k] = f[row * 4 + k]
  }
  const base = files[0]
  if (!(image instanceof LayeredReader)) {
    for (let p = 0, row = 0; p < pageCount; p++) if (!base.zeroMap.isZero(p)) copyRow(0, row++, p)
    return {info: tables[0].info, rows}
  }
  // Each page's row in the base: its rank among the base's non-zero pages.
  const baseRow = new Int32Array(pageCount)
  for (let p = 0, row = 0; p < pageCount; p++) baseRow[p] = base.zeroMap.isZero(p) ? -1 : row++
  // Runs ascend through the image, and each layer's page list ascends: one cursor per layer.
  const cursor = new Int32Array(files.length)
  for (const run of image.runs) {
    if (run.source === SOURCE_ZERO) continue
    for (let p = run.firstPage; p < run.firstPage + run.pageCount; p++) {
      let row: number
      if (run.source === 0) {
        row = baseRow[p]
      } else {
        const list = files[run.source].layer!.set.pages
        while (cursor[run.source] < list.length && list[cursor[run.source]] < p) cursor[run.source]++
        row = list[cursor[run.source]] === p ? cursor[run.source] : -1
      }
      // The reader checked that each file holds the pages the table takes from it.
      if (row < 0) throw new SnapshotFormatError('CORRUPT', 'page digest table', `page ${p} is not one that file ${run.source} of the chain holds`, files[run.source].source.name)
      copyRow(run.source, row, p)
    }
  }
  return {info: tables[0].info, rows}
}

/**
 * Checks a file's digest table against its pages, unit by unit, as verify decodes them: each row
 * must be the digest of the page it stands for (a wrong row would make a later layer skip a
 * changed page and serve its parent's bytes).
 */
export class DigestChecker {
  private readonly key: Uint32Array
  /** A base: the first row of each chunk (its non-zero pages' ranks start there). */
  private readonly chunkRows: Int32Array | undefined
  private out = Buffer.alloc(0)
  checked = 0

  constructor(
    private readonly file: SnapshotReader,
    private readonly table: FileDigests,
  ) {
    this.key = expandDigestKey(table.info.key)
    if (!file.layer) {
      const {geometry} = file
      this.chunkRows = new Int32Array(geometry.chunkCount + 1)
      for (let c = 0; c < geometry.chunkCount; c++) this.chunkRows[c + 1] = this.chunkRows[c] + geometry.pagesInChunk(c) - file.zeroMap.countZero(geometry.firstPageOfChunk(c), geometry.pagesInChunk(c))
    }
  }

  /** Whether unit `unit` of the file holds pages the table has rows for (a base's chunk, a layer's own block). */
  covers(unit: number): boolean {
    return this.file.layer ? unit < this.file.layer.set.blocks.length : unit < this.file.index.length
  }

  /**
   * Problems of the rows of unit `unit`, given its verified payload (its non-zero pages in order):
   * one message per page whose digest differs, naming it.
   */
  checkPayload(unit: number, payload: Buffer): string[] {
    const pageSize = this.file.geometry.pageSize
    const pages = payload.length / pageSize
    const firstRow = this.file.layer ? this.file.layer.set.blocks[unit].listStart : this.chunkRows![unit]
    if (this.out.length < pages * PAGE_DIGEST_BYTES) this.out = Buffer.alloc(pages * PAGE_DIGEST_BYTES)
    pageDigests(payload, pages, this.key, this.out)
    const problems: string[] = []
    for (let i = 0; i < pages; i++) {
      const row = firstRow + i
      if (this.out.compare(this.table.rows, row * PAGE_DIGEST_BYTES, (row + 1) * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES) !== 0) problems.push(`${this.file.source.name}: page digest table: row ${row} (${this.pageName(unit, i)}) is not the digest of the page it stands for`)
    }
    this.checked += pages
    return problems
  }

  /**
   * As checkPayload, for a base's chunk given whole (zero pages included, as readChunk lays it
   * out): its data pages' rows against those pages, digested in one call with the zero pages.
   */
  checkChunk(chunk: number, bytes: Buffer): string[] {
    const {geometry, zeroMap} = this.file
    const pages = geometry.pagesInChunk(chunk)
    const first = geometry.firstPageOfChunk(chunk)
    if (this.out.length < pages * PAGE_DIGEST_BYTES) this.out = Buffer.alloc(pages * PAGE_DIGEST_BYTES)
    pageDigests(bytes, pages, this.key, this.out)
    const problems: string[] = []
    for (let i = 0, index = 0; i < pages; i++) {
      if (zeroMap.isZero(first + i)) continue
      const row = this.chunkRows![chunk] + index
      if (this.out.compare(this.table.rows, row * PAGE_DIGEST_BYTES, (row + 1) * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES) !== 0) problems.push(`${this.file.source.name}: page digest table: row ${row} (${this.pageName(chunk, index)}) is not the digest of the page it stands for`)
      index++
      this.checked++
    }
    return problems
  }

  private pageName(unit: number, index: number): string {
    const layer = this.file.layer
    if (layer) return `page ${layer.set.pages[layer.set.blocks[unit].listStart + index]}`
    return `data page ${index} of chunk ${unit}`
  }
}
