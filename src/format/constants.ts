/** Layout constants of the snapshot file; docs/FORMAT.md is the specification. */

export const HEADER_MAGIC = 'UFFDSNAP'
export const FOOTER_MAGIC = 'UFFDFOOT'
export const FORMAT_MAJOR = 1
export const FORMAT_MINOR = 0

export const FIXED_HEADER_SIZE = 64
export const REGION_ENTRY_SIZE = 64
export const HEADER_TRAILER_SIZE = 8 // header CRC + reserved
export const INDEX_ENTRY_SIZE = 32
export const FOOTER_SIZE = 64
export const PACKED_BLOCK_ENTRY_SIZE = 32
export const LAYER_RUN_ENTRY_SIZE = 16
/** A layer run's source meaning "zero pages" (not any file of the chain). */
export const SOURCE_ZERO = 0xffffffff

/** A header larger than this is treated as corrupt rather than allocated. */
export const MAX_HEADER_SIZE = 64 * 1024 * 1024
export const MAX_REGION_COUNT = 1 << 20

export const PAGE_SIZE_4K = 4096
export const PAGE_SIZE_2M = 2 * 1024 * 1024
export const VALID_PAGE_SIZES: readonly number[] = [PAGE_SIZE_4K, PAGE_SIZE_2M]
export const MIN_CHUNK_SIZE = 4096
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024

/**
 * Feature bits. A reader refuses a file with incompatible bits it does not know and ignores
 * unknown compatible bits.
 */
/**
 * The file is a layer: it stores only the pages that differ from its parent's, has no chunk index
 * (chunk_count 0), and metadata.layer locates a run table saying which file of the chain holds
 * each page. A reader that ignored the bit would read most of the image as missing.
 */
export const INCOMPAT_LAYERED = 1n << 0n
/**
 * Every stored unit is encrypted (metadata.seal.encryption; docs/FORMAT.md, Sealed snapshots) and a
 * seal record precedes the footer. A reader that ignored the bit would decode ciphertext.
 */
export const INCOMPAT_ENCRYPTED = 1n << 1n
/**
 * Every stored unit's CRC is bound to its place (docs/FORMAT.md, Bound units; src/format/bind.ts):
 * seeded with a record of the unit's kind, number, first page, codec and payload length. A reader
 * that ignored the bit would find every CRC wrong.
 */
export const INCOMPAT_BOUND = 1n << 2n
/**
 * zstd chunks may be framed (docs/FORMAT.md, Framed chunks; src/format/frames.ts): one
 * independent zstd frame per group of metadata.framePages image pages, so a fault decodes only
 * its group. A reader that ignored the bit would find a framed chunk's first frame declaring less
 * than its payload, and refuse it as corrupt at fault time.
 */
export const INCOMPAT_FRAMED = 1n << 3n
export const KNOWN_INCOMPAT_FEATURES = INCOMPAT_LAYERED | INCOMPAT_ENCRYPTED | INCOMPAT_BOUND | INCOMPAT_FRAMED
/**
 * The snapshot carries a working set (metadata.workingSet) and stores those chunks first, so a
 * handler can read them with one sequential read. Readers that ignore it lose nothing.
 */
export const COMPAT_WORKING_SET = 1n << 0n
/**
 * The working set's pages are also stored packed, in blocks of their own in first-touch order
 * (metadata.workingSet.packed locates the block table), so prefetching a set that is scattered
 * over the image decodes only its pages. The chunks still hold every page: readers that ignore
 * the bit lose nothing.
 */
export const COMPAT_PACKED_WORKING_SET = 1n << 1n
/**
 * The file is signed (metadata.seal.signature): a unit digest table and a seal record precede the
 * footer. A reader that ignores the bit reads the file correctly, unauthenticated.
 */
export const COMPAT_SIGNED = 1n << 2n
/**
 * The file carries a page digest table (metadata.pageDigests; docs/FORMAT.md, Page digests): a
 * keyed 128-bit digest of each non-zero page it stores, so a layer written over it compares
 * digests instead of decoding it. Readers that ignore the bit lose nothing.
 */
export const COMPAT_PAGE_DIGESTS = 1n << 3n
export const KNOWN_COMPAT_FEATURES = COMPAT_WORKING_SET | COMPAT_PACKED_WORKING_SET | COMPAT_SIGNED | COMPAT_PAGE_DIGESTS

export enum Codec {
  /** All-zero chunk: nothing stored. */
  None = 0,
  Raw = 1,
  Lz4 = 2,
  Zstd = 3,
}

export const CODEC_NAMES: Record<Codec, string> = {
  [Codec.None]: 'none',
  [Codec.Raw]: 'raw',
  [Codec.Lz4]: 'lz4',
  [Codec.Zstd]: 'zstd',
}

export const CHUNK_FLAG_SHARED = 1

export enum RegionKind {
  GuestMemory = 0,
  ProcessVma = 1,
}

export const REGION_PROT_READ = 1
export const REGION_PROT_WRITE = 2
export const REGION_PROT_EXEC = 4
export const REGION_FLAG_SHARED = 1
export const REGION_FLAG_FILE = 2
export const REGION_FLAG_SPECIAL = 4

/**
 * Worst case of a compressed chunk's size: both zstd (compressBound: n + n/256 + small) and the
 * lz4 block format with its 4-byte size prefix (n + n/255 + 16 + 4) stay below this.
 */
export function maxStoredLength(payloadLength: number): number {
  return payloadLength + Math.ceil(payloadLength / 128) + 1024
}

/** The most runs --learn-runs accepts (each run costs its pages in the file). */
export const MAX_LEARN_RUNS = 31
