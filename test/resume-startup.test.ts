// uffd resume's start-up: the fast path past oclif parses what oclif parses, and a handler that
// listens before its fault-loop worker is up serves a client that connects the instant the socket
// appears, byte for byte, and leaves nothing behind when stopped at that instant.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {Flags, Parser} from '@oclif/core'
import fc from 'fast-check'
import {afterAll, describe, expect, it} from 'vitest'

import {parsePlainCommandLine} from '../src/cli/flag-specs.js'
import {jsonFlagSpec, resumeFlagSpecs} from '../src/cli/resume-flags.js'
import Resume from '../src/commands/resume.js'
import {cliEnv, isRoot, NATIVE, UFFD_BIN, uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

const dir = tempDir('uffd-startup-')
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

const FAST_FLAGS = {...resumeFlagSpecs, ...jsonFlagSpec}

async function oclifParse(argv: string[]): Promise<{flags: Record<string, unknown>; args: Record<string, unknown>} | Error> {
  try {
    const out = await Parser.parse(argv, {flags: {...Resume.flags, json: Flags.boolean({default: false})}, args: Resume.args, strict: true})
    return {flags: out.flags, args: out.args}
  } catch (error) {
    return error as Error
  }
}

describe('the fast command line of uffd resume', () => {
  it('takes the plain forms a VMM launcher uses', () => {
    const parsed = parsePlainCommandLine(['vm.uffd', '--socket', '/tmp/s.sock', '--ready-file=/tmp/r', '--no-kill', '--timeout', '0', '--populate', 'all', '--json'], FAST_FLAGS, ['snapshot'])
    expect(parsed?.args).toEqual({snapshot: 'vm.uffd'})
    expect(parsed?.flags).toMatchObject({socket: '/tmp/s.sock', 'ready-file': '/tmp/r', kill: false, timeout: 0, populate: 'all', json: true, serve: false, 'fault-around': 'auto'})
    expect(parsed?.flags['cache-mb']).toBeUndefined()
  })

  it('leaves help, usage errors and unusual forms to oclif', () => {
    for (const argv of [
      ['vm.uffd', '--socket', 's', '--help'],
      ['vm.uffd', '-h'],
      ['vm.uffd'],
      ['vm.uffd', '--socket', 's', '--criu-dir', 'd'],
      ['vm.uffd', '--socket', 's', '--socket', 't'],
      ['vm.uffd', '--socket', 's', '--timeout', 'x'],
      ['vm.uffd', '--socket', 's', '--decoders', '65'],
      ['vm.uffd', '--socket', 's', '--populate', 'some'],
      ['vm.uffd', '--socket', 's', '--work-dir', 'w'],
      ['vm.uffd', 'extra', '--socket', 's'],
      ['vm.uffd', '--socket', 's', '--', 'x'],
      ['vm.uffd', '--sock', 's'],
      ['vm.uffd', '--socket', 's', '--no-serve'],
      ['vm.uffd', '--socket', 's', '--serve=true'],
    ]) {
      expect(parsePlainCommandLine(argv, FAST_FLAGS, ['snapshot']), argv.join(' ')).toBeUndefined()
    }
  })

  it('hands such a command line to oclif whole: its usage error, not a failure of modules loaded twice (the bundle and dist/)', () => {
    const r = uffd(['resume', 'nowhere.uffd', '--socket', 's', '--timeout', '3', '--timeout', '2'])
    expect(r.status, r.stderr).toBe(2)
    expect(r.stderr).toMatch(/--timeout can only be specified once/)
    expect(r.stderr).not.toMatch(/Duplicate type name/)
  })

  it('accepts only what oclif accepts, with the values oclif gives (generated command lines)', async () => {
    const token = fc.constantFrom(
      'vm.uffd', 'other.uffd', '--socket', '--socket=/tmp/a.sock', '/tmp/s.sock', '--criu-dir', '/tmp/dump', '--work-dir', 'w', '--serve', '--no-serve', '--kill', '--no-kill',
      '--timeout', '0', '60', '--timeout=5', '--cache-mb', '0', '1', '--decoders', '64', '65', '--populate', 'all', 'none', '--record', 'r.ws', '--working-set', 'none',
      '--fault-around', '64K', '--spin-us', '--json', '--count-hits', '--fetch-concurrency', '256', '257', '--readahead', '-1', '--', '-h', '--help', '--stats-file=s.json',
    )
    let accepted = 0
    await fc.assert(
      // Mostly around the one plain command line, so that many are taken; some wholly random.
      fc.asyncProperty(fc.oneof(fc.array(token, {maxLength: 6}).map((extra) => ['vm.uffd', '--socket', '/tmp/s.sock', ...extra]), fc.array(token, {maxLength: 9})), async (argv) => {
        const fast = parsePlainCommandLine(argv, FAST_FLAGS, ['snapshot'])
        if (!fast) return
        accepted++
        const slow = await oclifParse(argv)
        expect(slow, argv.join(' ')).not.toBeInstanceOf(Error)
        const {flags, args} = slow as Exclude<typeof slow, Error>
        expect(args).toEqual(fast.args)
        for (const name of Object.keys(FAST_FLAGS)) expect(flags[name], `${argv.join(' ')}: --${name}`).toEqual((fast.flags as Record<string, unknown>)[name])
      }),
      {numRuns: 3000, seed: 14},
    )
    expect(accepted, 'command lines the fast path took').toBeGreaterThan(100)
  })
})

const skip = !isRoot() ? 'needs root (a uffd for kernel-mode faults)' : undefined
if (skip) console.warn(`test/resume-startup.test.ts (serving part) skipped: ${skip}`)

describe.skipIf(skip)('uffd resume listening before its worker is up', () => {
  const raw = path.join(dir, 'img.raw')
  const snapshot = path.join(dir, 'img.uffd')

  /** `maxFiles`: started under that RLIMIT_NOFILE (sh's ulimit -n, then exec). */
  function startHandler(name: string, maxFiles?: number) {
    const socket = path.join(dir, `${name}.sock`)
    const ready = path.join(dir, `${name}.ready`)
    const argv = [UFFD_BIN, 'resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30']
    const [file, args] = maxFiles === undefined ? [process.execPath, argv] : ['sh', ['-c', `ulimit -n ${maxFiles} && exec "$0" "$@"`, process.execPath, ...argv]]
    const handler = spawn(file, args, {env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe']})
    let stderr = ''
    handler.stderr!.on('data', (d) => (stderr += d))
    const exited = new Promise<number | null>((resolve) => handler.on('close', resolve))
    return {socket, ready, handler, exited, stderr: () => stderr}
  }

  /** Spins (no sleep) until `file` exists, so that the caller acts at the instant it appears. */
  async function appears(file: string, handler: {exitCode: number | null}): Promise<void> {
    const until = Date.now() + 30_000
    while (!fs.existsSync(file)) {
      if (handler.exitCode !== null || Date.now() > until) throw new Error(`${file} never appeared`)
      await new Promise((r) => setImmediate(r))
    }
  }

  /** fc_client on `socket`, touching in `touch` order and verifying every byte: its exit code and output. */
  function runClient(socket: string, touch: string): Promise<{code: number | null; out: string}> {
    const client = spawn(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', touch, '--verify-all'], {stdio: ['ignore', 'pipe', 'pipe']})
    let out = ''
    client.stdout!.on('data', (d) => (out += d))
    return new Promise((resolve) => client.on('close', (code) => resolve({code, out})))
  }

  /** The snapshot of a 16 MiB mixed image (the first test makes it; a test run alone makes it too). */
  function ensureSnapshot(): void {
    if (fs.existsSync(snapshot)) return
    fs.writeFileSync(raw, makeImage('mixed', 16 * 1024 * 1024, 5))
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
  }

  it('serves a client that connects the instant the socket appears, byte for byte', async () => {
    fs.writeFileSync(raw, makeImage('mixed', 16 * 1024 * 1024, 5))
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
    const h = startHandler('instant')
    try {
      await appears(h.socket, h.handler)
      const client = spawn(path.join(NATIVE, 'fc_client'), ['--socket', h.socket, '--image', raw, '--touch', 'sequential', '--verify-all'], {stdio: ['ignore', 'pipe', 'pipe']})
      // Connected before the handler logged taking any client: the handshake waited for the session.
      expect(h.stderr()).not.toContain('client 1')
      let out = ''
      client.stdout!.on('data', (d) => (out += d))
      const code = await new Promise<number | null>((resolve) => client.on('close', resolve))
      expect(code, h.stderr()).toBe(0)
      expect(JSON.parse(out)).toMatchObject({ok: true, verify_errors: 0, first_bad_offset: null})
      expect(await h.exited, h.stderr()).toBe(0)
      expect(fs.existsSync(h.socket) || fs.existsSync(h.ready)).toBe(false)
    } finally {
      h.handler.kill('SIGKILL')
    }
  })

  it('a snapshot renamed over while the worker starts: every thread reads the file the handler opened', async () => {
    ensureSnapshot()
    // Another image of the same size (as another handler's --learn would rename a new layout over it).
    const otherRaw = path.join(dir, 'other.raw')
    const other = path.join(dir, 'other.uffd')
    fs.writeFileSync(otherRaw, makeImage('mixed', 16 * 1024 * 1024, 6))
    expect(uffd(['snapshot', '--mem-file', otherRaw, '-o', other]).status).toBe(0)
    const kept = path.join(dir, 'img-kept.uffd')
    fs.copyFileSync(snapshot, kept)
    const h = startHandler('renamed')
    try {
      await appears(h.ready, h.handler)
      fs.renameSync(other, snapshot)
      const {code, out} = await runClient(h.socket, 'sequential')
      expect(code, h.stderr()).toBe(0)
      expect(JSON.parse(out)).toMatchObject({ok: true, verify_errors: 0})
      expect(await h.exited, h.stderr()).toBe(0)
    } finally {
      h.handler.kill('SIGKILL')
      fs.renameSync(kept, snapshot)
    }
  })

  it('starts and serves every byte with only 150 file descriptors (RLIMIT_NOFILE): its modules are a few bundled files', async () => {
    // Loaded module by module, Node's ESM loader held too many files open at once (EMFILE).
    ensureSnapshot()
    const h = startHandler('nofile', 150)
    try {
      await appears(h.ready, h.handler)
      const {code, out} = await runClient(h.socket, 'random')
      expect(code, h.stderr()).toBe(0)
      expect(JSON.parse(out)).toMatchObject({ok: true, verify_errors: 0})
      expect(await h.exited, h.stderr()).toBe(0)
    } finally {
      h.handler.kill('SIGKILL')
    }
  })

  it('stopped the instant it listens, exits 130 and leaves neither socket nor ready file', async () => {
    ensureSnapshot()
    const h = startHandler('stopped')
    try {
      await appears(h.ready, h.handler)
      h.handler.kill('SIGTERM')
      expect(await h.exited, h.stderr()).toBe(130)
      expect(h.stderr()).toContain('interrupted by SIGTERM')
      expect(fs.existsSync(h.socket) || fs.existsSync(h.ready)).toBe(false)
    } finally {
      h.handler.kill('SIGKILL')
    }
  })
})
