// Layered snapshots held remotely: a 3-file chain served by a node:http range server and by a
// real S3-compatible server (s3rver) on loopback, started here; real fc_client resumes verify
// every byte. Parents are found next to the top layer or under --layers, each checked.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {PutObjectCommand} from '@aws-sdk/client-s3'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {cliEnv, isRoot, NATIVE, UFFD_BIN, uffd, uffdAsync} from './helpers/cli.js'
import {DirRangeServer} from './helpers/dir-range-server.js'
import {makeImage, pseudoRandom, tempDir} from './helpers/images.js'
import {S3Server} from './helpers/s3-server.js'

const PAGE = 4096
const SIZE = 8 * 1024 * 1024
const PAGES = SIZE / PAGE
const CHUNK = 64 * 1024
const FC_CLIENT = path.join(NATIVE, 'fc_client')
const skipResume = isRoot() ? undefined : 'needs root (fc_client traps kernel-mode faults)'
if (skipResume) console.warn(`remote-layers: resume tests skipped: ${skipResume}`)

let dir: string
let http: DirRangeServer
let s3: S3Server
const at = (...names: string[]): string => path.join(dir, ...names)

/** `image` with every `stride`-th page new, `cluster` pages from `clusterAt` new, and 8 pages after it zeroed. */
function changed(image: Buffer, seed: number, stride: number, clusterAt: number, cluster: number): Buffer {
  const out = Buffer.from(image)
  const fresh = pseudoRandom(SIZE, seed)
  for (let p = seed % stride; p < PAGES; p += stride) fresh.copy(out, p * PAGE, p * PAGE, (p + 1) * PAGE)
  fresh.copy(out, clusterAt * PAGE, clusterAt * PAGE, (clusterAt + cluster) * PAGE)
  out.fill(0, (clusterAt + cluster + 16) * PAGE, (clusterAt + cluster + 24) * PAGE)
  return out
}

function ok(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

async function okAsync(args: string[], env?: NodeJS.ProcessEnv): Promise<any> {
  const r = await uffdAsync([...args, '--json'], {env})
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

let names = 0

/** `uffd resume SNAPSHOT` and one fc_client touching every page at random and verifying all of memory against `image`. */
async function resumeAndVerify(snapshot: string, image: string, extra: string[] = [], env = cliEnv()): Promise<{stats: any; stderr: string}> {
  const name = `r${names++}`
  const socket = at(`${name}.sock`)
  const ready = at(`${name}.ready`)
  const statsFile = at(`${name}.json`)
  const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--timeout', '30', '--cache-dir', at(`cache-${name}`), ...extra], {env, timeoutMs: 90_000})
  let finished = false
  void handler.finally(() => (finished = true))
  for (let i = 0; i < 1200 && !fs.existsSync(ready) && !finished; i++) await new Promise((r) => setTimeout(r, 25))
  if (!fs.existsSync(ready)) {
    const r = await handler
    throw new Error(`the handler never became ready (exit ${r.status}):\n${r.stderr}`)
  }
  const client = spawn(FC_CLIENT, ['--socket', socket, '--image', image, '--touch', 'random', '--verify-all', '--timeout-ms', '60000'], {stdio: ['ignore', 'pipe', 'pipe']})
  let stdout = ''
  let stderr = ''
  client.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  client.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const code = await new Promise<number | null>((resolve) => client.on('close', resolve))
  const done = await handler
  expect(code, `fc_client:\n${stdout}${stderr}\nresume:\n${done.stderr}`).toBe(0)
  expect(JSON.parse(stdout.trim().split('\n').at(-1)!)).toMatchObject({ok: true, verify_errors: 0})
  expect(done.status, done.stderr).toBe(0)
  return {stats: JSON.parse(fs.readFileSync(statsFile, 'utf8')), stderr: done.stderr}
}

/** Stored byte ranges of `file`'s chunks `chunks` that no other chunk shares (deduplicated chunks share one). */
function ownExtents(file: string, chunks: number[]): {first: number; last: number}[] {
  const reader = SnapshotReader.open(file)
  try {
    return chunks
      .map((c) => reader.entry(c))
      .filter((e) => [...reader.index].filter((o) => o.dataOffset === e.dataOffset).length === 1)
      .map((e) => ({first: e.dataOffset, last: e.dataOffset + e.storedLength - 1}))
  } finally {
    reader.close()
  }
}

beforeAll(async () => {
  dir = tempDir('uffd-remote-layers-')
  fs.mkdirSync(at('chain'))
  const base = makeImage('mixed', SIZE, 11)
  // v1 rewrites pages 1500..1547 whole: chunks 94 and 95 (16 pages each) come from v1 in v1 and
  // v2, so the base's chunks 94 and 95 are never needed by a resume of either.
  const v1 = changed(base, 3, 37, 1500, 48)
  const v2 = changed(v1, 5, 101, 300, 40)
  fs.writeFileSync(at('base.raw'), base)
  fs.writeFileSync(at('v1.raw'), v1)
  fs.writeFileSync(at('v2.raw'), v2)
  fs.writeFileSync(at('other.raw'), makeImage('mixed', SIZE, 12))
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('chain', 'base.uffd'), '--chunk-size', '64K'])
  ok(['snapshot', '--mem-file', at('v1.raw'), '--parent', at('chain', 'base.uffd'), '-o', at('chain', 'v1.uffd')])
  ok(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('chain', 'v1.uffd'), '-o', at('chain', 'v2.uffd')])
  ok(['snapshot', '--mem-file', at('other.raw'), '-o', at('other.uffd'), '--chunk-size', '64K'])
  http = await DirRangeServer.start(dir)
  s3 = await S3Server.start(at('s3'), ['snapshots'])
  for (const name of ['base.uffd', 'v1.uffd', 'v2.uffd']) await s3.client.send(new PutObjectCommand({Bucket: 'snapshots', Key: `chain/${name}`, Body: fs.readFileSync(at('chain', name))}))
}, 120_000)

afterAll(async () => {
  await http?.close()
  await s3?.close()
  fs.rmSync(dir, {recursive: true, force: true})
})

describe('a layer chain over HTTP', () => {
  it('stats reads only each file\'s header and index, and names every file of the chain', async () => {
    http.requests.length = 0
    const stats = await okAsync(['stats', http.url('chain/v2.uffd'), '--cache-dir', at('cache-stats')])
    expect(stats.chain.map((f: {file: string}) => f.file)).toEqual(['base.uffd', 'v1.uffd', 'v2.uffd'].map((n) => http.url(`chain/${n}`)))
    for (const name of ['base.uffd', 'v1.uffd', 'v2.uffd']) {
      const asked = http.requests.filter((r) => r.file === `chain/${name}`)
      expect(asked.length, name).toBeGreaterThan(0)
      expect(asked.length, name).toBeLessThanOrEqual(2)
    }
  })

  it.skipIf(skipResume)('resumes the 3-deep chain byte-exact, fetching none of the base chunks the layers replace', async () => {
    http.requests.length = 0
    const {stats} = await resumeAndVerify(http.url('chain/v2.uffd'), at('v2.raw'), ['--decoders', '2'])
    expect(stats.remote.requests).toBeGreaterThan(0)
    // Stored units decoded for the chain: every base chunk the image takes pages from at least
    // once, and no unit more than once per decoding thread (two decoders and the fault loop).
    const units = ['base.uffd', 'v1.uffd', 'v2.uffd'].map((name) => {
      const r = SnapshotReader.open(at('chain', name))
      try {
        return Array.from({length: r.unitCount}, (_, u) => r.entry(u)).filter((e) => e.codec !== Codec.None).length
      } finally {
        r.close()
      }
    })
    expect(stats.chunks.decoded).toBe(SIZE / CHUNK)
    expect(stats.chunks.storedUnitsDecoded).toBeGreaterThanOrEqual(units[0] - 2)
    expect(stats.chunks.storedUnitsDecoded).toBeLessThanOrEqual(3 * (units[0] + units[1] + units[2]))
    expect(stats.remote.location).toContain('base.uffd')
    // Every file was read; the base's chunks 94 and 95 are v1's pages in the image, so no chunk
    // request (the open's two reads of header and tail aside) touched their bytes.
    const size = fs.statSync(at('chain', 'base.uffd')).size
    const unneeded = ownExtents(at('chain', 'base.uffd'), [94, 95])
    expect(unneeded.length).toBeGreaterThan(0)
    const chunkReads = http.requests.filter((r) => r.file === 'chain/base.uffd' && r.status === 206 && r.first !== 0 && r.last !== size - 1)
    expect(chunkReads.length).toBeGreaterThan(0)
    for (const r of chunkReads) for (const e of unneeded) expect(r.last < e.first || r.first > e.last, `request ${r.first}-${r.last} reads chunk bytes ${e.first}-${e.last}`).toBe(true)
    // A layer under 1 MiB comes whole with the open's two reads (header, tail), which keep its
    // blocks: nothing of it is fetched twice.
    for (const name of ['v1.uffd', 'v2.uffd']) {
      const layerSize = fs.statSync(at('chain', name)).size
      expect(layerSize).toBeLessThan(1 << 20)
      expect(http.requests.filter((r) => r.file === `chain/${name}`).length, name).toBeLessThanOrEqual(2)
      expect(http.bytesOf(`chain/${name}`)).toBeLessThanOrEqual(layerSize + 256 * 1024)
    }
  })

  it('verifies and squashes the remote chain byte-exact', async () => {
    const verified = await okAsync(['verify', http.url('chain/v2.uffd'), '--against', at('v2.raw'), '--cache-dir', at('cache-verify')])
    expect(verified.ok).toBe(true)
    expect(verified.against.mismatchedPages).toBe(0)
    await okAsync(['squash', http.url('chain/v2.uffd'), '-o', at('squashed.uffd'), '--cache-dir', at('cache-squash')])
    expect(ok(['verify', at('squashed.uffd'), '--against', at('v2.raw')]).ok).toBe(true)
  })

  it('takes a mixed chain: a local top over remote parents (--layers URL), and a remote top over local parents', async () => {
    fs.mkdirSync(at('top-only'))
    fs.copyFileSync(at('chain', 'v2.uffd'), at('top-only', 'v2.uffd'))
    const local = await okAsync(['verify', at('top-only', 'v2.uffd'), '--layers', http.url('chain/'), '--against', at('v2.raw'), '--cache-dir', at('cache-mixed')])
    expect(local.ok).toBe(true)
    const remoteTop = await okAsync(['verify', http.url('top-only/v2.uffd'), '--layers', at('chain'), '--against', at('v2.raw'), '--cache-dir', at('cache-mixed')])
    expect(remoteTop.ok).toBe(true)
  })

  it('refuses a missing parent (PARENT_MISSING) and a swapped one (PARENT_MISMATCH), naming it', async () => {
    fs.mkdirSync(at('no-base'))
    fs.copyFileSync(at('chain', 'v2.uffd'), at('no-base', 'v2.uffd'))
    fs.copyFileSync(at('chain', 'v1.uffd'), at('no-base', 'v1.uffd'))
    const missing = await uffdAsync(['stats', http.url('no-base/v2.uffd'), '--cache-dir', at('cache-bad'), '--json'])
    expect(missing.status).toBe(1)
    expect(missing.json.error.code).toBe('PARENT_MISSING')
    expect(missing.json.error.message).toContain(http.url('no-base/base.uffd'))

    fs.mkdirSync(at('swapped'))
    fs.copyFileSync(at('chain', 'v2.uffd'), at('swapped', 'v2.uffd'))
    fs.copyFileSync(at('chain', 'v1.uffd'), at('swapped', 'v1.uffd'))
    fs.copyFileSync(at('other.uffd'), at('swapped', 'base.uffd'))
    for (const command of ['stats', 'verify']) {
      const swapped = await uffdAsync([command, http.url('swapped/v2.uffd'), '--cache-dir', at('cache-bad'), '--json'])
      expect(swapped.status).toBe(1)
      expect(swapped.json.error.code).toBe('PARENT_MISMATCH')
      expect(swapped.json.error.message).toContain(http.url('swapped/base.uffd'))
    }
    const resume = await uffdAsync(['resume', http.url('swapped/v2.uffd'), '--socket', at('never.sock'), '--cache-dir', at('cache-bad'), '--timeout', '5', '--json'])
    expect(resume.json.error.code).toBe('PARENT_MISMATCH')
    expect(fs.existsSync(at('never.sock'))).toBe(false)
  })
})

describe('uffd cp of a layer', () => {
  it('copies the chain: ancestors next to the destination by their recorded names, base first; one already there is kept', async () => {
    fs.mkdirSync(at('down'))
    const down = await okAsync(['cp', http.url('chain/v2.uffd'), at('down', 'mine.uffd'), '--cache-dir', at('cache-cp')])
    expect(down.files.map((f: {destination: string; copied: boolean}) => [path.basename(f.destination), f.copied])).toEqual([
      ['base.uffd', true],
      ['v1.uffd', true],
      ['mine.uffd', true],
    ])
    for (const name of ['base.uffd', 'v1.uffd']) expect(fs.readFileSync(at('down', name)).equals(fs.readFileSync(at('chain', name)))).toBe(true)
    expect(ok(['verify', at('down', 'mine.uffd'), '--against', at('v2.raw')]).ok).toBe(true)

    // Up to S3 beside a chain that is there already: only the new top is copied.
    const up = await okAsync(['cp', at('down', 'mine.uffd'), 's3://snapshots/chain/mine.uffd'], s3.env())
    expect(up.files.map((f: {copied: boolean}) => f.copied)).toEqual([false, false, true])
    expect(s3.objectBytes('snapshots', 'chain/mine.uffd').equals(fs.readFileSync(at('down', 'mine.uffd')))).toBe(true)

    // Another snapshot under an ancestor's name at the destination is not replaced without --force.
    fs.mkdirSync(at('taken'))
    fs.copyFileSync(at('other.uffd'), at('taken', 'base.uffd'))
    const taken = await uffdAsync(['cp', at('chain', 'v2.uffd'), at('taken', 'v2.uffd'), '--json'])
    expect(taken.json.error.code).toBe('OUTPUT_EXISTS')
    expect(fs.readdirSync(at('taken'))).toEqual(['base.uffd'])
    // A top copied under its own ancestor's name would replace that ancestor.
    const clash = await uffdAsync(['cp', at('chain', 'v2.uffd'), at('down', 'v1.uffd'), '--force', '--json'])
    expect(clash.json.error.code).toBe('USAGE')
    expect(fs.readFileSync(at('down', 'v1.uffd')).equals(fs.readFileSync(at('chain', 'v1.uffd')))).toBe(true)
  })
})

describe('a layer chain in S3', () => {
  it.skipIf(skipResume)('resumes s3://BUCKET/PREFIX/TOP byte-exact with its parents found under the same prefix', async () => {
    const {stats} = await resumeAndVerify('s3://snapshots/chain/v2.uffd', at('v2.raw'), [], s3.env())
    expect(stats.remote.location).toContain('s3://snapshots/chain/base.uffd')
    expect(stats.remote.extentsFetched).toBeGreaterThan(0)
  })

  it('uploads a layer over a remote parent (snapshot --parent s3://... -o s3://...) that resolves byte-exact', async () => {
    const written = await okAsync(['snapshot', '--mem-file', at('v2.raw'), '--parent', 's3://snapshots/chain/v1.uffd', '-o', 's3://snapshots/chain/v2-up.uffd', '--cache-dir', at('cache-up')], s3.env())
    expect(written.path).toBe('s3://snapshots/chain/v2-up.uffd')
    expect(written.depth).toBe(2)
    expect(await s3.pendingUploads('snapshots')).toEqual([])
    const verified = await okAsync(['verify', 's3://snapshots/chain/v2-up.uffd', '--against', at('v2.raw'), '--cache-dir', at('cache-up')], s3.env())
    expect(verified.ok).toBe(true)
    expect(verified.against.mismatchedPages).toBe(0)
  })

  it('uploads nothing when the layer cannot be made (an image of another size than its remote parent)', async () => {
    fs.writeFileSync(at('small.raw'), makeImage('mixed', SIZE / 2, 13))
    const r = await uffdAsync(['snapshot', '--mem-file', at('small.raw'), '--parent', 's3://snapshots/chain/v1.uffd', '-o', 's3://snapshots/chain/bad.uffd', '--cache-dir', at('cache-up'), '--json'], {env: s3.env()})
    expect(r.json.error.code).toBe('INPUT_MISMATCH')
    expect(await s3.exists('snapshots', 'chain/bad.uffd')).toBe(false)
    expect(await s3.pendingUploads('snapshots')).toEqual([])
  })

  it('finds parents under --layers s3://BUCKET/PREFIX/, and refuses a missing one there', async () => {
    const verified = await okAsync(['verify', at('chain', 'v2.uffd'), '--layers', 's3://snapshots/chain/', '--against', at('v2.raw'), '--cache-dir', at('cache-s3-layers')], s3.env())
    expect(verified.ok).toBe(true)
    const missing = await uffdAsync(['stats', at('chain', 'v2.uffd'), '--layers', 's3://snapshots/elsewhere/', '--cache-dir', at('cache-s3-layers'), '--json'], {env: s3.env()})
    expect(missing.json.error.code).toBe('PARENT_MISSING')
    expect(missing.json.error.message).toContain('base.uffd (1 of 2) is not at s3://snapshots/elsewhere/base.uffd')
  })
})
