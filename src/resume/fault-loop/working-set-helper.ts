import {type ImageReader} from '../../snapshot/layered-reader.js'
import {type Client} from './client.js'
import {type HelperThread, type Installed, type Installer} from './installer.js'
import {type PayloadSource} from './payload-source.js'

/**
 * The part of a working set the fault loop installs itself when a helper thread takes the rest:
 * the loop also serves the faults and runs the JavaScript around each block, so even shares left
 * it finishing last (bench/prefetch replays: a 30/70 split beat halves on scattered pages and on
 * 64 KiB clusters; a smaller share was slower again on scattered pages).
 */
export const LOOP_SHARE_OF_WORKING_SET = 0.3

/** What a helper did since it was last polled, and whether it has stopped (finished or failed). */
export interface HelperProgress extends Installed {
  stopped: boolean
  error?: Error
}

/**
 * A native thread (native/libuffd_fill) installing the later part of one client's staged working
 * set beside the fault loop, which installs the first part and serves faults meanwhile. While it
 * runs it shares the client's page states (each page goes from missing to present once, by
 * compare-and-swap: PageStates.shared) and a gate the loop holds while it reads and applies the
 * client's events, so no REMOVE is applied between the helper's check of a page and its copy.
 * Everything about the helper lives here: the share, the start, polling, the gate, the stop.
 */
export class WorkingSetHelper {
  /** units[..releasedUpTo) are installed and released to the payload source. */
  private releasedUpTo = 0
  private stoppedAlready = false

  private constructor(
    private readonly client: Client,
    private readonly thread: HelperThread,
    /** The units it installs, in order: packed blocks, all decoded before it started. */
    readonly units: readonly number[],
    private readonly installer: Installer,
    private readonly source: PayloadSource,
  ) {}

  /**
   * Gives the later part of `workingSet` (the client's staged set, in order) to a helper thread
   * when every unit of that part is a packed block already decoded, so the thread never waits.
   * Returns the helper and how many units of the set the loop keeps, or undefined (the loop
   * installs it all: a set too small to split, no native library, hit counting, a restored
   * process, or a unit not ready).
   */
  static start(
    client: Client,
    workingSet: readonly number[],
    parts: {reader: ImageReader; installer: Installer; source: PayloadSource; blockRuns: (block: number) => Int32Array},
  ): {helper: WorkingSetHelper; loopUnits: number} | undefined {
    const {reader, installer, source} = parts
    if (workingSet.length < 2 || source.eventFd < 0) return undefined
    const loopUnits = Math.ceil(workingSet.length * LOOP_SHARE_OF_WORKING_SET)
    const units = workingSet.slice(loopUnits)
    const jobs: {runs: Int32Array; payload: number}[] = []
    for (const unit of units) {
      const block = reader.packedBlock(unit)
      const payload = source.readyAddress(unit)
      if (block === undefined || payload === undefined) return undefined
      jobs.push({runs: parts.blockRuns(block), payload})
    }
    const thread = installer.startHelper(client, jobs, source.eventFd)
    if (!thread) return undefined
    const helper = new WorkingSetHelper(client, thread, units, installer, source)
    client.helper = helper
    client.states.shared = true
    return {helper, loopUnits}
  }

  /** Whether the thread has stopped: every unit installed, or an error. */
  get stopped(): boolean {
    return this.thread.finished
  }

  /** Whether it stopped having installed every unit it was given (not on an error). */
  get completedAll(): boolean {
    return this.thread.finished && this.thread.error === 0
  }

  /**
   * Accounts what the thread installed since last asked and releases the units it finished.
   * `error`: it stopped on an errno the installer does not expect (a SysError), after
   * installing `pages`; serving the client is then impossible.
   */
  poll(): HelperProgress {
    // Read before its counts: once it says finished, all it did is counted.
    const stopped = this.thread.finished
    const done = this.thread.takeProgress()
    let progress: HelperProgress
    try {
      progress = {...this.installer.accountBlockFill(this.client, 'a packed working-set block (install helper)', done), stopped}
    } catch (error) {
      progress = {outcome: 'served', pages: done.pagesCopied + done.pagesZeroed, stopped, error: error as Error}
    }
    while (this.releasedUpTo < this.units.length && this.thread.done(this.releasedUpTo)) this.source.release(this.client.id, this.units[this.releasedUpTo++])
    return progress
  }

  /**
   * Stops the thread after the block it is on and waits for it: it must be gone before the
   * client's uffd closes or the slots it reads are freed. Units it did not finish are released
   * (faults install them, or nobody). Idempotent.
   */
  stop(): void {
    if (this.stoppedAlready) return
    this.stoppedAlready = true
    this.thread.stop()
    this.client.helper = undefined
    this.client.states.shared = false
    for (const unit of this.units.slice(this.releasedUpTo)) this.source.release(this.client.id, unit)
    this.releasedUpTo = this.units.length
  }

  /**
   * Keeps the thread from deciding on or installing a page until releaseGate: held while the
   * loop reads and applies the client's events. Waits at most for the ioctl in progress.
   */
  holdGate(): void {
    this.thread.holdGate()
  }

  releaseGate(): void {
    this.thread.releaseGate()
  }
}
