import {type Geometry} from '../../format/geometry.js'
import {fillRegions} from '../../sys/index.js'
import {type GuestRegion} from '../protocol.js'
import {AddressMap} from './address-map.js'
import {NO_WINDOW, type WindowHistory} from './fault-window.js'
import {type WorkingSetHelper} from './working-set-helper.js'
import {PageStates} from './page-states.js'

/** A fault read from the uffd and not yet served. */
export interface PendingFault {
  address: number
  /** performance.now() when the message was read, for the latency histogram. */
  readAt: number
}

/** How the fault loop learns that a client is gone (a uffd never reports the end of its process). */
export interface ClientLifeline {
  /** Becomes readable when the client process exits; -1 if its pid is unknown. */
  pidfd: number
  /** The client's handshake socket: EOF ends the client when there is no pidfd; -1 if none. */
  socket: number
}

/** One client (a VMM or a restored process) whose memory is served through one uffd. */
export class Client {
  readonly map: AddressMap
  readonly states: PageStates
  readonly pending: PendingFault[] = []
  /** Pages inside the client's regions: memory is complete when all are present or removed. */
  readonly regionPages: number
  /** A pidfd for process_madvise when prefetch hits are counted (else -1). */
  hitTrackingPidfd = -1
  /** Serving failed: the uffd stays open but unread, so the client stays frozen, never fed zeros. */
  failed = false
  /** A thread installing part of the working set beside the fault loop, while it runs. */
  helper: WorkingSetHelper | undefined
  /** The window the last served fault installed around itself: the next one grows from it if it lands near. */
  faultWindow: WindowHistory = NO_WINDOW
  /**
   * Known-zero image page ranges [first, end) that an UNREGISTER failing midway may have left
   * to the kernel, and that could not be registered again (see Installer.handToKernel): a page
   * there that is not registered any more is the kernel's to fill with zeros, not a sign that
   * the client is gone.
   */
  readonly kernelZerosUnsure: {first: number; end: number}[] = []
  /** A native block fill met a range it could not fill whole (ENOENT): this client's blocks go through the installer's own calls from then on. */
  nativeFillsOff = false
  private fillRegionTable: BigUint64Array | undefined

  /**
   * `nonCooperative`: a process restored by CRIU, which does not announce its memory layout
   * changes but lets the kernel report them (fork, mremap, munmap): its faults outside the
   * snapshot's regions are fresh memory, and its mappings can be split or moved under us.
   */
  constructor(
    readonly id: number,
    readonly uffd: number,
    regions: readonly GuestRegion[],
    geometry: Geometry,
    readonly lifeline: ClientLifeline = {pidfd: -1, socket: -1},
    readonly nonCooperative = false,
    inherited?: {states: PageStates; regionPages: number},
  ) {
    this.map = new AddressMap(regions)
    this.states = inherited?.states ?? new PageStates(geometry.pageCount)
    this.regionPages = inherited?.regionPages ?? regions.reduce((sum, r) => sum + r.size / geometry.pageSize, 0)
  }

  /** The regions as the native block fill takes them (a cooperative client's never change). */
  get fillRegions(): BigUint64Array {
    return (this.fillRegionTable ??= fillRegions(this.map.all.map((r) => ({offset: r.offset, size: r.size, base: r.baseHostVirtAddr}))))
  }

  /** Pages that are present or removed, of all the client's region pages. */
  get isComplete(): boolean {
    return this.states.settledCount >= this.regionPages
  }

  /**
   * The client for a child this process forked (UFFD_EVENT_FORK), with the child's new uffd:
   * fork copies the page tables, so what is present here is present there and what is missing
   * is missing there too. While the event is unread the kernel fails copies into the parent with
   * EAGAIN (mmap_changing), so the parent's states are exactly the child's at this point. The
   * child's pid is not in the event: it has no lifeline, and is gone when copies into it fail
   * with ESRCH (its mm is gone).
   */
  fork(id: number, uffd: number, geometry: Geometry): Client {
    // Unmapped pages are settled in the copy as they are here, so the total stays the parent's.
    return new Client(id, uffd, this.map.all, geometry, {pidfd: -1, socket: -1}, true, {states: this.states.clone(), regionPages: this.regionPages})
  }

  /** Without a pidfd or a socket, a failed copy is the only sign the process is gone. */
  get endsOnlyByFailedCopies(): boolean {
    return this.lifeline.pidfd < 0 && this.lifeline.socket < 0
  }
}
