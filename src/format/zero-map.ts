/** How many bits each byte value has set. */
const BITS_SET = Uint8Array.from({length: 256}, (_, b) => {
  let n = 0
  for (let v = b; v !== 0; v >>= 1) n += v & 1
  return n
})

/**
 * One bit per page, set when the page is all zeros (such pages are never stored; a handler maps
 * them with UFFDIO_ZEROPAGE). Bit p%8 of byte p>>3, least significant first.
 */
export class ZeroMap {
  readonly bytes: Uint8Array

  constructor(
    readonly pageCount: number,
    bytes?: Uint8Array,
  ) {
    const size = ZeroMap.byteLength(pageCount)
    if (bytes && bytes.length !== size) throw new RangeError(`zero map of ${pageCount} pages needs ${size} bytes, got ${bytes.length}`)
    this.bytes = bytes ?? new Uint8Array(size)
  }

  static byteLength(pageCount: number): number {
    return Math.ceil(pageCount / 8)
  }

  isZero(page: number): boolean {
    return (this.bytes[page >>> 3] & (1 << (page & 7))) !== 0
  }

  setZero(page: number): void {
    this.bytes[page >>> 3] |= 1 << (page & 7)
  }

  /** Marks pages [first, first + count) zero: whole bytes of the map at a time between the ends. */
  fillZero(first: number, count: number): void {
    const end = first + count
    let p = first
    for (; p < end && (p & 7) !== 0; p++) this.setZero(p)
    if (p + 8 <= end) {
      const bytesEnd = (end & ~7) >>> 3
      this.bytes.fill(0xff, p >>> 3, bytesEnd)
      p = bytesEnd << 3
    }
    for (; p < end; p++) this.setZero(p)
  }

  /** Copies `count` bits from a chunk-local map (bit i = page first+i) into this map. */
  setRange(firstPage: number, count: number, localBits: Uint8Array): void {
    for (let i = 0; i < count; i++) {
      if (localBits[i >>> 3] & (1 << (i & 7))) this.setZero(firstPage + i)
    }
  }

  /** Zero pages in [first, first + count): whole bytes of the map at a time between the ends. */
  countZero(first: number, count: number): number {
    const end = first + count
    let zeros = 0
    let p = first
    for (; p < end && (p & 7) !== 0; p++) if (this.isZero(p)) zeros++
    for (; p + 8 <= end; p += 8) zeros += BITS_SET[this.bytes[p >>> 3]]
    for (; p < end; p++) if (this.isZero(p)) zeros++
    return zeros
  }

  /** True when no bit beyond pageCount is set (a writer never sets them; a reader checks). */
  paddingIsClear(): boolean {
    const tailBits = this.pageCount & 7
    if (tailBits === 0) return true
    const last = this.bytes[this.bytes.length - 1]
    return (last & ~((1 << tailBits) - 1) & 0xff) === 0
  }
}

/** A maximal run of pages that are all zero or all non-zero. */
export interface PageRun {
  firstPage: number
  count: number
  zero: boolean
}

/**
 * Splits [firstPage, firstPage + count) into alternating runs of zero and non-zero pages: a
 * handler serves each non-zero run with one UFFDIO_COPY and each zero run with one UFFDIO_ZEROPAGE.
 */
export function pageRuns(map: ZeroMap, firstPage: number, count: number): PageRun[] {
  const runs: PageRun[] = []
  let p = firstPage
  const end = firstPage + count
  while (p < end) {
    const zero = map.isZero(p)
    let q = p + 1
    while (q < end && map.isZero(q) === zero) q++
    runs.push({firstPage: p, count: q - p, zero})
    p = q
  }
  return runs
}

/**
 * A non-zero page's index among the non-zero pages of its chunk: its position in the chunk's
 * payload, in pages (a payload is its chunk's non-zero pages packed in order). Counted from the
 * map on each call rather than kept per page: a table of every page would cost 4 bytes per page
 * of the image in every thread that serves it (16 MiB for 16 GiB), and counting is a few bytes
 * of the map.
 */
export function payloadPosition(map: ZeroMap, page: number, pagesPerChunk: number): number {
  const first = page - (page % pagesPerChunk)
  return page - first - map.countZero(first, page - first)
}

/**
 * The largest runs of zero pages, each of at least `minPages` and aligned to `alignPages` at both
 * ends (trimmed inwards), at most `maxRuns` of them (the longest, ties by position), in page
 * order. Handed back to the kernel (see the fault loop), such runs cost no fault at all.
 */
export function largeZeroRuns(map: ZeroMap, minPages: number, alignPages: number, maxRuns: number): {first: number; end: number}[] {
  const runs: {first: number; end: number}[] = []
  let p = 0
  while (p < map.pageCount) {
    // Whole zero bytes (eight pages) at a time: a sparse image's zero map is mostly 0xff.
    if ((p & 7) === 0 && map.bytes[p >>> 3] === 0 && p + 8 <= map.pageCount) {
      p += 8
      continue
    }
    if (!map.isZero(p)) {
      p++
      continue
    }
    let q = p + 1
    while (q < map.pageCount && ((q & 7) !== 0 || q + 8 > map.pageCount || map.bytes[q >>> 3] !== 0xff) && map.isZero(q)) q++
    while (q + 8 <= map.pageCount && (q & 7) === 0 && map.bytes[q >>> 3] === 0xff) q += 8
    while (q < map.pageCount && map.isZero(q)) q++
    const first = Math.ceil(p / alignPages) * alignPages
    const end = Math.floor(q / alignPages) * alignPages
    if (end - first >= minPages) runs.push({first, end})
    p = q
  }
  if (runs.length > maxRuns) {
    const kept = [...runs].sort((a, b) => b.end - b.first - (a.end - a.first) || a.first - b.first).slice(0, maxRuns)
    return kept.sort((a, b) => a.first - b.first)
  }
  return runs
}
