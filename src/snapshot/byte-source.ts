import fs from 'node:fs'

import {UffdError} from '../core/errors.js'
import {fileError} from '../sys/errors.js'
import {openInput} from './input-file.js'

/**
 * Where snapshot bytes come from. Every chunk read goes through this one interface, so a local
 * file, an HTTP range-request client with a local cache, or a stack of diff snapshots can stand
 * behind a reader without it knowing. Synchronous on purpose: the fault loop runs synchronously
 * in a worker thread.
 */
export interface ByteSource {
  /** Human-readable name used in error messages (a path or URL). */
  readonly name: string
  readonly size: number
  /** Fills `dst` entirely with the bytes at `position`; throws if the source ends first. */
  readAt(dst: Uint8Array, position: number): void
  close(): void
  /**
   * Sources whose bytes may be far away (object storage) say whether a range can be read now
   * without waiting on the network, take requests ahead of need, and can drop a copy that
   * failed its check so the next read fetches it again. A local file needs none of these.
   */
  isLocal?(position: number, length: number): boolean
  /**
   * Fills `dst` with the bytes at `position` and returns true when they can be had without the
   * network; otherwise asks for them at demand priority and returns false at once, never
   * waiting. For a thread that must not block on the network (the fault loop); a source without
   * it reads everything locally (readAt).
   */
  readIfLocal?(dst: Uint8Array, position: number): boolean
  /**
   * Asks for `ranges` at `priority` ahead of need, and for `around` (their neighbours, which
   * may be wanted soon) at prefetch priority in the same ask: a fetcher that sees them together
   * fetches the neighbours stored back to back with a range in its request, and leaves the rest
   * behind any later demand read.
   */
  fetchAhead?(ranges: readonly {position: number; length: number}[], priority?: Priority, around?: readonly {position: number; length: number}[]): void
  discard?(position: number, length: number): boolean
}

/**
 * How urgently a remote source should fetch a range: a demand read (a fault, the next unit a
 * command reads) goes ahead of every prefetch, and prefetch never takes the last fetch slots.
 */
export const PRIORITY_PREFETCH = 1
export const PRIORITY_DEMAND = 2
export type Priority = typeof PRIORITY_PREFETCH | typeof PRIORITY_DEMAND

export class FileByteSource implements ByteSource {
  readonly size: number
  private fd: number | undefined

  /** `openPath`: where to open it, when that is not its name (another thread's /proc/self/fd/N). */
  constructor(
    readonly name: string,
    openPath = name,
  ) {
    const {fd, stat} = openInput(openPath, {blockDevice: true})
    this.fd = fd
    this.size = stat.size
  }

  /**
   * A path to this very open file for another thread of this process (/proc/self/fd/N): the
   * same file even if the name has since been renamed over (uffd resume --learn does that).
   */
  get sameFilePath(): string {
    if (this.fd === undefined) throw new UffdError('INTERNAL', `${this.name} is closed`)
    return `/proc/self/fd/${this.fd}`
  }

  readAt(dst: Uint8Array, position: number): void {
    if (this.fd === undefined) throw new UffdError('INTERNAL', `${this.name} is closed`)
    let done = 0
    while (done < dst.length) {
      let n: number
      try {
        n = fs.readSync(this.fd, dst, done, dst.length - done, position + done)
      } catch (error) {
        // Node's EIO names no file; this does. Inline, not onFile(): this is every fault's read.
        throw fileError(error, this.name, 'reading')
      }
      if (n === 0) throw new UffdError('TRUNCATED', `${this.name}: unexpected end of file at ${position + done} (wanted ${dst.length} bytes at ${position})`)
      done += n
    }
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd)
    this.fd = undefined
  }
}
