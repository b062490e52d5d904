// What the handler knows about each page of a client's memory. The values are native/libuffd_fill's
// (FILL_ABI.page, checked against the library by test/sys-fill-abi.test.ts): a block fill and an
// install helper read and move the same bytes.
import {FILL_ABI} from '../../sys/index.js'

export const PAGE_MISSING = FILL_ABI.page.missing
export const PAGE_PRESENT = FILL_ABI.page.present
/** Dropped by the client (UFFD_EVENT_REMOVE, e.g. a balloon): must read as zeros if touched again. */
export const PAGE_REMOVED = FILL_ABI.page.removed

/**
 * What the handler knows about each page of a client's memory, indexed by image page. A page is
 * copied at most once: only MISSING pages are ever filled with snapshot data, and a REMOVED page
 * is only ever filled with zeros, on demand.
 */
export class PageStates {
  readonly states: Uint8Array
  presentCount = 0
  /** Pages no longer missing (present or removed): none of them will be filled from the image. */
  settledCount = 0
  /** Another thread (an install helper) marks pages present too: see markPresent. */
  shared = false

  constructor(readonly pageCount: number) {
    this.states = new Uint8Array(pageCount)
  }

  /** An independent copy (a forked child starts with its parent's page tables). */
  clone(): PageStates {
    const copy = new PageStates(this.pageCount)
    copy.states.set(this.states)
    copy.presentCount = this.presentCount
    copy.settledCount = this.settledCount
    return copy
  }

  get(page: number): number {
    return this.states[page]
  }

  /**
   * Whether every page of [first, first + count) is missing: two scans in native code rather than
   * a loop, since the ranges asked about (zero runs handed to the kernel) span much of an image,
   * and a loop still running in V8's interpreter when a client is added costs ~1 µs a page.
   */
  allMissing(first: number, count: number): boolean {
    const range = this.states.subarray(first, first + count)
    return range.indexOf(PAGE_PRESENT) < 0 && range.indexOf(PAGE_REMOVED) < 0
  }

  markPresent(first: number, count: number): void {
    if (!this.shared && count > 1 && this.allMissing(first, count)) {
      this.states.fill(PAGE_PRESENT, first, first + count)
      this.presentCount += count
      this.settledCount += count
      return
    }
    for (let p = first; p < first + count; p++) {
      // While an install helper (native/libuffd_fill) runs it may mark the same page at the same
      // moment: each page goes from missing to present once, counted by whoever moved it. (A
      // compare-and-swap costs ~30 ns a page, 8 ms for 1 GiB: only then.)
      const was = this.shared ? Atomics.compareExchange(this.states, p, PAGE_MISSING, PAGE_PRESENT) : this.states[p]
      if (was === PAGE_PRESENT) continue
      // (Only the fault loop moves a page out of REMOVED: a fault on removed memory.)
      this.states[p] = PAGE_PRESENT
      if (was === PAGE_MISSING) this.settledCount++
      this.presentCount++
    }
  }

  /** Accounts `count` pages that went from missing to present in `states` directly (the native block fill). */
  countInstalled(count: number): void {
    this.presentCount += count
    this.settledCount += count
  }

  markRemoved(first: number, count: number): void {
    for (let p = first; p < first + count; p++) {
      if (this.states[p] === PAGE_PRESENT) this.presentCount--
      else if (this.states[p] === PAGE_MISSING) this.settledCount++
      this.states[p] = PAGE_REMOVED
    }
  }
}
