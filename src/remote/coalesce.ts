/** Extents sorted by offset: extent i covers [offsets[i], offsets[i] + lengths[i]) of the object. */
export interface ExtentTable {
  offsets: Float64Array
  lengths: Int32Array
  crcs: Uint32Array
  /**
   * What each extent's CRC starts from: in a file whose units are bound to their places, the seed
   * of a unit stored there (crcs[i] is that unit's stored CRC); else 0.
   */
  seeds: Uint32Array
}

/**
 * The run of extents one ranged request fetches with extent `head`: its neighbours that are
 * `wanted` too and lie back to back with it in the object, up to `maxBytes` in all (the head
 * alone may be larger). Forward first: faults and prefetch walk memory upwards. `wanted` is asked
 * last, only of a neighbour that fits, so it may take the extent (a claim). Returns [first, end).
 */
export function planRun(table: ExtentTable, head: number, wanted: (extent: number) => boolean, maxBytes: number): [number, number] {
  const {offsets, lengths} = table
  let bytes = lengths[head]
  let end = head + 1
  while (end < offsets.length && offsets[end] === offsets[end - 1] + lengths[end - 1] && bytes + lengths[end] <= maxBytes && wanted(end)) {
    bytes += lengths[end]
    end++
  }
  let first = head
  while (first > 0 && offsets[first - 1] + lengths[first - 1] === offsets[first] && bytes + lengths[first - 1] <= maxBytes && wanted(first - 1)) {
    first--
    bytes += lengths[first]
  }
  return [first, end]
}

/** The extent of exactly [offset, offset + length) (binary search; the table is sorted by offset, then length), or -1. */
export function extentAt(table: ExtentTable, offset: number, length: number): number {
  let lo = 0
  let hi = table.offsets.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1
    const at = table.offsets[mid]
    const cmp = at !== offset ? at - offset : table.lengths[mid] - length
    if (cmp === 0) return mid
    if (cmp < 0) lo = mid + 1
    else hi = mid - 1
  }
  return -1
}

/** Delay before retry `attempt` (0-based): 10 ms doubling to 2 s, with jitter so handlers that failed together do not retry together. */
export function backoffMs(attempt: number, random: number): number {
  const base = Math.min(2000, 10 * 2 ** attempt)
  return base / 2 + (base / 2) * random
}
