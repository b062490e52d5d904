/**
 * bench/snapshot: `uffd snapshot` against the zstd and lz4 command-line tools on the same raw
 * image, side by side in each run (order rotated), medians over --runs. Reports compressed size,
 * ratio and MB/s of image, and ratios against `zstd -1 -T2`, the issue's reference.
 *
 *   node --import tsx bench/snapshot.ts --image /work/data/guest-2g.raw [--runs 5] [--extra "--chunk-size 1M"]
 *
 * Outputs go to a tmpfs directory (/dev/shm) so disk speed does not decide; the input's page
 * cache is warmed once before the first run, for every tool alike.
 */
import fs from 'node:fs'
import path from 'node:path'

import {arg, median, run, table, UFFD, writeResults} from './lib.js'

const image = arg('image', '/work/data/guest-2g.raw')
const runs = Number(arg('runs', '5'))
const extra = arg('extra', '').split(' ').filter(Boolean)
const out = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'uffd-bench-snapshot-'))
const size = fs.statSync(image).size

interface Tool {
  name: string
  output: string
  command: () => [string, string[]]
}

const tools: Tool[] = [
  {name: 'zstd -1 -T2', output: 'img.zst', command: () => ['zstd', ['-1', '-T2', '-q', '-f', image, '-o', path.join(out, 'img.zst')]]},
  {name: 'zstd -1', output: 'img1.zst', command: () => ['zstd', ['-1', '-q', '-f', image, '-o', path.join(out, 'img1.zst')]]},
  {name: 'lz4 -1', output: 'img.lz4', command: () => ['lz4', ['-1', '-q', '-f', image, path.join(out, 'img.lz4')]]},
  {name: `uffd snapshot (defaults${extra.length ? ` + ${extra.join(' ')}` : ''})`, output: 'img.uffd', command: () => [process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', path.join(out, 'img.uffd'), '--force', ...extra]]},
  {name: 'uffd snapshot --codec lz4', output: 'img-lz4.uffd', command: () => [process.execPath, [UFFD, 'snapshot', '--mem-file', image, '-o', path.join(out, 'img-lz4.uffd'), '--force', '--codec', 'lz4', ...extra]]},
]

function main(): void {
  for (const t of ['zstd', 'lz4']) if (run('which', [t]).code !== 0) throw new Error(`${t} is not installed (apt-get install ${t})`)
  run('cat', [image]) // warm the page cache for every tool alike
  const seconds: Record<string, number[]> = {}
  const sizes: Record<string, number> = {}
  for (let i = 0; i < runs; i++) {
    for (let k = 0; k < tools.length; k++) {
      const tool = tools[(k + i) % tools.length]
      const [cmd, args] = tool.command()
      const started = performance.now()
      const r = run(cmd, args)
      const s = (performance.now() - started) / 1000
      if (r.code !== 0) throw new Error(`${tool.name} failed: ${r.stderr}`)
      ;(seconds[tool.name] ??= []).push(s)
      sizes[tool.name] = fs.statSync(path.join(out, tool.output)).size
      fs.rmSync(path.join(out, tool.output))
      process.stderr.write(`run ${i + 1}/${runs} ${tool.name}: ${s.toFixed(2)} s, ${sizes[tool.name]} bytes\n`)
    }
  }
  const ref = tools[0].name
  const refSeconds = median(seconds[ref])
  const rows = tools.map((t) => {
    const s = median(seconds[t.name])
    return [t.name, String(sizes[t.name]), (size / sizes[t.name]).toFixed(2), (size / 1e6 / s).toFixed(0), s.toFixed(2), (sizes[t.name] / sizes[ref]).toFixed(3), (refSeconds / s).toFixed(2)]
  })
  console.log(`\n${image} (${size} bytes), medians of ${runs} runs\n`)
  console.log(table(['tool', 'bytes', 'ratio', 'MB/s', 'seconds', 'size vs zstd -1 -T2', 'speed vs zstd -1 -T2'], rows))
  console.log(`\nresults: ${writeResults('snapshot', {image, size, runs, extra, seconds, sizes, rows})}`)
  fs.rmSync(out, {recursive: true, force: true})
}

main()
