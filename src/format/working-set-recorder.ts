// Apart from working-set.ts, whose parsing loads the schema validator: the fault loop records
// with this alone.

/** Collects first touches while a resume runs: appends only, a few ns per fault. */
export class WorkingSetRecorder {
  private pages = new Int32Array(1024)
  private times = new Float64Array(1024)
  private count = 0
  private readonly seen: Uint8Array

  constructor(pageCount: number) {
    this.seen = new Uint8Array(pageCount)
  }

  record(page: number, ms: number): void {
    if (this.seen[page]) return
    this.seen[page] = 1
    if (this.count === this.pages.length) {
      const pages = new Int32Array(this.count * 2)
      pages.set(this.pages)
      this.pages = pages
      const times = new Float64Array(this.count * 2)
      times.set(this.times)
      this.times = times
    }
    this.pages[this.count] = page
    this.times[this.count++] = ms
  }

  result(): {pages: number[]; firstTouchMs: number[]} {
    return {pages: Array.from(this.pages.subarray(0, this.count)), firstTouchMs: Array.from(this.times.subarray(0, this.count), (t) => Math.round(t * 1000) / 1000)}
  }
}
