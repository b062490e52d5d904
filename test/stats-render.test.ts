// What `uffd stats` prints: the resume report of a --stats-file (renderResumeReport, pure) and the
// table of a snapshot (the stats command), each against the --json result it shows.
import fs from 'node:fs'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {formatBytes} from '../src/core/units.js'
import {RegionKind} from '../src/format/constants.js'
import {ResumeReportSchema, schemaProblem} from '../src/format/schemas.js'
import {renderResumeReport} from '../src/resume/main/report-render.js'
import {buildReport, type ResumeReport, RunStats} from '../src/resume/run-stats.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

let dir: string
beforeAll(() => {
  dir = tempDir('uffd-stats-render-test-')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

/** A report of a run that did a bit of everything. */
function fullReport(): ResumeReport {
  const stats = new RunStats()
  const counts: [Parameters<RunStats['add']>[0], number][] = [
    ['clients', 2], ['clientsEnded', 2], ['faults', 4], ['faultsData', 2], ['faultsZero', 1], ['faultsRemoved', 1],
    ['pagesCopied', 1536], ['pagesZeroed', 512], ['faultAroundPages', 1000], ['prefetchedPages', 900], ['helperPages', 300],
    ['workingSetChunks', 12], ['copyIoctls', 40], ['zeropageIoctls', 9], ['eexist', 3], ['eagain', 1],
    ['bytesCopied', 1536 * 4096], ['chunksDecoded', 24], ['bytesDecompressed', 6 * 1024 * 1024], ['cacheHits', 3], ['cacheMisses', 1],
    ['removeEvents', 1], ['removedPages', 64], ['forkEvents', 1],
    ['stagedUnits', 12], ['stagedBytes', 3 * 1024 * 1024], ['hitsTracked', 1], ['prefetchCopiedPages', 900], ['prefetchHits', 700], ['prefetchWasted', 200],
  ]
  for (const [name, n] of counts) stats.add(name, n)
  for (const [name, v] of [['firstFaultMs', 1.25], ['lastFaultMs', 40], ['memoryCompleteMs', 80.5], ['workingSetDoneMs', 20], ['stagedMs', 15], ['hitsSampledMs', 500]] as const) stats.set(name, v)
  for (const us of [4, 12, 30, 250]) stats.recordLatency(us)
  return buildReport(stats, 'vm.uffd', new Date(Date.UTC(2026, 0, 2, 3, 4, 5)), Date.UTC(2026, 0, 2, 3, 4, 5) + 1500)
}

describe('renderResumeReport', () => {
  it('shows every part of a full report, labels aligned', () => {
    const lines = renderResumeReport('run.json', fullReport())
    const p = (us: number) => `${Math.round(us)} µs`
    const r = fullReport()
    expect(lines).toEqual([
      'run         run.json: uffd resume of vm.uffd, started 2026-01-02T03:04:05.000Z, 1.50 s',
      'clients     2 served, 2 ended',
      'faults      4: 2 data, 1 zero, 1 removed (served zeros), 0 already present',
      `latency     min 4.0 µs, p50 ${p(r.latencyUs.p50!)}, p90 ${p(r.latencyUs.p90!)}, p99 ${p(r.latencyUs.p99!)}, max 250 µs, mean 74 µs`,
      'first/last  first fault 1.3 ms, last fault 40.0 ms after the start',
      'pages       1536 copied (6 MiB), 512 zeroed; 1000 by fault-around, 900 by prefetch (300 of them by a helper thread)',
      'complete    working set (12 units) in 20.0 ms after the start; all memory present 80.5 ms after the start',
      'staged      working set decoded before the first client: 12 units, 3 MiB, ready 15.0 ms after start-up',
      'prefetch    900 data pages installed ahead of need: 700 touched since (hits), 200 not (wasted), as of 500.0 ms',
      'ioctls      40 UFFDIO_COPY, 9 UFFDIO_ZEROPAGE, 3 EEXIST, 1 EAGAIN',
      'chunks      24 decoded (6 MiB), cache 3 hits / 1 misses (75.0% hits)',
      'events      1 remove (64 pages), 0 unmap, 0 remap, 1 fork',
    ])
    // The percentiles shown lie between the min and max shown.
    expect(r.latencyUs.min!).toBeLessThanOrEqual(r.latencyUs.p50!)
    expect(r.latencyUs.p99!).toBeLessThanOrEqual(r.latencyUs.max!)
  })

  it('a run that served nothing shows dashes, and older reports (no staged, prefetchHits, byHelper or min) still render', () => {
    const empty = buildReport(new RunStats(), 'vm.uffd', new Date(0), 0)
    const lines = renderResumeReport('run.json', empty)
    expect(lines.find((l) => l.startsWith('latency'))).toBe('latency     min -, p50 -, p90 -, p99 -, max -, mean -')
    expect(lines.find((l) => l.startsWith('complete'))).toBe('complete    memory not completely present')
    expect(lines.find((l) => l.startsWith('chunks'))).toBe('chunks      0 decoded (0 B), cache 0 hits / 0 misses')
    // What an older uffd wrote: without the fields added since.
    const {staged: _staged, prefetchHits: _hits, ...older} = fullReport()
    const old = {...older, pages: {...older.pages, byHelper: undefined}, latencyUs: {...older.latencyUs, min: undefined}} as ResumeReport
    delete old.pages.byHelper
    delete old.latencyUs.min
    expect(schemaProblem(ResumeReportSchema, old, 'old.json')).toBeUndefined()
    const oldLines = renderResumeReport('old.json', old)
    expect(oldLines.some((l) => /^(staged|prefetch) /.test(l))).toBe(false)
    expect(oldLines.find((l) => l.startsWith('latency'))).toMatch(/^latency {5}p50 /)
    expect(oldLines.find((l) => l.startsWith('pages'))).not.toMatch(/helper/)
  })

  it('any report the schema accepts renders, one labelled line per part, with no undefined, NaN or [object Object]', () => {
    const n = fc.nat(10 ** 9)
    const t = fc.double({min: 0, max: 1e7, noNaN: true})
    const nullable = <T>(a: fc.Arbitrary<T>) => fc.option(a, {nil: null})
    // Free text is shown as it is: keep the words the check looks for out of it.
    const text = fc.string().filter((s) => !/undefined|NaN|object/.test(s))
    const report = fc.record({
      kind: fc.constant('uffd-resume-stats' as const),
      version: fc.constant(1 as const),
      snapshot: text,
      startedAt: text,
      durationMs: t,
      clients: fc.record({served: n, ended: n}),
      faults: fc.record({total: n, data: n, zero: n, removed: n, alreadyPresent: n}),
      pages: fc.record({copied: n, zeroed: n, faultAround: n, prefetched: n, byHelper: n}, {requiredKeys: ['copied', 'zeroed', 'faultAround', 'prefetched']}),
      workingSetChunks: n,
      staged: fc.option(nullable(fc.record({units: n, bytes: n, ms: t})), {nil: undefined}),
      ioctls: fc.record({copy: n, zeropage: n, eexist: n, eagain: n}),
      bytes: fc.record({copied: n, decompressed: n}),
      chunks: fc.record({decoded: n, storedUnitsDecoded: n, cacheHits: n, cacheMisses: n, hitRate: nullable(fc.double({min: 0, max: 1, noNaN: true}))}, {requiredKeys: ['decoded', 'cacheHits', 'cacheMisses', 'hitRate']}),
      events: fc.record({remove: n, removedPages: n, unmap: n, remap: n, fork: n}),
      latencyUs: fc.record({p50: nullable(t), p90: nullable(t), p99: nullable(t), min: nullable(t), max: nullable(t), mean: nullable(t)}, {requiredKeys: ['p50', 'p90', 'p99', 'max', 'mean']}),
      timeToFirstFaultMs: nullable(t),
      timeToLastFaultMs: nullable(t),
      timeToMemoryCompleteMs: nullable(t),
      timeToWorkingSetMs: nullable(t),
      prefetchHits: fc.option(nullable(fc.record({copiedPages: n, hits: n, wasted: n, sampledAtMs: t})), {nil: undefined}),
    })
    fc.assert(
      fc.property(report, (r) => {
        const value = JSON.parse(JSON.stringify(r)) as ResumeReport
        expect(schemaProblem(ResumeReportSchema, value, 'r.json')).toBeUndefined()
        const lines = renderResumeReport('r.json', value)
        const labels = lines.map((l) => l.slice(0, 12).trim())
        expect(labels.slice(0, 7)).toEqual(['run', 'clients', 'faults', 'latency', 'first/last', 'pages', 'complete'])
        expect(labels.slice(-3)).toEqual(['ioctls', 'chunks', 'events'])
        expect(labels.includes('staged')).toBe(Boolean(value.staged))
        expect(labels.includes('prefetch')).toBe(Boolean(value.prefetchHits))
        for (const line of lines) {
          expect(line.slice(12), line).not.toMatch(/\bundefined\b|\bNaN\b|\[object Object\]/)
        }
      }),
      {numRuns: 300},
    )
  })
})

describe('uffd stats RUN.json', () => {
  it('prints the rendered report, and --json gives the file back', () => {
    const file = path.join(dir, 'run.json')
    const report = fullReport()
    fs.writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`)
    const text = uffd(['stats', file])
    expect(text.status, text.stderr).toBe(0)
    expect(text.stdout).toBe(`${renderResumeReport(file, report).join('\n')}\n`)
    const json = uffd(['stats', file, '--json'])
    expect(json.json).toEqual(report)
  })
})

describe('uffd stats SNAPSHOT', () => {
  let file: string
  let json: any
  let lines: string[]
  beforeAll(async () => {
    const raw = path.join(dir, 'mixed.mem')
    fs.writeFileSync(raw, makeImage('mixed', 1 << 20, 3))
    file = path.join(dir, 'mixed.uffd')
    await writeSnapshot(memFileInput(raw), file, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1})
    const r = uffd(['stats', file])
    expect(r.status, r.stderr).toBe(0)
    lines = r.stdout.trimEnd().split('\n')
    json = uffd(['stats', file, '--json']).json
  })

  const row = (label: string): string => {
    const line = lines.find((l) => l.startsWith(`${label.padEnd(14)}`))
    expect(line, `a "${label}" row in:\n${lines.join('\n')}`).toBeDefined()
    return line!.slice(14)
  }

  it('shows the sizes, zero pages and chunks of its --json result', () => {
    expect(row('snapshot')).toBe(`${file} (format ${json.format})`)
    expect(row('logical size')).toBe(`${formatBytes(json.logicalSize)} (${json.logicalSize} bytes, ${json.pageCount} pages of 4 KiB)`)
    expect(row('stored size')).toBe(`${formatBytes(json.fileSize)} (${json.fileSize} bytes), ratio ${json.ratio.toFixed(2)}x`)
    expect(json.zeroPages).toBeGreaterThan(0)
    expect(row('zero pages')).toBe(`${json.zeroPages} (${((100 * json.zeroPages) / json.pageCount).toFixed(1)}%, ${formatBytes(json.zeroBytes)}), never stored`)
    expect(json.dedupChunks).toBeGreaterThan(0)
    expect(row('chunks')).toBe(`${json.chunkCount} of 64 KiB: ${json.allZeroChunks} all-zero, ${json.dedupChunks} deduplicated (saving ${formatBytes(json.dedupSavedBytes)})`)
  })

  it('has one row per codec under the codec header, whose counts add up to the chunks', () => {
    const at = lines.findIndex((l) => l.startsWith('codec '))
    const codecRows = lines.slice(at + 1, at + 1 + Object.keys(json.codecs).length).map((l) => l.slice(14).trim().split(/\s+/))
    expect(codecRows.map((r) => r[0]).sort()).toEqual(Object.keys(json.codecs).sort())
    let chunks = 0
    for (const [name, count] of codecRows) {
      expect(Number(count), name).toBe(json.codecs[name].chunks)
      chunks += Number(count)
    }
    expect(chunks).toBe(json.chunkCount)
  })

  it('lists 40 regions at most, then how many more --json has', async () => {
    const regions = Array.from({length: 45}, (_, i) => ({kind: RegionKind.ProcessVma, imageOffset: i * 4096, size: 4096, address: 0x10000 + i * 0x2000, fileOffset: 0, prot: 3, flags: 0, owner: 1 + (i % 2), name: `vma${i}`}))
    const many = path.join(dir, 'regions.uffd')
    await writeSnapshot({logicalSize: 45 * 4096, regions, metadata: {source: 'process', pid: 42, command: 'app'}, segments: () => []}, many, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1})
    const out = uffd(['stats', many]).stdout.trimEnd().split('\n')
    expect(out.find((l) => l.startsWith('source '))).toMatch(/^source {8}process 42 \(app\), created /)
    const shown = out.filter((l) => /^ {14}0x[0-9a-f]+ rw- /.test(l))
    expect(shown.length).toBe(40)
    expect(out.at(-1)).toBe(`${' '.repeat(14)}... 5 more (see --json)`)
    // Two owners: the tasks table, with each one's mapped bytes.
    const tasks = out.filter((l) => /^ {14} +[12] +\d/.test(l))
    expect(tasks.map((l) => l.trim().split(/\s+/)[0])).toEqual(['1', '2'])
  })
})
