import {Args} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../cli/remote-flags.js'
import {isRemote, parseLocation} from '../remote/location.js'
import {openSnapshot} from '../snapshot/open.js'
import {layersFlag} from '../cli/layers-flag.js'
import {readKeysFromFlags, readSealFlagSpecs} from '../cli/seal-flags.js'
import {type ImageReader} from '../snapshot/layered-reader.js'
import {formatBytes, formatPercent} from '../core/units.js'
import {REGION_PROT_EXEC, REGION_PROT_READ, REGION_PROT_WRITE, RegionKind} from '../format/constants.js'
import {imageStats, type SnapshotStats} from '../snapshot/inspect.js'
import {checkInput} from '../snapshot/input-file.js'
import {readResumeReport, renderResumeReport} from '../resume/main/report-render.js'
import {type ResumeReport} from '../resume/run-stats.js'

/** The memory of one process (region owner) in a process or CRIU snapshot. */
export interface TaskSize {
  pid: number
  regions: number
  /** Sum of its regions' sizes. */
  bytes: number
  /** Bytes of its pages that are not zero pages. */
  nonZeroBytes: number
  /** CRIU: the task's command name and the size of its raw pages image. */
  comm?: string
  rawPageBytes?: number
}

export type StatsResult = SnapshotStats & {
  tasks: TaskSize[]
  /** CRIU: the dump's page images in all, against the snapshot file's size. */
  criu?: {rawPageBytes: number; snapshotBytes: number; ratio: number}
}

interface CriuTaskMetadata {
  pid: number
  comm?: string
  rawPageBytes?: number
}

/** The metadata is untrusted JSON: a task entry without an integer pid is not shown. */
function isCriuTask(value: unknown): value is CriuTaskMetadata {
  return typeof value === 'object' && value !== null && Number.isSafeInteger((value as {pid?: unknown}).pid)
}

/** Per-owner sizes of the process regions (the zero map tells non-zero pages), in first-seen order. */
function taskSizes(reader: ImageReader): TaskSize[] {
  const {header, geometry, zeroMap} = reader
  const byPid = new Map<number, TaskSize>()
  for (const r of header.regions) {
    if (r.kind !== RegionKind.ProcessVma) continue
    let t = byPid.get(r.owner)
    if (!t) byPid.set(r.owner, (t = {pid: r.owner, regions: 0, bytes: 0, nonZeroBytes: 0}))
    const firstPage = geometry.pageOfOffset(r.imageOffset)
    const pages = Math.ceil(r.size / geometry.pageSize)
    t.regions++
    t.bytes += r.size
    t.nonZeroBytes += (pages - zeroMap.countZero(firstPage, pages)) * geometry.pageSize
  }
  const criuTasks = header.metadata.source === 'criu' && Array.isArray(header.metadata.tasks) ? (header.metadata.tasks as unknown[]).filter(isCriuTask) : []
  for (const m of criuTasks) {
    // A task without memory (a zombie) owns no region but is still part of the dump.
    const t = byPid.get(m.pid) ?? {pid: m.pid, regions: 0, bytes: 0, nonZeroBytes: 0}
    byPid.set(m.pid, {...t, comm: typeof m.comm === 'string' ? m.comm : undefined, rawPageBytes: typeof m.rawPageBytes === 'number' ? m.rawPageBytes : undefined})
  }
  return [...byPid.values()]
}

export default class Stats extends BaseCommand {
  static override summary = 'Show what a snapshot holds (sizes, ratio, zero pages, dedup, chunks, codecs, regions), or what a resume did (its --stats-file).'
  static override examples = ['<%= config.bin %> stats vm.uffd', '<%= config.bin %> stats vm.uffd --json']
  static override args = {
    file: Args.string({description: 'Snapshot (a path, http(s):// URL or s3://BUCKET/KEY: only its header and index are fetched), or a statistics file written by `uffd resume --stats-file`.', required: true}),
  }

  static override flags = {layers: layersFlag, ...oclifFlags(remoteFlagSpecs), ...oclifFlags(readSealFlagSpecs)}

  async run(): Promise<StatsResult | ResumeReport> {
    const {args, flags} = await this.parse(Stats)
    const remote = isRemote(parseLocation(args.file))
    if (!remote) {
      // readResumeReport opens the file itself, and would block on a FIFO.
      checkInput(args.file, {blockDevice: true})
      const report = readResumeReport(args.file)
      if (report) {
        if (!this.jsonEnabled()) for (const line of renderResumeReport(args.file, report)) this.log(line)
        return report
      }
    }
    // Without its key an encrypted snapshot shows what is not secret (its structures, unauthenticated).
    const snapshot = await openSnapshot(args.file, remoteOptions(flags), flags.layers, readKeysFromFlags(flags), true)
    const {reader} = snapshot
    try {
      const stats: StatsResult = {...imageStats(reader, args.file), tasks: taskSizes(reader)}
      const raw = stats.metadata.rawPageBytes
      if (stats.metadata.source === 'criu' && typeof raw === 'number') {
        stats.criu = {rawPageBytes: raw, snapshotBytes: stats.fileSize, ratio: stats.fileSize === 0 ? 0 : raw / stats.fileSize}
      }
      if (!this.jsonEnabled()) this.render(stats)
      return stats
    } finally {
      await snapshot.close()
    }
  }

  private render(s: StatsResult): void {
    const row = (label: string, value: string): void => this.log(`${label.padEnd(14)}${value}`)
    // Untrusted JSON: only strings and numbers are shown, so an object never prints as [object Object].
    const m = Object.fromEntries(Object.entries(s.metadata).map(([k, v]) => [k, typeof v === 'string' || typeof v === 'number' ? String(v) : undefined]))
    row('snapshot', `${s.file} (format ${s.format})`)
    const origin =
      m.source === 'process'
        ? `process ${m.pid ?? '?'}${m.command ? ` (${m.command})` : ''}`
        : m.source === 'criu'
          ? `CRIU dump ${m.criuDir ?? '?'}`
          : `${m.source ?? 'unknown'}${m.sourcePath ? ` ${m.sourcePath}` : ''}`
    row('source', `${origin}, created ${m.createdAt ?? '?'} by uffd ${m.toolVersion ?? '?'}`)
    row('logical size', `${formatBytes(s.logicalSize)} (${s.logicalSize} bytes, ${s.pageCount} pages of ${formatBytes(s.pageSize)})`)
    row('stored size', `${formatBytes(s.fileSize)} (${s.fileSize} bytes), ratio ${s.ratio.toFixed(2)}x`)
    row('zero pages', `${s.zeroPages} (${formatPercent(s.zeroPages, s.pageCount)}, ${formatBytes(s.zeroBytes)}), never stored`)
    if (s.layer) row('layer', `${s.layer.pages} changed pages stored in ${s.layer.blocks} blocks, over ${s.layer.depth} file(s)`)
    else row('chunks', `${s.chunkCount} of ${formatBytes(s.chunkSize)}${s.frameSize && s.codecs.zstd ? ` (zstd in frames of ${formatBytes(s.frameSize)})` : ''}: ${s.allZeroChunks} all-zero, ${s.dedupChunks} deduplicated (saving ${formatBytes(s.dedupSavedBytes)})`)
    if (s.chain) {
      row('chain', '          size   stored units   provides    digests  file')
      for (const f of s.chain) row('', `${f.role.padEnd(8)} ${formatBytes(f.fileSize).padStart(9)} ${String(f.unitsStored).padStart(14)} ${formatPercent(f.pagesProvided, s.pageCount).padStart(10)} ${(f.pageDigestBytes > 0 ? formatBytes(f.pageDigestBytes) : '-').padStart(10)}  ${f.file}`)
    }
    row('codec', `${s.layer ? 'blocks' : 'chunks'}      payload      stored   ratio`)
    for (const [name, u] of Object.entries(s.codecs)) {
      const ratio = u.storedBytes > 0 ? `${(u.payloadBytes / u.storedBytes).toFixed(2)}x` : '-'
      row('', `${name.padEnd(6)}${String(u.chunks).padStart(7)} ${formatBytes(u.payloadBytes).padStart(12)} ${formatBytes(u.storedBytes).padStart(11)} ${ratio.padStart(7)}`)
    }
    if (s.storedSizeHistogram.length > 0) {
      row('stored chunk sizes', '')
      for (const h of s.storedSizeHistogram) row('', `<= ${formatBytes(h.upTo).padEnd(9)} ${h.chunks}`)
    }
    const ws = s.workingSet
    if (ws) {
      const packed = ws.packed ? `; packed copy: ${ws.packed.pages} pages in ${ws.packed.blocks} blocks, ${formatBytes(ws.packed.payloadBytes)} -> ${formatBytes(ws.packed.storedBytes)} (${Object.entries(ws.packed.codecs).map(([c, n]) => `${n} ${c}`).join(', ')})` : ''
      row('working set', `${ws.pages} pages from ${ws.runs} run(s), ${ws.chunksFirst} chunks stored first${packed}`)
      if (ws.learned) row('learned', `the majority of the last ${ws.learned.runs} of at most ${ws.learned.keep} runs of \`uffd resume --learn\` (${formatBytes(ws.learned.storedBytes)} stored)`)
    }
    const d = s.pageDigests
    if (d) row('page digests', 'problem' in d ? `table not located: ${d.problem}` : `${d.rows} rows (a 16-byte digest per page this file stores), ${formatBytes(d.bytes)}${s.chain ? '' : ': a layer on it compares pages by digest, without decoding it'}`)
    if (s.criu) row('CRIU pages', `${formatBytes(s.criu.rawPageBytes)} in the dump's page images, ${s.criu.ratio.toFixed(2)}x the snapshot's ${formatBytes(s.criu.snapshotBytes)}`)
    if (s.tasks.length > 0) {
      row('tasks', `   pid      mapped    non-zero${s.criu ? '  raw pages' : ''}  regions`)
      for (const t of s.tasks) {
        const raw = s.criu ? formatBytes(t.rawPageBytes ?? 0).padStart(11) : ''
        row('', `${String(t.pid).padStart(6)} ${formatBytes(t.bytes).padStart(11)} ${formatBytes(t.nonZeroBytes).padStart(11)}${raw} ${String(t.regions).padStart(8)}${t.comm ? `  ${t.comm}` : ''}`)
      }
    }
    if (s.seal) {
      const {encryption: e, signature: g} = s.seal
      const parts = [
        ...(e ? [`encrypted (${e.cipher}${e.convergent ? ', convergent' : ''}, key ${e.keyId}${e.opened ? '' : '; not opened: no key given'})`] : []),
        ...(g ? [`signed by ${g.signer} (${g.verified ? 'signature verified' : 'not checked: give --verify-key'})`] : []),
      ]
      row('sealed', `${parts.join(', ')}${s.seal.authenticated ? '' : '; what is shown is not authenticated'}`)
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
