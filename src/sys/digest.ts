// Page digests (docs/FORMAT.md, Page digests), natively when native/libuffd_digest is built (one
// call for many pages), else with the JavaScript reference: same results.

import {pageDigestsJs} from '../format/page-digest.js'
import * as libc from './libc.js'

/** Whether page digests run natively. */
export const nativeDigests: boolean = libc.pageDigestsNative !== undefined

/**
 * Digests of `count` consecutive 4 KiB pages at the start of `pages` into `out` (16 bytes each),
 * with `key` (expandDigestKey); with `zero`, also a byte per page, 1 when it is all zeros (found
 * in the same pass). `portable`: the native library's scalar path (tests compare it).
 */
export function pageDigests(pages: Uint8Array, count: number, key: Uint32Array, out: Uint8Array, zero?: Uint8Array, portable = false): void {
  if (pages.length < count * 4096 || out.length < count * 16 || (zero && zero.length < count)) throw new RangeError(`${count} pages need ${count * 4096} bytes in and ${count * 16} out, got ${pages.length} and ${out.length}`)
  if (count === 0) return
  if (libc.pageDigestsNative) return libc.pageDigestsNative(pages, count, key, out, zero ?? null, portable ? 1 : 0)
  pageDigestsJs(pages, count, key, out)
  if (zero) for (let p = 0; p < count; p++) zero[p] = ZERO_PAGE.compare(pages, p * 4096, (p + 1) * 4096) === 0 ? 1 : 0
}

/**
 * pageDigests of `count` pages of the file open as `fd` from byte `position` (a multiple of 4096),
 * read through a mapping of the file rather than copied out (the thread keeps the whole file
 * mapped until releaseFilePageDigests); false when that cannot be done (no
 * native library, a file that cannot be mapped, a range past its end, a file that shrank while it
 * was read): the caller reads the pages and digests them instead, and meets any error there.
 */
export function filePageDigests(fd: number, position: number, count: number, key: Uint32Array, out: Uint8Array, zero: Uint8Array): boolean {
  if (out.length < count * 16 || zero.length < count) throw new RangeError(`${count} pages need ${count * 16} bytes out and ${count} zero flags, got ${out.length} and ${zero.length}`)
  if (!libc.filePageDigestsNative || position % 4096 !== 0) return false
  return libc.filePageDigestsNative(fd, position, count, key, out, zero) === 0
}

/** Unmaps the file the calling thread's filePageDigests keeps mapped between calls. */
export function releaseFilePageDigests(): void {
  libc.filePageDigestsReleaseNative?.()
}

const ZERO_PAGE = Buffer.alloc(4096)
