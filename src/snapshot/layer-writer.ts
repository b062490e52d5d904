import {setImmediate as yieldToEventLoop} from 'node:timers/promises'
import {crc32} from 'node:zlib'

import {UffdError} from '../core/errors.js'
import {BoundKind, placeSeed} from '../format/bind.js'
import {COMPAT_PAGE_DIGESTS, FOOTER_SIZE, INCOMPAT_BOUND, INCOMPAT_LAYERED, SOURCE_ZERO} from '../format/constants.js'
import {encodeHeader} from '../format/header.js'
import {baseRuns, composeRuns, encodeRunTable, type LayerParent, type LayerRun, MAX_LAYER_DEPTH} from '../format/layer.js'
import {encodePackedTable, type PackedBlock} from '../format/packed-set.js'
import {encodeDigestTable, expandDigestKey, PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {ManifestPart, SEAL_RECORD_SIZE, UNIT_DIGEST_BYTES, unitDigest, UnitKind} from '../format/seal.js'
import {ZeroMap} from '../format/zero-map.js'
import {crc32 as fastCrc32} from '../sys/crc.js'
import {appendTail} from './atomic-file.js'
import {type ReadSegment} from './chunk-job.js'
import {ChunkCompressor, type CompressionCodec} from './codecs.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {type OutputSink} from './output-sink.js'
import {resolvedDigests} from './page-digests.js'
import {FileSealer, type SealingOptions} from './sealing.js'
import {SegmentReader} from './segment-reader.js'
import {type ImageInput} from './writer.js'
import {type CompareJob, type CompareResult, CompareRunner} from './compare-job.js'
import {WorkerPool} from './compression-pool.js'

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
  /** Worker threads comparing by digest [default: 1]. */
  jobs?: number
}

/** Chunks per compare job: enough to amortise messaging with the workers. */
const COMPARE_JOB_CHUNKS = 32
/** An input with at most this much data is compared on the writer's thread, without workers. */
const IN_THREAD_BYTES = 64 * 1024 * 1024

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
    const bytes = sealer?.encrypted ? sealer.seal({kind: UnitKind.LayerBlock, number: blocks.length, codec: c.codec, payloadLength: payload.length, unit: blocks.length}, c.stored) : Buffer.from(c.stored)
    blocks.push({dataOffset: dataAt, storedLength: bytes.length, payloadLength: payload.length, storedCrc: crc32(bytes, placeSeed({kind: BoundKind.LayerBlock, number: blocks.length, pages: pendingPages, codec: c.codec, payloadLength: payload.length})), codec: c.codec, flags: 0, listStart: changed.length - pendingPages.length, pageCount: pendingPages.length})
    stored.push(bytes)
    dataAt += bytes.length
    storedBytes += bytes.length
    pendingPages = []
  }

  const digestKey = parentDigests && expandDigestKey(parentDigests.info.key)
  const ownDigests = parentDigests !== undefined && !sealer && options.pageDigests !== false
  // The layer's own rows, in page-list order: at most one per page.
  const ownRows = Buffer.alloc(ownDigests ? geometry.pageCount * PAGE_DIGEST_BYTES : 0)
  const noneUnchanged = new Uint8Array(geometry.pagesPerChunk)
  const zeroPage = Buffer.alloc(pageSize)
  const olderBuffer = Buffer.alloc(geometry.chunkSize)
  const newer = Buffer.alloc(geometry.chunkSize)
  let zeroed = 0
  let compared = 0
  // A parent in object storage streams in with the fetcher's concurrency, not one round trip
  // per chunk compared (a diff compares only the chunks it has data in).
  const segmentsOf = (c: number): ReadSegment[] => input.segments(geometry.chunkStart(c), Math.min(input.logicalSize, geometry.chunkStart(c) + geometry.pagesInChunk(c) * pageSize))
  if (parent.remote && !parentDigests) parent.fetchAhead(Array.from({length: geometry.chunkCount}, (_, c) => c).filter((c) => !options.diff || segmentsOf(c).length > 0))
  const unchangedOf = (start: number, end: number, pages: number): Uint8Array | undefined => {
    const ranges = input.unchanged?.(start, end) ?? []
    if (ranges.length === 0) return undefined
    const out = new Uint8Array(pages)
    for (const r of ranges) out.fill(1, Math.floor((r.start - start) / pageSize), Math.ceil((r.end - start) / pageSize))
    return out
  }
  let closingWorkers: Promise<void> | undefined
  if (digestKey) {
    // Read and compared by workers, a job of chunks at a time; results are taken in image order.
    // An input with little data (a diff, mostly) is compared on this thread: starting workers
    // would cost more than reading it.
    const dataBytes = input.segments(0, input.logicalSize).reduce((n, s) => n + s.length, 0)
    const jobs = dataBytes <= IN_THREAD_BYTES ? 0 : Math.max(1, options.jobs ?? 1)
    const pool = jobs > 0 ? new WorkerPool<CompareJob, CompareResult>(jobs, 'compare-worker', {key: digestKey}) : new CompareRunner(digestKey)
    const inflight: {result: Promise<CompareResult>; firstPage: number; end: number}[] = []
    const take = async (): Promise<void> => {
      const {result, firstPage, end} = inflight.shift()!
      const r = await result
      compared += r.compared
      const bytes = Buffer.from(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength)
      // Zeroed and changed pages interleave: overrides go in page order.
      for (let a = 0, b = 0; a < r.changed.length || b < r.zeroed.length; ) {
        if (b >= r.zeroed.length || (a < r.changed.length && r.changed[a] < r.zeroed[b])) {
          const page = firstPage + r.changed[a]
          overrides.push({firstPage: page, pageCount: 1, source: self})
          if (ownDigests) ownRows.set(r.digests.subarray(a * PAGE_DIGEST_BYTES, (a + 1) * PAGE_DIGEST_BYTES), changed.length * PAGE_DIGEST_BYTES)
          changed.push(page)
          addPage(page, bytes, a * pageSize)
          a++
        } else {
          overrides.push({firstPage: firstPage + r.zeroed[b], pageCount: 1, source: SOURCE_ZERO})
          zeroed++
          b++
        }
      }
      options.onProgress?.(end, input.logicalSize)
    }
    try {
      for (let c = 0, id = 0; c < geometry.chunkCount; c += COMPARE_JOB_CHUNKS, id++) {
        options.signal?.throwIfAborted()
        const count = Math.min(COMPARE_JOB_CHUNKS, geometry.chunkCount - c)
        const firstPage = geometry.firstPageOfChunk(c)
        let pages = 0
        for (let k = 0; k < count; k++) pages += geometry.pagesInChunk(c + k)
        const start = geometry.chunkStart(c)
        const end = Math.min(input.logicalSize, start + pages * pageSize)
        const segments = input.segments(start, end)
        // A diff's holes are unchanged pages: a job without data is its parent's.
        if (options.diff && segments.length === 0) continue
        const job: CompareJob = {
          id,
          firstPage,
          pages,
          pageSize,
          start,
          segments,
          diff: options.diff,
          unchanged: unchangedOf(start, end, pages),
          parentZero: parent.zeroMap.bytes.slice(firstPage >>> 3, (firstPage + pages + 7) >>> 3),
          // A copy: a view would post its whole buffer (every page's rows) with each job.
          parentRows: new Uint8Array(parentDigests!.rows.subarray(firstPage * PAGE_DIGEST_BYTES, (firstPage + pages) * PAGE_DIGEST_BYTES)),
        }
        const result = pool instanceof CompareRunner ? Promise.resolve(pool.run(job)) : pool.submit(job)
        // Marked handled now: awaited (and its error raised) in order, or abandoned after an earlier failure.
        result.catch(() => {})
        inflight.push({result, firstPage, end})
        while (inflight.length > jobs * 4) {
          await take()
          // In-thread jobs run here: let a signal in between them.
          if (jobs === 0) await yieldToEventLoop()
        }
      }
      while (inflight.length > 0) await take()
      flush()
    } catch (error) {
      if (pool instanceof CompareRunner) pool.close()
      else await pool.close()
      throw error
    }
    // The workers unmap the image and end while the tables are made and the file written (an
    // unmap of a GiB takes tens of ms); awaited before returning.
    if (pool instanceof CompareRunner) pool.close()
    else closingWorkers = pool.close()
  } else {
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
        const unchanged = unchangedOf(start, end, pages) ?? noneUnchanged
        // Pages are compared with the parent chunk's payload (its data pages, in order), decoded
        // only once a compared page is a data page of the parent: a zero page is compared with
        // zeros, so a diff whose pages were all zero in the parent decodes nothing.
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
  }

  // The layer's tables and file, from what the comparison found (its workers may still be ending).
  try {
    const runs = composeRuns(parentRuns, overrides)
    const zeroMap = new ZeroMap(geometry.pageCount)
    for (const r of runs) if (r.source === SOURCE_ZERO) zeroMap.fillZero(r.firstPage, r.pageCount)
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
        incompatFeatures: INCOMPAT_LAYERED | INCOMPAT_BOUND | (sealer?.incompatFeatures ?? 0n),
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
      // Counted in the writer's time: its workers have ended.
      await closingWorkers
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
  } finally {
    await closingWorkers
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

function hex8(bytes: Buffer): string {
  return crc32(bytes).toString(16).padStart(8, '0')
}
