import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import {type ChunkEntry, encodeFooter, encodeIndex} from '../format/index-table.js'
import {ManifestPart} from '../format/seal.js'
import {type ZeroMap} from '../format/zero-map.js'
import {onFile} from '../sys/errors.js'
import {fsyncDir} from '../sys/file.js'
import {type OutputSink} from './output-sink.js'
import {type FileSealer} from './sealing.js'

/**
 * Snapshots hold a memory image (keys, passwords of the process or guest): readable by their
 * owner only unless asked otherwise.
 */
export const SNAPSHOT_MODE = 0o600

export interface FileMode {
  /** Exactly these permission bits (fchmod, so the umask does not apply). */
  mode?: number
  /** Without `mode`: the bits to create the file with, less the umask. */
  createMode?: number
}

export interface AtomicFileOptions extends FileMode {
  /**
   * The path errors name [default: the destination]: the user's output when the destination is
   * itself an intermediate file.
   */
  name?: string
}

/**
 * A file written by appending to a temporary file next to its destination, then fsync'd and
 * renamed over it: readers see the old file or the complete new one, never a part. discard()
 * (after any failure) removes the temporary file and changes nothing else. Its errors name the
 * destination (or `options.name`), never the temporary file, which the user has never heard of.
 */
export class AtomicFile implements OutputSink {
  size = 0
  private fd: number | undefined
  private readonly tempPath: string
  private readonly name: string

  constructor(
    readonly destination: string,
    options: AtomicFileOptions = {},
  ) {
    this.name = options.name ?? destination
    const dir = path.dirname(path.resolve(destination))
    this.tempPath = path.join(dir, temporaryName(destination, process.pid))
    this.fd = onFile(this.name, 'creating', () => fs.openSync(this.tempPath, 'wx+', options.mode ?? options.createMode ?? SNAPSHOT_MODE))
    try {
      if (options.mode !== undefined) onFile(this.name, 'setting the mode of', () => fs.fchmodSync(this.fd!, options.mode!))
    } catch (error) {
      this.discard()
      throw error
    }
  }

  append(bytes: Uint8Array): number {
    const at = this.size
    let done = 0
    onFile(this.name, 'writing', () => {
      while (done < bytes.length) done += fs.writeSync(this.fd!, bytes, done, bytes.length - done, at + done)
    })
    this.size += bytes.length
    return at
  }

  /** Writes are synchronous: there is never anything to wait for. */
  async drain(): Promise<void> {}

  readBack(position: number, length: number): Buffer {
    const buf = Buffer.alloc(length)
    let done = 0
    onFile(this.name, 'reading back', () => {
      while (done < length) done += fs.readSync(this.fd!, buf, done, length - done, position + done)
    })
    return buf
  }

  commit(): void {
    onFile(this.name, 'writing', () => fs.fsyncSync(this.fd!))
    // Linux frees the descriptor even when close fails: discard() must not close it again.
    const fd = this.fd!
    this.fd = undefined
    onFile(this.name, 'writing', () => fs.closeSync(fd))
    onFile(this.name, 'writing', () => fs.renameSync(this.tempPath, this.destination))
    fsyncDir(path.dirname(path.resolve(this.destination)))
  }

  /** Removes the temporary file unless committed; safe to call more than once. */
  discard(): void {
    if (this.fd === undefined && !fs.existsSync(this.tempPath)) return
    if (this.fd !== undefined) fs.closeSync(this.fd)
    this.fd = undefined
    fs.rmSync(this.tempPath, {force: true})
  }
}

/** How a file being written is sealed, for its tail: see FileSealer.record. */
export interface TailSeal {
  sealer: FileSealer
  /** The file's other structures the manifest covers (packed table, layer tables, learned runs), in part order. */
  parts: {part: ManifestPart; bytes: Uint8Array}[]
  /** Signed files: every unit's digest (UNIT_DIGEST_BYTES each, in unit order). */
  unitDigests?: Buffer
  /** Units after the chunks (packed or layer blocks). */
  blocks: number
}

/**
 * Appends the chunk index, the zero map and the footer that finds them: the end of every snapshot.
 * A sealed or signed file has its unit digest table (signed) and seal record between the zero map
 * and the footer (docs/FORMAT.md, Sealed snapshots).
 */
export function appendTail(file: OutputSink, entries: readonly ChunkEntry[], zeroMap: ZeroMap, header: Buffer, seal?: TailSeal): void {
  const sealed = seal?.sealer.encrypted ?? false
  const index = encodeIndex(entries, sealed)
  const indexOffset = file.append(index)
  const zeroMapOffset = file.append(zeroMap.bytes)
  const footer = encodeFooter({
    indexOffset,
    chunkCount: entries.length,
    zeroMapOffset,
    zeroMapSize: zeroMap.bytes.length,
    indexCrc: crc32(index),
    zeroMapCrc: crc32(zeroMap.bytes),
    headerCrc: header.readUInt32LE(header.length - 8),
  })
  if (seal) {
    // Units: the chunks, then the blocks (a packed set's or a layer's).
    const keyTable = seal.sealer.keyTable(entries.length + seal.blocks)
    if (keyTable) file.append(keyTable)
    const digests = seal.sealer.signed ? (seal.unitDigests ?? Buffer.alloc(0)) : undefined
    if (digests) file.append(digests)
    const parts = [
      {part: ManifestPart.Header, bytes: header},
      {part: ManifestPart.Footer, bytes: footer},
      {part: ManifestPart.Index, bytes: index},
      {part: ManifestPart.ZeroMap, bytes: zeroMap.bytes},
      ...seal.parts,
      ...(digests ? [{part: ManifestPart.UnitDigests, bytes: digests}] : []),
      ...(keyTable ? [{part: ManifestPart.KeyTable, bytes: keyTable}] : []),
    ]
    file.append(seal.sealer.record(parts))
  }
  file.append(footer)
}

/**
 * Writes a small file atomically (a ready file, statistics, a working set). They hold page
 * numbers and timings, no memory contents: created 0644 less the umask, like any tool's output.
 */
export function writeFileAtomically(file: string, text: string): void {
  const out = new AtomicFile(file, {createMode: 0o644})
  try {
    out.append(Buffer.from(text))
    out.commit()
  } finally {
    out.discard()
  }
}

/** The name of the temporary an AtomicFile of process `pid` writes `destination` through. */
function temporaryName(destination: string, pid: number): string {
  return `.${path.basename(destination)}.${pid}.${Date.now().toString(36)}.tmp`
}

/**
 * Removes the temporaries of `destination` left by processes that no longer run (killed with
 * SIGKILL mid-write: nothing else removes them, and each can be as large as the file). A
 * temporary of a live process is its write in progress and is left alone. Returns the names
 * removed. (On a filesystem shared between hosts another host's pid may look dead here; its
 * writer then fails at its rename, it never publishes a partial file.)
 */
export function removeStaleTemporaries(destination: string): string[] {
  const dir = path.dirname(path.resolve(destination))
  const prefix = `.${path.basename(destination)}.`
  const removed: string[] = []
  for (const name of fs.readdirSync(dir)) {
    if (!name.startsWith(prefix) || !name.endsWith('.tmp')) continue
    const match = /^(\d+)\.[0-9a-z]+\.tmp$/.exec(name.slice(prefix.length))
    if (!match || processRuns(Number(match[1]))) continue
    fs.rmSync(path.join(dir, name), {force: true})
    removed.push(name)
  }
  return removed
}

function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    // EPERM: it runs, as another user.
    return (error as NodeJS.ErrnoException).code !== 'ESRCH'
  }
}
