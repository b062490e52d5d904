// The public surface of src/sys, the only layer of the program that calls libc.

export {Errno, SysError, errnoName, rethrowAsSysError} from './errors.js'
export {
  type CreateUserfaultfdOptions,
  type FillOptions,
  type FillResult,
  type UffdApiResult,
  type UffdMessage,
  UFFD_EVENT,
  UFFD_FEATURE,
  UFFD_MSG_SIZE,
  UFFD_PAGEFAULT_FLAG,
  UFFDIO_BIT,
  UFFDIO_REGISTER_MODE,
  createUserfaultfd,
  decodeCopyResult,
  decodeUffdMessage,
  hasIoctl,
  isUserfaultfd,
  readUffdMessages,
  uffdApi,
  uffdApiCompleted,
  uffdCopy,
  uffdRegister,
  uffdUnregister,
  uffdWake,
  uffdZeropage,
} from './uffd.js'
export {
  type BlockFillResult,
  type FillRegion,
  type HelperJob,
  FILL_ABI,
  InstallHelper,
  fillRegions,
  nativeBlockFill,
  uffdFillBlock,
} from './fill.js'
export {
  type ListenOptions,
  type PeerCredentials,
  type Received,
  MAX_FDS_PER_MESSAGE,
  acceptUnix,
  closeFd,
  connectUnix,
  listenUnix,
  peerCredentials,
  peerPidfd,
  readSome,
  recvWithFds,
  sendWithFds,
  unlinkIfSocket,
  writeAll,
} from './socket.js'
export {
  type PollEntry,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLNVAL,
  POLLOUT,
  PollSet,
  createEventfd,
  eventfdDrain,
  eventfdSignal,
  poll,
} from './poll.js'
export {
  type MmapAnonymousOptions,
  HUGE_PAGE_SIZE,
  MADV,
  PAGE_SIZE,
  PROT,
  addressOf,
  bufferAt,
  madvise,
  mmapAnonymous,
  mmapFile,
  munmap,
} from './memory.js'
export {adviseWillNeed, dupFd, fsyncDir, preadInto, prereadPaced, seekData, seekHole, setNonBlocking, tryLockExclusive} from './file.js'
export {hasSystemLz4, lz4DecodeBlock} from './lz4.js'
export {crc32, nativeCrc32} from './crc.js'
export {nativeDigests, pageDigests} from './digest.js'
export {SIGKILL, pidfdOpen, pidfdSendSignal, pinThreadToCurrentCpu, processMadvise, processVmReadv, sameOpenFile, setThreadNice} from './process.js'
