import {UffdError} from '../../core/errors.js'
import {bucketOf} from '../../resume/run-stats.js'
import {crc32} from '../../sys/crc.js'
import {backoffMs, type ExtentTable, planRun} from '../coalesce.js'
import {type ObjectIdentity, RemoteError, type RemoteObject} from '../object.js'
import {type FetchOptions, PRIORITY_DEMAND, type Priority, type RemoteCounters} from '../shared.js'

interface Wanted {
  priority: Priority
  /** Set when the extent's first request is sent: time spent queued behind other fetches is not the store's fault. */
  deadline: number | undefined
  resolve: (bytes: Buffer | undefined) => void
  reject: (error: Error) => void
  promise: Promise<Buffer | undefined>
}

/**
 * Fetches extents of one remote object: each wanted extent once (concurrent wants share one
 * fetch), neighbours wanted at the same time in one ranged request, at most `concurrency`
 * requests at once, demand before prefetch (prefetch never takes the last slots, so a fault
 * never queues behind a full pipe of readahead). A failed request is retried with backoff until
 * its extents' deadline; bytes that fail their CRC are a failed request too, so a lying server
 * never gets a byte through. An extent's deadline runs from its first request, not from its
 * want: time queued behind other fetches is not the store failing. Resolves each want with the
 * extent's verified stored bytes. Each extent is taken (`take`: claimed across the handlers
 * sharing a cache directory) when its request is sent, not when it is wanted, so a fetch queued
 * here holds no other handler up; one that another handler has taken resolves undefined.
 */
export class FetchScheduler {
  private readonly wanted = new Map<number, Wanted>()
  private readonly inFlight = new Set<number>()
  private readonly demandQueue: number[] = []
  private readonly prefetchQueue: number[] = []
  private requests = 0
  /** Open hold() calls: requests wait for the last release(). */
  private holds = 0
  private readonly reserved: number

  constructor(
    private readonly table: ExtentTable,
    private readonly object: RemoteObject,
    private readonly identity: ObjectIdentity,
    private readonly options: FetchOptions,
    private readonly counters: RemoteCounters,
    private readonly latency: BigInt64Array,
    private readonly random: () => number = Math.random,
    private readonly take: (extent: number) => boolean = () => true,
  ) {
    this.reserved = options.concurrency > 2 ? 2 : options.concurrency > 1 ? 1 : 0
  }

  /** The extent's verified bytes, fetched at `priority` (a later demand want promotes a queued prefetch). */
  want(extent: number, priority: Priority): Promise<Buffer | undefined> {
    const existing = this.wanted.get(extent)
    if (existing) {
      if (priority > existing.priority && !this.inFlight.has(extent)) {
        existing.priority = priority
        this.demandQueue.push(extent)
        this.pump()
      }
      return existing.promise
    }
    let resolve!: (bytes: Buffer | undefined) => void
    let reject!: (error: Error) => void
    const promise = new Promise<Buffer | undefined>((res, rej) => {
      resolve = res
      reject = rej
    })
    this.wanted.set(extent, {priority, deadline: undefined, resolve, reject, promise})
    ;(priority === PRIORITY_DEMAND ? this.demandQueue : this.prefetchQueue).push(extent)
    this.pump()
    return promise
  }

  /**
   * Holds requests back while several extents are wanted at once (one reader's message), so that
   * neighbours among them go out in one ranged request: wanted one by one, the first would be
   * sent alone the moment it was wanted. Every hold() is ended by a release(), which sends.
   */
  hold(): void {
    this.holds++
  }

  release(): void {
    this.holds = Math.max(0, this.holds - 1)
    this.pump()
  }

  /** Raises a queued want's priority; nothing if it is not wanted (fetched, being stored, or failed). */
  promote(extent: number, priority: Priority): void {
    if (this.wanted.has(extent)) void this.want(extent, priority)
  }

  get idle(): boolean {
    return this.wanted.size === 0
  }

  private pump(): void {
    if (this.holds > 0) return
    while (this.requests < this.options.concurrency) {
      let head = this.next(this.demandQueue)
      if (head < 0 && this.requests < this.options.concurrency - this.reserved) head = this.next(this.prefetchQueue)
      if (head < 0) return
      if (!this.take(head)) {
        // Another handler is fetching it: the caller waits for its file instead.
        this.wanted.get(head)!.resolve(undefined)
        this.wanted.delete(head)
        continue
      }
      const [first, end] = planRun(this.table, head, (e) => this.wanted.has(e) && !this.inFlight.has(e) && this.take(e), this.options.maxRequestBytes)
      const dispatched = performance.now() + this.options.deadlineMs
      for (let e = first; e < end; e++) {
        this.inFlight.add(e)
        const w = this.wanted.get(e)!
        w.deadline ??= dispatched
      }
      this.requests++
      void this.fetchRun(first, end).finally(() => {
        this.requests--
        this.pump()
      })
    }
  }

  /** The first queued extent still wanted and not in flight. */
  private next(queue: number[]): number {
    while (queue.length > 0) {
      const extent = queue.shift()!
      if (this.wanted.has(extent) && !this.inFlight.has(extent)) return extent
    }
    return -1
  }

  /** Fetches extents [first, end) until each is verified, failed for good, or past its deadline. */
  private async fetchRun(first: number, end: number): Promise<void> {
    const {offsets, lengths} = this.table
    let lastError: Error | undefined
    // Whether the last answer was whole but its bytes failed their CRC (not a failed request).
    let lastWasMismatch = false
    for (let attempt = 0; ; attempt++) {
      const from = offsets[first]
      const length = offsets[end - 1] + lengths[end - 1] - from
      const started = performance.now()
      try {
        const bytes = await this.object.read(from, length, this.identity, {idleTimeoutMs: this.options.idleTimeoutMs})
        this.counters.add('requests')
        this.counters.add('bytesFetched', bytes.length)
        Atomics.add(this.latency, bucketOf((performance.now() - started) * 1000), 1n)
        let bad = -1
        let lastBad = -1
        for (let e = first; e < end; e++) {
          const at = offsets[e] - from
          const piece = bytes.subarray(at, at + lengths[e])
          if (crc32(piece, this.table.seeds[e]) === this.table.crcs[e]) this.settle(e, Buffer.from(piece))
          else {
            if (bad < 0) bad = e
            lastBad = e
          }
        }
        if (bad < 0) return
        lastWasMismatch = true
        this.counters.add('badResponses')
        lastError = new RemoteError('REMOTE_PROTOCOL', `${this.object.name}: bytes ${offsets[bad]}-${offsets[lastBad] + lengths[lastBad] - 1} failed their CRC (the server sent other bytes than the snapshot's)`, true)
        ;[first, end] = [bad, lastBad + 1]
      } catch (error) {
        lastError = error as Error
        lastWasMismatch = false
        if (!(error instanceof RemoteError) || !error.retryable) {
          const range = `bytes ${offsets[first]}-${offsets[end - 1] + lengths[end - 1] - 1}`
          const code = error instanceof UffdError ? error.code : 'INTERNAL'
          const message = (error as Error).message
          // The store's message names the object; the range says which chunks the client lost.
          this.failRange(first, end, new UffdError(code, `${message.startsWith(this.object.name) ? '' : `${this.object.name}: `}${message} (fetching ${range})`, {cause: error}))
          return
        }
      }
      const deadline = this.earliestDeadline(first, end)
      const delay = backoffMs(attempt, this.random())
      if (performance.now() + delay > deadline) {
        const seconds = Math.round(this.options.deadlineMs / 100) / 10
        const range = `bytes ${offsets[first]}-${offsets[end - 1] + lengths[end - 1] - 1}`
        // The store kept answering, with bytes other than the index's: the object itself is
        // corrupt (or every path to it is), which a later retry would not change.
        if (lastWasMismatch) {
          this.failRange(first, end, new UffdError('CORRUPT', `${this.object.name}: ${range} still failed their CRC when the fetch deadline came (${seconds} s, ${attempt + 1} attempts): the object's stored bytes are not the ones its index describes`))
          return
        }
        this.failRange(first, end, new UffdError('FETCH_DEADLINE', `${this.object.name}: ${range} could not be fetched within ${seconds} s (${attempt + 1} attempts; last: ${lastError?.message})`))
        return
      }
      this.counters.add('retries')
      await new Promise((resolve) => setTimeout(resolve, delay))
    }
  }

  private earliestDeadline(first: number, end: number): number {
    let deadline = Infinity
    for (let e = first; e < end; e++) deadline = Math.min(deadline, this.wanted.get(e)?.deadline ?? Infinity)
    return deadline
  }

  private settle(extent: number, bytes: Buffer): void {
    const w = this.wanted.get(extent)
    this.inFlight.delete(extent)
    if (!w) return
    this.wanted.delete(extent)
    this.counters.add('extentsFetched')
    w.resolve(bytes)
  }

  private failRange(first: number, end: number, error: Error): void {
    for (let e = first; e < end; e++) {
      const w = this.wanted.get(e)
      this.inFlight.delete(e)
      if (!w) continue
      this.wanted.delete(e)
      w.reject(error)
    }
  }
}
