import protobuf from 'protobufjs'

/**
 * The parts of CRIU's image messages (criu/images/*.proto, proto2) that a snapshot needs. Field
 * numbers and types follow CRIU's definitions; fields this tool does not use are left out, which
 * protobuf decoding tolerates (unknown fields are skipped), so images with more fields still parse.
 * Fields CRIU declares `required` are required here too, so a truncated or foreign message fails
 * to decode instead of yielding defaults.
 */
const CRIU_PROTO = `
syntax = "proto2";

// pstree.proto: one entry per task of the dumped tree (pids as seen in the dump's pid namespace).
message pstree_entry {
  required uint32 pid = 1;
  required uint32 ppid = 2;
  required uint32 pgid = 3;
  required uint32 sid = 4;
  repeated uint32 threads = 5;
}

// core.proto: the task's architecture (enum march, a varint on the wire), state and command name.
message task_core_entry {
  required uint32 task_state = 1;
  required string comm = 6;
}
message core_entry {
  required uint32 mtype = 1;
  optional task_core_entry tc = 3;
}

// vma.proto / mm.proto: a task's address space.
message vma_entry {
  required uint64 start = 1;
  required uint64 end = 2;
  required uint64 pgoff = 3;
  required uint64 shmid = 4;
  required uint32 prot = 5;
  required uint32 flags = 6;
  required uint32 status = 7;
}
message mm_entry {
  repeated vma_entry vmas = 14;
}

// pagemap.proto: which pages were dumped, and where their data is.
message pagemap_head {
  required uint32 pages_id = 1;
}
message pagemap_entry {
  required uint64 vaddr = 1;
  required uint32 compat_nr_pages = 2;
  optional bool in_parent = 3;
  optional uint32 flags = 4;
  optional uint64 nr_pages = 5;
}

// fdinfo.proto / regfile.proto / memfd.proto: what file-backed VMAs map. A memfd's contents are
// dumped like shared memory, under the shmid its inode entry names.
message reg_file_entry {
  required uint32 id = 1;
  required string name = 6;
}
message memfd_file_entry {
  required uint32 id = 1;
  required uint32 inode_id = 5;
}
message file_entry {
  required uint32 type = 1;
  required uint32 id = 2;
  optional reg_file_entry reg = 3;
  optional memfd_file_entry memfd = 20;
}
message memfd_inode_entry {
  required string name = 1;
  required uint32 shmid = 5;
  required uint64 inode_id = 7;
}
`

/** The parsed schema (field names as in CRIU's .proto files); tests encode images with it. */
export const CRIU_SCHEMA = protobuf.parse(CRIU_PROTO, {keepCase: true}).root

/** A 64-bit field as protobufjs decodes it: a Long when the 'long' package is present, else a number. */
export type U64 = protobuf.Long | number

export interface PstreeEntry {
  pid: number
  ppid: number
  pgid: number
  sid: number
  threads: number[]
}
export interface CoreEntry {
  mtype: number
  tc?: {task_state: number; comm: string}
}
export interface VmaEntry {
  start: U64
  end: U64
  pgoff: U64
  shmid: U64
  prot: number
  flags: number
  status: number
}
export interface MmEntry {
  vmas: VmaEntry[]
}
export interface PagemapHead {
  pages_id: number
}
export interface PagemapEntryMessage {
  vaddr: U64
  compat_nr_pages: number
  in_parent?: boolean
  flags?: number
  nr_pages?: U64
}
export interface FileEntry {
  type: number
  id: number
  reg?: {id: number; name: string}
  memfd?: {id: number; inode_id: number}
}
export interface MemfdInodeEntry {
  name: string
  shmid: number
  inode_id: U64
}

/** Decodes one message of a CRIU image into the shape its interface describes. */
export interface Decoder<T> {
  readonly name: string
  decode(payload: Uint8Array): T
}

function decoder<T>(name: string): Decoder<T> {
  const type = CRIU_SCHEMA.lookupType(name)
  return {name, decode: (payload) => type.decode(payload) as unknown as T}
}

export const PSTREE_ENTRY = decoder<PstreeEntry>('pstree_entry')
export const CORE_ENTRY = decoder<CoreEntry>('core_entry')
export const MM_ENTRY = decoder<MmEntry>('mm_entry')
export const PAGEMAP_HEAD = decoder<PagemapHead>('pagemap_head')
export const PAGEMAP_ENTRY = decoder<PagemapEntryMessage>('pagemap_entry')
export const FILE_ENTRY = decoder<FileEntry>('file_entry')
export const MEMFD_INODE_ENTRY = decoder<MemfdInodeEntry>('memfd_inode_entry')

/** Whether an optional proto2 field was present on the wire (protobufjs sets own properties only then). */
export function has(message: object, field: string): boolean {
  return Object.prototype.hasOwnProperty.call(message, field)
}
