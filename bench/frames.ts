/**
 * bench/frames: what framing zstd chunks costs and buys (docs/FORMAT.md, Framed chunks). For each
 * frame size the image is snapshotted with `uffd snapshot --frame-size SIZE` (0: one frame a
 * chunk, the baseline), and, in the same run, side by side:
 *   size        the snapshot's bytes against the unframed one's;
 *   whole       decoding a whole chunk (readPayload: read, CRC, zstd), per chunk;
 *   one page    what an isolated fault decodes: the frames holding one page (readFramesIfLocal:
 *               the same read and CRC, then only those frames), per call, a page of each chunk.
 * Timed in this process over every zstd chunk of the file (page cache warm: the decode, not the
 * disk), medians of --runs passes; CPU time (the process's: one thread) beside wall time, the machine being noisy.
 * The first-touch effect of the frame size is bench/first-touch's (--snapshot-args "--frame-size SIZE").
 *
 *   node --import tsx bench/frames.ts --image /work/data/guest-1g.raw [--runs 5] [--sizes 0,16K,32K,64K,128K]
 */
import fs from 'node:fs'
import path from 'node:path'

import {Codec} from '../src/format/constants.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {arg, median, run, table, tempDir, UFFD, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-1g.raw')
const runs = Number(arg('runs', '5'))
const sizes = arg('sizes', '0,16K,32K,64K,128K').split(',')
if (sizes[0] !== '0') throw new Error('--sizes starts with 0 (the unframed baseline)')
const work = tempDir('uffd-bench-frames-')

/** The process's CPU time in ms (user + system): one thread decodes. */
function cpuMs(): number {
  const u = process.cpuUsage()
  return (u.user + u.system) / 1000
}

interface Measured {
  size: string
  bytes: number
  framePages: number
  wholeUs: number[]
  wholeCpuUs: number[]
  pageUs: number[]
  pageCpuUs: number[]
}

function measure(size: string): Measured {
  const file = path.join(work, `frames-${size}.uffd`)
  const made = run(process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', file, '--force', '--frame-size', size])
  if (made.code !== 0) throw new Error(`snapshot --frame-size ${size} failed: ${made.stderr}`)
  const reader = SnapshotReader.open(file)
  try {
    reader.prepareDecoding()
    const chunks: number[] = []
    for (let c = 0; c < reader.index.length; c++) if (reader.entry(c).codec === Codec.Zstd) chunks.push(c)
    const dst = Buffer.alloc(reader.geometry.chunkSize)
    const ppc = reader.geometry.pagesPerChunk
    // A data page of each chunk, the same for every frame size (the first one past a fixed offset).
    const pageOf = chunks.map((c) => {
      const first = c * ppc
      for (let i = 0; i < ppc; i++) {
        const p = first + ((i + 37) % ppc)
        if (!reader.zeroMap.isZero(p)) return p
      }
      return first
    })
    const m: Measured = {size, bytes: fs.statSync(file).size, framePages: reader.framePages, wholeUs: [], wholeCpuUs: [], pageUs: [], pageCpuUs: []}
    for (let r = 0; r < runs + 1; r++) {
      let t = performance.now()
      let cpu = cpuMs()
      for (const c of chunks) reader.readPayload(c, dst)
      const whole = [((performance.now() - t) * 1000) / chunks.length, ((cpuMs() - cpu) * 1000) / chunks.length]
      t = performance.now()
      cpu = cpuMs()
      for (let i = 0; i < chunks.length; i++) {
        const got = reader.readFramesIfLocal(chunks[i], pageOf[i], pageOf[i] + 1, dst)
        if (got === 'whole') reader.readPayload(chunks[i], dst)
      }
      const page = [((performance.now() - t) * 1000) / chunks.length, ((cpuMs() - cpu) * 1000) / chunks.length]
      if (r === 0) continue // warm-up: the page cache and the JIT
      m.wholeUs.push(whole[0])
      m.wholeCpuUs.push(whole[1])
      m.pageUs.push(page[0])
      m.pageCpuUs.push(page[1])
    }
    return m
  } finally {
    reader.close()
    fs.rmSync(file, {force: true})
  }
}

const results = sizes.map(measure)
const base = results[0]
const rows = results.map((m) => [
  m.size === '0' ? 'unframed' : m.size,
  m.bytes,
  `${((m.bytes / base.bytes - 1) * 100).toFixed(2)}%`,
  `${median(m.wholeUs).toFixed(1)} (${median(m.wholeCpuUs).toFixed(1)})`,
  `${median(m.pageUs).toFixed(1)} (${median(m.pageCpuUs).toFixed(1)})`,
  `${(median(base.wholeCpuUs) / median(m.pageCpuUs)).toFixed(2)}x`,
])
console.log(`\nframed chunks (${image}, medians of ${runs}; µs wall (CPU) per chunk)\n`)
console.log(table(['frame size', 'snapshot bytes', 'vs unframed', 'whole chunk µs', 'one page\'s frames µs', 'one page vs an unframed chunk (CPU)'], rows))
console.log(`\nresults: ${writeResults('frames', {image, runs, results, rows})}`)
fs.rmSync(work, {recursive: true, force: true})
