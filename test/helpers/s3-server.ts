import fs from 'node:fs'
import {createRequire} from 'node:module'
import {type AddressInfo} from 'node:net'
import path from 'node:path'

import {CreateBucketCommand, HeadObjectCommand, ListMultipartUploadsCommand, S3Client} from '@aws-sdk/client-s3'
import S3rver from 's3rver'

import {cliEnv} from './cli.js'

// The SDK's Node 20 notice is for versions this package does not pin (the CLI turns it off too).
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true'

const require = createRequire(import.meta.url)
const S3Error = require('s3rver/lib/models/error.js') as new (code: string, message: string) => Error

type Context = {
  method: string
  path: string
  query: Record<string, string | undefined>
  status: number
  body: unknown
}
type Middleware = (ctx: Context, next: () => Promise<void>) => Promise<void>

/**
 * s3rver (a real S3-compatible server, files on disk) on loopback, with the two multipart calls
 * it lacks: ListMultipartUploads (GET /BUCKET?uploads) and AbortMultipartUpload (DELETE
 * /BUCKET/KEY?uploadId=ID). s3rver keeps each pending upload as a directory of its parts
 * (BUCKET/._S3rver_uploads/ID, removed when the upload completes); these two list and remove
 * those directories, so "nothing pending" means no parts are left on its disk. They are served
 * ahead of s3rver's router, so without its signature check (every other call is checked).
 */
export class S3Server {
  readonly client: S3Client
  /** AbortMultipartUpload calls answered, by upload id. */
  readonly aborted: string[] = []

  private constructor(
    private readonly server: S3rver,
    readonly endpoint: string,
    private readonly root: string,
  ) {
    this.client = new S3Client({endpoint, forcePathStyle: true, region: 'us-east-1', credentials: {accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER'}})
  }

  static async start(root: string, buckets: string[]): Promise<S3Server> {
    const server = new S3rver({port: 0, address: '127.0.0.1', silent: true, directory: root})
    const middleware = (server as unknown as {middleware: Middleware[]}).middleware
    let self: S3Server | undefined
    // Just before the router (the last middleware): after logging, XML encoding and vhosts.
    middleware.splice(middleware.length - 1, 0, (ctx, next) => self!.multipart(ctx, next))
    const address = (await server.run()) as AddressInfo
    self = new S3Server(server, `http://127.0.0.1:${address.port}`, root)
    for (const bucket of buckets) await self.client.send(new CreateBucketCommand({Bucket: bucket}))
    return self
  }

  /** The environment of a user with credentials for this server (s3rver's fixed pair) and nothing else of AWS. */
  env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    const env = cliEnv()
    for (const key of Object.keys(env)) if (key.startsWith('AWS_')) delete env[key]
    return {...env, AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1', AWS_EC2_METADATA_DISABLED: 'true', AWS_CONFIG_FILE: '/nonexistent', AWS_SHARED_CREDENTIALS_FILE: '/nonexistent', AWS_ENDPOINT_URL: this.endpoint, ...extra}
  }

  /** Pending multipart uploads of the bucket, through the SDK's ListMultipartUploads. */
  async pendingUploads(bucket: string): Promise<{Key?: string; UploadId?: string}[]> {
    const listed = await this.client.send(new ListMultipartUploadsCommand({Bucket: bucket}))
    return listed.Uploads ?? []
  }

  async exists(bucket: string, key: string): Promise<boolean> {
    try {
      await this.client.send(new HeadObjectCommand({Bucket: bucket, Key: key}))
      return true
    } catch (error) {
      if ((error as {$metadata?: {httpStatusCode?: number}}).$metadata?.httpStatusCode === 404) return false
      throw error
    }
  }

  /** Parts of a pending upload stored so far (s3rver writes PART.md5 once a part is whole). */
  storedParts(bucket: string, uploadId: string): number {
    try {
      return fs.readdirSync(path.join(this.uploadsDir(bucket), path.basename(uploadId))).filter((f) => /^\d+\.md5$/.test(f)).length
    } catch {
      return 0
    }
  }

  /** The bytes of an object, straight from s3rver's disk. */
  objectBytes(bucket: string, key: string): Buffer {
    const parts = key.split('/')
    const last = parts.pop()!
    return fs.readFileSync(path.join(this.root, bucket, ...parts, `${last}._S3rver_object`))
  }

  async close(): Promise<void> {
    this.client.destroy()
    await this.server.close()
  }

  private uploadsDir(bucket: string): string {
    return path.join(this.root, bucket, '._S3rver_uploads')
  }

  private async multipart(ctx: Context, next: () => Promise<void>): Promise<void> {
    const m = /^\/([^/]+)(?:\/(.*))?$/.exec(ctx.path)
    if (!m) return next()
    const bucket = decodeURIComponent(m[1])
    const key = m[2] ? decodeURIComponent(m[2]) : undefined
    if (ctx.method === 'GET' && key === undefined && 'uploads' in ctx.query) {
      const dir = this.uploadsDir(bucket)
      const ids = fs.existsSync(dir) ? fs.readdirSync(dir) : []
      // An upload being initiated has its directory a moment before its key file.
      const keyOf = (id: string): string => fs.readFileSync(path.join(dir, id, 'key'), {encoding: 'utf8', flag: 'r'})
      const uploads = ids.map((id) => ({Key: fs.existsSync(path.join(dir, id, 'key')) ? keyOf(id) : '', UploadId: id}))
      ctx.body = {ListMultipartUploadsResult: {Bucket: bucket, KeyMarker: '', UploadIdMarker: '', MaxUploads: 1000, IsTruncated: false, ...(uploads.length ? {Upload: uploads} : {})}}
      return
    }
    if (ctx.method === 'DELETE' && key !== undefined && ctx.query.uploadId !== undefined) {
      const dir = path.join(this.uploadsDir(bucket), path.basename(ctx.query.uploadId))
      if (!fs.existsSync(dir)) throw new S3Error('NoSuchUpload', 'The specified upload does not exist.')
      fs.rmSync(dir, {recursive: true, force: true})
      this.aborted.push(ctx.query.uploadId)
      ctx.status = 204
      ctx.body = null
      return
    }
    return next()
  }
}
