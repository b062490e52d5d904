import fs from 'node:fs'

import {type RunStats} from '../run-stats.js'
import {type ClientSummary} from './serving-session.js'
import {parseSmaps, referencedPages} from './smaps.js'

/** How often a client's accessed bits are read for prefetch hits (~9 ms per GiB mapped). */
const HIT_SAMPLE_MS = 500

/**
 * Prefetch hits as of the last sample: pages installed on demand are referenced by definition
 * (UFFDIO_COPY installs them accessed, and nothing clears them), prefetched ones only once touched
 * (the prefetcher clears their bits). So hits = referenced pages - demand-copied pages, summed over
 * clients, each client's count from its last sample while it lived.
 */
export class PrefetchHitSampler {
  /** Each client's last count of referenced pages in its memory. */
  private readonly referenced = new Map<number, number>()
  private readonly startedAt = performance.now()
  private timer: NodeJS.Timeout | undefined

  constructor(
    private readonly stats: RunStats,
    private readonly clients: ReadonlyMap<number, ClientSummary>,
  ) {}

  start(): void {
    this.timer = setInterval(() => this.sample(), HIT_SAMPLE_MS)
  }

  /** Takes a last sample while interrupted clients still live (an ended client keeps its last one). */
  stop(): void {
    clearInterval(this.timer)
    this.sample()
  }

  private sample(): void {
    const {stats} = this
    if (!stats.get('hitsTracked')) return
    for (const c of this.clients.values()) {
      if (c.ended !== 'running' || !c.pid) continue
      let text: string
      try {
        text = fs.readFileSync(`/proc/${c.pid}/smaps`, 'utf8')
      } catch {
        continue // exited meanwhile: its last sample stands
      }
      // smaps counts kB; a client's regions all share one page size (validateRegions).
      const ranges = c.regions.map((r) => ({start: r.baseHostVirtAddr, end: r.baseHostVirtAddr + r.size}))
      this.referenced.set(c.id, referencedPages(parseSmaps(text), ranges, c.regions[0].pageSize))
    }
    const prefetched = stats.get('prefetchCopiedPages')
    const demand = stats.get('pagesCopied') - prefetched
    const total = [...this.referenced.values()].reduce((a, b) => a + b, 0)
    const hits = Math.max(0, Math.min(prefetched, total - demand))
    stats.set('prefetchHits', hits)
    stats.set('prefetchWasted', prefetched - hits)
    stats.set('hitsSampledMs', performance.now() - this.startedAt)
  }
}
