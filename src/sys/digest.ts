// Page digests (docs/FORMAT.md, Page digests), natively when native/libuffd_digest is built (one
// call for many pages), else with the JavaScript reference: same results.

import {pageDigestsJs} from '../format/page-digest.js'
import * as libc from './libc.js'

/** Whether page digests run natively. */
export const nativeDigests: boolean = libc.pageDigestsNative !== undefined

/**
 * Digests of `count` consecutive 4 KiB pages at the start of `pages` into `out` (16 bytes each),
 * with `key` (expandDigestKey). `portable`: the native library's scalar path (tests compare it).
 */
export function pageDigests(pages: Uint8Array, count: number, key: Uint32Array, out: Uint8Array, portable = false): void {
  if (pages.length < count * 4096 || out.length < count * 16) throw new RangeError(`${count} pages need ${count * 4096} bytes in and ${count * 16} out, got ${pages.length} and ${out.length}`)
  if (count === 0) return
  if (libc.pageDigestsNative) libc.pageDigestsNative(pages, count, key, out, portable ? 1 : 0)
  else pageDigestsJs(pages, count, key, out)
}
