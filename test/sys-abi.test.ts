// Every ABI number hand-typed in src/sys/ against the C headers, through native/abi_dump.c.
// The table must cover the dump exactly: a constant added on one side only fails the test too.

import {execFileSync} from 'node:child_process'
import {fileURLToPath} from 'node:url'

import {describe, expect, it} from 'vitest'

import {MADV, MAP, PROT, SC_PAGESIZE} from '../src/sys/memory.js'
import {EFD_CLOEXEC, EFD_NONBLOCK, POLLERR, POLLFD_LAYOUT, POLLHUP, POLLIN, POLLNVAL, POLLOUT} from '../src/sys/poll.js'
import {F_DUPFD_CLOEXEC, F_GETFL, F_SETFL, SEEK_DATA, SEEK_HOLE} from '../src/sys/file.js'
import {KCMP_FILE, SIGKILL, SYS_KCMP, SYS_PIDFD_OPEN, SYS_PIDFD_SEND_SIGNAL, SYS_PROCESS_MADVISE} from '../src/sys/process.js'
import {IOVEC_LAYOUT} from '../src/sys/raw.js'
import * as S from '../src/sys/socket.js'
import * as U from '../src/sys/uffd.js'

const root = fileURLToPath(new URL('..', import.meta.url))

function dumpAbi(): Record<string, number> {
  execFileSync('make', ['-s', '-C', 'native', 'build/abi_dump'], {cwd: root, stdio: 'inherit'})
  return JSON.parse(execFileSync(`${root}/native/build/abi_dump`, {encoding: 'utf8'})) as Record<string, number>
}

const expected: Record<string, number> = {
  // userfaultfd creation
  __NR_userfaultfd: U.SYS_USERFAULTFD,
  UFFD_USER_MODE_ONLY: U.UFFD_USER_MODE_ONLY,
  USERFAULTFD_IOC_NEW: U.USERFAULTFD_IOC_NEW,
  O_CLOEXEC: U.O_CLOEXEC,
  O_NONBLOCK: U.O_NONBLOCK,
  // ioctls
  UFFD_API: U.UFFD_API,
  UFFDIO_API: U.UFFDIO_API,
  UFFDIO_REGISTER: U.UFFDIO_REGISTER,
  UFFDIO_UNREGISTER: U.UFFDIO_UNREGISTER,
  UFFDIO_WAKE: U.UFFDIO_WAKE,
  UFFDIO_COPY: U.UFFDIO_COPY,
  UFFDIO_ZEROPAGE: U.UFFDIO_ZEROPAGE,
  _UFFDIO_REGISTER: U.UFFDIO_BIT.REGISTER,
  _UFFDIO_UNREGISTER: U.UFFDIO_BIT.UNREGISTER,
  _UFFDIO_WAKE: U.UFFDIO_BIT.WAKE,
  _UFFDIO_COPY: U.UFFDIO_BIT.COPY,
  _UFFDIO_ZEROPAGE: U.UFFDIO_BIT.ZEROPAGE,
  _UFFDIO_WRITEPROTECT: U.UFFDIO_BIT.WRITEPROTECT,
  _UFFDIO_CONTINUE: U.UFFDIO_BIT.CONTINUE,
  _UFFDIO_API: U.UFFDIO_BIT.API,
  // features, modes, events, flags
  ...Object.fromEntries(Object.entries(U.UFFD_FEATURE).map(([k, v]) => [`UFFD_FEATURE_${k}`, v])),
  ...Object.fromEntries(Object.entries(U.UFFDIO_REGISTER_MODE).map(([k, v]) => [`UFFDIO_REGISTER_MODE_${k}`, v])),
  UFFDIO_COPY_MODE_DONTWAKE: U.UFFDIO_COPY_MODE_DONTWAKE,
  UFFDIO_COPY_MODE_WP: U.UFFDIO_COPY_MODE_WP,
  UFFDIO_ZEROPAGE_MODE_DONTWAKE: U.UFFDIO_ZEROPAGE_MODE_DONTWAKE,
  ...Object.fromEntries(Object.entries(U.UFFD_EVENT).map(([k, v]) => [`UFFD_EVENT_${k}`, v])),
  ...Object.fromEntries(Object.entries(U.UFFD_PAGEFAULT_FLAG).map(([k, v]) => [`UFFD_PAGEFAULT_FLAG_${k}`, v])),
  // uffd structs
  'sizeof:uffd_msg': U.UFFD_MSG_LAYOUT.size,
  'offsetof:uffd_msg.event': U.UFFD_MSG_LAYOUT.event,
  'offsetof:uffd_msg.arg.pagefault.flags': U.UFFD_MSG_LAYOUT.pagefaultFlags,
  'offsetof:uffd_msg.arg.pagefault.address': U.UFFD_MSG_LAYOUT.pagefaultAddress,
  'offsetof:uffd_msg.arg.pagefault.feat.ptid': U.UFFD_MSG_LAYOUT.pagefaultPtid,
  'offsetof:uffd_msg.arg.fork.ufd': U.UFFD_MSG_LAYOUT.forkUfd,
  'offsetof:uffd_msg.arg.remap.from': U.UFFD_MSG_LAYOUT.remapFrom,
  'offsetof:uffd_msg.arg.remap.to': U.UFFD_MSG_LAYOUT.remapTo,
  'offsetof:uffd_msg.arg.remap.len': U.UFFD_MSG_LAYOUT.remapLen,
  'offsetof:uffd_msg.arg.remove.start': U.UFFD_MSG_LAYOUT.removeStart,
  'offsetof:uffd_msg.arg.remove.end': U.UFFD_MSG_LAYOUT.removeEnd,
  'sizeof:uffdio_api': U.UFFDIO_API_LAYOUT.size,
  'offsetof:uffdio_api.api': U.UFFDIO_API_LAYOUT.api,
  'offsetof:uffdio_api.features': U.UFFDIO_API_LAYOUT.features,
  'offsetof:uffdio_api.ioctls': U.UFFDIO_API_LAYOUT.ioctls,
  'sizeof:uffdio_range': U.UFFDIO_RANGE_LAYOUT.size,
  'offsetof:uffdio_range.start': U.UFFDIO_RANGE_LAYOUT.start,
  'offsetof:uffdio_range.len': U.UFFDIO_RANGE_LAYOUT.len,
  'sizeof:uffdio_register': U.UFFDIO_REGISTER_LAYOUT.size,
  'offsetof:uffdio_register.range.start': U.UFFDIO_REGISTER_LAYOUT.start,
  'offsetof:uffdio_register.range.len': U.UFFDIO_REGISTER_LAYOUT.len,
  'offsetof:uffdio_register.mode': U.UFFDIO_REGISTER_LAYOUT.mode,
  'offsetof:uffdio_register.ioctls': U.UFFDIO_REGISTER_LAYOUT.ioctls,
  'sizeof:uffdio_copy': U.UFFDIO_COPY_LAYOUT.size,
  'offsetof:uffdio_copy.dst': U.UFFDIO_COPY_LAYOUT.dst,
  'offsetof:uffdio_copy.src': U.UFFDIO_COPY_LAYOUT.src,
  'offsetof:uffdio_copy.len': U.UFFDIO_COPY_LAYOUT.len,
  'offsetof:uffdio_copy.mode': U.UFFDIO_COPY_LAYOUT.mode,
  'offsetof:uffdio_copy.copy': U.UFFDIO_COPY_LAYOUT.copy,
  'sizeof:uffdio_zeropage': U.UFFDIO_ZEROPAGE_LAYOUT.size,
  'offsetof:uffdio_zeropage.range.start': U.UFFDIO_ZEROPAGE_LAYOUT.start,
  'offsetof:uffdio_zeropage.range.len': U.UFFDIO_ZEROPAGE_LAYOUT.len,
  'offsetof:uffdio_zeropage.mode': U.UFFDIO_ZEROPAGE_LAYOUT.mode,
  'offsetof:uffdio_zeropage.zeropage': U.UFFDIO_ZEROPAGE_LAYOUT.zeropage,
  // poll and eventfd
  'sizeof:pollfd': POLLFD_LAYOUT.size,
  'offsetof:pollfd.fd': POLLFD_LAYOUT.fd,
  'offsetof:pollfd.events': POLLFD_LAYOUT.events,
  'offsetof:pollfd.revents': POLLFD_LAYOUT.revents,
  POLLIN,
  POLLOUT,
  POLLERR,
  POLLHUP,
  POLLNVAL,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  // memory
  _SC_PAGESIZE: SC_PAGESIZE,
  ...Object.fromEntries(Object.entries(PROT).map(([k, v]) => [`PROT_${k}`, v])),
  MAP_SHARED: MAP.SHARED,
  MAP_PRIVATE: MAP.PRIVATE,
  MAP_ANONYMOUS: MAP.ANONYMOUS,
  MAP_NORESERVE: MAP.NORESERVE,
  MAP_HUGETLB: MAP.HUGETLB,
  MAP_HUGE_2MB: MAP.HUGE_2MB,
  ...Object.fromEntries(Object.entries(MADV).map(([k, v]) => [`MADV_${k}`, v])),
  // processes
  __NR_pidfd_open: SYS_PIDFD_OPEN,
  __NR_process_madvise: SYS_PROCESS_MADVISE,
  __NR_pidfd_send_signal: SYS_PIDFD_SEND_SIGNAL,
  __NR_kcmp: SYS_KCMP,
  KCMP_FILE,
  SIGKILL,
  // files
  SEEK_DATA,
  SEEK_HOLE,
  F_GETFL,
  F_SETFL,
  F_DUPFD_CLOEXEC,
  // sockets
  AF_UNIX: S.AF_UNIX,
  SOCK_STREAM: S.SOCK_STREAM,
  SOCK_CLOEXEC: S.SOCK_CLOEXEC,
  SOCK_NONBLOCK: S.SOCK_NONBLOCK,
  SOL_SOCKET: S.SOL_SOCKET,
  SO_PEERCRED: S.SO_PEERCRED,
  SCM_RIGHTS: S.SCM_RIGHTS,
  MSG_CTRUNC: S.MSG_CTRUNC,
  MSG_DONTWAIT: S.MSG_DONTWAIT,
  MSG_NOSIGNAL: S.MSG_NOSIGNAL,
  MSG_CMSG_CLOEXEC: S.MSG_CMSG_CLOEXEC,
  'sizeof:sockaddr_un': S.SOCKADDR_UN_LAYOUT.size,
  'offsetof:sockaddr_un.sun_family': S.SOCKADDR_UN_LAYOUT.family,
  'offsetof:sockaddr_un.sun_path': S.SOCKADDR_UN_LAYOUT.path,
  'sizeof:msghdr': S.MSGHDR_LAYOUT.size,
  'offsetof:msghdr.msg_name': S.MSGHDR_LAYOUT.name,
  'offsetof:msghdr.msg_namelen': S.MSGHDR_LAYOUT.namelen,
  'offsetof:msghdr.msg_iov': S.MSGHDR_LAYOUT.iov,
  'offsetof:msghdr.msg_iovlen': S.MSGHDR_LAYOUT.iovlen,
  'offsetof:msghdr.msg_control': S.MSGHDR_LAYOUT.control,
  'offsetof:msghdr.msg_controllen': S.MSGHDR_LAYOUT.controllen,
  'offsetof:msghdr.msg_flags': S.MSGHDR_LAYOUT.flags,
  'sizeof:iovec': IOVEC_LAYOUT.size,
  'offsetof:iovec.iov_base': IOVEC_LAYOUT.base,
  'offsetof:iovec.iov_len': IOVEC_LAYOUT.len,
  'sizeof:cmsghdr': S.CMSGHDR_LAYOUT.size,
  'offsetof:cmsghdr.cmsg_len': S.CMSGHDR_LAYOUT.len,
  'offsetof:cmsghdr.cmsg_level': S.CMSGHDR_LAYOUT.level,
  'offsetof:cmsghdr.cmsg_type': S.CMSGHDR_LAYOUT.type,
  'CMSG_LEN(0)': S.CMSGHDR_LAYOUT.data,
  'CMSG_ALIGN(1)': S.CMSGHDR_LAYOUT.align,
  'sizeof:ucred': S.UCRED_LAYOUT.size,
  'offsetof:ucred.pid': S.UCRED_LAYOUT.pid,
  'offsetof:ucred.uid': S.UCRED_LAYOUT.uid,
  'offsetof:ucred.gid': S.UCRED_LAYOUT.gid,
}

describe('ABI constants match the C headers (native/abi_dump.c)', () => {
  const dumped = dumpAbi()

  it('covers the same names on both sides', () => {
    expect(Object.keys(expected).sort()).toEqual(Object.keys(dumped).sort())
  })

  it.each(Object.keys(dumped).sort())('%s', (name) => {
    expect(expected[name]).toBe(dumped[name])
  })
})
