// One handler serving several layers of one base (`resume --serve --also SNAP=SOCK`): real
// fc_client VMMs on each socket, every byte checked, the base's decoded units shared between the
// snapshots and counted in the stats.
import {type ChildProcess} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {isRoot, uffd, uffdAsync} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {DirRangeServer} from './helpers/dir-range-server.js'
import {FC_CLIENT, runFcClient, scatteredChange as changed, uffdOk as ok} from './helpers/layered.js'

const SIZE = 24 * 1024 * 1024
const skip = !isRoot() ? 'not root (fc_client needs a kernel-mode userfaultfd)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built (npm run build)` : undefined
if (skip) console.warn(`test/serve-layers.test.ts skipped: ${skip}`)

let dir: string
const at = (name: string): string => path.join(dir, name)

/** A VMM resuming on `socket`, touching its memory in a random order, checking all of it against `image`. */
function client(socket: string, image: string, seed: number): ReturnType<typeof runFcClient> {
  return runFcClient(socket, image, ['--touch', 'random', '--seed', String(seed), '--verify-all'])
}

beforeAll(() => {
  if (skip) return
  dir = tempDir('uffd-serve-layers-')
  const base = makeImage('mixed', SIZE, 7)
  fs.writeFileSync(at('base.raw'), base)
  // Two sandboxes paused from one base: sibling layers, each changing its own scattered pages.
  fs.writeFileSync(at('a.raw'), changed(base, 3, 29))
  fs.writeFileSync(at('b.raw'), changed(base, 8, 31))
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd')])
  ok(['snapshot', '--mem-file', at('a.raw'), '--parent', at('base.uffd'), '-o', at('a.uffd')])
  ok(['snapshot', '--mem-file', at('b.raw'), '--parent', at('base.uffd'), '-o', at('b.uffd')])
})

afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

describe.skipIf(skip)('resume --serve --also', () => {
  it('serves two layers of one base on their own sockets, every byte right, sharing the base decoded', async () => {
    const [sockA, sockB, ready, statsFile] = [at('a.sock'), at('b.sock'), at('ready'), at('run.json')]
    let handler: ChildProcess | undefined
    let log = ''
    // Every decode a demand fault's, in the fault loop (no readahead, which a few adjacent random
    // touches set off and decoder threads, with rooms of their own, would serve): what it shares
    // is then exact, not a matter of timing.
    const done = uffdAsync(['resume', at('a.uffd'), '--socket', sockA, '--serve', '--also', `${at('b.uffd')}=${sockB}`, '--readahead', '0', '--ready-file', ready, '--stats-file', statsFile, '--timeout', '30', '--json'], {
      timeoutMs: 90_000,
      onSpawn: (child) => {
        handler = child
        child.stderr!.on('data', (d: Buffer | string) => (log += d.toString()))
      },
    })
    for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
    // Ready means every socket listens.
    expect(JSON.parse(fs.readFileSync(ready, 'utf8')).sockets).toEqual([sockA, sockB])
    for (const sock of [sockA, sockB]) expect(fs.statSync(sock).isSocket()).toBe(true)
    // Side by side, as a fleet resumes; each VMM gets the image of the socket it came to.
    const clients = await Promise.all([client(sockA, at('a.raw'), 1), client(sockB, at('b.raw'), 2)])
    // And a second VMM of the first layer after them (the base's units decoded by now).
    clients.push(await client(sockA, at('a.raw'), 3))
    // Stopped once the handler has seen every client go (a signal before would kill a "running" one).
    for (let i = 0; i < 400 && (log.match(/client \d+ ended/g) ?? []).length < 3; i++) await new Promise((r) => setTimeout(r, 25))
    handler!.kill('SIGTERM')
    const r = await done
    for (const c of clients) {
      expect(c.status, `fc_client:\n${c.stdout}${c.stderr}\nresume:\n${r.stderr}`).toBe(0)
      expect(JSON.parse(c.stdout).verify_errors).toBe(0)
    }
    const result = r.json as any
    expect(result.error, r.stderr).toBeUndefined()
    // (The first two connect in either order.)
    expect(result.clients.map((c: any) => c.socket).sort()).toEqual([sockA, sockA, sockB])
    expect(result.clients[2].socket).toBe(sockA)
    expect(result.clients.every((c: any) => c.ended === 'exited')).toBe(true)
    const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    expect(stats.snapshot).toBe(at('a.uffd'))
    expect(stats.also).toEqual([at('b.uffd')])
    expect(stats.clients.served).toBe(3)
    // The base's units one layer's chain decoded, the other's took from the same cache entries.
    expect(stats.chunks.storedUnitsShared, JSON.stringify(stats.chunks)).toBeGreaterThan(0)
    // Two handlers would each decode every base chunk (--verify-all reads all of memory): this one
    // decoded the base about once for both layers and all three VMMs.
    const chainA = ok(['stats', at('a.uffd')]).chain
    const chainB = ok(['stats', at('b.uffd')]).chain
    expect(stats.chunks.storedUnitsDecoded).toBeLessThan(2 * chainA[0].unitsStored)
    expect(stats.chunks.storedUnitsDecoded).toBeLessThanOrEqual(chainA[0].unitsStored + chainA[1].unitsStored + chainB[1].unitsStored)
    // `uffd stats` shows it.
    expect(uffd(['stats', statsFile]).stdout).toMatch(/stored units taken decoded by another snapshot's chain/)
    console.log(`serve --also: ${JSON.stringify(stats.chunks)}`)
    // The sockets and the ready file are gone at exit.
    for (const f of [sockA, sockB, ready]) expect(fs.existsSync(f)).toBe(false)
  }, 120_000)

  it('serves two layers of one base from object storage (HTTP) the same way', async () => {
    const http = await DirRangeServer.start(dir)
    try {
      const [sockA, sockB, ready, statsFile] = [at('ha.sock'), at('hb.sock'), at('h.ready'), at('h.json')]
      let handler: ChildProcess | undefined
      let log = ''
      const args = ['resume', http.url('a.uffd'), '--socket', sockA, '--serve', '--also', `${http.url('b.uffd')}=${sockB}`, '--cache-dir', at('cache'), '--ready-file', ready, '--stats-file', statsFile, '--json']
      const done = uffdAsync(args, {
        timeoutMs: 90_000,
        onSpawn: (child) => {
          handler = child
          child.stderr!.on('data', (d: Buffer | string) => (log += d.toString()))
        },
      })
      for (let i = 0; i < 800 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
      expect(fs.existsSync(ready), `the handler never became ready:\n${log}`).toBe(true)
      const clients = await Promise.all([client(sockA, at('a.raw'), 4), client(sockB, at('b.raw'), 5)])
      for (let i = 0; i < 400 && (log.match(/client \d+ ended/g) ?? []).length < 2; i++) await new Promise((r) => setTimeout(r, 25))
      handler!.kill('SIGTERM')
      const r = await done
      for (const c of clients) {
        expect(c.status, `fc_client:\n${c.stdout}${c.stderr}\nresume:\n${r.stderr}`).toBe(0)
        expect(JSON.parse(c.stdout).verify_errors).toBe(0)
      }
      const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
      expect(stats.chunks.storedUnitsShared, JSON.stringify(stats.chunks)).toBeGreaterThan(0)
      // Fetching is reported for every remote file of both chains.
      for (const name of ['a.uffd', 'b.uffd', 'base.uffd']) expect(stats.remote.location).toContain(http.url(name))
      console.log(`serve --also over HTTP: ${JSON.stringify(stats.chunks)}, ${stats.remote.requests} requests, ${stats.remote.bytesFetched} bytes`)
    } finally {
      await http.close()
    }
  }, 120_000)

  it('populates the VMMs of both layers from one decode pool (the decoders serve both snapshots)', async () => {
    const [sockA, sockB, ready, statsFile] = [at('pa.sock'), at('pb.sock'), at('p.ready'), at('p.json')]
    let handler: ChildProcess | undefined
    let log = ''
    const done = uffdAsync(['resume', at('a.uffd'), '--socket', sockA, '--serve', '--also', `${at('b.uffd')}=${sockB}`, '--populate', 'all', '--decoders', '2', '--ready-file', ready, '--stats-file', statsFile, '--json'], {
      timeoutMs: 60_000,
      onSpawn: (child) => {
        handler = child
        child.stderr!.on('data', (d: Buffer | string) => (log += d.toString()))
      },
    })
    for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    // Touching after a pause: most of memory comes from population, decoded by the decoder threads.
    const clients = await Promise.all([
      runFcClient(sockA, at('a.raw'), ['--touch', 'random', '--verify-all', '--delay-ms', '300']),
      runFcClient(sockB, at('b.raw'), ['--touch', 'random', '--verify-all', '--delay-ms', '300']),
    ])
    for (let i = 0; i < 400 && (log.match(/client \d+ ended/g) ?? []).length < 2; i++) await new Promise((r) => setTimeout(r, 25))
    handler!.kill('SIGTERM')
    const r = await done
    for (const c of clients) expect(JSON.parse(c.stdout).verify_errors, `${c.stdout}${c.stderr}\n${r.stderr}`).toBe(0)
    const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'))
    expect(stats.pages.prefetched).toBeGreaterThan(0)
    console.log(`serve --also --populate all: ${JSON.stringify(stats.chunks)}, ${stats.pages.prefetched} pages prefetched`)
  }, 90_000)

  it('checks each VMM against the snapshot of the socket it came to', async () => {
    // A smaller snapshot on the second socket: a VMM with the first one's memory is refused there.
    fs.writeFileSync(at('small.raw'), makeImage('mixed', 2 * 1024 * 1024, 9))
    ok(['snapshot', '--mem-file', at('small.raw'), '-o', at('small.uffd')])
    const [sockA, sockB, ready] = [at('ma.sock'), at('mb.sock'), at('m.ready')]
    let handler: ChildProcess | undefined
    let log = ''
    const done = uffdAsync(['resume', at('a.uffd'), '--socket', sockA, '--serve', '--also', `${at('small.uffd')}=${sockB}`, '--ready-file', ready, '--json'], {
      timeoutMs: 60_000,
      onSpawn: (child) => {
        handler = child
        child.stderr!.on('data', (d: Buffer | string) => (log += d.toString()))
      },
    })
    for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    const wrong = await client(sockB, at('a.raw'), 6)
    expect(wrong.status, wrong.stdout).not.toBe(0)
    const right = await Promise.all([client(sockB, at('small.raw'), 7), client(sockA, at('a.raw'), 8)])
    for (let i = 0; i < 400 && (log.match(/client \d+ ended/g) ?? []).length < 2; i++) await new Promise((r) => setTimeout(r, 25))
    handler!.kill('SIGTERM')
    const r = await done
    for (const c of right) expect(JSON.parse(c.stdout).verify_errors, `${c.stdout}${c.stderr}\n${r.stderr}`).toBe(0)
    const result = r.json as any
    expect(result.rejected).toHaveLength(1)
    expect(result.rejected[0].message).toMatch(/the snapshot holds 2097152/)
    expect(result.clients.map((c: any) => c.socket).sort()).toEqual([sockA, sockB])
  }, 90_000)

  it('refuses what names one snapshot, and a socket given twice', () => {
    const base = ['resume', at('a.uffd'), '--socket', at('x.sock'), '--serve', '--json']
    expect(uffd([...base, '--also', `${at('b.uffd')}=${at('x.sock')}`]).json.error.code).toBe('USAGE')
    expect(uffd([...base, '--also', at('b.uffd')]).json.error.code).toBe('USAGE')
    expect(uffd([...base, '--also', `${at('b.uffd')}=${at('y.sock')}`, '--record', at('r.ws')]).json.error.code).toBe('USAGE')
    // --also needs --serve.
    const once = uffd(['resume', at('a.uffd'), '--socket', at('x.sock'), '--also', `${at('b.uffd')}=${at('y.sock')}`, '--timeout', '5'])
    expect(once.status, once.stderr).toBe(2)
    expect(once.stderr).toMatch(/--also needs --serve/)
    expect(fs.existsSync(at('x.sock'))).toBe(false)
  })
})
