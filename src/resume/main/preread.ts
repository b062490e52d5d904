import fs from 'node:fs'

import {adviseWillNeed, prereadPaced} from '../../sys/index.js'

/** Each request to the kernel covers this much, so a stop is obeyed within one of them. */
const STEP_BYTES = 8 << 20

/**
 * Paced, a step is asked for once the one before it has been read: a fault's own read waits
 * behind at most two of them (~5 ms at this host's 760 MB/s, ~40 ms at 100 MB/s).
 */
const PACED_STEP_BYTES = 2 << 20

/** What reading ahead did: bytes asked into the page cache, and how long it took. */
export interface Preread {
  bytes: number
  ms: number
  /** Why nothing (or not everything) was read: too large for the memory available, stopped, failed. */
  skipped?: string
}

/**
 * Reads the snapshot's files into the page cache in the background (`--preread auto`): on a fresh
 * host the first faults would otherwise each wait for a random read of the disk, and the stored
 * snapshot is several times smaller than the memory it holds, so reading it whole in large
 * sequential requests costs less than a few hundred random ones; paced (readAheadFile), so that
 * the faults' own reads are not queued behind the whole file. Only when every file fits in a
 * quarter of the memory available (a larger one would push out what the host needs, and be
 * pushed out itself before it is used): the host's, or less within a cgroup's memory limit,
 * whose page cache counts against it. `paths` are the files the handler has open
 * (/proc/self/fd/N): the same files whatever was renamed over their names since. (A block
 * device's size is not its fstat size, 0: it is left out.)
 */
export async function prereadFiles(paths: readonly string[], signal: AbortSignal, availableBytes = memoryAvailable()): Promise<Preread> {
  const started = performance.now()
  const fds = paths.map((p) => fs.openSync(p, 'r'))
  try {
    const sizes = fds.map((fd) => fs.fstatSync(fd).size)
    const total = sizes.reduce((a, b) => a + b, 0)
    if (availableBytes === undefined || total > availableBytes / 4) {
      return {bytes: 0, ms: 0, skipped: `the snapshot (${total} bytes) is larger than a quarter of the memory available`}
    }
    let bytes = 0
    // Read by the native loop between its steps.
    const stop = new Int32Array(new SharedArrayBuffer(4))
    const stopping = (): void => {
      Atomics.store(stop, 0, 1)
    }
    signal.addEventListener('abort', stopping)
    try {
      for (const [i, fd] of fds.entries()) {
        if (signal.aborted) break
        bytes += await readAheadFile(fd, sizes[i], signal, stop)
      }
    } finally {
      signal.removeEventListener('abort', stopping)
    }
    return {bytes, ms: performance.now() - started, ...(signal.aborted ? {skipped: 'stopped'} : {})}
  } finally {
    for (const fd of fds) fs.closeSync(fd)
  }
}

/** Asks one file into the page cache, paced when native/libuffd_preread is there; the bytes asked for. */
async function readAheadFile(fd: number, size: number, signal: AbortSignal, stop: Int32Array): Promise<number> {
  const paced = prereadPaced(fd, size, PACED_STEP_BYTES, stop)
  if (paced) return paced
  // Without it: WILLNEED a step at a time, each submitted but not waited for.
  let bytes = 0
  for (let offset = 0; offset < size && !signal.aborted; offset += STEP_BYTES) {
    const length = Math.min(STEP_BYTES, size - offset)
    await adviseWillNeed(fd, offset, length)
    bytes += length
  }
  return bytes
}

/**
 * Bytes of memory available to this process: MemAvailable from /proc/meminfo, or less when its
 * cgroup (v2) has a memory.max, less what the cgroup uses already. Undefined where /proc/meminfo
 * says nothing.
 */
export function memoryAvailable(meminfo = readText('/proc/meminfo'), cgroup = cgroupMemory()): number | undefined {
  const m = /^MemAvailable:\s+(\d+) kB$/m.exec(meminfo ?? '')
  if (!m) return undefined
  const host = Number(m[1]) * 1024
  return cgroup ? Math.max(0, Math.min(host, cgroup.max - cgroup.current)) : host
}

/** This process's cgroup v2 memory limit and use, or undefined when it has none (or no cgroup v2). */
export function cgroupMemory(self = readText('/proc/self/cgroup'), read = readText): {max: number; current: number} | undefined {
  const m = /^0::(\/.*)$/m.exec(self ?? '')
  if (!m) return undefined
  const dir = `/sys/fs/cgroup${m[1] === '/' ? '' : m[1]}`
  const max = read(`${dir}/memory.max`)?.trim()
  const current = read(`${dir}/memory.current`)?.trim()
  if (!max || max === 'max' || !current || !/^\d+$/.test(max) || !/^\d+$/.test(current)) return undefined
  return {max: Number(max), current: Number(current)}
}

function readText(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8')
  } catch {
    return undefined
  }
}
