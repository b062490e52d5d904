// uffd writing snapshots to S3 and copying them between places: a real S3-compatible server
// (s3rver, files on disk) on loopback started here and driven through the AWS SDK, the HTTP
// range server for http sources (with injected faults), and the built CLI as real processes
// (`npm run build` first). "Nothing left" is checked against the server itself: HeadObject, and
// ListMultipartUploads (s3rver keeps a pending upload's parts on disk until it is completed or
// aborted).
import {type ChildProcess, spawn} from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import {PutObjectCommand} from '@aws-sdk/client-s3'
import {afterAll, afterEach, beforeAll, describe, expect, it} from 'vitest'

import {FOOTER_SIZE} from '../src/format/constants.js'
import {readFileDigests} from '../src/snapshot/page-digests.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {type CliResult, isRoot, NATIVE, UFFD_BIN, uffdAsync} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'
import {FaultProxy} from './helpers/fault-proxy.js'
import {RangeServer} from './helpers/range-server.js'
import {S3Server} from './helpers/s3-server.js'

const MiB = 1024 * 1024
const BUCKET = 'snapshots'
/** Each test runs several CLI processes (about a second of start-up each, more on a loaded machine). */
const SLOW = 180_000
const FC_CLIENT = path.join(NATIVE, 'fc_client')
const resumeSkip = !isRoot() ? 'needs root (fc_client traps kernel-mode faults)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built` : undefined
if (resumeSkip) console.warn(`remote-upload: the resume test is skipped: ${resumeSkip}`)

let dir: string
let s3: S3Server
/** A 32 MiB memory-like image and its local snapshot: about 14 MB stored, so uploads take two parts. */
let image: string
let local: string
let http: RangeServer | undefined
let proxy: FaultProxy | undefined
const live = new Set<ChildProcess>()

beforeAll(async () => {
  dir = tempDir('uffd-upload-')
  s3 = await S3Server.start(path.join(dir, 's3'), [BUCKET])
  image = path.join(dir, 'mem.raw')
  fs.writeFileSync(image, makeImage('mixed', 32 * MiB, 11))
  local = path.join(dir, 'mem.uffd')
  const made = await cli(['snapshot', '--mem-file', image, '-o', local, '--chunk-size', '64K'])
  expect(made.status, made.stderr).toBe(0)
  expect(fs.statSync(local).size).toBeGreaterThan(8 * MiB)
})

afterEach(async () => {
  for (const child of live) child.kill('SIGKILL')
  live.clear()
  await proxy?.close()
  proxy = undefined
  await http?.close()
  http = undefined
})

afterAll(async () => {
  await s3?.close()
  fs.rmSync(dir, {recursive: true, force: true})
})

/** The CLI as a user with credentials for the test server (endpoint from AWS_ENDPOINT_URL); never blocks this process, which serves S3. */
function cli(args: string[], timeoutMs?: number): Promise<CliResult> {
  return uffdAsync(args, {env: s3.env(), timeoutMs})
}

/** Starts the CLI and keeps its handle (to signal it). */
function start(args: string[]): {child: ChildProcess; done: Promise<{status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string}>} {
  const child = spawn(process.execPath, [UFFD_BIN, ...args], {stdio: ['ignore', 'pipe', 'pipe'], env: s3.env()})
  live.add(child)
  let stdout = ''
  let stderr = ''
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const done = new Promise<{status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string}>((resolve) =>
    child.on('close', (status, signal) => {
      live.delete(child)
      resolve({status, signal, stdout, stderr})
    }),
  )
  return {child, done}
}

async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** Nothing at the key, and no multipart upload pending in the bucket. */
async function expectNothingLeft(key: string): Promise<void> {
  expect(await s3.exists(BUCKET, key), `an object at ${key}`).toBe(false)
  expect(await s3.pendingUploads(BUCKET), 'pending multipart uploads').toEqual([])
}

/** A random (incompressible) image: every chunk is stored raw, so the upload carries all of it. */
function randomImage(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w')
  const block = Buffer.alloc(16 * MiB)
  for (let at = 0; at < bytes; at += block.length) fs.writeSync(fd, crypto.randomFillSync(block), 0, block.length, at)
  fs.closeSync(fd)
}

/** A copy of `file` with one byte of chunk `chunk`'s stored data flipped. */
function corruptCopy(file: string, chunk: number, to: string): void {
  const reader = SnapshotReader.open(file)
  const entry = reader.index.at(chunk)
  reader.close()
  const bytes = fs.readFileSync(file)
  bytes[entry.dataOffset + (entry.storedLength >> 1)] ^= 0xff
  fs.writeFileSync(to, bytes)
}

describe('uffd snapshot -o s3://', () => {
  it('uploads in parts the very snapshot a local file gets (dedup included), which verify and resume then read', async () => {
    const key = 'vm/mem.uffd'
    const r = await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--chunk-size', '64K', '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(r.json).toMatchObject({path: `s3://${BUCKET}/${key}`, fileSize: fs.statSync(local).size})
    expect(r.json.dedupChunks).toBeGreaterThan(0)
    expect(await s3.pendingUploads(BUCKET)).toEqual([])
    // Byte for byte the local writer's output but for the header's creation time (and the CRCs
    // that cover it): the same chunks, deduplicated the same way (by digest here, by reading
    // back there), the same index and zero map.
    const uploaded = s3.objectBytes(BUCKET, key)
    const expected = fs.readFileSync(local)
    // (And but for the page digest table: each snapshot draws its own digest key.)
    const reader = SnapshotReader.open(local)
    const headerSize = reader.header.headerSize
    const table = readFileDigests(reader)!
    reader.close()
    expect(uploaded.length).toBe(expected.length)
    expect(uploaded.subarray(headerSize, table.offset).equals(expected.subarray(headerSize, table.offset))).toBe(true)
    expect(uploaded.subarray(table.offset + table.length, uploaded.length - FOOTER_SIZE).equals(expected.subarray(table.offset + table.length, expected.length - FOOTER_SIZE))).toBe(true)

    const verify = await cli(['verify', `s3://${BUCKET}/${key}`, '--against', image, '--cache-dir', path.join(dir, 'cache-verify'), '--json'])
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.json).toMatchObject({ok: true, against: {mismatchedPages: 0}})
  }, SLOW)

  it('--encrypt --sign-key uploads a sealed snapshot (deduplicated by digests of what was sealed) that verify reads back from the bucket with its keys', async () => {
    const keyFile = path.join(dir, 'upload.key')
    fs.writeFileSync(keyFile, crypto.randomBytes(32), {mode: 0o600})
    const signer = crypto.generateKeyPairSync('ed25519')
    fs.writeFileSync(path.join(dir, 'upload.pem'), signer.privateKey.export({type: 'pkcs8', format: 'pem'}))
    fs.writeFileSync(path.join(dir, 'upload.pub'), signer.publicKey.export({type: 'spki', format: 'pem'}))
    const url = `s3://${BUCKET}/vm/sealed.uffd`
    const r = await cli(['snapshot', '--mem-file', image, '-o', url, '--chunk-size', '64K', '--encrypt', '--key-file', keyFile, '--sign-key', path.join(dir, 'upload.pem'), '--json'])
    expect(r.status, r.stderr).toBe(0)
    const plain = await cli(['stats', local, '--json'])
    expect(r.json.dedupChunks).toBe(plain.json.dedupChunks)
    expect(await s3.pendingUploads(BUCKET)).toEqual([])
    const verify = await cli(['verify', url, '--against', image, '--key-file', keyFile, '--verify-key', path.join(dir, 'upload.pub'), '--cache-dir', path.join(dir, 'cache-sealed'), '--json'])
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.json).toMatchObject({ok: true, against: {mismatchedPages: 0}})
    const locked = await cli(['verify', url, '--cache-dir', path.join(dir, 'cache-sealed'), '--json'])
    expect(locked.json.error.code).toBe('KEY_REQUIRED')
  }, SLOW)

  it.skipIf(resumeSkip)('resume serves every byte of the uploaded snapshot to a client that checks them all', async () => {
    const key = 'vm/resume.uffd'
    expect((await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--chunk-size', '64K'])).status).toBe(0)
    const socket = path.join(dir, 'r.sock')
    const ready = path.join(dir, 'r.ready')
    const handler = start(['resume', `s3://${BUCKET}/${key}`, '--socket', socket, '--ready-file', ready, '--cache-dir', path.join(dir, 'cache-resume'), '--timeout', '60'])
    await waitFor('the ready file', () => fs.existsSync(ready) || handler.child.exitCode !== null)
    expect(fs.existsSync(ready)).toBe(true)
    const client = spawn(FC_CLIENT, ['--socket', socket, '--image', image, '--touch', 'random', '--verify-all', '--timeout-ms', '60000'], {stdio: ['ignore', 'pipe', 'pipe']})
    live.add(client)
    let out = ''
    client.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d))
    const code = await new Promise<number | null>((resolve) => client.on('close', resolve))
    const served = await handler.done
    expect(code, served.stderr).toBe(0)
    expect(JSON.parse(out.trim().split('\n').at(-1)!)).toMatchObject({ok: true, verify_errors: 0})
    expect(served.status, served.stderr).toBe(0)
  }, SLOW)

  it('SIGINT mid-upload exits 130 and aborts the multipart upload: no object, nothing pending', async () => {
    const big = path.join(dir, 'big.raw')
    randomImage(big, 256 * MiB)
    try {
      const key = 'vm/interrupted.uffd'
      const run = start(['snapshot', '--mem-file', big, '-o', `s3://${BUCKET}/${key}`])
      // Mid-upload: the multipart upload exists and has parts stored, more to come.
      let uploadId: string | undefined
      await waitFor('stored parts of the upload', async () => {
        uploadId = (await s3.pendingUploads(BUCKET)).find((u) => u.Key === key)?.UploadId
        return uploadId !== undefined && s3.storedParts(BUCKET, uploadId) >= 2
      })
      run.child.kill('SIGINT')
      const r = await run.done
      expect(r.status, r.stderr).toBe(130)
      expect(r.stderr).toMatch(/interrupted by SIGINT/)
      expect(s3.aborted).toContain(uploadId)
      await expectNothingLeft(key)
    } finally {
      fs.rmSync(big, {force: true})
    }
  }, SLOW)

  it('a failure mid-upload (the input shrinks) exits 1 and aborts the upload too', async () => {
    const big = path.join(dir, 'shrinking.raw')
    randomImage(big, 192 * MiB)
    try {
      const key = 'vm/failed.uffd'
      const run = start(['snapshot', '--mem-file', big, '-o', `s3://${BUCKET}/${key}`, '--json'])
      let uploadId: string | undefined
      await waitFor('a stored part of the upload', async () => {
        uploadId = (await s3.pendingUploads(BUCKET)).find((u) => u.Key === key)?.UploadId
        return uploadId !== undefined && s3.storedParts(BUCKET, uploadId) >= 1
      })
      fs.truncateSync(big, 16 * MiB)
      const r = await run.done
      expect(r.status, r.stderr).toBe(1)
      expect(JSON.parse(r.stdout).error.code).toBe('TRUNCATED')
      expect(s3.aborted).toContain(uploadId)
      await expectNothingLeft(key)
    } finally {
      fs.rmSync(big, {force: true})
    }
  }, SLOW)

  it('a working set of another image is refused before anything is uploaded', async () => {
    const ws = path.join(dir, 'other.ws')
    fs.writeFileSync(ws, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 4 * MiB, pageSize: 4096, headerCrc: 1}, runs: 1, pages: [0, 1], firstTouchMs: [0, 1]}))
    const key = 'vm/bad-set.uffd'
    const r = await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--working-set', ws, '--json'])
    expect(r.status).toBe(1)
    expect(r.json.error.code).toBe('BAD_WORKING_SET')
    await expectNothingLeft(key)
  }, SLOW)

  it('--working-set: the snapshot is written aside, then uploaded with the set attached', async () => {
    const reader = SnapshotReader.open(local)
    const pages = [...Array(reader.geometry.pageCount).keys()].filter((p) => p % 5 === 0).reverse()
    const ws = path.join(dir, 'snapshot.ws')
    // Recorded on an earlier snapshot of this memory: geometry matches, the header CRC need not.
    fs.writeFileSync(ws, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: reader.geometry.logicalSize, pageSize: 4096, headerCrc: 0}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    reader.close()
    const key = 'vm/with-set.uffd'
    const r = await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--chunk-size', '64K', '--working-set', ws, '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(fs.readdirSync(dir).filter((f) => f.includes('unattached'))).toEqual([])
    const stats = await cli(['stats', `s3://${BUCKET}/${key}`, '--cache-dir', path.join(dir, 'cache-set'), '--json'])
    expect(stats.json.workingSet).toMatchObject({pages: pages.length})
    expect(stats.json.fileSize).toBe(r.json.fileSize)
    expect(await s3.pendingUploads(BUCKET)).toEqual([])
  }, SLOW)

  it('an existing key is OUTPUT_EXISTS without --force (HeadObject) and replaced with it; http(s):// and --mode are usage errors', async () => {
    const key = 'vm/exists.uffd'
    await s3.client.send(new PutObjectCommand({Bucket: BUCKET, Key: key, Body: 'old'}))
    const refused = await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--json'])
    expect(refused.status).toBe(1)
    expect(refused.json.error).toMatchObject({code: 'OUTPUT_EXISTS', message: expect.stringContaining('--force')})
    expect(s3.objectBytes(BUCKET, key).toString()).toBe('old')
    const replaced = await cli(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/${key}`, '--force', '--json'])
    expect(replaced.status, replaced.stderr).toBe(0)
    expect(s3.objectBytes(BUCKET, key).length).toBe(replaced.json.fileSize)

    const usage = async (args: string[]): Promise<void> => {
      const u = await cli([...args, '--json'])
      expect(u.status, args.join(' ')).toBe(2)
      expect(u.json.error.code).toBe('USAGE')
    }
    await usage(['snapshot', '--mem-file', image, '-o', 'https://example.com/vm.uffd'])
    await usage(['snapshot', '--mem-file', image, '-o', `s3://${BUCKET}/vm/mode.uffd`, '--mode', '640'])
    await usage(['cp', local, 'http://example.com/vm.uffd'])
    await usage(['working-set', 'attach', 'http://127.0.0.1:9/vm.uffd', path.join(dir, 'any.ws')])
    await expectNothingLeft('vm/mode.uffd')
  }, SLOW)
})

describe('uffd cp', () => {
  it('local -> s3 -> local is byte-identical, with --json bytes, seconds, source and destination', async () => {
    const key = 'cp/mem.uffd'
    const up = await cli(['cp', local, `s3://${BUCKET}/${key}`, '--json'])
    expect(up.status, up.stderr).toBe(0)
    const size = fs.statSync(local).size
    expect(up.json).toMatchObject({source: local, destination: `s3://${BUCKET}/${key}`, bytes: size})
    expect(up.json.seconds).toBeGreaterThan(0)
    expect(s3.objectBytes(BUCKET, key).equals(fs.readFileSync(local))).toBe(true)

    const back = path.join(dir, 'back.uffd')
    const down = await cli(['cp', `s3://${BUCKET}/${key}`, back, '--cache-dir', path.join(dir, 'cache-cp'), '--json'])
    expect(down.status, down.stderr).toBe(0)
    expect(down.json).toMatchObject({source: `s3://${BUCKET}/${key}`, destination: back, bytes: size})
    expect(down.json.unitsVerified).toBeGreaterThan(0)
    expect(down.json.remote.requests).toBeGreaterThan(0)
    expect(fs.readFileSync(back).equals(fs.readFileSync(local))).toBe(true)
    expect(fs.statSync(back).mode & 0o777).toBe(0o600)

    // An existing destination needs --force, locally and in S3.
    expect((await cli(['cp', local, back, '--json'])).json.error.code).toBe('OUTPUT_EXISTS')
    expect((await cli(['cp', local, `s3://${BUCKET}/${key}`, '--json'])).json.error.code).toBe('OUTPUT_EXISTS')
    expect((await cli(['cp', local, back, '--force'])).status).toBe(0)
  }, SLOW)

  it('from an http source through 503s and corrupted bodies: retried, and the copy is still byte-identical', async () => {
    http = await RangeServer.start(local)
    proxy = await FaultProxy.start(http.url())
    // Faults once the snapshot is open (its first two requests); small requests, so there are many.
    proxy.faults = {after: 2, corrupt: 3, status: {code: 503, count: 3}}
    const out = path.join(dir, 'from-http.uffd')
    const r = await cli(['cp', proxy.url('/snapshot.uffd'), out, '--cache-dir', path.join(dir, 'cache-http'), '--fetch-request-max', '256K', '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(r.json.remote.badResponses).toBeGreaterThanOrEqual(1)
    expect(r.json.remote.retries).toBeGreaterThanOrEqual(3)
    expect(fs.readFileSync(out).equals(fs.readFileSync(local))).toBe(true)
  }, SLOW)

  it('a corrupt source leaves nothing at the destination and exits 1 with CORRUPT', async () => {
    const reader = SnapshotReader.open(local)
    const last = reader.index.length - 1
    reader.close()
    // A chunk near the end: the first part has gone out (the upload exists) when it is found.
    const bad = path.join(dir, 'bad.uffd')
    corruptCopy(local, last, bad)

    const key = 'cp/bad.uffd'
    const abortedBefore = s3.aborted.length
    const toS3 = await cli(['cp', bad, `s3://${BUCKET}/${key}`, '--json'])
    expect(toS3.status).toBe(1)
    expect(toS3.json.error).toMatchObject({code: 'CORRUPT', message: expect.stringContaining(`chunk ${last}`)})
    expect(s3.aborted.length).toBeGreaterThan(abortedBefore)
    await expectNothingLeft(key)

    // Served over HTTP, the bad bytes fail their CRC in every answer: CORRUPT once the fetch
    // deadline says retrying is over, and no file (nor temporary file) at the destination.
    http = await RangeServer.start(bad)
    const target = path.join(dir, 'bad-copies')
    fs.mkdirSync(target)
    const fromHttp = await cli(['cp', http.url(), path.join(target, 'copy.uffd'), '--cache-dir', path.join(dir, 'cache-bad'), '--fetch-deadline', '2s', '--json'])
    expect(fromHttp.status).toBe(1)
    expect(fromHttp.json.error.code).toBe('CORRUPT')
    expect(fs.readdirSync(target)).toEqual([])
  }, SLOW)
})

describe('uffd working-set attach with object storage', () => {
  it('from s3 to s3: the same bytes as attaching locally, verified from the bucket', async () => {
    const reader = SnapshotReader.open(local)
    const {logicalSize, pageCount} = reader.geometry
    const headerCrc = reader.header.headerCrc
    reader.close()
    const pages = [...Array(pageCount).keys()].filter((p) => p % 7 === 0).reverse()
    const ws = path.join(dir, 'vm.ws')
    fs.writeFileSync(ws, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize, pageSize: 4096, headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))

    await s3.client.send(new PutObjectCommand({Bucket: BUCKET, Key: 'ws/mem.uffd', Body: fs.readFileSync(local)}))
    const r = await cli(['working-set', 'attach', `s3://${BUCKET}/ws/mem.uffd`, ws, '-o', `s3://${BUCKET}/ws/mem-ws.uffd`, '--cache-dir', path.join(dir, 'cache-attach'), '--json'])
    expect(r.status, r.stderr).toBe(0)
    expect(r.json).toMatchObject({output: `s3://${BUCKET}/ws/mem-ws.uffd`, pages: pages.length})
    expect(r.json.packedBlocks).toBeGreaterThan(0)

    const attachedHere = path.join(dir, 'mem-ws.uffd')
    const here = await cli(['working-set', 'attach', local, ws, '-o', attachedHere])
    expect(here.status, here.stderr).toBe(0)
    expect(s3.objectBytes(BUCKET, 'ws/mem-ws.uffd').equals(fs.readFileSync(attachedHere))).toBe(true)

    const verify = await cli(['verify', `s3://${BUCKET}/ws/mem-ws.uffd`, '--against', image, '--cache-dir', path.join(dir, 'cache-attach'), '--json'])
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.json).toMatchObject({ok: true})
    expect(verify.json.blocksChecked).toBe(r.json.packedBlocks)
    expect(await s3.pendingUploads(BUCKET)).toEqual([])
  }, SLOW)
})
