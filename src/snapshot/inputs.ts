import fs from 'node:fs'
import os from 'node:os'

import {UffdError} from '../core/errors.js'
import {isFileVma, isSharedVma, isSpecialVma, readCriuDump, taskVmas} from '../criu/images.js'
import {PAGE_SIZE_4K, REGION_FLAG_FILE, REGION_FLAG_SHARED, REGION_FLAG_SPECIAL, REGION_PROT_EXEC, REGION_PROT_READ, REGION_PROT_WRITE, RegionKind} from '../format/constants.js'
import {type Region, type SnapshotMetadata} from '../format/header.js'
import {seekData, seekHole} from '../sys/file.js'
import {type ReadSegment} from './chunk-job.js'
import {openInput} from './input-file.js'
import {isSnapshottable, parseMaps, parseStatState, populatedRuns, type Vma} from './proc-maps.js'
import {type ImageInput} from './writer.js'

export const TOOL_VERSION: string = (JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {version: string}).version

/** A data extent [start, end) of a file, found with SEEK_DATA/SEEK_HOLE. */
interface Extent {
  start: number
  end: number
}

/** What `toSegment` makes of each part of sorted, non-overlapping extents that intersects [start, end). */
function segmentsOf<E extends Extent, T = ReadSegment>(extents: readonly E[], start: number, end: number, toSegment: (e: E, from: number, to: number) => T): T[] {
  let lo = 0
  let hi = extents.length
  while (lo < hi) {
    const mid = (lo + hi) >>> 1
    if (extents[mid].end <= start) lo = mid + 1
    else hi = mid
  }
  const out: T[] = []
  for (let i = lo; i < extents.length && extents[i].start < end; i++) {
    out.push(toSegment(extents[i], Math.max(start, extents[i].start), Math.min(end, extents[i].end)))
  }
  return out
}

/**
 * A raw memory image (a Firecracker full-snapshot memory file, a QEMU RAM dump, ...). Holes of a
 * sparse file are found with SEEK_DATA/SEEK_HOLE and never read: they are zero pages.
 */
export function memFileInput(path: string, regionSizes?: number[]): ImageInput {
  const {fd, stat: st} = openInput(path)
  try {
    const size = st.size
    const extents: Extent[] = []
    for (let at = seekData(fd, 0); at !== null && at < size; ) {
      const end = Math.min(seekHole(fd, at), size)
      extents.push({start: at, end})
      at = end < size ? seekData(fd, end) : null
    }
    const padded = Math.ceil(size / PAGE_SIZE_4K) * PAGE_SIZE_4K
    const sizes = regionSizes ?? (padded > 0 ? [padded] : [])
    let offset = 0
    const regions: Region[] = sizes.map((regionSize, i) => {
      const r: Region = {kind: RegionKind.GuestMemory, imageOffset: offset, size: regionSize, address: offset, fileOffset: 0, prot: REGION_PROT_READ | REGION_PROT_WRITE, flags: 0, owner: 0, name: `region${i}`}
      offset += regionSize
      return r
    })
    return {
      logicalSize: size,
      regions,
      metadata: {source: 'mem-file', sourcePath: path, toolVersion: TOOL_VERSION, createdAt: new Date().toISOString(), host: os.hostname()},
      segments: (start, end) => segmentsOf(extents, start, end, (_e, from, to) => ({path, position: from, length: to - from, imageOffset: from})),
    }
  } finally {
    fs.closeSync(fd)
  }
}

/** Bytes of an image range [start, end) that are at `position` in the file `path`. */
interface FileExtent extends Extent {
  path: string
  position: number
}

/**
 * The memory of a CRIU dump (criu dump -D DIR): every task's VMAs, tasks in pstree order, each
 * task's VMAs in address order, laid end to end; regions are owned by the task's pid. The data is
 * read straight from the raw pages images; whatever CRIU did not dump (pages never populated,
 * clean file pages, shared file mappings) reads as zero pages.
 */
export function criuDirInput(dir: string): ImageInput {
  const dump = readCriuDump(dir)
  const regions: Region[] = []
  const extents: FileExtent[] = []
  const inParent: Extent[] = []
  const tasks: {pid: number; ppid: number; comm: string; pages: number; rawPageBytes: number; parentPages?: number}[] = []
  let imageOffset = 0
  for (const task of dump.tasks) {
    for (const {vma, name, data, inParent: unchanged} of taskVmas(dump, task)) {
      regions.push({
        kind: RegionKind.ProcessVma,
        imageOffset,
        size: vma.end - vma.start,
        address: vma.start,
        fileOffset: vma.pgoff,
        // CRIU stores PROT_* bits, which are the region's prot bits.
        prot: vma.prot & (REGION_PROT_READ | REGION_PROT_WRITE | REGION_PROT_EXEC),
        flags: (isSharedVma(vma) ? REGION_FLAG_SHARED : 0) | (isFileVma(vma) ? REGION_FLAG_FILE : 0) | (isSpecialVma(vma) ? REGION_FLAG_SPECIAL : 0),
        owner: task.pid,
        name,
      })
      for (const d of data) {
        const start = imageOffset + (d.address - vma.start)
        extents.push({start, end: start + d.length, path: d.file, position: d.position})
      }
      for (const d of unchanged) {
        const start = imageOffset + (d.address - vma.start)
        inParent.push({start, end: start + d.length})
      }
      imageOffset += vma.end - vma.start
    }
    const parentPages = task.pagemap?.parentPages ?? 0
    tasks.push({pid: task.pid, ppid: task.ppid, comm: task.comm, pages: task.pagemap?.presentPages ?? 0, rawPageBytes: task.pagemap?.pagesFileSize ?? 0, ...(parentPages ? {parentPages} : {})})
  }
  const unchangedPages = inParent.reduce((sum, e) => sum + (e.end - e.start), 0) / PAGE_SIZE_4K
  const shmemPageBytes = [...dump.shmem.values()].reduce((sum, p) => sum + p.pagesFileSize, 0)
  return {
    logicalSize: imageOffset,
    regions,
    metadata: {
      source: 'criu',
      criuDir: dir,
      tasks,
      // Everything in the dump's page images, shared memory included: what the snapshot replaces.
      rawPageBytes: tasks.reduce((sum, t) => sum + t.rawPageBytes, 0) + shmemPageBytes,
      toolVersion: TOOL_VERSION,
      createdAt: new Date().toISOString(),
      host: os.hostname(),
    },
    segments: (start, end) => segmentsOf(extents, start, end, (e, from, to) => ({path: e.path, position: e.position + (from - e.start), length: to - from, imageOffset: from})),
    // An incremental dump (criu dump --prev-images-dir): pages in the parent dump's images.
    ...(unchangedPages ? {unchangedPages, unchanged: (start: number, end: number) => segmentsOf(inParent, start, end, (_e, from, to) => ({start: from, end: to}))} : {}),
  }
}

export class ProcessSnapshotError extends UffdError {
  declare readonly code: 'NO_SUCH_PROCESS' | 'PERMISSION' | 'EXITED'
  constructor(message: string, code: ProcessSnapshotError['code']) {
    super(code, message)
    this.name = 'ProcessSnapshotError'
  }
}

/** A populated page range of the process, placed at `imageOffset` in the image. */
interface ProcessExtent extends Extent {
  address: number
}

/**
 * A live process's memory: every readable mapping, in address order, laid end to end in the image.
 * Pages the process never populated (pagemap: neither present nor swapped) are not read and become
 * zero pages; the rest is read through /proc/PID/mem by the workers.
 */
export class ProcessInput implements ImageInput {
  readonly logicalSize: number
  readonly regions: Region[] = []
  readonly metadata: SnapshotMetadata
  readonly vmas: Vma[]
  private readonly extents: ProcessExtent[] = []
  private readonly memPath: string

  constructor(readonly pid: number) {
    this.memPath = `/proc/${pid}/mem`
    const maps = readProcFile(pid, 'maps')
    this.vmas = parseMaps(maps).filter(isSnapshottable)
    const pagemapFd = openProcFile(pid, 'pagemap')
    let imageOffset = 0
    try {
      for (const vma of this.vmas) {
        const size = vma.end - vma.start
        this.regions.push({
          kind: RegionKind.ProcessVma,
          imageOffset,
          size,
          address: vma.start,
          fileOffset: vma.offset,
          prot: (vma.readable ? REGION_PROT_READ : 0) | (vma.writable ? REGION_PROT_WRITE : 0) | (vma.executable ? REGION_PROT_EXEC : 0),
          flags: (vma.shared ? REGION_FLAG_SHARED : 0) | (vma.inode !== 0 ? REGION_FLAG_FILE : 0) | (vma.path.startsWith('[') ? REGION_FLAG_SPECIAL : 0),
          owner: pid,
          name: vma.path,
        })
        for (const run of this.populated(pagemapFd, vma)) {
          const start = imageOffset + (run.firstPage * PAGE_SIZE_4K - vma.start)
          this.extents.push({start, end: start + run.count * PAGE_SIZE_4K, address: run.firstPage * PAGE_SIZE_4K})
        }
        imageOffset += size
      }
    } finally {
      fs.closeSync(pagemapFd)
    }
    this.logicalSize = imageOffset
    const command = readProcFile(pid, 'cmdline').split('\0').filter(Boolean).join(' ')
    this.metadata = {source: 'process', pid, command, toolVersion: TOOL_VERSION, createdAt: new Date().toISOString(), host: os.hostname()}
  }

  segments(start: number, end: number): ReadSegment[] {
    return segmentsOf(this.extents, start, end, (e, from, to) => ({path: this.memPath, position: e.address + (from - e.start), length: to - from, imageOffset: from}))
  }

  get populatedBytes(): number {
    return this.extents.reduce((sum, e) => sum + (e.end - e.start), 0)
  }

  private *populated(pagemapFd: number, vma: Vma): Generator<{firstPage: number; count: number}> {
    const firstPage = vma.start / PAGE_SIZE_4K
    const pages = (vma.end - vma.start) / PAGE_SIZE_4K
    const batch = 65536 // pagemap entries per read: 512 KiB describing 256 MiB
    const buf = Buffer.alloc(batch * 8)
    let pending: {firstPage: number; count: number} | undefined
    for (let done = 0; done < pages; done += batch) {
      const n = Math.min(batch, pages - done)
      const bytes = fs.readSync(pagemapFd, buf, 0, n * 8, (firstPage + done) * 8)
      if (bytes !== n * 8) throw new ProcessSnapshotError(`process ${this.pid}: short read of its pagemap`, 'EXITED')
      for (const run of populatedRuns(buf.subarray(0, bytes), firstPage + done)) {
        // Join runs that continue across a batch boundary.
        if (pending && pending.firstPage + pending.count === run.firstPage) {
          pending.count += run.count
          continue
        }
        if (pending) yield pending
        pending = {...run}
      }
    }
    if (pending) yield pending
  }
}

function describeProcError(pid: number, what: string, error: unknown): Error {
  const code = (error as NodeJS.ErrnoException).code
  if (code === 'ENOENT' || code === 'ESRCH') return new ProcessSnapshotError(`no process with pid ${pid}`, 'NO_SUCH_PROCESS')
  if (code === 'EACCES' || code === 'EPERM') {
    return new ProcessSnapshotError(`no permission to read /proc/${pid}/${what} (run as root or as the process's owner with ptrace access)`, 'PERMISSION')
  }
  return error as Error
}

function readProcFile(pid: number, what: string): string {
  try {
    return fs.readFileSync(`/proc/${pid}/${what}`, 'utf8')
  } catch (error) {
    throw describeProcError(pid, what, error)
  }
}

function openProcFile(pid: number, what: string): number {
  try {
    return fs.openSync(`/proc/${pid}/${what}`, 'r')
  } catch (error) {
    throw describeProcError(pid, what, error)
  }
}

export function processExists(pid: number): boolean {
  try {
    const state = parseStatState(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'))
    return state !== 'Z' && state !== 'X'
  } catch {
    return false
  }
}

/**
 * Stops a process with SIGSTOP for a consistent image and waits until the kernel reports it
 * stopped. Returns a function that resumes it (a no-op if it was already stopped before).
 */
export async function freezeProcess(pid: number, timeoutMs = 5000): Promise<() => void> {
  const stateOf = (): string => parseStatState(readProcFile(pid, 'stat'))
  const before = stateOf()
  if (before === 'Z' || before === 'X') throw new ProcessSnapshotError(`process ${pid} has exited (zombie)`, 'EXITED')
  if (before === 'T') return () => {}
  try {
    process.kill(pid, 'SIGSTOP')
  } catch (error) {
    throw describeProcError(pid, 'stat', error)
  }
  let resumed = false
  const resume = (): void => {
    if (resumed) return
    resumed = true
    try {
      process.kill(pid, 'SIGCONT')
    } catch {
      // Gone meanwhile: nothing to resume.
    }
  }
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const state = stateOf()
    if (state === 'T') return resume
    if (state === 'Z' || state === 'X') throw new ProcessSnapshotError(`process ${pid} exited while being stopped`, 'EXITED')
    if (Date.now() > deadline) {
      resume()
      throw new ProcessSnapshotError(`process ${pid} did not stop within ${timeoutMs} ms (state ${state})`, 'EXITED')
    }
    await new Promise((r) => setTimeout(r, 2))
  }
}
