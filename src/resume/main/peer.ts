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
    if (!(error instanceof SysError)) throw error
    if (EXHAUSTED.has(error.code)) return {pid, pidfd: -1}
    // ENOPROTOOPT before 6.5; ESRCH, EINVAL or ENODATA when the kernel has no pidfd for the
    // peer: the pid it connected with is all that is left.
  }
  try {
    return {pid, pidfd: pidfdOpen(pid)}
  } catch (error) {
    // Gone already (ESRCH), out of descriptors, or not allowed: known by its pid only, it cannot
    // be killed, and its handshake socket closing is the sign it has gone.
    if (error instanceof SysError) return {pid, pidfd: -1}
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

