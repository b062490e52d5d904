// Reading another process's memory, for snapshots of live processes: process_vm_readv(2) copies
// straight from the target's address space, one syscall per range, without the seek + read of
// /proc/PID/mem. It needs ptrace access to the target (same uid and not dumpable-protected, or
// CAP_SYS_PTRACE), and it does not fault pages in on the target's behalf: a range that is not
// mapped stops the copy (partial result) or fails with EFAULT.

import {Errno} from './errors.js'
import * as libc from './libc.js'
import {IOVEC_LAYOUT, RawStruct, checkUnsigned, hex} from './raw.js'

const localIov = new RawStruct(IOVEC_LAYOUT.size)
const remoteIov = new RawStruct(IOVEC_LAYOUT.size)

/**
 * Copies `len` bytes at `remoteAddress` in process `pid` into `localBuffer` (from its start;
 * `len` <= its length). Returns the bytes copied: less than `len` if the remote range runs into
 * an unmapped page part way. Throws SysError: ESRCH (no such process), EPERM (no ptrace
 * access), EFAULT (the first remote page is not mapped).
 */
export function processVmReadv(pid: number, localBuffer: Uint8Array, remoteAddress: number, len: number): number {
  checkUnsigned('remoteAddress', remoteAddress)
  if (!Number.isSafeInteger(len) || len <= 0 || len > localBuffer.length) {
    throw new RangeError(`len must be in [1, ${localBuffer.length}] (the local buffer's length), got ${len}`)
  }
  localIov.set64(IOVEC_LAYOUT.base, libc.addressOfView(localBuffer))
  localIov.set64(IOVEC_LAYOUT.len, len)
  remoteIov.set64(IOVEC_LAYOUT.base, remoteAddress)
  remoteIov.set64(IOVEC_LAYOUT.len, len)
  const n = libc.processVmReadv(pid, localIov.bytes, 1, remoteIov.bytes, 1, 0)
  if (n < 0) libc.fail('process_vm_readv', `reading ${len} bytes at ${hex(remoteAddress)} of process ${pid}`)
  return n
}

/** pidfd_open(2) on x86-64. */
export const SYS_PIDFD_OPEN = 434

/**
 * A pidfd for process `pid` (close-on-exec). Polling it reports POLLIN once the process has
 * exited: the one race-free way to notice a client's death (a pid can be reused; a uffd gives no
 * sign when its process exits). Throws SysError ESRCH if there is no such process.
 */
export function pidfdOpen(pid: number): number {
  checkUnsigned('pid', pid)
  const fd = libc.syscallIntUint(SYS_PIDFD_OPEN, pid, 0)
  if (fd < 0) libc.fail('pidfd_open', `opening a pidfd for process ${pid}`)
  return fd
}

/** pidfd_send_signal(2) on x86-64. */
export const SYS_PIDFD_SEND_SIGNAL = 424
export const SIGKILL = 9

/**
 * Sends `signal` to the process behind `pidfd`. A pidfd names one process for good: unlike
 * kill(pid), a pid freed by the process's exit and reused meanwhile cannot redirect the signal.
 * Returns false if the process has already exited (ESRCH); throws SysError otherwise (EPERM).
 */
export function pidfdSendSignal(pidfd: number, signal: number): boolean {
  checkUnsigned('pidfd', pidfd)
  if (libc.syscallIntIntAddrUint(SYS_PIDFD_SEND_SIGNAL, pidfd, signal, 0, 0) === 0) return true
  if (libc.lastErrno() === Errno.ESRCH) return false
  libc.fail('pidfd_send_signal', `sending signal ${signal} through pidfd ${pidfd}`)
}

/** kcmp(2) on x86-64, and its KCMP_FILE type (include/uapi/linux/kcmp.h). */
export const SYS_KCMP = 312
export const KCMP_FILE = 0

/**
 * Whether two of this process's descriptors refer to one open file (one `struct file`): a dup(),
 * or the same file received twice over SCM_RIGHTS. Comparing fstat's inode is not enough in
 * general: many anonymous-inode files (eventfds, epoll, older kernels' userfaultfds) share the
 * one anon_inode inode, and inode numbers are a wrapping counter. kcmp compares the file
 * pointers themselves (needs CONFIG_KCMP, which CRIU needs too). Throws SysError (EBADF).
 */
export function sameOpenFile(fdA: number, fdB: number): boolean {
  checkUnsigned('fdA', fdA)
  checkUnsigned('fdB', fdB)
  const order = libc.syscallKcmp(SYS_KCMP, process.pid, process.pid, KCMP_FILE, fdA, fdB)
  if (order < 0) libc.fail('kcmp', `comparing fds ${fdA} and ${fdB}`)
  return order === 0
}

/** process_madvise(2) on x86-64. */
export const SYS_PROCESS_MADVISE = 440
/** Ranges per process_madvise call: the kernel's UIO_MAXIOV. */
export const PROCESS_MADVISE_MAX_RANGES = 1024

const madviseIovecs = new RawStruct(IOVEC_LAYOUT.size * PROCESS_MADVISE_MAX_RANGES)

/**
 * Applies `advice` to address ranges of the process behind `pidfd` (one syscall per 1024
 * ranges). Needs ptrace read access to it and CAP_SYS_NICE. Returns the bytes advised. Throws
 * SysError: ESRCH (the process is gone), EPERM (no permission), EINVAL (an advice the kernel does
 * not accept remotely, or a bad range).
 */
export function processMadvise(pidfd: number, ranges: readonly {address: number; length: number}[], advice: number): number {
  let advised = 0
  for (let from = 0; from < ranges.length; from += PROCESS_MADVISE_MAX_RANGES) {
    const batch = ranges.slice(from, from + PROCESS_MADVISE_MAX_RANGES)
    batch.forEach((r, i) => {
      checkUnsigned('address', r.address)
      madviseIovecs.set64(i * IOVEC_LAYOUT.size + IOVEC_LAYOUT.base, r.address)
      madviseIovecs.set64(i * IOVEC_LAYOUT.size + IOVEC_LAYOUT.len, r.length)
    })
    const n = libc.syscallMadvise(SYS_PROCESS_MADVISE, pidfd, madviseIovecs.address, batch.length, advice, 0)
    if (n < 0) libc.fail('process_madvise', `advising ${batch.length} range(s) from ${hex(batch[0].address)}`)
    advised += n
  }
  return advised
}

const PRIO_PROCESS = 0

/**
 * Lowers (or raises, as root) the calling thread's scheduling priority: on Linux a nice value
 * belongs to a thread, so setpriority(PRIO_PROCESS, gettid()) leaves the process's other threads
 * alone. Background work (chunk decoders) niced this way yields the CPU to the fault loop and to
 * the client whenever they need it, and still uses every idle cycle.
 */
export function setThreadNice(nice: number): void {
  if (libc.setpriority(PRIO_PROCESS, libc.gettid(), nice) !== 0) libc.fail('setpriority', `setting this thread's nice value to ${nice}`)
}

/** glibc's cpu_set_t: a bit per CPU for 1024 CPUs. */
const CPU_SET_BYTES = 128

/**
 * Pins the calling thread to the CPU it is running on, and returns that CPU. A page the thread
 * installs (UFFDIO_COPY) waits in that CPU's LRU-add batch until the batch drains, and
 * MADV_COLD skips pages not yet on an LRU list, draining only its own CPU's batch first: a thread
 * that moved to another CPU in between would leave its last pages' accessed bits set.
 */
export function pinThreadToCurrentCpu(): number {
  const cpu = libc.schedGetcpu()
  if (cpu < 0) libc.fail('sched_getcpu', 'finding the CPU this thread runs on')
  if (cpu >= CPU_SET_BYTES * 8) throw new RangeError(`CPU ${cpu} is beyond the ${CPU_SET_BYTES * 8} a cpu_set_t holds`)
  const mask = new Uint8Array(CPU_SET_BYTES)
  mask[cpu >> 3] = 1 << (cpu & 7)
  if (libc.schedSetaffinity(0, CPU_SET_BYTES, mask) !== 0) libc.fail('sched_setaffinity', `pinning this thread to CPU ${cpu}`)
  return cpu
}
