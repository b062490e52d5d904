// uffd reading snapshots from S3: a real S3-compatible server (s3rver) on loopback, started here,
// driven through the same AWS SDK v3 client users have; fc_client verifies every byte it faults.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import {type AddressInfo} from 'node:net'
import path from 'node:path'

import {CreateBucketCommand, PutObjectCommand, S3Client} from '@aws-sdk/client-s3'
import S3rver from 's3rver'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {type ResumeReport} from '../src/resume/run-stats.js'
import {cliEnv, NATIVE, UFFD_BIN, uffd, uffdAsync} from './helpers/cli.js'
import {FaultProxy} from './helpers/fault-proxy.js'
import {makeImage, tempDir} from './helpers/images.js'

// The SDK's Node 20 notice is for versions this package does not pin (the CLI turns it off too).
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

const FC_CLIENT = path.join(NATIVE, 'fc_client')
const skip = process.getuid?.() !== 0 ? 'needs root (fc_client traps kernel-mode faults)' : undefined
if (skip) console.warn(`remote-s3: resume test skipped: ${skip}`)

let dir: string
let imageFile: string
let server: S3rver
let endpoint: string
let s3: S3Client

/**
 * `uffd resume LOCATION` through `endpoint` and fc_client touching all of memory at random,
 * verifying it; `afterOpen` runs once the handler is ready (the header and index are read).
 */
async function resumeFromS3(location: string, via: string, cache: string, afterOpen?: () => unknown) {
  const socket = path.join(dir, `${cache}.sock`)
  const ready = path.join(dir, `${cache}.ready`)
  const statsFile = path.join(dir, `${cache}.json`)
  const handler = spawn(process.execPath, [UFFD_BIN, 'resume', location, '--s3-endpoint', via, '--socket', socket, '--ready-file', ready, '--stats-file', statsFile, '--cache-dir', path.join(dir, cache), '--fetch-timeout', '2s'], {stdio: ['ignore', 'pipe', 'pipe'], env: s3Env()})
  let stderr = ''
  handler.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const exited = new Promise<number | null>((resolve) => handler.on('close', resolve))
  const deadline = Date.now() + 30_000
  while (!fs.existsSync(ready) && handler.exitCode === null && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  expect(fs.existsSync(ready), stderr).toBe(true)
  await afterOpen?.()
  const client = spawn(FC_CLIENT, ['--socket', socket, '--image', imageFile, '--touch', 'random', '--verify-all', '--timeout-ms', '60000'], {stdio: ['ignore', 'pipe', 'pipe']})
  let stdout = ''
  client.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  const outcome = await new Promise<{code: number | null; signal: NodeJS.Signals | null}>((resolve) => client.on('close', (code, signal) => resolve({code, signal})))
  const code = await exited
  const stats = fs.existsSync(statsFile) ? (JSON.parse(fs.readFileSync(statsFile, 'utf8')) as ResumeReport) : ({} as ResumeReport)
  return {code, stderr, stats, client: {...outcome, stdout}}
}

/** The environment of a user with credentials for the test server (s3rver's fixed pair) and nothing else of AWS. */
function s3Env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = cliEnv()
  for (const key of Object.keys(env)) if (key.startsWith('AWS_')) delete env[key]
  return {...env, AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1', AWS_EC2_METADATA_DISABLED: 'true', AWS_CONFIG_FILE: '/nonexistent', AWS_SHARED_CREDENTIALS_FILE: '/nonexistent', ...extra}
}

beforeAll(async () => {
  dir = tempDir('uffd-s3-')
  imageFile = path.join(dir, 'mem.raw')
  fs.writeFileSync(imageFile, makeImage('mixed', 4 << 20, 9))
  const snapshot = path.join(dir, 'mem.uffd')
  expect(uffd(['snapshot', '--mem-file', imageFile, '-o', snapshot, '--chunk-size', '64K']).status).toBe(0)
  const otherImage = path.join(dir, 'other.raw')
  fs.writeFileSync(otherImage, makeImage('mixed', 4 << 20, 10))
  expect(uffd(['snapshot', '--mem-file', otherImage, '-o', path.join(dir, 'other.uffd'), '--chunk-size', '64K']).status).toBe(0)
  server = new S3rver({port: 0, address: '127.0.0.1', silent: true, directory: path.join(dir, 's3')})
  const address = (await server.run()) as AddressInfo
  endpoint = `http://127.0.0.1:${address.port}`
  s3 = new S3Client({endpoint, forcePathStyle: true, region: 'us-east-1', credentials: {accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER'}})
  await s3.send(new CreateBucketCommand({Bucket: 'snapshots'}))
  await s3.send(new PutObjectCommand({Bucket: 'snapshots', Key: 'vm/mem.uffd', Body: fs.readFileSync(snapshot)}))
})

afterAll(async () => {
  await server?.close()
  fs.rmSync(dir, {recursive: true, force: true})
})

describe('snapshots in S3', () => {
  it.skipIf(skip)('uffd resume s3://BUCKET/KEY serves every byte, fetched with ranged GETs through the SDK', async () => {
    const r = await resumeFromS3('s3://snapshots/vm/mem.uffd', endpoint, 'cache')
    expect(r.client.code, r.stderr).toBe(0)
    expect(JSON.parse(r.client.stdout.trim().split('\n').at(-1)!)).toMatchObject({ok: true, verify_errors: 0})
    expect(r.code, r.stderr).toBe(0)
    expect(r.stats.snapshot).toBe('s3://snapshots/vm/mem.uffd')
    expect(r.stats.remote!.requests).toBeGreaterThan(0)
  })

  it.skipIf(skip)('through a failing proxy: 503s, resets and corrupt bodies are retried; every byte right', async () => {
    const proxy = await FaultProxy.start(endpoint)
    try {
      const r = await resumeFromS3('s3://snapshots/vm/mem.uffd', proxy.url(), 'cache-faults', () => {
        proxy.faults = {status: {code: 503, count: 2}, resetAfterHeaders: 1, corrupt: 2, truncate: 1}
      })
      expect(r.client.code, r.stderr).toBe(0)
      expect(r.code, r.stderr).toBe(0)
      expect(r.stats.remote!.retries).toBeGreaterThanOrEqual(4)
    } finally {
      await proxy.close()
    }
  })

  it.skipIf(skip)('an object overwritten mid-resume: REMOTE_CHANGED, the client is killed, no byte of the new one served', async () => {
    const key = 'vm/changing.uffd'
    await s3.send(new PutObjectCommand({Bucket: 'snapshots', Key: key, Body: fs.readFileSync(path.join(dir, 'mem.uffd'))}))
    const r = await resumeFromS3(`s3://snapshots/${key}`, endpoint, 'cache-changed', async () => {
      await s3.send(new PutObjectCommand({Bucket: 'snapshots', Key: key, Body: fs.readFileSync(path.join(dir, 'other.uffd'))}))
    })
    expect(r.stderr).toMatch(/changed while it was in use/)
    expect(r.code).toBe(1)
    expect(r.client.signal).toBe('SIGKILL')
  })

  it('stats and verify take the endpoint from AWS_ENDPOINT_URL too', async () => {
    const verify = await uffdAsync(['verify', 's3://snapshots/vm/mem.uffd', '--json', '--cache-dir', path.join(dir, 'cache-v')], {env: s3Env({AWS_ENDPOINT_URL: endpoint})})
    expect(verify.status, verify.stderr).toBe(0)
    expect(verify.json).toMatchObject({ok: true})
    expect(verify.stderr).not.toMatch(/NodeVersionSupportWarning/)
  })

  it('clear errors: no such key, no such bucket, wrong or missing credentials', async () => {
    const code = async (location: string, env: NodeJS.ProcessEnv): Promise<string> => {
      const r = await uffdAsync(['stats', location, '--json', '--s3-endpoint', endpoint, '--cache-dir', path.join(dir, 'cache-e')], {env})
      expect(r.status).toBe(1)
      return (r.json as {error: {code: string; message: string}}).error.code
    }
    expect(await code('s3://snapshots/vm/missing.uffd', s3Env())).toBe('REMOTE_NOT_FOUND')
    expect(await code('s3://no-such-bucket/mem.uffd', s3Env())).toBe('REMOTE_NOT_FOUND')
    expect(await code('s3://snapshots/vm/mem.uffd', s3Env({AWS_ACCESS_KEY_ID: 'WRONG', AWS_SECRET_ACCESS_KEY: 'WRONG'}))).toBe('REMOTE_DENIED')
    const anonymous = s3Env()
    delete anonymous.AWS_ACCESS_KEY_ID
    delete anonymous.AWS_SECRET_ACCESS_KEY
    expect(await code('s3://snapshots/vm/mem.uffd', anonymous)).toBe('REMOTE_DENIED')
  })
})
