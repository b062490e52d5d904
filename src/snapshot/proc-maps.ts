/** Parsing of /proc/PID/maps and /proc/PID/stat. Pure; unit-tested on captured text. */
import {UffdError} from '../core/errors.js'

export interface Vma {
  start: number
  end: number
  readable: boolean
  writable: boolean
  executable: boolean
  shared: boolean
  offset: number
  inode: number
  path: string
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) ([r-])([w-])([x-])([ps]) ([0-9a-f]+) [0-9a-f]+:[0-9a-f]+ (\d+)\s*(.*)$/

export function parseMaps(text: string): Vma[] {
  const vmas: Vma[] = []
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue
    const m = MAPS_LINE.exec(line)
    if (!m) throw new UffdError('INTERNAL', `unexpected line in maps: ${JSON.stringify(line)}`)
    vmas.push({
      start: parseInt(m[1], 16),
      end: parseInt(m[2], 16),
      readable: m[3] === 'r',
      writable: m[4] === 'w',
      executable: m[5] === 'x',
      shared: m[6] === 's',
      offset: parseInt(m[7], 16),
      inode: Number(m[8]),
      path: m[9],
    })
  }
  return vmas
}

/**
 * Mappings whose contents cannot be read through /proc/PID/mem or are provided by the kernel
 * anew in every process (reading [vvar] fails with EIO; [vsyscall] is a fixed kernel page).
 */
const KERNEL_MAPPINGS = new Set(['[vvar]', '[vvar_vclock]', '[vsyscall]'])

export function isSnapshottable(vma: Vma): boolean {
  return vma.readable && !KERNEL_MAPPINGS.has(vma.path)
}

/** The single-letter state from /proc/PID/stat ('R', 'S', 'T', 'Z', ...). */
export function parseStatState(stat: string): string {
  // The command name is in parentheses and may itself contain spaces or parentheses.
  const close = stat.lastIndexOf(')')
  if (close < 0) throw new UffdError('INTERNAL', 'unexpected /proc/PID/stat format')
  return stat.slice(close + 2, close + 3)
}

/** A run of consecutive pages that /proc/PID/pagemap reports present in RAM or swapped out. */
export interface PageRun {
  firstPage: number
  count: number
}

/** Bits 63 (present) and 62 (swapped) of a pagemap entry, seen in its high 32-bit word. */
const PAGEMAP_POPULATED_HIGH_BITS = 0xc0000000

/**
 * Runs of populated pages in a block of pagemap entries (8 bytes per page). Pages neither present
 * nor swapped were never populated: reading them would only produce zeros (or fault in file
 * contents the process never looked at), so they become zero pages in the snapshot.
 */
export function populatedRuns(pagemap: Buffer, firstPage: number): PageRun[] {
  const runs: PageRun[] = []
  const entries = pagemap.length / 8
  let runStart = -1
  for (let i = 0; i < entries; i++) {
    const populated = (pagemap.readUInt32LE(i * 8 + 4) & PAGEMAP_POPULATED_HIGH_BITS) !== 0
    if (populated && runStart < 0) runStart = i
    if (!populated && runStart >= 0) {
      runs.push({firstPage: firstPage + runStart, count: i - runStart})
      runStart = -1
    }
  }
  if (runStart >= 0) runs.push({firstPage: firstPage + runStart, count: entries - runStart})
  return runs
}
