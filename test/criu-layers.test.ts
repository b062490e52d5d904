// CRIU dumps as layers, with real criu: a process (memory_pattern --signals) is dumped, changes a
// few pages, and is dumped again. `uffd snapshot --criu-dir DUMP2 --parent SNAP1` stores the
// changes; an incremental DUMP2 (pagemap entries in the parent dump, a `parent` link to DUMP1) is
// imported as a layer over SNAP1, and a real `criu restore --lazy-pages` of the process, served
// by `uffd resume` from that layer, gives it back every byte (it checks them all itself).
// Needs root, a working criu (bash scripts/install-criu.sh) and the native programs.
import {type ChildProcess, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {CRIU_PAGE_SIZE as PAGE, MAGIC, PE_PARENT, readCriuDump, VMA_AREA_AIORING, VMA_AREA_VDSO} from '../src/criu/images.js'
import {CRIU_SCHEMA} from '../src/criu/schema.js'
import {openLocalImage} from './helpers/chain.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {cliEnv, isRoot, NATIVE, ROOT, uffd} from './helpers/cli.js'

const MEMORY_PATTERN = path.join(NATIVE, 'memory_pattern')

function skipReason(): string | undefined {
  if (process.platform !== 'linux' || process.arch !== 'x64') return 'not Linux on x86_64'
  if (!isRoot()) return 'not root (criu needs it)'
  const check = spawnSync('criu', ['check', '--feature', 'uffd-noncoop'], {encoding: 'utf8'})
  if (check.error) return 'criu is not installed (bash scripts/install-criu.sh installs it)'
  if (check.status !== 0) return `criu has no non-cooperative userfaultfd here: ${(check.stderr || check.stdout).trim().split('\n').at(-1)}`
  if (!fs.existsSync(MEMORY_PATTERN)) return `${MEMORY_PATTERN} is not built (make -C native)`
  return undefined
}
const skip = skipReason()
if (skip) console.warn(`test/criu-layers.test.ts skipped: ${skip}`)

let dir: string
const pids: number[] = []
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-criu-layers-'))
})
afterAll(() => {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL')
    } catch {
      // Gone already.
    }
  }
  fs.rmSync(dir, {recursive: true, force: true})
})

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))
const lines = (file: string): string[] => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean) : [])

async function waitFor<T>(what: string, probe: () => T | undefined, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = probe()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return !fs.readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ')
  } catch {
    return false
  }
}

function criu(args: string[], imagesDir: string, log: string): void {
  const r = spawnSync('criu', [...args, '-D', imagesDir, '--shell-job', '-o', log], {encoding: 'utf8', timeout: 120_000})
  const logFile = path.join(imagesDir, log)
  expect(r.status, fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').slice(-2000) : r.stderr).toBe(0)
}

function ok(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

/** Every chunk of the image `a` resolves to equals `b`'s; returns how many differ from `c`'s. */
function sameImage(a: string, b: string, c: string): number {
  const ra = openLocalImage(a)
  const rb = SnapshotReader.open(b)
  const rc = SnapshotReader.open(c)
  try {
    expect(ra.geometry.logicalSize).toBe(rb.geometry.logicalSize)
    const x = Buffer.alloc(ra.geometry.chunkSize)
    const y = Buffer.alloc(ra.geometry.chunkSize)
    let differ = 0
    for (let k = 0; k < ra.geometry.chunkCount; k++) {
      ra.readChunk(k, x)
      rb.readChunk(k, y)
      expect(x.equals(y), `chunk ${k}`).toBe(true)
      rc.readChunk(k, y)
      if (!x.equals(y)) differ++
    }
    return differ
  } finally {
    ra.close()
    rb.close()
    rc.close()
  }
}

/** A CRIU protobuf image: the common magic, the image magic, then u32-length-prefixed messages. */
function image(magic: number, messages: [string, object][]): Buffer {
  const head = Buffer.alloc(8)
  head.writeUInt32LE(MAGIC.IMG_COMMON, 0)
  head.writeUInt32LE(magic, 4)
  const parts = [head]
  for (const [type, fields] of messages) {
    const T = CRIU_SCHEMA.lookupType(type)
    const body = T.encode(T.fromObject(fields)).finish()
    const size = Buffer.alloc(4)
    size.writeUInt32LE(body.length)
    parts.push(size, Buffer.from(body))
  }
  return Buffer.concat(parts)
}

/**
 * criu writes incremental dumps only with memory tracking (soft-dirty bits), which this machine's
 * kernel lacks (criu check --feature mem_dirty_track: "Dirty tracking is OFF"), so the test makes
 * one from two real full dumps as criu would have made it.
 *
 * What `criu dump --prev-images-dir ../PARENT --track-mem` writes, made from two full dumps of the
 * same process: a copy of `full` whose pagemap marks PE_PARENT every run of pages that holds the
 * same bytes in `parent`'s dump (as soft-dirty tracking would, had they not been written), keeps
 * the others' data, and links `parent` to the earlier images. Returns the pages left in the parent.
 */
function incrementalOf(full: string, parent: string, out: string, pid: number): number {
  fs.cpSync(full, out, {recursive: true})
  const older = readCriuDump(parent).tasks.find((t) => t.pid === pid)!.pagemap!
  const task = readCriuDump(full).tasks.find((t) => t.pid === pid)!
  const newer = task.pagemap!
  // criu dumps the vDSO and AIO rings whole every time (should_dump_entire_vma in criu/mem.c).
  const always = task.vmas.filter((v) => v.status & (VMA_AREA_VDSO | VMA_AREA_AIORING))
  const olderFd = fs.openSync(older.pagesFile, 'r')
  const newerBytes = fs.readFileSync(newer.pagesFile)
  const pageOf = (vaddr: number): Buffer | undefined => {
    const e = older.entries.find((x) => vaddr >= x.vaddr && vaddr < x.vaddr + x.nrPages * PAGE)
    if (!e) return undefined
    const b = Buffer.alloc(PAGE)
    fs.readSync(olderFd, b, 0, PAGE, e.pagesOffset + (vaddr - e.vaddr))
    return b
  }
  const entries: [string, object][] = []
  const data: Buffer[] = []
  let inParent = 0
  for (const e of newer.entries) {
    for (let i = 0; i < e.nrPages; ) {
      const at = (k: number): Buffer => newerBytes.subarray(e.pagesOffset + k * PAGE, e.pagesOffset + (k + 1) * PAGE)
      const same = (k: number): boolean => {
        const vaddr = e.vaddr + k * PAGE
        return !always.some((v) => vaddr >= v.start && vaddr < v.end) && (pageOf(vaddr)?.equals(at(k)) ?? false)
      }
      const kind = same(i)
      let j = i + 1
      while (j < e.nrPages && same(j) === kind) j++
      entries.push(['pagemap_entry', {vaddr: e.vaddr + i * PAGE, compat_nr_pages: 0, nr_pages: j - i, flags: kind ? PE_PARENT : e.flags}])
      if (kind) inParent += j - i
      else for (let k = i; k < j; k++) data.push(at(k))
      i = j
    }
  }
  fs.closeSync(olderFd)
  const pagesId = Number(/pages-(\d+)\.img$/.exec(newer.pagesFile)![1])
  fs.writeFileSync(path.join(out, `pagemap-${pid}.img`), image(MAGIC.PAGEMAP, [['pagemap_head', {pages_id: pagesId}], ...entries]))
  fs.writeFileSync(path.join(out, `pages-${pagesId}.img`), Buffer.concat(data))
  fs.symlinkSync(`../${path.basename(parent)}`, path.join(out, 'parent'))
  return inParent
}

/** Starts the handler on `snapshot`, restores `dump` lazily with criu, and waits for the handler to finish. */
async function lazyRestore(dump: string, snapshot: string): Promise<{code: number | null; stderr: string}> {
  const ready = path.join(dir, `${path.basename(dump)}.ready`)
  const handler: ChildProcess = spawn(process.execPath, [path.join(ROOT, 'bin/run.js'), 'resume', snapshot, '--criu-dir', dump, '--ready-file', ready], {stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv()})
  let stderr = ''
  handler.stderr!.on('data', (d) => (stderr += d))
  const exited = new Promise<number | null>((resolve) => handler.on('exit', (code) => resolve(code)))
  await waitFor('the handler to listen', () => (fs.existsSync(ready) ? true : undefined))
  criu(['restore', '--lazy-pages', '-d'], dump, 'restore.log')
  const code = await Promise.race([exited, sleep(120_000).then(() => 'timeout' as const)])
  return {code: code === 'timeout' ? null : code, stderr}
}

/** Restores `dump` lazily from `snapshot`, then has the process check every page of its memory against its pattern. */
async function restoreAndVerify(dump: string, snapshot: string, pid: number, out: string): Promise<void> {
  const {code, stderr} = await lazyRestore(dump, snapshot)
  expect(code, stderr).toBe(0)
  expect(stderr).toMatch(/client 1: all memory present/)
  const before = lines(out).length
  process.kill(pid, 'SIGUSR2')
  await waitFor('two verifications', () => (lines(out).length >= before + 2 ? true : undefined))
  expect(lines(out).slice(before).filter((l) => !/^\{"verified":\d+\}$/.test(l))).toEqual([])
  expect(alive(pid)).toBe(true)
  process.kill(pid, 'SIGKILL')
  await waitFor('the restored pid to be gone', () => (alive(pid) ? undefined : true))
}

describe.skipIf(skip)('CRIU dumps as layers (real criu)', () => {
  let out: string
  let pid: number
  let changed: number
  const at = (name: string): string => path.join(dir, name)

  beforeAll(async () => {
    out = at('pattern.out')
    // criu wants the tree's session to be its own: a detached sh, exec'd.
    spawn('sh', ['-c', `exec ${MEMORY_PATTERN} --mib 64 --seed 13 --signals > ${out} 2> ${out}.err`], {detached: true, stdio: 'ignore', cwd: dir}).unref()
    pid = (JSON.parse(await waitFor('the first line', () => lines(out)[0])) as {pid: number}).pid
    pids.push(pid)
    fs.mkdirSync(at('d1'))
    criu(['dump', '-t', String(pid), '--leave-running'], at('d1'), 'dump.log')
    process.kill(pid, 'SIGUSR1')
    changed = (JSON.parse(await waitFor('the change', () => lines(out)[1])) as {changed: number}).changed
    fs.mkdirSync(at('d2'))
    criu(['dump', '-t', String(pid)], at('d2'), 'dump.log')
    await waitFor('the dumped pid to be free', () => (alive(pid) ? undefined : true))
    ok(['snapshot', '--criu-dir', at('d1'), '-o', at('s1.uffd')])
    ok(['snapshot', '--criu-dir', at('d2'), '-o', at('s2-full.uffd')])
  }, 240_000)

  it('snapshot --criu-dir --parent: a full dump over the snapshot of an earlier one stores the changed pages', () => {
    const layer = ok(['snapshot', '--criu-dir', at('d2'), '--parent', at('s1.uffd'), '-o', at('s2.uffd')])
    expect(layer.changedPages).toBeGreaterThanOrEqual(changed)
    expect(layer.changedPages).toBeLessThan(changed + 64)
    expect(layer.fileSize).toBeLessThan(fs.statSync(at('s1.uffd')).size / 10)
    expect(sameImage(at('s2.uffd'), at('s2-full.uffd'), at('s1.uffd'))).toBeGreaterThan(0)
  })

  it('an incremental dump is imported as a layer over its parent dump\'s snapshot; criu restore --lazy-pages served from that layer gets every byte', async () => {
    const inParent = incrementalOf(at('d2'), at('d1'), at('d2-inc'), pid)
    expect(inParent).toBeGreaterThan((64 << 20) / PAGE / 2)
    // Alone it is not the whole memory.
    const whole = uffd(['snapshot', '--criu-dir', at('d2-inc'), '-o', at('x.uffd'), '--json'])
    expect(whole.json.error.code).toBe('CRIU_IMAGE')
    const layer = ok(['snapshot', '--criu-dir', at('d2-inc'), '--parent', at('s1.uffd'), '-o', at('s2-inc.uffd')])
    // Pages in the parent dump are not compared: the others are (dumped, or zero now).
    expect(layer.comparedPages).toBe(layer.pageCount - inParent)
    expect(layer.storedPages).toBeGreaterThanOrEqual(changed)
    expect(sameImage(at('s2-inc.uffd'), at('s2-full.uffd'), at('s1.uffd'))).toBeGreaterThan(0)

    // criu restores what it keeps for itself (the vDSO, file mappings, the stack) from the full
    // dump's images; every lazy page comes from the layer, whose unchanged pages are the parent's.
    await restoreAndVerify(at('d2'), at('s2-inc.uffd'), pid, out)
  }, 240_000)
})
