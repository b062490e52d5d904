import {MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, VALID_PAGE_SIZES} from './constants.js'

/**
 * Address math of an image cut into pages and chunks. Pure; every function here is checked against
 * a naive oracle in test/format-geometry.test.ts.
 */
export class Geometry {
  readonly pageCount: number
  readonly chunkCount: number
  readonly pagesPerChunk: number

  constructor(
    readonly pageSize: number,
    readonly chunkSize: number,
    readonly logicalSize: number,
  ) {
    const problem = geometryProblem(pageSize, chunkSize, logicalSize)
    if (problem) throw new RangeError(problem)
    this.pageCount = Math.ceil(logicalSize / pageSize)
    this.chunkCount = Math.ceil(logicalSize / chunkSize)
    this.pagesPerChunk = chunkSize / pageSize
  }

  /** Bytes of the image rounded up to a whole page: what a handler maps. */
  get paddedSize(): number {
    return this.pageCount * this.pageSize
  }

  chunkOfOffset(offset: number): number {
    return Math.floor(offset / this.chunkSize)
  }

  pageOfOffset(offset: number): number {
    return Math.floor(offset / this.pageSize)
  }

  chunkStart(chunk: number): number {
    return chunk * this.chunkSize
  }

  firstPageOfChunk(chunk: number): number {
    return chunk * this.pagesPerChunk
  }

  /** Pages in a chunk: pagesPerChunk except for a shorter last chunk. */
  pagesInChunk(chunk: number): number {
    return Math.min(this.pagesPerChunk, this.pageCount - chunk * this.pagesPerChunk)
  }

  /** Bytes of the padded image a chunk covers (whole pages). */
  chunkPaddedLength(chunk: number): number {
    return this.pagesInChunk(chunk) * this.pageSize
  }

  /** Bytes of the logical image a chunk covers (the last chunk may end mid-page). */
  chunkLogicalLength(chunk: number): number {
    return Math.min(this.chunkSize, this.logicalSize - chunk * this.chunkSize)
  }
}

/** Why a page size / chunk size / logical size combination is invalid, or undefined if valid. */
export function geometryProblem(pageSize: number, chunkSize: number, logicalSize: number): string | undefined {
  if (!VALID_PAGE_SIZES.includes(pageSize)) return `page size ${pageSize} is not 4096 or 2097152`
  if (!Number.isInteger(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE || (chunkSize & (chunkSize - 1)) !== 0) {
    return `chunk size ${chunkSize} is not a power of two between 4 KiB and 4 MiB`
  }
  if (chunkSize < pageSize) return `chunk size ${chunkSize} is smaller than the page size ${pageSize}`
  if (!Number.isSafeInteger(logicalSize) || logicalSize < 0) return `logical size ${logicalSize} is not a non-negative integer`
  return undefined
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0
}
