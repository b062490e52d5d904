import {UffdError} from '../../core/errors.js'
import {type Geometry} from '../../format/geometry.js'

/**
 * One guest memory region as the VMM announces it in the Firecracker Uffd handshake: where it is
 * mapped in the VMM (`baseHostVirtAddr`), its length, and where its bytes live in the memory
 * file (`offset`, a running sum of sizes, even across the x86 MMIO gap).
 */
export interface GuestRegion {
  baseHostVirtAddr: number
  size: number
  offset: number
  pageSize: number
}

export class HandshakeError extends UffdError {
  declare readonly code: 'BAD_HANDSHAKE'
  constructor(message: string) {
    super('BAD_HANDSHAKE', `invalid handshake: ${message}`)
    this.name = 'HandshakeError'
  }
}

/**
 * A well-formed handshake that does not fit the snapshot (its page size, its size): the peer is a
 * VMM set up for other memory, waiting on a uffd nobody will serve.
 */
export class SnapshotMismatchError extends HandshakeError {}

/** Longest handshake accepted: a JSON array of a handful of regions is a few hundred bytes. */
export const MAX_HANDSHAKE_BYTES = 64 * 1024
const MAX_REGIONS = 1024

function field(entry: Record<string, unknown>, name: string, index: number, required: boolean): number | undefined {
  const value = entry[name]
  if (value === undefined || value === null) {
    if (required) throw new HandshakeError(`region ${index} has no "${name}"`)
    return undefined
  }
  // Numbers above 2^53 lose precision in JSON.parse; no valid user-space address or size is
  // that large, so refuse rather than round.
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new HandshakeError(`region ${index} "${name}" is ${JSON.stringify(value)}, not a non-negative integer below 2^53`)
  }
  return value
}

/** How far scanJson got through a message: bracket depth and string state, and whether the value is closed. */
export interface JsonScan {
  readonly depth: number
  readonly inString: boolean
  readonly escaped: boolean
  readonly complete: boolean
}

export const JSON_SCAN_START: JsonScan = {depth: 0, inString: false, escaped: false, complete: false}

/**
 * Scans the next `bytes` of a message: complete once they close a whole JSON value, or show
 * something that will never become one (it does not start as an array or object). On a stream
 * socket one recvmsg can return part of a message (the kernel queues a large send as several
 * buffers, and ends a read after the one that carried fds), so the handshake is read until the
 * value is closed; resuming from `scan` looks at each byte once, however the message is cut.
 * Only brackets outside strings count; whether the value is valid JSON is parseHandshake's to say.
 */
export function scanJson(scan: JsonScan, bytes: Buffer): JsonScan {
  if (scan.complete) return scan
  let {depth, inString, escaped} = scan
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i]
    if (inString) {
      if (escaped) escaped = false
      else if (c === 0x5c) escaped = true
      else if (c === 0x22) inString = false
      continue
    }
    if (depth === 0 && (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d)) continue
    if (depth === 0 && c !== 0x5b && c !== 0x7b) return {depth, inString, escaped, complete: true}
    if (c === 0x22) inString = true
    else if (c === 0x5b || c === 0x7b) depth++
    else if (c === 0x5d || c === 0x7d) {
      if (--depth === 0) return {depth, inString, escaped, complete: true}
    }
  }
  return {depth, inString, escaped, complete: false}
}

/**
 * Parses the JSON the VMM sends with the uffd. Accepts every shape Firecracker has used:
 * v1.1-v1.6 without a page size (4 KiB then), v1.7+ `page_size_kib` (which holds bytes despite
 * its name), v1.12+ `page_size`, and unknown extra fields (forks add `gpa_start`,
 * `is_guest_memfd`, ...), which are ignored.
 */
export function parseHandshake(payload: Buffer | string): GuestRegion[] {
  const text = typeof payload === 'string' ? payload : payload.toString('utf8')
  if (text.length > MAX_HANDSHAKE_BYTES) throw new HandshakeError(`message of ${text.length} bytes is too long`)
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (error) {
    throw new HandshakeError(`not JSON (${(error as Error).message}): ${JSON.stringify(text.slice(0, 80))}`)
  }
  if (!Array.isArray(parsed)) throw new HandshakeError('expected a JSON array of memory regions')
  if (parsed.length === 0) throw new HandshakeError('no memory regions')
  if (parsed.length > MAX_REGIONS) throw new HandshakeError(`${parsed.length} regions is more than ${MAX_REGIONS}`)
  return parsed.map((entry: unknown, i) => {
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw new HandshakeError(`region ${i} is not an object`)
    const e = entry as Record<string, unknown>
    const pageSize = field(e, 'page_size', i, false) ?? field(e, 'page_size_kib', i, false) ?? 4096
    return {
      baseHostVirtAddr: field(e, 'base_host_virt_addr', i, true)!,
      size: field(e, 'size', i, true)!,
      offset: field(e, 'offset', i, true)!,
      pageSize,
    }
  })
}

/**
 * Checks the regions against each other and against the snapshot: one page size, the
 * snapshot's; every address, size and offset page-aligned; no two regions overlapping in the
 * VMM's address space or in the file; every region inside the snapshot's image. Returns the
 * regions sorted by address.
 */
export function validateRegions(regions: readonly GuestRegion[], geometry: Geometry): GuestRegion[] {
  const pageSize = regions[0].pageSize
  for (const [i, r] of regions.entries()) {
    if (r.pageSize !== 4096 && r.pageSize !== 2 * 1024 * 1024) throw new HandshakeError(`region ${i} has page size ${r.pageSize}, expected 4096 or 2097152`)
    if (r.pageSize !== pageSize) throw new HandshakeError(`regions use different page sizes (${pageSize} and ${r.pageSize})`)
    if (r.size === 0) throw new HandshakeError(`region ${i} is empty`)
    for (const [name, value] of [['base_host_virt_addr', r.baseHostVirtAddr], ['size', r.size], ['offset', r.offset]] as const) {
      if (value % pageSize !== 0) throw new HandshakeError(`region ${i} ${name} ${value} is not a multiple of the page size ${pageSize}`)
    }
  }
  if (pageSize !== geometry.pageSize) {
    throw new SnapshotMismatchError(`the VMM uses ${pageSize}-byte pages but the snapshot was taken with ${geometry.pageSize}-byte pages`)
  }
  const byAddress = [...regions].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr)
  for (let i = 1; i < byAddress.length; i++) {
    if (byAddress[i].baseHostVirtAddr < byAddress[i - 1].baseHostVirtAddr + byAddress[i - 1].size) throw new HandshakeError('two regions overlap in the VMM address space')
  }
  const byOffset = [...regions].sort((a, b) => a.offset - b.offset)
  for (let i = 1; i < byOffset.length; i++) {
    if (byOffset[i].offset < byOffset[i - 1].offset + byOffset[i - 1].size) throw new HandshakeError('two regions overlap in the memory file')
  }
  const last = byOffset[byOffset.length - 1]
  if (last.offset + last.size > geometry.paddedSize) {
    throw new SnapshotMismatchError(`regions need ${last.offset + last.size} bytes of memory but the snapshot holds ${geometry.logicalSize}`)
  }
  return byAddress
}
