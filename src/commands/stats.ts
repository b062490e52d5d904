import {Args} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {formatBytes, formatPercent} from '../core/units.js'
import {REGION_PROT_EXEC, REGION_PROT_READ, REGION_PROT_WRITE} from '../format/constants.js'
import {type SnapshotStats, snapshotStats} from '../snapshot/inspect.js'
import {SnapshotReader} from '../snapshot/reader.js'

export default class Stats extends BaseCommand {
  static override summary = 'Show what a snapshot holds: sizes, ratio, zero pages, deduplication, chunks, codecs, regions.'
  static override examples = ['<%= config.bin %> stats vm.uffd', '<%= config.bin %> stats vm.uffd --json']
  static override args = {
    file: Args.string({description: 'Snapshot file.', required: true}),
  }

  async run(): Promise<SnapshotStats> {
    const {args} = await this.parse(Stats)
    const reader = SnapshotReader.open(args.file)
    try {
      const stats = snapshotStats(reader, args.file)
      if (!this.jsonEnabled()) this.render(stats)
      return stats
    } finally {
      reader.close()
    }
  }

  private render(s: SnapshotStats): void {
    const row = (label: string, value: string): void => this.log(`${label.padEnd(14)}${value}`)
    const m = s.metadata
    row('snapshot', `${s.file} (format ${s.format})`)
    const origin = m.source === 'process' ? `process ${m.pid}${m.command ? ` (${m.command})` : ''}` : `${m.source ?? 'unknown'}${m.sourcePath ? ` ${m.sourcePath}` : ''}`
    row('source', `${origin}, created ${m.createdAt ?? '?'} by uffd ${m.toolVersion ?? '?'}`)
    row('logical size', `${formatBytes(s.logicalSize)} (${s.logicalSize} bytes, ${s.pageCount} pages of ${formatBytes(s.pageSize)})`)
    row('stored size', `${formatBytes(s.fileSize)} (${s.fileSize} bytes), ratio ${s.ratio.toFixed(2)}x`)
    row('zero pages', `${s.zeroPages} (${formatPercent(s.zeroPages, s.pageCount)}, ${formatBytes(s.zeroBytes)}), never stored`)
    row('chunks', `${s.chunkCount} of ${formatBytes(s.chunkSize)}: ${s.allZeroChunks} all-zero, ${s.dedupChunks} deduplicated (saving ${formatBytes(s.dedupSavedBytes)})`)
    row('codec', 'chunks      payload      stored   ratio')
    for (const [name, u] of Object.entries(s.codecs)) {
      const ratio = u.storedBytes > 0 ? `${(u.payloadBytes / u.storedBytes).toFixed(2)}x` : '-'
      row('', `${name.padEnd(6)}${String(u.chunks).padStart(7)} ${formatBytes(u.payloadBytes).padStart(12)} ${formatBytes(u.storedBytes).padStart(11)} ${ratio.padStart(7)}`)
    }
    if (s.storedSizeHistogram.length > 0) {
      row('stored chunk sizes', '')
      for (const h of s.storedSizeHistogram) row('', `<= ${formatBytes(h.upTo).padEnd(9)} ${h.chunks}`)
    }
    row('regions', String(s.regions.length))
    const shown = s.regions.slice(0, 40)
    for (const r of shown) {
      const prot = `${r.prot & REGION_PROT_READ ? 'r' : '-'}${r.prot & REGION_PROT_WRITE ? 'w' : '-'}${r.prot & REGION_PROT_EXEC ? 'x' : '-'}`
      const where = r.kind === 'vma' ? `0x${r.address.toString(16)} ${prot}` : `image offset ${r.imageOffset}`
      row('', `${where}  ${formatBytes(r.size).padStart(10)}  ${r.name}`)
    }
    if (s.regions.length > shown.length) row('', `... ${s.regions.length - shown.length} more (see --json)`)
  }
}
