import http from 'node:http'
import https from 'node:https'

import {GetObjectCommand, S3Client, S3ServiceException} from '@aws-sdk/client-s3'

import {checkRangeResponse, networkError, type ObjectIdentity, readBody, type ReadOptions, RemoteError, type RemoteObject} from './object.js'

/** How to reach S3: only the endpoint is ours to say; credentials, region and profiles come from the standard AWS chain. */
export interface S3Settings {
  /** An S3-compatible endpoint (--s3-endpoint); else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself. */
  endpoint?: string
}

// The SDK warns on every run under Node 20 that versions published after January 2027 will need
// Node 22. The version this package pins supports Node 20, and the warning on stderr would land in
// every script's output, so it is turned off unless the user asked for it explicitly.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'

/**
 * An S3 client for `settings`. A custom endpoint gets path-style addressing (s3://BUCKET/KEY as
 * ENDPOINT/BUCKET/KEY: S3-compatible servers rarely have per-bucket host names). Checksums of
 * requests and responses are computed only where S3 requires them: S3-compatible servers do not
 * all know the SDK's newer checksum headers, and every stored unit is checked against its own
 * CRC anyway. `maxAttempts` is the SDK's own retrying (the fetcher retries reads itself, with
 * its deadline, and passes 1). `sockets` sizes the connection pool (the fetcher's
 * --fetch-concurrency): the SDK's own pool of 50 would queue requests past it inside the agent,
 * where their idle timeouts run while nothing was sent.
 */
export function s3Client(settings: S3Settings, maxAttempts?: number, sockets?: number): S3Client {
  const endpoint = settings.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL
  return new S3Client({
    ...(endpoint ? {endpoint, forcePathStyle: true} : {}),
    region: regionProvider(),
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    ...(maxAttempts === undefined ? {} : {maxAttempts}),
    ...(sockets === undefined
      ? {}
      : {requestHandler: {httpAgent: new http.Agent({keepAlive: true, maxSockets: sockets}), httpsAgent: new https.Agent({keepAlive: true, maxSockets: sockets})}}),
  })
}

/**
 * The region from the standard chain (AWS_REGION, the profile's config), else us-east-1: custom
 * endpoints rarely care, and AWS redirects a wrong region with an error that names the right one.
 */
function regionProvider(): () => Promise<string> {
  let region: Promise<string> | undefined
  return () =>
    (region ??= (async () => {
      try {
        return await new S3Client({}).config.region()
      } catch {
        return 'us-east-1'
      }
    })())
}

/** An S3 object read by ranged GETs through the AWS SDK, each conditional on the ETag first seen. */
export class S3Object implements RemoteObject {
  readonly name: string

  constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly key: string,
  ) {
    this.name = `s3://${bucket}/${key}`
  }

  close(): void {
    this.client.destroy()
  }

  async openRange(length: number, options: ReadOptions): Promise<{identity: ObjectIdentity; bytes: Buffer}> {
    const answer = await this.get(0, length, undefined, options)
    return {identity: answer.identity, bytes: await this.body(answer, Math.min(length, answer.identity.size), options)}
  }

  async read(offset: number, length: number, expected: ObjectIdentity, options: ReadOptions): Promise<Buffer> {
    return this.body(await this.get(offset, length, expected, options), length, options)
  }

  private async get(offset: number, length: number, expected: ObjectIdentity | undefined, options: ReadOptions): Promise<S3Answer> {
    const controller = new AbortController()
    const abort = (): void => controller.abort()
    options.signal?.addEventListener('abort', abort, {once: true})
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      controller.abort()
    }, options.idleTimeoutMs)
    try {
      const command = new GetObjectCommand({Bucket: this.bucket, Key: this.key, Range: `bytes=${offset}-${offset + length - 1}`, ...(expected?.etag ? {IfMatch: expected.etag} : {})})
      const output = await this.client.send(command, {abortSignal: controller.signal})
      const got = {...(output.ETag ? {etag: output.ETag} : {}), ...(output.LastModified ? {lastModified: output.LastModified.toUTCString()} : {})}
      try {
        if (!output.ContentRange) throw new RemoteError('REMOTE_PROTOCOL', `${this.name}: the server ignored the range request (no Content-Range); it must support ranged GETs`, false)
        const {size} = checkRangeResponse(this.name, {offset, length}, output.ContentRange, got, expected)
        return {body: output.Body as AsyncIterable<Uint8Array> | undefined, identity: {size, ...got}, abort}
      } catch (error) {
        // An unread body holds its pooled socket until the server finishes sending it.
        ;(output.Body as {destroy?: () => void} | undefined)?.destroy?.()
        throw error
      }
    } catch (error) {
      if (options.signal?.aborted) throw error
      throw s3Error(this.name, error, timedOut, options.idleTimeoutMs)
    } finally {
      clearTimeout(timer)
    }
  }

  private async body(answer: S3Answer, length: number, options: ReadOptions): Promise<Buffer> {
    if (!answer.body) throw new RemoteError('REMOTE_PROTOCOL', `${this.name}: an answer without a body`, false)
    return readBody(this.name, answer.body, length, {...options, abort: answer.abort})
  }
}

interface S3Answer {
  body: AsyncIterable<Uint8Array> | undefined
  identity: ObjectIdentity
  abort: () => void
}

/** What an SDK error means here: which are worth a retry, and a message that says what to fix. */
export function s3Error(name: string, error: unknown, timedOut: boolean, idleTimeoutMs: number): RemoteError {
  if (error instanceof RemoteError) return error
  const e = error as {name?: string; message?: string; $metadata?: {httpStatusCode?: number}; $retryable?: unknown}
  const status = e.$metadata?.httpStatusCode
  if (e.name === 'CredentialsProviderError') {
    return new RemoteError('REMOTE_DENIED', `${name}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials)`, false, {cause: error})
  }
  if (e.name === 'NoSuchKey' || e.name === 'NotFound' || (status === 404 && e.name !== 'NoSuchBucket')) return new RemoteError('REMOTE_NOT_FOUND', `${name}: no such object`, false, {cause: error})
  if (e.name === 'NoSuchBucket') return new RemoteError('REMOTE_NOT_FOUND', `${name}: no such bucket`, false, {cause: error})
  if (e.name === 'PreconditionFailed' || status === 412) return new RemoteError('REMOTE_CHANGED', `${name}: the object changed while it was in use (412 to If-Match); start again with the new version`, false, {cause: error})
  // Expired session credentials answer 400, not 403: still a refusal no retry fixes.
  if (status === 401 || status === 403 || ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'ExpiredToken', 'TokenRefreshRequired', 'InvalidToken'].includes(e.name ?? '')) {
    return new RemoteError('REMOTE_DENIED', `${name}: access denied (${e.name ?? status}: ${e.message ?? ''})`, false, {cause: error})
  }
  if (e.name === 'InvalidRange' || status === 416) return new RemoteError('REMOTE_PROTOCOL', `${name}: the range lies past the end of the object (${e.message ?? 416})`, false, {cause: error})
  if (error instanceof S3ServiceException) {
    const retryable = status === undefined || status === 408 || status === 429 || status >= 500 || e.name === 'SlowDown'
    return new RemoteError(retryable ? 'REMOTE_UNAVAILABLE' : 'REMOTE_PROTOCOL', `${name}: ${e.name}${status ? ` (HTTP ${status})` : ''}: ${e.message ?? ''}`, retryable, {cause: error})
  }
  return networkError(name, error, timedOut, idleTimeoutMs)
}
