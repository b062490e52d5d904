// Inputs that are not regular files, given to every command that reads one: the built CLI runs as
// a real process on real FIFOs. A FIFO used to block open() forever (deaf to SIGINT and SIGTERM),
// so each run has a deadline far below the test's.
import {execFileSync, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {SnapshotReader} from '../src/snapshot/reader.js'
import {cliEnv, uffd, UFFD_BIN} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

let dir: string
let image: string
let snapshot: string
let workingSet: string
let fifo: string
beforeAll(() => {
  dir = tempDir('uffd-input-files-')
  image = path.join(dir, 'vm.mem')
  fs.writeFileSync(image, makeImage('mixed', 1024 * 1024))
  snapshot = path.join(dir, 'vm.uffd')
  expect(uffd(['snapshot', '--mem-file', image, '-o', snapshot]).status).toBe(0)
  const reader = SnapshotReader.open(snapshot)
  const {logicalSize, pageSize} = reader.geometry
  const headerCrc = reader.header.headerCrc
  reader.close()
  workingSet = path.join(dir, 'vm.ws')
  fs.writeFileSync(workingSet, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize, pageSize, headerCrc}, runs: 1, pages: [0, 3], firstTouchMs: [0, 1]}))
  fifo = path.join(dir, 'input.fifo')
  execFileSync('mkfifo', [fifo])
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe('a FIFO as an input', () => {
  const cases: [string, () => string[]][] = [
    ['stats FIFO', () => ['stats', fifo]],
    ['verify FIFO', () => ['verify', fifo]],
    ['verify --against FIFO', () => ['verify', snapshot, '--against', fifo]],
    ['resume FIFO', () => ['resume', fifo, '--socket', path.join(dir, 'a.sock'), '--timeout', '1']],
    ['resume --working-set FIFO', () => ['resume', snapshot, '--socket', path.join(dir, 'b.sock'), '--timeout', '1', '--working-set', fifo]],
    ['working-set attach FIFO SET', () => ['working-set', 'attach', fifo, workingSet, '-o', path.join(dir, 'c.uffd')]],
    ['working-set attach SNAPSHOT FIFO', () => ['working-set', 'attach', snapshot, fifo, '-o', path.join(dir, 'd.uffd')]],
    ['working-set merge', () => ['working-set', 'merge', workingSet, fifo, '-o', path.join(dir, 'e.ws')]],
    ['snapshot --mem-file FIFO', () => ['snapshot', '--mem-file', fifo, '-o', path.join(dir, 'f.uffd')]],
    ['snapshot --working-set FIFO', () => ['snapshot', '--mem-file', image, '-o', path.join(dir, 'g.uffd'), '--working-set', fifo]],
  ]
  it.each(cases)('%s: refused at once with NOT_A_FILE naming the path', (name, args) => {
    // SIGKILL: a process blocked in open() on a FIFO outlives the default SIGTERM.
    const r = spawnSync(process.execPath, [UFFD_BIN, ...args(), '--json'], {encoding: 'utf8', timeout: 10_000, killSignal: 'SIGKILL', env: cliEnv()})
    expect(r.signal, `${name}: hung (killed by the deadline)`).toBeNull()
    expect(r.status, name).toBe(1)
    const error = JSON.parse(r.stdout).error
    expect(error.code, `${name}: ${r.stdout}`).toBe('NOT_A_FILE')
    expect(error.message).toContain(fifo)
    expect(error.message).toMatch(/not a regular file/)
  })
})

describe('snapshot --working-set with a bad set', () => {
  it.each([
    ['malformed', 'not json'],
    ['of another image size', () => JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 2 * 1024 * 1024, pageSize: 4096, headerCrc: 1}, runs: 1, pages: [0], firstTouchMs: [0]})],
  ] as [string, string | (() => string)][])('%s: refused before anything is written; --force leaves the old output as it was', (name, content) => {
    const sub = fs.mkdtempSync(path.join(dir, 'bad-set-'))
    const bad = path.join(sub, 'bad.ws')
    fs.writeFileSync(bad, typeof content === 'string' ? content : content())
    const out = path.join(sub, 'out.uffd')
    const fresh = uffd(['snapshot', '--mem-file', image, '-o', out, '--working-set', bad, '--json'])
    expect(fresh.status, name).toBe(1)
    expect(fresh.json.error.code).toBe('BAD_WORKING_SET')
    expect(fs.readdirSync(sub)).toEqual(['bad.ws'])

    const old = Buffer.from('the previous output')
    fs.writeFileSync(out, old)
    const forced = uffd(['snapshot', '--mem-file', image, '-o', out, '--working-set', bad, '--force', '--json'])
    expect(forced.status, name).toBe(1)
    expect(forced.json.error.code).toBe('BAD_WORKING_SET')
    expect(fs.readFileSync(out)).toEqual(old)
    expect(fs.readdirSync(sub).sort()).toEqual(['bad.ws', 'out.uffd'])
  })

  it('a good set is attached and leaves no intermediate file', () => {
    const sub = fs.mkdtempSync(path.join(dir, 'good-set-'))
    const out = path.join(sub, 'out.uffd')
    const r = uffd(['snapshot', '--mem-file', image, '-o', out, '--working-set', workingSet, '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(r.json.path).toBe(out)
    expect(fs.readdirSync(sub)).toEqual(['out.uffd'])
    expect(uffd(['verify', out]).status).toBe(0)
  })
})
