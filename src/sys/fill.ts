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

// --- the ABI shared with native/libuffd_fill ---------------------------------------------------
/**
 * Every index and value this side and native/libuffd_fill both use on shared memory, named after
 * the C side's enums. The library reports its own (nativeFillAbi); test/sys-fill-abi.test.ts checks
 * that the two agree, since a mismatch would not fail a call but install or count the wrong pages.
 */
export const FILL_ABI = {
  /**
   * A page's state, one byte per image page. Only missing pages are installed by the library; a
   * removed one (the client dropped it: a REMOVE event) must read as zeros, so only the fault loop
   * fills it again, on a fault.
   */
  page: {missing: 0, present: 1, removed: 2},
  /** Indices of uffd_fill_block's `out` (uint32 each), named as in BlockFillResult; `fields` is its length. */
  out: {pagesCopied: 0, pagesZeroed: 1, copyIoctls: 2, zeropageIoctls: 3, eexist: 4, newlyPresent: 5, stopPage: 6, fields: 7},
  /**
   * A run of a packed block (int32 each): its first image page, its page count, and the payload
   * page holding its first page, or `zero` for zero pages.
   */
  run: {page: 0, count: 1, payloadPage: 2, words: 3, zero: -1},
  /** A helper's job (uint64 each): the address of its runs, their count, the address of its payload. */
  job: {runs: 0, runCount: 1, payload: 2, words: 3},
  /** A job's state (uint32), written by the helper. */
  jobState: {pending: 0, running: 1, done: 2},
  /**
   * A helper's totals (uint32 each): the counts at their `out` index, then these. `finished` is
   * nonzero once every job is done or the helper stopped; `error` is the errno that stopped it.
   */
  totals: {stopPage: 6, error: 7, finished: 8, fields: 9},
  /** A helper's gate (uint32 cells, each a flag, see gate_enter in the C): the helper's, then the fault loop's. */
  gate: {helper: 0, loop: 1, cells: 2},
  /** struct fill_region, in bytes: three uint64s per client region. */
  region: {bytes: 24, offset: 0, size: 8, base: 16},
} as const

/** The library's own table of FILL_ABI's values, keyed by their C names; undefined when it is not loaded. */
export function nativeFillAbi(): Record<string, number> | undefined {
  return libc.fillAbi && Object.fromEntries(libc.fillAbi())
}

// --- filling a packed working-set block ---------------------------------------------------------
/** Whether native/libuffd_fill is loaded (see libc.ts); without it callers install page by page. */
export const nativeBlockFill = libc.fillBlock !== undefined

/** A client region for uffdFillBlock: image bytes [offset, offset + size) at host address base. */
export interface FillRegion {
  offset: number
  size: number
  base: number
}

const WORD = BigUint64Array.BYTES_PER_ELEMENT
const REGION_WORDS = FILL_ABI.region.bytes / WORD

/** The regions as uffdFillBlock takes them (struct fill_region[]): build once per client. */
export function fillRegions(regions: readonly FillRegion[]): BigUint64Array {
  const R = FILL_ABI.region
  const table = new BigUint64Array(regions.length * REGION_WORDS)
  regions.forEach((r, i) => {
    const at = i * REGION_WORDS
    table[at + R.offset / WORD] = BigInt(r.offset)
    table[at + R.size / WORD] = BigInt(r.size)
    table[at + R.base / WORD] = BigInt(r.base)
  })
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
  return [fd, fillAddress(states), states.length, fillAddress(zeroMap), pageSize, fillAddress(regions), regions.length / REGION_WORDS]
}

const fillOut = new Uint32Array(FILL_ABI.out.fields)
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
 * FILL_ABI.run triples (first image page, count, payload page or zero), `payload` the address of
 * the block's decoded bytes, `firstRun` the run to install first (or -1). It reads and updates
 * `states` (one FILL_ABI.page byte per image page: it installs missing ones and marks them
 * present; pages past its end are never touched) and grows zero runs over missing zero pages
 * (`zeroMap` bits) inside aligned windows of `zeroWindowPages`. For 4 KiB pages of a cooperative client only;
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
  const error = libc.fillBlock(...fillTarget(fd, states, zeroMap, pageSize, regions), fillAddress(runs), runs.length / FILL_ABI.run.words, payload, firstRun, zeroWindowPages, fillOutAddress)
  const o = fillOut
  const O = FILL_ABI.out
  return {error, stopPage: o[O.stopPage], pagesCopied: o[O.pagesCopied], pagesZeroed: o[O.pagesZeroed], copyIoctls: o[O.copyIoctls], zeropageIoctls: o[O.zeropageIoctls], eexist: o[O.eexist], newlyPresent: o[O.newlyPresent]}
}

// --- installing blocks on a helper thread -------------------------------------------------------
/** A block for an InstallHelper: its runs (packedBlockRuns) and the address of its decoded payload (0: none). */
export interface HelperJob {
  runs: Int32Array
  payload: number
}

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
  private readonly gate = pinnedUint32(FILL_ABI.gate.cells)
  private readonly totals = pinnedUint32(FILL_ABI.totals.fields)
  /** The totals already handed out by takeProgress(). */
  private readonly taken = new Uint32Array(FILL_ABI.totals.fields)

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
    const J = FILL_ABI.job
    const table = pinnedUint32(jobs.length * J.words * 2)
    const set64 = (word: number, value: number): void => {
      table[word * 2] = value >>> 0
      table[word * 2 + 1] = Math.floor(value / 2 ** 32)
    }
    jobs.forEach((job, k) => {
      set64(k * J.words + J.runs, fillAddress(job.runs))
      set64(k * J.words + J.runCount, job.runs.length / FILL_ABI.run.words)
      set64(k * J.words + J.payload, job.payload)
    })
    const jobState = pinnedUint32(jobs.length)
    const helper = new InstallHelper(jobState, [table, states, zeroMap, regions, jobs])
    helper.handle = libc.helperStart(...target, libc.addressOfView(table), jobs.length, zeroWindowPages, libc.addressOfView(jobState), libc.addressOfView(helper.gate), libc.addressOfView(helper.totals), notifyFd)
    return helper.handle === 0 ? undefined : helper
  }

  /** Whether job `k` is installed. */
  done(k: number): boolean {
    return Atomics.load(this.jobState, k) === FILL_ABI.jobState.done
  }

  /** Whether the helper has stopped: every job done, or an error (see error). */
  get finished(): boolean {
    return Atomics.load(this.totals, FILL_ABI.totals.finished) !== 0
  }

  /** The errno that stopped the helper (ENOENT/ESRCH: the client is gone), or 0. */
  get error(): number {
    return Atomics.load(this.totals, FILL_ABI.totals.error)
  }

  /** What the helper did since the last call, as uffdFillBlock reports it. */
  takeProgress(): BlockFillResult {
    const delta = (i: number): number => {
      const now = Atomics.load(this.totals, i)
      const d = now - this.taken[i]
      this.taken[i] = now
      return d
    }
    const O = FILL_ABI.out
    return {error: this.error, stopPage: this.totals[FILL_ABI.totals.stopPage], pagesCopied: delta(O.pagesCopied), pagesZeroed: delta(O.pagesZeroed), copyIoctls: delta(O.copyIoctls), zeropageIoctls: delta(O.zeropageIoctls), eexist: delta(O.eexist), newlyPresent: delta(O.newlyPresent)}
  }

  /**
   * Keeps the helper from deciding on or installing a page until releaseGate: hold it while
   * reading and applying the client's events. Waits at most for the ioctl in progress.
   */
  holdGate(): void {
    Atomics.store(this.gate, FILL_ABI.gate.loop, 1)
    while (Atomics.load(this.gate, FILL_ABI.gate.helper) !== 0) {
      // The helper is inside one ioctl: a few microseconds.
    }
  }

  releaseGate(): void {
    Atomics.store(this.gate, FILL_ABI.gate.loop, 0)
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
