// A layer writer's comparison by page digest (docs/FORMAT.md, Page digests), as one job: a range
// of the new image read and compared with the parent chain's digests. Run by compare workers, so
// reading and hashing a full image are spread over the cores.

import {PAGE_DIGEST_BYTES} from '../format/page-digest.js'
import {pageDigests} from '../sys/digest.js'
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
 * Compares the job's pages, read into `image` (the job's bytes, whole pages), with the parent's:
 * a page that is zero now differs exactly when the parent's is not; any other page differs when
 * the parent's is zero or its digest differs (a changed page is missed with probability <= 2^-64
 * for content chosen without knowledge of the key). `present`: a diff's data pages.
 */
export function compareByDigest(job: CompareJob, image: Buffer, present: Uint8Array | undefined, key: Uint32Array): CompareResult {
  const {pages, pageSize} = job
  // Each run of compared pages is digested, and its zero pages found, in one native pass.
  const compare = new Uint8Array(pages)
  let compared = 0
  for (let i = 0; i < pages; i++) {
    if ((present && !present[i]) || job.unchanged?.[i]) continue
    compare[i] = 1
    compared++
  }
  const digests = Buffer.alloc(pages * PAGE_DIGEST_BYTES)
  const zero = new Uint8Array(pages)
  for (let i = 0; i < pages; ) {
    if (!compare[i]) {
      i++
      continue
    }
    let j = i
    while (j < pages && compare[j]) j++
    pageDigests(image.subarray(i * pageSize, j * pageSize), j - i, key, digests.subarray(i * PAGE_DIGEST_BYTES), zero.subarray(i))
    i = j
  }
  const rows = Buffer.from(job.parentRows.buffer, job.parentRows.byteOffset, job.parentRows.byteLength)
  const changed: number[] = []
  const zeroed: number[] = []
  for (let i = 0; i < pages; i++) {
    if (!compare[i]) continue
    const wasZero = (job.parentZero[i >>> 3] & (1 << (i & 7))) !== 0
    if (zero[i]) {
      if (!wasZero) zeroed.push(i)
    } else if (wasZero || rows.compare(digests, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES) !== 0) {
      changed.push(i)
    }
  }
  const bytes = Buffer.allocUnsafeSlow(changed.length * pageSize)
  const changedDigests = Buffer.allocUnsafeSlow(changed.length * PAGE_DIGEST_BYTES)
  changed.forEach((i, k) => {
    image.copy(bytes, k * pageSize, i * pageSize, (i + 1) * pageSize)
    digests.copy(changedDigests, k * PAGE_DIGEST_BYTES, i * PAGE_DIGEST_BYTES, (i + 1) * PAGE_DIGEST_BYTES)
  })
  return {id: job.id, compared, changed: Uint32Array.from(changed), bytes: new Uint8Array(bytes.buffer, 0, bytes.length), digests: new Uint8Array(changedDigests.buffer, 0, changedDigests.length), zeroed: Uint32Array.from(zeroed)}
}

/** Runs compare jobs on the calling thread: reads each job's range of the image and compares it. */
export class CompareRunner {
  private readonly reader = new SegmentReader()
  private image = Buffer.alloc(0)

  constructor(private readonly key: Uint32Array) {}

  run(job: CompareJob): CompareResult {
    const length = job.pages * job.pageSize
    if (this.image.length < length) this.image = Buffer.alloc(length)
    const bytes = this.image.subarray(0, length)
    const present = this.reader.read(job.segments, job.start, bytes, job.pageSize, job.diff)
    return compareByDigest(job, bytes, job.diff ? present : undefined, this.key)
  }

  close(): void {
    this.reader.close()
  }
}
