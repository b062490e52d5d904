
import {UffdError} from '../core/errors.js'
import {BoundKind, unitCrc} from '../format/bind.js'
import {CHUNK_FLAG_SHARED, Codec, COMPAT_PAGE_DIGESTS, INCOMPAT_BOUND, INCOMPAT_FRAMED} from '../format/constants.js'
import {Geometry} from '../format/geometry.js'
import {encodeHeader, type Region, type SnapshotMetadata} from '../format/header.js'
import {type ChunkEntry} from '../format/index-table.js'
import {DIGEST_PAGE_SIZE, encodeDigestTable, expandDigestKey, newDigestInfo} from '../format/page-digest.js'
import {UNIT_DIGEST_BYTES, UnitKind} from '../format/seal.js'
import {crc32} from '../sys/crc.js'
import {ZeroMap} from '../format/zero-map.js'
import {AtomicFile, appendTail} from './atomic-file.js'
import {type ChunkJob, type ChunkJobResult, type EncodedChunk, type ReadSegment} from './chunk-job.js'
import {type CompressionCodec, DEFAULT_FRAME_SIZE, framePagesFor} from './codecs.js'
import {CompressionPool} from './compression-pool.js'
import {type OutputSink} from './output-sink.js'
import {FileSealer, type SealingOptions} from './sealing.js'

/** What a snapshot is made of: an image of `logicalSize` bytes whose data comes from segments. */
export interface ImageInput {
  readonly logicalSize: number
  readonly regions: Region[]
  readonly metadata: SnapshotMetadata
  /** The source byte ranges that make up image bytes [start, end); everything else reads as zero (or is unchanged, below). */
  segments(start: number, end: number): ReadSegment[]
  /**
   * Pages the source says are unchanged since an earlier image, without holding them (an
   * incremental CRIU dump's PE_PARENT pages): how many, and the image byte ranges of those in
   * [start, end), sorted. Only a layer over that earlier image's snapshot can be written from
   * such an input. Absent: none.
   */
  readonly unchangedPages?: number
  unchanged?(start: number, end: number): {start: number; end: number}[]
}

export interface WriteOptions {
  codec: CompressionCodec
  level: number
  chunkSize: number
  pageSize: number
  jobs: number
  onProgress?: (doneBytes: number, totalBytes: number) => void
  signal?: AbortSignal
  /** Permission bits of a local output, exactly [default: SNAPSHOT_MODE less the umask]. */
  mode?: number
  /** The path errors name, when a path output is an intermediate file [default: the path]. */
  name?: string
  /** Encrypt and/or sign the snapshot (docs/FORMAT.md, Sealed snapshots). */
  seal?: SealingOptions
  /**
   * Store a page digest table (docs/FORMAT.md, Page digests) [default: true]. Only for 4 KiB
   * pages, and never in a sealed file (digests in the clear would let anyone holding it test
   * guesses of a page's content).
   */
  pageDigests?: boolean
  /**
   * Bytes of image per zstd frame within a chunk (docs/FORMAT.md, Framed chunks), so an isolated
   * fault decodes one frame rather than its whole chunk; 0 for one frame a chunk [default:
   * DEFAULT_FRAME_SIZE]. No framing where a frame would not be smaller than a chunk.
   */
  frameSize?: number
}

export interface CodecUsage {
  chunks: number
  payloadBytes: number
  storedBytes: number
}

export interface WriteSummary {
  path: string
  logicalSize: number
  fileSize: number
  pageSize: number
  chunkSize: number
  chunkCount: number
  pageCount: number
  zeroPages: number
  dedupChunks: number
  dedupBytes: number
  codecs: Record<string, CodecUsage>
  /** Bytes of the page digest table (0: the file has none). */
  pageDigestBytes: number
  seconds: number
}

/** Bytes of a SHA-256 digest. */
const DIGEST_BYTES = 32

/** A job covers at least this much of the image, to amortise messaging with the workers. */
const JOB_BYTES = 4 * 1024 * 1024

/**
 * Writes a snapshot atomically: to a path (into a temporary file next to it, fsync'd, then renamed
 * over it) or to any OutputSink (an S3 multipart upload), so readers only ever see a complete
 * snapshot; on any failure or abort the sink is discarded and nothing else changes. The sink is
 * the writer's from then on: committed on success, discarded otherwise. Chunks are encoded by a
 * pool of workers and written in image order, so the output does not depend on the number of
 * workers.
 */
export async function writeSnapshot(input: ImageInput, output: string | OutputSink, options: WriteOptions): Promise<WriteSummary> {
  const started = performance.now()
  // Their bytes are not in the input: written in full, they would read as zeros.
  if (input.unchangedPages) throw new UffdError('CRIU_IMAGE', `${String(input.metadata.criuDir ?? 'the input')} is an incremental dump: ${input.unchangedPages} of its pages are in its parent dump; write it as a layer over the parent dump's snapshot (uffd snapshot --criu-dir DIR --parent SNAPSHOT)`)
  const geometry = new Geometry(options.pageSize, options.chunkSize, input.logicalSize)
  const sealer = FileSealer.create(options.seal ?? {}, [UnitKind.Chunk])
  const digestInfo = options.pageDigests !== false && options.pageSize === DIGEST_PAGE_SIZE && !sealer ? newDigestInfo() : undefined
  const digestKey = digestInfo && expandDigestKey(digestInfo.key)
  const framePages = framePagesFor(options.codec, options.frameSize ?? DEFAULT_FRAME_SIZE, options.pageSize, options.chunkSize)
  const header = encodeHeader({
    incompatFeatures: INCOMPAT_BOUND | (framePages > 0 ? INCOMPAT_FRAMED : 0n) | (sealer?.incompatFeatures ?? 0n),
    compatFeatures: (sealer?.compatFeatures ?? 0n) | (digestInfo ? COMPAT_PAGE_DIGESTS : 0n),
    pageSize: options.pageSize,
    chunkSize: options.chunkSize,
    logicalSize: input.logicalSize,
    regions: input.regions,
    metadata: {...input.metadata, codec: options.codec, level: options.level, ...(framePages > 0 ? {framePages} : {}), ...(digestInfo ? {pageDigests: digestInfo} : {}), ...(sealer ? {seal: sealer.metadata} : {})},
  })

  const file = typeof output === 'string' ? new AtomicFile(output, {mode: options.mode, name: options.name}) : output
  let pool: CompressionPool | undefined
  const inflight: Promise<ChunkJobResult>[] = []
  try {
    file.append(header)
    pool = new CompressionPool(Math.max(1, options.jobs), options.codec, options.level, sealer?.chunkSealing())
    const assembler = new Assembler(geometry, file, sealer)
    // Without read-back (an upload), deduplication compares SHA-256 digests the workers compute.
    const digests = !file.readBack
    const chunksPerJob = Math.max(1, Math.floor(JOB_BYTES / options.chunkSize))
    let doneBytes = 0
    for (let first = 0, id = 0; first < geometry.chunkCount; first += chunksPerJob, id++) {
      options.signal?.throwIfAborted()
      const count = Math.min(chunksPerJob, geometry.chunkCount - first)
      const start = geometry.chunkStart(first)
      const end = Math.min(input.logicalSize, geometry.chunkStart(first + count))
      const chunkLengths = Array.from({length: count}, (_, i) => geometry.chunkPaddedLength(first + i))
      const job: ChunkJob = {id, firstChunk: first, start, chunkLengths, pageSize: options.pageSize, segments: input.segments(start, end), digests, framePages, unitDigests: sealer?.signed, ...(digestKey ? {pageDigestKey: digestKey} : {})}
      const result = pool.submit(job)
      // Marked handled now: a job can fail while an earlier one is awaited; it is awaited (and its
      // error raised) in order, or abandoned after an earlier failure.
      result.catch(() => {})
      inflight.push(result)
      // Keep every worker busy with jobs queued behind it (a job with much data takes longer than
      // its neighbours, and results are consumed in order).
      while (inflight.length > options.jobs * 4) {
        doneBytes += assembler.consume(await inflight.shift()!)
        options.onProgress?.(doneBytes, input.logicalSize)
        await file.drain(options.signal)
      }
    }
    while (inflight.length > 0) {
      options.signal?.throwIfAborted()
      doneBytes += assembler.consume(await inflight.shift()!)
      options.onProgress?.(Math.min(doneBytes, input.logicalSize), input.logicalSize)
      await file.drain(options.signal)
    }
    // It ends where the index starts: its place and length follow from the footer and the zero
    // map, since the header, written first, cannot say where it lies (docs/FORMAT.md, Page digests).
    const digestTable = digestInfo ? encodeDigestTable(Buffer.concat(assembler.pageDigests), crc32) : undefined
    if (digestTable) file.append(digestTable)
    appendTail(file, assembler.entries, assembler.zeroMap, header, sealer ? {sealer, parts: [], unitDigests: assembler.unitDigests, blocks: 0} : undefined)
    options.signal?.throwIfAborted()
    await file.commit()
    return {
      path: file.destination,
      logicalSize: input.logicalSize,
      fileSize: file.size,
      pageSize: options.pageSize,
      chunkSize: options.chunkSize,
      chunkCount: geometry.chunkCount,
      pageCount: geometry.pageCount,
      zeroPages: assembler.zeroPages,
      dedupChunks: assembler.dedupChunks,
      dedupBytes: assembler.dedupBytes,
      codecs: assembler.codecs,
      pageDigestBytes: digestTable?.length ?? 0,
      seconds: (performance.now() - started) / 1000,
    }
  } finally {
    await pool?.close()
    await file.discard()
  }
}

/** Collects worker results in image order into the index and zero map; writes stored bytes once. */
class Assembler {
  readonly entries: ChunkEntry[] = []
  readonly zeroMap: ZeroMap
  readonly codecs: Record<string, CodecUsage> = {}
  zeroPages = 0
  /** The workers' page digests, job by job: the non-zero pages' in page order. */
  readonly pageDigests: Uint8Array[] = []
  dedupChunks = 0
  dedupBytes = 0
  /** Each chunk's CRC of its stored bytes alone (entries hold it bound to their place). */
  private readonly plainCrcs: number[] = []
  /** Stored chunks by (crc, lengths, codec), to find identical payloads stored before. */
  private readonly seen = new Map<string, number[]>()
  /** Each chunk's SHA-256 (32 bytes at entry index * 32), when the sink cannot read bytes back. */
  private readonly digests: Buffer | undefined
  /** A signed file's unit digest table: each chunk's (a deduplicated one's is its original's). */
  readonly unitDigests: Buffer | undefined
  /** Stored bytes are encrypted for their chunk's place (identical chunks seal differently; not so when convergent). */
  private readonly sealed: boolean

  /** `sealer`: how the workers sealed the chunks (encrypted for their places; signed: unit digests to collect). */
  constructor(
    private readonly geometry: Geometry,
    private readonly file: OutputSink,
    private readonly sealer: FileSealer | undefined,
  ) {
    this.zeroMap = new ZeroMap(geometry.pageCount)
    this.sealed = (sealer?.encrypted ?? false) && !sealer!.convergent
    this.digests = file.readBack ? undefined : Buffer.alloc(geometry.chunkCount * DIGEST_BYTES)
    this.unitDigests = sealer?.signed ? Buffer.alloc(geometry.chunkCount * UNIT_DIGEST_BYTES) : undefined
  }

  /** Returns the image bytes the result covered. */
  consume(result: ChunkJobResult): number {
    let covered = 0
    const stored = Buffer.from(result.stored.buffer, result.stored.byteOffset, result.stored.length)
    if (result.pageDigests) this.pageDigests.push(result.pageDigests)
    for (const chunk of result.chunks) {
      const index = this.entries.length
      const pages = this.geometry.pagesInChunk(index)
      this.zeroMap.setRange(this.geometry.firstPageOfChunk(index), pages, chunk.zeroBits)
      this.zeroPages += chunk.zeroPages
      covered += this.geometry.chunkLogicalLength(index)
      const name = Codec[chunk.codec].toLowerCase()
      const usage = (this.codecs[name] ??= {chunks: 0, payloadBytes: 0, storedBytes: 0})
      usage.chunks++
      usage.payloadBytes += chunk.payloadLength
      if (chunk.codec === Codec.None) {
        this.entries.push({dataOffset: 0, storedLength: 0, payloadLength: 0, storedCrc: 0, codec: Codec.None, flags: 0})
        this.plainCrcs.push(0)
        continue
      }
      const bytes = stored.subarray(chunk.storedOffset, chunk.storedOffset + chunk.storedLength)
      // Every entry's CRC is bound to its own place, a deduplicated one's too (docs/FORMAT.md, Bound units).
      const place = (plainCrc: number): number => unitCrc(plainCrc, bytes.length, {kind: BoundKind.Chunk, number: index, codec: chunk.codec, payloadLength: chunk.payloadLength})
      const entry: ChunkEntry = {dataOffset: 0, storedLength: bytes.length, payloadLength: chunk.payloadLength, storedCrc: place(chunk.storedCrc), codec: chunk.codec, flags: 0, ...(this.sealer?.encrypted ? {sealedAs: index} : {})}
      if (this.sealer?.convergent) {
        if (!chunk.contentKey) throw new UffdError('INTERNAL', `${this.file.destination}: a convergently sealed chunk without its content key`)
        this.sealer.recordKey(index, chunk.contentKey)
      }
      const original = this.findIdentical(entry, bytes, chunk)
      if (original !== undefined) {
        // The original's stored bytes, sealed for its place (and so its digest too); their CRC bound to this place.
        const first = this.entries[original]
        Object.assign(entry, {dataOffset: first.dataOffset, storedCrc: place(this.plainCrcs[original]), flags: CHUNK_FLAG_SHARED, ...(this.sealed ? {sealedAs: first.sealedAs} : {})})
        first.flags = CHUNK_FLAG_SHARED
        this.unitDigests?.copyWithin(index * UNIT_DIGEST_BYTES, original * UNIT_DIGEST_BYTES, (original + 1) * UNIT_DIGEST_BYTES)
        this.dedupChunks++
        this.dedupBytes += bytes.length
      } else {
        entry.dataOffset = this.file.append(bytes)
        usage.storedBytes += bytes.length
        if (this.unitDigests) {
          if (chunk.unitDigest?.length !== UNIT_DIGEST_BYTES) throw new UffdError('INTERNAL', `${this.file.destination}: a stored chunk without its unit digest, for a signed file`)
          this.unitDigests.set(chunk.unitDigest, index * UNIT_DIGEST_BYTES)
        }
      }
      this.entries.push(entry)
      this.plainCrcs.push(original === undefined ? chunk.storedCrc : this.plainCrcs[original])
    }
    return covered
  }

  /**
   * An earlier chunk whose stored bytes are identical. The checksum only nominates candidates
   * (CRC-32 is linear: a guest can make two different chunks collide at will); identity is
   * decided on the stored bytes, since decoding is a function of them. A local file reads the
   * earlier chunk's bytes back and compares them. An upload cannot (its parts are gone once
   * sent, and holding every stored chunk until the end would hold the whole snapshot), so the
   * workers compute a SHA-256 of each stored chunk's bytes as they encode it, and equal digests
   * stand for equal bytes: SHA-256 is collision-resistant (no two different inputs with one
   * digest are known, and finding one is out of reach, for a guest choosing its memory too), so
   * sharing on equal digests stores nothing other than what comparing the bytes would have.
   */
  private findIdentical(entry: ChunkEntry, bytes: Buffer, chunk: EncodedChunk): number | undefined {
    // Sealed bytes differ for identical chunks (each is sealed for its own place): what was
    // sealed nominates candidates, and is what is compared (the workers' digests are of it too).
    const key = `${this.sealed ? chunk.plainCrc : chunk.storedCrc}:${entry.payloadLength}:${entry.codec}:${entry.storedLength}`
    const candidates = this.seen.get(key)
    const {digests} = this
    const digest = chunk.digest
    if (digests && digest?.length !== DIGEST_BYTES) throw new UffdError('INTERNAL', `${this.file.destination}: a stored chunk without its digest, for a sink that cannot read back`)
    const opened = (e: ChunkEntry, sealed: Buffer): Buffer => this.sealer!.open({kind: UnitKind.Chunk, number: e.sealedAs!, codec: e.codec, payloadLength: e.payloadLength}, sealed)
    const same = (earlier: number): boolean => {
      if (digests) return digests.compare(digest!, 0, DIGEST_BYTES, earlier * DIGEST_BYTES, (earlier + 1) * DIGEST_BYTES) === 0
      const e = this.entries[earlier]
      const back = this.file.readBack!(e.dataOffset, e.storedLength)
      return this.sealed ? opened(e, back).equals(opened(entry, bytes)) : back.equals(bytes)
    }
    if (candidates) {
      for (const index of candidates) if (same(index)) return index
    }
    const list = candidates ?? []
    list.push(this.entries.length)
    if (!candidates) this.seen.set(key, list)
    digests?.set(digest!, this.entries.length * DIGEST_BYTES)
    return undefined
  }
}

