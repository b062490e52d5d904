/**
 * Framed chunks (docs/FORMAT.md, Framed chunks): a zstd chunk of a file with INCOMPAT_FRAMED is
 * the concatenation of independent zstd frames, one per group of `framePages` image pages of the
 * chunk that holds at least one non-zero page, each decoding to that group's non-zero pages. zstd
 * decodes the concatenation in one call, so a whole chunk decodes as before; a fault that wants a
 * few pages decodes only their group's frame. A chunk may also be one frame (a single group, or
 * a chunk compressed whole by another writer): its first frame then declares the whole payload.
 * Pure: the frame walk reads headers and block headers only (RFC 8878), never decodes.
 */
import {type ZeroMap} from './zero-map.js'

const ZSTD_MAGIC = 0xfd2fb528
/** RFC 8878 3.1.1.2: a block's content is at most 128 KiB, whatever the window. */
const MAX_BLOCK_SIZE = 128 * 1024
const FCS_BYTES = [0, 2, 4, 8]
const DICTIONARY_ID_BYTES = [0, 1, 2, 4]

/** Whether `framePages` is a valid frame size for chunks of `pagesPerChunk` pages: a power of two below it. */
export function framePagesProblem(framePages: unknown, pagesPerChunk: number): string | undefined {
  if (typeof framePages !== 'number') return `frame size ${JSON.stringify(framePages) ?? String(framePages)} is not a number of pages`
  if (!Number.isInteger(framePages) || framePages < 1 || (framePages & (framePages - 1)) !== 0) return `frame size ${framePages} pages is not a power of two`
  if (framePages >= pagesPerChunk) return `frame size ${framePages} pages is not smaller than a chunk (${pagesPerChunk} pages)`
  return undefined
}

/**
 * The payload bytes of each group of a chunk, in order, groups without a non-zero page left out:
 * what each frame must declare. `firstPage` is the chunk's first image page, `pages` its pages.
 */
export function groupPayloadBytes(zeroMap: ZeroMap, firstPage: number, pages: number, framePages: number, pageSize: number): number[] {
  const bytes: number[] = []
  for (let g = 0; g < pages; g += framePages) {
    const count = Math.min(framePages, pages - g)
    const data = count - zeroMap.countZero(firstPage + g, count)
    if (data > 0) bytes.push(data * pageSize)
  }
  return bytes
}

/** One zstd frame's place in a chunk's stored bytes and the bytes it declares. */
export interface ZstdFrame {
  offset: number
  length: number
  contentSize: number
}

/**
 * The zstd frame starting at `at`: its length and declared content size, or what is wrong with it
 * (not a zstd frame, no declared size, a reserved bit or block type, running past the end).
 */
export function zstdFrameAt(bytes: Uint8Array, at: number): ZstdFrame | string {
  const end = bytes.length
  if (end - at < 6) return `no zstd frame header at byte ${at}`
  const magic = (bytes[at] | (bytes[at + 1] << 8) | (bytes[at + 2] << 16) | (bytes[at + 3] << 24)) >>> 0
  if (magic !== ZSTD_MAGIC) return `no zstd frame at byte ${at}`
  const descriptor = bytes[at + 4]
  if (descriptor & 0x08) return `zstd frame at byte ${at} sets a reserved bit`
  const singleSegment = (descriptor >> 5) & 1
  const fcsFlag = descriptor >> 6
  const fcsBytes = fcsFlag === 0 ? singleSegment : FCS_BYTES[fcsFlag]
  if (fcsBytes === 0) return `zstd frame at byte ${at} does not declare its size`
  let p = at + 5 + (singleSegment ? 0 : 1) + DICTIONARY_ID_BYTES[descriptor & 3]
  if (p + fcsBytes > end) return `zstd frame at byte ${at} runs past the chunk`
  let contentSize = 0
  for (let i = fcsBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + bytes[p + i]
  if (fcsBytes === 2) contentSize += 256
  p += fcsBytes
  for (;;) {
    if (p + 3 > end) return `zstd frame at byte ${at} runs past the chunk`
    const header = bytes[p] | (bytes[p + 1] << 8) | (bytes[p + 2] << 16)
    const type = (header >> 1) & 3
    const size = header >>> 3
    if (type === 3) return `zstd frame at byte ${at} has a block of reserved type`
    if (size > MAX_BLOCK_SIZE) return `zstd frame at byte ${at} has a block larger than 128 KiB`
    p += 3 + (type === 1 ? 1 : size)
    if (p > end) return `zstd frame at byte ${at} runs past the chunk`
    if (header & 1) break
  }
  if (descriptor & 0x04) p += 4
  if (p > end) return `zstd frame at byte ${at} runs past the chunk`
  return {offset: at, length: p - at, contentSize}
}

/**
 * The frames of a framed chunk's stored bytes, checked against what its groups hold
 * (groupPayloadBytes): one frame per group declaring exactly that group's bytes, back to back to
 * the end. 'whole' when the chunk is one frame declaring the whole payload (decode it whole).
 * A string says what is wrong.
 */
export function chunkFrames(stored: Uint8Array, groupBytes: readonly number[]): ZstdFrame[] | 'whole' | string {
  const frames: ZstdFrame[] = []
  let at = 0
  for (let i = 0; i < groupBytes.length; i++) {
    const frame = zstdFrameAt(stored, at)
    if (typeof frame === 'string') return frame
    if (i === 0 && groupBytes.length > 1 && frame.contentSize === groupBytes.reduce((a, b) => a + b, 0) && frame.length === stored.length) return 'whole'
    if (frame.contentSize !== groupBytes[i]) return `zstd frame ${i} declares ${frame.contentSize} bytes, its pages hold ${groupBytes[i]}`
    frames.push(frame)
    at += frame.length
  }
  if (at !== stored.length) return `${stored.length - at} bytes follow the last zstd frame`
  return frames
}

/**
 * Which frames hold image pages [first, end) of a chunk starting at `chunkFirst`: frames [from,
 * to) of the chunk's non-empty groups, and the payload page the first of them starts at.
 */
export function framesOfPages(zeroMap: ZeroMap, chunkFirst: number, chunkPages: number, framePages: number, first: number, end: number): {from: number; to: number; payloadPage: number} {
  let frame = 0
  let payloadPage = 0
  let from = -1
  let to = 0
  for (let g = 0; g < chunkPages; g += framePages) {
    const count = Math.min(framePages, chunkPages - g)
    const data = count - zeroMap.countZero(chunkFirst + g, count)
    const groupFirst = chunkFirst + g
    if (data > 0) {
      const overlaps = groupFirst < end && groupFirst + count > first
      if (overlaps && from < 0) from = frame
      if (overlaps) to = frame + 1
      if (from < 0) payloadPage += data
      frame++
    }
  }
  if (from < 0) return {from: 0, to: 0, payloadPage: 0}
  return {from, to, payloadPage}
}
