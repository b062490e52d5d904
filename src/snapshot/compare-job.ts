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

/**
 * What the job's pages hold now, as digests: `digests` and `zero` already hold those of the pages
 * marked in `done` (digested from a mapping of their file); the other pages `present` marks are
 * in `image` (the job's bytes, whole pages) and digested here. Pages `present` does not mark were
 * not read: a diff's holes are unchanged, a full image's are zero (a sparse memory file's holes
 * are half of a guest's memory: known zero, never hashed).
 */
export interface JobPages {
  image: Buffer
  present: Uint8Array
  done: Uint8Array
  digests: Buffer
  zero: Uint8Array
}

/**
 * Compares the job's pages with the parent's: a page that is zero now differs exactly when the
 * parent's is not; any other page differs when the parent's is zero or its digest differs (a
 * changed page is missed with probability <= 2^-64 for content chosen without knowledge of the
 * key). Returns the changed pages with their digests; their bytes are the caller's to add.
 */
export function compareByDigest(job: CompareJob, now: JobPages, key: Uint32Array): Omit<CompareResult, 'bytes'> {
  const {pages, pageSize} = job
  const {present, done, digests, zero} = now
  // Each run of pages read and not yet digested is digested, and its zero pages found, in one native pass.
  const compare = new Uint8Array(pages)
  let compared = 0
  for (let i = 0; i < pages; i++) {
    if ((job.diff && !present[i]) || job.unchanged?.[i]) continue
    if (!present[i]) zero[i] = 1
    else if (!done[i]) compare[i] = 1
    compared++
  }
  for (let i = 0; i < pages; ) {
    if (!compare[i]) {
      i++
      continue
    }
    let j = i
    while (j < pages && compare[j]) j++
    pageDigests(now.image.subarray(i * pageSize, j * pageSize), j - i, key, digests.subarray(i * PAGE_DIGEST_BYTES), zero.subarray(i))
    i = j
  }
  const rows = Buffer.from(job.parentRows.buffer, job.parentRows.byteOffset, job.parentRows.byteLength)
  const changed: number[] = []
  const zeroed: number[] = []
  for (let i = 0; i < pages; i++) {
    if ((job.diff && !present[i]) || job.unchanged?.[i]) continue
    const wasZero = (job.parentZero[i >>> 3] & (1 << (i & 7))) !== 0
    if (zero[i]) {
      if (!wasZero) zeroed.push(i)
    } else if (wasZero || rows.compare(digests, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES) !== 0) {
      changed.push(i)
    }
  }
  const changedDigests = Buffer.allocUnsafeSlow(changed.length * PAGE_DIGEST_BYTES)
  changed.forEach((i, k) => digests.copy(changedDigests, k * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES))
  return {id: job.id, compared, changed: Uint32Array.from(changed), digests: new Uint8Array(changedDigests.buffer, 0, changedDigests.length), zeroed: Uint32Array.from(zeroed)}
}

/** Runs compare jobs on the calling thread: reads (or maps) each job's range of the image and compares it. */
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
    // Whole pages of a file are digested where they lie, through a mapping; what is left (a part
    // of a page, a file that cannot be mapped: /proc/PID/mem) is read. Pages no segment touches
    // are not filled: compareByDigest knows what they are.
    const done = new Uint8Array(pages)
    const mapped: ReadSegment[] = []
    const toRead: ReadSegment[] = []
    for (const s of job.segments) {
      const at = s.imageOffset - job.start
      const whole = pageSize === 4096 && at % pageSize === 0 && s.length % pageSize === 0
      if (whole && filePageDigests(this.reader.fd(s.path), s.position, s.length / pageSize, this.key, digests.subarray((at / pageSize) * PAGE_DIGEST_BYTES), zero.subarray(at / pageSize))) {
        done.fill(1, at / pageSize, (at + s.length) / pageSize)
        mapped.push(s)
      } else {
        toRead.push(s)
      }
    }
    const present = this.reader.read(toRead, job.start, image, pageSize, true)
    for (let i = 0; i < pages; i++) present[i] |= done[i]
    const result = compareByDigest(job, {image, present, done, digests, zero}, this.key)
    // The changed pages' bytes: from the buffer if read, else read now (a few percent of them).
    const bytes = Buffer.allocUnsafeSlow(result.changed.length * pageSize)
    result.changed.forEach((i, k) => {
      if (!done[i]) image.copy(bytes, k * pageSize, i * pageSize, (i + 1) * pageSize)
      else {
        const offset = job.start + i * pageSize
        const s = mapped.find((x) => offset >= x.imageOffset && offset < x.imageOffset + x.length)!
        this.reader.readAt(s.path, s.position + (offset - s.imageOffset), bytes.subarray(k * pageSize, (k + 1) * pageSize))
      }
    })
    return {...result, bytes: new Uint8Array(bytes.buffer, 0, bytes.length)}
  }

  close(): void {
    releaseFilePageDigests()
    this.reader.close()
  }
}
