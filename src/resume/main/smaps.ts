/**
 * Reading /proc/PID/smaps for prefetch hits: the kernel reports, per mapping, how much of it has
 * its accessed bit set ("Referenced"). Pages uffd installs by UFFDIO_COPY start accessed; the
 * prefetcher clears the bit on the pages it installed ahead of need (process_madvise MADV_COLD),
 * so later the count includes a prefetched page only if the client touched it. Pure: no I/O.
 */
export interface SmapsMapping {
  start: number
  end: number
  referencedKb: number
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) /

export function parseSmaps(text: string): SmapsMapping[] {
  const mappings: SmapsMapping[] = []
  let current: SmapsMapping | undefined
  for (const line of text.split('\n')) {
    const header = HEADER.exec(line)
    if (header) {
      current = {start: Number.parseInt(header[1], 16), end: Number.parseInt(header[2], 16), referencedKb: 0}
      mappings.push(current)
    } else if (current && line.startsWith('Referenced:')) {
      current.referencedKb = Number.parseInt(line.slice('Referenced:'.length), 10) || 0
    }
  }
  return mappings
}

/**
 * Referenced pages of the mappings that overlap `ranges` (a client's memory regions, by host
 * address). A mapping counts whole: guest memory regions are whole mappings in a VMM.
 */
export function referencedPages(mappings: readonly SmapsMapping[], ranges: readonly {start: number; end: number}[], pageSize: number): number {
  let kb = 0
  for (const m of mappings) if (ranges.some((r) => m.start < r.end && r.start < m.end)) kb += m.referencedKb
  return Math.floor((kb * 1024) / pageSize)
}
