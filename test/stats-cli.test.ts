/**
 * `uffd stats` on hostile input: metadata of any depth or type, stats files of any shape. Each
 * gives a result shown as far as it is valid or an error with a documented code, never a
 * TypeError (INTERNAL) or a stack overflow.
 */
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {RegionKind} from '../src/format/constants.js'
import {type SnapshotMetadata} from '../src/format/header.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {uffd} from './helpers/cli.js'
import {tempDir} from './helpers/images.js'

let dir: string
beforeAll(() => {
  dir = tempDir('uffd-stats-test-')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

/** A 64 KiB all-zero snapshot carrying `metadata`, written by the real writer. */
async function snapshotWith(name: string, metadata: SnapshotMetadata): Promise<string> {
  const file = path.join(dir, name)
  const regions = [{kind: RegionKind.ProcessVma, imageOffset: 0, size: 65536, address: 0x10000, fileOffset: 0, prot: 3, flags: 0, owner: 7, name: 'heap'}]
  await writeSnapshot({logicalSize: 65536, regions, metadata, segments: () => []}, file, {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1})
  return file
}

function expectShown(file: string): any {
  const json = uffd(['stats', file, '--json'])
  expect(json.status, `${json.stdout}\n${json.stderr}`).toBe(0)
  const text = uffd(['stats', file])
  expect(text.status, text.stderr).toBe(0)
  expect(text.stderr).not.toMatch(/TypeError|call stack|Cannot read/)
  return json.json
}

describe('uffd stats on odd snapshot metadata', () => {
  it('deeply nested metadata is shown up to a depth, not a stack overflow', async () => {
    const deep = JSON.parse('['.repeat(4000) + ']'.repeat(4000)) as unknown
    const file = await snapshotWith('deep.uffd', {source: 'mem-file', deep})
    const json = expectShown(file)
    expect(json.metadata.source).toBe('mem-file')
    expect(JSON.stringify(json.metadata.deep)).toMatch(/nested deeper than 32 levels/)
  })

  it('a huge task list is shown', async () => {
    const tasks = Array.from({length: 5000}, (_, i) => ({pid: i + 1}))
    const json = expectShown(await snapshotWith('many.uffd', {source: 'criu', tasks}))
    expect(json.tasks.length).toBe(5000)
  })

  it('task entries and fields of the wrong type are left out, not a TypeError', async () => {
    const file = await snapshotWith('odd.uffd', {source: 'criu', criuDir: {}, tasks: [null, 5, 'x', {pid: 'x'}, {pid: 7, comm: {}, rawPageBytes: 'many'}], rawPageBytes: 'x', createdAt: 5})
    const json = expectShown(file)
    expect(json.tasks).toEqual([{pid: 7, regions: 1, bytes: 65536, nonZeroBytes: 0}])
    expect(json.criu).toBeUndefined()
    const text = uffd(['stats', file])
    expect(text.stdout).not.toMatch(/\[object Object\]/)
  })

  it('process metadata of the wrong types is shown as unknown', async () => {
    const text = uffd(['stats', await snapshotWith('proc.uffd', {source: 'process', pid: {}, command: []})])
    expect(text.status, text.stderr).toBe(0)
    expect(text.stdout).toMatch(/source +process \?,/)
  })
})
