import fs from 'node:fs'

import {UffdError} from '../core/errors.js'
import {onFile} from '../sys/errors.js'
import {type ReadSegment} from './chunk-job.js'

/** Reads image ranges from their segments on the calling thread (a layer's writer compares as it reads). */
export class SegmentReader {
  private readonly fds = new Map<string, number>()
  /** Reused: valid until the next read. */
  private present = new Uint8Array(0)

  /** The descriptor of `path`, opened once (for reading) and kept until close(). */
  fd(path: string): number {
    let fd = this.fds.get(path)
    if (fd === undefined) this.fds.set(path, (fd = onFile(path, 'opening', () => fs.openSync(path, 'r'))))
    return fd
  }

  /**
   * Fills `dst` (image bytes from `start`) from `segments`, zeros elsewhere; returns which pages
   * of it any segment touched (a diff's data pages). With `holesUnchanged` the pages no segment
   * touches are left as they were, for a caller that knows what they are without their bytes (a
   * diff's holes are unchanged, a full image's zero).
   */
  read(segments: readonly ReadSegment[], start: number, dst: Buffer, pageSize: number, holesUnchanged: boolean): Uint8Array {
    // Only the gaps between segments are zeroed (a full image's chunk is one segment); with
    // `holesUnchanged`, only the parts of gaps inside pages a segment touches.
    const zero = (from: number, to: number): void => {
      if (holesUnchanged) {
        const headEnd = Math.min(to, Math.ceil(from / pageSize) * pageSize)
        const tailStart = Math.max(headEnd, Math.floor(to / pageSize) * pageSize)
        if (from % pageSize !== 0 && from > 0) dst.fill(0, from, headEnd)
        if (to % pageSize !== 0 && to < dst.length) dst.fill(0, tailStart, to)
        return
      }
      dst.fill(0, from, to)
    }
    let cursor = 0
    for (const s of [...segments].sort((a, b) => a.imageOffset - b.imageOffset)) {
      const at = s.imageOffset - start
      if (at > cursor) zero(cursor, at)
      cursor = Math.max(cursor, at + s.length)
    }
    if (cursor < dst.length) zero(cursor, dst.length)
    this.present.fill(0)
    const present = this.present.length === dst.length / pageSize ? this.present : (this.present = new Uint8Array(dst.length / pageSize))
    for (const s of segments) {
      const at = s.imageOffset - start
      this.readAt(s.path, s.position, dst.subarray(at, at + s.length))
      present.fill(1, Math.floor(at / pageSize), Math.ceil((at + s.length) / pageSize))
    }
    return present
  }

  /** Fills `dst` from `path` at `position`; TRUNCATED if the file ends first. */
  readAt(path: string, position: number, dst: Uint8Array): void {
    const fd = this.fd(path)
    for (let done = 0; done < dst.length; ) {
      const n = onFile(path, 'reading', () => fs.readSync(fd, dst, done, dst.length - done, position + done))
      if (n === 0) throw new UffdError('TRUNCATED', `${path}: ended at ${position + done}, expected ${dst.length - done} more bytes`)
      done += n
    }
  }

  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd)
    this.fds.clear()
  }
}
