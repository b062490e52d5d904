// CRIU dumps as a snapshot source: image framing and parsing on images this test writes with
// protobufjs (every machine), and real `criu dump`s of processes with known memory converted with
// `uffd snapshot --criu-dir` (needs root and a working criu: bash scripts/install-criu.sh).
import {type ChildProcess, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {CRIU_PAGE_SIZE, CriuImageError, isLazyVma, MAGIC, PE_LAZY, PE_PARENT, PE_PRESENT, readCriuDump, TASK_ALIVE, TASK_DEAD, VMA_AREA_VSYSCALL, VMA_AREA_HEAP, VMA_FILE_PRIVATE} from '../src/criu/images.js'
import {CRIU_SCHEMA} from '../src/criu/schema.js'
import {RegionKind} from '../src/format/constants.js'
import {criuDirInput} from '../src/snapshot/inputs.js'
import {openLocalImage} from './helpers/chain.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {isRoot, NATIVE, uffd} from './helpers/cli.js'
import {decodeImage} from './helpers/images.js'

const PAGE = CRIU_PAGE_SIZE
const MEMORY_PATTERN = path.join(NATIVE, 'memory_pattern')

let dir: string
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-criu-'))
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

// --- Images written by the test -------------------------------------------------------------

/** A CRIU protobuf image: optional common magic, the image magic, then u32-length-prefixed messages. */
function image(magic: number, messages: [string, object][], commonMagic = true): Buffer {
  const parts = [Buffer.alloc(commonMagic ? 8 : 4)]
  if (commonMagic) parts[0].writeUInt32LE(MAGIC.IMG_COMMON, 0)
  parts[0].writeUInt32LE(magic, commonMagic ? 4 : 0)
  for (const [type, fields] of messages) {
    const T = CRIU_SCHEMA.lookupType(type)
    const body = T.encode(T.fromObject(fields)).finish()
    const size = Buffer.alloc(4)
    size.writeUInt32LE(body.length)
    parts.push(size, Buffer.from(body))
  }
  return Buffer.concat(parts)
}

interface FakeVma {
  /** Decimal strings for addresses beyond 2^53. */
  start: number | string
  end: number | string
  prot?: number
  flags?: number
  status?: number
  shmid?: number
}

interface FakeTask {
  pid: number
  ppid?: number
  state?: number
  vmas?: FakeVma[]
  /** Pagemap entries; nrPages via nr_pages unless compat is set. */
  entries?: {vaddr: number | string; nrPages: number; flags?: number; compat?: boolean}[]
  pages?: Buffer
}

/** Writes a minimal dump directory: pstree, core, mm, pagemap and pages images per task. */
function writeDump(name: string, tasks: FakeTask[], options: {commonMagic?: boolean} = {}): string {
  const d = path.join(dir, name)
  fs.rmSync(d, {recursive: true, force: true})
  fs.mkdirSync(d)
  const common = options.commonMagic ?? true
  const write = (file: string, data: Buffer): void => fs.writeFileSync(path.join(d, file), data)
  write('pstree.img', image(MAGIC.PSTREE, tasks.map((t) => ['pstree_entry', {pid: t.pid, ppid: t.ppid ?? 0, pgid: t.pid, sid: t.pid, threads: [t.pid]}]), common))
  tasks.forEach((t, i) => {
    const state = t.state ?? TASK_ALIVE
    write(`core-${t.pid}.img`, image(MAGIC.CORE, [['core_entry', {mtype: 1, tc: {task_state: state, comm: `task${t.pid}`}}]], common))
    if (state === TASK_DEAD) return
    const vmas = (t.vmas ?? []).map((v) => ({pgoff: 0, shmid: v.shmid ?? 0, prot: v.prot ?? 3, flags: v.flags ?? 0x22, status: v.status ?? 0x201, ...v}))
    write(`mm-${t.pid}.img`, image(MAGIC.MM, [['mm_entry', {vmas}]], common))
    const entries: [string, object][] = (t.entries ?? []).map((e) =>
      e.compat ? ['pagemap_entry', {vaddr: e.vaddr, compat_nr_pages: e.nrPages}] : ['pagemap_entry', {vaddr: e.vaddr, compat_nr_pages: 0, nr_pages: e.nrPages, flags: e.flags ?? PE_PRESENT}],
    )
    write(`pagemap-${t.pid}.img`, image(MAGIC.PAGEMAP, [['pagemap_head', {pages_id: i + 1}], ...entries], common))
    write(`pages-${i + 1}.img`, t.pages ?? Buffer.alloc(0))
  })
  return d
}

/** A page filled with one byte value. */
const page = (value: number, count = 1): Buffer => Buffer.alloc(count * PAGE, value)

/** Decodes a whole snapshot through the reader. */
function decodeAll(file: string): {reader: SnapshotReader; image: Buffer} {
  const reader = SnapshotReader.open(file)
  return {reader, image: decodeImage(reader)}
}

async function convert(dumpDir: string, name: string): Promise<{reader: SnapshotReader; image: Buffer}> {
  const out = path.join(dir, `${name}.uffd`)
  await writeSnapshot(criuDirInput(dumpDir), out, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: PAGE, jobs: 2})
  return decodeAll(out)
}

const A = 0x7f0000000000 // a typical mmap address, well above 2^32

describe('CRIU image parsing (images written by the test)', () => {
  it('reads tasks, VMAs and pagemaps, and places dumped pages at their VMA offsets', async () => {
    const H = 0x1000000
    const d = writeDump('basic', [
      {
        pid: 100,
        vmas: [
          {start: H, end: H + 4 * PAGE, status: VMA_AREA_HEAP | 0x201},
          {start: A, end: A + 8 * PAGE},
          {start: A + 8 * PAGE, end: A + 10 * PAGE, prot: 1}, // adjacent, other protection
          {start: A + 16 * PAGE, end: A + 20 * PAGE, prot: 1, flags: 0x02, status: VMA_FILE_PRIVATE | 1, shmid: 7},
        ],
        // The third entry runs on into the next VMA: CRIU merges runs of adjacent pages.
        entries: [
          {vaddr: H + 3 * PAGE, nrPages: 1, flags: PE_PRESENT | PE_LAZY},
          {vaddr: A + PAGE, nrPages: 2, flags: PE_PRESENT | PE_LAZY},
          {vaddr: A + 6 * PAGE, nrPages: 3},
          {vaddr: A + 17 * PAGE, nrPages: 1},
        ],
        pages: Buffer.concat([1, 2, 3, 4, 5, 6, 7].map((v) => page(v))),
      },
      {pid: 101, ppid: 100, vmas: [{start: A, end: A + 2 * PAGE}], entries: [{vaddr: A, nrPages: 2}], pages: Buffer.concat([page(0), page(9)])},
    ])
    const dump = readCriuDump(d)
    expect(dump.tasks.map((t) => [t.pid, t.ppid, t.comm, t.state])).toEqual([
      [100, 0, 'task100', TASK_ALIVE],
      [101, 100, 'task101', TASK_ALIVE],
    ])
    expect(dump.tasks[0].pagemap!.entries[1]).toEqual({vaddr: A + PAGE, nrPages: 2, flags: PE_PRESENT | PE_LAZY, pagesOffset: PAGE})
    expect(dump.tasks[0].pagemap!.entries[3].pagesOffset).toBe(6 * PAGE)
    expect(dump.tasks[0].pagemap!.presentPages).toBe(7)

    const {reader, image: img} = await convert(d, 'basic')
    const regions = reader.header.regions
    expect(regions.map((r) => [r.owner, r.address, r.size, r.prot, r.name])).toEqual([
      [100, H, 4 * PAGE, 3, '[heap]'],
      [100, A, 8 * PAGE, 3, ''],
      [100, A + 8 * PAGE, 2 * PAGE, 1, ''],
      [100, A + 16 * PAGE, 4 * PAGE, 1, '[file id 7]'],
      [101, A, 2 * PAGE, 3, ''],
    ])
    for (const r of regions) expect(r.kind).toBe(RegionKind.ProcessVma)
    const at = (regionIndex: number, pageIndex: number): Buffer => {
      const off = regions[regionIndex].imageOffset + pageIndex * PAGE
      return img.subarray(off, off + PAGE)
    }
    const expected: [number, number, number][] = [
      [0, 3, 1],
      [1, 1, 2],
      [1, 2, 3],
      [1, 6, 4],
      [1, 7, 5],
      [2, 0, 6],
      [3, 1, 7],
      [4, 1, 9],
    ]
    for (const [r, p, value] of expected) expect(at(r, p).equals(page(value)), `region ${r} page ${p}`).toBe(true)
    // Everything else, including the dumped zero page of task 101, is a zero page.
    expect(reader.zeroMap.countZero(0, reader.geometry.pageCount)).toBe(reader.geometry.pageCount - expected.length)
    expect(reader.zeroMap.isZero(regions[4].imageOffset / PAGE)).toBe(true)
    expect(reader.header.metadata).toMatchObject({
      source: 'criu',
      criuDir: d,
      tasks: [
        {pid: 100, ppid: 0, comm: 'task100', pages: 7, rawPageBytes: 7 * PAGE},
        {pid: 101, ppid: 100, comm: 'task101', pages: 2, rawPageBytes: 2 * PAGE},
      ],
      rawPageBytes: 9 * PAGE,
    })
    reader.close()
  })

  it('reads v1.0 images (no common magic) and pre-3.x pagemap entries (no flags, 32-bit page count)', () => {
    const d = writeDump('compat', [{pid: 5, vmas: [{start: A, end: A + 4 * PAGE}], entries: [{vaddr: A + PAGE, nrPages: 2, compat: true}], pages: page(7, 2)}], {commonMagic: false})
    const pm = readCriuDump(d).tasks[0].pagemap!
    expect(pm.entries).toEqual([{vaddr: A + PAGE, nrPages: 2, flags: PE_PRESENT, pagesOffset: 0}])
  })

  it('skips [vsyscall] (beyond 2^53), keeps zombies without memory, and leaves out unreadable empty VMAs', async () => {
    const d = writeDump('special', [
      {
        pid: 1,
        vmas: [
          {start: A, end: A + PAGE},
          {start: A + PAGE, end: A + 64 * PAGE, prot: 0}, // PROT_NONE reservation, nothing dumped
          {start: '18446744073699065856', end: '18446744073699069952', prot: 5, status: VMA_AREA_VSYSCALL | 1}, // 0xffffffffff600000
        ],
        entries: [{vaddr: A, nrPages: 1}],
        pages: page(3),
      },
      {pid: 2, ppid: 1, state: TASK_DEAD},
    ])
    const dump = readCriuDump(d)
    expect(dump.tasks[0].vmas).toHaveLength(2)
    expect(dump.tasks[1]).toMatchObject({pid: 2, state: TASK_DEAD, vmas: [], pagemap: null})
    const {reader} = await convert(d, 'special')
    expect(reader.header.regions).toHaveLength(1)
    expect(reader.header.metadata.tasks).toEqual([
      {pid: 1, ppid: 0, comm: 'task1', pages: 1, rawPageBytes: PAGE},
      {pid: 2, ppid: 1, comm: 'task2', pages: 0, rawPageBytes: 0},
    ])
    reader.close()
  })

  const refusals: [string, FakeTask, RegExp][] = [
    ['entries both in the parent and present', {pid: 3, vmas: [{start: A, end: A + 2 * PAGE}], entries: [{vaddr: A, nrPages: 1, flags: PE_PARENT | PE_PRESENT}]}, /pagemap-3\.img: entry 1 .* both in the parent dump and in this one/],
    ['--lazy-pages dumps (lazy, not present)', {pid: 3, vmas: [{start: A, end: A + 2 * PAGE}], entries: [{vaddr: A, nrPages: 1, flags: PE_LAZY}]}, /pagemap-3\.img: entry 1 .*--lazy-pages/],
    ['a pages image shorter than the pagemap says', {pid: 3, vmas: [{start: A, end: A + 2 * PAGE}], entries: [{vaddr: A, nrPages: 2}], pages: page(1)}, /pages-1\.img: 4096 bytes, but pagemap-3\.img stores 2 pages/],
    ['overlapping entries', {pid: 3, vmas: [{start: A, end: A + 4 * PAGE}], entries: [{vaddr: A, nrPages: 2}, {vaddr: A + PAGE, nrPages: 1}], pages: page(1, 3)}, /entry 2 .* overlaps/],
  ]
  for (const [what, task, message] of refusals) {
    it(`refuses ${what}, naming the image`, () => {
      const d = writeDump('refused', [task])
      expect(() => readCriuDump(d)).toThrow(message)
    })
  }

  it('an incremental dump (PE_PARENT entries) is a layer over its parent dump\'s snapshot, refused as a whole snapshot', async () => {
    // The parent dump: 6 pages of one VMA, 4 dumped. The incremental one: pages 0-1 and 4 in
    // the parent, page 2 changed, page 3 not dumped (discarded since: zero now), page 5 new.
    const vma = {start: A, end: A + 6 * PAGE}
    const d1 = writeDump('inc-parent', [{pid: 9, vmas: [vma], entries: [{vaddr: A, nrPages: 5}], pages: Buffer.concat([page(1), page(2), page(3), page(4), page(5)])}])
    const d2 = writeDump('inc-child', [
      {
        pid: 9,
        vmas: [vma],
        entries: [
          {vaddr: A, nrPages: 2, flags: PE_PARENT},
          {vaddr: A + 2 * PAGE, nrPages: 1, flags: PE_PRESENT | PE_LAZY},
          {vaddr: A + 4 * PAGE, nrPages: 1, flags: PE_PARENT},
          {vaddr: A + 5 * PAGE, nrPages: 1, flags: PE_PRESENT | PE_LAZY},
        ],
        pages: Buffer.concat([page(7), page(8)]),
      },
    ])
    fs.symlinkSync('../inc-parent', path.join(d2, 'parent'))
    const dump = readCriuDump(d2)
    expect(dump.tasks[0].pagemap).toMatchObject({presentPages: 2, parentPages: 3})
    const input = criuDirInput(d2)
    expect(input.unchangedPages).toBe(3)
    expect(input.unchanged!(0, 6 * PAGE)).toEqual([
      {start: 0, end: 2 * PAGE},
      {start: 4 * PAGE, end: 5 * PAGE},
    ])
    // In full its parent pages would read as zeros: refused, nothing written.
    const whole = uffd(['snapshot', '--criu-dir', d2, '-o', path.join(dir, 'inc-whole.uffd'), '--json'])
    expect(whole.json.error.code).toBe('CRIU_IMAGE')
    expect(whole.json.error.message).toContain('--parent')
    expect(fs.existsSync(path.join(dir, 'inc-whole.uffd'))).toBe(false)
    // Over the parent dump's snapshot: the parent's pages where the dump says so, its own elsewhere.
    const base = path.join(dir, 'inc-base.uffd')
    expect(uffd(['snapshot', '--criu-dir', d1, '-o', base, '--chunk-size', '16K']).status).toBe(0)
    const layer = uffd(['snapshot', '--criu-dir', d2, '--parent', base, '-o', path.join(dir, 'inc-layer.uffd'), '--json'])
    expect(layer.status, layer.stderr).toBe(0)
    expect(layer.json).toMatchObject({comparedPages: 3, storedPages: 2, zeroedPages: 1})
    const chain = openLocalImage(path.join(dir, 'inc-layer.uffd'))
    try {
      // 16 KiB chunks: the VMA's 6 pages are chunks 0 and 1.
      const got = Buffer.alloc(2 * chain.geometry.chunkSize)
      chain.readChunk(0, got)
      chain.readChunk(1, got.subarray(chain.geometry.chunkSize))
      expect(got.subarray(0, 6 * PAGE).equals(Buffer.concat([page(1), page(2), page(7), page(0), page(5), page(8)]))).toBe(true)
    } finally {
      chain.close()
    }
    // Over a snapshot of another dump (other tasks, or memory laid out otherwise): refused.
    const other = writeDump('inc-other', [{pid: 9, vmas: [{start: A + 6 * PAGE, end: A + 12 * PAGE}], entries: [{vaddr: A + 6 * PAGE, nrPages: 1}], pages: page(1)}])
    const otherBase = path.join(dir, 'inc-other.uffd')
    expect(uffd(['snapshot', '--criu-dir', other, '-o', otherBase, '--chunk-size', '16K']).status).toBe(0)
    const refused = uffd(['snapshot', '--criu-dir', d2, '--parent', otherBase, '-o', path.join(dir, 'inc-wrong.uffd'), '--json'])
    expect(refused.json.error.code).toBe('NOT_THIS_DUMP')
    expect(refused.json.error.message).toMatch(/region 0 \(task 9, 0x7f0000000000, 24576 bytes\) is not laid out alike/)
    expect(fs.existsSync(path.join(dir, 'inc-wrong.uffd'))).toBe(false)
  })

  it('refuses pages outside every VMA', () => {
    const d = writeDump('outside', [{pid: 4, vmas: [{start: A, end: A + PAGE}], entries: [{vaddr: A + 8 * PAGE, nrPages: 1}], pages: page(1)}])
    expect(() => criuDirInput(d)).toThrow(/pagemap-4\.img: 4096 bytes of pages, but 0 fall in the private VMAs of mm-4\.img/)
  })

  it('reports truncated images, foreign magics, undecodable messages and missing images by file', () => {
    const d = writeDump('broken', [{pid: 6, vmas: [{start: A, end: A + PAGE}], entries: [{vaddr: A, nrPages: 1}], pages: page(1)}])
    const pagemap = path.join(d, 'pagemap-6.img')
    const good = fs.readFileSync(pagemap)
    fs.writeFileSync(pagemap, good.subarray(0, good.length - 3))
    expect(() => readCriuDump(d)).toThrow(/pagemap-6\.img: truncated: entry 1 needs \d+ bytes, \d+ left/)
    fs.writeFileSync(pagemap, Buffer.concat([image(MAGIC.MM, []), good.subarray(8)]))
    expect(() => readCriuDump(d)).toThrow(/pagemap-6\.img: not the expected CRIU image \(magic 0x57492820, expected 0x56084025\)/)
    // A pagemap_entry without its required vaddr.
    const bad = Buffer.from([0x10, 0x01])
    const size = Buffer.alloc(4)
    size.writeUInt32LE(bad.length)
    fs.writeFileSync(pagemap, Buffer.concat([good.subarray(0, 8 + 4 + 2), size, bad]))
    expect(() => readCriuDump(d)).toThrow(/pagemap-6\.img: entry 1 is not a valid pagemap_entry \(missing required 'vaddr'/)
    fs.rmSync(pagemap)
    expect(() => readCriuDump(d)).toThrow(/pagemap-6\.img: missing: the dump is incomplete/)
    expect(() => readCriuDump(path.join(dir, 'nowhere'))).toThrow(CriuImageError)
    expect(() => readCriuDump(dir)).toThrow(/not a CRIU dump directory \(no pstree\.img\)/)
  })

  it('names file mappings from files.img', () => {
    const d = writeDump('files', [{pid: 8, vmas: [{start: A, end: A + PAGE, prot: 5, flags: 0x02, status: VMA_FILE_PRIVATE | 1, shmid: 3}, {start: A + PAGE, end: A + 2 * PAGE, status: VMA_AREA_HEAP | 0x201}]}])
    fs.writeFileSync(path.join(d, 'files.img'), image(MAGIC.FILES, [['file_entry', {type: 1, id: 3, reg: {id: 3, name: '/usr/lib/libfoo.so'}}]]))
    const input = criuDirInput(d)
    expect(input.regions.map((r) => r.name)).toEqual(['/usr/lib/libfoo.so', '[heap]'])
  })
})

// --- Real dumps -----------------------------------------------------------------------------

function criuSkipReason(): string | undefined {
  if (process.platform !== 'linux' || process.arch !== 'x64') return 'not Linux on x86_64'
  if (!isRoot()) return 'not root (criu dump needs it)'
  const check = spawnSync('criu', ['check'], {encoding: 'utf8'})
  if (check.error) return 'criu is not installed (bash scripts/install-criu.sh installs it)'
  if (check.status !== 0) return `'criu check' fails on this kernel: ${(check.stderr || check.stdout).trim().split('\n').at(-1)} (bash scripts/install-criu.sh installs a CRIU that works)`
  if (!fs.existsSync(MEMORY_PATTERN)) return `${MEMORY_PATTERN} is not built (make -C native)`
  return undefined
}

const criuSkip = criuSkipReason()
if (criuSkip) console.warn(`test/criu.test.ts: real CRIU dumps skipped: ${criuSkip}`)

/** memory_pattern's page contents (native/memory_pattern.c: xorshift64 seeded by seed and page). */
function patternPage(seed: bigint, index: number): Buffer {
  const mask = (1n << 64n) - 1n
  let x = ((seed * 0x9e3779b97f4a7c15n) & mask) ^ ((BigInt(index + 1) * 0xbf58476d1ce4e5b9n) & mask)
  if (x === 0n) x = 1n
  const words = new BigUint64Array(PAGE / 8)
  for (let i = 0; i < words.length; i++) {
    x ^= (x << 13n) & mask
    x ^= x >> 7n
    x ^= (x << 17n) & mask
    words[i] = x
  }
  return Buffer.from(words.buffer)
}

interface PatternInfo {
  address: number
  size: number
  seed: number
  pid: number
}

/** Waits for the first line (memory_pattern's JSON) in a file a detached process writes. */
async function firstLine(file: string, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : ''
    if (text.includes('\n')) return text.slice(0, text.indexOf('\n'))
    if (Date.now() > deadline) throw new Error(`no output in ${file} after ${timeoutMs} ms`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

const started: ChildProcess[] = []
const extraPids: number[] = []
afterAll(() => {
  // criu dump kills what it dumps; this is for a test that failed before that.
  for (const pid of [...started.map((c) => c.pid), ...extraPids]) {
    try {
      if (pid) process.kill(pid, 'SIGKILL')
    } catch {
      // Already gone.
    }
  }
})

/**
 * Starts a command in its own session (criu dumps a whole session's worth of state and insists
 * that the tree's session and process group are its own, or --shell-job), stdio on files.
 */
function startDetached(command: string, args: string[], name: string): ChildProcess {
  const err = fs.openSync(path.join(dir, `${name}.err`), 'w')
  const child = spawn(command, args, {detached: true, stdio: ['ignore', 'ignore', err], cwd: dir})
  fs.closeSync(err)
  started.push(child)
  return child
}

/** criu dump of the tree rooted at pid into a new directory; the tree is killed afterwards. */
function criuDump(pid: number, name: string): string {
  const d = path.join(dir, name)
  fs.mkdirSync(d)
  const r = spawnSync('criu', ['dump', '-t', String(pid), '-D', d, '--shell-job', '-o', 'dump.log'], {encoding: 'utf8', timeout: 60_000})
  if (r.status !== 0) throw new Error(`criu dump failed (${r.status}): ${fs.existsSync(path.join(d, 'dump.log')) ? fs.readFileSync(path.join(d, 'dump.log'), 'utf8').slice(-2000) : r.stderr}`)
  return d
}

/** Converts with the CLI and returns the decoded snapshot and `stats --json`. */
function convertWithCli(dumpDir: string, name: string) {
  const out = path.join(dir, `${name}.uffd`)
  const snap = uffd(['snapshot', '--criu-dir', dumpDir, '-o', out, '--json'])
  expect(snap.status, snap.stderr).toBe(0)
  const stats = uffd(['stats', out, '--json'])
  expect(stats.status, stats.stderr).toBe(0)
  return {...decodeAll(out), stats: stats.json, out}
}

/** Checks the pattern mapping of `info` in the snapshot: bytes, and zero pages in the zero map. */
function expectPattern(reader: SnapshotReader, img: Buffer, info: PatternInfo): void {
  const region = reader.header.regions.find((r) => r.owner === info.pid && r.address <= info.address && info.address + info.size <= r.address + r.size)
  expect(region, `a region of ${info.pid} holding ${info.address.toString(16)}`).toBeDefined()
  const base = region!.imageOffset + (info.address - region!.address)
  const zero = Buffer.alloc(PAGE)
  let wrong = 0
  for (let i = 0; i < info.size / PAGE; i++) {
    const at = base + i * PAGE
    const isZero = i % 7 === 3 || i % 5 === 0
    const want = isZero ? zero : patternPage(BigInt(info.seed), i)
    if (!img.subarray(at, at + PAGE).equals(want) || reader.zeroMap.isZero(at / PAGE) !== isZero) wrong++
  }
  expect(wrong, `pages of pid ${info.pid} that differ from the pattern`).toBe(0)
}

describe.skipIf(criuSkip)('uffd snapshot --criu-dir on real criu dumps', () => {
  it('converts one process: its pattern pages, zero pages as zero-map entries, per-task stats', async () => {
    const out = path.join(dir, 'single.json')
    const child = startDetached('sh', ['-c', `exec ${MEMORY_PATTERN} --mib 4 --seed 11 --verify-loop > ${out}`], 'single')
    const info = JSON.parse(await firstLine(out)) as PatternInfo
    expect(info.pid).toBe(child.pid)
    const d = criuDump(info.pid, 'single-dump')

    const dump = readCriuDump(d)
    expect(dump.tasks).toHaveLength(1)
    expect(dump.tasks[0]).toMatchObject({pid: info.pid, comm: 'memory_pattern', state: TASK_ALIVE})
    // Private anonymous memory is dumped present and marked lazy (what a lazy restore may defer).
    const end = info.address + info.size
    const inPattern = dump.tasks[0].pagemap!.entries.filter((e) => e.vaddr < end && e.vaddr + e.nrPages * PAGE > info.address)
    expect(inPattern.length).toBeGreaterThan(0)
    for (const e of inPattern) expect(e.flags).toBe(PE_PRESENT | PE_LAZY)
    // Never-touched pages are not dumped; pages written with zeros are (CRIU does not look inside).
    const pages = info.size / PAGE
    const untouched = Array.from({length: pages}, (_, i) => i).filter((i) => i % 7 === 3).length
    const zeroFilled = Array.from({length: pages}, (_, i) => i).filter((i) => i % 5 === 0 && i % 7 !== 3).length
    const dumpedBytes = inPattern.reduce((sum, e) => sum + Math.min(end, e.vaddr + e.nrPages * PAGE) - Math.max(info.address, e.vaddr), 0)
    expect(dumpedBytes).toBe((pages - untouched) * PAGE)

    const {reader, image: img, stats} = convertWithCli(d, 'single')
    expectPattern(reader, img, info)
    const pagesImage = fs.statSync(path.join(d, 'pages-1.img')).size
    expect(stats.tasks).toHaveLength(1)
    const task = stats.tasks[0]
    expect(task).toMatchObject({pid: info.pid, comm: 'memory_pattern', rawPageBytes: pagesImage})
    expect(task.bytes).toBe(reader.header.regions.reduce((s, r) => s + r.size, 0))
    // Everything dumped, less the pattern's zero-filled pages (and the few other zero pages dumped).
    expect(task.nonZeroBytes).toBeLessThanOrEqual(pagesImage - zeroFilled * PAGE)
    expect(task.nonZeroBytes).toBeGreaterThan(pagesImage - zeroFilled * PAGE - 64 * PAGE)
    expect(stats.criu).toEqual({rawPageBytes: pagesImage, snapshotBytes: stats.fileSize, ratio: pagesImage / stats.fileSize})
    const text = uffd(['stats', path.join(dir, 'single.uffd')])
    expect(text.stdout).toMatch(new RegExp(`CRIU pages .* in the dump's page images`))
    expect(text.stdout).toMatch(new RegExp(`${info.pid} .* memory_pattern`))
    reader.close()
  })

  it('converts a process tree (fork): every task, a zombie included, with its own regions', async () => {
    const a = path.join(dir, 'tree-a.json')
    const b = path.join(dir, 'tree-b.json')
    // sh forks two memory_patterns and a sleep that never reaps its child: a zombie.
    const script = `${MEMORY_PATTERN} --mib 2 --seed 1 --verify-loop > ${a} & ${MEMORY_PATTERN} --mib 3 --seed 2 --verify-loop > ${b} & sh -c 'true & exec sleep 600' & wait`
    const root = startDetached('sh', ['-c', script], 'tree')
    const infoA = JSON.parse(await firstLine(a)) as PatternInfo
    const infoB = JSON.parse(await firstLine(b)) as PatternInfo
    // The zombie appears once `true` has exited.
    const deadline = Date.now() + 10_000
    while (readTree(root.pid!).length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    const d = criuDump(root.pid!, 'tree-dump')

    const dump = readCriuDump(d)
    expect(dump.tasks).toHaveLength(5)
    expect(dump.tasks[0]).toMatchObject({pid: root.pid, ppid: 0, comm: 'sh'})
    const zombie = dump.tasks.find((t) => t.state === TASK_DEAD)
    expect(zombie).toMatchObject({vmas: [], pagemap: null})

    const {reader, image: img, stats} = convertWithCli(d, 'tree')
    expectPattern(reader, img, infoA)
    expectPattern(reader, img, infoB)
    const owners = new Set(reader.header.regions.map((r) => r.owner))
    expect([...owners].sort()).toEqual(dump.tasks.filter((t) => t !== zombie).map((t) => t.pid).sort())
    expect(stats.tasks.map((t: {pid: number}) => t.pid)).toEqual(dump.tasks.map((t) => t.pid))
    const sizes = new Map<number, {bytes: number}>(stats.tasks.map((t: {pid: number; bytes: number}) => [t.pid, t]))
    expect(sizes.get(infoB.pid)!.bytes).toBeGreaterThan(sizes.get(infoA.pid)!.bytes)
    expect(sizes.get(zombie!.pid)).toMatchObject({regions: 0, bytes: 0, nonZeroBytes: 0, rawPageBytes: 0})
    const raw = fs.readdirSync(d).filter((f) => /^pages-\d+\.img$/.test(f)).reduce((s, f) => s + fs.statSync(path.join(d, f)).size, 0)
    expect(stats.criu.rawPageBytes).toBe(raw)
    expect(stats.tasks.reduce((s: number, t: {rawPageBytes: number}) => s + t.rawPageBytes, 0)).toBe(raw)
    reader.close()
  })

  const python = spawnSync('python3', ['-c', 'import mmap, ctypes'], {encoding: 'utf8'}).status === 0
  it.skipIf(!python)('gives shared anonymous memory (a memfd to CRIU 4.1) to every task that maps it', async () => {
    const out = path.join(dir, 'shared.json')
    // A 1 MiB MAP_SHARED|MAP_ANONYMOUS mapping, every third page untouched, then fork.
    const script = [
      'import ctypes, mmap, os, sys, time',
      'm = mmap.mmap(-1, 1 << 20)',
      'for p in range(256):',
      '    if p % 3 != 2: m[p * 4096:(p + 1) * 4096] = bytes([p % 251 + 1]) * 4096',
      'addr = ctypes.addressof(ctypes.c_char.from_buffer(m))',
      'child = os.fork()',
      'if child:',
      `    open(${JSON.stringify(out)}, "w").write(f'{{"address":{addr},"pid":{os.getpid()},"child":{child}}}\\n')`,
      'while True: time.sleep(1)',
    ].join('\n')
    const parent = startDetached('python3', ['-c', script], 'shared')
    const info = JSON.parse(await firstLine(out)) as {address: number; pid: number; child: number}
    extraPids.push(info.child)
    const d = criuDump(parent.pid!, 'shared-dump')

    const {reader, image: img} = convertWithCli(d, 'shared')
    for (const pid of [info.pid, info.child]) {
      const region = reader.header.regions.find((r) => r.owner === pid && r.address === info.address)
      expect(region, `the shared mapping in ${pid}`).toBeDefined()
      expect(region!.size).toBe(1 << 20)
      for (let p = 0; p < 256; p++) {
        const at = region!.imageOffset + p * PAGE
        expect(img.subarray(at, at + PAGE).equals(p % 3 === 2 ? Buffer.alloc(PAGE) : page((p % 251) + 1)), `pid ${pid} page ${p}`).toBe(true)
      }
    }
    reader.close()
  })
})

/** The pids of a process and its descendants, from /proc. */
function readTree(rootPid: number): number[] {
  const children = new Map<number, number[]>()
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8')
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
      children.set(ppid, [...(children.get(ppid) ?? []), Number(name)])
    } catch {
      // Exited meanwhile.
    }
  }
  const out: number[] = []
  const walk = (pid: number): void => {
    out.push(pid)
    for (const c of children.get(pid) ?? []) walk(c)
  }
  walk(rootPid)
  return out
}

// --- A real dump checked in (fixtures/criu-memory-pattern: see its README) -------------------

describe('CRIU image parsing (a real CRIU dump checked in)', () => {
  const fixture = path.join(path.dirname(new URL(import.meta.url).pathname), '..', 'fixtures', 'criu-memory-pattern')
  const info = JSON.parse(fs.readFileSync(path.join(fixture, 'info.json'), 'utf8')) as PatternInfo
  let d: string
  beforeAll(() => {
    d = path.join(dir, 'fixture-dump')
    fs.mkdirSync(d)
    const untar = spawnSync('tar', ['-xzf', path.join(fixture, 'dump.tar.gz'), '-C', d], {encoding: 'utf8'})
    if (untar.status !== 0) throw new Error(`tar failed: ${untar.stderr}`)
  })

  it('reads the task, its VMAs and its pagemap as CRIU 4.1.1 wrote them', () => {
    const dump = readCriuDump(d)
    expect(dump.tasks).toHaveLength(1)
    const [task] = dump.tasks
    expect(task).toMatchObject({pid: info.pid, comm: 'memory_pattern', state: TASK_ALIVE, threads: [info.pid]})
    // The pattern is one private anonymous mapping of its own, which a lazy restore may defer.
    // (The kernel may have merged it with a neighbour of the same kind.)
    const vma = task.vmas.find((v) => v.start <= info.address && info.address + info.size <= v.end)
    expect(vma).toMatchObject({prot: 3})
    expect(isLazyVma(vma!)).toBe(true)
    // The executable is mapped from a file named in files.img.
    expect([...dump.files.values()].some((f) => f.name.endsWith('/memory_pattern'))).toBe(true)
    const pagemap = task.pagemap!
    // Every present page is in pages-1.img, back to back in entry order: the parser's count of
    // present pages must be what CRIU wrote there.
    expect(pagemap.presentPages * PAGE).toBe(fs.statSync(path.join(d, 'pages-1.img')).size)
    const end = info.address + info.size
    const inPattern = pagemap.entries.filter((e) => e.vaddr < end && e.vaddr + e.nrPages * PAGE > info.address)
    for (const e of inPattern) expect(e.flags).toBe(PE_PRESENT | PE_LAZY)
    const pages = info.size / PAGE
    const untouched = Array.from({length: pages}, (_, i) => i).filter((i) => i % 7 === 3).length
    const dumped = inPattern.reduce((sum, e) => sum + Math.min(end, e.vaddr + e.nrPages * PAGE) - Math.max(info.address, e.vaddr), 0)
    expect(dumped).toBe((pages - untouched) * PAGE)
  })

  it('converts to a snapshot holding the pattern byte for byte, zero pages in the zero map', async () => {
    const {reader, image: img} = await convert(d, 'fixture')
    expectPattern(reader, img, info)
    reader.close()
  })
})
