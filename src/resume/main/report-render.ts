import fs from 'node:fs'

import {UffdError} from '../../core/errors.js'
import {formatBytes, formatPercent} from '../../core/units.js'
import {ResumeReportSchema, schemaProblem} from '../../format/schemas.js'
import {onFile} from '../../sys/errors.js'
import {type ResumeReport} from '../run-stats.js'

/**
 * The report in `file` if it is a statistics file written by `uffd resume --stats-file` (JSON
 * with kind "uffd-resume-stats"), else undefined: snapshots start with a binary magic.
 */
export function readResumeReport(file: string): ResumeReport | undefined {
  const fd = onFile(file, 'opening', () => fs.openSync(file, 'r'))
  let text: string
  try {
    // A directory or device is no report; the snapshot reader says what is wrong with it.
    if (!fs.fstatSync(fd).isFile()) return undefined
    const first = Buffer.alloc(1)
    if (onFile(file, 'reading', () => fs.readSync(fd, first, 0, 1, 0)) !== 1 || first[0] !== 0x7b /* { */) return undefined
    text = onFile(file, 'reading', () => fs.readFileSync(fd, 'utf8'))
  } finally {
    fs.closeSync(fd)
  }
  let parsed: Partial<ResumeReport> | null
  try {
    parsed = JSON.parse(text) as Partial<ResumeReport> | null
  } catch {
    return undefined
  }
  if (parsed?.kind !== 'uffd-resume-stats') return undefined
  // It claims to be a report: a field of the wrong type is an error naming it, not a TypeError later.
  const problem = schemaProblem(ResumeReportSchema, parsed, file)
  if (problem) throw new UffdError('INVALID', problem)
  return parsed as ResumeReport
}

/** Human-readable lines for a resume report, the `uffd stats run.json` view. */
export function renderResumeReport(file: string, r: ResumeReport): string[] {
  const us = (v: number | null): string => (v === null ? '-' : `${v < 10 ? v.toFixed(1) : Math.round(v)} µs`)
  const ms = (v: number | null): string => (v === null ? '-' : `${v.toFixed(1)} ms`)
  const rows: [string, string][] = [
    ['run', `${file}: uffd resume of ${r.snapshot}${r.also?.length ? ` (and ${r.also.join(', ')})` : ''}, started ${r.startedAt}, ${(r.durationMs / 1000).toFixed(2)} s`],
    ['clients', `${r.clients.served} served, ${r.clients.ended} ended`],
    ['faults', `${r.faults.total}: ${r.faults.data} data, ${r.faults.zero} zero, ${r.faults.removed} removed (served zeros), ${r.faults.alreadyPresent} already present`],
    ['latency', `${r.latencyUs.min === undefined ? '' : `min ${us(r.latencyUs.min)}, `}p50 ${us(r.latencyUs.p50)}, p90 ${us(r.latencyUs.p90)}, p99 ${us(r.latencyUs.p99)}, max ${us(r.latencyUs.max)}, mean ${us(r.latencyUs.mean)}`],
    ['first/last', `first fault ${ms(r.timeToFirstFaultMs)}, last fault ${ms(r.timeToLastFaultMs)} after the start`],
    ['pages', `${r.pages.copied} copied (${formatBytes(r.bytes.copied)}), ${r.pages.zeroed} zeroed; ${r.pages.faultAround} by fault-around, ${r.pages.prefetched ?? 0} by prefetch${r.pages.byHelper ? ` (${r.pages.byHelper} of them by a helper thread)` : ''}${r.pages.toKernel ? `; ${r.pages.toKernel} zero pages left to the kernel` : ''}`],
    ['complete', `${r.timeToWorkingSetMs ? `working set (${r.workingSetChunks} units) in ${ms(r.timeToWorkingSetMs)} after the start; ` : ''}${r.timeToMemoryCompleteMs ? `all memory present ${ms(r.timeToMemoryCompleteMs)} after the start` : 'memory not completely present'}`],
    // Reports written before staging existed have no `staged` field.
    ...(r.staged ? ([['staged', `working set decoded before the first client: ${r.staged.units} units, ${formatBytes(r.staged.bytes)}, ready ${ms(r.staged.ms)} after start-up`]] as [string, string][]) : []),
    ...(r.prefetchHits
      ? ([['prefetch', `${r.prefetchHits.copiedPages} data pages installed ahead of need: ${r.prefetchHits.hits} touched since (hits), ${r.prefetchHits.wasted} not (wasted), as of ${ms(r.prefetchHits.sampledAtMs)}`]] as [string, string][])
      : []),
    ['ioctls', `${r.ioctls.copy} UFFDIO_COPY, ${r.ioctls.zeropage} UFFDIO_ZEROPAGE, ${r.ioctls.eexist} EEXIST, ${r.ioctls.eagain} EAGAIN`],
    [
      'chunks',
      `${r.chunks.decoded} decoded${r.chunks.framesDecoded ? ` whole and ${r.chunks.framesDecoded} frames on their own` : ''} (${formatBytes(r.bytes.decompressed)}${r.chunks.storedUnitsDecoded && r.chunks.storedUnitsDecoded !== r.chunks.decoded ? `, from ${r.chunks.storedUnitsDecoded} stored units of the chain` : ''}${r.chunks.storedUnitsShared ? `; ${r.chunks.storedUnitsShared} stored units taken decoded by another snapshot's chain` : ''}), cache ${r.chunks.cacheHits} hits / ${r.chunks.cacheMisses} misses` +
        (r.chunks.hitRate === null ? '' : ` (${formatPercent(r.chunks.cacheHits, r.chunks.cacheHits + r.chunks.cacheMisses)} hits)`),
    ],
    ...(r.remote
      ? ([
          [
            'remote',
            `${r.remote.location}: ${r.remote.requests} requests, ${formatBytes(r.remote.bytesFetched)} fetched (${r.remote.extentsFetched} chunks), ${r.remote.diskHits} from the cache directory` +
              (r.remote.claimWaits ? ` (${r.remote.claimWaits} after waiting for another handler's fetch)` : '') +
              ', ' +
              `${r.remote.retries} retries, ${r.remote.badResponses} bad answers; request p50 ${ms(r.remote.latencyMs.p50)}, p99 ${ms(r.remote.latencyMs.p99)}; ` +
              `waited ${r.remote.waits} times, ${ms(r.remote.waitMs)} in all, ${ms(r.remote.maxWaitMs)} at most` +
              (r.remote.cacheWriteErrors > 0 ? `; ${r.remote.cacheWriteErrors} cache directory write errors, ${r.remote.memoryHandovers ?? 0} chunks handed over in memory` : ''),
          ],
        ] as [string, string][])
      : []),
    ['events', `${r.events.remove} remove (${r.events.removedPages} pages), ${r.events.unmap} unmap, ${r.events.remap} remap, ${r.events.fork} fork`],
  ]
  return rows.map(([label, value]) => `${label.padEnd(12)}${value}`)
}
