import fs from 'node:fs'
import {setImmediate as yieldToEventLoop} from 'node:timers/promises'
import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {COMPAT_PAGE_DIGESTS, FOOTER_SIZE, INCOMPAT_LAYERED, SOURCE_ZERO} from '../format/constants.js'
import {encodeHeader} from '../format/header.js'
import {baseRuns, composeRuns, encodeRunTable, type LayerParent, type LayerRun, MAX_LAYER_DEPTH} from '../format/layer.js'
import {encodePackedTable, type PackedBlock} from '../format/packed-set.js'
import {encodeDigestTable, expandDigestKey, PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {ManifestPart, SEAL_RECORD_SIZE, UNIT_DIGEST_BYTES, unitDigest, UnitKind} from '../format/seal.js'
import {ZeroMap} from '../format/zero-map.js'
import {crc32 as fastCrc32} from '../sys/crc.js'
import {pageDigests} from '../sys/digest.js'
import {onFile} from '../sys/errors.js'
import {appendTail} from './atomic-file.js'
import {type ReadSegment} from './chunk-job.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {type OutputSink} from './output-sink.js'
import {resolvedDigests} from './page-digests.js'
import {FileSealer, type SealingOptions} from './sealing.js'
import {type ImageInput} from './writer.js'

export interface LayerOptions {
  codec: CompressionCodec
  level: number
  /**
   * The input is a Firecracker Diff snapshot: image bytes no segment covers (its holes) are
   * unchanged since the parent, not zeros.
   */
  diff: boolean
  onProgress?: (doneBytes: number, totalBytes: number) => void
  signal?: AbortSignal
  /** Encrypt and/or sign the layer (docs/FORMAT.md, Sealed snapshots). */
  seal?: SealingOptions
  /** Store the layer's own page digest table when its parent chain has digests [default: true]; never in a sealed layer. */
  pageDigests?: boolean
}

/** The snapshot a layer is written over: its reader, how it prints, and the file name the layer records for it. */
export interface LayerParentInput {
  reader: ImageReader
  shown: string
  fileName: string
}

export interface LayerSummary {
  path: string
  parent: string
  depth: number
  logicalSize: number
  fileSize: number
  pageSize: number
  chunkSize: number
  pageCount: number
  /** Pages whose content differs from the parent's. */
  changedPages: number
  /** Of those, pages that became zero (recorded in the table, nothing stored). */
  zeroedPages: number
  storedPages: number
  blocks: number
  storedBytes: number
  /** Pages of the image (diff: the diff file's data pages) compared with the parent. */
  comparedPages: number
  /** How pages were compared: by the chain's page digests, or by decoding the parent. */
  compared: 'digests' | 'decoded'
  /** Bytes of the layer's own page digest table (0: it has none). */
  pageDigestBytes: number
  seconds: number
}

/**
 * Writes a layer of `input` over `parent` (docs/FORMAT.md, Layers): every page is compared with
 * the parent's resolved image, and only those that differ are stored, packed in compressed blocks
 * of ascending pages; the run table is the parent's with the changes laid over it. The layer's
 * blocks are held in memory until the end (their size decides where the tables go in the header),
 * so it costs about its own compressed size in memory. Written to the sink `open` makes (given
 * the layer's size once it is known): committed whole, or discarded on any failure.
 */
export async function writeLayer(input: ImageInput, of: LayerParentInput, open: (sizeHint: number) => OutputSink, options: LayerOptions): Promise<LayerSummary> {
  const started = performance.now()
  const {reader: parent, shown: parentPath} = of
  const {geometry} = parent
  const {pageSize} = geometry
  if (input.logicalSize !== geometry.logicalSize) {
    throw new UffdError('INPUT_MISMATCH', `the image holds ${input.logicalSize} bytes, its parent ${parentPath} ${geometry.logicalSize}: a layer must have its parent's size`)
  }
  // The parent's own ancestors by the names its layer recorded (found by them), the parent by its file name.
  const ancestors: LayerParent[] = [...(parent instanceof LayeredReader ? parent.files.at(-1)!.layer!.parents : []), {name: of.fileName, id: parent instanceof LayeredReader ? parent.files.at(-1)!.identity : parent.identity}]
  if (ancestors.length > MAX_LAYER_DEPTH) throw new UffdError('INPUT_MISMATCH', `${parentPath} is ${ancestors.length - 1} layers deep already; a chain holds at most ${MAX_LAYER_DEPTH}: squash it first (uffd squash)`)
  if (input.unchangedPages) checkUnchangedPlacement(input, parent, parentPath)
  const parentRuns = parent instanceof LayeredReader ? parent.runs : baseRuns(parent.zeroMap)
  const self = ancestors.length

  // With a digest for every page of the parent chain, pages are compared by digest and the parent
  // is never decoded (docs/FORMAT.md, Page digests); the layer then stores its own pages' digests
  // too, under the chain's key. A sealed layer stores none (its digests would be in the clear).
  const parentDigests = resolvedDigests(parent)
  const compressor = new ChunkCompressor(options.codec, options.level)
  const sealer = FileSealer.create(options.seal ?? {}, [UnitKind.LayerBlock])
  const reader = new SegmentReader()
  const overrides: LayerRun[] = []
  const changed: number[] = []
  const blocks: PackedBlock[] = []
  const stored: Buffer[] = []
  let storedBytes = 0
  let dataAt = 0
  // The block being filled: its pages' bytes copied in place (a GiB image compares 262144 pages:
  // a buffer per page kept the collector busy).
  const pending = Buffer.alloc(geometry.chunkSize)
  let pendingPages: number[] = []
  const addPage = (page: number, from: Buffer, at: number): void => {
    from.copy(pending, pendingPages.length * pageSize, at, at + pageSize)
    pendingPages.push(page)
    if (pendingPages.length === geometry.pagesPerChunk) flush()
  }
  const flush = (): void => {
    if (pendingPages.length === 0) return
    const payload = pending.subarray(0, pendingPages.length * pageSize)
    const c = compressor.compress(payload)
    // The compressor reuses its output buffer: keep a copy (sealing makes one).
    const bytes = sealer?.encrypted ? sealer.seal({kind: UnitKind.LayerBlock, number: blocks.length, codec: c.codec, payloadLength: payload.length, unit: blocks.length}, c.stored) : copyOf(c.stored)
    blocks.push({dataOffset: dataAt, storedLength: bytes.length, payloadLength: payload.length, storedCrc: crc32(bytes), codec: c.codec, flags: 0, listStart: changed.length - pendingPages.length, pageCount: pendingPages.length})
    stored.push(bytes)
    dataAt += bytes.length
    storedBytes += bytes.length
    pendingPages = []
  }

  const digestKey = parentDigests && expandDigestKey(parentDigests.info.key)
  const ownDigests = parentDigests !== undefined && !sealer && options.pageDigests !== false
  // The layer's own rows, in page-list order: at most one per page.
  const ownRows = Buffer.alloc(ownDigests ? geometry.pageCount * PAGE_DIGEST_BYTES : 0)
  const newDigests = Buffer.alloc(geometry.pagesPerChunk * PAGE_DIGEST_BYTES)
  const pageKinds = new Uint8Array(geometry.pagesPerChunk)
  const unchangedScratch = new Uint8Array(geometry.pagesPerChunk)
  const zeroPage = Buffer.alloc(pageSize)
  const olderBuffer = Buffer.alloc(geometry.chunkSize)
  const newer = Buffer.alloc(geometry.chunkSize)
  let zeroed = 0
  let compared = 0
  // A parent in object storage streams in with the fetcher's concurrency, not one round trip
  // per chunk compared (a diff compares only the chunks it has data in).
  const segmentsOf = (c: number): ReadSegment[] => input.segments(geometry.chunkStart(c), Math.min(input.logicalSize, geometry.chunkStart(c) + geometry.pagesInChunk(c) * pageSize))
  if (parent.remote && !parentDigests) parent.fetchAhead(Array.from({length: geometry.chunkCount}, (_, c) => c).filter((c) => !options.diff || segmentsOf(c).length > 0))
  try {
    for (let c = 0; c < geometry.chunkCount; c++) {
      if (c % 16 === 0) {
        // Comparing and compressing run on this thread: let a signal in between chunks.
        await yieldToEventLoop()
        options.signal?.throwIfAborted()
      }
      const first = geometry.firstPageOfChunk(c)
      const pages = geometry.pagesInChunk(c)
      const start = geometry.chunkStart(c)
      const end = Math.min(input.logicalSize, start + pages * pageSize)
      const segments = segmentsOf(c)
      // A diff's holes are unchanged pages: a chunk without data is its parent's.
      if (options.diff && segments.length === 0) continue
      const present = reader.read(segments, start, newer.subarray(0, pages * pageSize), pageSize, options.diff)
      // Pages the input says are unchanged (not in it): the parent's, like a diff's holes.
      const unchanged = unchangedScratch.fill(0).subarray(0, pages)
      for (const r of input.unchanged?.(start, end) ?? []) unchanged.fill(1, Math.floor((r.start - start) / pageSize), Math.ceil((r.end - start) / pageSize))
      // Pages are compared with the parent chunk's payload (its data pages, in order), decoded
      // only once a compared page is a data page of the parent: a zero page is compared with
      // zeros, so a diff whose pages were all zero in the parent decodes nothing.
      if (digestKey) {
        compared += compareByDigest({first, pages, newer, present: options.diff ? present : undefined, unchanged, pageSize, parentZero: parent.zeroMap, parentRows: parentDigests!.rows, key: digestKey, zeroPage, digests: newDigests, kind: pageKinds}, (page, at, digest) => {
          if (digest === undefined) {
            overrides.push({firstPage: page, pageCount: 1, source: SOURCE_ZERO})
            zeroed++
            return
          }
          overrides.push({firstPage: page, pageCount: 1, source: self})
          if (ownDigests) digest.copy(ownRows, changed.length * PAGE_DIGEST_BYTES)
          changed.push(page)
          addPage(page, newer, at)
        })
        options.onProgress?.(end, input.logicalSize)
        continue
      }
      let older: Buffer | undefined
      for (let i = 0, position = 0; i < pages; i++) {
        const page = first + i
        const parentZero = parent.zeroMap.isZero(page)
        const olderAt = position * pageSize
        if (!parentZero) position++
        if ((options.diff && !present[i]) || unchanged[i]) continue
        compared++
        const at = i * pageSize
        const isZero = (): boolean => zeroPage.compare(newer, at, at + pageSize) === 0
        if (parentZero ? isZero() : newer.compare((older ??= parent.readPayload(c, olderBuffer)), olderAt, olderAt + pageSize, at, at + pageSize) === 0) continue
        if (!parentZero && isZero()) {
          overrides.push({firstPage: page, pageCount: 1, source: SOURCE_ZERO})
          zeroed++
          continue
        }
        overrides.push({firstPage: page, pageCount: 1, source: self})
        changed.push(page)
        addPage(page, newer, at)
      }
      options.onProgress?.(Math.min(input.logicalSize, start + pages * pageSize), input.logicalSize)
    }
    flush()
  } finally {
    reader.close()
  }

  const runs = composeRuns(parentRuns, overrides)
  const zeroMap = new ZeroMap(geometry.pageCount)
  for (const r of runs) if (r.source === SOURCE_ZERO) for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) zeroMap.setZero(p)
  const runTable = encodeRunTable(runs)

  // The header names where the tables lie, after the blocks' bytes; its own size depends on those
  // numbers' digits, so it is encoded until its size stops changing (numbers only grow: twice or three times).
  const digestTable = ownDigests ? encodeDigestTable(ownRows.subarray(0, changed.length * PAGE_DIGEST_BYTES), fastCrc32) : undefined
  let headerSize = 0
  let header: Buffer
  let blockTable: Buffer
  for (;;) {
    const placed = blocks.map((b) => ({...b, dataOffset: headerSize + b.dataOffset}))
    blockTable = encodePackedTable({blocks: placed, pages: Uint32Array.from(changed)})
    const blocksAt = headerSize + dataAt
    const runsAt = blocksAt + blockTable.length
    header = encodeHeader({
      incompatFeatures: INCOMPAT_LAYERED | (sealer?.incompatFeatures ?? 0n),
      compatFeatures: (sealer?.compatFeatures ?? 0n) | (digestTable ? COMPAT_PAGE_DIGESTS : 0n),
      pageSize,
      chunkSize: geometry.chunkSize,
      logicalSize: geometry.logicalSize,
      regions: input.regions,
      metadata: {
        ...input.metadata,
        codec: options.codec,
        level: options.level,
        ...(options.diff ? {diff: true} : {}),
        ...(digestTable ? {pageDigests: parentDigests!.info} : {}),
        layer: {
          runs: {offset: runsAt, length: runTable.length, crc: hex8(runTable), count: runs.length},
          blocks: {offset: blocksAt, length: blockTable.length, crc: hex8(blockTable), blocks: blocks.length, pages: changed.length},
          parents: ancestors,
        },
        ...(sealer ? {seal: sealer.metadata} : {}),
      },
    })
    if (header.length === headerSize) break
    headerSize = header.length
  }

  const file = open(header.length + storedBytes + blockTable.length + runTable.length + (digestTable?.length ?? 0) + zeroMap.bytes.length + (sealer ? SEAL_RECORD_SIZE + blocks.length * UNIT_DIGEST_BYTES : 0) + FOOTER_SIZE)
  try {
    file.append(header)
    for (const bytes of stored) {
      file.append(bytes)
      // An upload holds the writer here while its parts go out.
      await file.drain(options.signal)
    }
    file.append(blockTable)
    file.append(runTable)
    // Right before the (empty) index, where a reader looks for it.
    if (digestTable) file.append(digestTable)
    const seal = sealer && {
      sealer,
      parts: [
        {part: ManifestPart.LayerBlockTable, bytes: blockTable},
        {part: ManifestPart.LayerRunTable, bytes: runTable},
      ],
      unitDigests: sealer.signed ? Buffer.concat(stored.map((b) => unitDigest(b))) : undefined,
      blocks: blocks.length,
    }
    appendTail(file, [], zeroMap, header, seal)
    options.signal?.throwIfAborted()
    await file.commit()
    return {
      path: file.destination,
      parent: parentPath,
      depth: self,
      logicalSize: geometry.logicalSize,
      fileSize: file.size,
      pageSize,
      chunkSize: geometry.chunkSize,
      pageCount: geometry.pageCount,
      changedPages: changed.length + zeroed,
      zeroedPages: zeroed,
      storedPages: changed.length,
      blocks: blocks.length,
      storedBytes,
      comparedPages: compared,
      compared: digestKey ? 'digests' : 'decoded',
      pageDigestBytes: digestTable?.length ?? 0,
      seconds: (performance.now() - started) / 1000,
    }
  } finally {
    await file.discard()
  }
}

/**
 * An input's unchanged pages (an incremental CRIU dump's PE_PARENT pages) are named by where its
 * layout puts them, so the parent must be the snapshot of the earlier dump, laid out alike: the
 * same tasks, and every region (a task's VMA) at the same image offset with the same address and
 * size. Content cannot tell: those pages are not in the input.
 */
function checkUnchangedPlacement(input: ImageInput, parent: ImageReader, parentPath: string): void {
  const pids = (meta: Record<string, unknown>): string => (Array.isArray(meta.tasks) ? (meta.tasks as {pid?: unknown}[]).map((t) => String(t.pid)).join(',') : '')
  const fail = (detail: string): never => {
    throw new UffdError('NOT_THIS_DUMP', `${String(input.metadata.criuDir ?? 'the input')} has ${input.unchangedPages} pages in its parent dump, but ${parentPath} is not that dump's snapshot: ${detail}`)
  }
  const meta = parent.header.metadata
  if (meta.source !== 'criu') fail(`it was made from ${String(meta.source)}, not a CRIU dump`)
  if (pids(meta) !== pids(input.metadata)) fail(`its tasks are [${pids(meta)}], the dump's [${pids(input.metadata)}]`)
  const ours = input.regions
  const theirs = parent.header.regions
  const k = ours.findIndex((r, i) => theirs[i] === undefined || r.imageOffset !== theirs[i].imageOffset || r.address !== theirs[i].address || r.size !== theirs[i].size || r.owner !== theirs[i].owner)
  if (k >= 0 || ours.length !== theirs.length) fail(k >= 0 ? `region ${k} (task ${ours[k].owner}, 0x${ours[k].address.toString(16)}, ${ours[k].size} bytes) is not laid out alike in it` : `it has ${theirs.length} regions, the dump ${ours.length}`)
}

/** One chunk of the new image, to compare with its parent by digest. */
interface DigestComparison {
  first: number
  pages: number
  /** The chunk's bytes, whole pages. */
  newer: Buffer
  /** A diff: the pages it has data for (the others are unchanged). */
  present: Uint8Array | undefined
  /** Pages the input says are unchanged. */
  unchanged: Uint8Array
  pageSize: number
  parentZero: ZeroMap
  /** The parent chain's resolved digests, 16 bytes per image page. */
  parentRows: Buffer
  key: Uint32Array
  zeroPage: Buffer
  /** Scratch for the chunk's digests, 16 bytes per page. */
  digests: Buffer
  /** Scratch, a byte per page of a chunk. */
  kind: Uint8Array
}

/**
 * Compares a chunk's pages with the parent's by content digest: a page that is zero now differs
 * exactly when the parent's is not; any other page differs when the parent's is zero or its digest
 * differs (docs/FORMAT.md, Page digests: a changed page is missed with probability <= 2^-64).
 * Every run of compared non-zero pages is digested in one call. Calls `onChanged` per changed
 * page in page order, with its offset in `newer` and its digest (undefined: it became zero).
 * Returns the pages compared.
 */
function compareByDigest(c: DigestComparison, onChanged: (page: number, at: number, digest: Buffer | undefined) => void): number {
  const {pages, pageSize, newer, digests} = c
  // 0 skipped, 1 compared and zero now, 2 compared and non-zero (to digest).
  const kind = c.kind.fill(0, 0, pages)
  let compared = 0
  for (let i = 0; i < pages; i++) {
    if ((c.present && !c.present[i]) || c.unchanged[i]) continue
    compared++
    const at = i * pageSize
    kind[i] = c.zeroPage.compare(newer, at, at + pageSize) === 0 ? 1 : 2
  }
  for (let i = 0; i < pages; ) {
    if (kind[i] !== 2) {
      i++
      continue
    }
    let j = i
    while (j < pages && kind[j] === 2) j++
    pageDigests(newer.subarray(i * pageSize, j * pageSize), j - i, c.key, digests.subarray(i * PAGE_DIGEST_BYTES))
    i = j
  }
  for (let i = 0; i < pages; i++) {
    if (kind[i] === 0) continue
    const page = c.first + i
    const wasZero = c.parentZero.isZero(page)
    if (kind[i] === 1) {
      if (!wasZero) onChanged(page, i * pageSize, undefined)
      continue
    }
    if (wasZero || c.parentRows.compare(digests, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES, page * PAGE_DIGEST_BYTES, (page + 1) * PAGE_DIGEST_BYTES) !== 0) {
      onChanged(page, i * pageSize, digests.subarray(i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES))
    }
  }
  return compared
}

function copyOf(bytes: Buffer): Buffer {
  const out = Buffer.allocUnsafe(bytes.length)
  bytes.copy(out)
  return out
}

function hex8(bytes: Buffer): string {
  return crc32(bytes).toString(16).padStart(8, '0')
}

/** Reads an image range from its segments, on this thread (a layer's writer compares as it reads). */
class SegmentReader {
  private readonly fds = new Map<string, number>()
  /** Reused: valid until the next read. */
  private present = new Uint8Array(0)

  /**
   * Fills `dst` (image bytes from `start`) from `segments`, zeros elsewhere; returns which pages
   * of it any segment touched (a diff's data pages).
   */
  read(segments: readonly ReadSegment[], start: number, dst: Buffer, pageSize: number, holesUnchanged: boolean): Uint8Array {
    // Only the gaps between segments are zeroed (a full image's chunk is one segment); with
    // `holesUnchanged` (a diff), only the parts of gaps inside pages a segment touches: the
    // other pages are not looked at.
    const zero = (from: number, to: number): void => {
      if (holesUnchanged) {
        const headEnd = Math.min(to, Math.ceil(from / pageSize) * pageSize)
        const tailStart = Math.max(headEnd, Math.floor(to / pageSize) * pageSize)
        if (from % pageSize !== 0 && from > 0) dst.fill(0, from, headEnd)
        if (to % pageSize !== 0 && to < dst.length) dst.fill(0, tailStart, to)
        return
      }
      dst.fill(0, from, to)
    }
    let cursor = 0
    for (const s of [...segments].sort((a, b) => a.imageOffset - b.imageOffset)) {
      const at = s.imageOffset - start
      if (at > cursor) zero(cursor, at)
      cursor = Math.max(cursor, at + s.length)
    }
    if (cursor < dst.length) zero(cursor, dst.length)
    this.present.fill(0)
    const present = this.present.length === dst.length / pageSize ? this.present : (this.present = new Uint8Array(dst.length / pageSize))
    for (const s of segments) {
      let fd = this.fds.get(s.path)
      if (fd === undefined) this.fds.set(s.path, (fd = onFile(s.path, 'opening', () => fs.openSync(s.path, 'r'))))
      const at = s.imageOffset - start
      for (let done = 0; done < s.length; ) {
        const n = onFile(s.path, 'reading', () => fs.readSync(fd, dst, at + done, s.length - done, s.position + done))
        if (n === 0) throw new UffdError('TRUNCATED', `${s.path}: ended at ${s.position + done}, expected ${s.length - done} more bytes`)
        done += n
      }
      present.fill(1, Math.floor(at / pageSize), Math.ceil((at + s.length) / pageSize))
    }
    return present
  }

  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd)
    this.fds.clear()
  }
}
