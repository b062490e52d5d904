import {payloadPosition} from '../format/zero-map.js'
import {type ImageReader} from './layered-reader.js'

/** Block payload held in memory at once while walking a large packed set. */
const PASS_BYTES = 256 << 20

export interface PackedPageWalk {
  /**
   * Starts a pass over blocks [from, to): the payload buffer of each (its non-zero pages in list
   * order, to fill or to check), or undefined to leave a block out of this pass.
   */
  start(from: number, to: number): (Buffer | undefined)[]
  /** A non-zero page of block `block`, at `at` in its payload, and the same page's bytes in its chunk. */
  page(block: number, payload: Buffer, at: number, page: number, chunk: number, chunkPage: Buffer): void
  /** The chunk could not be read (its own error is someone else's to report); false stops the pass. */
  chunkFailed?(chunk: number, error: Error): boolean
  /** After every page of blocks [from, to) was visited. */
  end?(from: number, to: number, payloads: (Buffer | undefined)[]): void
}

/** What packedPageSteps has just done: one chunk's pages visited, or a pass over blocks [from, to) finished. */
export type PackedPageStep = {kind: 'chunk'} | {kind: 'pass'; from: number; to: number; payloads: (Buffer | undefined)[]}

/**
 * Pairs every non-zero page of packed working-set blocks with the same page in its chunk, for
 * packing a set (copy chunk -> block) and verifying one (compare). Blocks go in passes holding at
 * most PASS_BYTES of payload; within a pass each chunk is decoded once, in file order, however
 * scattered the set (a random 10% of the pages touches every chunk).
 */
export function walkPackedPages(reader: ImageReader, blockPages: readonly ArrayLike<number>[], walk: PackedPageWalk): void {
  for (const step of packedPageSteps(reader, blockPages, walk)) {
    if (step.kind === 'pass') walk.end?.(step.from, step.to, step.payloads)
  }
}

/**
 * walkPackedPages a step at a time, for a caller that must stay responsive (to SIGINT) on a large
 * set: it resumes the walk after each chunk and after each pass, which it is given instead of
 * walk.end, so that what it does with a pass's payloads can be paced too.
 */
export function* packedPageSteps(reader: ImageReader, blockPages: readonly ArrayLike<number>[], walk: Omit<PackedPageWalk, 'end'>): Generator<PackedPageStep> {
  const {zeroMap, geometry} = reader
  const {pageSize, pagesPerChunk} = geometry
  const payloadBytes = (pages: ArrayLike<number>): number => {
    let n = 0
    for (let i = 0; i < pages.length; i++) if (!zeroMap.isZero(pages[i])) n += pageSize
    return n
  }
  for (let from = 0; from < blockPages.length; ) {
    let to = from
    let bytes = 0
    while (to < blockPages.length && (to === from || bytes + payloadBytes(blockPages[to]) <= PASS_BYTES)) bytes += payloadBytes(blockPages[to++])
    const payloads = walk.start(from, to)
    const wanted = new Map<number, {block: number; at: number; page: number}[]>()
    for (let b = from; b < to; b++) {
      if (!payloads[b - from]) continue
      const pages = blockPages[b]
      let at = 0
      for (let i = 0; i < pages.length; i++) {
        const page = pages[i]
        if (zeroMap.isZero(page)) continue
        const chunk = Math.floor(page / pagesPerChunk)
        let needs = wanted.get(chunk)
        if (!needs) wanted.set(chunk, (needs = []))
        needs.push({block: b, at, page})
        at += pageSize
      }
    }
    for (const chunk of [...wanted.keys()].sort((a, b) => a - b)) {
      let chunkPayload: Buffer
      try {
        chunkPayload = reader.readPayload(chunk)
      } catch (error) {
        if (walk.chunkFailed?.(chunk, error as Error) ?? false) continue
        throw error
      }
      for (const need of wanted.get(chunk)!) {
        const start = payloadPosition(zeroMap, need.page, pagesPerChunk) * pageSize
        walk.page(need.block, payloads[need.block - from]!, need.at, need.page, chunk, chunkPayload.subarray(start, start + pageSize))
      }
      yield {kind: 'chunk'}
    }
    yield {kind: 'pass', from, to, payloads}
    from = to
  }
}
