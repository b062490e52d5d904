import {createHash} from 'node:crypto'

import {BoundKind, type BoundPlace, learnedPlace, placeSeed} from '../format/bind.js'
import {Codec, COMPAT_PACKED_WORKING_SET, COMPAT_PAGE_DIGESTS, COMPAT_SIGNED, FIXED_HEADER_SIZE, FOOTER_SIZE, HEADER_TRAILER_SIZE, INCOMPAT_BOUND, INCOMPAT_ENCRYPTED, INCOMPAT_FRAMED, INCOMPAT_LAYERED, INDEX_ENTRY_SIZE} from '../format/constants.js'
import {chunkFrames, framePagesProblem, framesOfPages, groupPayloadBytes} from '../format/frames.js'
import {SnapshotFormatError} from '../format/errors.js'
import {Geometry} from '../format/geometry.js'
import {decodeHeader, hex, peekHeaderSize, type SnapshotHeader} from '../format/header.js'
import {type ChunkEntry, type ChunkIndex, decodeFooter, decodeIndex, decodeZeroMap, type Footer} from '../format/index-table.js'
import {checkLayerLocation, decodeRunTable, type LayerParent, type LayerRun, layerIdentity, layerPagesProblem} from '../format/layer.js'
import {memoryDigest} from '../format/learned-runs.js'
import {checkPackedLocation, decodePackedTable, type PackedSet} from '../format/packed-set.js'
import {digestTableLocation} from '../format/page-digest.js'
import {checkSealMetadata, ManifestPart, SEAL_RECORD_SIZE, TAG_BYTES, UnitKind, type UnitPlace} from '../format/seal.js'
import {ZeroMap} from '../format/zero-map.js'
import {crc32} from '../sys/crc.js'
import {type ByteSource, FileByteSource, PRIORITY_PREFETCH, type Priority} from './byte-source.js'
import {ChunkDecompressor} from './decompressor.js'
import {learnedLocation, type OpenedSeal, openSeal} from './opened-seal.js'
import {NO_READ_KEYS, type ReadKeys} from './sealing.js'

/** What a layer file holds besides an ordinary snapshot's structures (docs/FORMAT.md, Layers). */
export interface LayerData {
  /** Its ancestors, base first. */
  parents: LayerParent[]
  /** The flattened run table: which file of the chain holds each page. */
  runs: LayerRun[]
  /** Its own pages (ascending through the list) in blocks: units 0.. of the file. */
  set: PackedSet
}

/**
 * A file's index and zero map bytes, in memory every thread of the process can map: one thread
 * reads them, the threads it starts open the same file with them (SnapshotSpec) instead of each
 * keeping a copy (2.5 MiB for a 16 GiB image). They are checked again by each opening, against
 * the footer it reads from the file itself, so they stand in only for bytes equal to the file's.
 */
export interface SharedTables {
  index: SharedArrayBuffer
  zeroMap: SharedArrayBuffer
  /** A layer's run and block tables. */
  layerRuns?: SharedArrayBuffer
  layerBlocks?: SharedArrayBuffer
  /**
   * The layout digest of the opening that made these (SnapshotReader.layout: SHA-256 of the
   * header, footer, index, zero map and a layer's tables, each as that opening read and checked
   * them). An opening given these must find this layout (else CORRUPT: the file was rewritten in
   * place), and then does not check a layer's runs against its pages again: those checks are a
   * function of exactly these bytes. Every thread serving a chain would otherwise repeat them, on
   * code not yet optimised, while the first faults wait.
   */
  layout: string
}

/**
 * Whether this opening, given another's tables of the same file (SharedTables), found the layout
 * that one checked; without tables, false. A different layout is refused: the file was rewritten
 * in place since that opening checked it, and what it held then (its identity, checked against
 * what a layer on it records) is not what it holds now.
 */
function sameLayout(tables: SharedTables | undefined, layout: string): boolean {
  if (!tables) return false
  if (tables.layout !== layout) throw new SnapshotFormatError('CORRUPT', 'layout', 'the file changed since it was opened: its header, index or tables are not those the handler checked')
  return true
}

/** `length` bytes at `offset` of the file, in shared memory: `shared` when it holds exactly that many (see SharedTables), else read. */
function sharedBytes(source: ByteSource, length: number, offset: number, shared: SharedArrayBuffer | undefined): Buffer {
  if (shared?.byteLength === length) return Buffer.from(shared)
  const bytes = Buffer.from(new SharedArrayBuffer(length))
  source.readAt(bytes, offset)
  return bytes
}

/**
 * Opens a snapshot and validates its header, footer, index and zero map up front (every offset
 * and length checked against the file size before anything is allocated), so that reading a
 * chunk afterwards is one index lookup, one positioned read, one decode and one checksum.
 */
export class SnapshotReader {
  readonly geometry: Geometry
  /**
   * Made on the first decode (or by prepareDecoding): a reader that only inspects a snapshot, like
   * \`uffd resume\`'s main thread before it listens, never loads the codecs' native modules.
   */
  private decompressor: ChunkDecompressor | undefined
  private identityDigest: string | undefined
  private storedScratch = Buffer.alloc(0)
  private payloadScratch = Buffer.alloc(0)
  /** Decrypted stored bytes of a sealed unit, before decoding. */
  private plainScratch = Buffer.alloc(0)
  /** Units whose remote bytes failed a check and were dropped to be fetched again (once), until one passes. */
  private readonly refetched = new Set<number>()
  /** Stored units read and verified by readPayload so far (what a resume's stats count as decoded). */
  unitsDecoded = 0
  /** One file shares no decoded units with other snapshots (LayeredReader.unitsShared does). */
  readonly unitsShared = 0

  private constructor(
    readonly source: ByteSource,
    readonly header: SnapshotHeader,
    readonly footer: Footer,
    readonly index: ChunkIndex,
    readonly zeroMap: ZeroMap,
    /** The packed working set, if the file has one: its blocks are units chunkCount.. onwards. */
    readonly packed: PackedSet | undefined,
    /** For a layer: its chain, run table and blocks (its units; it has no chunks). */
    readonly layer: LayerData | undefined,
    /**
     * SHA-256 of the bytes that say what every unit is (header, footer, index, zero map, a layer's
     * tables): two files with the same layout hold the same units under the same numbers, so a
     * decoded unit of one is the other's (the unit cache keys by it). Unlike the identity it
     * changes with the layout: a file relaid out (a working set attached) numbers its units anew.
     */
    readonly layout: string,
    /** How the file is sealed, and what this reader can check and decrypt of it. */
    readonly seal: OpenedSeal | undefined,
    /** The index and zero map bytes (and a layer's tables), for the threads this one starts (SharedTables). */
    readonly tables: SharedTables,
    /** Its layout is that of the opening whose SharedTables it was given, which checked every table of it (SharedTables.layout). */
    readonly checkedElsewhere: boolean,
    /**
     * Where the page digest table lies (compat bit 3), with its bytes when they were read at open,
     * or why it could not be located; undefined without a table.
     */
    private readonly digestTable: {offset: number; length: number; bytes?: Buffer} | {problem: string} | undefined = undefined,
  ) {
    this.geometry = new Geometry(header.pageSize, header.chunkSize, header.logicalSize)
    // A layer's own blocks first, then the packed working set's (docs/FORMAT.md, Layers).
    this.blocks = [...(layer?.set.blocks ?? []), ...(packed?.blocks ?? [])]
    this.unitCount = index.length + this.blocks.length
    this.bound = (header.incompatFeatures & INCOMPAT_BOUND) !== 0n
    if ((header.incompatFeatures & INCOMPAT_FRAMED) !== 0n) {
      const problem = framePagesProblem(header.metadata.framePages, this.geometry.pagesPerChunk)
      if (problem) throw new SnapshotFormatError('INVALID', 'metadata', `framePages: ${problem}`, source.name)
      this.framePages = header.metadata.framePages as number
    } else {
      this.framePages = 0
    }
  }

  /** Its zstd chunks are framed every this many pages (incompat bit 3, src/format/frames.ts); 0: one frame a chunk. */
  readonly framePages: number

  /** Each unit's CRC is seeded with its place (incompat bit 2), so bytes moved to another place fail it. */
  readonly bound: boolean

  /** The units after the chunks: a layer's blocks, then the packed working set's. */
  private readonly blocks: readonly ChunkEntry[]

  /**
   * Units are what readPayload decodes: chunks 0..chunkCount-1, then the packed working set's
   * blocks. One numbering lets caches and decoder threads handle both alike.
   */
  readonly unitCount: number

  /**
   * `keys`: the keys to decrypt a sealed file with and the public keys it must be signed by. An
   * encrypted file opened without its key is refused (KEY_REQUIRED) unless `locked` allows it:
   * then only what is not secret can be read (its structures, unauthenticated; no unit).
   */
  static open(path: string, openPath = path, keys: ReadKeys = NO_READ_KEYS, locked = false, tables?: SharedTables): SnapshotReader {
    return SnapshotReader.fromSource(new FileByteSource(path, openPath), keys, locked, tables)
  }

  /** `tables`: another thread's reader's, of this same file (SharedTables). */
  static fromSource(source: ByteSource, keys: ReadKeys = NO_READ_KEYS, locked = false, tables?: SharedTables): SnapshotReader {
    try {
      return SnapshotReader.load(source, keys, locked, tables)
    } catch (error) {
      source.close()
      if (error instanceof SnapshotFormatError) throw error.withFile(source.name)
      throw error
    }
  }

  private static load(source: ByteSource, keys: ReadKeys, locked: boolean, tables: SharedTables | undefined): SnapshotReader {
    const minimum = FIXED_HEADER_SIZE + HEADER_TRAILER_SIZE + FOOTER_SIZE
    const fixed = Buffer.alloc(Math.min(FIXED_HEADER_SIZE, source.size))
    source.readAt(fixed, 0)
    const headerSize = peekHeaderSize(fixed, source.size)
    if (source.size < minimum || source.size < headerSize + FOOTER_SIZE) {
      throw new SnapshotFormatError('TRUNCATED', 'footer', `file of ${source.size} bytes ends before its footer`)
    }
    const headerBytes = Buffer.alloc(headerSize)
    source.readAt(headerBytes, 0)
    const header = decodeHeader(headerBytes, source.size)
    const geometry = new Geometry(header.pageSize, header.chunkSize, header.logicalSize)

    const footerBytes = Buffer.alloc(FOOTER_SIZE)
    source.readAt(footerBytes, source.size - FOOTER_SIZE)
    const layered = (header.incompatFeatures & INCOMPAT_LAYERED) !== 0n
    const encrypted = (header.incompatFeatures & INCOMPAT_ENCRYPTED) !== 0n
    const signed = (header.compatFeatures & COMPAT_SIGNED) !== 0n
    const sealInfo = encrypted || signed ? checkSealMetadata(header.metadata.seal, encrypted, signed) : undefined
    // A sealed file's seal record (and a signed one's unit digests) lie between its structures and its footer.
    const sealTail = sealInfo ? SEAL_RECORD_SIZE : 0
    if (source.size < headerSize + FOOTER_SIZE + sealTail) throw new SnapshotFormatError('TRUNCATED', 'seal record', `file of ${source.size} bytes ends before its seal record`)
    const footer = decodeFooter(footerBytes, source.size - sealTail, headerSize, header.headerCrc, geometry, layered)

    const zeroMapBytes = sharedBytes(source, footer.zeroMapSize, footer.zeroMapOffset, tables?.zeroMap)
    const zeroMap = decodeZeroMap(zeroMapBytes, footer, geometry)

    const indexBytes = sharedBytes(source, footer.chunkCount * INDEX_ENTRY_SIZE, footer.indexOffset, tables?.index)
    const index = decodeIndex(indexBytes, footer, headerSize, geometry, zeroMap, encrypted)
    const manifest: {part: ManifestPart; bytes: Uint8Array}[] = [
      {part: ManifestPart.Header, bytes: headerBytes},
      {part: ManifestPart.Footer, bytes: footerBytes},
      {part: ManifestPart.Index, bytes: indexBytes},
      {part: ManifestPart.ZeroMap, bytes: zeroMapBytes},
    ]

    let packed: PackedSet | undefined
    const packedAt = (header.metadata.workingSet as {packed?: unknown} | undefined)?.packed
    if ((header.compatFeatures & COMPAT_PACKED_WORKING_SET) !== 0n) {
      const dataEnd = Math.min(footer.indexOffset, footer.zeroMapOffset)
      const location = checkPackedLocation(packedAt, headerSize, dataEnd, geometry)
      const table = Buffer.alloc(location.length)
      source.readAt(table, location.offset)
      packed = decodePackedTable(table, location, headerSize, dataEnd, geometry, zeroMap, 'packed working set', encrypted)
      manifest.push({part: ManifestPart.PackedTable, bytes: table})
    }
    const layout = createHash('sha256').update(headerBytes).update(footerBytes).update(indexBytes).update(zeroMapBytes)
    let layer: LayerData | undefined
    let layerTables: Pick<SharedTables, 'layerRuns' | 'layerBlocks'> = {}
    let layoutDigest: string
    let checkedElsewhere: boolean
    if (layered) {
      const meta = header.metadata.layer as {blocks?: unknown} | undefined
      const dataEnd = Math.min(footer.indexOffset, footer.zeroMapOffset)
      const location = checkLayerLocation(meta, headerSize, dataEnd, geometry)
      const blocksAt = checkPackedLocation(meta?.blocks, headerSize, dataEnd, geometry, 'layer')
      const blockTable = sharedBytes(source, blocksAt.length, blocksAt.offset, tables?.layerBlocks)
      const runTable = sharedBytes(source, location.runs.length, location.runs.offset, tables?.layerRuns)
      layoutDigest = layout.update(blockTable).update(runTable).digest('hex')
      // The checks of the tables below are a function of these bytes (and the header's): the
      // opening whose tables these are made them (SharedTables.layout).
      checkedElsewhere = sameLayout(tables, layoutDigest)
      const set = decodePackedTable(blockTable, blocksAt, headerSize, dataEnd, geometry, zeroMap, 'layer', encrypted)
      // Decoded when first asked (a serving thread asks only for its chain's top layer's).
      let runs: LayerRun[] | undefined
      if (!checkedElsewhere) {
        runs = decodeRunTable(runTable, location, geometry.pageCount)
        const problem = layerPagesProblem(runs, location.parents.length, set, zeroMap)
        if (problem) throw new SnapshotFormatError('CORRUPT', 'layer', problem)
      }
      manifest.push({part: ManifestPart.LayerBlockTable, bytes: blockTable}, {part: ManifestPart.LayerRunTable, bytes: runTable})
      layer = {
        parents: location.parents,
        get runs(): LayerRun[] {
          try {
            return (runs ??= decodeRunTable(runTable, location, geometry.pageCount))
          } catch (error) {
            throw error instanceof SnapshotFormatError ? error.withFile(source.name) : error
          }
        },
        set,
      }
      layerTables = {layerRuns: runTable.buffer as SharedArrayBuffer, layerBlocks: blockTable.buffer as SharedArrayBuffer}
    } else {
      layoutDigest = layout.digest('hex')
      checkedElsewhere = sameLayout(tables, layoutDigest)
    }
    // A local file's table is read when asked (serving never asks); any other source's now, with
    // the structures: a remote file's reader reads only what its probe read at open.
    let digestTable: {offset: number; length: number; bytes?: Buffer} | {problem: string} | undefined
    if ((header.compatFeatures & COMPAT_PAGE_DIGESTS) !== 0n) {
      const rows = layer ? layer.set.pages.length : geometry.pageCount - zeroMap.countZero(0, geometry.pageCount)
      const at = digestTableLocation(rows, Math.min(footer.indexOffset, footer.zeroMapOffset), headerSize)
      if (typeof at === 'string') {
        digestTable = {problem: at}
      } else {
        digestTable = at
        if (!(source instanceof FileByteSource)) source.readAt((digestTable.bytes = Buffer.alloc(at.length)), at.offset)
      }
    }
    let seal: OpenedSeal | undefined
    if (!sealInfo && keys.verifyKeys.length > 0) throw new SnapshotFormatError('SIGNATURE_INVALID', 'signature', 'the file is not signed, and --verify-key requires a signature')
    // A key given means the snapshot is expected sealed: a file written over it unencrypted (by
    // anyone who can write there) must not be served as if it had been authenticated.
    if (!encrypted && keys.keys.length > 0) throw new SnapshotFormatError('NOT_SEALED', 'header', 'the file is not encrypted, and a key was given (--key-file, UFFD_KEY_FILE or UFFD_KEY): an encrypted snapshot is expected (leave the key out to read an unencrypted one)')
    if (sealInfo) {
      const unitCount = index.length + (layer?.set.blocks.length ?? 0) + (packed?.blocks.length ?? 0)
      seal = openSeal(source, sealInfo, {manifest, unitCount, structuresEnd: Math.max(footer.indexOffset + indexBytes.length, footer.zeroMapOffset + zeroMapBytes.length), learned: learnedLocation(header.metadata, headerSize, Math.min(footer.indexOffset, footer.zeroMapOffset))}, keys, locked)
    }
    const shared = {index: indexBytes.buffer as SharedArrayBuffer, zeroMap: zeroMapBytes.buffer as SharedArrayBuffer, ...layerTables, layout: layoutDigest}
    return new SnapshotReader(source, header, footer, index, zeroMap, packed, layer, layoutDigest, seal, shared, checkedElsewhere, digestTable)
  }

  /** Where the page digest table lies (its trailer included), without reading it, or why it could not be located; undefined without a table. */
  pageDigestExtent(): {offset: number; length: number} | {problem: string} | undefined {
    const table = this.digestTable
    if (!table || 'problem' in table) return table
    return {offset: table.offset, length: table.length}
  }

  /** The page digest table's bytes, unchecked (page-digests.ts checks them), or why it could not be located; undefined without a table. */
  pageDigestTable(): {offset: number; bytes: Buffer} | {problem: string} | undefined {
    const table = this.digestTable
    if (!table || 'problem' in table) return table
    if (!table.bytes) this.source.readAt((table.bytes = Buffer.alloc(table.length)), table.offset)
    return {offset: table.offset, bytes: table.bytes}
  }

  get fileSize(): number {
    return this.source.size
  }

  /**
   * Its content identity, 64 hex digits (a base: memoryDigest; a layer: layerIdentity): how a
   * layer recognises its parent whatever it is called now and however it was laid out since
   * (docs/FORMAT.md, Layers). What the file holds, not how it is laid out: attaching a working
   * set or learning one keeps it. A signed file's identity also rests on its units' digests (its
   * chunks', or a layer's own blocks': the rows a working set attached later does not move), so a
   * layer's parent is bound to it by SHA-256, not only by CRC-32s that chosen memory could match.
   * Computed when first asked (checking a chain's parents, writing a layer): the threads that
   * only serve a file never need it.
   */
  get identity(): string {
    if (this.identityDigest === undefined) {
      const zeroMapBytes = this.zeroMap.bytes
      const layer = this.layer
      const content = layer ? layerIdentity(this.geometry, layer.parents, layer.runs, layer.set, zeroMapBytes) : memoryDigest(this.geometry, this.index, zeroMapBytes)
      this.identityDigest = this.seal?.info.signature ? signedIdentity(content, this.seal.digestRows(0, layer ? layer.set.blocks.length : this.index.length)) : content
    }
    return this.identityDigest
  }

  /**
   * Decodes unit `chunk`'s payload (a chunk's or a packed block's non-zero pages, concatenated),
   * verified: its stored bytes against their checksum, the decoded length against the index.
   * Returns a view of `dst` (or of an internal scratch buffer, valid until the next call).
   */
  readPayload(chunk: number, dst?: Buffer): Buffer {
    return this.payloadOf(chunk, dst, true)!
  }

  /**
   * As readPayload, for a thread that must never wait on the network: undefined when the unit's
   * stored bytes are not on this host (a remote source has then been asked for them at demand
   * priority). A local file always has them.
   */
  readPayloadIfLocal(chunk: number, dst?: Buffer): Buffer | undefined {
    return this.payloadOf(chunk, dst, false)
  }

  private payloadOf(chunk: number, dst: Buffer | undefined, wait: boolean): Buffer | undefined {
    const entry = this.entry(chunk)
    if (entry.codec === Codec.None) return Buffer.alloc(0)
    // Opened without its key: its stored bytes are ciphertext, never a payload.
    this.seal?.requireKey()
    let payload: Buffer
    if (dst) {
      if (dst.length < entry.payloadLength) throw new RangeError(`buffer of ${dst.length} bytes is too small for chunk ${chunk} (${entry.payloadLength})`)
      payload = dst.subarray(0, entry.payloadLength)
    } else {
      if (this.payloadScratch.length < entry.payloadLength) this.payloadScratch = Buffer.alloc(this.geometry.chunkSize)
      payload = this.payloadScratch.subarray(0, entry.payloadLength)
    }
    // The checksum covers the stored bytes, so corrupt data is refused before it reaches a
    // decoder, and checking costs a pass over the compressed size only. zstd frames also carry
    // their own checksum of the decoded content, which zstd verifies while decoding.
    const checked = this.checked(chunk, entry, () => this.readStored(entry, payload, wait), entry.codec === Codec.Raw ? payload : undefined)
    if (checked === undefined) return undefined
    if (checked.plain !== payload) this.decode(chunk, entry, checked.plain, payload)
    this.unitsDecoded++
    return payload
  }

  /**
   * Decodes only the frames of framed chunk `chunk` (src/format/frames.ts) that hold its image
   * pages [first, end), into `dst`, verified as readPayload verifies: the stored bytes of the
   * whole chunk against their checksum (and seal), each frame decoded against its own checksum,
   * every frame passed over checked against the pages its group holds. Returns their payload (a
   * view of `dst`), the payload page it starts at and how many frames it holds. 'whole' when
   * only decoding the whole chunk would do (the file or chunk is not framed, or those frames are
   * all of it); undefined when its bytes are not on this host (asked for, as by
   * readPayloadIfLocal).
   */
  readFramesIfLocal(chunk: number, first: number, end: number, dst: Buffer): {payload: Buffer; payloadPage: number; frames: number} | 'whole' | undefined {
    if (this.framePages === 0 || chunk >= this.index.length) return 'whole'
    const entry = this.entry(chunk)
    if (entry.codec !== Codec.Zstd) return 'whole'
    this.seal?.requireKey()
    const groups = this.groupsOf(chunk)
    const span = framesOfPages(this.zeroMap, this.geometry.firstPageOfChunk(chunk), this.geometry.pagesInChunk(chunk), this.framePages, first, end)
    if (span.to === span.from || (span.from === 0 && span.to === groups.length)) return 'whole'
    const checked = this.checked(chunk, entry, () => this.readStored(entry, dst, false))
    if (checked === undefined) return undefined
    const frames = chunkFrames(checked.plain, groups)
    if (frames === 'whole') return 'whole'
    if (typeof frames === 'string') throw this.chunkError(chunk, 'CORRUPT', frames)
    let bytes = 0
    for (let f = span.from; f < span.to; f++) bytes += groups[f]
    if (dst.length < bytes) throw new RangeError(`buffer of ${dst.length} bytes is too small for ${bytes} bytes of chunk ${chunk}`)
    const from = frames[span.from].offset
    const to = frames[span.to - 1].offset + frames[span.to - 1].length
    const payload = dst.subarray(0, bytes)
    const decompressor = (this.decompressor ??= new ChunkDecompressor())
    try {
      decompressor.decompress(Codec.Zstd, checked.plain.subarray(from, to), payload, true)
    } catch (error) {
      throw this.chunkError(chunk, 'CORRUPT', `zstd frames ${span.from}..${span.to - 1} do not decode (${(error as Error).message})`)
    }
    return {payload, payloadPage: span.payloadPage, frames: span.to - span.from}
  }

  /** The payload bytes each frame of framed chunk `chunk` must declare (groupPayloadBytes). */
  private groupsOf(chunk: number): number[] {
    return groupPayloadBytes(this.zeroMap, this.geometry.firstPageOfChunk(chunk), this.geometry.pagesInChunk(chunk), this.framePages, this.geometry.pageSize)
  }

  /** Where a unit sits, as its seal binds it. */
  private placeOf(unit: number, entry: ChunkEntry): UnitPlace {
    const block = this.packedBlock(unit)
    const place = {codec: entry.codec, payloadLength: entry.payloadLength, unit}
    if (block === undefined) return {kind: UnitKind.Chunk, number: entry.sealedAs ?? unit, ...place}
    // A layer's own blocks come first, then its packed working set's.
    const layerBlocks = this.layer?.set.blocks.length ?? 0
    return block < layerBlocks ? {kind: UnitKind.LayerBlock, number: block, ...place} : {kind: UnitKind.PackedBlock, number: block - layerBlocks, ...place}
  }

  /**
   * Where a unit belongs, as its bound CRC names it: a chunk by its own index (a deduplicated
   * chunk too: its CRC is its own entry's, unlike its seal, so every entry is bound to its place),
   * a block by its position in its table and the pages it lists.
   */
  boundPlace(unit: number): BoundPlace {
    const entry = this.entry(unit)
    const fields = {codec: entry.codec, payloadLength: entry.payloadLength}
    const block = this.packedBlock(unit)
    if (block === undefined) return {kind: BoundKind.Chunk, number: unit, ...fields}
    const layerBlocks = this.layer?.set.blocks.length ?? 0
    const set = block < layerBlocks ? this.layer!.set : this.packed!
    const number = block < layerBlocks ? block : block - layerBlocks
    const {listStart, pageCount} = set.blocks[number]
    return {kind: block < layerBlocks ? BoundKind.LayerBlock : BoundKind.PackedBlock, number, pages: set.pages.subarray(listStart, listStart + pageCount), ...fields}
  }

  /** What a unit's stored CRC starts from: its place's seed in a bound file, else 0 (the CRC of its bytes alone). */
  crcSeed(unit: number): number {
    return this.bound ? placeSeed(this.boundPlace(unit)) : 0
  }

  /** What the learned runs' stored CRC starts from (as crcSeed for a unit). */
  learnedSeed(codec: Codec, rawLength: number): number {
    return this.bound ? placeSeed(learnedPlace(codec, rawLength)) : 0
  }

  /** Learned runs' stored bytes (their CRC checked by the caller), decrypted when the file is encrypted. */
  learnedPlain(stored: Buffer, codec: Codec, rawLength: number): Buffer {
    if (!this.seal?.encrypted) return stored
    const plain = Buffer.alloc(Math.max(0, stored.length - TAG_BYTES))
    if (!this.seal.open({kind: UnitKind.LearnedRuns, number: 0, codec, payloadLength: rawLength}, stored, plain)) {
      throw new SnapshotFormatError('NOT_AUTHENTIC', 'learned runs', "do not authenticate under the file's key", this.source.name)
    }
    return plain
  }

  /**
   * The unit's stored bytes exactly as the file holds them (a new buffer), verified as
   * readPayload verifies them: against their checksum (and seal) and, with `decode`, by decoding
   * them (into scratch) to the length the index declares. For copying stored bytes without passing
   * on one that was not checked. Without the key (a locked file, copied by a host that holds no
   * key) only their checksum can be checked.
   */
  storedBytes(unit: number, decode = false): Buffer {
    return this.verifiedUnit(unit, decode).stored
  }

  /**
   * The unit's stored bytes as its codec wrote them (decrypted, for an encrypted file), verified
   * as storedBytes(unit, true) verifies them: for writing them into another file, sealed anew.
   */
  codecBytes(unit: number): Buffer {
    this.seal?.requireKey()
    const {stored, plain} = this.verifiedUnit(unit, true)
    return plain === stored ? plain : Buffer.from(plain)
  }

  private verifiedUnit(unit: number, decode: boolean): {stored: Buffer; plain: Buffer} {
    const entry = this.entry(unit)
    if (entry.codec === Codec.None) return {stored: Buffer.alloc(0), plain: Buffer.alloc(0)}
    const checked = this.checked(unit, entry, () => {
      const bytes = Buffer.allocUnsafe(entry.storedLength)
      this.source.readAt(bytes, entry.dataOffset)
      return bytes
    })
    if (this.seal?.locked || !decode) return checked
    if (entry.codec !== Codec.Raw) {
      if (this.payloadScratch.length < entry.payloadLength) this.payloadScratch = Buffer.alloc(Math.max(entry.payloadLength, this.geometry.chunkSize))
      this.decode(unit, entry, checked.plain, this.payloadScratch.subarray(0, entry.payloadLength))
    } else if (checked.plain.length !== entry.payloadLength) {
      throw this.chunkError(unit, 'CORRUPT', `raw data is ${checked.plain.length} bytes, expected ${entry.payloadLength}`)
    }
    return checked
  }

  /**
   * Reads stored bytes with `read` and checks them: their checksum, a verified signature's unit
   * digest, and for an encrypted file their seal (decrypting them into `dst`, or scratch): the
   * bytes as stored and as the codec wrote them. Undefined when `read` found them not on this host
   * (a no-wait read). A cached copy of remote bytes that fails any check (a torn file after a
   * crash, a disk error, an entry changed by someone who can write the cache) is dropped and
   * fetched again, once; the file itself failing is what the error reports.
   */
  private checked<T extends Buffer | undefined>(unit: number, entry: ChunkEntry, read: () => T, dst?: Buffer): T extends Buffer ? {stored: Buffer; plain: Buffer} : {stored: Buffer; plain: Buffer} | undefined {
    type Out = T extends Buffer ? {stored: Buffer; plain: Buffer} : {stored: Buffer; plain: Buffer} | undefined
    let stored = read()
    if (stored === undefined) return undefined as Out
    let outcome = this.check(unit, entry, stored, dst)
    if (outcome instanceof SnapshotFormatError && !this.refetched.has(unit) && this.source.discard?.(entry.dataOffset, entry.storedLength)) {
      // Once: a no-wait read finds the bytes gone and returns, and fresh bytes that fail as well
      // are the file's, not the cache's (a crafted entry pointing at another unit's bytes passes
      // the fetcher's check of that unit's CRC): failing now, not fetching them over and over.
      this.refetched.add(unit)
      stored = read()
      if (stored === undefined) return undefined as Out
      outcome = this.check(unit, entry, stored, dst)
    }
    if (outcome instanceof SnapshotFormatError) throw outcome
    this.refetched.delete(unit)
    return {stored, plain: outcome} as Out
  }

  /** The unit's plaintext (the stored bytes themselves unless encrypted), or what is wrong with them. */
  private check(unit: number, entry: ChunkEntry, stored: Buffer, dst?: Buffer): Buffer | SnapshotFormatError {
    // One more CRC over a 16-byte record in a bound file: bytes moved here from another place,
    // with their CRC copied along, fail.
    const crc = crc32(stored, this.crcSeed(unit))
    if (crc !== entry.storedCrc) return this.chunkError(unit, 'CORRUPT', `checksum mismatch (stored ${hex(entry.storedCrc)}, computed ${hex(crc)}${this.bound ? ' for this place' : ''})`)
    // A verified signature covers the digest of every unit: the checksum stops accidents, this stops a forger.
    if (this.seal?.digestsChecked && !this.seal.digestMatches(unit, stored)) return this.chunkError(unit, 'NOT_AUTHENTIC', 'its digest differs from the one the signed unit digest table records')
    if (!this.seal?.encrypted || this.seal.locked) return stored
    const length = entry.storedLength - TAG_BYTES
    let plain = dst?.subarray(0, length)
    if (!plain) {
      if (this.plainScratch.length < length) this.plainScratch = Buffer.alloc(Math.max(length, this.geometry.chunkSize + 1024))
      plain = this.plainScratch.subarray(0, length)
    }
    if (!this.seal.open(this.placeOf(unit, entry), stored, plain)) return this.chunkError(unit, 'NOT_AUTHENTIC', `does not authenticate under the file's key (changed, moved from another place, or from another snapshot)`)
    return plain
  }

  /** Loads the decoders now: a thread that will decode calls it at start-up so that its first fault does not pay for it. */
  prepareDecoding(): void {
    this.decompressor ??= new ChunkDecompressor()
  }

  private decode(unit: number, entry: ChunkEntry, stored: Buffer, payload: Buffer): void {
    // Outside the try: a codec library that fails to load is not a corrupt chunk.
    const decompressor = (this.decompressor ??= new ChunkDecompressor())
    // A framed chunk decoded whole is held to what decoding its frames alone would check (a
    // header walk): verify and a fault judge it alike.
    const framed = this.framePages > 0 && unit < this.index.length && entry.codec === Codec.Zstd
    if (framed) {
      const frames = chunkFrames(stored, this.groupsOf(unit))
      if (typeof frames === 'string') throw this.chunkError(unit, 'CORRUPT', frames)
    }
    try {
      decompressor.decompress(entry.codec, stored, payload, framed)
    } catch (error) {
      throw this.chunkError(unit, 'CORRUPT', `${codecName(entry.codec)} data does not decode (${(error as Error).message})`)
    }
  }

  /**
   * Fills `dst` with the chunk's whole-page bytes (zero pages included), verified. `dst` must hold
   * `geometry.chunkPaddedLength(chunk)` bytes.
   */
  readChunk(chunk: number, dst: Buffer): void {
    const length = this.geometry.chunkPaddedLength(chunk)
    if (dst.length < length) throw new RangeError(`buffer of ${dst.length} bytes is too small for chunk ${chunk} (${length})`)
    const payload = this.readPayload(chunk)
    const {pageSize} = this.geometry
    const first = this.geometry.firstPageOfChunk(chunk)
    let from = 0
    for (let i = 0, pages = this.geometry.pagesInChunk(chunk); i < pages; i++) {
      const at = i * pageSize
      if (this.zeroMap.isZero(first + i)) {
        dst.fill(0, at, at + pageSize)
      } else {
        payload.copy(dst, at, from, from + pageSize)
        from += pageSize
      }
    }
  }

  /** The index entry of a chunk, or of a packed block (unit chunkCount + block). */
  entry(unit: number): ChunkEntry {
    if (!Number.isInteger(unit) || unit < 0 || unit >= this.unitCount) throw new RangeError(`chunk ${unit} is outside 0..${this.unitCount - 1}`)
    return unit < this.index.length ? this.index.at(unit) : this.blocks[unit - this.index.length]
  }

  /** The packed block a unit number names (for a layer: one of its blocks, then the packed set's), or undefined for a chunk. */
  packedBlock(unit: number): number | undefined {
    return unit >= this.index.length && unit < this.unitCount ? unit - this.index.length : undefined
  }

  /** The unit number of packed working-set block `block` (after a layer's own blocks). */
  packedUnit(block: number): number {
    return this.index.length + (this.layer?.set.blocks.length ?? 0) + block
  }

  /** Whether the unit's stored bytes can be read without waiting on the network (always, for a local file). */
  isLocal(unit: number): boolean {
    const entry = this.entry(unit)
    if (entry.codec === Codec.None || !this.source.isLocal) return true
    return this.source.isLocal(entry.dataOffset, entry.storedLength)
  }

  /**
   * Asks a remote source for these units' stored bytes ahead of need, and for the units `around`
   * them at prefetch priority in the same ask (see ByteSource.fetchAhead; nothing for a local file).
   */
  fetchAhead(units: Iterable<number>, priority: Priority = PRIORITY_PREFETCH, around: Iterable<number> = []): void {
    if (!this.source.fetchAhead) return
    const ranges = (list: Iterable<number>): {position: number; length: number}[] => {
      const out: {position: number; length: number}[] = []
      for (const unit of list) {
        const entry = this.entry(unit)
        if (entry.codec !== Codec.None) out.push({position: entry.dataOffset, length: entry.storedLength})
      }
      return out
    }
    this.source.fetchAhead(ranges(units), priority, ranges(around))
  }

  /** Whether bytes may be far away (fetchAhead and isLocal mean something). */
  get remote(): boolean {
    return this.source.fetchAhead !== undefined
  }

  close(): void {
    this.source.close()
  }

  /**
   * Reads the stored bytes; raw chunks are read straight into `payload` (no copy). Without
   * `wait`, undefined when they are not on this host (see ByteSource.readIfLocal).
   */
  private readStored(entry: ChunkEntry, payload: Buffer, wait: boolean): Buffer | undefined {
    let stored = payload
    // Sealed raw bytes carry a tag, and must authenticate before anything lands in the payload.
    if (entry.codec !== Codec.Raw || this.seal?.encrypted) {
      if (this.storedScratch.length < entry.storedLength) this.storedScratch = Buffer.alloc(Math.max(entry.storedLength, this.geometry.chunkSize))
      stored = this.storedScratch.subarray(0, entry.storedLength)
    }
    if (wait || !this.source.readIfLocal) this.source.readAt(stored, entry.dataOffset)
    else if (!this.source.readIfLocal(stored, entry.dataOffset)) return undefined
    return stored
  }

  private chunkError(unit: number, code: 'CORRUPT' | 'NOT_AUTHENTIC', detail: string): SnapshotFormatError {
    const block = this.packedBlock(unit)
    const layerBlocks = this.layer?.set.blocks.length ?? 0
    const part = block === undefined ? `chunk ${unit}` : block < layerBlocks ? `layer block ${block}` : `packed working set block ${block - layerBlocks}`
    return new SnapshotFormatError(code, part, detail, this.source.name)
  }
}

function signedIdentity(content: string, digests: Buffer): string {
  return createHash('sha256').update('uffd signed identity').update(content).update(digests).digest('hex')
}

function codecName(codec: Codec): string {
  return Codec[codec].toLowerCase()
}
