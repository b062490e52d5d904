// uffd resume --criu-dir as the lazy-pages daemon of a real `criu restore --lazy-pages`: a process
// with a known memory pattern is dumped, converted with `uffd snapshot --criu-dir`, restored
// lazily and must keep verifying its memory; a process that forks, mremaps, munmaps and discards
// lazy memory right after the restore must see exactly its memory. Needs root, a working criu
// (bash scripts/install-criu.sh) and the native programs (make -C native).
import {type ChildProcess, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {SnapshotReader} from '../src/snapshot/reader.js'
import {cliEnv, isRoot, NATIVE, ROOT, uffd} from './helpers/cli.js'

const MEMORY_PATTERN = path.join(NATIVE, 'memory_pattern')
const LAZY_MM_OPS = path.join(NATIVE, 'lazy_mm_ops')

function skipReason(): string | undefined {
  if (process.platform !== 'linux' || process.arch !== 'x64') return 'not Linux on x86_64'
  if (!isRoot()) return 'not root (criu needs it)'
  const check = spawnSync('criu', ['check', '--feature', 'uffd-noncoop'], {encoding: 'utf8'})
  if (check.error) return 'criu is not installed (bash scripts/install-criu.sh installs it)'
  if (check.status !== 0) return `criu has no non-cooperative userfaultfd here: ${(check.stderr || check.stdout).trim().split('\n').at(-1)}`
  for (const program of [MEMORY_PATTERN, LAZY_MM_OPS]) if (!fs.existsSync(program)) return `${program} is not built (make -C native)`
  return undefined
}

const skip = skipReason()
if (skip) console.warn(`test/criu-lazy-e2e.test.ts skipped: ${skip}`)

let dir: string
const pids: number[] = []
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uffd-criu-lazy-'))
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

async function waitFor<T>(what: string, probe: () => T | undefined, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = probe()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

const lines = (file: string): string[] => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean) : [])

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return !fs.readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ')
  } catch {
    return false
  }
}

/**
 * Starts `command` in its own session with stdout on a file, waits for its first JSON line, dumps
 * it with criu (which kills it), waits until the pid is free, and converts the dump.
 */
async function dumpAndConvert(name: string, command: string): Promise<{out: string; dump: string; snapshot: string; pid: number}> {
  const out = path.join(dir, `${name}.out`)
  // criu wants the tree's session to be its own (or --shell-job): a detached sh, exec'd.
  spawn('sh', ['-c', `exec ${command} > ${out} 2> ${out}.err`], {detached: true, stdio: 'ignore', cwd: dir}).unref()
  const info = JSON.parse(await waitFor('the first line', () => lines(out)[0])) as {pid: number}
  pids.push(info.pid)
  const dump = path.join(dir, `${name}-dump`)
  fs.mkdirSync(dump)
  const r = spawnSync('criu', ['dump', '-t', String(info.pid), '-D', dump, '--shell-job', '-o', 'dump.log'], {encoding: 'utf8', timeout: 120_000})
  expect(r.status, fs.existsSync(path.join(dump, 'dump.log')) ? fs.readFileSync(path.join(dump, 'dump.log'), 'utf8').slice(-2000) : r.stderr).toBe(0)
  await waitFor('the dumped pid to be free', () => (alive(info.pid) ? undefined : true))
  const snapshot = path.join(dir, `${name}.uffd`)
  const snap = uffd(['snapshot', '--criu-dir', dump, '-o', snapshot])
  expect(snap.status, snap.stderr).toBe(0)
  return {out, dump, snapshot, pid: info.pid}
}

/** Starts the handler, restores with criu (detached), and returns the handler's exit. */
async function lazyRestore(dump: string, snapshot: string, beforeRestore: (handlerLog: () => string) => void | Promise<void> = () => {}, restoreMustSucceed = true) {
  const ready = path.join(dir, `${path.basename(dump)}.ready`)
  const stats = path.join(dir, `${path.basename(dump)}.stats.json`)
  const handler: ChildProcess = spawn(process.execPath, [path.join(ROOT, 'bin/run.js'), 'resume', snapshot, '--criu-dir', dump, '--ready-file', ready, '--stats-file', stats], {stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv()})
  let stderr = ''
  handler.stderr!.on('data', (d) => (stderr += d))
  const exited = new Promise<number | null>((resolve) => handler.on('exit', (code) => resolve(code)))
  await waitFor('the handler to listen', () => (fs.existsSync(ready) ? true : undefined))
  await beforeRestore(() => stderr)
  const restore = spawnSync('criu', ['restore', '-D', dump, '--lazy-pages', '--shell-job', '-d', '-o', 'restore.log'], {encoding: 'utf8', timeout: 120_000})
  if (restoreMustSucceed) expect(restore.status, fs.readFileSync(path.join(dump, 'restore.log'), 'utf8').slice(-2000)).toBe(0)
  const code = await Promise.race([exited, sleep(120_000).then(() => 'timeout' as const)])
  // A failed run writes no statistics.
  const restoreLog = fs.existsSync(path.join(dump, 'restore.log')) ? fs.readFileSync(path.join(dump, 'restore.log'), 'utf8').slice(-3000) : ''
  return {code, stderr, restoreLog, stats: fs.existsSync(stats) ? JSON.parse(fs.readFileSync(stats, 'utf8')) : undefined}
}

describe.skipIf(skip)('uffd resume --criu-dir with criu restore --lazy-pages', () => {
  it('restores a 256 MiB process lazily; it keeps verifying its memory after the handler is done', async () => {
    const {out, dump, snapshot, pid} = await dumpAndConvert('pattern', `${MEMORY_PATTERN} --mib 256 --seed 21 --verify-loop`)
    const before = lines(out).length
    const {code, stderr, stats} = await lazyRestore(dump, snapshot)
    expect(code, stderr).toBe(0)
    expect(stderr).toMatch(new RegExp(`client 1 \\(pid ${pid}\\)`))
    expect(stderr).toMatch(/restore finished/)
    expect(stderr).toMatch(/client 1: all memory present/)
    // The pattern's pages went through the handler: data copied, zero pages mapped, and faults
    // served before the background fill got there.
    expect(stats.pages.copied * 4096).toBeGreaterThan(150 << 20)
    expect(stats.pages.zeroed).toBeGreaterThan(0)
    expect(stats.faults.total).toBeGreaterThan(0)
    // Two more full verifications after the handler exited (uffd closed: every page is present).
    await waitFor('two more verifications', () => (lines(out).length >= before + 3 ? true : undefined))
    expect(lines(out).filter((l) => l.includes('"verified":false'))).toEqual([])
    expect(alive(pid)).toBe(true)
    process.kill(pid, 'SIGKILL')
  }, 240_000)

  it('follows fork, mremap, munmap and MADV_DONTNEED of lazy memory right after the restore', async () => {
    const go = path.join(dir, 'go')
    const {out, dump, snapshot, pid} = await dumpAndConvert('ops', `${LAZY_MM_OPS} --mib 256 --seed 9 --go ${go}`)
    // The process acts the moment it runs again, while most of its memory is still lazy.
    const {code, stderr, stats} = await lazyRestore(dump, snapshot, () => fs.writeFileSync(go, ''))
    expect(code, stderr).toBe(0)
    await waitFor('the process to finish', () => (alive(pid) ? undefined : true))
    expect(lines(out).at(-1), fs.readFileSync(`${out}.err`, 'utf8')).toBe('{"ok":true}')
    expect(stderr).toMatch(/client 1 forked: its child is client \d+/)
    expect(stats.events.fork).toBe(1)
    expect(stats.events.remap).toBeGreaterThanOrEqual(2)
    expect(stats.events.unmap).toBeGreaterThanOrEqual(1)
  }, 240_000)

  it('connections made before criu restore (silent, not the protocol, another user) are turned away; the restore is served', async () => {
    const {out, dump, snapshot, pid} = await dumpAndConvert('guarded', `${MEMORY_PATTERN} --mib 16 --seed 4 --verify-loop`)
    const before = lines(out).length
    const socketPath = path.join(dump, 'lazy-pages.socket')
    const held: net.Socket[] = []
    let stranger: ChildProcess | undefined
    try {
      const {code, stderr} = await lazyRestore(dump, snapshot, async (handlerLog) => {
        const connect = (): Promise<net.Socket> =>
          new Promise((resolve, reject) => {
            const socket = net.createConnection({path: socketPath}, () => resolve(socket))
            socket.once('error', reject)
            held.push(socket)
          })
        // First, one that connects and says nothing; then one that speaks something else.
        await connect()
        const other = await connect()
        other.write('not the lazy-pages protocol')
        // Another user, let in by the socket's mode: its uid alone rules it out.
        const modes = [dir, dump].map((p) => [p, fs.statSync(p).mode & 0o7777] as const)
        for (const [p] of modes) fs.chmodSync(p, 0o711)
        fs.chmodSync(socketPath, 0o666)
        stranger = spawn('python3', ['-c', 'import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.connect("lazy-pages.socket")\nprint("connected", flush=True)\ntime.sleep(60)'], {cwd: dump, uid: 65534, gid: 65534, stdio: ['ignore', 'pipe', 'inherit']})
        await waitFor('the other user to connect', () => (/rejected a connection on the lazy-pages socket: a connection from uid 65534/.test(handlerLog()) ? true : undefined), 10_000)
        // criu restore checks that the directories it restores (the process's cwd) kept their modes.
        for (const [p, mode] of modes) fs.chmodSync(p, mode)
        await waitFor('the other protocol to be turned away', () => (/rejected a connection on the lazy-pages socket: not the lazy-pages protocol/.test(handlerLog()) ? true : undefined), 10_000)
      })
      expect(code, stderr).toBe(0)
      expect(stderr).toMatch(new RegExp(`client 1 \\(pid ${pid}\\)`))
      expect(stderr).toMatch(/client 1: all memory present/)
      await waitFor('two more verifications', () => (lines(out).length >= before + 3 ? true : undefined))
      expect(lines(out).filter((l) => l.includes('"verified":false'))).toEqual([])
      expect(alive(pid)).toBe(true)
    } finally {
      for (const socket of held) socket.destroy()
      stranger?.kill('SIGKILL')
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // Gone already.
      }
    }
  }, 240_000)

  it('a corrupt chunk kills the whole restored tree (two tasks) through pidfds, and exits 1', async () => {
    const a = path.join(dir, 'tree-a.out')
    // The root execs memory_pattern after forking another: two restored tasks.
    const {out, dump, snapshot, pid} = await dumpAndConvert('tree', `sh -c '${MEMORY_PATTERN} --mib 8 --seed 5 --verify-loop > ${a} & exec ${MEMORY_PATTERN} --mib 8 --seed 6 --verify-loop'`)
    const child = (JSON.parse(lines(a)[0]) as {pid: number}).pid
    pids.push(child)
    // criu dump killed both; the child's pid must be free too before the restore takes it again.
    // Orphaned, it is a zombie until init reaps it, which takes a moment here: wait for /proc to
    // forget it, not just for it to stop running.
    await waitFor('the dumped child pid to be free', () => (fs.existsSync(`/proc/${child}`) ? undefined : true), 60_000)
    const printed = lines(out).length
    // One byte flipped in the middle of every stored chunk: the first lazy fault of either task fails its checksum.
    const reader = SnapshotReader.open(snapshot)
    const flips = [...reader.index].map((e, i) => ({e, i})).filter(({e}) => e.storedLength > 64).map(({i}) => {
      const entry = reader.entry(i)
      return entry.dataOffset + Math.floor(entry.storedLength / 2)
    })
    reader.close()
    expect(flips.length).toBeGreaterThan(0)
    const fd = fs.openSync(snapshot, 'r+')
    for (const at of flips) {
      const byte = Buffer.alloc(1)
      fs.readSync(fd, byte, 0, 1, at)
      byte[0] ^= 0x5a
      fs.writeSync(fd, byte, 0, 1, at)
    }
    fs.closeSync(fd)
    // Tasks fault while criu still restores: killed then, they fail the restore too.
    const {code, stderr, restoreLog} = await lazyRestore(dump, snapshot, () => {}, false)
    expect(code, stderr).toBe(1)
    expect(stderr, restoreLog).toMatch(/CRC|checksum|CORRUPT|corrupt/)
    const killed = /killing the restored tasks \(([\d, ]+)\)/.exec(stderr)
    expect(killed, stderr).not.toBeNull()
    expect(killed![1].split(', ').map(Number).sort()).toEqual([pid, child].sort())
    await waitFor('both tasks to be gone', () => (!alive(pid) && !alive(child) ? true : undefined), 5_000)
    // Killed before a page of the corrupt chunks reached it: it never verified again.
    expect(lines(out).slice(printed)).toEqual([])
  }, 240_000)

  it('kills nothing and fails when criu restore hangs up before the restore finished', async () => {
    const {dump, snapshot} = await dumpAndConvert('broken', `${MEMORY_PATTERN} --mib 4 --seed 3 --verify-loop`)
    // The restore fails (the output file the process had open changed size), after connecting.
    fs.appendFileSync(path.join(dir, 'broken.out'), 'x')
    const ready = path.join(dir, 'broken.ready')
    const handler = spawn(process.execPath, [path.join(ROOT, 'bin/run.js'), 'resume', snapshot, '--criu-dir', dump, '--ready-file', ready], {stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv()})
    let stderr = ''
    handler.stderr.on('data', (d) => (stderr += d))
    const exited = new Promise<number | null>((resolve) => handler.on('exit', (c) => resolve(c)))
    await waitFor('the handler to listen', () => (fs.existsSync(ready) ? true : undefined))
    const restore = spawnSync('criu', ['restore', '-D', dump, '--lazy-pages', '--shell-job', '-d', '-o', 'restore.log'], {encoding: 'utf8', timeout: 60_000})
    expect(restore.status).not.toBe(0)
    expect(await exited).toBe(1)
    expect(stderr).toMatch(/criu restore closed the lazy-pages socket before the restore finished/)
  }, 120_000)
})
