// The raw libc surface of the project, declared once through koffi.
//
// This is the only file that loads native libraries: libc, our own native/libuffd_fill and
// native/libuffd_crc and native/libuffd_digest, and the system's liblz4 when it is there.
// Everything here is internal to src/sys: the typed wrappers in the sibling modules validate
// arguments, turn failures into SysError and hide koffi's types from the rest of the program.
//
// Conventions (x86-64 Linux, glibc):
// - Variadic functions (ioctl, syscall) are declared non-variadic, once per argument type. The
//   call is ABI-identical on x86-64 for integer and pointer arguments, and only non-variadic
//   declarations get koffi's fast path (and `.async`).
// - Raw memory addresses (our own mmap'd memory, addresses inside another mm) are passed as
//   `uintptr_t` JS numbers: koffi converts a number argument much faster than a BigInt pointer,
//   and every user-space address on x86-64 (< 2^47) is exact in a double.
// - `void *` parameters take a Buffer or typed array, which koffi passes in place (no copy).
// - ssize_t / off_t results are declared `intptr_t` / `int64_t`; koffi returns them as numbers
//   while they fit in 53 bits, which every value we use does (-1 on failure, sizes, offsets).
// - `errno` is read with `koffi.errno()` right after the failing call, before any other call
//   into libc from this thread.

import {fileURLToPath} from 'node:url'

import koffi from 'koffi'

import {SysError} from './errors.js'

const lib = koffi.load('libc.so.6')

/**
 * An optional library (a soname or a path): undefined when it is turned off (`envSwitch` set to
 * 0) or cannot be loaded.
 */
function loadOptional(library: string, envSwitch: string): ReturnType<typeof koffi.load> | undefined {
  if (process.env[envSwitch] === '0') return undefined
  try {
    return koffi.load(library)
  } catch {
    return undefined
  }
}

/** The path of a library of native/, built by `npm run build` into native/build. */
function ownLibrary(name: string): string {
  // dist/sys/libc.js and src/sys/libc.ts are both two levels below the project root.
  return fileURLToPath(new URL(`../../native/build/${name}`, import.meta.url))
}

/**
 * native/libuffd_fill, or undefined: not built, or disabled with UFFD_NATIVE_FILL=0 (the
 * JavaScript path then does the same work, more slowly).
 */
const fillLib = loadOptional(ownLibrary('libuffd_fill.so'), 'UFFD_NATIVE_FILL')

/**
 * native/libuffd_crc: zlib's crc32 with carry-less multiplication, ~2.5x zlib.crc32 here. Only when
 * this CPU has PCLMULQDQ (else it would work byte by byte) and not turned off (UFFD_NATIVE_CRC=0).
 */
function loadCrc(): ((crc: number, buf: Uint8Array, len: number) => number) | undefined {
  const crcLib = loadOptional(ownLibrary('libuffd_crc.so'), 'UFFD_NATIVE_CRC')
  if (!crcLib || (crcLib.func('uffd_crc32_fast', 'int', []) as () => number)() !== 1) return undefined
  return crcLib.func('uffd_crc32', 'uint32_t', ['uint32_t', 'void *', 'size_t']) as (crc: number, buf: Uint8Array, len: number) => number
}
export const crc32Native = loadCrc()

/**
 * native/libuffd_digest: page digests (NH, docs/FORMAT.md, Page digests) of `count` 4 KiB pages
 * at `pages`, 16 bytes each into `out`, with `keyWords` (Uint32Array of uffd_page_digest_key_words
 * words); `zero` (or null) gets a byte per page, 1 for an all-zero page; `scalar` 1 forces the portable path. Undefined when not built or turned off
 * (UFFD_NATIVE_DIGEST=0): src/format/page-digest.ts computes the same in JavaScript.
 */
type PageDigestsFn = (pages: Uint8Array, count: number, keyWords: Uint32Array, out: Uint8Array, zero: Uint8Array | null, scalar: number) => void
/**
 * The same of `count` pages of file `fd` from byte `offset`, through a mapping of the file (no
 * copy; the calling thread keeps the whole file mapped until filePageDigestsReleaseNative or
 * its end): 0, or -errno when it cannot be mapped (-ERANGE: past the file's end or not a
 * regular file), -EFAULT when the file shrank under the mapping (its SIGBUS caught there).
 */
type FilePageDigestsFn = (fd: number, offset: number, count: number, keyWords: Uint32Array, out: Uint8Array, zero: Uint8Array | null) => number
function loadDigest(): {pages: PageDigestsFn; file?: FilePageDigestsFn; release?: () => void} | undefined {
  const digestLib = loadOptional(ownLibrary('libuffd_digest.so'), 'UFFD_NATIVE_DIGEST')
  if (!digestLib) return undefined
  const keyWords = (digestLib.func('uffd_page_digest_key_words', 'int', []) as () => number)()
  // A library built for another key length would digest differently: use the JavaScript path.
  if (keyWords !== 1026) return undefined
  const pages = digestLib.func('uffd_page_digests', 'void', ['void *', 'size_t', 'void *', 'void *', 'void *', 'int']) as PageDigestsFn
  try {
    return {
      pages,
      file: digestLib.func('uffd_file_page_digests', 'int', ['int', 'int64_t', 'size_t', 'void *', 'void *', 'void *']) as FilePageDigestsFn,
      release: digestLib.func('uffd_file_digests_release', 'void', []) as () => void,
    }
  } catch {
    // A library built before these existed: digests of memory only (files are then read).
    return {pages}
  }
}
const digestNative = loadDigest()
export const pageDigestsNative = digestNative?.pages
export const filePageDigestsNative = digestNative?.file
/** Unmaps the file the calling thread's filePageDigestsNative keeps mapped (the whole file, between calls). */
export const filePageDigestsReleaseNative = digestNative?.release

/**
 * The first arguments of every libuffd_fill entry point: the client (its uffd, page states, the
 * snapshot's zero map, page size and regions) that blocks are installed into.
 */
const FILL_TARGET = ['int', 'uintptr_t', 'uint64_t', 'uintptr_t', 'uint64_t', 'uintptr_t', 'uint32_t']
export type FillTarget = [uffd: number, states: number, pageCount: number, zeroMap: number, pageSize: number, regions: number, regionCount: number]

/** uffd_fill_block (native/libuffd_fill.c): installs a packed working-set block's missing pages. */
export const fillBlock = fillLib?.func('uffd_fill_block', 'int', [...FILL_TARGET, 'uintptr_t', 'uint32_t', 'uintptr_t', 'int32_t', 'uint64_t', 'uintptr_t']) as
  | ((...args: [...FillTarget, runs: number, runCount: number, payload: number, firstRun: number, zeroWindowPages: number, out: number]) => number)
  | undefined

/** uffd_helper_start / uffd_helper_stop (native/libuffd_fill.c): blocks installed on a helper thread. */
export const helperStart = fillLib?.func('uffd_helper_start', 'uintptr_t', [...FILL_TARGET, 'uintptr_t', 'uint32_t', 'uint64_t', 'uintptr_t', 'uintptr_t', 'uintptr_t', 'int']) as
  | ((...args: [...FillTarget, jobs: number, jobCount: number, zeroWindowPages: number, jobState: number, gate: number, totals: number, notifyFd: number]) => number)
  | undefined
export const helperStop = fillLib?.func('uffd_helper_stop', 'int', ['uintptr_t']) as ((handle: number) => number) | undefined

/**
 * uffd_fill_abi (native/libuffd_fill.c): the library's own table of the indices and values it
 * shares with src/sys/fill.ts, as [name, value] pairs in its order.
 */
export const fillAbi = fillLib ? readFillAbi(fillLib) : undefined

function readFillAbi(library: ReturnType<typeof koffi.load>): () => Array<[string, number]> {
  const entry = koffi.struct('uffd_fill_abi_entry', {name: 'const char *', value: 'int64_t'})
  const table = library.func('uffd_fill_abi', koffi.pointer(entry), []) as () => unknown
  return () => {
    const pointer = table()
    const pairs: Array<[string, number]> = []
    for (let i = 0; ; i++) {
      const {name, value} = koffi.decode(pointer, i * koffi.sizeof(entry), entry) as {name: string | null; value: number}
      if (name === null) return pairs
      pairs.push([name, value])
    }
  }
}

/**
 * LZ4_decompress_safe from the system's liblz4 (Debian's apt depends on it, so it is nearly
 * always there), or undefined. It decodes straight into the caller's buffer, where lz4-napi
 * allocates a new one per block: replaying 406 MiB of 256 KiB blocks took 200 ms against 330 ms.
 * Safe means bounded: malformed input returns a negative number, it never writes past `dstCapacity`.
 */
export const lz4DecompressSafe = loadOptional('liblz4.so.1', 'UFFD_SYSTEM_LZ4')?.func('LZ4_decompress_safe', 'int', ['void *', 'void *', 'int', 'int']) as
  | ((src: Uint8Array, dst: Uint8Array, srcSize: number, dstCapacity: number) => number)
  | undefined

// Types not built into koffi; named after their C counterparts for readability.
const ssize_t = 'intptr_t'
const off_t = 'int64_t'

// --- files and descriptors ---------------------------------------------------------------------
export const close = lib.func('close', 'int', ['int']) as (fd: number) => number
export const read = lib.func('read', ssize_t, ['int', 'void *', 'size_t']) as (
  fd: number,
  buf: Uint8Array | Uint32Array | BigUint64Array,
  count: number,
) => number
export const write = lib.func('write', ssize_t, ['int', 'void *', 'size_t']) as (
  fd: number,
  buf: Uint8Array | Uint32Array | BigUint64Array,
  count: number,
) => number
export const preadAddr = lib.func('pread', ssize_t, ['int', 'uintptr_t', 'size_t', off_t]) as (
  fd: number,
  address: number,
  count: number,
  offset: number,
) => number
/** fcntl(fd, cmd, int): F_GETFL and F_SETFL only, whose argument is an int (or ignored). */
export const fcntl = lib.func('fcntl', 'int', ['int', 'int', 'int']) as (fd: number, cmd: number, arg: number) => number
export const flock = lib.func('flock', 'int', ['int', 'int']) as (fd: number, operation: number) => number
export const lseek = lib.func('lseek', off_t, ['int', off_t, 'int']) as (
  fd: number,
  offset: number,
  whence: number,
) => number
/**
 * posix_fadvise(2), called on a libuv thread (`.async`): WILLNEED submits the reads of the whole
 * range before it returns, which can wait on the device's queue. Returns the error number itself.
 */
export const posixFadviseAsync = (lib.func('posix_fadvise', 'int', ['int', off_t, off_t, 'int']) as unknown as {
  async: (fd: number, offset: number, len: number, advice: number, done: (error: unknown, result: number) => void) => void
}).async

// --- ioctl and raw syscalls --------------------------------------------------------------------
/** ioctl whose argument is a struct we own, passed by its raw address (hot path: no koffi marshalling). */
export const ioctlAddr = lib.func('ioctl', 'int', ['int', 'unsigned long', 'uintptr_t']) as (
  fd: number,
  request: number,
  argAddress: number,
) => number
/** ioctl whose argument is a plain integer (USERFAULTFD_IOC_NEW takes the open flags by value). */
export const ioctlInt = lib.func('ioctl', 'int', ['int', 'unsigned long', 'unsigned long']) as (
  fd: number,
  request: number,
  arg: number,
) => number
/** syscall(nr, int): used for userfaultfd(2), which glibc 2.36 does not wrap. */
export const syscallInt = lib.func('syscall', 'long', ['long', 'int']) as (nr: number, arg: number) => number
/** syscall(nr, int, unsigned): used for pidfd_open(2), which glibc 2.36 does not wrap. */
export const syscallIntUint = lib.func('syscall', 'long', ['long', 'int', 'unsigned int']) as (nr: number, a: number, b: number) => number
/** syscall(nr, int, int, address, unsigned): pidfd_send_signal(2) with a NULL siginfo, which glibc 2.36 does not wrap. */
export const syscallIntIntAddrUint = lib.func('syscall', 'long', ['long', 'int', 'int', 'uintptr_t', 'unsigned int']) as (nr: number, a: number, b: number, address: number, flags: number) => number
/** syscall(nr, pid, pid, int, unsigned long, unsigned long): kcmp(2), which glibc does not wrap. */
export const syscallKcmp = lib.func('syscall', 'long', ['long', 'int', 'int', 'int', 'unsigned long', 'unsigned long']) as (
  nr: number,
  pid1: number,
  pid2: number,
  type: number,
  idx1: number,
  idx2: number,
) => number
/** syscall(nr, int, address, size_t, int, unsigned): process_madvise(2), by raw iovec address. */
export const syscallMadvise = lib.func('syscall', 'long', ['long', 'int', 'uintptr_t', 'size_t', 'int', 'unsigned int']) as (
  nr: number,
  pidfd: number,
  iovAddress: number,
  vlen: number,
  advice: number,
  flags: number,
) => number

// --- memory ------------------------------------------------------------------------------------
export const mmap = lib.func('mmap', 'intptr_t', ['uintptr_t', 'size_t', 'int', 'int', 'int', off_t]) as (
  address: number,
  length: number,
  prot: number,
  flags: number,
  fd: number,
  offset: number,
) => number
export const munmap = lib.func('munmap', 'int', ['uintptr_t', 'size_t']) as (address: number, length: number) => number
export const madvise = lib.func('madvise', 'int', ['uintptr_t', 'size_t', 'int']) as (
  address: number,
  length: number,
  advice: number,
) => number
export const sysconf = lib.func('sysconf', 'long', ['int']) as (name: number) => number
export const gettid = lib.func('gettid', 'int', []) as () => number
/** setpriority(which, who, prio); with PRIO_PROCESS and a thread id it sets that thread's nice value (Linux). */
export const setpriority = lib.func('setpriority', 'int', ['int', 'unsigned int', 'int']) as (which: number, who: number, prio: number) => number
export const schedGetcpu = lib.func('sched_getcpu', 'int', []) as () => number
/** sched_setaffinity(pid, cpusetsize, mask); pid 0 is the calling thread (Linux). */
export const schedSetaffinity = lib.func('sched_setaffinity', 'int', ['int', 'size_t', 'void *']) as (pid: number, size: number, mask: Uint8Array) => number

// --- poll and eventfd --------------------------------------------------------------------------
export const poll = lib.func('poll', 'int', ['void *', 'unsigned long', 'int']) as (
  fds: Uint8Array,
  nfds: number,
  timeoutMs: number,
) => number
export const eventfd = lib.func('eventfd', 'int', ['unsigned int', 'int']) as (initval: number, flags: number) => number

// --- sockets -----------------------------------------------------------------------------------
export const socket = lib.func('socket', 'int', ['int', 'int', 'int']) as (
  domain: number,
  type: number,
  protocol: number,
) => number
export const bind = lib.func('bind', 'int', ['int', 'void *', 'unsigned int']) as (
  fd: number,
  addr: Uint8Array,
  addrlen: number,
) => number
export const connect = lib.func('connect', 'int', ['int', 'void *', 'unsigned int']) as (
  fd: number,
  addr: Uint8Array,
  addrlen: number,
) => number
export const listen = lib.func('listen', 'int', ['int', 'int']) as (fd: number, backlog: number) => number
/** accept4 without the peer address (addr and addrlen NULL). */
export const accept4 = lib.func('accept4', 'int', ['int', 'uintptr_t', 'uintptr_t', 'int']) as (
  fd: number,
  addr: 0,
  addrlen: 0,
  flags: number,
) => number
export const sendmsg = lib.func('sendmsg', ssize_t, ['int', 'void *', 'int']) as (
  fd: number,
  msg: Uint8Array,
  flags: number,
) => number
export const recvmsg = lib.func('recvmsg', ssize_t, ['int', 'void *', 'int']) as (
  fd: number,
  msg: Uint8Array,
  flags: number,
) => number
export const getsockopt = lib.func('getsockopt', 'int', ['int', 'int', 'int', 'void *', 'void *']) as (
  fd: number,
  level: number,
  name: number,
  value: Uint8Array,
  valueLength: Uint32Array,
) => number

// --- other processes ---------------------------------------------------------------------------
export const processVmReadv = lib.func('process_vm_readv', ssize_t, [
  'int',
  'void *',
  'unsigned long',
  'void *',
  'unsigned long',
  'unsigned long',
]) as (
  pid: number,
  localIov: Uint8Array,
  localCount: number,
  remoteIov: Uint8Array,
  remoteCount: number,
  flags: number,
) => number

/** errno of the last failed libc call on this thread. Read it before any other libc call. */
export function lastErrno(): number {
  return koffi.errno()
}

/** Throws a SysError for the libc call that just failed on this thread, with its errno. */
export function fail(syscall: string, step: string): never {
  throw new SysError(syscall, koffi.errno(), step)
}

/**
 * native/libuffd_preread's paced read-ahead of a whole file, called on a libuv thread: (fd,
 * size, step, address of an Int32 stop flag it reads between steps, done(error, bytes asked or
 * -errno)). Loaded when first asked (only `--preread auto` wants it); undefined when not built or
 * turned off (UFFD_NATIVE_PREREAD=0).
 */
type PrereadPacedAsync = (fd: number, size: number, step: number, stopAddress: number, done: (error: unknown, result: number) => void) => void
let prereadPaced: PrereadPacedAsync | null | undefined
export function prereadPacedNative(): PrereadPacedAsync | undefined {
  if (prereadPaced === undefined) {
    const fn = loadOptional(ownLibrary('libuffd_preread.so'), 'UFFD_NATIVE_PREREAD')?.func('uffd_preread_paced', 'int64_t', ['int', 'int64_t', 'int64_t', 'uintptr_t'])
    prereadPaced = fn ? (fn as unknown as {async: PrereadPacedAsync}).async : null
  }
  return prereadPaced ?? undefined
}

/** Address of a Buffer's or typed array's first byte (its byteOffset included), as a number. */
export function addressOfView(view: ArrayBufferView): number {
  return Number(koffi.address(view))
}

/** A zero-copy ArrayBuffer over memory that we mapped ourselves. */
export function viewAt(address: number, length: number): ArrayBuffer {
  return koffi.view(address, length)
}
