/**
 * The fuzzing engine behind test/fuzz.test.ts (bounded, in CI) and bench/fuzz.ts (long): it
 * mutates real snapshots, working sets and stats files, deterministically from a seed and a case
 * number, and runs each through what reads it, in-process (the reader, stats, verify, attach) or
 * through the CLI. A case passes when it succeeds or fails with a UffdError of a documented code
 * (INTERNAL is a bug); anything else (a TypeError, a RangeError, a stack overflow, a signal, a
 * time-out) is a crash. Snapshot mutations are random (bit flips, truncations, splices) or
 * crafted: a field of the header, a region, the footer, an index entry or the packed table set to
 * a telling value, the zero map, a chunk's stored bytes or the metadata edited, and then every
 * CRC recomputed, so that the change gets past the checksums to the checks behind them.
 */
import {spawnSync} from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import {isErrorCode, UffdError} from '../../src/core/errors.js'
import {isErrnoName} from '../../src/sys/errors.js'
import {mergeWorkingSets, checkMatches, chunksInTouchOrder, parseWorkingSet, type WorkingSetFile} from '../../src/format/working-set.js'
import {BoundKind, placeSeed} from '../../src/format/bind.js'
import {FOOTER_SIZE, INCOMPAT_BOUND, INDEX_ENTRY_SIZE, PACKED_BLOCK_ENTRY_SIZE, RegionKind} from '../../src/format/constants.js'
import {packedBlockRuns, zeroRunWindowBytes} from '../../src/format/packed-set.js'
import {readResumeReport, renderResumeReport} from '../../src/resume/main/report-render.js'
import {buildReport, RunStats} from '../../src/resume/run-stats.js'
import {type ByteSource} from '../../src/snapshot/byte-source.js'
import {snapshotStats, verifySnapshot} from '../../src/snapshot/inspect.js'
import {memFileInput} from '../../src/snapshot/inputs.js'
import {SnapshotReader} from '../../src/snapshot/reader.js'
import {attachedWorkingSet, attachWorkingSet, packOptionsFor} from '../../src/snapshot/relayout.js'
import {writeSnapshot} from '../../src/snapshot/writer.js'
import {parseKey} from '../../src/format/seal.js'
import {type ReadKeys, type SealingOptions} from '../../src/snapshot/sealing.js'
import {cliEnv, UFFD_BIN} from './cli.js'
import {decodeImage, makeImage} from './images.js'

// ---------------------------------------------------------------------------------------------
// Randomness: one small generator per case, from (seed, case), so any case can be made again.

export class Rng {
  private state: number
  constructor(seed: number, stream = 0) {
    this.state = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(stream + 1, 0xc2b2ae35)) >>> 0
    for (let i = 0; i < 4; i++) this.next()
  }

  /** mulberry32: 32 random bits. */
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0)
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return n <= 0x1_0000_0000 ? Math.floor((this.next() / 0x1_0000_0000) * n) : Math.floor((this.next() * 0x1_0000_0000 + this.next()) % n)
  }

  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]
  }

  bytes(n: number): Buffer {
    const out = Buffer.alloc(n)
    for (let i = 0; i < n; i++) out[i] = this.next() & 0xff
    return out
  }
}

// ---------------------------------------------------------------------------------------------
// Outcomes.

/** What a case ended in: OK, or the code of the documented error it was refused with. */
export type Outcome = string

export class FuzzCrash extends Error {
  constructor(
    readonly where: string,
    readonly error: unknown,
  ) {
    super(`${where}: ${error instanceof Error ? `${error.name}: ${error.message}` : String(error)}`)
  }
}

/**
 * The code of a documented refusal (marked when it was a checksum's: crafted mutations are meant
 * to get past those), or a FuzzCrash for anything else.
 */
function refusal(error: unknown, where: string): Outcome {
  if (error instanceof UffdError && isErrorCode(error.code) && error.code !== 'INTERNAL') return /checksum mismatch/.test(error.message) ? `${error.code} (checksum)` : error.code
  throw new FuzzCrash(where, error)
}

function attempt(where: string, run: () => void): Outcome {
  try {
    run()
    return 'OK'
  } catch (error) {
    return refusal(error, where)
  }
}

export interface Crash {
  kind: string
  seed: number
  index: number
  how: string
  message: string
  stack?: string
}

/** Counts outcomes per kind, keeps the crashes (with how to make them again) and the slowest case. */
export class Tally {
  /** kind -> outcome -> cases. */
  readonly counts = new Map<string, Map<string, number>>()
  readonly crashes: Crash[] = []
  readonly slowest = new Map<string, {ms: number; index: number; how: string}>()
  cases = 0

  add(kind: string, outcome: Outcome, n = 1): void {
    this.cases += n
    let outcomes = this.counts.get(kind)
    if (!outcomes) this.counts.set(kind, (outcomes = new Map()))
    outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + n)
  }

  count(kind: string, outcome: Outcome): number {
    return this.counts.get(kind)?.get(outcome) ?? 0
  }

  time(kind: string, ms: number, index: number, how: string): void {
    const s = this.slowest.get(kind)
    if (!s || ms > s.ms) this.slowest.set(kind, {ms, index, how})
  }

  crash(kind: string, seed: number, index: number, how: string, crash: FuzzCrash): void {
    this.cases++
    const cause = crash.error instanceof Error ? crash.error : undefined
    this.crashes.push({kind, seed, index, how, message: crash.message, stack: cause?.stack})
  }

  /** Another tally's cases added to this one (a worker's). */
  merge(other: {counts: [string, [string, number][]][]; crashes: Crash[]; slowest: [string, {ms: number; index: number; how: string}][]}): void {
    for (const [kind, outcomes] of other.counts) for (const [outcome, n] of outcomes) this.add(kind, outcome, n)
    for (const c of other.crashes) {
      this.crashes.push(c)
      this.cases++
    }
    for (const [kind, s] of other.slowest) this.time(kind, s.ms, s.index, s.how)
  }

  /** Plain data, for postMessage and merge(). */
  toJSON(): {counts: [string, [string, number][]][]; crashes: Crash[]; slowest: [string, {ms: number; index: number; how: string}][]} {
    return {counts: [...this.counts].map(([k, m]) => [k, [...m]]), crashes: this.crashes, slowest: [...this.slowest]}
  }

  summary(): Record<string, Record<string, number>> {
    return Object.fromEntries([...this.counts].map(([kind, m]) => [kind, Object.fromEntries([...m].sort(([a], [b]) => a.localeCompare(b)))]))
  }
}

/** Runs one case, timing it and filing its outcome or crash. */
export function runCase(tally: Tally, kind: string, seed: number, index: number, how: string, check: () => Outcome): void {
  const started = performance.now()
  try {
    tally.add(kind, check())
  } catch (error) {
    tally.crash(kind, seed, index, how, error instanceof FuzzCrash ? error : new FuzzCrash('harness', error))
  } finally {
    tally.time(kind, performance.now() - started, index, how)
  }
}

// ---------------------------------------------------------------------------------------------
// The corpus: small real snapshots of every shape the writer makes, a working set and a report.

export interface BaseSnapshot {
  name: string
  file: string
  bytes: Buffer
  layout: Layout
  /** A sealed one: the keys that open it, and the image it must read as whenever it is accepted. */
  sealed?: {keys: ReadKeys; image: Buffer}
}

export interface Corpus {
  dir: string
  snapshots: BaseSnapshot[]
  /** A valid working set of snapshots[0], as --record writes one. */
  workingSet: {file: string; text: string; set: WorkingSetFile}
  /** A valid --stats-file. */
  report: {text: string}
  /** Sealed snapshots (encrypted; encrypted and signed; with a packed set), apart: their salts are random, so their cases differ from run to run. */
  sealed: BaseSnapshot[]
}

export async function makeCorpus(dir: string): Promise<Corpus> {
  fs.mkdirSync(dir, {recursive: true})
  const mixed = path.join(dir, 'mixed.mem')
  fs.writeFileSync(mixed, makeImage('mixed', 512 * 1024, 11))
  const small = path.join(dir, 'small.mem')
  fs.writeFileSync(small, makeImage('mixed', 96 * 1024, 12))
  // Fixed metadata (no time, no host), so that every run makes the same bytes and a case number
  // names the same mutated file anywhere.
  const fixed = (input: string) => ({...memFileInput(input), metadata: {source: 'mem-file', sourcePath: path.basename(input), toolVersion: '0.1.0', createdAt: '2026-01-02T03:04:05.000Z', host: 'fuzz'}})
  const write = async (name: string, input: string, codec: 'zstd' | 'lz4' | 'raw', chunkSize: number): Promise<string> => {
    const file = path.join(dir, `${name}.uffd`)
    await writeSnapshot(fixed(input), file, {codec, level: 1, chunkSize, pageSize: 4096, jobs: 1})
    return file
  }
  const files: Record<string, string> = {
    zstd: await write('zstd', mixed, 'zstd', 65536),
    lz4: await write('lz4', mixed, 'lz4', 16384),
    raw: await write('raw', small, 'raw', 4096),
  }
  // A process-like snapshot: several VMAs of two owners, with names and CRIU-like metadata.
  const process = path.join(dir, 'process.uffd')
  const regions = [
    {kind: RegionKind.ProcessVma, imageOffset: 0, size: 32768, address: 0x400000, fileOffset: 0, prot: 5, flags: 2, owner: 100, name: '/usr/bin/app'},
    {kind: RegionKind.ProcessVma, imageOffset: 32768, size: 49152, address: 0x7f0000000000, fileOffset: 0, prot: 3, flags: 4, owner: 100, name: '[heap]'},
    {kind: RegionKind.ProcessVma, imageOffset: 81920, size: 16384, address: 0x7ffd0000, fileOffset: 0, prot: 3, flags: 0, owner: 101, name: ''},
  ]
  await writeSnapshot({...fixed(small), regions, metadata: {source: 'criu', criuDir: '/tmp/dump', tasks: [{pid: 100, comm: 'app', rawPageBytes: 40960}, {pid: 101, comm: 'child'}], rawPageBytes: 65536, toolVersion: '0.1.0'}}, process, {codec: 'lz4', level: 1, chunkSize: 16384, pageSize: 4096, jobs: 1})
  files.process = process
  // Working sets attached: packed in zstd (scattered pages, zero pages among them), packed in
  // lz4, and reordered only (compat bit 0 without bit 1).
  const pages = Array.from({length: 40}, (_, i) => (i * 37 + 5) % 128)
  const unique = [...new Set(pages)]
  for (const [name, base, codec] of [
    ['packed-zstd', files.zstd, 'zstd'],
    ['packed-lz4', files.lz4, 'lz4'],
    ['reordered', files.zstd, 'none'],
  ] as const) {
    const file = path.join(dir, `${name}.uffd`)
    attachWorkingSet(base, file, {pages: unique, runs: 2}, {codec, level: 1})
    files[name] = file
  }
  const snapshots = Object.entries(files).map(([name, file]) => {
    const bytes = fs.readFileSync(file)
    return {name, file, bytes, layout: layoutOf(file, bytes)}
  })
  const key = parseKey(Buffer.alloc(32, 7), 'fuzz key')
  const {privateKey, publicKey} = crypto.generateKeyPairSync('ed25519')
  const sealedFiles: [string, string, SealingOptions, ReadKeys][] = []
  for (const [name, input, codec, chunkSize, seal] of [
    ['sealed-zstd', mixed, 'zstd', 65536, {key}],
    ['sealed-signed-lz4', mixed, 'lz4', 16384, {key, signingKey: privateKey}],
  ] as const) {
    const file = path.join(dir, `${name}.uffd`)
    await writeSnapshot(fixed(input), file, {codec, level: 1, chunkSize, pageSize: 4096, jobs: 1, seal})
    sealedFiles.push([name, file, seal, {keys: [key], verifyKeys: 'signingKey' in seal ? [publicKey] : []}])
  }
  const packedSealed = path.join(dir, 'sealed-packed.uffd')
  attachWorkingSet(sealedFiles[0][1], packedSealed, {pages: unique, runs: 2}, {codec: 'zstd', level: 1, seal: {key}})
  sealedFiles.push(['sealed-packed', packedSealed, {key}, {keys: [key], verifyKeys: []}])
  const mixedImage = fs.readFileSync(mixed)
  const sealed = sealedFiles.map(([name, file, , keys]) => {
    const bytes = fs.readFileSync(file)
    return {name, file, bytes, layout: layoutOf(file, bytes), sealed: {keys, image: mixedImage}}
  })

  const reader = SnapshotReader.open(files.zstd)
  const identity = {logicalSize: reader.geometry.logicalSize, pageSize: reader.geometry.pageSize, headerCrc: reader.header.headerCrc}
  reader.close()
  const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, pages: unique, firstTouchMs: unique.map((_, i) => i * 0.25)}
  const wsFile = path.join(dir, 'base.ws')
  const wsText = `${JSON.stringify(set)}\n`
  fs.writeFileSync(wsFile, wsText)

  const stats = new RunStats()
  for (const [name, n] of [['clients', 1], ['clientsEnded', 1], ['faults', 3], ['faultsData', 2], ['faultsZero', 1], ['pagesCopied', 96], ['bytesCopied', 96 * 4096], ['cacheHits', 2], ['cacheMisses', 1], ['stagedUnits', 2], ['stagedBytes', 8192], ['hitsTracked', 1], ['prefetchHits', 3]] as const) stats.add(name, n)
  for (const us of [5, 40, 900]) stats.recordLatency(us)
  const report = buildReport(stats, 'zstd.uffd', new Date(0), 1234)
  return {dir, snapshots, workingSet: {file: wsFile, text: wsText, set}, report: {text: `${JSON.stringify(report, null, 2)}\n`}, sealed}
}

// ---------------------------------------------------------------------------------------------
// Where everything is in a base snapshot, to aim mutations and to recompute checksums.

interface Field {
  name: string
  at: number
  width: 1 | 2 | 4 | 8
}

export interface Layout {
  headerSize: number
  metadataAt: number
  metadataEnd: number
  /** Where the packed table's CRC (8 hex digits) is in the metadata, if there is a table. */
  packedCrcAt?: number
  packed?: {offset: number; length: number; blocks: number; pages: number}
  fields: Field[]
}

function layoutOf(file: string, bytes: Buffer): Layout {
  const reader = SnapshotReader.open(file, file, undefined, true)
  try {
    const {header, footer} = reader
    const fields: Field[] = []
    const add = (name: string, at: number, width: Field['width']): void => {
      fields.push({name, at, width})
    }
    for (const [name, at, width] of [
      ['major', 8, 2], ['minor', 10, 2], ['header_size', 12, 4], ['incompat_features', 16, 8], ['compat_features', 24, 8], ['page_size', 32, 4],
      ['chunk_size', 36, 4], ['logical_size', 40, 8], ['region_count', 48, 4], ['strings_size', 52, 4], ['metadata_size', 56, 4], ['header reserved', 60, 4],
    ] as const) add(name, at, width)
    add('header trailer reserved', header.headerSize - 4, 4)
    for (let r = 0; r < header.regions.length; r++) {
      for (const [name, at, width] of [['image_offset', 0, 8], ['size', 8, 8], ['address', 16, 8], ['file_offset', 24, 8], ['prot', 32, 4], ['flags', 36, 4], ['owner', 40, 4], ['name_offset', 44, 4], ['name_length', 48, 4], ['kind', 52, 4], ['reserved', 56, 8]] as const) {
        add(`region ${r} ${name}`, 64 + 64 * r + at, width)
      }
    }
    const F = bytes.length - FOOTER_SIZE
    for (const [name, at, width] of [['index_offset', 8, 8], ['chunk_count', 16, 8], ['zero_map_offset', 24, 8], ['zero_map_size', 32, 8], ['footer header_crc', 48, 4], ['footer reserved', 52, 8]] as const) add(name, F + at, width)
    const entryFields = [['data_offset', 0, 8], ['stored_length', 8, 4], ['payload_length', 12, 4], ['stored_crc', 16, 4], ['codec', 20, 1], ['flags', 21, 1], ['reserved', 22, 2], ['reserved2', 24, 8]] as const
    for (let c = 0; c < footer.chunkCount; c++) for (const [name, at, width] of entryFields) add(`index ${c} ${name}`, footer.indexOffset + INDEX_ENTRY_SIZE * c + at, width)
    const stringsAt = 64 + 64 * header.regions.length
    const stringsSize = bytes.readUInt32LE(52)
    const metadataAt = stringsAt + stringsSize
    const metadataEnd = metadataAt + bytes.readUInt32LE(56)
    const layout: Layout = {headerSize: header.headerSize, metadataAt, metadataEnd, fields}
    const location = (header.metadata.workingSet as {packed?: {offset: number; length: number; blocks: number; pages: number; crc: string}} | undefined)?.packed
    if (reader.packed && location) {
      layout.packed = {offset: location.offset, length: location.length, blocks: location.blocks, pages: location.pages}
      const text = bytes.toString('latin1', metadataAt, metadataEnd)
      layout.packedCrcAt = metadataAt + text.indexOf(`"crc":"${location.crc}"`) + 7
      for (let b = 0; b < location.blocks; b++) {
        for (const [name, at, width] of [['data_offset', 0, 8], ['stored_length', 8, 4], ['payload_length', 12, 4], ['stored_crc', 16, 4], ['codec', 20, 1], ['reserved', 21, 1], ['list_start', 24, 4], ['page_count', 28, 4]] as const) {
          add(`packed block ${b} ${name}`, location.offset + PACKED_BLOCK_ENTRY_SIZE * b + at, width)
        }
      }
      const listAt = location.offset + PACKED_BLOCK_ENTRY_SIZE * location.blocks
      for (let i = 0; i < location.pages; i += Math.max(1, Math.floor(location.pages / 8))) add(`packed page ${i}`, listAt + 4 * i, 4)
    }
    return layout
  } finally {
    reader.close()
  }
}

function readField(bytes: Buffer, f: Field): bigint {
  switch (f.width) {
    case 1:
      return BigInt(bytes[f.at])
    case 2:
      return BigInt(bytes.readUInt16LE(f.at))
    case 4:
      return BigInt(bytes.readUInt32LE(f.at))
    case 8:
      return bytes.readBigUInt64LE(f.at)
  }
}

function writeField(bytes: Buffer, f: Field, value: bigint): void {
  const v = BigInt.asUintN(f.width * 8, value)
  switch (f.width) {
    case 1:
      bytes[f.at] = Number(v)
      return
    case 2:
      bytes.writeUInt16LE(Number(v), f.at)
      return
    case 4:
      bytes.writeUInt32LE(Number(v), f.at)
      return
    case 8:
      bytes.writeBigUInt64LE(v, f.at)
  }
}

/** Values that tend to sit on a check's boundary, for a field holding `old` in a file of `size` bytes. */
function tellingValue(rng: Rng, f: Field, old: bigint, size: number, others: readonly bigint[]): bigint {
  const bits = BigInt(f.width * 8)
  const max = (1n << bits) - 1n
  const candidates: bigint[] = [0n, 1n, old - 1n, old + 1n, old * 2n, old / 2n, max, 1n << (bits - 1n), BigInt(size), BigInt(size) - 1n, BigInt(size) + 1n, 4096n, 2097152n, 4194304n, 8388608n, 4095n]
  if (f.width === 8) candidates.push(1n << 32n, (1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 1n, 1n << 63n)
  const pick = rng.int(4)
  if (pick === 0) return BigInt(rng.next()) & max
  if (pick === 1 && others.length > 0) return rng.pick(others)
  if (pick === 2) return old ^ (1n << BigInt(rng.int(f.width * 8)))
  return rng.pick(candidates)
}

/**
 * Recomputes every checksum a reader checks, in dependency order, where the (mutated) fields
 * locate them inside the file: stored bytes of chunks and packed blocks (in a bound file, seeded
 * with the place the mutated header and entries give them, as a reader computes it), the packed
 * table (in the metadata), the header (and its copy in the footer), the index, the zero map and
 * the footer.
 */
export function reseal(bytes: Buffer, layout: Layout, units = true): void {
  const size = bytes.length
  if (size < FOOTER_SIZE) return
  const F = size - FOOTER_SIZE
  const inFile = (at: number, length: number): boolean => Number.isSafeInteger(at) && Number.isSafeInteger(length) && at >= 0 && length >= 0 && at + length <= size
  const u64 = (at: number): number => Number(bytes.readBigUInt64LE(at))
  const indexOffset = u64(F + 8)
  const chunkCount = u64(F + 16)
  const zeroMapOffset = u64(F + 24)
  const zeroMapSize = u64(F + 32)
  const bound = (bytes.readBigUInt64LE(16) & INCOMPAT_BOUND) !== 0n
  const resealEntry = (at: number, kind: BoundKind, number: number, pages?: Uint32Array): void => {
    if (!inFile(at, 32)) return
    const dataOffset = u64(at)
    const storedLength = bytes.readUInt32LE(at + 8)
    const seed = bound ? placeSeed({kind, number, pages, codec: bytes[at + 20], payloadLength: bytes.readUInt32LE(at + 12)}) : 0
    if (units && bytes[at + 20] !== 0 && inFile(dataOffset, storedLength)) bytes.writeUInt32LE(crc32(bytes.subarray(dataOffset, dataOffset + storedLength), seed), at + 16)
  }
  if (chunkCount < 1 << 20 && inFile(indexOffset, chunkCount * INDEX_ENTRY_SIZE)) {
    for (let c = 0; c < chunkCount; c++) resealEntry(indexOffset + c * INDEX_ENTRY_SIZE, BoundKind.Chunk, c)
  }
  const packed = layout.packed
  if (packed && layout.packedCrcAt !== undefined && inFile(packed.offset, packed.length)) {
    const listAt = packed.offset + packed.blocks * PACKED_BLOCK_ENTRY_SIZE
    for (let b = 0; b < packed.blocks; b++) {
      const at = packed.offset + b * PACKED_BLOCK_ENTRY_SIZE
      // The pages the (mutated) entry lists, as a reader that accepted the table would bind it to.
      const listStart = bytes.readUInt32LE(at + 24)
      const count = Math.max(0, Math.min(bytes.readUInt32LE(at + 28), packed.pages - listStart))
      const pages = inFile(listAt + 4 * listStart, 4 * count) ? Uint32Array.from({length: count}, (_, i) => bytes.readUInt32LE(listAt + 4 * (listStart + i))) : new Uint32Array(0)
      resealEntry(at, BoundKind.PackedBlock, b, pages)
    }
    bytes.write(crc32(bytes.subarray(packed.offset, packed.offset + packed.length)).toString(16).padStart(8, '0'), layout.packedCrcAt, 'latin1')
  }
  // The header's CRC where its size field says it is (if that lies in the file), and at the base's.
  let headerCrc: number | undefined
  for (const headerSize of new Set([bytes.readUInt32LE(12), layout.headerSize])) {
    if (headerSize % 8 === 0 && headerSize >= 72 && headerSize <= F) {
      const crc = crc32(bytes.subarray(0, headerSize - 8))
      bytes.writeUInt32LE(crc, headerSize - 8)
      if (headerSize === bytes.readUInt32LE(12)) headerCrc = crc
    }
  }
  if (headerCrc !== undefined) bytes.writeUInt32LE(headerCrc, F + 48)
  if (chunkCount < 1 << 20 && inFile(indexOffset, chunkCount * INDEX_ENTRY_SIZE)) bytes.writeUInt32LE(crc32(bytes.subarray(indexOffset, indexOffset + chunkCount * INDEX_ENTRY_SIZE)), F + 40)
  if (inFile(zeroMapOffset, zeroMapSize)) bytes.writeUInt32LE(crc32(bytes.subarray(zeroMapOffset, zeroMapOffset + zeroMapSize)), F + 44)
  bytes.writeUInt32LE(crc32(bytes.subarray(F, F + 60)), F + 60)
}

// ---------------------------------------------------------------------------------------------
// Snapshot mutations.

type Mutation = (bytes: Buffer, base: BaseSnapshot, rng: Rng) => {bytes: Buffer; how: string}

const randomMutations: Record<string, Mutation> = {
  flipBits(bytes, _base, rng) {
    const n = 1 + rng.int(8)
    const at: number[] = []
    for (let i = 0; i < n; i++) {
      const p = rng.int(bytes.length)
      bytes[p] ^= 1 << rng.int(8)
      at.push(p)
    }
    return {bytes, how: `flip bits at ${at.join(',')}`}
  },
  setBytes(bytes, _base, rng) {
    const at = rng.int(bytes.length)
    const n = 1 + rng.int(16)
    rng.bytes(n).copy(bytes, at)
    return {bytes, how: `random bytes at ${at}+${n}`}
  },
  truncate(bytes, base, rng) {
    const cuts = [0, 1, 7, 8, 63, 64, 71, 72, base.layout.headerSize - 1, base.layout.headerSize, bytes.length - 65, bytes.length - 64, bytes.length - 1, rng.int(bytes.length)]
    const length = Math.max(0, Math.min(bytes.length, rng.pick(cuts)))
    return {bytes: bytes.subarray(0, length), how: `truncate to ${length}`}
  },
  extend(bytes, _base, rng) {
    const n = 1 + rng.int(4096)
    return {bytes: Buffer.concat([bytes, rng.chance(0.5) ? Buffer.alloc(n) : rng.bytes(n)]), how: `append ${n} bytes`}
  },
  cutRange(bytes, _base, rng) {
    const at = rng.int(bytes.length)
    const n = 1 + rng.int(Math.min(8192, bytes.length - at))
    return {bytes: Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + n)]), how: `delete ${at}+${n}`}
  },
  insertRange(bytes, _base, rng) {
    const at = rng.int(bytes.length)
    const n = 1 + rng.int(512)
    return {bytes: Buffer.concat([bytes.subarray(0, at), rng.bytes(n), bytes.subarray(at)]), how: `insert ${n} at ${at}`}
  },
  copyRange(bytes, _base, rng) {
    const from = rng.int(bytes.length)
    const to = rng.int(bytes.length)
    const n = Math.min(1 + rng.int(256), bytes.length - from, bytes.length - to)
    bytes.copy(bytes, to, from, from + n)
    return {bytes, how: `copy ${from}+${n} to ${to}`}
  },
}

/** Crafted mutations: each is followed by reseal(), so the checksums agree with the change. */
const craftedMutations: Record<string, Mutation> = {
  field(bytes, base, rng) {
    const fields = base.layout.fields
    const n = 1 + (rng.chance(0.25) ? rng.int(3) : 0)
    const done: string[] = []
    for (let i = 0; i < n; i++) {
      const f = rng.pick(fields)
      const others = [rng.pick(fields), rng.pick(fields)].map((o) => readField(bytes, o))
      const value = tellingValue(rng, f, readField(bytes, f), bytes.length, others)
      writeField(bytes, f, value)
      done.push(`${f.name}=${BigInt.asUintN(f.width * 8, value)}`)
    }
    return {bytes, how: `set ${done.join(', ')}`}
  },
  zeroMap(bytes, _base, rng) {
    const F = bytes.length - FOOTER_SIZE
    const at = Number(bytes.readBigUInt64LE(F + 24))
    const size = Number(bytes.readBigUInt64LE(F + 32))
    const flips: number[] = []
    for (let i = 0, n = 1 + rng.int(4); i < n; i++) {
      const bit = rng.int(size * 8)
      bytes[at + (bit >> 3)] ^= 1 << (bit & 7)
      flips.push(bit)
    }
    return {bytes, how: `zero map bits ${flips.join(',')}`}
  },
  storedBytes(bytes, base, rng) {
    // A chunk's or packed block's stored bytes, changed: its CRC is recomputed, so the decoder
    // (zstd, lz4, or raw) gets data that passed the checksum.
    const entries = base.layout.fields.filter((f) => f.name.endsWith(' data_offset')).map((f) => f.at)
    const at = rng.pick(entries)
    const dataOffset = Number(bytes.readBigUInt64LE(at))
    const storedLength = bytes.readUInt32LE(at + 8)
    if (bytes[at + 20] === 0 || storedLength === 0) return {bytes, how: 'stored bytes of an all-zero unit (unchanged)'}
    const kind = rng.int(4)
    if (kind === 0) {
      for (let i = 0, n = 1 + rng.int(4); i < n; i++) bytes[dataOffset + rng.int(storedLength)] ^= 1 << rng.int(8)
    } else if (kind === 1) {
      const from = rng.int(storedLength)
      rng.bytes(Math.min(storedLength - from, 1 + rng.int(64))).copy(bytes, dataOffset + from)
    } else if (kind === 2) {
      bytes.fill(rng.pick([0, 0xff]), dataOffset + rng.int(storedLength), dataOffset + storedLength)
    } else {
      // Shorter stored length: the same prefix, a frame cut short.
      bytes.writeUInt32LE(rng.int(storedLength), at + 8)
    }
    return {bytes, how: `stored bytes of the unit at index ${at} (${['flip', 'random', 'fill', 'shorten'][kind]})`}
  },
  metadata(bytes, base, rng) {
    // Same-length edits, so the header's layout holds: digits of the working-set location and
    // chunk list, or any character, into JSON's punctuation or invalid UTF-8.
    const {metadataAt, metadataEnd} = base.layout
    const text = bytes.toString('latin1', metadataAt, metadataEnd)
    const digits = [...text.matchAll(/\d/g)].map((m) => m.index!)
    const at = rng.chance(0.6) && digits.length > 0 ? rng.pick(digits) : rng.int(text.length)
    const replacement = rng.chance(0.6) ? rng.pick([...'0123456789']) : rng.pick(['"', '{', '}', '[', ']', ',', ':', '-', '.', 'e', '\\', 'n', '\xff', '\x00', ' '])
    bytes.write(replacement, metadataAt + at, 'latin1')
    return {bytes, how: `metadata[${at}] ${JSON.stringify(text[at])} -> ${JSON.stringify(replacement)}`}
  },
}

/** Mutated case `index` of `seed`: the same bytes every time. */
export function snapshotCase(corpus: Corpus, seed: number, index: number, from = corpus.snapshots): {bytes: Buffer; how: string; base: BaseSnapshot} {
  const rng = new Rng(seed, index)
  const base = rng.pick(from)
  let bytes: Buffer = Buffer.from(base.bytes)
  const hows: string[] = []
  const roll = rng.int(100)
  if (roll < 40) {
    const name = rng.pick(Object.keys(randomMutations))
    const r = randomMutations[name](bytes, base, rng)
    bytes = r.bytes
    hows.push(r.how)
  } else {
    const names = Object.keys(craftedMutations)
    const weighted = [...names, 'field', 'field', 'storedBytes']
    for (let i = 0, n = rng.chance(0.15) ? 2 : 1; i < n; i++) {
      const r = craftedMutations[rng.pick(weighted)](bytes, base, rng)
      bytes = r.bytes
      hows.push(r.how)
    }
    reseal(bytes, base.layout)
    hows.push('resealed')
    // Now and then a random change on top, past the recomputed checksums.
    if (rng.chance(0.1)) {
      const r = randomMutations.flipBits(bytes, base, rng)
      bytes = r.bytes
      hows.push(r.how)
    }
  }
  return {bytes, how: `${base.name}: ${hows.join('; ')}`, base}
}

/**
 * Case `index` of `seed` that moves units (docs/FORMAT.md, Bound units): one to three index or
 * packed-table entries given another entry's stored bytes (offset, length, CRC and codec, as an
 * attacker copies them), and every structure's checksum recomputed, but no unit's: what binding
 * is for. checkMoved then requires each to be refused, or read as exactly the image.
 */
export function movedUnitCase(corpus: Corpus, seed: number, index: number): {bytes: Buffer; how: string; base: BaseSnapshot} {
  const rng = new Rng(seed, 2_000_000 + index)
  const base = rng.pick(corpus.snapshots)
  const bytes = Buffer.from(base.bytes)
  const entries = base.layout.fields.filter((f) => f.name.endsWith(' data_offset')).map((f) => ({name: f.name.replace(/ data_offset$/, ''), at: f.at}))
  const hows: string[] = []
  for (let i = 0, n = 1 + rng.int(3); i < n; i++) {
    const to = rng.pick(entries)
    const from = rng.pick(entries)
    bytes.copy(bytes, to.at, from.at, from.at + 12)
    bytes.copy(bytes, to.at + 16, from.at + 16, from.at + 21)
    hows.push(`${to.name} given the bytes of ${from.name}`)
  }
  reseal(bytes, base.layout, false)
  return {bytes, how: `${base.name}: ${hows.join('; ')}; structures resealed`, base}
}

/**
 * A moved-units case (movedUnitCase) read in-process: refused, or every chunk and packed block
 * read as the image the base snapshot holds. Reading another place's bytes is a crash.
 */
export function checkMoved(bytes: Buffer, name: string, base: BaseSnapshot): Outcome {
  const original = SnapshotReader.fromSource(new MemorySource(base.name, base.bytes))
  let image: Buffer
  try {
    image = decodeImage(original)
  } finally {
    original.close()
  }
  let reader: SnapshotReader
  try {
    reader = SnapshotReader.fromSource(new MemorySource(name, bytes))
  } catch (error) {
    return refusal(error, 'open')
  }
  try {
    return attempt('read', () => {
      if (!decodeImage(reader).equals(image)) throw new FuzzCrash('moved unit', new Error('a chunk was read with another place\'s bytes'))
      const {packed, geometry, zeroMap} = reader
      for (let b = 0; b < (packed?.blocks.length ?? 0); b++) {
        const block = packed!.blocks[b]
        const payload = reader.readPayload(reader.packedUnit(b))
        let at = 0
        for (let k = block.listStart; k < block.listStart + block.pageCount; k++) {
          const p = packed!.pages[k]
          if (zeroMap.isZero(p)) continue
          const want = image.subarray(p * geometry.pageSize, Math.min(image.length, (p + 1) * geometry.pageSize))
          if (!payload.subarray(at, at + want.length).equals(want)) throw new FuzzCrash('moved unit', new Error(`packed block ${b} was read with another place's bytes`))
          at += geometry.pageSize
        }
      }
    })
  } finally {
    reader.close()
  }
}

// ---------------------------------------------------------------------------------------------
// Snapshot consumers.

/** A snapshot in memory, read like a file (and strict: a negative or partial read is a bug). */
class MemorySource implements ByteSource {
  readonly size: number
  constructor(
    readonly name: string,
    private readonly bytes: Buffer,
  ) {
    this.size = bytes.length
  }

  readAt(dst: Uint8Array, position: number): void {
    if (!Number.isSafeInteger(position) || position < 0) throw new RangeError(`read at position ${position}`)
    if (position + dst.length > this.size) throw new UffdError('TRUNCATED', `${this.name}: unexpected end of file at ${this.size} (wanted ${dst.length} bytes at ${position})`)
    this.bytes.copy(dst, 0, position, position + dst.length)
  }

  close(): void {}
}

/**
 * Everything that reads a snapshot, in-process: the reader's checks, `stats` (and its JSON),
 * `verify` (every chunk and packed block decoded), and what `resume` derives from it at start-up
 * (the payload index, the packed blocks' runs). The first refusal ends the case; verify's list of
 * problems is its result, not a refusal.
 */
export function checkSnapshot(bytes: Buffer, name: string, sealed?: BaseSnapshot['sealed']): Outcome {
  let reader: SnapshotReader
  try {
    reader = SnapshotReader.fromSource(new MemorySource(name, bytes), sealed?.keys)
  } catch (error) {
    return refusal(error, 'open')
  }
  try {
    const stats = attempt('stats', () => {
      JSON.stringify(snapshotStats(reader, name))
      attachedWorkingSet(reader)
    })
    if (stats !== 'OK') return stats
    let verified: ReturnType<typeof verifySnapshot> | undefined
    const verify = attempt('verify', () => {
      verified = verifySnapshot(reader, name)
    })
    if (verify !== 'OK') return verify
    const startUp = attempt('resume start-up', () => {
      if (reader.packed) {
        zeroRunWindowBytes(reader.packed)
        for (let b = 0; b < reader.packed.blocks.length; b++) packedBlockRuns(reader.packed, b, reader.zeroMap)
      }
    })
    if (startUp !== 'OK') return startUp
    if (!verified!.ok) return 'VERIFY_FAILED'
    // A sealed file that opens and verifies is, byte for byte, the image it was sealed from.
    if (sealed && !decodeImage(reader).equals(sealed.image)) throw new FuzzCrash('sealed read', new Error('a sealed file was accepted and read as another image'))
    return 'OK'
  } finally {
    reader.close()
  }
}

/**
 * `working-set attach` of a set recorded on this (mutated) snapshot: its identity taken from the
 * snapshot, as a recording would, so the attach gets past checkMatches to the relayout.
 */
export function checkAttach(bytes: Buffer, dir: string, rng: Rng): Outcome {
  const file = path.join(dir, 'attach-in.uffd')
  const out = path.join(dir, 'attach-out.uffd')
  fs.writeFileSync(file, bytes)
  let reader: SnapshotReader
  try {
    reader = SnapshotReader.open(file)
  } catch (error) {
    return refusal(error, 'attach: open')
  }
  const {geometry, header} = reader
  reader.close()
  const pages = [...new Set(Array.from({length: 1 + rng.int(24)}, () => rng.int(geometry.pageCount)))]
  const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: geometry.logicalSize, pageSize: geometry.pageSize, headerCrc: header.headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}
  return attempt('attach', () => {
    const parsed = parseWorkingSet(JSON.stringify(set), 'set.ws')
    checkMatches(parsed, set.snapshot, 'set.ws')
    attachWorkingSet(file, out, parsed, packOptionsFor(header.metadata, rng.pick([undefined, 'zstd', 'lz4', 'raw', 'none'])))
    const attached = SnapshotReader.open(out)
    try {
      verifySnapshot(attached, out)
    } finally {
      attached.close()
    }
  })
}

// ---------------------------------------------------------------------------------------------
// JSON mutations (working sets, stats files).

const TELLING_JSON: unknown[] = [null, true, false, 0, -1, 1, 1.5, -0.5, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, 1e308, -1e308, '', 'x', 'many', '1', [], [1, 2], {}, {a: 1}]

/** Paths to every value of `value` (a few elements of each array), root included. */
function pathsOf(value: unknown, rng: Rng, prefix: (string | number)[] = [], out: (string | number)[][] = []): (string | number)[][] {
  out.push(prefix)
  if (Array.isArray(value)) {
    const picks = value.length <= 4 ? value.keys() : new Set([0, value.length - 1, rng.int(value.length), rng.int(value.length)])
    for (const i of picks) pathsOf(value[i], rng, [...prefix, i], out)
  } else if (typeof value === 'object' && value !== null) {
    for (const k of Object.keys(value)) pathsOf((value as Record<string, unknown>)[k], rng, [...prefix, k], out)
  }
  return out
}

function getAt(root: unknown, p: readonly (string | number)[]): unknown {
  return p.reduce<unknown>((v, k) => (v as Record<string | number, unknown>)?.[k], root)
}

/** `root` (a JSON value) with one value changed: replaced, removed, grown, doubled or made huge. */
export function mutateJson(root: unknown, rng: Rng): {value: unknown; how: string} {
  const value = structuredClone(root)
  const paths = pathsOf(value, rng)
  const p = rng.pick(paths)
  const where = p.join('.') || '(root)'
  const parent = p.length ? getAt(value, p.slice(0, -1)) : undefined
  const key = p[p.length - 1]
  const set = (v: unknown): unknown => {
    if (p.length === 0) return v
    ;(parent as Record<string | number, unknown>)[key] = v
    return value
  }
  const current = getAt(value, p)
  switch (rng.int(7)) {
    case 0:
    case 1: {
      const v = rng.pick(TELLING_JSON)
      return {value: set(structuredClone(v)), how: `${where} = ${JSON.stringify(v)}`}
    }
    case 2:
      if (p.length === 0) return {value: null, how: 'root = null'}
      if (Array.isArray(parent)) parent.splice(key as number, 1)
      else delete (parent as Record<string, unknown>)[key as string]
      return {value, how: `remove ${where}`}
    case 3:
      if (typeof current === 'number') {
        const v = rng.pick([current + 1, current - 1, -current, current * 1000, current + 0.5, Math.floor(current / 2)])
        return {value: set(v), how: `${where} = ${v}`}
      }
      return {value: set([current]), how: `${where} wrapped in an array`}
    case 4:
      if (Array.isArray(current)) {
        const n = rng.pick([0, 1, current.length + 1, 100_000])
        const grown = n === 0 ? [] : Array.from({length: n}, (_, i) => current[i % Math.max(1, current.length)] ?? i)
        return {value: set(grown), how: `${where} resized to ${n}`}
      }
      return {value: set(JSON.stringify(current) ?? ''), how: `${where} as a string`}
    case 5:
      if (Array.isArray(current) && current.length > 0) {
        current.push(current[rng.int(current.length)])
        return {value, how: `${where}: an element twice`}
      }
      return {value: set({nested: current}), how: `${where} nested in an object`}
    default: {
      if (typeof value === 'object' && value !== null && !Array.isArray(value)) (value as Record<string, unknown>)[rng.pick(['extra', 'constructor', 'toString', 'kind2'])] = rng.pick(TELLING_JSON)
      return {value, how: 'an extra key'}
    }
  }
}

/** `text` with a few characters changed, cut or added (not JSON any more, or other JSON). */
function mutateText(text: string, rng: Rng): {text: string; how: string} {
  const at = rng.int(text.length)
  switch (rng.int(5)) {
    case 0:
      return {text: text.slice(0, at), how: `cut at ${at}`}
    case 4:
      // An own key __proto__, as JSON.parse makes it (an assignment would set the prototype).
      return {text: text.replace('{', `{"__proto__":${JSON.stringify(rng.pick(TELLING_JSON))},`), how: 'a __proto__ key'}
    case 1:
      return {text: text.slice(0, at) + rng.pick(['{', '}', '[', ']', '"', ',', '-', '9', '\u0000', '\ud800', 'e999']) + text.slice(at + 1), how: `character ${at} replaced`}
    case 2:
      return {text: `${'['.repeat(100_000)}${']'.repeat(100_000)}`, how: 'deeply nested arrays'}
    default:
      return {text: text.slice(0, at) + text.slice(at, at + 1 + rng.int(40)).repeat(2) + text.slice(at + 1 + rng.int(40)), how: `a span at ${at} doubled`}
  }
}

export function jsonCase(text: string, seed: number, index: number, stream: number): {text: string; how: string} {
  const rng = new Rng(seed, index * 8 + stream)
  if (rng.chance(0.25)) return mutateText(text, rng)
  let value: unknown = JSON.parse(text)
  const hows: string[] = []
  for (let i = 0, n = 1 + (rng.chance(0.3) ? rng.int(3) : 0); i < n; i++) {
    const r = mutateJson(value, rng)
    value = r.value
    hows.push(r.how)
  }
  return {text: JSON.stringify(value), how: hows.join('; ')}
}

/**
 * A mutated working set through what reads one: parsing (the schema), merging with the valid set,
 * the identity check against its snapshot, the chunk order prefetch uses, and (every
 * `attachEvery`-th case) attaching it to the snapshot.
 */
export function checkWorkingSet(corpus: Corpus, text: string, dir: string, attach: boolean): Outcome {
  const file = path.join(dir, 'mutated.ws')
  let set: WorkingSetFile
  try {
    set = parseWorkingSet(text, file)
  } catch (error) {
    return refusal(error, 'parse')
  }
  const snapshot = corpus.snapshots[0]
  const merge = attempt('merge', () => {
    for (const mode of ['union', 'majority'] as const) mergeWorkingSets([corpus.workingSet.set, set], mode, [corpus.workingSet.file, file])
  })
  if (merge !== 'OK') return merge
  return attempt('attach', () => {
    checkMatches(set, corpus.workingSet.set.snapshot, file)
    chunksInTouchOrder(set.pages, 16)
    if (attach) attachWorkingSet(snapshot.file, path.join(dir, 'ws-attached.uffd'), set, {codec: 'zstd', level: 1})
  })
}

/**
 * A mutated --stats-file through `uffd stats FILE`: a report (rendered, printed as JSON), or no
 * report (then it is read as a snapshot, which must refuse it), or a refusal naming the field.
 */
export function checkStatsFile(text: string, dir: string): Outcome {
  const file = path.join(dir, 'mutated.json')
  fs.writeFileSync(file, text)
  let report: ReturnType<typeof readResumeReport>
  try {
    report = readResumeReport(file)
  } catch (error) {
    return refusal(error, 'read report')
  }
  if (report === undefined) {
    return attempt('read as a snapshot', () => {
      SnapshotReader.open(file).close()
      throw new FuzzCrash('read as a snapshot', new Error('a mutated stats file opened as a snapshot'))
    })
  }
  return attempt('render', () => {
    const lines = renderResumeReport(file, report)
    JSON.stringify(report)
    for (const line of lines) {
      if (/\bundefined\b|\bNaN\b|\[object Object\]/.test(line.slice(12))) throw new FuzzCrash('render', new Error(`rendered ${JSON.stringify(line)}`))
    }
  })
}

// ---------------------------------------------------------------------------------------------
// Through the CLI.

/**
 * One uffd command as a process: exit 0 or 1 (2 for USAGE), a JSON document on stdout whose
 * error code is documented and not INTERNAL, no stack trace on stderr, within `timeoutMs`.
 */
export function checkCli(args: string[], timeoutMs = 60_000): Outcome {
  const r = spawnSync(process.execPath, [UFFD_BIN, ...args, '--json'], {encoding: 'utf8', timeout: timeoutMs, env: cliEnv(), maxBuffer: 256 * 1024 * 1024})
  const where = `uffd ${args.join(' ')}`
  if (r.signal) throw new FuzzCrash(where, new Error(`ended by ${r.signal}${r.signal === 'SIGTERM' ? ` (a hang: over ${timeoutMs} ms)` : ''}`))
  if (/\n\s+at .*\.(js|ts):\d+/.test(r.stderr) || /TypeError|RangeError|Maximum call stack/.test(r.stderr)) throw new FuzzCrash(where, new Error(`stderr: ${r.stderr.slice(0, 2000)}`))
  let json: any
  try {
    json = JSON.parse(r.stdout)
  } catch {
    throw new FuzzCrash(where, new Error(`exit ${r.status}, stdout is not JSON: ${r.stdout.slice(0, 500)} ${r.stderr.slice(0, 500)}`))
  }
  const code = json?.error?.code as unknown
  if (r.status === 0) return 'OK'
  if (r.status === 1 && code === undefined && json?.ok === false) return 'VERIFY_FAILED'
  if ((r.status === 1 || r.status === 2) && ((isErrorCode(code) && code !== 'INTERNAL') || isErrnoName(code))) return code as string
  throw new FuzzCrash(where, new Error(`exit ${r.status}, ${r.stdout.slice(0, 1000)}`))
}
