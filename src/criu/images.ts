import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {CORE_ENTRY, type Decoder, FILE_ENTRY, has, MEMFD_INODE_ENTRY, MM_ENTRY, PAGEMAP_ENTRY, PAGEMAP_HEAD, PSTREE_ENTRY, type U64} from './schema.js'

/**
 * Reading a CRIU dump directory (criu dump -D DIR): the process tree, each task's address space
 * and where the memory CRIU saved for it lies in the raw pages images.
 *
 * CRIU counts memory in pages of the host it ran on; this tool handles x86_64 dumps, 4 KiB pages.
 */
export const CRIU_PAGE_SIZE = 4096

// Image magics (criu/include/magic.h). Since images v1.1 every image except inventory.img starts
// with IMG_COMMON (IMG_SERVICE for CRIU's own service files) followed by the image's
// own magic; v1.0 images have the second one only. Raw images (pages-*.img) have none at all.
export const MAGIC = {
  IMG_COMMON: 0x54564319,
  IMG_SERVICE: 0x55105940,
  PSTREE: 0x50273030,
  CORE: 0x55053847,
  MM: 0x57492820,
  PAGEMAP: 0x56084025,
  FILES: 0x56303138,
  MEMFD_INODE: 0x48453499,
} as const

/** pagemap_entry flags (criu/include/pagemap.h). */
export const PE_PARENT = 1 << 0 // the pages are in the parent dump's images (incremental dumps)
export const PE_LAZY = 1 << 1 // the pages may be restored lazily (private anonymous memory)
export const PE_PRESENT = 1 << 2 // the pages are in this dump's pages-<pages_id>.img

/** vma_entry status bits (criu/include/image.h). */
export const VMA_AREA_VSYSCALL = 1 << 2
export const VMA_AREA_VDSO = 1 << 3
export const VMA_AREA_HEAP = 1 << 5
export const VMA_FILE_PRIVATE = 1 << 6
export const VMA_FILE_SHARED = 1 << 7
export const VMA_ANON_SHARED = 1 << 8
export const VMA_AREA_SYSVIPC = 1 << 10
export const VMA_AREA_SOCKET = 1 << 11
export const VMA_AREA_VVAR = 1 << 12
export const VMA_AREA_AIORING = 1 << 13
export const VMA_AREA_MEMFD = 1 << 14
export const VMA_AREA_SHSTK = 1 << 15
export const VMA_AREA_GUARD = 1 << 16
export const VMA_AREA_UPROBES = 1 << 17

/**
 * Areas whose contents CRIU never dumps and that are not ordinary memory: the kernel maps
 * [vsyscall], [vvar] and [uprobes] anew in every process, and a guard "VMA" only records
 * MADV_GUARD_INSTALL ranges (no vm_area_struct behind it). [vsyscall]'s address is also beyond
 * what a JavaScript number holds exactly.
 */
const NOT_MEMORY = VMA_AREA_VSYSCALL | VMA_AREA_VVAR | VMA_AREA_UPROBES | VMA_AREA_GUARD

/** core_entry.tc.task_state values (compel/include/uapi/task-state.h); a zombie is dumped as TASK_DEAD. */
export const TASK_ALIVE = 1
export const TASK_DEAD = 2
export const TASK_STOPPED = 3

const PROT_READ = 0x1
const MAP_SHARED = 0x01
// CRIU has a VMA_AREA_STACK bit but never sets it; the main stack is the VMA that grows down.
const MAP_GROWSDOWN = 0x100
/** core_entry.mtype of x86_64 dumps, the only ones whose page size this tool assumes. */
const MARCH_X86_64 = 1
const FD_TYPE_REG = 1
const FD_TYPE_MEMFD = 18

export class CriuImageError extends UffdError {
  declare readonly code: 'CRIU_IMAGE'
  constructor(
    readonly file: string,
    detail: string,
  ) {
    super('CRIU_IMAGE', `${file}: ${detail}`)
    this.name = 'CriuImageError'
  }
}

/** A run of pages recorded in a pagemap image. */
export interface PagemapEntry {
  /** Task pagemaps: virtual address; shared memory pagemaps: offset in the shared object. */
  vaddr: number
  nrPages: number
  flags: number
  /** Byte offset of the entry's data in the pages image (PE_PRESENT entries); -1 otherwise (PE_PARENT). */
  pagesOffset: number
}

export interface Pagemap {
  file: string
  /** The raw pages image (pages-<pages_id>.img) holding the PE_PRESENT entries' data back to back. */
  pagesFile: string
  pagesFileSize: number
  /** Sorted by vaddr, non-overlapping. */
  entries: PagemapEntry[]
  presentPages: number
  /** Pages of PE_PARENT entries: unchanged since the parent dump, whose images hold them (incremental dumps). */
  parentPages: number
}

export interface CriuVma {
  start: number
  end: number
  /** Offset in the mapped file or shared object, in bytes. */
  pgoff: number
  /** File mappings (memfds too): the file's id in files.img; shared anonymous memory: its shmid. */
  shmid: number
  prot: number
  /** mmap(2) flags (MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, ...). */
  flags: number
  /** CRIU's classification of the area (VMA_* bits). */
  status: number
}

export interface CriuTask {
  pid: number
  ppid: number
  pgid: number
  sid: number
  threads: number[]
  comm: string
  state: number
  /** The task's memory areas, less those that are not memory (see NOT_MEMORY); none for a zombie. */
  vmas: CriuVma[]
  /** Null for a zombie, which has no memory. */
  pagemap: Pagemap | null
}

export interface CriuDump {
  dir: string
  /** In pstree.img order: the root task first. */
  tasks: CriuTask[]
  /** Pagemaps of shared memory objects (pagemap-shmem-<shmid>.img), by shmid. */
  shmem: Map<number, Pagemap>
  /** Files that VMAs can map, by file id (files.img). */
  files: Map<number, MappedFile>
}

export interface MappedFile {
  /** A regular file's path, or a memfd's name ("memfd:NAME", or "/dev/zero (deleted)"). */
  name: string
  /** Memfds: the shmid under which their contents were dumped. */
  shmid?: number
}

/** Dumped bytes of a VMA: `length` bytes at `address` are at `position` in the raw image `file`. */
export interface DumpedRange {
  address: number
  length: number
  file: string
  position: number
}

export interface TaskVma {
  vma: CriuVma
  /** As /proc/PID/maps would name it: a file path, [heap], [stack], ..., or '' for anonymous memory. */
  name: string
  /** Sorted by address; the rest of the VMA was not dumped (never populated, or not CRIU's to save), or is in the parent dump. */
  data: DumpedRange[]
  /** Ranges whose pages are in the parent dump (PE_PARENT: unchanged since it), sorted; `file` and `position` unused. */
  inParent: DumpedRange[]
}

/** The payloads of a CRIU protobuf image: magic(s), then u32 length + message, repeated. */
export function readImagePayloads(file: string, magic: number): Buffer[] {
  const buf = readImageFile(file)
  let at = 0
  const u32 = (what: string): number => {
    if (at + 4 > buf.length) throw new CriuImageError(file, `truncated: ${what} at byte ${at} is cut off`)
    const value = buf.readUInt32LE(at)
    at += 4
    return value
  }
  let found = u32('the magic')
  if (found === MAGIC.IMG_COMMON || found === MAGIC.IMG_SERVICE) found = u32('the image magic')
  if (found !== magic) {
    throw new CriuImageError(file, `not the expected CRIU image (magic 0x${found.toString(16)}, expected 0x${magic.toString(16)})`)
  }
  const payloads: Buffer[] = []
  while (at < buf.length) {
    const size = u32(`the size of entry ${payloads.length}`)
    if (at + size > buf.length) throw new CriuImageError(file, `truncated: entry ${payloads.length} needs ${size} bytes, ${buf.length - at} left`)
    payloads.push(buf.subarray(at, at + size))
    at += size
  }
  return payloads
}

function readImageFile(file: string): Buffer {
  try {
    return fs.readFileSync(file)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new CriuImageError(file, 'missing: the dump is incomplete')
    throw new CriuImageError(file, (error as Error).message)
  }
}

function decodeImage<T>(file: string, magic: number, decoder: Decoder<T>): T[] {
  return readImagePayloads(file, magic).map((payload, i) => decodeEntry(file, i, payload, decoder))
}

function decodeEntry<T>(file: string, index: number, payload: Uint8Array, decoder: Decoder<T>): T {
  try {
    return decoder.decode(payload)
  } catch (error) {
    throw new CriuImageError(file, `entry ${index} is not a valid ${decoder.name} (${(error as Error).message})`)
  }
}

/** A uint64 field as a number; addresses and sizes of user memory stay below 2^53. */
function toNumber(value: U64, file: string, field: string): number {
  const n = typeof value === 'number' ? value : Number(BigInt(value.toString()))
  if (!Number.isSafeInteger(n)) throw new CriuImageError(file, `${field} ${value.toString()} is out of range`)
  return n
}

const hex = (n: number): string => `0x${n.toString(16)}`

/**
 * Reads a pagemap image and checks it against its pages image. PE_PARENT entries (incremental
 * dumps: `criu dump --prev-images-dir ... --track-mem`) are kept as such: their pages did not
 * change since the parent dump, whose images hold them; only a layer over the parent dump's
 * snapshot can use them. Entries that are lazy but not present are refused: `criu dump
 * --lazy-pages` leaves those pages in the dumped process, to be fetched from its page server, not
 * in any image.
 */
export function readPagemap(file: string): Pagemap {
  const payloads = readImagePayloads(file, MAGIC.PAGEMAP)
  if (payloads.length === 0) throw new CriuImageError(file, 'no pagemap_head entry')
  const head = decodeEntry(file, 0, payloads[0], PAGEMAP_HEAD)
  const pagesFile = path.join(path.dirname(file), `pages-${head.pages_id}.img`)
  const entries: PagemapEntry[] = []
  let presentPages = 0
  let parentPages = 0
  for (let i = 1; i < payloads.length; i++) {
    const e = decodeEntry(file, i, payloads[i], PAGEMAP_ENTRY)
    // Images from before CRIU 3.x: no flags (then every entry is present), in_parent instead of
    // PE_PARENT, and a 32-bit page count (criu/pagemap.c, init_compat_pagemap_entry).
    const flags = e.in_parent ? PE_PARENT : has(e, 'flags') ? e.flags! : PE_PRESENT
    const nrPages = has(e, 'nr_pages') ? toNumber(e.nr_pages!, file, `entry ${i} nr_pages`) : e.compat_nr_pages
    const vaddr = toNumber(e.vaddr, file, `entry ${i} vaddr`)
    const where = `entry ${i} (${hex(vaddr)}, ${nrPages} pages)`
    if (flags & PE_PARENT && flags & PE_PRESENT) throw new CriuImageError(file, `${where} is both in the parent dump and in this one (flags ${flags})`)
    if (!(flags & (PE_PRESENT | PE_PARENT))) {
      if (flags & PE_LAZY) throw new CriuImageError(file, `${where} is lazy and not in the images: a --lazy-pages dump, whose pages stay in the dumped process; dump without --lazy-pages`)
      throw new CriuImageError(file, `${where} has no data in the images (flags ${flags})`)
    }
    if (vaddr % CRIU_PAGE_SIZE !== 0 || nrPages <= 0) throw new CriuImageError(file, `${where} is not a page-aligned, non-empty range`)
    const previous = entries.at(-1)
    if (previous && vaddr < previous.vaddr + previous.nrPages * CRIU_PAGE_SIZE) throw new CriuImageError(file, `${where} overlaps or precedes the entry before it`)
    if (flags & PE_PARENT) {
      entries.push({vaddr, nrPages, flags, pagesOffset: -1})
      parentPages += nrPages
      continue
    }
    entries.push({vaddr, nrPages, flags, pagesOffset: presentPages * CRIU_PAGE_SIZE})
    presentPages += nrPages
  }
  let pagesFileSize: number
  try {
    pagesFileSize = fs.statSync(pagesFile).size
  } catch {
    throw new CriuImageError(pagesFile, `missing: ${path.basename(file)} stores ${presentPages} pages there`)
  }
  if (pagesFileSize !== presentPages * CRIU_PAGE_SIZE) {
    throw new CriuImageError(pagesFile, `${pagesFileSize} bytes, but ${path.basename(file)} stores ${presentPages} pages (${presentPages * CRIU_PAGE_SIZE} bytes) there`)
  }
  return {file, pagesFile, pagesFileSize, entries, presentPages, parentPages}
}

function readVmas(file: string): CriuVma[] {
  const mm = decodeImage(file, MAGIC.MM, MM_ENTRY)
  if (mm.length !== 1) throw new CriuImageError(file, `expected one mm_entry, found ${mm.length}`)
  const vmas: CriuVma[] = []
  mm[0].vmas.forEach((v, i) => {
    if (v.status & NOT_MEMORY) return
    const vma = {
      start: toNumber(v.start, file, `vma ${i} start`),
      end: toNumber(v.end, file, `vma ${i} end`),
      pgoff: toNumber(v.pgoff, file, `vma ${i} pgoff`),
      shmid: toNumber(v.shmid, file, `vma ${i} shmid`),
      prot: v.prot,
      flags: v.flags,
      status: v.status,
    }
    if (vma.start % CRIU_PAGE_SIZE !== 0 || vma.end % CRIU_PAGE_SIZE !== 0 || vma.end <= vma.start) {
      throw new CriuImageError(file, `vma ${i} ${hex(vma.start)}-${hex(vma.end)} is not a page-aligned, non-empty range`)
    }
    vmas.push(vma)
  })
  return vmas
}

function readFiles(dir: string): Map<number, MappedFile> {
  const files = new Map<number, MappedFile>()
  const filesImage = path.join(dir, 'files.img')
  // A dump of tasks without open files or file mappings may have no files.img, and one without
  // memfds no memfd.img.
  if (!fs.existsSync(filesImage)) return files
  const memfdImage = path.join(dir, 'memfd.img')
  const inodes = new Map<string, {name: string; shmid: number}>()
  if (fs.existsSync(memfdImage)) {
    for (const m of decodeImage(memfdImage, MAGIC.MEMFD_INODE, MEMFD_INODE_ENTRY)) inodes.set(m.inode_id.toString(), m)
  }
  for (const f of decodeImage(filesImage, MAGIC.FILES, FILE_ENTRY)) {
    if (f.type === FD_TYPE_REG && f.reg) files.set(f.id, {name: f.reg.name})
    if (f.type === FD_TYPE_MEMFD && f.memfd) {
      const inode = inodes.get(String(f.memfd.inode_id))
      if (!inode) throw new CriuImageError(filesImage, `memfd file ${f.id} refers to inode ${f.memfd.inode_id}, which memfd.img does not have`)
      files.set(f.id, {name: inode.name, shmid: inode.shmid})
    }
  }
  return files
}

/** Reads what a snapshot needs from a CRIU dump directory. */
export function readCriuDump(dir: string): CriuDump {
  const pstreeFile = path.join(dir, 'pstree.img')
  if (!fs.existsSync(pstreeFile)) {
    throw new CriuImageError(dir, fs.existsSync(dir) ? 'not a CRIU dump directory (no pstree.img)' : 'no such directory')
  }
  const tasks: CriuTask[] = decodeImage(pstreeFile, MAGIC.PSTREE, PSTREE_ENTRY).map((p) => {
    const coreFile = path.join(dir, `core-${p.pid}.img`)
    const cores = decodeImage(coreFile, MAGIC.CORE, CORE_ENTRY)
    if (cores.length === 0) throw new CriuImageError(coreFile, 'no core_entry')
    if (cores[0].mtype !== MARCH_X86_64) throw new CriuImageError(coreFile, `a dump of architecture ${cores[0].mtype} (enum march): only x86_64 dumps are supported`)
    const tc = cores[0].tc
    if (!tc) throw new CriuImageError(coreFile, 'no task_core_entry')
    // A zombie keeps no memory, and CRIU writes no mm or pagemap image for it.
    const hasMemory = tc.task_state === TASK_ALIVE || tc.task_state === TASK_STOPPED
    return {
      pid: p.pid,
      ppid: p.ppid,
      pgid: p.pgid,
      sid: p.sid,
      threads: p.threads,
      comm: tc.comm,
      state: tc.task_state,
      vmas: hasMemory ? readVmas(path.join(dir, `mm-${p.pid}.img`)) : [],
      pagemap: hasMemory ? readPagemap(path.join(dir, `pagemap-${p.pid}.img`)) : null,
    }
  })
  if (tasks.length === 0) throw new CriuImageError(pstreeFile, 'no tasks')
  const shmem = new Map<number, Pagemap>()
  for (const name of fs.readdirSync(dir)) {
    const m = /^pagemap-shmem-(\d+)\.img$/.exec(name)
    if (m) shmem.set(Number(m[1]), readPagemap(path.join(dir, name)))
  }
  return {dir, tasks, shmem, files: readFiles(dir)}
}

/**
 * The pagemap entries' pages that fall in [offset, offset + length), placed at `address`: the
 * dumped data of PE_PRESENT entries, or with `parent` the ranges of PE_PARENT entries.
 */
function dataIn(pagemap: Pagemap, offset: number, length: number, address: number, parent = false): DumpedRange[] {
  const {entries} = pagemap
  const end = offset + length
  let lo = 0
  let hi = entries.length
  while (lo < hi) {
    const mid = (lo + hi) >>> 1
    if (entries[mid].vaddr + entries[mid].nrPages * CRIU_PAGE_SIZE <= offset) lo = mid + 1
    else hi = mid
  }
  const out: DumpedRange[] = []
  for (let i = lo; i < entries.length && entries[i].vaddr < end; i++) {
    const e = entries[i]
    if (((e.flags & PE_PARENT) !== 0) !== parent) continue
    const from = Math.max(offset, e.vaddr)
    const to = Math.min(end, e.vaddr + e.nrPages * CRIU_PAGE_SIZE)
    out.push({address: address + (from - offset), length: to - from, file: pagemap.pagesFile, position: e.pagesOffset + (from - e.vaddr)})
  }
  return out
}

/**
 * The shmid under which the contents of a shared memory VMA were dumped, or undefined for memory
 * that is the task's own. Shared anonymous memory carries its shmid in the VMA; a memfd (and this
 * is how CRIU 4.1 classifies MAP_SHARED|MAP_ANONYMOUS memory, /dev/zero (deleted), on current
 * kernels) names its file, whose memfd inode entry holds the shmid. A MAP_PRIVATE mapping of a
 * memfd is private memory like any private file mapping.
 */
function sharedMemoryId(dump: CriuDump, vma: CriuVma): number | undefined {
  if (vma.status & VMA_ANON_SHARED) return vma.shmid
  if (vma.status & VMA_AREA_MEMFD && vma.flags & MAP_SHARED) return dump.files.get(vma.shmid)?.shmid
  return undefined
}

function vmaName(dump: CriuDump, vma: CriuVma): string {
  if (vma.status & VMA_AREA_HEAP) return '[heap]'
  if (vma.flags & MAP_GROWSDOWN) return '[stack]'
  if (vma.status & VMA_AREA_VDSO) return '[vdso]'
  if (vma.status & VMA_AREA_SHSTK) return '[shadow stack]'
  if (vma.status & VMA_AREA_AIORING) return '[aio]'
  if (vma.status & VMA_AREA_SYSVIPC) return '[sysv shm]'
  if (vma.status & VMA_AREA_SOCKET) return '[socket]'
  if (vma.status & VMA_ANON_SHARED) return '/dev/zero (deleted)'
  if (vma.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED | VMA_AREA_MEMFD)) return dump.files.get(vma.shmid)?.name ?? `[file id ${vma.shmid}]`
  return ''
}

/**
 * A task's VMAs with the data CRIU dumped for each. Private memory (anonymous, and the written
 * pages of private file mappings) is in the task's pagemap by virtual address. Shared memory
 * (anonymous or memfd) is dumped once per object, in pagemap-shmem-<shmid>.img by offset in the
 * object, and every task that maps it gets that data. The clean pages of file mappings, shared
 * file mappings and SysV segments are in their files or in other images, not in page images:
 * they read as holes.
 *
 * VMAs without read permission and without dumped data (address-space reservations) are left out,
 * as `uffd snapshot --pid` leaves out unreadable mappings. Every dumped page of the task's pagemap
 * must fall in one of its private VMAs.
 */
export function taskVmas(dump: CriuDump, task: CriuTask): TaskVma[] {
  const out: TaskVma[] = []
  let privateBytes = 0
  for (const vma of task.vmas) {
    const length = vma.end - vma.start
    const shmid = sharedMemoryId(dump, vma)
    let data: DumpedRange[] = []
    let inParent: DumpedRange[] = []
    if (shmid !== undefined) {
      // No pagemap-shmem image: nothing of the object was populated (or it is empty).
      const shm = dump.shmem.get(shmid)
      if (shm) {
        data = dataIn(shm, vma.pgoff, length, vma.start)
        inParent = dataIn(shm, vma.pgoff, length, vma.start, true)
      }
    } else if (task.pagemap) {
      data = dataIn(task.pagemap, vma.start, length, vma.start)
      inParent = dataIn(task.pagemap, vma.start, length, vma.start, true)
      privateBytes += [...data, ...inParent].reduce((sum, d) => sum + d.length, 0)
    }
    if (!(vma.prot & PROT_READ) && data.length === 0 && inParent.length === 0) continue
    out.push({vma, name: vmaName(dump, vma), data, inParent})
  }
  const pagemapPages = task.pagemap ? task.pagemap.presentPages + task.pagemap.parentPages : 0
  if (task.pagemap && privateBytes !== pagemapPages * CRIU_PAGE_SIZE) {
    throw new CriuImageError(task.pagemap.file, `${pagemapPages * CRIU_PAGE_SIZE} bytes of pages, but ${privateBytes} fall in the private VMAs of mm-${task.pid}.img`)
  }
  return out
}

/** Whether a VMA is a MAP_SHARED mapping. */
export function isSharedVma(vma: CriuVma): boolean {
  return (vma.flags & MAP_SHARED) !== 0
}

const MAP_PRIVATE = 0x02
const MAP_ANONYMOUS = 0x20
const MAP_LOCKED = 0x2000
const MAP_HUGETLB = 0x40000

/**
 * Whether `criu restore --lazy-pages` leaves this VMA's pages to the lazy-pages daemon: it
 * registers exactly these with the task's userfaultfd (vma_entry_can_be_lazy in criu/include/vma.h:
 * private anonymous memory that is neither locked, hugetlb, nor one the kernel provides).
 */
export function isLazyVma(vma: CriuVma): boolean {
  return (
    (vma.flags & MAP_ANONYMOUS) !== 0 &&
    (vma.flags & MAP_PRIVATE) !== 0 &&
    (vma.flags & (MAP_LOCKED | MAP_HUGETLB)) === 0 &&
    (vma.status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL)) === 0
  )
}

/** Whether a VMA maps a file (its name is then the file's path). */
export function isFileVma(vma: CriuVma): boolean {
  return (vma.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED | VMA_AREA_MEMFD)) !== 0
}

/** Whether a VMA is one the kernel or CRIU names in brackets ([heap], [stack], [vdso], ...). */
export function isSpecialVma(vma: CriuVma): boolean {
  return (vma.status & (VMA_AREA_HEAP | VMA_AREA_VDSO | VMA_AREA_SHSTK | VMA_AREA_AIORING)) !== 0 || (vma.flags & MAP_GROWSDOWN) !== 0
}
