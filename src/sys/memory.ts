// Raw memory: anonymous and file mappings, madvise, and zero-copy Buffer views over them.
//
// Addresses are plain JS numbers (exact: x86-64 user addresses are < 2^47). A Buffer returned
// by bufferAt() is only a window: it does not keep the mapping alive, and touching it after
// munmap() crashes the process (SIGSEGV), as it would in C.

import * as libc from './libc.js'
import {checkUnsigned, hex} from './raw.js'

/** sysconf(_SC_PAGESIZE) parameter (checked against the C headers by test/sys-abi.test.ts). */
export const SC_PAGESIZE = 30

/** The base page size of this machine, from sysconf(_SC_PAGESIZE): 4096 on x86-64. */
export const PAGE_SIZE: number = libc.sysconf(SC_PAGESIZE)

/** The only huge page size we map: x86-64's 2 MiB PMD pages (what Firecracker's `huge_pages: "2M"` uses). */
export const HUGE_PAGE_SIZE = 2 * 1024 * 1024

export const PROT = {NONE: 0x0, READ: 0x1, WRITE: 0x2} as const

export const MAP = {
  SHARED: 0x01,
  PRIVATE: 0x02,
  ANONYMOUS: 0x20,
  NORESERVE: 0x4000,
  HUGETLB: 0x40000,
  /** log2(2 MiB) << MAP_HUGE_SHIFT (26): which hugetlb pool MAP_HUGETLB draws from. */
  HUGE_2MB: 21 << 26,
} as const

/** madvise(2) advice values. */
export const MADV = {
  WILLNEED: 3,
  /**
   * Drops the pages. On a range registered with a uffd that enabled UFFD_FEATURE_EVENT_REMOVE,
   * the kernel first queues a REMOVE event and blocks this madvise until the handler has read it;
   * afterwards the range faults again (MISSING) on the next touch.
   */
  DONTNEED: 4,
  /** Like DONTNEED but also frees the backing store of shared/hugetlbfs memory. */
  REMOVE: 9,
  /**
   * Deactivates the pages and clears their accessed bits (flushing the TLB), so a later read of
   * /proc/PID/smaps counts as Referenced only the pages touched since.
   */
  COLD: 20,
  HUGEPAGE: 14,
  NOHUGEPAGE: 15,
  POPULATE_READ: 22,
  POPULATE_WRITE: 23,
} as const

export interface MmapAnonymousOptions {
  /**
   * Back the mapping with 2 MiB hugetlbfs pages (MAP_HUGETLB | MAP_HUGE_2MB). The length must be
   * a multiple of 2 MiB. The pages are reserved from the pool (/proc/sys/vm/nr_hugepages) at
   * mmap time, so a short pool fails here with ENOMEM rather than with SIGBUS on first touch.
   */
  hugepages?: boolean
}

/**
 * Maps `length` bytes of private anonymous read/write memory and returns its address.
 * Without hugepages it is MAP_NORESERVE: such memory is typically populated lazily by a uffd
 * handler, so no swap is reserved up front for mappings larger than what will ever be touched.
 */
export function mmapAnonymous(length: number, options: MmapAnonymousOptions = {}): number {
  const huge = options.hugepages === true
  checkLength(length, huge ? HUGE_PAGE_SIZE : PAGE_SIZE)
  const flags = MAP.PRIVATE | MAP.ANONYMOUS | (huge ? MAP.HUGETLB | MAP.HUGE_2MB : MAP.NORESERVE)
  const address = libc.mmap(0, length, PROT.READ | PROT.WRITE, flags, -1, 0)
  if (address === -1) {
    libc.fail('mmap', `mapping ${length} bytes of anonymous memory${huge ? ' in 2 MiB huge pages' : ''}`)
  }
  return address
}

/**
 * Maps `length` bytes of the file open at `fd`, from `offset` (a multiple of the page size), and
 * returns the address. MAP_PRIVATE: even with PROT.WRITE, writes never reach the file (a snapshot
 * image must not be modified by whoever reads it through this mapping).
 */
export function mmapFile(fd: number, length: number, offset = 0, prot: number = PROT.READ): number {
  checkLength(length, 1)
  checkUnsigned('offset', offset)
  if (offset % PAGE_SIZE !== 0) throw new RangeError(`offset ${offset} is not a multiple of the page size ${PAGE_SIZE}`)
  const address = libc.mmap(0, length, prot, MAP.PRIVATE, fd, offset)
  if (address === -1) libc.fail('mmap', `mapping ${length} bytes of fd ${fd} at offset ${offset}`)
  return address
}

export function munmap(address: number, length: number): void {
  checkUnsigned('address', address)
  checkLength(length, 1)
  if (libc.munmap(address, length) !== 0) libc.fail('munmap', `unmapping ${length} bytes at ${hex(address)}`)
}

/** madvise(2); `advice` is one of MADV. */
export function madvise(address: number, length: number, advice: number): void {
  checkUnsigned('address', address)
  checkLength(length, 1)
  if (libc.madvise(address, length, advice) !== 0) {
    libc.fail('madvise', `advising ${advice} on ${length} bytes at ${hex(address)}`)
  }
}

/**
 * A Buffer that is a zero-copy view of `length` bytes at `address` (memory we mapped). Useful as
 * the staging memory behind UFFDIO_COPY's `src`, or to read/write a uffd-registered region:
 * touching a missing page of a registered region blocks the touching thread in the kernel until
 * the handler serves it, so never touch such a view on the thread that runs the handler.
 */
export function bufferAt(address: number, length: number): Buffer {
  checkUnsigned('address', address)
  if (address === 0) throw new RangeError('address must not be NULL')
  checkLength(length, 1)
  return Buffer.from(libc.viewAt(address, length))
}

/**
 * The address of a Buffer's first byte (for struct fields such as uffdio_copy.src). The caller
 * must keep the Buffer referenced for as long as the kernel may use the address.
 */
export function addressOf(buffer: ArrayBufferView): number {
  return libc.addressOfView(buffer)
}

function checkLength(length: number, multipleOf: number): void {
  if (!Number.isSafeInteger(length) || length <= 0) {
    throw new RangeError(`length must be a positive safe integer, got ${length}`)
  }
  if (length % multipleOf !== 0) throw new RangeError(`length ${length} is not a multiple of ${multipleOf}`)
}
