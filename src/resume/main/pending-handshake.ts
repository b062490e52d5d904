import {UffdError} from '../../core/errors.js'
import {closeFd, isUserfaultfd, readSome, recvWithFds, SysError, uffdApiCompleted} from '../../sys/index.js'
import {HandshakeError, JSON_SCAN_START, MAX_HANDSHAKE_BYTES, scanJson} from './handshake.js'
import {type Peer} from './peer.js'

/** Where reading one connection's handshake stands after a step. */
export type HandshakeProgress =
  | {state: 'reading'}
  /** Closed without sending a byte: a liveness probe (another `uffd resume`, a health check), not a VMM. */
  | {state: 'probe'}
  /**
   * The whole message (its JSON value closed, the peer done sending, or more bytes than
   * MAX_HANDSHAKE_BYTES, which parseHandshake refuses) and the uffd that came with it, which is
   * the caller's from now on.
   */
  | {state: 'received'; uffd: number; data: Buffer}
  /**
   * It cannot become a handshake, or its deadline passed; what it received is closed.
   * `clientWaits`: what it received included an initialised userfaultfd (see holdsInitialisedUffd).
   */
  | {state: 'failed'; error: UffdError | SysError; clientWaits: boolean}

/**
 * One accepted connection's handshake, read as it arrives and never waited for: the main thread
 * reads every pending connection in turn, so one that sends nothing, or a byte at a time, holds up
 * neither the other VMs nor a signal. Its deadline counts from the accept and covers the whole
 * message, so dribbling bytes does not extend it.
 */
export class PendingHandshake {
  private readonly parts: Buffer[] = []
  private length = 0
  private scan = JSON_SCAN_START
  /** The uffd, which rides on the first bytes; later fds are not taken. */
  private uffd: number | undefined

  constructor(
    readonly connection: number,
    /** Who connected, taken at accept; the owner of the handshake closes its pidfd. */
    readonly peer: Peer,
    /** A Date.now() time; Infinity waits forever. */
    readonly deadline: number,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Reads whatever has arrived if `readable` (poll said so), then checks the deadline at `now`.
   * Never blocks.
   */
  step(readable: boolean, now: number): HandshakeProgress {
    try {
      const progress = readable ? this.readAvailable() : {state: 'reading' as const}
      if (progress.state !== 'reading') return progress
      if (now > this.deadline) return this.fail(this.expired())
      return progress
    } catch (error) {
      if (error instanceof UffdError || error instanceof SysError) return this.fail(error)
      throw error
    }
  }

  /**
   * Whether the connection has handed over a userfaultfd its sender initialised (UFFDIO_API):
   * a VMM does that, registers its guest memory with it and only then sends it, so from here on
   * it may be waiting on faults that nobody serves if this handshake is given up on. A peer that
   * sent anything else is not waiting on this handler.
   */
  holdsInitialisedUffd(): boolean {
    if (this.uffd === undefined) return false
    try {
      return isUserfaultfd(this.uffd) && uffdApiCompleted(this.uffd)
    } catch (error) {
      // A descriptor that cannot even be probed is no uffd a VMM waits on.
      if (error instanceof SysError) return false
      throw error
    }
  }

  /**
   * Gives the handshake up (the handler stops taking clients): reads the first message if it has
   * arrived but was not read yet (never blocking), since a VMM sends its uffd only once its memory
   * is registered, so a uffd still in the socket is one it already waits on; then closes what it
   * sent (not the connection). Returns whether the sender waits on memory (holdsInitialisedUffd).
   */
  abandon(): boolean {
    if (this.uffd === undefined && this.length === 0) {
      try {
        this.receiveFirst()
      } catch (error) {
        // What cannot be read (a message without its fd, too many fds) brought no uffd to wait on.
        if (!(error instanceof UffdError || error instanceof SysError)) throw error
      }
    }
    const waits = this.holdsInitialisedUffd()
    this.discard()
    return waits
  }

  /** Closes what the connection sent (not the connection itself), when it is given up on. */
  private discard(): void {
    if (this.uffd !== undefined) closeFd(this.uffd)
    this.uffd = undefined
  }

  private readAvailable(): HandshakeProgress {
    for (;;) {
      const first = this.uffd === undefined && this.length === 0
      const more = first ? this.receiveFirst() : this.receiveMore()
      if (more === undefined) return {state: 'reading'}
      if (more.length === 0) {
        if (first) return {state: 'probe'}
        return this.received()
      }
      this.parts.push(more)
      this.length += more.length
      this.scan = scanJson(this.scan, more)
      if (this.length > MAX_HANDSHAKE_BYTES || this.scan.complete) return this.received()
    }
  }

  /** The first bytes and the fds that came with them; undefined when nothing has arrived yet. */
  private receiveFirst(): Buffer | undefined {
    let received: {data: Buffer; fds: number[]}
    try {
      received = recvWithFds(this.connection, MAX_HANDSHAKE_BYTES, 3, 0)
    } catch (error) {
      if (error instanceof SysError && error.code === 'ETIMEDOUT') return undefined
      if (error instanceof SysError && error.code === 'EMSGSIZE') throw new HandshakeError('more than 3 file descriptors came with the message (a VMM sends its uffd, and at most a memory fd or two after it)')
      throw error
    }
    const [uffd, ...extra] = received.fds
    // Forks send a memfd or guest_memfd after the uffd: only the uffd is ours to use.
    for (const fd of extra) closeFd(fd)
    if (received.data.length > 0 && uffd === undefined) throw new HandshakeError('no file descriptor came with the message (expected the uffd)')
    this.uffd = uffd
    return received.data
  }

  private receiveMore(): Buffer | undefined {
    try {
      return readSome(this.connection, MAX_HANDSHAKE_BYTES + 1 - this.length, 0)
    } catch (error) {
      if (error instanceof SysError && error.code === 'ETIMEDOUT') return undefined
      throw error
    }
  }

  private received(): HandshakeProgress {
    const uffd = this.uffd!
    this.uffd = undefined
    return {state: 'received', uffd, data: Buffer.concat(this.parts)}
  }

  private expired(): UffdError {
    const seconds = this.timeoutMs / 1000
    if (this.length === 0) return new UffdError('TIMEOUT', `a connection sent no handshake within ${seconds} s`)
    return new HandshakeError(`the message was still incomplete after ${seconds} s (${this.length} bytes)`)
  }

  private fail(error: UffdError | SysError): HandshakeProgress {
    const clientWaits = this.holdsInitialisedUffd()
    this.discard()
    return {state: 'failed', error, clientWaits}
  }
}
