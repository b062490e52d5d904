// The bindings of native/libuffd_fill, the project's own C library, in the order of its source.
//
// It installs the missing pages of a packed working-set block in one call: skip the pages already
// present, split at region boundaries, grow zero runs over the missing zero pages of their window,
// issue UFFDIO_COPY / UFFDIO_ZEROPAGE (uffd.ts has their semantics) and mark what went in. Done
// from JavaScript, that per-page work costs about as much as the kernel's copy itself; here a
// block costs one call. It also runs the same fill on a helper thread over a list of blocks,
// beside the fault loop (InstallHelper). The page-by-page JavaScript path
// (src/resume/fault-loop/fault-server.ts) does the same work and is used when the library is not
// loaded (not built, or UFFD_NATIVE_FILL=0).
//
// The library reads and writes memory that this side lays out (page states, regions, runs, job
// tables, counters), so both sides must agree on every index and value.

import * as libc from './libc.js'

/** Whether native/libuffd_fill is loaded (see libc.ts); without it callers install page by page. */
export const nativeBlockFill = libc.fillBlock !== undefined

/** A client region for uffdFillBlock: image bytes [offset, offset + size) at host address base. */
export interface FillRegion {
  offset: number
  size: number
  base: number
}

/** The regions as uffdFillBlock takes them (struct fill_region[]): build once per client. */
export function fillRegions(regions: readonly FillRegion[]): BigUint64Array {
  const table = new BigUint64Array(regions.length * 3)
  regions.forEach((r, i) => table.set([BigInt(r.offset), BigInt(r.size), BigInt(r.base)], i * 3))
  return table
}

export interface BlockFillResult {
  /** 0, or what stopped it: EAGAIN (nothing installed, events queued), ENOENT/ESRCH (gone), other. */
  error: number
  /** With an error: the image page it stopped at (pages installed before it stay installed). */
  stopPage: number
  pagesCopied: number
  pagesZeroed: number
  copyIoctls: number
  zeropageIoctls: number
  eexist: number
  /** Pages that went from missing to present (the caller's page counts). */
  newlyPresent: number
}

/** The client arguments every libuffd_fill call starts with (libc.FillTarget), checked. */
function fillTarget(fd: number, states: Uint8Array, zeroMap: Uint8Array, pageSize: number, regions: BigUint64Array): libc.FillTarget {
  if (zeroMap.length * 8 < states.length) throw new RangeError(`a zero map of ${zeroMap.length} bytes cannot cover ${states.length} pages`)
  return [fd, fillAddress(states), states.length, fillAddress(zeroMap), pageSize, fillAddress(regions), regions.length / 3]
}

const fillOut = new Uint32Array(7)
const fillOutAddress = libc.addressOfView(fillOut)
/** Addresses of the arrays passed to uffdFillBlock (their backing stores never move). */
const fillAddresses = new WeakMap<ArrayBufferView, number>()
function fillAddress(view: ArrayBufferView): number {
  let address = fillAddresses.get(view)
  if (address === undefined) fillAddresses.set(view, (address = libc.addressOfView(view)))
  return address
}

/**
 * Installs the missing pages of one packed working-set block in a single native call: `runs` are
 * (first image page, count, payload page or -1 for zeros) triples, `payload` the block's decoded
 * bytes, `firstRun` the run to install first (or -1). It reads and updates `states` (one byte per
 * image page: 0 missing, 1 present; pages past its end are never touched) and grows zero runs over missing zero pages (`zeroMap` bits)
 * inside aligned windows of `zeroWindowPages`. For 4 KiB pages of a cooperative client only;
 * throws if the library is not loaded (check nativeBlockFill).
 */
export function uffdFillBlock(
  fd: number,
  states: Uint8Array,
  zeroMap: Uint8Array,
  pageSize: number,
  regions: BigUint64Array,
  runs: Int32Array,
  payload: number,
  firstRun: number,
  zeroWindowPages: number,
): BlockFillResult {
  if (!libc.fillBlock) throw new Error('native/libuffd_fill is not loaded')
  const error = libc.fillBlock(...fillTarget(fd, states, zeroMap, pageSize, regions), fillAddress(runs), runs.length / 3, payload, firstRun, zeroWindowPages, fillOutAddress)
  const o = fillOut
  return {error, stopPage: o[6], pagesCopied: o[0], pagesZeroed: o[1], copyIoctls: o[2], zeropageIoctls: o[3], eexist: o[4], newlyPresent: o[5]}
}

// --- installing blocks on a helper thread (native/libuffd_fill) ---------------------------------
/** A block for an InstallHelper: its runs (packedBlockRuns) and the address of its decoded payload (0: none). */
export interface HelperJob {
  runs: Int32Array
  payload: number
}

const JOB_WORDS = 3
const JOB_DONE = 2
const GATE_HELPER = 0
const GATE_LOOP = 1
// The helper's totals, as native/libuffd_fill.c lays them out: the fillOut fields, then these.
const TOTAL_STOP_PAGE = 6
const TOTAL_ERROR = 7
const TOTAL_FINISHED = 8
const TOTAL_FIELDS = 9

/**
 * A Uint32Array whose memory never moves: the helper thread keeps pointers into it. (V8 keeps
 * typed arrays of up to 64 bytes inside its heap, where a collection may move them; taking their
 * address moves them out first, but one made over an ArrayBuffer of its own is never inside.)
 */
function pinnedUint32(length: number): Uint32Array {
  return new Uint32Array(new ArrayBuffer(Math.max(length, 1) * Uint32Array.BYTES_PER_ELEMENT))
}

/**
 * A native thread installing packed blocks, in order, into one client beside the fault loop
 * (native/libuffd_fill.c, uffd_helper_start). It shares the client's page states (each page goes
 * from missing to present once, by compare-and-swap) and a gate: the fault loop must hold the gate
 * (holdGate/releaseGate) while it reads and applies the client's events, so that no REMOVE is
 * applied between the helper's check of a page and its copy. Every buffer it was given must stay
 * alive until stop().
 */
export class InstallHelper {
  private handle = 0
  private readonly jobState: Uint32Array
  private readonly gate = pinnedUint32(2)
  private readonly totals = pinnedUint32(TOTAL_FIELDS)
  /** The totals already handed out by takeProgress(). */
  private readonly taken = new Uint32Array(TOTAL_FIELDS)

  /** `keep`: everything the thread points into, alive until stop(). */
  private constructor(jobState: Uint32Array, private readonly keep: unknown[]) {
    this.jobState = jobState
  }

  /**
   * Starts a helper, or returns undefined when the library is not loaded or no thread starts.
   * When it stops it writes 1 to the eventfd `notifyFd` (-1: none).
   */
  static start(fd: number, states: Uint8Array, zeroMap: Uint8Array, pageSize: number, regions: BigUint64Array, jobs: readonly HelperJob[], zeroWindowPages: number, notifyFd: number): InstallHelper | undefined {
    if (!libc.helperStart || jobs.length === 0) return undefined
    const target = fillTarget(fd, states, zeroMap, pageSize, regions)
    // uint64 words as (low, high) halves: addresses are below 2^53, so exact as numbers.
    const table = pinnedUint32(jobs.length * JOB_WORDS * 2)
    const set64 = (word: number, value: number): void => {
      table[word * 2] = value >>> 0
      table[word * 2 + 1] = Math.floor(value / 2 ** 32)
    }
    jobs.forEach((job, k) => {
      set64(k * JOB_WORDS, fillAddress(job.runs))
      set64(k * JOB_WORDS + 1, job.runs.length / 3)
      set64(k * JOB_WORDS + 2, job.payload)
    })
    const jobState = pinnedUint32(jobs.length)
    const helper = new InstallHelper(jobState, [table, states, zeroMap, regions, jobs])
    helper.handle = libc.helperStart(...target, libc.addressOfView(table), jobs.length, zeroWindowPages, libc.addressOfView(jobState), libc.addressOfView(helper.gate), libc.addressOfView(helper.totals), notifyFd)
    return helper.handle === 0 ? undefined : helper
  }

  /** Whether job `k` is installed. */
  done(k: number): boolean {
    return Atomics.load(this.jobState, k) === JOB_DONE
  }

  /** Whether the helper has stopped: every job done, or an error (see error). */
  get finished(): boolean {
    return Atomics.load(this.totals, TOTAL_FINISHED) === 1
  }

  /** The errno that stopped the helper (ENOENT/ESRCH: the client is gone), or 0. */
  get error(): number {
    return Atomics.load(this.totals, TOTAL_ERROR)
  }

  /** What the helper did since the last call, as uffdFillBlock reports it. */
  takeProgress(): BlockFillResult {
    const delta = (i: number): number => {
      const now = Atomics.load(this.totals, i)
      const d = now - this.taken[i]
      this.taken[i] = now
      return d
    }
    return {error: this.error, stopPage: this.totals[TOTAL_STOP_PAGE], pagesCopied: delta(0), pagesZeroed: delta(1), copyIoctls: delta(2), zeropageIoctls: delta(3), eexist: delta(4), newlyPresent: delta(5)}
  }

  /**
   * Keeps the helper from deciding on or installing a page until releaseGate: hold it while
   * reading and applying the client's events. Waits at most for the ioctl in progress.
   */
  holdGate(): void {
    Atomics.store(this.gate, GATE_LOOP, 1)
    while (Atomics.load(this.gate, GATE_HELPER) !== 0) {
      // The helper is inside one ioctl: a few microseconds.
    }
  }

  releaseGate(): void {
    Atomics.store(this.gate, GATE_LOOP, 0)
  }

  /** Stops the helper after the block it is on and waits for it; idempotent. Returns its error. */
  stop(): number {
    if (this.handle === 0) return this.error
    const handle = this.handle
    this.handle = 0
    libc.helperStop!(handle)
    this.keep.length = 0
    return this.error
  }
}
