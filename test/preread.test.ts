// `uffd resume --preread`: the snapshot read into the page cache in the background at start.
// Residency is read with util-linux's fincore (mincore(2)) after the test file alone was evicted
// (posix_fadvise DONTNEED, by python3), so other tests' page cache is left alone.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {cgroupMemory, memoryAvailable, prereadFiles} from '../src/resume/main/preread.js'
import {prereadPaced} from '../src/sys/index.js'
import {prereadPacedNative} from '../src/sys/libc.js'
import {uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

let dir: string
let snapshot: string

const hasFincore = spawnSync('sh', ['-c', 'command -v fincore']).status === 0
if (!hasFincore) console.warn('preread: residency checks skipped: fincore (util-linux) is not installed')

/** Drops the file's pages from the page cache (only clean pages go: write it and fsync first). */
function evict(file: string): void {
  const r = spawnSync('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)', file], {encoding: 'utf8'})
  expect(r.status, r.stderr).toBe(0)
}

/** Bytes of the file in the page cache. */
function resident(file: string): number {
  const r = spawnSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], {encoding: 'utf8'})
  expect(r.status, r.stderr).toBe(0)
  return Number(r.stdout.trim())
}

beforeAll(() => {
  dir = tempDir('uffd-preread-')
  const image = path.join(dir, 'mem.raw')
  fs.writeFileSync(image, makeImage('mixed', 32 << 20, 3))
  snapshot = path.join(dir, 'mem.uffd')
  const made = uffd(['snapshot', '--mem-file', image, '-o', snapshot])
  expect(made.status, made.stderr).toBe(0)
})

afterAll(() => {
  fs.rmSync(dir, {recursive: true, force: true})
})

describe('reading the snapshot ahead into the page cache', () => {
  it.skipIf(!hasFincore)('resume reads the whole file in at start by default, and not with --preread off', () => {
    const size = fs.statSync(snapshot).size
    evict(snapshot)
    expect(resident(snapshot)).toBeLessThan(size / 4)
    // No client comes: the handler gives up after a second, long after reading ahead.
    const on = uffd(['resume', snapshot, '--socket', path.join(dir, 'on.sock'), '--timeout', '1'])
    expect(on.stderr).toMatch(/read [\d.]+ [KM]iB of the snapshot into the page cache ahead of faults/)
    // (The kernel may drop some again under memory pressure: nearly all is enough.)
    expect(resident(snapshot)).toBeGreaterThan(size * 0.9)

    evict(snapshot)
    const off = uffd(['resume', snapshot, '--socket', path.join(dir, 'off.sock'), '--timeout', '1', '--preread', 'off'])
    expect(off.stderr).not.toMatch(/page cache/)
    expect(resident(snapshot)).toBeLessThan(size / 4)
  })

  it('a snapshot larger than a quarter of the memory available is not read ahead', async () => {
    const fd = fs.openSync(snapshot, 'r')
    const files = [`/proc/self/fd/${fd}`]
    const size = fs.statSync(snapshot).size
    const refused = await prereadFiles(files, new AbortController().signal, size * 3)
    expect(refused).toMatchObject({bytes: 0, skipped: expect.stringMatching(/larger than a quarter of the memory available/)})
    const done = await prereadFiles(files, new AbortController().signal, size * 4)
    expect(done.bytes).toBe(size)
    expect(done.skipped).toBeUndefined()
    const stopped = new AbortController()
    stopped.abort()
    expect(await prereadFiles(files, stopped.signal, size * 4)).toMatchObject({bytes: 0, skipped: 'stopped'})
    fs.closeSync(fd)
  })

  it.skipIf(!prereadPacedNative())('the paced native loop asks for the whole file a step at a time, and asks for nothing once stopped', async () => {
    const fd = fs.openSync(snapshot, 'r')
    try {
      const size = fs.statSync(snapshot).size
      expect(await prereadPaced(fd, size, 1 << 20, new Int32Array(new SharedArrayBuffer(4)))).toBe(size)
      // A step that does not divide the file: the last one is short.
      expect(await prereadPaced(fd, size, 3 << 20, new Int32Array(new SharedArrayBuffer(4)))).toBe(size)
      const stop = new Int32Array(new SharedArrayBuffer(4))
      Atomics.store(stop, 0, 1)
      expect(await prereadPaced(fd, size, 1 << 20, stop)).toBe(0)
      // posix_fadvise's error comes back as a SysError.
      await expect(prereadPaced(-1, size, 1 << 20, new Int32Array(new SharedArrayBuffer(4)))!).rejects.toThrow(/EBADF/)
    } finally {
      fs.closeSync(fd)
    }
  })

  it('reads MemAvailable from /proc/meminfo', () => {
    const meminfo = 'MemTotal:       24000000 kB\nMemAvailable:   18225376 kB\n'
    expect(memoryAvailable(meminfo, undefined)).toBe(18225376 * 1024)
    expect(memoryAvailable('MemTotal: 1 kB\n', undefined)).toBeUndefined()
    expect(memoryAvailable('', undefined)).toBeUndefined()
    expect(memoryAvailable()).toBeGreaterThan(0)
    // Within a cgroup's limit: what is left of it, when that is less than the host has.
    expect(memoryAvailable(meminfo, {max: 1 << 30, current: 256 << 20})).toBe(768 << 20)
    expect(memoryAvailable(meminfo, {max: 2 ** 30, current: 2 ** 31})).toBe(0)
    expect(memoryAvailable(meminfo, {max: 2 ** 36, current: 0})).toBe(18225376 * 1024)
  })

  it("reads a cgroup v2's memory limit and use", () => {
    const files: Record<string, string> = {'/sys/fs/cgroup/vm/a/memory.max': '1073741824\n', '/sys/fs/cgroup/vm/a/memory.current': '4096\n', '/sys/fs/cgroup/memory.max': 'max\n', '/sys/fs/cgroup/memory.current': '1\n'}
    const read = (f: string): string | undefined => files[f]
    expect(cgroupMemory('0::/vm/a\n', read)).toEqual({max: 1 << 30, current: 4096})
    expect(cgroupMemory('0::/\n', read)).toBeUndefined()
    expect(cgroupMemory('12:memory:/x\n', read)).toBeUndefined()
    expect(cgroupMemory(undefined, read)).toBeUndefined()
  })
})
