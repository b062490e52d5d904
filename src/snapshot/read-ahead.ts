import {Codec} from '../format/constants.js'
import {PRIORITY_DEMAND} from './byte-source.js'
import {type ImageReader} from './layered-reader.js'

/** Stored bytes asked of the fetcher ahead of the unit being read, by default. */
export const READ_AHEAD_BYTES = 128 << 20

/**
 * Reads a remote snapshot's units in a known order from a thread that must keep its event loop
 * turning (an upload's parts go out on it, SIGINT is handled on it): asks the fetcher for the
 * units up to `windowBytes` of stored bytes ahead of the one being read, so requests run with the
 * fetcher's concurrency, and waits asynchronously until the next unit is on disk, so that the
 * synchronous read that follows does not block. A window rather than everything at once keeps the
 * cache directory from filling with (and evicting) units read much later. For a local file every
 * call returns at once.
 */
export class ReadAhead {
  /** units[0, asked) have been asked for; units[consumed, asked) are ahead of the reader. */
  private asked = 0
  private consumed = 0
  private aheadBytes = 0

  constructor(
    private readonly reader: ImageReader,
    private readonly units: readonly number[],
    private readonly windowBytes = READ_AHEAD_BYTES,
  ) {}

  /** Resolves once units[i] can be read without waiting on the network. */
  async ready(i: number, signal?: AbortSignal): Promise<void> {
    const {reader, units} = this
    if (!reader.remote) return
    for (; this.consumed < i && this.consumed < this.asked; this.consumed++) this.aheadBytes -= this.bytesOf(units[this.consumed])
    this.consumed = Math.max(this.consumed, i)
    this.asked = Math.max(this.asked, i)
    const wanted: number[] = []
    while (this.asked < units.length && (this.asked <= i || this.aheadBytes < this.windowBytes)) {
      const unit = units[this.asked++]
      wanted.push(unit)
      this.aheadBytes += this.bytesOf(unit)
    }
    if (wanted.length > 0) reader.fetchAhead(wanted)
    const unit = units[i]
    if (reader.isLocal(unit)) return
    // The one read next goes ahead of the window.
    reader.fetchAhead([unit], PRIORITY_DEMAND)
    for (let delay = 1; !reader.isLocal(unit); delay = Math.min(delay * 2, 20)) {
      signal?.throwIfAborted()
      await new Promise((resolve) => setTimeout(resolve, delay))
    }
  }

  /** Resolves once every one of `units` can be read without waiting (asked all at once). */
  static async all(reader: ImageReader, units: readonly number[], signal?: AbortSignal): Promise<void> {
    const ahead = new ReadAhead(reader, units, Infinity)
    for (let i = 0; i < units.length; i++) await ahead.ready(i, signal)
  }

  private bytesOf(unit: number): number {
    const entry = this.reader.entry(unit)
    return entry.codec === Codec.None ? 0 : entry.storedLength
  }
}
