// The installer: the only code in resume that puts pages into a client's memory. It issues every
// UFFDIO_COPY, UFFDIO_ZEROPAGE and UFFDIO_WAKE and every native block fill, marks page states as
// pages land, turns each errno into an outcome in one place (fillErrnoMeaning), and tells its
// callers what it did: they never look at the global counters to find out. An errno it does not
// expect is a SysError (its code the errno name): serving that client is impossible.

import {type ZeroMap} from '../../format/zero-map.js'
import {addressOf, type BlockFillResult, Errno, type FillResult, type HelperJob, InstallHelper, nativeBlockFill, SysError, UFFDIO_REGISTER_MODE, uffdCopy, uffdFillBlock, uffdRegister, uffdUnregister, uffdWake, uffdZeropage} from '../../sys/index.js'
import {type GuestRegion} from '../protocol.js'
import {type RunStats} from '../run-stats.js'
import {type Client} from './client.js'
import {PAGE_MISSING} from './page-states.js'

/**
 * What happened to a request for a client: 'served' (every page asked for is present, or was
 * never the handler's to fill), 'retry' (the client's address space is changing: read its events
 * first, then ask again), 'gone' (its whole address space is gone: the process exited, or exec'd;
 * or a restored process's child is).
 */
export type Outcome = 'served' | 'retry' | 'gone'

/** An outcome and the pages this call installed (copied or zero-mapped) on the way to it. */
export interface Installed {
  outcome: Outcome
  pages: number
}

/** A range the installer copied data into (prefetch hit counting clears their accessed bits). */
export interface CopiedRange {
  address: number
  length: number
}

/** The kernel calls the installer makes: sys's real ones, or a test's simulated page table. */
export interface FillCalls {
  copy(uffd: number, dst: number, src: number, length: number): FillResult
  zeropage(uffd: number, start: number, length: number): FillResult
  wake(uffd: number, start: number, length: number): void
  /** UFFDIO_UNREGISTER of a range (throws SysError); none: ranges are never handed to the kernel. */
  unregister?(uffd: number, start: number, length: number): void
  /** UFFDIO_REGISTER of a range in MISSING mode (throws SysError): undoes an UNREGISTER that failed midway. */
  register?(uffd: number, start: number, length: number): void
  /** native/libuffd_fill's uffd_fill_block (uffdFillBlock's arguments), when it is loaded. */
  fillBlock: typeof uffdFillBlock | undefined
  /** native/libuffd_fill's install helper thread (InstallHelper.start's arguments), when loaded. */
  startHelper: ((...args: Parameters<typeof InstallHelper.start>) => HelperThread | undefined) | undefined
}

/** A thread installing packed blocks beside the loop: sys's InstallHelper, or a test's. */
export type HelperThread = Pick<InstallHelper, 'done' | 'finished' | 'error' | 'takeProgress' | 'holdGate' | 'releaseGate' | 'stop'>

export const kernelFillCalls: FillCalls = {
  copy: uffdCopy,
  zeropage: uffdZeropage,
  wake: uffdWake,
  unregister: (uffd, start, length) => uffdUnregister(uffd, start, length),
  // MISSING, as a VMM registers its guest memory (Firecracker, fc_client, kvm_vmm).
  register: (uffd, start, length) => void uffdRegister(uffd, start, length, UFFDIO_REGISTER_MODE.MISSING),
  fillBlock: nativeBlockFill ? uffdFillBlock : undefined,
  startHelper: nativeBlockFill ? InstallHelper.start : undefined,
}

/**
 * What an errno from UFFDIO_COPY / UFFDIO_ZEROPAGE (or a native fill built on them) means
 * (mm/userfaultfd.c):
 * - EEXIST: the first page is present already (another thread's fault, or fault-around of a
 *   duplicate message): nothing to install there, but its waiters may need a wake.
 * - EAGAIN: the mm is changing (mmap_changing: a REMOVE, UNMAP, REMAP or FORK event is queued and
 *   unread), or, after some bytes, the copy ran into a present page.
 * - ENOENT: no registered VMA holds the whole range (mfill_atomic's find_dst_vma): it crosses
 *   a VMA boundary (a region mapped or advised in parts: the installer then fills it in pieces),
 *   or, for one page, the page is not registered: a restored process split, moved or
 *   unregistered part of a mapping (no fault can ask for it), a VMM's mapping is gone, or it
 *   lies in a zero range the kernel took over when an UNREGISTER failed midway. For a VMM,
 *   whose regions never change and are registered before it sends its uffd, the mm is alive
 *   (else ESRCH): the memory it announced is not registered with that uffd.
 * - ESRCH: the mm is gone (mmget_not_zero failed: the process exited, or exec'd).
 */
export type FillErrnoMeaning = 'installed' | 'already-present' | 'address-space-changing' | 'not-registered' | 'gone' | 'unexpected'

export function fillErrnoMeaning(errno: number): FillErrnoMeaning {
  switch (errno) {
    case 0:
      return 'installed'
    case Errno.EEXIST:
      return 'already-present'
    case Errno.EAGAIN:
      return 'address-space-changing'
    case Errno.ENOENT:
      return 'not-registered'
    case Errno.ESRCH:
      return 'gone'
    default:
      return 'unexpected'
  }
}

/** A payload address for fill(): where the run's first page's bytes are, or ZEROS. */
export const ZEROS = -1

function hex(n: number): string {
  return `0x${n.toString(16)}`
}

export class Installer {
  /** hugetlbfs has no UFFDIO_ZEROPAGE: zero pages are copied from a zero buffer there. */
  private readonly huge: boolean
  private zeroPage: Buffer | undefined
  /** The region of the block run installed last (a block's runs usually share one). */
  private blockRegion: GuestRegion | undefined

  constructor(
    private readonly calls: FillCalls,
    private readonly stats: RunStats,
    private readonly pageSize: number,
    private readonly zeroMap: ZeroMap,
    /** Zero runs around packed set pages grow within aligned windows of this many pages. */
    private readonly zeroRunWindowPages: number,
  ) {
    this.huge = pageSize > 4096
  }

  /**
   * Fills pages [first, first+count) of one region with zeros (`source` ZEROS) or with data
   * starting at address `source`, handling the kernel's partial results: a copy that runs into a
   * page already present stops there (EAGAIN with bytes done, or EEXIST at the first page): that
   * page is marked present and the copy goes on after it, so no page after a collision is left
   * missing. Copied ranges are appended to `copied` when given.
   */
  fill(client: Client, region: GuestRegion, first: number, count: number, source: number, copied?: CopiedRange[]): Installed {
    const zero = source === ZEROS
    const length = count * this.pageSize
    const dst = region.baseHostVirtAddr + (first * this.pageSize - region.offset)
    let done = 0
    let pages = 0
    // Bytes per ioctl; drops to one page when a range turns out to span several VMAs.
    let step = length
    while (done < length) {
      let result: FillResult
      if (!zero) {
        result = this.calls.copy(client.uffd, dst + done, source + done, Math.min(step, length - done))
        this.stats.add('copyIoctls')
      } else if (this.huge) {
        result = this.calls.copy(client.uffd, dst + done, this.zeroPageAddress(), this.pageSize)
        this.stats.add('copyIoctls')
      } else {
        result = this.calls.zeropage(client.uffd, dst + done, Math.min(step, length - done))
        this.stats.add('zeropageIoctls')
      }
      if (result.done > 0) {
        const n = result.done / this.pageSize
        client.states.markPresent(first + done / this.pageSize, n)
        this.stats.add(zero ? 'pagesZeroed' : 'pagesCopied', n)
        pages += n
        if (!zero) {
          this.stats.add('bytesCopied', result.done)
          copied?.push({address: dst + done, length: result.done})
        }
        done += result.done
      }
      switch (fillErrnoMeaning(result.error)) {
        case 'installed':
          // Back up to whole runs after pieces that had to fit inside one VMA.
          if (step < length) step = Math.min(length, step * 2)
          continue
        case 'already-present':
          this.stats.add('eexist')
          this.calls.wake(client.uffd, dst + done, this.pageSize)
          client.states.markPresent(first + done / this.pageSize, 1)
          done += this.pageSize
          continue
        case 'address-space-changing':
          this.stats.add('eagain')
          // After progress: a present page follows (the next call reports EEXIST for it).
          if (result.done === 0) return {outcome: 'retry', pages}
          continue
        case 'not-registered': {
          // A fill must lie inside one registered VMA: halve the piece until it does (a run
          // over one VMA boundary costs a few more calls, not one per page).
          if (step > this.pageSize) {
            step = Math.max(this.pageSize, Math.floor(step / this.pageSize / 2) * this.pageSize)
            continue
          }
          const page = first + done / this.pageSize
          if (client.nonCooperative) {
            // Not registered memory any more: no fault can ask for it.
            this.calls.wake(client.uffd, dst + done, this.pageSize)
            client.states.markRemoved(page, 1)
          } else if (zero && client.kernelZerosUnsure.some((r) => page >= r.first && page < r.end)) {
            // A known-zero page the kernel took over: it maps zeros there itself.
            this.calls.wake(client.uffd, dst + done, this.pageSize)
            client.states.markPresent(page, 1)
          } else {
            // A VMM's memory that is not registered with its uffd while it runs (an exited
            // process gives ESRCH): it never registered it, or unregistered or unmapped it
            // since. No fault of it comes here and nothing can be installed there, so serving
            // it has failed (it is killed, or frozen), rather than left 'running' on whatever its
            // own memory holds.
            throw new SysError(zero && !this.huge ? 'UFFDIO_ZEROPAGE' : 'UFFDIO_COPY', result.error, `installing client ${client.id}'s memory at ${hex(dst + done)}`, "not registered with the uffd it sent (never registered, or unregistered or unmapped since): it cannot be served")
          }
          done += this.pageSize
          continue
        }
        case 'gone':
          return {outcome: 'gone', pages}
        case 'unexpected':
          throw new SysError(zero && !this.huge ? 'UFFDIO_ZEROPAGE' : 'UFFDIO_COPY', result.error, `installing ${length} bytes at ${hex(dst)}`)
      }
    }
    return {outcome: 'served', pages}
  }

  /**
   * Zero-fills the page at `address` of a restored process's registered memory outside the
   * snapshot's regions (fresh anonymous memory, see FaultServer.serve): no page state tracks it.
   */
  fillFreshPage(client: Client, address: number): Installed {
    const result = this.huge ? this.calls.copy(client.uffd, address, this.zeroPageAddress(), this.pageSize) : this.calls.zeropage(client.uffd, address, this.pageSize)
    switch (fillErrnoMeaning(result.error)) {
      case 'installed':
        this.stats.add('pagesZeroed')
        return {outcome: 'served', pages: 1}
      case 'already-present':
      case 'not-registered':
        // Installed by another thread's fault, or unmapped meanwhile: the faulting thread only
        // needs waking to retry its access.
        this.calls.wake(client.uffd, address, this.pageSize)
        return {outcome: 'served', pages: 0}
      case 'address-space-changing':
        return {outcome: 'retry', pages: 0}
      case 'gone':
        return {outcome: 'gone', pages: 0}
      case 'unexpected':
        throw new SysError(this.huge ? 'UFFDIO_COPY' : 'UFFDIO_ZEROPAGE', result.error, `zeroing the page at ${hex(address)}`)
    }
  }

  /**
   * Stops trapping faults on image pages [first, first + count) of `region` (UFFDIO_UNREGISTER),
   * pages the snapshot holds as zeros: the kernel fills them itself from then on, with zero
   * pages, as for any anonymous memory, and without a round trip to this handler; after a
   * MADV_DONTNEED (a balloon removal, which is then not reported here) they read as zeros again,
   * which is what serving them would give too. They count as present, so nothing here ever fills
   * them (a fill there would fail with ENOENT). Threads already waiting on them are woken by the
   * kernel. A range over several VMAs is unregistered in each of them.
   *
   * Returns false when the kernel refused: a VMA there cannot be registered (EINVAL, before it
   * changes anything), splitting one would pass the process's mapping limit (ENOMEM), the
   * process is exiting (ESRCH). The pages stay ours to serve. The kernel unregisters VMA by VMA
   * and stops at the first one it cannot split without undoing those before it (fs/userfaultfd.c,
   * userfaultfd_unregister), so after ENOMEM part of the range may be unregistered: it is
   * registered again (VMAs still registered are left as they are; the others usually merge
   * back into their registered neighbour, which needs no new VMA). If that fails too, the range
   * is noted in client.kernelZerosUnsure, where a fill that finds a page unregistered leaves it
   * to the kernel (zeros) instead of taking the client for gone.
   */
  handToKernel(client: Client, region: GuestRegion, first: number, count: number): boolean {
    if (!this.calls.unregister) return false
    if (!client.states.allMissing(first, count)) return false
    const start = region.baseHostVirtAddr + (first * this.pageSize - region.offset)
    const length = count * this.pageSize
    try {
      this.calls.unregister(client.uffd, start, length)
    } catch (error) {
      if (!(error instanceof SysError)) throw error
      if (!this.registerAgain(client, start, length)) client.kernelZerosUnsure.push({first, end: first + count})
      // Only a speed-up: the pages are served as before.
      return false
    }
    client.states.markPresent(first, count)
    this.stats.add('kernelZeroRanges')
    this.stats.add('kernelZeroPages', count)
    return true
  }

  /** Registers a range again after a failed UNREGISTER; false when the kernel refuses that too. */
  private registerAgain(client: Client, start: number, length: number): boolean {
    if (!this.calls.register) return false
    try {
      this.calls.register(client.uffd, start, length)
      return true
    } catch (error) {
      if (error instanceof SysError) return false
      throw error
    }
  }

  /** Wakes the threads waiting on one present page (served already: a duplicate message). */
  wakePage(client: Client, region: GuestRegion, page: number): void {
    this.calls.wake(client.uffd, region.baseHostVirtAddr + (page * this.pageSize - region.offset), this.pageSize)
  }

  /**
   * Whether a client's packed blocks can go to native/libuffd_fill: per page, the JavaScript
   * path costs about what the kernel's copy does. Not when copied ranges are wanted (hit
   * counting), on hugetlbfs, or for restored processes (their mappings change).
   */
  fillsNatively(client: Client, tracking: boolean): boolean {
    return this.calls.fillBlock !== undefined && this.nativeAllowed(client, tracking)
  }

  private nativeAllowed(client: Client, tracking: boolean): boolean {
    return !tracking && !this.huge && !client.nonCooperative && !client.nativeFillsOff
  }

  /**
   * Installs the still-missing pages of a packed working-set block: `runs` are (first image page,
   * count, payload page or -1 for zeros) triples (packedBlockRuns), `payload` the address of the
   * block's decoded bytes, `firstRun` the index of the run to install first (a faulting page's),
   * or -1. Each run of consecutive image pages of one kind is one ioctl: a block's pages are
   * sorted, so a data run is adjacent in its payload too.
   */
  fillBlock(client: Client, what: string, runs: Int32Array, payload: number, firstRun: number, copied?: CopiedRange[]): Installed {
    if (this.fillsNatively(client, copied !== undefined)) {
      const r = this.calls.fillBlock!(client.uffd, client.states.states, this.zeroMap.bytes, this.pageSize, client.fillRegions, runs, Math.max(0, payload), firstRun, this.zeroRunWindowPages)
      return this.accountBlockFill(client, what, r)
    }
    this.blockRegion = undefined
    let pages = 0
    for (let k = firstRun < 0 ? 0 : -1; k < runs.length / 3; k++) {
      // The faulting page's run first (k = -1), then the others in order.
      const i = k < 0 ? firstRun * 3 : k * 3
      if (k >= 0 && k === firstRun) continue
      const r = this.fillBlockRun(client, runs[i], runs[i + 1], runs[i + 2] < 0 ? ZEROS : payload + runs[i + 2] * this.pageSize, copied)
      pages += r.pages
      if (r.outcome !== 'served') return {outcome: r.outcome, pages}
    }
    return {outcome: 'served', pages}
  }

  /**
   * Starts a native thread installing packed blocks (`jobs`, in order) into the client beside
   * this one, or returns undefined when it cannot (see fillsNatively; prefetch hits are counted
   * per copied range, which a helper does not report). It writes to the eventfd `notifyFd` when
   * it stops; what it did is accounted with accountBlockFill(helper.takeProgress()).
   */
  startHelper(client: Client, jobs: readonly HelperJob[], notifyFd: number): HelperThread | undefined {
    if (!this.calls.startHelper || !this.nativeAllowed(client, client.hitTrackingPidfd >= 0)) return undefined
    return this.calls.startHelper(client.uffd, client.states.states, this.zeroMap.bytes, this.pageSize, client.fillRegions, jobs, this.zeroRunWindowPages, notifyFd)
  }

  /**
   * Accounts a native block fill (one call, or what an install helper did since last asked)
   * and turns its errno into an outcome. Its page states were moved by the native code.
   */
  accountBlockFill(client: Client, what: string, r: BlockFillResult): Installed {
    client.states.countInstalled(r.newlyPresent)
    this.stats.add('pagesCopied', r.pagesCopied)
    this.stats.add('pagesZeroed', r.pagesZeroed)
    this.stats.add('bytesCopied', r.pagesCopied * this.pageSize)
    this.stats.add('copyIoctls', r.copyIoctls)
    this.stats.add('zeropageIoctls', r.zeropageIoctls)
    this.stats.add('eexist', r.eexist)
    const pages = r.pagesCopied + r.pagesZeroed
    switch (fillErrnoMeaning(r.error)) {
      case 'installed':
        return {outcome: 'served', pages}
      case 'address-space-changing':
        this.stats.add('eagain')
        return {outcome: 'retry', pages}
      case 'not-registered':
        // The native fill does not split a range that crosses a VMA boundary, nor tell an
        // unregistered page from a gone mapping: this client's blocks go through fill() from
        // now on, which does both, starting with this one again.
        client.nativeFillsOff = true
        return {outcome: 'retry', pages}
      case 'gone':
        return {outcome: 'gone', pages}
      default:
        // (EEXIST is handled inside the native fill: it never stops it.)
        throw new SysError('uffd_fill_block', r.error, `installing ${what} at image page ${r.stopPage}`)
    }
  }

  /**
   * Installs the missing pages of one run of a block (`source`: the payload address of its first
   * page, or ZEROS), one ioctl per stretch of missing pages inside one region.
   */
  private fillBlockRun(client: Client, page: number, count: number, source: number, copied?: CopiedRange[]): Installed {
    const {states} = client
    const end = page + count
    let pages = 0
    for (let p = page; p < end; ) {
      if (states.get(p) !== PAGE_MISSING) {
        p++
        continue
      }
      let region = this.blockRegion
      if (!region || p * this.pageSize < region.offset || p * this.pageSize >= region.offset + region.size) region = this.blockRegion = client.map.regionOfImagePage(p, this.pageSize)
      if (!region) {
        p++
        continue
      }
      const regionFirst = region.offset / this.pageSize
      const regionEnd = regionFirst + region.size / this.pageSize
      let q = p + 1
      while (q < end && q < regionEnd && states.get(q) === PAGE_MISSING) q++
      let r: Installed
      if (source === ZEROS) {
        const [from, to] = this.zeroRunAround(client, p, q, regionFirst, regionEnd)
        r = this.fill(client, region, from, to - from, ZEROS)
      } else {
        r = this.fill(client, region, p, q - p, source + (p - page) * this.pageSize, copied)
      }
      pages += r.pages
      if (r.outcome !== 'served') return {outcome: r.outcome, pages}
      p = q
    }
    return {outcome: 'served', pages}
  }

  /**
   * The zero run to map for set pages [first, end): grown over the missing zero pages around it
   * within its aligned window (zeroRunWindowBytes), so that the isolated zero pages of a scattered
   * set cost one ioctl per window rather than one each (a zero page is its own content, so extra
   * ones are never wrong). The window bounds the ioctl: a zero page costs a page-table entry, and
   * a fault may wait behind it.
   */
  private zeroRunAround(client: Client, first: number, end: number, regionFirst: number, regionEnd: number): [number, number] {
    const {states} = client
    const windowPages = this.zeroRunWindowPages
    const windowFirst = Math.max(regionFirst, first - (first % windowPages))
    const windowEnd = Math.min(regionEnd, end - 1 - ((end - 1) % windowPages) + windowPages)
    let from = first
    while (from > windowFirst && this.zeroMap.isZero(from - 1) && states.get(from - 1) === PAGE_MISSING) from--
    let to = end
    while (to < windowEnd && this.zeroMap.isZero(to) && states.get(to) === PAGE_MISSING) to++
    return [from, to]
  }

  private zeroPageAddress(): number {
    return addressOf((this.zeroPage ??= Buffer.alloc(this.pageSize)))
  }
}
