import {type GuestRegion} from './handshake.js'

/** Where a faulting address lands: its region and its byte offset in the snapshot image. */
export interface Location {
  region: GuestRegion
  imageOffset: number
}

/**
 * Translates addresses in the client's address space to snapshot image offsets. Regions are few
 * (one or two for a Firecracker guest), so a sorted array with a last-hit shortcut beats a tree.
 */
export class AddressMap {
  private readonly regions: readonly GuestRegion[]
  private last = 0

  constructor(regions: readonly GuestRegion[]) {
    this.regions = [...regions].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr)
  }

  locate(address: number): Location | undefined {
    const hit = this.regions[this.last]
    if (hit && address >= hit.baseHostVirtAddr && address < hit.baseHostVirtAddr + hit.size) {
      return {region: hit, imageOffset: hit.offset + (address - hit.baseHostVirtAddr)}
    }
    let lo = 0
    let hi = this.regions.length - 1
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1
      const r = this.regions[mid]
      if (address < r.baseHostVirtAddr) hi = mid - 1
      else if (address >= r.baseHostVirtAddr + r.size) lo = mid + 1
      else {
        this.last = mid
        return {region: r, imageOffset: r.offset + (address - r.baseHostVirtAddr)}
      }
    }
    return undefined
  }

  /** Image page ranges [firstPage, endPage) of every region, for whole-memory walks. */
  imagePageRanges(pageSize: number): {region: GuestRegion; firstPage: number; endPage: number}[] {
    return this.regions.map((region) => ({region, firstPage: region.offset / pageSize, endPage: (region.offset + region.size) / pageSize}))
  }

  get all(): readonly GuestRegion[] {
    return this.regions
  }
}

export const PAGE_MISSING = 0
export const PAGE_PRESENT = 1
/** Dropped by the client (UFFD_EVENT_REMOVE, e.g. a balloon): must read as zeros if touched again. */
export const PAGE_REMOVED = 2

/**
 * What the handler knows about each page of a client's memory, indexed by image page. A page is
 * copied at most once: only MISSING pages are ever filled with snapshot data, and a REMOVED page
 * is only ever filled with zeros, on demand.
 */
export class PageStates {
  readonly states: Uint8Array
  presentCount = 0

  constructor(readonly pageCount: number) {
    this.states = new Uint8Array(pageCount)
  }

  get(page: number): number {
    return this.states[page]
  }

  markPresent(first: number, count: number): void {
    for (let p = first; p < first + count; p++) {
      if (this.states[p] !== PAGE_PRESENT) {
        this.states[p] = PAGE_PRESENT
        this.presentCount++
      }
    }
  }

  markRemoved(first: number, count: number): void {
    for (let p = first; p < first + count; p++) {
      if (this.states[p] === PAGE_PRESENT) this.presentCount--
      this.states[p] = PAGE_REMOVED
    }
  }
}
