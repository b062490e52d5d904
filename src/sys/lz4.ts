// lz4 block decoding through the system's liblz4 (loaded in libc.ts), straight into a caller's
// buffer. Optional: without the library, or with UFFD_SYSTEM_LZ4=0, callers use lz4-napi.

import {UffdError} from '../core/errors.js'
import * as libc from './libc.js'

/** Whether the system's liblz4 is loaded. */
export const hasSystemLz4: boolean = libc.lz4DecompressSafe !== undefined

/**
 * Decodes one lz4 block (the raw block, without any size prefix) into `dst`. Returns the bytes
 * written, or -1 when the block is malformed or would not fit `dst` (liblz4 checks both, and
 * never writes past `dst`). Throws when the system's liblz4 is not loaded.
 */
export function lz4DecodeBlock(block: Uint8Array, dst: Uint8Array): number {
  if (!libc.lz4DecompressSafe) throw new UffdError('INTERNAL', "the system's liblz4 is not loaded")
  if (block.length > 0x7fffffff || dst.length > 0x7fffffff) throw new RangeError('lz4 blocks are limited to 2 GiB')
  const n = libc.lz4DecompressSafe(block, dst, block.length, dst.length)
  return n < 0 ? -1 : n
}
