/**
 * bench/layers: layered snapshots on a realistic guest image. The image is changed in --fraction
 * of its pages (default 2%), once scattered (single pages picked at random) and once clustered
 * (whole runs of --cluster pages). Each changed page is a copy of another data page of the image
 * (a run of them for a cluster) with a few bytes altered, so the new content compresses like the
 * guest's own. Side by side in every run, order rotated, medians over --runs:
 *
 *   (a) size of `snapshot --parent BASE` of the changed image against `snapshot` of it in full
 *   (b) write time of that layer, from the full image (pages compared by content) and from a
 *       Firecracker Diff file of the changed pages (`--diff`), against writing the full snapshot:
 *       wall time of the command (what a user waits) and the writer's own time (its --json
 *       `seconds`: without starting Node and the CLI); the full snapshot is also written with
 *       --no-page-digests (what storing page digests costs it), and each file's page digest
 *       table is shown as a share of its size
 *   (c) resume of the top of a 3-deep chain (base, then three such changes one on another)
 *       against the same image squashed (`uffd squash`), with native/fc_client touching memory
 *       (sequential and random over every page, random --sparse of them), handler and client
 *       unpinned; both are first checked byte for byte (fc_client --verify-all).
 *
 *   node --import tsx bench/layers.ts --image /work/data/guest-1g.raw [--runs 5] [--fraction 0.02]
 *        [--cluster 64] [--sparse 0.05] [--keep]
 *
 * --keep leaves the work directory (images, chains, squashed snapshots) for profiling by hand.
 *
 * Everything is written to a tmpfs directory (/dev/shm), inputs in memory, so disk speed does not
 * decide.
 */
import fs from 'node:fs'
import path from 'node:path'

import {arg, flag, median, NATIVE, run, shuffled, start, table, UFFD, waitForFile, writeResults} from './lib.js'

const PAGE = 4096
const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
const fraction = Number(arg('fraction', '0.02'))
const cluster = Number(arg('cluster', '64'))
const sparse = Number(arg('sparse', '0.05'))
const keep = flag('keep')
const work = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'uffd-bench-layers-'))
const at = (name: string): string => path.join(work, name)
const size = fs.statSync(image).size
const pageCount = Math.ceil(size / PAGE)

function uffd(args: string[]): any {
  const r = run(process.execPath, [UFFD, ...args, '--json'])
  if (r.code !== 0) throw new Error(`uffd ${args.join(' ')} failed (${r.code}): ${r.stderr}${r.stdout}`)
  return JSON.parse(r.stdout)
}

/** Wall time and --json summary of one uffd command. */
function timed(args: string[]): {wall: number; summary: any} {
  const t0 = performance.now()
  const summary = uffd(args)
  return {wall: (performance.now() - t0) / 1000, summary}
}

const zero = Buffer.alloc(PAGE)
const isZero = (mem: Buffer, p: number): boolean => zero.compare(mem, p * PAGE, (p + 1) * PAGE) === 0

/**
 * The pages of one change: `fraction` of the image, single pages or whole clusters, at random
 * (seeded); each gets the bytes of a data page elsewhere (a cluster: of a run of pages) with 8
 * bytes altered at a place that depends on the page. Changes `mem` in place; returns the pages.
 */
function change(mem: Buffer, dataPages: readonly number[], seed: number, clusterPages: number): number[] {
  const clusters = shuffled(
    Array.from({length: Math.floor(pageCount / clusterPages)}, (_, c) => c),
    seed,
  ).slice(0, Math.round((pageCount * fraction) / clusterPages))
  const sources = shuffled(dataPages, seed + 1)
  const pages: number[] = []
  for (const [k, c] of clusters.entries()) {
    const from = Math.min(sources[k % sources.length], pageCount - clusterPages)
    for (let i = 0; i < clusterPages; i++) {
      const p = c * clusterPages + i
      mem.copy(mem, p * PAGE, (from + i) * PAGE, (from + i + 1) * PAGE)
      const spot = p * PAGE + ((p * 97 + seed * 31) % (PAGE / 8)) * 8
      mem.writeUInt32LE(p, spot)
      mem.writeUInt32LE(seed, spot + 4)
      pages.push(p)
    }
  }
  return pages.sort((a, b) => a - b)
}

/** Writes `mem` sparsely (zero pages as holes, as the guest image is) and, for `pages`, a Firecracker Diff file of them. */
function writeImage(mem: Buffer, file: string, pages?: readonly number[], diffFile?: string): void {
  const fd = fs.openSync(file, 'w')
  fs.ftruncateSync(fd, size)
  for (let p = 0; p < pageCount; ) {
    if (isZero(mem, p)) {
      p++
      continue
    }
    let q = p + 1
    while (q < pageCount && !isZero(mem, q) && q - p < 256) q++
    fs.writeSync(fd, mem, p * PAGE, (q - p) * PAGE, p * PAGE)
    p = q
  }
  fs.closeSync(fd)
  if (!pages || !diffFile) return
  const dfd = fs.openSync(diffFile, 'w')
  fs.ftruncateSync(dfd, size)
  for (const p of pages) fs.writeSync(dfd, mem, p * PAGE, PAGE, p * PAGE)
  fs.closeSync(dfd)
}

interface Pattern {
  name: string
  cluster: number
}
const patterns: Pattern[] = [
  {name: 'scattered', cluster: 1},
  {name: `clustered (runs of ${cluster} pages)`, cluster},
]

interface Prepared {
  pattern: Pattern
  changedPages: number
  /** The image after one change (layer 1), as a full image and as a Diff file. */
  v1: string
  v1diff: string
  /** The image the 3-deep chain resolves to, its top layer and the same image squashed. */
  v3: string
  top: string
  squashed: string
}

function prepare(original: Buffer, dataPages: number[], pattern: Pattern, tag: string): Prepared {
  const mem = Buffer.from(original)
  let parent = at('base.uffd')
  let changedPages = 0
  const files: Record<number, string> = {}
  for (let level = 1; level <= 3; level++) {
    const before = level === 1 ? Buffer.from(mem) : undefined
    const pages = change(mem, dataPages, 1000 * level + pattern.cluster, pattern.cluster)
    const raw = at(`${tag}-v${level}.raw`)
    writeImage(mem, raw, pages, level === 1 ? at(`${tag}-v1.diff`) : undefined)
    if (before) changedPages = pages.filter((p) => before.compare(mem, p * PAGE, (p + 1) * PAGE, p * PAGE, (p + 1) * PAGE) !== 0).length
    const layer = at(`${tag}-l${level}.uffd`)
    uffd(['snapshot', '--mem-file', raw, '--parent', parent, '-o', layer, '--force'])
    files[level] = raw
    parent = layer
  }
  const squashed = at(`${tag}-squashed.uffd`)
  uffd(['squash', parent, '-o', squashed, '--force'])
  for (const f of [parent, squashed]) {
    const v = uffd(['verify', f, '--against', files[3]])
    if (!v.ok) throw new Error(`${f} does not verify against ${files[3]}: ${JSON.stringify(v.errors)}`)
  }
  return {pattern, changedPages, v1: files[1], v1diff: at(`${tag}-v1.diff`), v3: files[3], top: parent, squashed}
}

async function resume(snapshot: string, imageFile: string, client: string[], tag: string): Promise<{touchMs: number; verifyErrors: number}> {
  const socket = at(`${tag}.sock`)
  const ready = at(`${tag}.ready`)
  fs.rmSync(ready, {force: true})
  const handler = start(process.execPath, [UFFD, 'resume', snapshot, '--socket', socket, '--ready-file', ready])
  try {
    await waitForFile(ready, 30_000, handler.child)
    const c = await start(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', imageFile, ...client]).done
    if (c.code !== 0) throw new Error(`fc_client on ${snapshot} failed (${c.code}): ${c.stderr}${c.stdout}`)
    const h = await handler.done
    if (h.code !== 0) throw new Error(`resume ${snapshot} exited ${h.code}: ${h.stderr}`)
    const out = JSON.parse(c.stdout.trim().split('\n').pop()!) as {touch_ns: number; verify_errors: number}
    return {touchMs: out.touch_ns / 1e6, verifyErrors: out.verify_errors}
  } finally {
    handler.child.kill('SIGKILL')
  }
}

async function main(): Promise<void> {
  const original = fs.readFileSync(image)
  const dataPages = Array.from({length: pageCount}, (_, p) => p).filter((p) => !isZero(original, p))
  writeImage(original, at('base.raw'))
  uffd(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd')])
  const prepared = patterns.map((p, i) => prepare(original, dataPages, p, `p${i}`))
  for (const p of prepared) {
    for (const f of [p.top, p.squashed]) {
      const r = await resume(f, p.v3, ['--touch', 'random', '--seed', '3', '--verify-all'], 'check')
      if (r.verifyErrors !== 0) throw new Error(`${f}: fc_client found ${r.verifyErrors} wrong pages`)
    }
  }
  console.log(`${image}: ${pageCount} pages, ${dataPages.length} data pages; base snapshot ${fs.statSync(at('base.uffd')).size} bytes; chains and squashed snapshots verified (uffd verify, fc_client --verify-all)`)

  type Write = {wall: number; seconds: number; bytes: number; digestBytes: number}
  const writes: Record<string, Record<string, Write[]>> = {}
  const touches = [
    {name: 'sequential, every page', args: ['--touch', 'sequential']},
    {name: 'random order, every page', args: ['--touch', 'random', '--seed', '7']},
    {name: `random ${(sparse * 100).toFixed(0)}% of pages`, args: ['--touch', 'random', '--seed', '7', '--count', String(Math.round(pageCount * sparse))]},
  ]
  const resumes: Record<string, Record<string, number[]>> = {}
  for (let i = 0; i < runs; i++) {
    for (const p of prepared) {
      const jobs: [string, string[]][] = [
        ['full snapshot', ['snapshot', '--mem-file', p.v1, '-o', at('full.uffd'), '--force']],
        // What storing page digests costs the full snapshot.
        ['full snapshot, --no-page-digests', ['snapshot', '--mem-file', p.v1, '-o', at('full.uffd'), '--force', '--no-page-digests']],
        ['layer (full image, compared)', ['snapshot', '--mem-file', p.v1, '--parent', at('base.uffd'), '-o', at('layer.uffd'), '--force']],
        ['layer (--diff file)', ['snapshot', '--mem-file', p.v1diff, '--diff', '--parent', at('base.uffd'), '-o', at('layer.uffd'), '--force']],
      ]
      for (let k = 0; k < jobs.length; k++) {
        const [name, args] = jobs[(k + i) % jobs.length]
        const t = timed(args)
        ;((writes[p.pattern.name] ??= {})[name] ??= []).push({wall: t.wall, seconds: t.summary.seconds, bytes: t.summary.fileSize, digestBytes: t.summary.pageDigestBytes ?? 0})
        process.stderr.write(`run ${i + 1}/${runs} ${p.pattern.name} / ${name}: ${t.wall.toFixed(2)} s wall, ${t.summary.seconds.toFixed(2)} s writing, ${t.summary.fileSize} bytes\n`)
      }
      for (const touch of touches) {
        const pair: [string, string][] = [
          ['squashed', p.squashed],
          ['3-deep chain', p.top],
        ]
        for (let k = 0; k < pair.length; k++) {
          const [name, file] = pair[(k + i) % pair.length]
          const r = await resume(file, p.v3, touch.args, `r${k}`)
          ;((resumes[`${p.pattern.name} | ${touch.name}`] ??= {})[name] ??= []).push(r.touchMs)
          process.stderr.write(`run ${i + 1}/${runs} ${p.pattern.name} / ${touch.name} / ${name}: ${r.touchMs.toFixed(1)} ms\n`)
        }
      }
    }
  }

  const writeRows: string[][] = []
  for (const p of prepared) {
    const w = writes[p.pattern.name]
    const full = w['full snapshot']
    const fullBytes = median(full.map((x) => x.bytes))
    const fullWall = median(full.map((x) => x.wall))
    const fullSeconds = median(full.map((x) => x.seconds))
    for (const [name, xs] of Object.entries(w)) {
      const bytes = median(xs.map((x) => x.bytes))
      const wall = median(xs.map((x) => x.wall))
      const seconds = median(xs.map((x) => x.seconds))
      const digestBytes = median(xs.map((x) => x.digestBytes))
      writeRows.push([p.pattern.name, name, String(bytes), `${((bytes / fullBytes) * 100).toFixed(2)}%`, `${((digestBytes / bytes) * 100).toFixed(2)}%`, wall.toFixed(2), `${(fullWall / wall).toFixed(2)}x`, seconds.toFixed(3), `${(fullSeconds / seconds).toFixed(2)}x`])
    }
  }
  const changed = prepared.map((p) => `${p.pattern.name}: ${p.changedPages} pages (${((p.changedPages / pageCount) * 100).toFixed(2)}%)`).join('; ')
  console.log(`\n(a, b) one change on the base (${changed}), medians of ${runs} runs\n`)
  console.log(table(['change', 'written', 'bytes', 'size vs full', 'digest table share', 'wall s', 'wall speed vs full', 'writing s', 'writing speed vs full'], writeRows))

  const resumeRows = Object.entries(resumes).map(([key, r]) => {
    const sq = median(r['squashed'])
    const ch = median(r['3-deep chain'])
    return [...key.split(' | '), sq.toFixed(1), ch.toFixed(1), `${(ch / sq).toFixed(3)}x`]
  })
  console.log(`\n(c) resume, top of a 3-deep chain against the squashed snapshot (fc_client touch ms, medians of ${runs} runs)\n`)
  console.log(table(['change', 'touch', 'squashed ms', 'chain ms', 'chain time / squashed'], resumeRows))
  const sizes = Object.fromEntries(prepared.flatMap((p) => [[p.top, fs.statSync(p.top).size], [p.squashed, fs.statSync(p.squashed).size]]))
  console.log(`\nresults: ${writeResults('layers', {image, runs, fraction, cluster, sparse, argv: process.argv.slice(2), changed: prepared.map((p) => ({pattern: p.pattern.name, pages: p.changedPages})), sizes, writes, resumes, writeRows, resumeRows})}`)
  if (keep) console.log(`kept ${work}`)
  else fs.rmSync(work, {recursive: true, force: true})
}

try {
  await main()
} catch (error) {
  fs.rmSync(work, {recursive: true, force: true})
  throw error
}
