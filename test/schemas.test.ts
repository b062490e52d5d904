import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {PUBLISHED_SCHEMAS, schemaJson} from '../src/format/schemas.js'
import {ROOT, uffd} from './helpers/cli.js'
import {tempDir} from './helpers/images.js'

let dir: string
beforeAll(() => {
  dir = tempDir('uffd-schemas-test-')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe('published JSON schemas', () => {
  it('docs/schemas/*.json are the ones the code validates with (regenerate: node --import tsx scripts/schemas.ts)', () => {
    for (const [name, schema] of Object.entries(PUBLISHED_SCHEMAS)) {
      expect(fs.readFileSync(path.join(ROOT, 'docs/schemas', name), 'utf8'), name).toBe(schemaJson(schema))
    }
  })
})

describe('JSON inputs are validated, errors name the file and the field', () => {
  const set = (runs: unknown) => ({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 65536, pageSize: 4096, headerCrc: 1}, runs, pages: [1, 2], firstTouchMs: [0.5, 1]})

  it('a .ws with "runs":"many" is BAD_WORKING_SET naming runs, not merged by string concatenation', () => {
    const bad = path.join(dir, 'set.ws')
    const good = path.join(dir, 'good.ws')
    fs.writeFileSync(bad, JSON.stringify(set('many')))
    fs.writeFileSync(good, JSON.stringify(set(1)))
    const r = uffd(['working-set', 'merge', good, bad, '-o', path.join(dir, 'out.ws'), '--json'])
    expect(r.status, r.stdout).toBe(1)
    expect(r.json.error).toMatchObject({code: 'BAD_WORKING_SET', message: `${bad}: runs: expected a positive integer`})
    expect(fs.existsSync(path.join(dir, 'out.ws'))).toBe(false)
  })

  it('a --stats-file with a field of the wrong type is INVALID naming the field, not a TypeError', () => {
    const file = path.join(dir, 'run.json')
    fs.writeFileSync(file, JSON.stringify({kind: 'uffd-resume-stats', version: 1, snapshot: 'vm.uffd', clients: 'two'}))
    for (const args of [['stats', file, '--json'], ['stats', file]]) {
      const r = uffd(args)
      expect(r.status, r.stdout + r.stderr).toBe(1)
      expect(r.stdout + r.stderr).not.toMatch(/TypeError|Cannot read/)
    }
    const r = uffd(['stats', file, '--json'])
    expect(r.json.error.code).toBe('INVALID')
    expect(r.json.error.message).toMatch(new RegExp(`^${file}: [a-zA-Z.]+: `))
  })
})
