import fs from 'node:fs'

import {adviseWillNeed} from '../../sys/index.js'

/** Each request to the kernel covers this much, so a stop is obeyed within one of them. */
const STEP_BYTES = 8 << 20

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
 * sequential requests costs less than a few hundred random ones. Only when every file fits in a
 * quarter of the memory available (a larger one would push out what the host needs, and be
 * pushed out itself before it is used). `paths` are the files the handler has open
 * (/proc/self/fd/N): the same files whatever was renamed over their names since.
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
    for (const [i, fd] of fds.entries()) {
      for (let offset = 0; offset < sizes[i]; offset += STEP_BYTES) {
        if (signal.aborted) return {bytes, ms: performance.now() - started, skipped: 'stopped'}
        const length = Math.min(STEP_BYTES, sizes[i] - offset)
        await adviseWillNeed(fd, offset, length)
        bytes += length
      }
    }
    return {bytes, ms: performance.now() - started}
  } finally {
    for (const fd of fds) fs.closeSync(fd)
  }
}

/** MemAvailable from /proc/meminfo, in bytes (undefined where there is none). */
export function memoryAvailable(meminfo = readMeminfo()): number | undefined {
  const m = /^MemAvailable:\s+(\d+) kB$/m.exec(meminfo ?? '')
  return m ? Number(m[1]) * 1024 : undefined
}

function readMeminfo(): string | undefined {
  try {
    return fs.readFileSync('/proc/meminfo', 'utf8')
  } catch {
    return undefined
  }
}
