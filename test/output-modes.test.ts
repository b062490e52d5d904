// Permission bits of the snapshots uffd writes: the built CLI as a real process, real files.
// A snapshot holds a memory image (keys of the process it was taken from): owner-only by default.
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {SnapshotReader} from '../src/snapshot/reader.js'
import {uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

let dir: string
let image: string
let workingSet: string
const modeOf = (file: string): number => fs.statSync(file).mode & 0o7777

beforeAll(() => {
  dir = tempDir('uffd-modes-')
  image = path.join(dir, 'vm.mem')
  fs.writeFileSync(image, makeImage('mixed', 1024 * 1024))
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

function writeWorkingSet(snapshot: string): string {
  const reader = SnapshotReader.open(snapshot)
  const {logicalSize, pageSize} = reader.geometry
  const headerCrc = reader.header.headerCrc
  reader.close()
  const file = path.join(dir, 'vm.ws')
  fs.writeFileSync(file, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize, pageSize, headerCrc}, runs: 1, pages: [0, 3], firstTouchMs: [0, 1]}))
  return file
}

describe('snapshot file modes', () => {
  it('snapshot writes 0600 by default, and exactly --mode when given', () => {
    const plain = path.join(dir, 'plain.uffd')
    expect(uffd(['snapshot', '--mem-file', image, '-o', plain]).status).toBe(0)
    expect(modeOf(plain).toString(8)).toBe('600')
    const shared = path.join(dir, 'shared.uffd')
    const r = uffd(['snapshot', '--mem-file', image, '-o', shared, '--mode', '640'])
    expect(r.status, r.stderr).toBe(0)
    expect(modeOf(shared).toString(8)).toBe('640')
    workingSet = writeWorkingSet(plain)
    const withSet = path.join(dir, 'with-set.uffd')
    expect(uffd(['snapshot', '--mem-file', image, '-o', withSet, '--working-set', workingSet, '--mode', '604']).status).toBe(0)
    expect(modeOf(withSet).toString(8)).toBe('604')
  })

  it('working-set attach writes 0600 by default (also in place), and exactly --mode when given', () => {
    const snap = path.join(dir, 'attach.uffd')
    expect(uffd(['snapshot', '--mem-file', image, '-o', snap, '--mode', '644']).status).toBe(0)
    const ws = writeWorkingSet(snap)
    expect(uffd(['working-set', 'attach', snap, ws]).status).toBe(0)
    expect(modeOf(snap).toString(8)).toBe('600')
    const out = path.join(dir, 'attach-out.uffd')
    // Attaching rewrote the header: a set must name the new one.
    expect(uffd(['working-set', 'attach', snap, writeWorkingSet(snap), '-o', out, '--mode', '640']).status).toBe(0)
    expect(modeOf(out).toString(8)).toBe('640')
  })

  it('a --mode that is not octal is a usage error and writes nothing', () => {
    const out = path.join(dir, 'bad-mode.uffd')
    for (const mode of ['999', 'rw', '17777', '']) {
      const r = uffd(['snapshot', '--mem-file', image, '-o', out, '--mode', mode, '--json'])
      expect(r.status, mode).toBe(2)
      expect(r.json.error.code).toBe('USAGE')
      expect(fs.existsSync(out)).toBe(false)
    }
  })
})
