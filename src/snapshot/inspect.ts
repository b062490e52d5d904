import {UffdError} from '../core/errors.js'
import {CHUNK_FLAG_SHARED, Codec, CODEC_NAMES, RegionKind} from '../format/constants.js'
import {learnedSet, type LearnedRun} from '../format/learned-runs.js'
import {readLearnedRuns} from './learn.js'
import {pagesBySource} from '../format/layer.js'
import {type SnapshotReader} from './reader.js'
import {FileByteSource} from './byte-source.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {walkPackedPages} from './packed-pages.js'
import {workingSetIdentity} from './attached-set.js'
import {type OpenedSeal} from './opened-seal.js'
import {attachedWorkingSet} from './relayout.js'
import {DigestChecker, digestRowCount, readFileDigests} from './page-digests.js'

export interface SnapshotStats {
  file: string
  format: string
  pageSize: number
  chunkSize: number
  /** Bytes of image per zstd frame of a framed file (docs/FORMAT.md, Framed chunks); 0: one frame a chunk. */
  frameSize: number
  logicalSize: number
  fileSize: number
  /** logicalSize / fileSize */
  ratio: number
  pageCount: number
  zeroPages: number
  zeroBytes: number
  chunkCount: number
  allZeroChunks: number
  /** Chunks whose stored bytes are shared with an earlier chunk, and the bytes that saved. */
  dedupChunks: number
  dedupSavedBytes: number
  codecs: Record<string, {chunks: number; payloadBytes: number; storedBytes: number}>
  /** Count of stored chunks by stored size, buckets labelled by their upper bound in bytes. */
  storedSizeHistogram: {upTo: number; chunks: number}[]
  regions: {kind: string; imageOffset: number; size: number; address: number; prot: number; flags: number; owner: number; name: string; fileOffset: number}[]
  /** An attached working set: its pages, chunks stored first, and the packed copy if any. */
  workingSet?: {pages: number; runs: number; chunksFirst: number; learned?: {runs: number; keep: number; storedBytes: number}; packed?: {blocks: number; pages: number; payloadBytes: number; storedBytes: number; codecs: Record<string, number>}}
  /** A layer: its depth (ancestors), and its pages stored in blocks (counted in codecs too). */
  layer?: {depth: number; blocks: number; pages: number}
  /** Its page digest table (docs/FORMAT.md, Page digests): a row per page it stores, and the table's bytes; `problem` when it cannot be located. */
  pageDigests?: {rows: number; bytes: number} | {problem: string}
  /** A sealed or signed file: how, and what this run could check of it. */
  seal?: SealStats
  /** A layer's chain, base first: each file, its size, what it stores and the share of the image it provides. */
  chain?: ChainFile[]
  metadata: Record<string, unknown>
}

export interface ChainFile {
  file: string
  /** 'base', or 'layer K' (K ancestors below it). */
  role: string
  fileSize: number
  /** Stored units: a base's chunks with data, a layer's blocks. */
  unitsStored: number
  storedBytes: number
  /** Image pages this file provides (the top layer's table names it for them). */
  pagesProvided: number
  /** pagesProvided / the image's pages. */
  share: number
  /** Bytes of its page digest table (0: it has none). */
  pageDigestBytes: number
}

/** Deeper than this, metadata is shown as a marker: uffd itself never writes more than 3 levels. */
export const METADATA_SHOWN_DEPTH = 32

/**
 * The metadata as far as it can be shown: JSON.parse reads nesting of any depth, but printing it
 * (oclif's JSON colouring, JSON.stringify) recurses once per level and overflows the stack on a
 * few thousand, so deeper values are replaced by a marker string.
 */
export function boundedMetadata(metadata: Record<string, unknown>): Record<string, unknown> {
  const copy = (value: unknown, depth: number): unknown => {
    if (typeof value !== 'object' || value === null) return value
    if (depth >= METADATA_SHOWN_DEPTH) return `(nested deeper than ${METADATA_SHOWN_DEPTH} levels: not shown)`
    if (Array.isArray(value)) {
      const out: unknown[] = new Array(value.length)
      for (let i = 0; i < value.length; i++) out[i] = copy(value[i], depth + 1)
      return out
    }
    const out: Record<string, unknown> = {}
    for (const key of Object.keys(value)) out[key] = copy((value as Record<string, unknown>)[key], depth + 1)
    return out
  }
  return copy(metadata, 0) as Record<string, unknown>
}

function workingSetStats(reader: SnapshotReader): SnapshotStats['workingSet'] {
  const ws = attachedWorkingSet(reader)
  if (!ws) return undefined
  // The metadata is untrusted JSON: a count of another type is shown as unknown (0), not echoed.
  const count = (v: unknown): number => (Number.isSafeInteger(v) && (v as number) >= 0 ? (v as number) : 0)
  const result: SnapshotStats['workingSet'] = {pages: count(ws.pages), runs: count(ws.runs), chunksFirst: ws.chunks.length}
  if (ws.learned && typeof ws.learned === 'object') result.learned = {runs: count(ws.learned.runs), keep: count(ws.learned.keep), storedBytes: count(ws.learned.length)}
  if (reader.packed) {
    const codecs: Record<string, number> = {}
    for (const b of reader.packed.blocks) codecs[CODEC_NAMES[b.codec]] = (codecs[CODEC_NAMES[b.codec]] ?? 0) + 1
    result.packed = {
      blocks: reader.packed.blocks.length,
      pages: reader.packed.pages.length,
      payloadBytes: reader.packed.blocks.reduce((n, b) => n + b.payloadLength, 0),
      storedBytes: reader.packed.blocks.reduce((n, b) => n + b.storedLength, 0),
      codecs,
    }
  }
  return result
}

/** The chain of a layer, base first, with what each file stores and provides. */
export function chainStats(reader: LayeredReader): ChainFile[] {
  const {pageCount} = reader.geometry
  const provided = pagesBySource(reader.runs, reader.files.length)
  return reader.files.map((f, k) => {
    // Deduplicated chunks share stored bytes: each is counted once, by where it is stored.
    const stored = new Map<number, number>()
    for (const e of f.layer ? f.layer.set.blocks : f.index) if (e.codec !== Codec.None) stored.set(e.dataOffset, e.storedLength)
    const units = [...stored.values()]
    return {
      file: reader.paths[k],
      role: k === 0 ? 'base' : `layer ${k}`,
      fileSize: f.fileSize,
      unitsStored: units.length,
      storedBytes: units.reduce((n, length) => n + length, 0),
      pagesProvided: provided.pages[k],
      share: pageCount === 0 ? 0 : provided.pages[k] / pageCount,
      pageDigestBytes: digestTableBytes(f),
    }
  })
}

function digestTableBytes(reader: SnapshotReader): number {
  const extent = reader.pageDigestExtent()
  return extent && 'length' in extent ? extent.length : 0
}

function pageDigestStats(reader: SnapshotReader): SnapshotStats['pageDigests'] {
  const extent = reader.pageDigestExtent()
  if (!extent) return undefined
  return 'problem' in extent ? extent : {rows: digestRowCount(reader), bytes: extent.length}
}

/** Stats of one file, or of a chain's top layer with the chain. */
export function imageStats(reader: ImageReader, file: string): SnapshotStats {
  if (!(reader instanceof LayeredReader)) return snapshotStats(reader, file)
  return {...snapshotStats(reader.files.at(-1)!, file), chain: chainStats(reader)}
}

export function snapshotStats(reader: SnapshotReader, file: string): SnapshotStats {
  const {header, geometry} = reader
  // A layer stores its pages in blocks: those are its stored units.
  const index = reader.layer ? reader.layer.set.blocks : reader.index
  const codecs: SnapshotStats['codecs'] = {}
  const seenOffsets = new Set<number>()
  let dedupChunks = 0
  let dedupSavedBytes = 0
  let allZeroChunks = 0
  const bounds: number[] = []
  for (let b = 1024; b <= Math.max(1024, geometry.chunkSize * 2); b *= 4) bounds.push(b)
  const histogram = bounds.map((upTo) => ({upTo, chunks: 0}))
  for (const entry of index) {
    const name = CODEC_NAMES[entry.codec]
    const usage = (codecs[name] ??= {chunks: 0, payloadBytes: 0, storedBytes: 0})
    usage.chunks++
    usage.payloadBytes += entry.payloadLength
    if (entry.codec === Codec.None) {
      allZeroChunks++
      continue
    }
    if (entry.flags & CHUNK_FLAG_SHARED && seenOffsets.has(entry.dataOffset)) {
      dedupChunks++
      dedupSavedBytes += entry.storedLength
      continue
    }
    seenOffsets.add(entry.dataOffset)
    usage.storedBytes += entry.storedLength
    const bucket = histogram.find((h) => entry.storedLength <= h.upTo) ?? histogram[histogram.length - 1]
    bucket.chunks++
  }
  const zeroPages = reader.zeroMap.countZero(0, geometry.pageCount)
  return {
    file,
    format: `${header.major}.${header.minor}`,
    pageSize: header.pageSize,
    chunkSize: header.chunkSize,
    frameSize: reader.framePages * header.pageSize,
    logicalSize: header.logicalSize,
    fileSize: reader.fileSize,
    ratio: reader.fileSize === 0 ? 0 : header.logicalSize / reader.fileSize,
    pageCount: geometry.pageCount,
    zeroPages,
    zeroBytes: zeroPages * geometry.pageSize,
    chunkCount: reader.index.length,
    allZeroChunks,
    dedupChunks,
    dedupSavedBytes,
    codecs,
    storedSizeHistogram: histogram.filter((h) => h.chunks > 0),
    regions: header.regions.map((r) => ({...r, kind: r.kind === RegionKind.ProcessVma ? 'vma' : 'guest-memory'})),
    workingSet: workingSetStats(reader),
    ...(reader.layer ? {layer: {depth: reader.layer.parents.length, blocks: reader.layer.set.blocks.length, pages: reader.layer.set.pages.length}} : {}),
    ...(reader.pageDigestExtent() ? {pageDigests: pageDigestStats(reader)} : {}),
    ...(reader.seal ? {seal: sealStats(reader.seal)} : {}),
    metadata: boundedMetadata(header.metadata),
  }
}

export interface SealStats {
  /** Encrypted: the cipher and the id of the key (never the key); `opened` whether this run had it. */
  encryption?: {cipher: string; keyId: string; opened: boolean; convergent: boolean}
  /** Signed: the signer's key id, and whether the signature was checked against a trusted key (--verify-key). */
  signature?: {signer: string; verified: boolean}
  /** Whether the header, index and tables shown were authenticated (by the key or a verified signature). */
  authenticated: boolean
}

function sealStats(seal: OpenedSeal): SealStats {
  const {encryption, signature} = seal.info
  return {
    ...(encryption ? {encryption: {cipher: encryption.cipher, keyId: encryption.keyId, opened: !seal.locked, convergent: encryption.convergent}} : {}),
    ...(signature ? {signature: {signer: signature.signer, verified: seal.verifiedSigner !== undefined}} : {}),
    authenticated: seal.authenticated,
  }
}

export interface VerifyResult {
  file: string
  ok: boolean
  chunksChecked: number
  bytesChecked: number
  /** Packed working-set blocks decoded and compared with their chunks. */
  blocksChecked: number
  /** A chain: every stored unit of every file decoded (also those no page of the image uses now). */
  unitsChecked?: number
  /** Pages whose row in their file's page digest table was checked against the page (0: no file has a table). */
  pageDigestsChecked: number
  errors: string[]
  against?: {file: string; mismatchedPages: number; firstMismatchOffset: number | null}
}

/**
 * Decodes every chunk and checks its checksum (the reader refuses unverified bytes); with a raw
 * image, compares the decoded image byte for byte. Collects up to `maxErrors` problems rather than
 * stopping at the first, so a damaged file's extent is visible.
 */
export function verifySnapshot(reader: ImageReader, file: string, againstPath?: string, onProgress?: (done: number, total: number) => void, maxErrors = 20): VerifyResult {
  const {geometry} = reader
  const errors: string[] = []
  const chunk = Buffer.alloc(geometry.chunkSize)
  let raw: FileByteSource | undefined
  let rawChunk: Buffer | undefined
  const against = againstPath ? {file: againstPath, mismatchedPages: 0, firstMismatchOffset: null as number | null} : undefined
  if (againstPath) {
    raw = new FileByteSource(againstPath)
    rawChunk = Buffer.alloc(geometry.chunkSize)
    if (raw.size !== geometry.logicalSize) errors.push(`${againstPath} is ${raw.size} bytes, the snapshot image is ${geometry.logicalSize}`)
  }
  let chunksChecked = 0
  let bytesChecked = 0
  const files = reader instanceof LayeredReader ? reader.files : [reader]
  const checkers = files.map((f) => {
    try {
      const table = readFileDigests(f)
      return table && new DigestChecker(f, table)
    } catch (error) {
      if (!(error instanceof UffdError)) throw error
      errors.push(error.message)
      return undefined
    }
  })
  // One file: its rows are checked in the image pass, against the payload that pass decodes.
  const single = reader instanceof LayeredReader ? undefined : checkers[0]
  try {
    for (let c = 0; c < geometry.chunkCount && errors.length < maxErrors; c++) {
      try {
        reader.readChunk(c, chunk)
        // The rows of the chunk's data pages, against the pages just decoded.
        if (single?.covers(c)) errors.push(...single.checkChunk(c, chunk).slice(0, maxErrors - errors.length))
      } catch (error) {
        // A refusal is a problem of the file, to list; anything else is a bug of ours, and
        // listing it would report a good file as damaged.
        if (!(error instanceof UffdError)) throw error
        errors.push(error.message)
        continue
      }
      chunksChecked++
      const logical = geometry.chunkLogicalLength(c)
      bytesChecked += logical
      if (raw && rawChunk && against && geometry.chunkStart(c) + logical <= raw.size) {
        raw.readAt(rawChunk.subarray(0, logical), geometry.chunkStart(c))
        if (!rawChunk.subarray(0, logical).equals(chunk.subarray(0, logical))) {
          for (let at = 0; at < logical; at += geometry.pageSize) {
            const end = Math.min(logical, at + geometry.pageSize)
            if (!rawChunk.subarray(at, end).equals(chunk.subarray(at, end))) {
              against.mismatchedPages++
              if (against.firstMismatchOffset === null) {
                let i = at
                while (rawChunk[i] === chunk[i]) i++
                against.firstMismatchOffset = geometry.chunkStart(c) + i
              }
            }
          }
        }
      }
      onProgress?.(bytesChecked, geometry.logicalSize)
    }
  } finally {
    raw?.close()
  }
  if (against && against.mismatchedPages > 0) {
    errors.push(`${against.mismatchedPages} pages differ from ${against.file}; first difference at byte ${against.firstMismatchOffset}`)
  }
  if (reader instanceof LayeredReader) {
    const unitsChecked = verifyChainUnits(reader, checkers, errors, maxErrors)
    // A layer's packed working set holds pages of the resolved image, whichever file has them.
    const blocksChecked = errors.length < maxErrors ? verifyPacked(reader, errors, maxErrors) : 0
    return {file, ok: errors.length === 0, chunksChecked, bytesChecked, blocksChecked, unitsChecked, pageDigestsChecked: checkers.reduce((n, k) => n + (k?.checked ?? 0), 0), errors, against}
  }
  const blocksChecked = errors.length < maxErrors ? verifyPacked(reader, errors, maxErrors) : 0
  if (errors.length < maxErrors) verifyLearned(reader, errors)
  return {file, ok: errors.length === 0, chunksChecked, bytesChecked, blocksChecked, pageDigestsChecked: single?.checked ?? 0, errors, against}
}

/** Checks the learned runs decode, and that the packed set is their majority (what --learn attached). */
function verifyLearned(reader: SnapshotReader, errors: string[]): void {
  let runs: LearnedRun[]
  try {
    runs = readLearnedRuns(reader).runs
  } catch (error) {
    if (!(error instanceof UffdError)) throw error
    errors.push(error.message)
    return
  }
  if (runs.length === 0 || !reader.packed) return
  const expected = learnedSet(runs, workingSetIdentity(reader)).pages
  const packed = new Set(reader.packed.pages)
  if (expected.length !== packed.size || expected.some((p) => !packed.has(p))) {
    errors.push(`${reader.source.name}: the attached working set (${packed.size} pages) is not the majority of its ${runs.length} learned runs (${expected.length} pages)`)
  }
}

/**
 * Decodes every stored unit of every file of a chain: the image pass reads only the units the
 * top's table uses, and a unit a later layer covered is still part of its file (a shorter chain
 * built on that file would serve it).
 */
function verifyChainUnits(reader: LayeredReader, checkers: readonly (DigestChecker | undefined)[], errors: string[], maxErrors: number): number {
  let checked = 0
  const scratch = Buffer.alloc(Math.max(...reader.files.map((f) => f.geometry.chunkSize)))
  for (const [i, f] of reader.files.entries()) {
    for (let unit = 0; unit < f.unitCount && errors.length < maxErrors; unit++) {
      try {
        const payload = f.readPayload(unit, scratch)
        checked++
        if (checkers[i]?.covers(unit)) errors.push(...checkers[i]!.checkPayload(unit, payload).slice(0, maxErrors - errors.length))
      } catch (error) {
        if (!(error instanceof UffdError)) throw error
        errors.push(error.message)
      }
    }
  }
  return checked
}

/**
 * Decodes every packed working-set block (checksums verified as for any read) and checks that
 * each of its pages equals the same page in its chunk: a handler serves either copy. Returns the
 * blocks that decoded.
 */
function verifyPacked(reader: ImageReader, errors: string[], maxErrors: number): number {
  const packed = reader.packed
  if (!packed) return 0
  let checked = 0
  walkPackedPages(
    reader,
    packed.blocks.map((b) => packed.pages.subarray(b.listStart, b.listStart + b.pageCount)),
    {
      start: (from, to) =>
        packed.blocks.slice(from, to).map((block, i) => {
          if (errors.length >= maxErrors) return undefined
          try {
            const payload = reader.readPayload(reader.index.length + from + i, Buffer.alloc(block.payloadLength))
            checked++
            return payload
          } catch (error) {
            if (!(error instanceof UffdError)) throw error
            errors.push(error.message)
            return undefined
          }
        }),
      page: (block, payload, at, page, chunk, chunkPage) => {
        if (errors.length < maxErrors && !payload.subarray(at, at + chunkPage.length).equals(chunkPage)) {
          errors.push(`${reader.source.name}: packed working set block ${block}: page ${page} differs from chunk ${chunk}`)
        }
      },
      // A chunk that does not read is reported by the chunk pass (a bug's error is thrown).
      chunkFailed: (_chunk, error) => error instanceof UffdError,
    },
  )
  return checked
}
