// bench/codecs.ts: choose the snapshot defaults (codec, level, chunk size) on a real guest-RAM image.
//
//   node --import tsx bench/codecs.ts --image PATH [--runs 3] [--chunks 64K,128K,256K,1M,2M,4M]
//        [--codecs zstd:-5,zstd:-3,zstd:-1,zstd:1,zstd:2,zstd:3,lz4] [--workers 2] [--no-cli] [--no-verify] [--out DIR]
//
// It models how the snapshot format (docs/FORMAT.md, src/snapshot/) stores memory:
//   - the image is cut into chunks of C bytes; inside a chunk every all-zero 4 KiB page is dropped (a
//     page-level zero map records it; it is never stored); an all-zero chunk stores nothing;
//   - the remaining pages of a chunk are concatenated into a payload that is compressed on its own:
//     zstd-napi's low-level binding (`new CCtx()`, level and content checksum set as parameters,
//     `compress2` into a preallocated compressBound-sized buffer, exactly as src/snapshot/codecs.ts
//     does), or lz4-napi `compressSync` (block format, 4-byte size prefix); a payload whose
//     compressed form is not smaller than the payload is stored raw;
//   - the stored bytes get a CRC-32; stored bytes identical to an earlier chunk's are stored once;
//     the file adds a 32-byte index entry per chunk, the zero map (1 bit per page) and ~0.5 KiB of
//     header, metadata and footer.
// zstd levels are the library's: zstd:1 is the level of `zstd -1` on the command line, zstd:-1 that of
// `zstd --fast=1`.
//
// Per run, side by side, it measures:
//   - the command lines on the whole file (`zstd -1 -T2`, `zstd -1`, `zstd -1 --single-thread`,
//     `lz4 -1`, each `... -c FILE | wc -c`): output size, wall time and CPU time (bash `times`), once
//     before and once after the configurations (a run's baseline is the mean of the two);
//   - reading the cached file and the zero-page scan, on one thread;
//   - for each (chunk size, codec): stored bytes; one-thread encoding (gather + compress + CRC +
//     dedup + copy out); the whole pipeline in N worker threads (pread + scan + gather + compress +
//     CRC + copy out per chunk, chunks dealt round robin), as `uffd snapshot` runs it; reading back
//     every compressed chunk as the reader does (CRC-32 check, then zstd `DCtx.decompress` into a
//     preallocated buffer, or lz4 `uncompressSync` and a copy), and the CRC share alone.
// Times are taken as wall time and as CPU time of the measuring thread (/proc/thread-self/schedstat):
// on a shared 2-core machine CPU time is the steadier measure. Each speed is also given as a ratio to
// `zstd -1 -T2` measured in the same run; the report shows medians over runs. The tables go to stdout,
// everything (with per-run raw figures) to bench/results/codecs-<timestamp>.json. The first run checks
// that every stored chunk decodes back to its payload (--no-verify skips that).
//
// Units: MB/s and GB/s are 10^6 and 10^9 bytes per second (of logical image for compression, of
// payload for decompression); sizes are MiB (2^20 bytes).

import {spawnSync} from 'node:child_process'
import {closeSync, fstatSync, mkdirSync, openSync, readFileSync, readSync, writeFileSync} from 'node:fs'
import {createRequire} from 'node:module'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath, pathToFileURL} from 'node:url'
import {Worker, isMainThread, parentPort, workerData} from 'node:worker_threads'
import {crc32} from 'node:zlib'
import type * as ZstdBinding from 'zstd-napi/binding.js'


type Lz4Module = typeof import('lz4-napi')
// Only the main thread decodes; the pipeline's workers must not load koffi (src/sys), which now
// and then aborted a process that started and ended many workers that loaded it.
const sysLz4 = isMainThread ? await import('../src/sys/lz4.js') : undefined

const require = createRequire(import.meta.url)
const zstd = require('zstd-napi/binding') as typeof ZstdBinding
const lz4 = require('lz4-napi') as Lz4Module

const PAGE = 4096
const ZERO_PAGE = Buffer.alloc(PAGE)
const MiB = 1 << 20

// Constants of the latency model, from the platform measurements (/work/shared/reference/platform.md; same-CPU handler).
const FAULT_ROUNDTRIP_US = 10 // one fault round trip, handler and faulter on the same CPU
const UFFDIO_COPY_US_PER_MIB = 0.4e6 / 1024 // ~310-480 ms per GiB with 64 KiB ioctls -> ~0.39 ms/MiB
const UFFDIO_ZEROPAGE_US_PER_MIB = 35e3 / 1024 // ~30-40 ms per GiB

/**
 * CPU time of the calling thread in ms (/proc/thread-self/schedstat, ns precision): under the CPU
 * contention of a shared 2-core machine it is far steadier than wall time. Falls back to the
 * process's CPU time where schedstat is missing.
 */
function threadCpuMs(): number {
  try {
    return Number(readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ')[0]) / 1e6
  } catch {
    const u = process.cpuUsage()
    return (u.user + u.system) / 1e3
  }
}

/** Wall and CPU time of f, in ms. */
function timed<T>(f: () => T): {value: T; ms: number; cpuMs: number} {
  const c0 = threadCpuMs()
  const t0 = performance.now()
  const value = f()
  const ms = performance.now() - t0
  return {value, ms, cpuMs: threadCpuMs() - c0}
}

// ---------------------------------------------------------------------------------------------
// Codecs

interface CodecSpec {
  id: string // "zstd:-1", "lz4"
  kind: 'zstd' | 'lz4'
  level: number // zstd level; 0 for lz4 (no level)
}

interface Codec {
  spec: CodecSpec
  /** Compress src; return a view of the compressed bytes (valid until the next call). */
  compress(src: Buffer): Buffer
  /**
   * Decode a stored compressed payload into dst[0, payloadLen) the way the snapshot reader does
   * (src/snapshot/decompressor.ts ChunkDecompressor); returns the bytes produced.
   */
  decompress(src: Buffer, dst: Buffer, payloadLen: number): number
}

function parseCodec(s: string): CodecSpec {
  if (s === 'lz4') return {id: 'lz4', kind: 'lz4', level: 0}
  const m = /^zstd:(-?\d+)$/.exec(s)
  if (!m) throw new Error(`bad codec ${s} (want lz4 or zstd:LEVEL)`)
  return {id: s, kind: 'zstd', level: Number(m[1])}
}

function makeCodec(spec: CodecSpec, maxPayload: number): Codec {
  if (spec.kind === 'zstd') {
    // As `uffd snapshot` writes zstd chunks (src/snapshot/codecs.ts): the level and the content
    // checksum (XXH64 of the decoded bytes, 4 bytes per frame, verified by zstd while decoding) as
    // sticky parameters, then compress2. (CCtx.compress(dst, src, level) would ignore the checksum
    // flag; with it off the frames are 4 bytes shorter and decoding skips the XXH64.)
    const cctx = new zstd.CCtx()
    cctx.setParameter(zstd.CParameter.compressionLevel, spec.level)
    cctx.setParameter(zstd.CParameter.checksumFlag, 1)
    const dctx = new zstd.DCtx()
    const dst = Buffer.alloc(zstd.compressBound(maxPayload)) // alloc (not allocUnsafe): pre-touched
    return {
      spec,
      compress(src) {
        const n = cctx.compress2(dst, src)
        return dst.subarray(0, n)
      },
      decompress(src, out, payloadLen) {
        const size = zstd.getFrameContentSize(src)
        if (size !== null && size !== payloadLen) throw new Error(`zstd frame declares ${size}, expected ${payloadLen}`)
        return dctx.decompress(out.subarray(0, payloadLen), src)
      },
    }
  }
  return {
    spec,
    compress(src) {
      return lz4.compressSync(src)
    },
    decompress(src, out, payloadLen) {
      // As the reader does: the system's liblz4 decodes in place; lz4-napi (the fallback)
      // allocates, and the reader copies.
      if (sysLz4?.hasSystemLz4) return sysLz4.lz4DecodeBlock(src.subarray(4), out.subarray(0, payloadLen))
      const d = lz4.uncompressSync(src)
      return d.copy(out, 0, 0, payloadLen)
    },
  }
}

// ---------------------------------------------------------------------------------------------
// The snapshot model

/** Zero map: one byte per 4 KiB page, 1 = all zero. */
function scanZeroPages(img: Buffer, zmap: Uint8Array, p0 = 0, p1 = zmap.length): void {
  for (let p = p0; p < p1; p++) {
    const off = p * PAGE
    zmap[p] = img.compare(ZERO_PAGE, 0, PAGE, off, off + PAGE) === 0 ? 1 : 0
  }
}

interface StoredChunks {
  /** per chunk: offset into the arena, stored length (0 = nothing stored), payload length, raw flag */
  off: Float64Array
  len: Uint32Array
  payloadLen: Uint32Array
  raw: Uint8Array
  crc: Uint32Array
  /** bytes written to the data section (identical stored bytes once) */
  storedBytes: number
  /** bytes before deduplication (what the workers produce) */
  encodedBytes: number
  dedupChunks: number
}

/**
 * Gather the non-zero pages of chunk ci into a payload (a view of the image when the chunk has no
 * zero page, else a copy into `gather`). Returns null for an all-zero chunk.
 */
function gatherPayload(img: Buffer, zmap: Uint8Array, ci: number, chunkPages: number, gather: Buffer): Buffer | null {
  const p0 = ci * chunkPages
  const p1 = Math.min(p0 + chunkPages, zmap.length)
  let nz = 0
  for (let p = p0; p < p1; p++) nz += zmap[p] ^ 1
  if (nz === 0) return null
  if (nz === p1 - p0) return img.subarray(p0 * PAGE, p1 * PAGE)
  let w = 0
  let p = p0
  while (p < p1) {
    if (zmap[p]) {
      p++
      continue
    }
    const runStart = p
    while (p < p1 && !zmap[p]) p++
    w += img.copy(gather, w, runStart * PAGE, p * PAGE)
  }
  return gather.subarray(0, w)
}

/**
 * Encode every chunk of the image the way `uffd snapshot` stores it (zero map given): compress the
 * payload, fall back to raw, CRC-32 the stored bytes; then, as the writer does, store bytes
 * identical to an earlier chunk's only once (candidates by crc and lengths, confirmed by comparing),
 * else append them to `arena`. With keep null only the encoding is modelled (arena used as a ring).
 */
function storeChunks(
  img: Buffer,
  zmap: Uint8Array,
  chunkSize: number,
  codec: Codec,
  arena: Buffer,
  gather: Buffer,
  keep: StoredChunks | null,
): number {
  const chunkPages = chunkSize / PAGE
  const nChunks = Math.ceil(zmap.length / chunkPages)
  const seen = new Map<string, number[]>()
  let pos = 0
  let stored = 0
  let encoded = 0
  let dedup = 0
  for (let ci = 0; ci < nChunks; ci++) {
    const payload = gatherPayload(img, zmap, ci, chunkPages, gather)
    if (payload === null) {
      if (keep) keep.len[ci] = 0
      continue
    }
    const c = codec.compress(payload)
    const raw = c.length >= payload.length
    const out = raw ? payload : c
    const crc = crc32(out)
    encoded += out.length
    if (!keep) {
      if (pos + out.length > arena.length) pos = 0
      out.copy(arena, pos)
      pos += out.length
      continue
    }
    const k = `${crc}:${payload.length}:${raw ? 1 : 0}:${out.length}`
    let at = -1
    const cands = seen.get(k)
    if (cands) {
      for (const e of cands) {
        if (arena.subarray(keep.off[e], keep.off[e] + keep.len[e]).equals(out)) {
          at = keep.off[e]
          break
        }
      }
    }
    if (at < 0) {
      at = pos
      out.copy(arena, pos)
      pos += out.length
      stored += out.length
      if (cands) cands.push(ci)
      else seen.set(k, [ci])
    } else {
      dedup++
    }
    keep.off[ci] = at
    keep.len[ci] = out.length
    keep.payloadLen[ci] = payload.length
    keep.raw[ci] = raw ? 1 : 0
    keep.crc[ci] = crc
  }
  if (keep) {
    keep.storedBytes = stored
    keep.encodedBytes = encoded
    keep.dedupChunks = dedup
  }
  return encoded
}

interface DecompressStats {
  compressedChunks: number
  rawChunks: number
  payloadBytes: number // of the compressed chunks
  cpuMs: number // CPU time of the whole loop: CRC-32 check + decode, as the reader does per chunk
  meanUs: number // CPU time per compressed chunk, CRC check included
  crcUs: number // of which the CRC-32 of the stored bytes (measured in a separate loop)
  decodeUs: number // meanUs - crcUs
  payloadGBps: number // payload bytes per CPU second of decoding (without the CRC)
  wallP50Us: number // per-chunk wall time (includes preemption by other load)
  wallP99Us: number
  wallMaxUs: number
}

function decompressAll(stored: StoredChunks, arena: Buffer, codec: Codec, out: Buffer): DecompressStats {
  const n = stored.len.length
  const times = new Float64Array(n)
  let k = 0
  let rawChunks = 0
  let payloadBytes = 0
  const c0 = threadCpuMs()
  for (let ci = 0; ci < n; ci++) {
    const len = stored.len[ci]
    if (len === 0) continue
    if (stored.raw[ci]) {
      rawChunks++ // served straight from the file / a copy: no decompression
      continue
    }
    const src = arena.subarray(stored.off[ci], stored.off[ci] + len)
    const t0 = performance.now()
    if (crc32(src) !== stored.crc[ci]) throw new Error(`chunk ${ci}: checksum mismatch`)
    const got = codec.decompress(src, out, stored.payloadLen[ci])
    const dt = performance.now() - t0
    if (got !== stored.payloadLen[ci]) throw new Error(`chunk ${ci}: decompressed ${got} != ${stored.payloadLen[ci]}`)
    times[k++] = dt * 1000
    payloadBytes += got
  }
  const cpuMs = threadCpuMs() - c0
  // The CRC share, alone: the same checks without decoding.
  const c1 = threadCpuMs()
  let x = 0
  for (let ci = 0; ci < n; ci++) {
    if (stored.len[ci] === 0 || stored.raw[ci]) continue
    x ^= crc32(arena.subarray(stored.off[ci], stored.off[ci] + stored.len[ci]))
  }
  const crcMs = threadCpuMs() - c1 + (x & 0) // x keeps the loop from being optimised away
  const t = times.subarray(0, k).sort()
  const q = (f: number) => (k === 0 ? 0 : t[Math.min(k - 1, Math.floor(f * k))])
  return {
    compressedChunks: k,
    rawChunks,
    payloadBytes,
    cpuMs,
    meanUs: k ? (cpuMs * 1e3) / k : 0,
    crcUs: k ? (crcMs * 1e3) / k : 0,
    decodeUs: k ? ((cpuMs - crcMs) * 1e3) / k : 0,
    payloadGBps: cpuMs - crcMs > 0 ? payloadBytes / ((cpuMs - crcMs) * 1e6) : 0,
    wallP50Us: q(0.5),
    wallP99Us: q(0.99),
    wallMaxUs: k ? t[k - 1] : 0,
  }
}

/** Untimed check that every stored chunk decodes back to its payload. */
function verify(
  img: Buffer,
  zmap: Uint8Array,
  chunkSize: number,
  stored: StoredChunks,
  arena: Buffer,
  codec: Codec,
  gather: Buffer,
  out: Buffer,
): void {
  const chunkPages = chunkSize / PAGE
  for (let ci = 0; ci < stored.len.length; ci++) {
    const payload = gatherPayload(img, zmap, ci, chunkPages, gather)
    if (payload === null) {
      if (stored.len[ci] !== 0) throw new Error(`verify: zero chunk ${ci} stored bytes`)
      continue
    }
    const src = arena.subarray(stored.off[ci], stored.off[ci] + stored.len[ci])
    if (crc32(src) !== stored.crc[ci]) throw new Error(`verify: chunk ${ci} crc`)
    const back = stored.raw[ci] ? src : out.subarray(0, codec.decompress(src, out, payload.length))
    if (!back.equals(payload)) throw new Error(`verify: chunk ${ci} (${codec.spec.id}, ${chunkSize}) differs`)
  }
}

// ---------------------------------------------------------------------------------------------
// Worker threads: the real tool compresses in 2 workers; measure that too.

interface WorkerJob {
  chunkSize: number
  codec: string
}

interface WorkerInit {
  file: string
  size: number
  index: number
  count: number
  maxChunk: number
}

/**
 * The snapshot pipeline of one worker, as `uffd snapshot` runs it: for chunks first, first + step, ...
 * pread the chunk from the memory file, scan it for zero pages, gather and compress the payload,
 * CRC-32 the stored bytes and copy them out (into a 64 MiB ring: this models handing them to the
 * writer). Returns the stored bytes (before deduplication, which the writer does).
 */
function pipelineChunks(
  fd: number,
  size: number,
  chunkSize: number,
  codec: Codec,
  chunkBuf: Buffer,
  gather: Buffer,
  ring: Buffer,
  first: number,
  step: number,
): number {
  const nChunks = Math.ceil(size / chunkSize)
  const zm = new Uint8Array(chunkSize / PAGE)
  const crcs = new Uint32Array(1024)
  let crcN = 0
  let pos = 0
  let stored = 0
  for (let ci = first; ci < nChunks; ci += step) {
    const off = ci * chunkSize
    const len = Math.min(chunkSize, size - off)
    for (let got = 0; got < len;) {
      const n = readSync(fd, chunkBuf, got, len - got, off + got)
      if (n <= 0) throw new Error(`short read at ${off + got}`)
      got += n
    }
    const pages = len / PAGE
    const z = pages === zm.length ? zm : zm.subarray(0, pages)
    scanZeroPages(chunkBuf, z)
    const payload = gatherPayload(chunkBuf, z, 0, pages, gather)
    if (payload === null) continue
    const c = codec.compress(payload)
    const outBytes = c.length >= payload.length ? payload : c
    crcs[crcN++ & 1023] = crc32(outBytes) // the worker checksums, the main thread deduplicates
    if (pos + outBytes.length > ring.length) pos = 0
    outBytes.copy(ring, pos)
    pos += outBytes.length
    stored += outBytes.length
  }
  return stored
}

function workerMain(): void {
  const init = workerData as WorkerInit
  const fd = openSync(init.file, 'r')
  const chunkBuf = Buffer.alloc(init.maxChunk)
  const gather = Buffer.alloc(init.maxChunk)
  const ring = Buffer.alloc(64 * MiB)
  const codecs = new Map<string, Codec>()
  parentPort!.on('message', (job: WorkerJob) => {
    let codec = codecs.get(job.codec)
    if (!codec) codecs.set(job.codec, (codec = makeCodec(parseCodec(job.codec), init.maxChunk)))
    const c = codec
    const t = timed(() => pipelineChunks(fd, init.size, job.chunkSize, c, chunkBuf, gather, ring, init.index, init.count))
    parentPort!.postMessage({stored: t.value, ms: t.ms, cpuMs: t.cpuMs})
  })
}

class WorkerPool {
  private workers: Worker[] = []
  constructor(file: string, size: number, count: number, maxChunk: number) {
    const tsxApi = pathToFileURL(require.resolve('tsx/esm/api')).href
    // tsx's --import hook is not inherited by workers on Node 20: register it, then load this file.
    const boot = `import(${JSON.stringify(tsxApi)}).then(({ register }) => { register(); return import(${JSON.stringify(import.meta.url)}); })`
    for (let i = 0; i < count; i++) {
      const init: WorkerInit = {file, size, index: i, count, maxChunk}
      this.workers.push(new Worker(boot, {eval: true, workerData: init}))
    }
  }
  private once(w: Worker, job: WorkerJob): Promise<{stored: number; ms: number; cpuMs: number}> {
    return new Promise((resolve, reject) => {
      const onErr = (e: Error) => reject(e)
      w.once('error', onErr)
      w.once('message', (m: {stored: number; ms: number; cpuMs: number}) => {
        w.off('error', onErr)
        resolve(m)
      })
      w.postMessage(job)
    })
  }
  /** Wall time for all workers to store the whole image, and their CPU time (sum). */
  async run(job: WorkerJob): Promise<{stored: number; ms: number; cpuMs: number}> {
    const t0 = performance.now()
    const res = await Promise.all(this.workers.map((w) => this.once(w, job)))
    return {
      stored: res.reduce((a, r) => a + r.stored, 0),
      ms: performance.now() - t0,
      cpuMs: res.reduce((a, r) => a + r.cpuMs, 0),
    }
  }
  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()))
  }
}

// ---------------------------------------------------------------------------------------------
// Command-line baselines

interface CliSpec {
  id: string
  argv: string[] // the file is appended
}

const CLI: CliSpec[] = [
  {id: 'zstd -1 -T2', argv: ['zstd', '-q', '-1', '-T2', '-c']},
  {id: 'zstd -1', argv: ['zstd', '-q', '-1', '-c']}, // CLI default: one worker thread + I/O thread
  {id: 'zstd -1 --single-thread', argv: ['zstd', '-q', '-1', '--single-thread', '-c']},
  {id: 'lz4 -1', argv: ['lz4', '-q', '-1', '-c']},
]

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`
}

interface CliRun {
  bytes: number
  ms: number // wall
  cpuMs: number // user + sys of the children (bash `times`), i.e. mostly the compressor
  cmd: string
}

function runCli(spec: CliSpec, file: string): CliRun {
  const cmd = `${[...spec.argv, file].map(shellQuote).join(' ')} | wc -c`
  const t0 = performance.now()
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', `${cmd}; times`], {encoding: 'utf8'})
  const ms = performance.now() - t0
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr}`)
  const lines = r.stdout.trim().split('\n')
  // `times`: line 1 the shell's user/sys, line 2 its children's, as "0m1.234s 0m0.056s".
  const secs = (t: string) => {
    const m = /^(\d+)m([\d.]+)s$/.exec(t)
    if (!m) throw new Error(`cannot parse times output ${t}`)
    return Number(m[1]) * 60 + Number(m[2])
  }
  const [u, sy] = lines[lines.length - 1].trim().split(/\s+/)
  return {bytes: Number(lines[0].trim()), ms, cpuMs: (secs(u) + secs(sy)) * 1e3, cmd}
}

// ---------------------------------------------------------------------------------------------
// Helpers

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const n = s.length
  if (n === 0) return NaN
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2
}

function parseSize(s: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(s.trim())
  if (!m) throw new Error(`bad size ${s}`)
  const mult = {'': 1, K: 1024, M: MiB, G: 1024 * MiB}[m[2].toUpperCase() as '' | 'K' | 'M' | 'G']
  return Number(m[1]) * mult
}

function fmtSize(b: number): string {
  return b >= MiB ? `${b / MiB}M` : `${b / 1024}K`
}

function readImage(file: string): Buffer {
  const fd = openSync(file, 'r')
  try {
    const size = fstatSync(fd).size
    const img = Buffer.alloc(size)
    for (let off = 0; off < size;) {
      const n = readSync(fd, img, off, Math.min(64 * MiB, size - off), off)
      if (n <= 0) throw new Error(`short read at ${off}`)
      off += n
    }
    return img
  } finally {
    closeSync(fd)
  }
}

/** Read the (page-cached) file into buf, as the snapshot command must: wall and CPU ms. */
function timeRead(file: string, buf: Buffer): {ms: number; cpuMs: number} {
  const fd = openSync(file, 'r')
  try {
    const t = timed(() => {
      let off = 0
      while (off < buf.length) off += readSync(fd, buf, off, Math.min(64 * MiB, buf.length - off), off)
    })
    return {ms: t.ms, cpuMs: t.cpuMs}
  } finally {
    closeSync(fd)
  }
}

function pad(s: string, n: number, left = false): string {
  return left ? s.padEnd(n) : s.padStart(n)
}

function printTable(head: string[], rows: string[][]): void {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)))
  const line = (r: string[]) => r.map((c, i) => pad(c, w[i], i < 2)).join('  ')
  console.log(line(head))
  console.log(w.map((n) => '-'.repeat(n)).join('  '))
  for (const r of rows) console.log(line(r))
}

// ---------------------------------------------------------------------------------------------
// Main

interface Timing {
  ms: number // wall
  cpuMs: number
}

interface ConfigRun {
  storedBytes: number // data section (identical stored bytes once)
  encodedBytes: number // before deduplication
  dedupChunks: number
  compress: Timing // one thread: gather + compress + CRC + dedup + copy out, zero map given
  workers: Timing | null // N workers, whole pipeline (pread + scan + gather + compress + copy out); cpu = sum
  decompress: DecompressStats
}

interface RunOut {
  cli: Record<string, CliRun[]>
  read: Timing
  scan: Timing
  configs: Record<string, ConfigRun>
  order: string[]
}

async function main(): Promise<void> {
  const args = process.argv.slice(2)
  const opt = (name: string, def?: string): string | undefined => {
    const i = args.indexOf(`--${name}`)
    return i >= 0 ? args[i + 1] : def
  }
  const image = opt('image')
  if (!image) {
    console.error(
      'usage: node --import tsx bench/codecs.ts --image PATH [--runs 3] [--chunks 64K,128K,...] [--codecs zstd:-1,lz4,...] [--workers 2] [--no-cli] [--no-verify] [--out DIR]',
    )
    process.exit(2)
  }
  const runs = Number(opt('runs', '3'))
  const chunkSizes = opt('chunks', '64K,128K,256K,1M,2M,4M')!.split(',').map(parseSize)
  const codecSpecs = opt('codecs', 'zstd:-5,zstd:-3,zstd:-1,zstd:1,zstd:2,zstd:3,lz4')!.split(',').map(parseCodec)
  const nWorkers = Number(opt('workers', '2'))
  const withCli = !args.includes('--no-cli')
  const doVerify = !args.includes('--no-verify')
  const here = path.dirname(fileURLToPath(import.meta.url))
  const outDir = opt('out', path.join(here, 'results'))!
  for (const c of chunkSizes) if (c % PAGE || c <= 0) throw new Error(`chunk size ${c} is not a multiple of 4 KiB`)
  const maxChunk = Math.max(...chunkSizes)

  const img = readImage(image)
  if (img.length % PAGE) throw new Error('image size is not a multiple of 4 KiB')
  const size = img.length
  const nPages = size / PAGE
  const zmap = new Uint8Array(nPages)
  scanZeroPages(img, zmap)
  let zeroPages = 0
  for (let p = 0; p < nPages; p++) zeroPages += zmap[p]
  const nonzeroBytes = (nPages - zeroPages) * PAGE

  const chunkStats = chunkSizes.map((c) => {
    const cp = c / PAGE
    const n = Math.ceil(nPages / cp)
    let nonzeroChunks = 0
    let fullChunks = 0
    for (let ci = 0; ci < n; ci++) {
      let nz = 0
      for (let p = ci * cp; p < Math.min((ci + 1) * cp, nPages); p++) nz += zmap[p] ^ 1
      if (nz) nonzeroChunks++
      if (nz === cp) fullChunks++
    }
    return {
      chunkSize: c,
      chunks: n,
      nonzeroChunks,
      zeroChunks: n - nonzeroChunks,
      fullChunks,
      meanPayload: nonzeroBytes / Math.max(1, nonzeroChunks),
    }
  })
  const loadAtStart = os.loadavg()

  console.log(`# uffd snapshot codec bench  ${new Date().toISOString()}`)
  console.log(
    `image ${image}: ${size / MiB} MiB, ${nPages} pages, zero 4K pages ${((100 * zeroPages) / nPages).toFixed(1)}%, non-zero ${(nonzeroBytes / MiB).toFixed(1)} MiB`,
  )
  console.log(
    `machine: ${os.cpus().length} x ${os.cpus()[0]?.model ?? '?'}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, kernel ${os.release()}, node ${process.version}, zstd lib ${zstd.versionString()}, loadavg ${loadAtStart.map((x) => x.toFixed(2)).join(' ')}`,
  )
  console.log(
    `runs ${runs}, chunks ${chunkSizes.map(fmtSize).join(',')}, codecs ${codecSpecs.map((c) => c.id).join(',')}, workers ${nWorkers}`,
  )
  printTable(
    ['chunk', 'chunks', 'all-zero', 'non-zero', 'without zero page', 'mean payload KiB'],
    chunkStats.map((s) => [
      fmtSize(s.chunkSize),
      String(s.chunks),
      String(s.zeroChunks),
      String(s.nonzeroChunks),
      String(s.fullChunks),
      (s.meanPayload / 1024).toFixed(1),
    ]),
  )
  console.log('')

  // Buffers reused by every configuration; Buffer.alloc pre-touches them so no run pays first-touch faults.
  const arena = Buffer.alloc(nonzeroBytes + PAGE) // stored <= payload per chunk, so this always fits
  const gather = Buffer.alloc(maxChunk)
  const out = Buffer.alloc(maxChunk)
  const readBuf = Buffer.alloc(size)
  const pool = nWorkers > 0 ? new WorkerPool(image, size, nWorkers, maxChunk) : null
  const codecs = codecSpecs.map((s) => makeCodec(s, maxChunk))
  const configs: {chunkSize: number; codec: Codec}[] = []
  for (const c of chunkSizes) for (const codec of codecs) configs.push({chunkSize: c, codec})
  const key = (c: number, id: string) => `${fmtSize(c)} ${id}`

  // Warm up: JIT, codec contexts, workers.
  {
    const warm = img.subarray(0, Math.min(size, 64 * MiB))
    const wz = zmap.subarray(0, warm.length / PAGE)
    for (const codec of codecs) storeChunks(warm, wz, chunkSizes[0], codec, arena, gather, null)
    if (pool) await pool.run({chunkSize: chunkSizes[0], codec: codecSpecs[0].id})
  }

  const runsOut: RunOut[] = []
  for (let r = 0; r < runs; r++) {
    const cli: Record<string, CliRun[]> = {}
    const doCli = () => {
      if (!withCli) return
      for (const spec of CLI) (cli[spec.id] ??= []).push(runCli(spec, image))
    }
    doCli() // before and after the configurations: the baseline of a run is the mean of both
    const read = timeRead(image, readBuf)
    const zm2 = new Uint8Array(nPages)
    const scan = timed(() => scanZeroPages(img, zm2))
    const res: Record<string, ConfigRun> = {}
    // Rotate the order of the configurations each run so that slow phases of machine noise spread.
    const shift = Math.floor((r * configs.length) / Math.max(1, runs))
    const order = configs.map((_, i) => configs[(i + shift) % configs.length])
    for (const {chunkSize, codec} of order) {
      const nChunks = Math.ceil(nPages / (chunkSize / PAGE))
      const stored: StoredChunks = {
        off: new Float64Array(nChunks),
        len: new Uint32Array(nChunks),
        payloadLen: new Uint32Array(nChunks),
        raw: new Uint8Array(nChunks),
        crc: new Uint32Array(nChunks),
        storedBytes: 0,
        encodedBytes: 0,
        dedupChunks: 0,
      }
      const c = timed(() => storeChunks(img, zmap, chunkSize, codec, arena, gather, stored))
      if (doVerify && r === 0) verify(img, zmap, chunkSize, stored, arena, codec, gather, out)
      const decompress = decompressAll(stored, arena, codec, out)
      let workers: Timing | null = null
      if (pool) {
        const w = await pool.run({chunkSize, codec: codec.spec.id})
        if (w.stored !== stored.encodedBytes) throw new Error(`workers encoded ${w.stored} != ${stored.encodedBytes}`)
        workers = {ms: w.ms, cpuMs: w.cpuMs}
      }
      res[key(chunkSize, codec.spec.id)] = {
        storedBytes: stored.storedBytes,
        encodedBytes: stored.encodedBytes,
        dedupChunks: stored.dedupChunks,
        compress: {ms: c.ms, cpuMs: c.cpuMs},
        workers,
        decompress,
      }
      process.stderr.write('.')
    }
    doCli()
    process.stderr.write(` run ${r + 1}/${runs} done (loadavg ${os.loadavg()[0].toFixed(2)})\n`)
    runsOut.push({
      cli,
      read: {ms: read.ms, cpuMs: read.cpuMs},
      scan: {ms: scan.ms, cpuMs: scan.cpuMs},
      configs: res,
      order: order.map((c) => key(c.chunkSize, c.codec.spec.id)),
    })
  }
  await pool?.close()

  // ------------------------------------------------------------------ summary (medians over runs)
  const mbps = (ms: number) => size / (ms * 1e3) // MB/s of logical image
  const cliT = (run: RunOut, id: string, f: (x: CliRun) => number) => {
    const xs = run.cli[id] ?? []
    return xs.length ? xs.reduce((a, x) => a + f(x), 0) / xs.length : NaN
  }
  const cliWall = (run: RunOut, id: string) => cliT(run, id, (x) => x.ms)
  const cliCpu = (run: RunOut, id: string) => cliT(run, id, (x) => x.cpuMs)
  const cliBytes = (id: string) => runsOut[0]?.cli[id]?.[0]?.bytes ?? NaN
  const zstd1Bytes = cliBytes('zstd -1')
  const T2 = 'zstd -1 -T2'
  const med = <T>(xs: T[], f: (x: T, i: number) => number) => median(xs.map(f))

  const cliSummary = withCli
    ? CLI.map((s) => ({
        id: s.id,
        cmd: runsOut[0].cli[s.id][0].cmd,
        bytes: cliBytes(s.id),
        ratio: size / cliBytes(s.id),
        wallMs: med(runsOut, (run) => cliWall(run, s.id)),
        wallMbps: med(runsOut, (run) => mbps(cliWall(run, s.id))),
        cpuMs: med(runsOut, (run) => cliCpu(run, s.id)),
        cpuMbps: med(runsOut, (run) => mbps(cliCpu(run, s.id))),
        wallVsT2: med(runsOut, (run) => cliWall(run, T2) / cliWall(run, s.id)),
        cpuVsT2: med(runsOut, (run) => cliCpu(run, T2) / cliCpu(run, s.id)),
      }))
    : []
  const read = {ms: med(runsOut, (r) => r.read.ms), cpuMs: med(runsOut, (r) => r.read.cpuMs)}
  const scan = {ms: med(runsOut, (r) => r.scan.ms), cpuMs: med(runsOut, (r) => r.scan.cpuMs)}

  // docs/FORMAT.md: 32 B index entry per chunk, zero map of 1 bit per page, fixed header (64 B + one
  // 64 B region + CRC) and footer (64 B), and ~300 B of metadata JSON.
  const indexBytes = (c: number) => Math.ceil(nPages / 8) + Math.ceil(nPages / (c / PAGE)) * 32 + 64 + 64 + 8 + 64 + 300
  const summary = configs.map(({chunkSize, codec}) => {
    const k = key(chunkSize, codec.spec.id)
    const per = runsOut.map((run) => run.configs[k])
    const storedBytes = per[0].storedBytes
    const withIndex = storedBytes + indexBytes(chunkSize)
    const d = (f: (x: DecompressStats) => number) => median(per.map((p) => f(p.decompress)))
    const meanUs = d((x) => x.meanUs)
    const cs = chunkStats.find((s) => s.chunkSize === chunkSize)!
    const oneThreadCpu = (run: RunOut, i: number) => run.read.cpuMs + run.scan.cpuMs + per[i].compress.cpuMs
    return {
      key: k,
      chunkSize,
      codec: codec.spec.id,
      storedBytes,
      encodedBytes: per[0].encodedBytes,
      dedupChunks: per[0].dedupChunks,
      indexBytes: indexBytes(chunkSize),
      ratio: size / withIndex,
      sizeVsZstd1: withIndex / zstd1Bytes, // < 1: smaller than `zstd -1` on the whole file
      compress1T: {
        wallMs: med(per, (p) => p.compress.ms),
        cpuMs: med(per, (p) => p.compress.cpuMs),
        cpuMbps: med(per, (p) => mbps(p.compress.cpuMs)),
        wallMbps: med(per, (p) => mbps(p.compress.ms)),
        // read + scan + compress on one thread, CPU time, against the CLI's CPU time in the same run
        snapshotCpuMbps: med(runsOut, (run, i) => mbps(oneThreadCpu(run, i))),
        cpuVsZstd1T2: med(runsOut, (run, i) => cliCpu(run, T2) / oneThreadCpu(run, i)),
        cpuVsZstd1Single: med(runsOut, (run, i) => cliCpu(run, 'zstd -1 --single-thread') / oneThreadCpu(run, i)),
      },
      workers:
        nWorkers > 0
          ? {
              n: nWorkers,
              wallMs: med(per, (p) => p.workers!.ms),
              wallMbps: med(per, (p) => mbps(p.workers!.ms)),
              cpuMs: med(per, (p) => p.workers!.cpuMs),
              wallVsZstd1T2: med(runsOut, (run, i) => cliWall(run, T2) / per[i].workers!.ms),
              cpuVsZstd1T2: med(runsOut, (run, i) => cliCpu(run, T2) / per[i].workers!.cpuMs),
            }
          : null,
      decompress: {
        compressedChunks: per[0].decompress.compressedChunks,
        rawChunks: per[0].decompress.rawChunks,
        meanUs,
        crcUs: d((x) => x.crcUs),
        decodeUs: d((x) => x.decodeUs),
        payloadGBps: d((x) => x.payloadGBps),
        cpuMs: d((x) => x.cpuMs),
        wallP50Us: d((x) => x.wallP50Us),
        wallP99Us: d((x) => x.wallP99Us),
        wallMaxUs: d((x) => x.wallMaxUs),
      },
      // Model with platform.md constants (same-CPU handler): first fault on a chunk = round trip +
      // mean decompression + UFFDIO_COPY of the whole chunk; touching every page once = that for
      // every non-zero chunk + a round trip and UFFDIO_ZEROPAGE for every all-zero chunk.
      model: {
        firstFaultUs: FAULT_ROUNDTRIP_US + meanUs + (chunkSize / MiB) * UFFDIO_COPY_US_PER_MIB,
        touchAllMs:
          (cs.nonzeroChunks * (FAULT_ROUNDTRIP_US + meanUs + (chunkSize / MiB) * UFFDIO_COPY_US_PER_MIB) +
            cs.zeroChunks * (FAULT_ROUNDTRIP_US + (chunkSize / MiB) * UFFDIO_ZEROPAGE_US_PER_MIB)) /
          1e3,
      },
    }
  })

  if (withCli) {
    console.log('\n## Command-line baselines on the whole file (medians; wall includes reading the cached file; cpu = user+sys)')
    printTable(
      ['command', '', 'MiB out', 'ratio', 'wall MB/s', 'cpu MB/s', 'wall vs T2', 'cpu vs T2'],
      cliSummary.map((c) => [
        c.id,
        '',
        (c.bytes / MiB).toFixed(1),
        c.ratio.toFixed(2),
        c.wallMbps.toFixed(0),
        c.cpuMbps.toFixed(0),
        c.wallVsT2.toFixed(2),
        c.cpuVsT2.toFixed(2),
      ]),
    )
  }
  console.log(
    `\nzero-page scan (Buffer.compare per 4 KiB page, 1 thread): cpu ${scan.cpuMs.toFixed(0)} ms = ${mbps(scan.cpuMs).toFixed(0)} MB/s (wall ${scan.ms.toFixed(0)} ms); reading the cached file: cpu ${read.cpuMs.toFixed(0)} ms = ${mbps(read.cpuMs).toFixed(0)} MB/s (wall ${read.ms.toFixed(0)} ms)`,
  )

  console.log(
    `\n## Snapshot side (medians over ${runs} runs). size/zstd-1 = snapshot file size (stored data + 32 B/chunk index + zero map + header/footer) / \`zstd -1\` output.` +
      `\n   vs T2 = \`zstd -1 -T2\` time / our time in the same run (>1: we are faster). 1T = one thread, CPU time, read + scan + compress + CRC + dedup;` +
      ` ${nWorkers}W = ${nWorkers} worker threads doing pread + scan + compress + CRC per chunk.`,
  )
  printTable(
    [
      'chunk',
      'codec',
      'MiB stored',
      'dedup',
      'ratio',
      'size/zstd-1',
      '1T cpu MB/s',
      '1T cpu vs T2',
      `${nWorkers}W wall MB/s`,
      `${nWorkers}W wall vs T2`,
      `${nWorkers}W cpu vs T2`,
    ],
    summary.map((s) => [
      fmtSize(s.chunkSize),
      s.codec,
      (s.storedBytes / MiB).toFixed(1),
      String(s.dedupChunks),
      s.ratio.toFixed(2),
      s.sizeVsZstd1.toFixed(3),
      s.compress1T.snapshotCpuMbps.toFixed(0),
      s.compress1T.cpuVsZstd1T2.toFixed(2),
      s.workers ? s.workers.wallMbps.toFixed(0) : '-',
      s.workers ? s.workers.wallVsZstd1T2.toFixed(2) : '-',
      s.workers ? s.workers.cpuVsZstd1T2.toFixed(2) : '-',
    ]),
  )
  console.log(
    `\n## Restore side (medians). Per compressed chunk, as the reader does it: CRC-32 of the stored bytes + decode (CPU µs);` +
      `\n   dec GB/s = payload per CPU second of decoding; wall p50/p99 per chunk include preemption;` +
      `\n   model = ${FAULT_ROUNDTRIP_US} µs round trip + crc + decode + UFFDIO_COPY of the chunk (platform.md constants).`,
  )
  printTable(
    [
      'chunk',
      'codec',
      'compressed',
      'raw',
      'crc+dec µs',
      'crc µs',
      'dec GB/s',
      'wall p50 µs',
      'wall p99 µs',
      'model 1st fault µs',
      'model touch-all ms',
    ],
    summary.map((s) => [
      fmtSize(s.chunkSize),
      s.codec,
      String(s.decompress.compressedChunks),
      String(s.decompress.rawChunks),
      s.decompress.meanUs.toFixed(1),
      s.decompress.crcUs.toFixed(1),
      s.decompress.payloadGBps.toFixed(2),
      s.decompress.wallP50Us.toFixed(1),
      s.decompress.wallP99Us.toFixed(1),
      s.model.firstFaultUs.toFixed(0),
      s.model.touchAllMs.toFixed(0),
    ]),
  )

  mkdirSync(outDir, {recursive: true})
  const stamp = new Date().toISOString().replace(/[:.]/g, '-')
  const file = path.join(outDir, `codecs-${stamp}.json`)
  writeFileSync(
    file,
    JSON.stringify(
      {
        command: `node --import tsx bench/codecs.ts ${args.join(' ')}`,
        date: new Date().toISOString(),
        machine: {
          cpus: os.cpus().length,
          model: os.cpus()[0]?.model,
          totalmemGiB: os.totalmem() / 2 ** 30,
          kernel: os.release(),
          node: process.version,
          zstdLib: zstd.versionString(),
          loadavgAtStart: loadAtStart,
          loadavgAtEnd: os.loadavg(),
        },
        units: {mbps: '10^6 bytes of logical image per second', gbps: '10^9 bytes of payload per second', us: 'microseconds'},
        model: {
          faultRoundtripUs: FAULT_ROUNDTRIP_US,
          uffdioCopyUsPerMiB: UFFDIO_COPY_US_PER_MIB,
          uffdioZeropageUsPerMiB: UFFDIO_ZEROPAGE_US_PER_MIB,
        },
        image: {path: image, bytes: size, pages: nPages, zeroPages, zeroPct: (100 * zeroPages) / nPages, nonzeroBytes},
        chunkStats,
        runs,
        workers: nWorkers,
        cli: cliSummary,
        scan: {...scan, cpuMbps: mbps(scan.cpuMs)},
        read: {...read, cpuMbps: mbps(read.cpuMs)},
        summary,
        perRun: runsOut,
      },
      null,
      1,
    ),
  )
  console.log(`\nJSON: ${file}`)
}

if (isMainThread) {
  main().catch((e) => {
    console.error(e)
    process.exit(1)
  })
} else {
  workerMain()
}
