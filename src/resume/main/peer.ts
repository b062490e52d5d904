import {peerCredentials, peerPidfd, pidfdOpen, pidfdSendSignal, SIGKILL, SysError} from '../../sys/index.js'

/**
 * The process at the other end of an accepted connection, as it is killed if it must not run on:
 * its pid (for the log and /proc) and a pidfd (for signals and its exit), -1 when none could be
 * had (the peer is in another pid namespace, or already gone). Taken once, at accept.
 */
export interface Peer {
  pid: number | null
  pidfd: number
}

/** getsockopt(SO_PEERPIDFD) errors after which the pid of SO_PEERCRED is the only way left. */
const NO_PEER_PIDFD = new Set(['ENOPROTOOPT', 'EINVAL', 'ESRCH', 'ENODATA'])
/** Out of descriptors or memory for now: the pidfd is taken later (peerAgain). */
const EXHAUSTED = new Set(['EMFILE', 'ENFILE', 'ENOMEM'])

/**
 * The peer of `connection`. SO_PEERPIDFD (Linux >= 6.5) gives a pidfd for the very process that
 * connected. Before 6.5 the pid from SO_PEERCRED is opened with pidfd_open, here, at accept: if
 * the peer exited while its connection waited in the backlog and its pid was reused since, that
 * pidfd names the newcomer. The window is the backlog wait (pids are reused only after pid_max
 * more forks), and from then on the pidfd cannot change what it names, as a pid passed to kill()
 * later could.
 */
export function peerOf(connection: number): Peer {
  const {pid} = peerCredentials(connection)
  // 0: the peer is in a pid namespace this process cannot see into.
  if (pid <= 0) return {pid: null, pidfd: -1}
  try {
    return {pid, pidfd: peerPidfd(connection)}
  } catch (error) {
    if (error instanceof SysError && EXHAUSTED.has(error.code)) return {pid, pidfd: -1}
    if (!(error instanceof SysError) || !NO_PEER_PIDFD.has(error.code)) throw error
  }
  try {
    return {pid, pidfd: pidfdOpen(pid)}
  } catch (error) {
    if (error instanceof SysError && (error.code === 'ESRCH' || EXHAUSTED.has(error.code))) return {pid, pidfd: -1}
    throw error
  }
}

/**
 * `peer`, with a pidfd if it had none for want of descriptors at accept (a peer holding many
 * connections open can exhaust them). SO_PEERPIDFD names the process that connected whenever it
 * is asked; only the fallback's pid has aged since.
 */
export function peerAgain(connection: number, peer: Peer): Peer {
  if (peer.pidfd >= 0 || peer.pid === null) return peer
  return peerOf(connection)
}

/** SIGKILLs the peer through its pidfd. Returns whether a signal was sent (false: no pidfd, or already exited). */
export function killPeer(peer: Peer): boolean {
  if (peer.pidfd < 0) return false
  return pidfdSendSignal(peer.pidfd, SIGKILL)
}

