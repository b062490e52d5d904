// A working set attached to a layer (`working-set attach LAYER`, `snapshot --parent --working-set`):
// its pages packed from the image the chain resolves to, prefetched at resume by a real client
// checking every byte, checked by verify, and the layer's identity kept (layers on it resolve).
import {type ChildProcess} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {isRoot, uffd, uffdAsync} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {DirRangeServer} from './helpers/dir-range-server.js'
import {FC_CLIENT, runFcClient, scatteredChange as changed, uffdOk as ok} from './helpers/layered.js'

const SIZE = 8 * 1024 * 1024
const SET_PAGES = 300
const skip = !isRoot() ? 'not root (fc_client needs a kernel-mode userfaultfd)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built (npm run build)` : undefined
if (skip) console.warn(`test/layer-working-set.test.ts skipped: ${skip}`)

let dir: string
const at = (name: string): string => path.join(dir, name)

/** Serves `snapshot` to one fc_client on `image`; returns the client's report and the run's stats. */
async function resume(snapshot: string, image: string, extra: string[], clientArgs: string[]): Promise<{client: any; stats: any}> {
  const socket = at(`${path.basename(snapshot)}.sock`)
  const ready = `${socket}.ready`
  const statsFile = `${socket}.json`
  const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--timeout', '30', '--json', ...extra], {timeoutMs: 60_000})
  for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
  expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
  const client = await runFcClient(socket, image, clientArgs)
  const done = await handler
  expect(client.status, `fc_client:\n${client.stdout}${client.stderr}\nresume:\n${done.stderr}`).toBe(0)
  expect(done.status, done.stderr).toBe(0)
  return {client: JSON.parse(client.stdout), stats: JSON.parse(fs.readFileSync(statsFile, 'utf8'))}
}

beforeAll(async () => {
  if (skip) return
  dir = tempDir('uffd-layer-ws-')
  const base = makeImage('mixed', SIZE, 7)
  const a = changed(base, 3, 29)
  fs.writeFileSync(at('base.raw'), base)
  fs.writeFileSync(at('a.raw'), a)
  fs.writeFileSync(at('c.raw'), changed(a, 5, 41))
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd')])
  ok(['snapshot', '--mem-file', at('a.raw'), '--parent', at('base.uffd'), '-o', at('a.uffd')])
  // A layer made on `a` before a set is attached to it: it must resolve after.
  ok(['snapshot', '--mem-file', at('c.raw'), '--parent', at('a.uffd'), '-o', at('c.uffd')])
  // The set, recorded on the layer itself: the pages a client touches, most of them the base's.
  await resume(at('a.uffd'), at('a.raw'), ['--record', at('a.ws'), '--fault-around', 'page'], ['--touch', 'random', '--count', String(SET_PAGES), '--verify'])
}, 120_000)

afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

describe.skipIf(skip)('a working set on a layer', () => {
  it('attaches (packed from the resolved image), verifies, keeps the identity, and is prefetched at resume', async () => {
    expect(JSON.parse(fs.readFileSync(at('a.ws'), 'utf8')).pages).toHaveLength(SET_PAGES)
    // A layer has no chunks to put first: a set on it is packed, or refused (the file untouched).
    const unattached = fs.readFileSync(at('a.uffd'))
    expect(uffd(['working-set', 'attach', at('a.uffd'), at('a.ws'), '--pack', 'none', '--json']).json.error.code).toBe('USAGE')
    expect(fs.readFileSync(at('a.uffd')).equals(unattached)).toBe(true)
    const attached = ok(['working-set', 'attach', at('a.uffd'), at('a.ws')])
    expect(attached.packedBlocks).toBeGreaterThan(0)
    expect(attached.chunksFirst).toBe(0)
    const stats = ok(['stats', at('a.uffd')])
    expect(stats.layer.depth).toBe(1)
    expect(stats.workingSet.packed.pages).toBe(SET_PAGES)
    // Every packed page equals the resolved image's (and the chain's every unit decodes).
    const v = ok(['verify', at('a.uffd'), '--against', at('a.raw')])
    expect(v.ok).toBe(true)
    expect(v.blocksChecked).toBe(attached.packedBlocks)
    // The layer made on it before still finds it as its parent (identity unchanged).
    expect(ok(['verify', at('c.uffd'), '--against', at('c.raw')]).ok).toBe(true)
    // Resumed: the set is staged before the socket listens and installed on connect, before the
    // client (which waits a moment before touching anything) faults on it; every byte right.
    const {client, stats: run} = await resume(at('a.uffd'), at('a.raw'), [], ['--touch', 'random', '--verify-all', '--delay-ms', '1000'])
    expect(client.verify_errors).toBe(0)
    expect(run.staged.units).toBe(attached.packedBlocks)
    expect(run.workingSetChunks).toBe(attached.packedBlocks)
    expect(run.pages.prefetched).toBeGreaterThanOrEqual(SET_PAGES)
    // A layer on the layer resolves and resumes through it too.
    const c = await resume(at('c.uffd'), at('c.raw'), [], ['--touch', 'random', '--verify-all'])
    expect(c.client.verify_errors).toBe(0)
  }, 120_000)

  it('with --also, listens on every socket once the sets are staged', async () => {
    // a.uffd carries its set now (the test above): staged before anyone is told to connect.
    const [sockA, sockC, ready, statsFile] = [at('wa.sock'), at('wc.sock'), at('w.ready'), at('w.json')]
    let handler: ChildProcess | undefined
    let log = ''
    const done = uffdAsync(['resume', at('c.uffd'), '--socket', sockC, '--serve', '--also', `${at('a.uffd')}=${sockA}`, '--ready-file', ready, '--stats-file', statsFile, '--json'], {
      timeoutMs: 60_000,
      onSpawn: (child) => {
        handler = child
        child.stderr!.on('data', (d: Buffer | string) => (log += d.toString()))
      },
    })
    // (The readiness line follows the ready file: wait for both.)
    for (let i = 0; i < 400 && !(fs.existsSync(ready) && log.includes('listening on')); i++) await new Promise((r) => setTimeout(r, 25))
    expect(JSON.parse(fs.readFileSync(ready, 'utf8')).sockets).toEqual([sockC, sockA])
    expect(log.indexOf('working set staged')).toBeGreaterThanOrEqual(0)
    expect(log.indexOf('working set staged')).toBeLessThan(log.indexOf(`listening on ${sockC}, ${sockA}`))
    const c = await runFcClient(sockA, at('a.raw'), ['--touch', 'random', '--verify-all', '--delay-ms', '1000'])
    for (let i = 0; i < 400 && !/client 1 ended/.test(log); i++) await new Promise((r) => setTimeout(r, 25))
    handler!.kill('SIGTERM')
    const r = await done
    expect(JSON.parse(c.stdout).verify_errors, `${c.stdout}${c.stderr}\n${r.stderr}`).toBe(0)
    const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    expect(stats.staged.units).toBeGreaterThan(0)
    expect(stats.pages.prefetched).toBeGreaterThanOrEqual(SET_PAGES)
  }, 60_000)

  it('snapshot --parent --working-set writes a layer with the set attached', async () => {
    const d = ok(['snapshot', '--mem-file', at('c.raw'), '--parent', at('a.uffd'), '--working-set', at('a.ws'), '-o', at('d.uffd')])
    expect(d.path).toBe(at('d.uffd'))
    expect(fs.readdirSync(dir).filter((f) => f.includes('unattached'))).toEqual([])
    expect(ok(['stats', at('d.uffd')]).workingSet.packed.pages).toBe(SET_PAGES)
    const v = ok(['verify', at('d.uffd'), '--against', at('c.raw')])
    expect(v.ok).toBe(true)
    expect(v.blocksChecked).toBeGreaterThan(0)
    const {client, stats} = await resume(at('d.uffd'), at('c.raw'), [], ['--touch', 'random', '--verify-all', '--delay-ms', '1000'])
    expect(client.verify_errors).toBe(0)
    expect(stats.pages.prefetched).toBeGreaterThanOrEqual(SET_PAGES)
  }, 120_000)

  it('squash keeps the top layer\'s working set: attached to the squashed file, prefetched at resume', async () => {
    // d.uffd carries its set (the test above).
    const sq = ok(['squash', at('d.uffd'), '-o', at('d-sq.uffd')])
    expect(sq.path).toBe(at('d-sq.uffd'))
    expect(sq.workingSetPages).toBe(SET_PAGES)
    expect(fs.readdirSync(dir).filter((f) => f.includes('unattached'))).toEqual([])
    const s = ok(['stats', at('d-sq.uffd')])
    expect(s.layer).toBeUndefined()
    expect(s.workingSet.packed.pages).toBe(SET_PAGES)
    expect(s.workingSet.chunksFirst).toBeGreaterThan(0)
    expect(s.pageDigests.rows).toBeGreaterThan(0)
    expect(ok(['verify', at('d-sq.uffd'), '--against', at('c.raw')]).ok).toBe(true)
    const {client, stats} = await resume(at('d-sq.uffd'), at('c.raw'), [], ['--touch', 'random', '--verify-all', '--delay-ms', '1000'])
    expect(client.verify_errors).toBe(0)
    expect(stats.pages.prefetched).toBeGreaterThanOrEqual(SET_PAGES)
    // A chain whose top carries no set squashes to a file without one.
    const plain = ok(['squash', at('c.uffd'), '-o', at('c-sq.uffd')])
    expect(plain.workingSetPages).toBeUndefined()
    expect(ok(['stats', at('c-sq.uffd')]).workingSet).toBeUndefined()
  }, 120_000)

  it('attaches to a layer read over HTTP (its chain fetched), written to a local file', async () => {
    // The same pages as a set recorded on c.uffd (a set names its snapshot by its header CRC).
    const c = fs.readFileSync(at('c.uffd'))
    const set = JSON.parse(fs.readFileSync(at('a.ws'), 'utf8'))
    set.snapshot.headerCrc = c.readUInt32LE(c.readUInt32LE(12) - 8)
    fs.writeFileSync(at('c.ws'), JSON.stringify(set))
    const http = await DirRangeServer.start(dir)
    try {
      const r = await uffdAsync(['working-set', 'attach', http.url('c.uffd'), at('c.ws'), '-o', at('c-ws.uffd'), '--cache-dir', at('cache'), '--json'])
      expect(r.status, r.stderr).toBe(0)
      expect((r.json as any).packedBlocks).toBeGreaterThan(0)
    } finally {
      await http.close()
    }
    const v = ok(['verify', at('c-ws.uffd'), '--against', at('c.raw')])
    expect(v.ok).toBe(true)
    expect(v.blocksChecked).toBeGreaterThan(0)
  }, 60_000)

  it('verify finds a damaged packed block of a layer', () => {
    const before = fs.readFileSync(at('a.uffd'))
    // The first packed block's stored bytes start right after the header.
    const damaged = Buffer.from(before)
    const headerSize = damaged.readUInt32LE(12)
    damaged[headerSize + 100] ^= 0xff
    fs.writeFileSync(at('bad.uffd'), damaged)
    const v = uffd(['verify', at('bad.uffd'), '--json'])
    expect(v.status).toBe(1)
    expect(v.json.errors.join('\n')).toMatch(/packed working set block 0/)
  })
})
