// CRC-32 as zlib computes it (the format's checksum: docs/FORMAT.md), natively when
// native/libuffd_crc is built and the CPU has carry-less multiply, else with zlib.crc32.

import {crc32 as zlibCrc32} from 'node:zlib'

import * as libc from './libc.js'

/** Whether checksums run natively (native/libuffd_crc) rather than through zlib. */
export const nativeCrc32: boolean = libc.crc32Native !== undefined

/** zlib.crc32(data, value): the CRC-32 of `data`, continuing from `value` (0 to start). */
export const crc32: (data: Uint8Array, value?: number) => number = libc.crc32Native
  ? (data, value = 0) => libc.crc32Native!(value, data, data.length)
  : (data, value = 0) => zlibCrc32(data, value)
