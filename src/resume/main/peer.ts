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
 * Whether a peer's pidfd is asked of its socket (SO_PEERPIDFD). UFFD_PEERPIDFD=0 makes the handler
 * take every pidfd as on a kernel before 6.5, which has no SO_PEERPIDFD (pidfd_open of the
 * SO_PEERCRED pid): for the tests of that path (test/hostile-vmms.test.ts) on newer kernels.
 */
export const PEER_PIDFD = process.env.UFFD_PEERPIDFD !== '0'

/**
 * What SO_PEERPIDFD's answer (a pidfd, or the errno name it failed with) leaves to do: 'have' it;
 * 'later', out of descriptors or memory for now (peerAgain); 'by-pid', pidfd_open of the pid it
 * connected with: ENOPROTOOPT before Linux 6.5, and ESRCH, EINVAL or ENODATA when the kernel has
 * no pidfd for the peer.
 */
export function afterPeerPidfd(answer: number | string): 'have' | 'later' | 'by-pid' {
  if (typeof answer === 'number') return 'have'
  return EXHAUSTED.has(answer) ? 'later' : 'by-pid'
}

/**
 * The peer of `connection`. SO_PEERPIDFD (Linux >= 6.5) gives a pidfd for the very process that
 * connected. Before 6.5 (or with `peerPidfd` false) the pid from SO_PEERCRED is opened with
 * pidfd_open, here, at accept: if the peer exited while its connection waited in the backlog and
 * its pid was reused since, that pidfd names the newcomer. The window is the backlog wait (pids
 * are reused only after pid_max more forks), and from then on the pidfd cannot change what it
 * names, as a pid passed to kill() later could.
 */
export function peerOf(connection: number, peerPidfdFirst = PEER_PIDFD): Peer {
  const {pid} = peerCredentials(connection)
  // 0: the peer is in a pid namespace this process cannot see into.
  if (pid <= 0) return {pid: null, pidfd: -1}
  const answer = peerPidfdFirst ? askPeerPidfd(connection) : 'ENOPROTOOPT'
  switch (afterPeerPidfd(answer)) {
    case 'have':
      return {pid, pidfd: answer as number}
    case 'later':
      return {pid, pidfd: -1}
    case 'by-pid':
      try {
        return {pid, pidfd: pidfdOpen(pid)}
      } catch (error) {
        // Gone already (ESRCH), out of descriptors, or not allowed: known by its pid only, it
        // cannot be killed, and its handshake socket closing is the sign it has gone.
        if (error instanceof SysError) return {pid, pidfd: -1}
        throw error
      }
  }
}

/** SO_PEERPIDFD's pidfd for the peer of `connection`, or the errno name it failed with. */
function askPeerPidfd(connection: number): number | string {
  try {
    return peerPidfd(connection)
  } catch (error) {
    if (error instanceof SysError) return error.code
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

