// Failed file operations reach the user as `<doing> <their path>: <what> (<ERRNO>)` with the
// errno name as the --json code: never a temporary file's name, never Node's bare `ENOSPC: no
// space left on device, write`. Real failures where this machine can make them (a full tmpfs,
// an unprivileged user), Node's own errors injected where it cannot (EIO).
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, afterEach, beforeAll, describe, expect, it, vi} from 'vitest'

import {AtomicFile, writeFileAtomically} from '../src/snapshot/atomic-file.js'
import {FileByteSource} from '../src/snapshot/byte-source.js'
import {FileError, fileError, isNodeSystemError, nodeErrorMessage} from '../src/sys/errors.js'
import {UffdError} from '../src/core/errors.js'
import {cliEnv, isRoot, UFFD_BIN, uffd} from './helpers/cli.js'
import {pseudoRandom, tempDir} from './helpers/images.js'

/** A real ENOSPC from Node's fs, as a write to a full disk raises it. */
function realEnospc(): NodeJS.ErrnoException {
  const fd = fs.openSync('/dev/full', 'w')
  try {
    fs.writeSync(fd, Buffer.alloc(1))
  } catch (error) {
    return error as NodeJS.ErrnoException
  } finally {
    fs.closeSync(fd)
  }
  throw new Error('a write to /dev/full succeeded')
}

/** Node's EIO from a read, built the way its fs builds errno errors (uvException). */
function nodeEio(): NodeJS.ErrnoException {
  return Object.assign(new Error('EIO: i/o error, read'), {errno: -5, code: 'EIO', syscall: 'read'})
}

const temporaries = (dir: string): string[] => fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))

let dir: string
beforeAll(() => {
  dir = tempDir('uffd-file-errors-test-')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))
afterEach(() => {
  vi.restoreAllMocks()
})

describe('FileError', () => {
  it("names the user's path, what was being done and the errno name, which stays the code", () => {
    const cause = realEnospc()
    expect(cause.message).toBe('ENOSPC: no space left on device, write') // no path: why FileError exists
    const e = fileError(cause, 'vm.uffd', 'writing') as FileError
    expect(e).toBeInstanceOf(FileError)
    expect(e).toMatchObject({code: 'ENOSPC', errno: 28, syscall: 'write', path: 'vm.uffd', message: 'writing vm.uffd: no space left on device (ENOSPC)'})
    expect(e.cause).toBe(cause)
  })

  it('leaves errors that are not Node system errors as they are', () => {
    const uffdError = new UffdError('TRUNCATED', 'cut short')
    expect(fileError(uffdError, 'x', 'reading')).toBe(uffdError)
    const typeError = new TypeError('x is not a function')
    expect(fileError(typeError, 'x', 'reading')).toBe(typeError)
    expect(isNodeSystemError(fileError(realEnospc(), 'x', 'writing'))).toBe(false)
  })

  it('an error no caller wrapped reads the same way, with the paths Node knows', () => {
    let cause: unknown
    try {
      fs.renameSync(path.join(dir, 'no-such-file'), path.join(dir, 'b'))
    } catch (error) {
      cause = error
    }
    expect(isNodeSystemError(cause)).toBe(true)
    expect(nodeErrorMessage(cause as NodeJS.ErrnoException & {code: string; syscall: string})).toBe(`rename ${path.join(dir, 'no-such-file')} -> ${path.join(dir, 'b')}: no such file or directory (ENOENT)`)
  })
})

describe('AtomicFile', () => {
  it("a failed write names the destination, not the temporary file, and leaves nothing", () => {
    const destination = path.join(dir, 'full.uffd')
    const file = new AtomicFile(destination)
    const enospc = realEnospc()
    vi.spyOn(fs, 'writeSync').mockImplementation(() => {
      throw enospc
    })
    expect(() => file.append(Buffer.alloc(4096))).toThrow(expect.objectContaining({code: 'ENOSPC', message: `writing ${destination}: no space left on device (ENOSPC)`}))
    file.discard()
    expect(temporaries(dir)).toEqual([])
  })

  it('a failed fsync or rename at commit names it too', () => {
    for (const call of ['fsyncSync', 'renameSync'] as const) {
      const destination = path.join(dir, `${call}.ws`)
      const file = new AtomicFile(destination)
      file.append(Buffer.from('{}'))
      vi.spyOn(fs, call).mockImplementationOnce(() => {
        throw Object.assign(new Error(`EIO: i/o error, ${call.replace('Sync', '')}`), {errno: -5, code: 'EIO', syscall: call.replace('Sync', '')})
      })
      expect(() => file.commit(), call).toThrow(expect.objectContaining({code: 'EIO', message: `writing ${destination}: i/o error (EIO)`}))
      file.discard()
      expect(temporaries(dir), call).toEqual([])
      expect(fs.existsSync(destination)).toBe(false)
    }
  })

  it('options.name stands for an intermediate destination', () => {
    const missing = path.join(dir, 'no-such-dir', 'x.uffd')
    expect(() => new AtomicFile(missing, {name: 'vm.uffd'})).toThrow(expect.objectContaining({code: 'ENOENT', message: 'creating vm.uffd: no such file or directory (ENOENT)'}))
    expect(() => writeFileAtomically(missing, 'x')).toThrow(expect.objectContaining({code: 'ENOENT', message: `creating ${missing}: no such file or directory (ENOENT)`}))
  })
})

describe('FileByteSource', () => {
  it('an I/O error while reading a snapshot names the snapshot', () => {
    const file = path.join(dir, 'eio.uffd')
    fs.writeFileSync(file, Buffer.alloc(8192))
    const source = new FileByteSource(file)
    try {
      vi.spyOn(fs, 'readSync').mockImplementation(() => {
        throw nodeEio()
      })
      expect(() => source.readAt(Buffer.alloc(4096), 0)).toThrow(expect.objectContaining({code: 'EIO', message: `reading ${file}: i/o error (EIO)`}))
    } finally {
      vi.restoreAllMocks()
      source.close()
    }
  })
})

describe('through the CLI', () => {
  it('a missing directory for the output: ENOENT, naming the output', () => {
    const image = path.join(dir, 'small.mem')
    fs.writeFileSync(image, pseudoRandom(65536, 1))
    const out = path.join(dir, 'missing-dir', 'vm.uffd')
    const r = uffd(['snapshot', '--mem-file', image, '-o', out, '--json'])
    expect(r.status).toBe(1)
    expect(r.json.error).toEqual({code: 'ENOENT', message: `creating ${out}: no such file or directory (ENOENT)`, exitCode: 1})
  })

  it('a missing input: ENOENT, naming it, after the command as the user typed it', () => {
    const missing = path.join(dir, 'missing.ws')
    const r = uffd(['working-set', 'merge', missing, missing, '-o', path.join(dir, 'out.ws')])
    expect(r.status).toBe(1)
    // oclif's id is working-set:merge; the user typed a space.
    expect(r.stderr).toBe(`uffd working-set merge: opening ${missing}: no such file or directory (ENOENT)\n`)
  })

  describe.skipIf(!isRoot())('on a full file system (a 256 KiB tmpfs; mounting needs root)', () => {
    let mnt: string
    beforeAll(() => {
      mnt = path.join(dir, 'full')
      fs.mkdirSync(mnt)
      const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', mnt], {encoding: 'utf8'})
      expect(r.status, `mount tmpfs: ${r.stderr}`).toBe(0)
    })
    afterAll(() => {
      if (mnt) spawnSync('umount', [mnt])
    })

    it('snapshot: ENOSPC naming the output, and no temporary file left', () => {
      const image = path.join(dir, 'random.mem')
      fs.writeFileSync(image, pseudoRandom(1 << 20, 2))
      const out = path.join(mnt, 'vm.uffd')
      const json = uffd(['snapshot', '--mem-file', image, '-o', out, '--json'])
      expect(json.status).toBe(1)
      expect(json.json.error).toEqual({code: 'ENOSPC', message: `writing ${out}: no space left on device (ENOSPC)`, exitCode: 1})
      const human = uffd(['snapshot', '--mem-file', image, '-o', out])
      expect(human.stderr).toBe(`uffd snapshot: writing ${out}: no space left on device (ENOSPC)\n`)
      expect(fs.readdirSync(mnt)).toEqual([])
    })

    it('working-set merge: ENOSPC naming the .ws file', () => {
      const set = {kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 1 << 30, pageSize: 4096, headerCrc: 1}, runs: 1, pages: Array.from({length: 50_000}, (_, i) => i), firstTouchMs: Array.from({length: 50_000}, (_, i) => i / 7)}
      const input = path.join(dir, 'big.ws')
      fs.writeFileSync(input, JSON.stringify(set))
      const out = path.join(mnt, 'merged.ws')
      const r = uffd(['working-set', 'merge', input, input, '-o', out, '--json'])
      expect(r.status).toBe(1)
      expect(r.json.error).toEqual({code: 'ENOSPC', message: `writing ${out}: no space left on device (ENOSPC)`, exitCode: 1})
      expect(fs.readdirSync(mnt)).toEqual([])
    })
  })

  describe.skipIf(!isRoot())('as an unprivileged user (uid 65534; switching needs root)', () => {
    let open: string
    const asNobody = (args: string[]) => {
      const r = spawnSync(process.execPath, [UFFD_BIN, ...args], {encoding: 'utf8', uid: 65534, gid: 65534, env: {...cliEnv(), HOME: open}})
      return {status: r.status, stderr: r.stderr, json: args.includes('--json') ? JSON.parse(r.stdout) : undefined}
    }
    beforeAll(() => {
      // Traversable by anyone, writable by root only.
      open = path.join(dir, 'open')
      fs.mkdirSync(open)
      fs.chmodSync(dir, 0o755)
      fs.chmodSync(open, 0o755)
    })

    it('an output directory it may not write: EACCES, naming the output', () => {
      const image = path.join(open, 'small.mem')
      fs.writeFileSync(image, pseudoRandom(65536, 3), {mode: 0o644})
      const out = path.join(open, 'vm.uffd')
      const r = asNobody(['snapshot', '--mem-file', image, '-o', out, '--json'])
      expect(r.status).toBe(1)
      expect(r.json.error).toEqual({code: 'EACCES', message: `creating ${out}: permission denied (EACCES)`, exitCode: 1})
    })

    it('a snapshot it may not read: EACCES, naming it', () => {
      const secret = path.join(open, 'secret.uffd')
      fs.writeFileSync(secret, Buffer.alloc(4096), {mode: 0o600})
      const r = asNobody(['stats', secret])
      expect(r.status).toBe(1)
      expect(r.stderr).toBe(`uffd stats: opening ${secret}: permission denied (EACCES)\n`)
    })
  })
})
