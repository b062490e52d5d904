// A layer writer's comparison by page digest (docs/FORMAT.md, Page digests), as one job: a range
// of the new image read and compared with the parent chain's digests. Run by compare workers, so
// reading and hashing a full image are spread over the cores.

import {PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {filePageDigests, pageDigests, releaseFilePageDigests} from '../sys/digest.js'
import {type ReadSegment} from './chunk-job.js'
import {SegmentReader} from './segment-reader.js'

/** Whole chunks of the new image, from page `firstPage` (a multiple of 8). */
export interface CompareJob {
  id: number
  firstPage: number
  pages: number
  pageSize: number
  /** Image byte offset of firstPage. */
  start: number
  segments: ReadSegment[]
  /** A diff: pages no segment touches are unchanged. */
  diff: boolean
  /** One byte per page: 1 when the input says it is unchanged (an incremental CRIU dump's parent pages). */
  unchanged: Uint8Array | undefined
  /** The parent chain's zero map bits from firstPage (bit i: page firstPage + i). */
  parentZero: Uint8Array
  /** The parent chain's digests of these pages, 16 bytes each (zeros for a zero page). */
  parentRows: Uint8Array
}

export interface CompareResult {
  id: number
  compared: number
  /** Changed pages that are not zero now (job-relative page numbers, ascending), with their bytes and digests. */
  changed: Uint32Array
  bytes: Uint8Array
  digests: Uint8Array
  /** Pages that became zero (job-relative, ascending). */
  zeroed: Uint32Array
}

/** What a page is now against the parent's: unchanged, changed (data now), or zeroed (zero now, data before). */
const enum Verdict {
  Unchanged,
  Changed,
  Zeroed,
}

/**
 * Page i of the job against the parent's, from its digest and zero flag now: a page that is zero
 * now differs exactly when the parent's is not; any other page differs when the parent's is zero
 * or its digest differs (a changed page is missed with probability <= 2^-64 for content chosen
 * without knowledge of the key).
 */
function verdict(job: CompareJob, rows: Buffer, digests: Buffer, zero: Uint8Array, i: number): Verdict {
  const wasZero = (job.parentZero[i >>> 3] & (1 << (i & 7))) !== 0
  if (zero[i]) return wasZero ? Verdict.Unchanged : Verdict.Zeroed
  const at = i * PAGE_DIGEST_BYTES
  return wasZero || rows.compare(digests, at, at + PAGE_DIGEST_BYTES, at, at + PAGE_DIGEST_BYTES) !== 0 ? Verdict.Changed : Verdict.Unchanged
}

/** Digests the pages `marked` flags, in `image` (the job's bytes), a native pass per run of them, into `digests` and `zero`. */
function digestMarked(image: Buffer, marked: Uint8Array, pageSize: number, key: Uint32Array, digests: Buffer, zero: Uint8Array): void {
  for (let i = 0; i < marked.length; ) {
    if (!marked[i]) {
      i++
      continue
    }
    let j = i
    while (j < marked.length && marked[j]) j++
    pageDigests(image.subarray(i * pageSize, j * pageSize), j - i, key, digests.subarray(i * PAGE_DIGEST_BYTES), zero.subarray(i))
    i = j
  }
}

/**
 * Runs compare jobs on the calling thread: digests each job's range of the image (through a
 * mapping of its file where it can, else read) and compares it with the parent's.
 */
export class CompareRunner {
  private readonly reader = new SegmentReader()
  private image = Buffer.alloc(0)

  constructor(private readonly key: Uint32Array) {}

  run(job: CompareJob): CompareResult {
    const {pages, pageSize} = job
    const length = pages * pageSize
    if (this.image.length < length) this.image = Buffer.alloc(length)
    const image = this.image.subarray(0, length)
    const digests = Buffer.alloc(pages * PAGE_DIGEST_BYTES)
    const zero = new Uint8Array(pages)
    // Whole pages of a file are digested where they lie, through a mapping (their segment noted
    // per page); what is left (part of a page, a file that cannot be mapped: /proc/PID/mem) is
    // read into `image`. Pages no segment touches are not filled: a diff's holes are unchanged,
    // a full image's are zero (a sparse memory file's holes are half of a guest's memory: known
    // zero, never hashed).
    const mapped: ReadSegment[] = []
    const segmentOf = new Int32Array(pages).fill(-1)
    const toRead: ReadSegment[] = []
    for (const s of job.segments) {
      const at = s.imageOffset - job.start
      const whole = pageSize === 4096 && at % pageSize === 0 && s.length % pageSize === 0
      if (whole && filePageDigests(this.reader.fd(s.path), s.position, s.length / pageSize, this.key, digests.subarray((at / pageSize) * PAGE_DIGEST_BYTES), zero.subarray(at / pageSize))) {
        segmentOf.fill(mapped.length, at / pageSize, (at + s.length) / pageSize)
        mapped.push(s)
      } else {
        toRead.push(s)
      }
    }
    const present = this.reader.read(toRead, job.start, image, pageSize, true)
    const considered = new Uint8Array(pages)
    const read = new Uint8Array(pages)
    let compared = 0
    for (let i = 0; i < pages; i++) {
      const touched = present[i] === 1 || segmentOf[i] >= 0
      if ((job.diff && !touched) || job.unchanged?.[i]) continue
      considered[i] = 1
      compared++
      if (!touched) zero[i] = 1
      else if (segmentOf[i] < 0) read[i] = 1
    }
    digestMarked(image, read, pageSize, this.key, digests, zero)
    const rows = Buffer.from(job.parentRows.buffer, job.parentRows.byteOffset, job.parentRows.byteLength)
    // A changed page digested through the mapping is read now, and digested again from what was
    // read: the bytes a layer stores and their digest are one reading of the page, whatever the
    // file's owner wrote in between (its verdict may change with it).
    const reread = new Uint8Array(pages)
    for (let i = 0; i < pages; i++) if (considered[i] && segmentOf[i] >= 0 && verdict(job, rows, digests, zero, i) === Verdict.Changed) reread[i] = 1
    this.readMapped(job, mapped, segmentOf, reread, image)
    digestMarked(image, reread, pageSize, this.key, digests, zero)
    const changed: number[] = []
    const zeroed: number[] = []
    for (let i = 0; i < pages; i++) {
      if (!considered[i]) continue
      const v = verdict(job, rows, digests, zero, i)
      if (v === Verdict.Zeroed) zeroed.push(i)
      // A mapped page judged unchanged before it was read is not read: the layer keeps the parent's.
      else if (v === Verdict.Changed && (segmentOf[i] < 0 || reread[i])) changed.push(i)
    }
    const bytes = Buffer.allocUnsafeSlow(changed.length * pageSize)
    const changedDigests = Buffer.allocUnsafeSlow(changed.length * PAGE_DIGEST_BYTES)
    changed.forEach((i, k) => {
      image.copy(bytes, k * pageSize, i * pageSize, (i + 1) * pageSize)
      digests.copy(changedDigests, k * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES)
    })
    return {
      id: job.id,
      compared,
      changed: Uint32Array.from(changed),
      bytes: new Uint8Array(bytes.buffer, 0, bytes.length),
      digests: new Uint8Array(changedDigests.buffer, 0, changedDigests.length),
      zeroed: Uint32Array.from(zeroed),
    }
  }

  /** Reads the pages `marked` flags, each of a mapped segment, into their places in `image`: a read per run of them in one segment. */
  private readMapped(job: CompareJob, mapped: readonly ReadSegment[], segmentOf: Int32Array, marked: Uint8Array, image: Buffer): void {
    const {pageSize} = job
    for (let i = 0; i < marked.length; ) {
      if (!marked[i]) {
        i++
        continue
      }
      let j = i + 1
      while (j < marked.length && marked[j] && segmentOf[j] === segmentOf[i]) j++
      const s = mapped[segmentOf[i]]
      const offset = job.start + i * pageSize
      this.reader.readAt(s.path, s.position + (offset - s.imageOffset), image.subarray(i * pageSize, j * pageSize))
      i = j
    }
  }

  close(): void {
    releaseFilePageDigests()
    this.reader.close()
  }
}
