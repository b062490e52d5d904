import {once} from 'node:events'
import {PassThrough} from 'node:stream'

import {AbortMultipartUploadCommand, HeadObjectCommand, type S3Client} from '@aws-sdk/client-s3'
import {Upload} from '@aws-sdk/lib-storage'

import {UffdError} from '../core/errors.js'
import {type OutputSink} from '../snapshot/output-sink.js'
import {RemoteError} from './object.js'
import {s3Client, s3Error, type S3Settings} from './s3-object.js'

/** S3 allows 10,000 parts; part sizes leave room for an estimate that falls short. */
const PLANNED_PARTS = 9000
const MIN_PART_BYTES = 8 << 20
/** Parts in flight at once. Memory held: about (UPLOAD_QUEUE + 1) parts. */
const UPLOAD_QUEUE = 4
/** How long a discard waits for parts in flight to settle before aborting the upload by its id. */
const DISCARD_WAIT_MS = 30_000
/** How long that AbortMultipartUpload may take (a store that stopped answering must not hold the exit). */
const ABORT_TIMEOUT_MS = 10_000

/** The part size for an object of about `sizeHint` bytes: at least 8 MiB, whole MiB, under S3's part limit. */
export function partSizeFor(sizeHint: number): number {
  const mib = 1 << 20
  return Math.max(MIN_PART_BYTES, Math.ceil(sizeHint / PLANNED_PARTS / mib) * mib)
}

/** Whether the object exists (HeadObject); a missing bucket, denied access and the like are errors. */
export async function s3ObjectExists(client: S3Client, bucket: string, key: string): Promise<boolean> {
  const name = `s3://${bucket}/${key}`
  try {
    await client.send(new HeadObjectCommand({Bucket: bucket, Key: key}))
    return true
  } catch (error) {
    const mapped = s3Error(name, error, false, 0)
    // A HEAD answer has no body, so a missing bucket is a plain 404 too: the upload names it.
    if (mapped.code === 'REMOTE_NOT_FOUND') return false
    throw mapped
  }
}

/**
 * An S3 object written as it is produced: a multipart upload through `@aws-sdk/lib-storage`'s
 * Upload, fed by a stream. Parts go out while later bytes are still being produced, at most
 * UPLOAD_QUEUE at once; drain() holds the producer back while they do, so memory stays at a few
 * parts whatever the object's size. Nothing is visible at the key until commit() completes the
 * upload (CompleteMultipartUpload, or one PutObject for an object smaller than a part).
 *
 * discard() ends the body stream with an error. Upload then stops, lets the parts in flight
 * finish, and sends AbortMultipartUpload before done() settles, so no part sent later can
 * outlive the abort; discard() waits for that (bounded by DISCARD_WAIT_MS, after which it aborts
 * by the upload's id itself).
 */
export class S3UploadSink implements OutputSink {
  readonly destination: string
  size = 0
  private readonly body: PassThrough
  private readonly upload: Upload
  private readonly done: Promise<unknown>
  private failure: UffdError | undefined
  private state: 'open' | 'committing' | 'committed' | 'discarded' = 'open'

  private constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly key: string,
    sizeHint: number,
  ) {
    this.destination = `s3://${bucket}/${key}`
    this.body = new PassThrough({highWaterMark: 1 << 20})
    // Failed requests are noted as they happen, not only when done() settles (which waits for
    // every part uploader, including those still being fed): the producer stops at once.
    client.middlewareStack.add(
      (next) => async (args) => {
        try {
          return await next(args)
        } catch (error) {
          this.failure ??= s3Error(this.destination, error, false, 0)
          throw error
        }
      },
      {step: 'initialize'},
    )
    this.upload = new Upload({
      client,
      params: {Bucket: bucket, Key: key, Body: this.body, ContentType: 'application/octet-stream'},
      queueSize: UPLOAD_QUEUE,
      partSize: partSizeFor(sizeHint),
      leavePartsOnError: false,
    })
    this.done = this.upload.done()
    this.done.catch((error: unknown) => {
      if (this.state === 'open') this.failure ??= this.mapped(error)
    })
  }

  /**
   * Checks s3://bucket/key before any work is done: without `force`, an existing object is
   * OUTPUT_EXISTS (HeadObject; asked with `force` too, so that denied access or missing
   * credentials fail now rather than at the first part). The check is not atomic: another writer
   * can create the key between it and this upload's completion, and the later completion wins.
   * Returns the opener of the upload, for when the writer knows about how large it will be.
   */
  static async prepare(settings: S3Settings, bucket: string, key: string, options: {force: boolean}): Promise<(sizeHint: number) => S3UploadSink> {
    const client = s3Client(settings)
    try {
      const exists = await s3ObjectExists(client, bucket, key)
      if (exists && !options.force) throw new UffdError('OUTPUT_EXISTS', `s3://${bucket}/${key} exists (use --force to replace it)`)
    } catch (error) {
      client.destroy()
      throw error
    }
    return (sizeHint) => new S3UploadSink(client, bucket, key, sizeHint)
  }

  append(bytes: Uint8Array): number {
    if (this.failure) throw this.failure
    if (this.state !== 'open') throw new UffdError('INTERNAL', `${this.destination}: append after the upload was ${this.state}`)
    const at = this.size
    // A copy: the stream holds it until its part is sent, and callers may reuse their buffers.
    this.body.write(Buffer.from(bytes))
    this.size += bytes.length
    return at
  }

  async drain(signal?: AbortSignal): Promise<void> {
    if (this.failure) throw this.failure
    if (!this.body.writableNeedDrain) return
    const controller = new AbortController()
    const stop = (): void => controller.abort()
    signal?.addEventListener('abort', stop, {once: true})
    try {
      // The upload's failure settles done(); whichever comes first ends the wait.
      await Promise.race([once(this.body, 'drain', {signal: controller.signal}), this.done.then(() => undefined)])
    } catch (error) {
      if (signal?.aborted) signal.throwIfAborted()
      if (this.failure) throw this.failure
      throw this.mapped(error)
    } finally {
      controller.abort()
      signal?.removeEventListener('abort', stop)
    }
    if (this.failure) throw this.failure
  }

  async commit(): Promise<void> {
    if (this.failure) throw this.failure
    this.state = 'committing'
    this.body.end()
    try {
      await this.done
    } catch (error) {
      throw this.failure ?? this.mapped(error)
    }
    this.state = 'committed'
    this.client.destroy()
  }

  async discard(): Promise<void> {
    if (this.state === 'committed' || this.state === 'discarded') return
    this.state = 'discarded'
    // An error, not an end: an ended stream would complete the upload with what it has.
    this.body.destroy(new UffdError('INTERRUPTED', `${this.destination}: upload discarded`))
    let timer: NodeJS.Timeout | undefined
    await Promise.race([this.done.catch(() => {}), new Promise((resolve) => (timer = setTimeout(resolve, DISCARD_WAIT_MS)))])
    clearTimeout(timer)
    try {
      const uploadId = this.upload.uploadId
      if (uploadId === undefined) return
      // Upload has sent AbortMultipartUpload before done() settled, unless that failed or the
      // parts in flight did not settle in time: abort by the id once more. NoSuchUpload means
      // it is gone already.
      try {
        await this.client.send(new AbortMultipartUploadCommand({Bucket: this.bucket, Key: this.key, UploadId: uploadId}), {abortSignal: AbortSignal.timeout(ABORT_TIMEOUT_MS)})
      } catch (error) {
        const e = error as {name?: string; $metadata?: {httpStatusCode?: number}}
        if (e.name === 'NoSuchUpload' || e.$metadata?.httpStatusCode === 404) return
        process.stderr.write(
          `uffd: ${this.destination}: could not abort multipart upload ${uploadId} (${(error as Error).message}); its parts are kept (and billed) until it is aborted ` +
            `(aws s3api abort-multipart-upload --bucket ${this.bucket} --key ${this.key} --upload-id ${uploadId}) or a lifecycle rule removes it\n`,
        )
      }
    } finally {
      this.client.destroy()
    }
  }

  private mapped(error: unknown): RemoteError | UffdError {
    if (error instanceof UffdError) return error
    return s3Error(this.destination, error, false, 0)
  }
}
