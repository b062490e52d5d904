import {type GuestRegion} from '../protocol.js'

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
  private regions: readonly GuestRegion[]
  private last = 0

  constructor(regions: readonly GuestRegion[]) {
    this.regions = [...regions].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr)
  }

  /**
   * Follows munmap(start, end): the addresses no longer map to the image. (A restored process
   * can map something new there later; it is not ours, and must not resolve to snapshot pages.)
   */
  unmap(start: number, end: number): void {
    this.regions = this.regions.flatMap((r) => cut(r, start, end).outside)
    this.last = 0
  }

  /**
   * Follows mremap moving `len` bytes from `from` to `to`: the kernel moves the page tables, so
   * pages already installed stay installed and missing ones stay missing, at the new address;
   * the image offsets behind them do not change. Whatever was mapped at the destination before
   * was unmapped by the move.
   */
  remap(from: number, to: number, len: number): void {
    const kept = this.regions.flatMap((r) => cut(r, to, to + len).outside)
    const moved: GuestRegion[] = []
    const stay: GuestRegion[] = []
    for (const r of kept) {
      const {inside, outside} = cut(r, from, from + len)
      stay.push(...outside)
      for (const piece of inside) moved.push({...piece, baseHostVirtAddr: to + (piece.baseHostVirtAddr - from)})
    }
    this.regions = [...stay, ...moved].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr)
    this.last = 0
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

  /** The region holding image page `page`, if any (a linear scan: for the few regions of a VM). */
  regionOfImagePage(page: number, pageSize: number): GuestRegion | undefined {
    const offset = page * pageSize
    return this.regions.find((r) => offset >= r.offset && offset < r.offset + r.size)
  }

  get all(): readonly GuestRegion[] {
    return this.regions
  }
}

/** Splits a region at [start, end): the piece inside (if any) and the pieces outside. */
function cut(r: GuestRegion, start: number, end: number): {inside: GuestRegion[]; outside: GuestRegion[]} {
  const rEnd = r.baseHostVirtAddr + r.size
  const from = Math.max(start, r.baseHostVirtAddr)
  const to = Math.min(end, rEnd)
  if (from >= to) return {inside: [], outside: [r]}
  const piece = (a: number, b: number): GuestRegion => ({...r, baseHostVirtAddr: a, size: b - a, offset: r.offset + (a - r.baseHostVirtAddr)})
  const outside: GuestRegion[] = []
  if (r.baseHostVirtAddr < from) outside.push(piece(r.baseHostVirtAddr, from))
  if (to < rEnd) outside.push(piece(to, rEnd))
  return {inside: [piece(from, to)], outside}
}
