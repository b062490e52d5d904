import {checkRangeResponse, networkError, type ObjectIdentity, readBody, type ReadOptions, RemoteError, type RemoteObject} from './object.js'

/**
 * An object behind an HTTP(S) URL (a presigned URL, an artifact server, a CDN), read with plain
 * range requests. Conditional headers ask the server to refuse a replaced object (If-Match needs
 * a strong ETag; else If-Unmodified-Since), and every answer is checked as well, since caches
 * and simple servers ignore them.
 */
export class HttpObject implements RemoteObject {
  constructor(
    private readonly url: string,
    readonly name: string,
  ) {}

  async openRange(length: number, options: ReadOptions): Promise<{identity: ObjectIdentity; bytes: Buffer}> {
    const answer = await this.request(0, length, undefined, options)
    const identity: ObjectIdentity = {size: answer.size, ...validators(answer.response)}
    const bytes = await this.body(answer, Math.min(length, answer.size), options)
    return {identity, bytes}
  }

  async read(offset: number, length: number, expected: ObjectIdentity, options: ReadOptions): Promise<Buffer> {
    return this.body(await this.request(offset, length, expected, options), length, options)
  }

  /** Sends one range request and checks its status and headers; the body is still to be read. */
  private async request(offset: number, length: number, expected: ObjectIdentity | undefined, options: ReadOptions): Promise<Answer> {
    const controller = new AbortController()
    const abort = (): void => controller.abort()
    options.signal?.addEventListener('abort', abort, {once: true})
    const headers: Record<string, string> = {
      range: `bytes=${offset}-${offset + length - 1}`,
      // A compressed range answer would not be the stored bytes at those offsets.
      'accept-encoding': 'identity',
    }
    if (expected?.etag && !expected.etag.startsWith('W/')) headers['if-match'] = expected.etag
    else if (expected?.lastModified) headers['if-unmodified-since'] = expected.lastModified
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      controller.abort()
    }, options.idleTimeoutMs)
    let response: Response
    try {
      response = await fetch(this.url, {headers, signal: controller.signal, redirect: 'follow'})
    } catch (error) {
      if (options.signal?.aborted) throw error
      throw networkError(this.name, error, timedOut, options.idleTimeoutMs)
    } finally {
      clearTimeout(timer)
    }
    if (response.status !== 206) {
      await response.body?.cancel().catch(() => {})
      throw statusError(this.name, response.status, offset)
    }
    try {
      const {size} = checkRangeResponse(this.name, {offset, length}, response.headers.get('content-range'), validators(response), expected)
      return {response, size, abort}
    } catch (error) {
      // An unread body holds its connection until the server finishes sending it.
      await response.body?.cancel().catch(() => {})
      throw error
    }
  }

  private async body(answer: Answer, length: number, options: ReadOptions): Promise<Buffer> {
    if (!answer.response.body) throw new RemoteError('REMOTE_PROTOCOL', `${this.name}: a 206 answer without a body`, false)
    return readBody(this.name, answer.response.body as unknown as AsyncIterable<Uint8Array>, length, {...options, abort: answer.abort})
  }
}

/** A checked 206 answer whose body is still to be read, and how to abort reading it. */
interface Answer {
  response: Response
  size: number
  abort: () => void
}

function validators(response: Response): {etag?: string; lastModified?: string} {
  const etag = response.headers.get('etag') ?? undefined
  const lastModified = response.headers.get('last-modified') ?? undefined
  return {...(etag === undefined ? {} : {etag}), ...(lastModified === undefined ? {} : {lastModified})}
}

/** What a status other than 206 means for a range request. */
function statusError(name: string, status: number, offset: number): RemoteError {
  if (status === 200) return new RemoteError('REMOTE_PROTOCOL', `${name}: the server ignored the range request (200 with the whole object instead of 206); it must support HTTP ranges`, false)
  if (status === 404 || status === 410) return new RemoteError('REMOTE_NOT_FOUND', `${name}: not found (HTTP ${status})`, false)
  if (status === 401 || status === 403) return new RemoteError('REMOTE_DENIED', `${name}: access denied (HTTP ${status}; an expired presigned URL answers 403)`, false)
  if (status === 412) return new RemoteError('REMOTE_CHANGED', `${name}: the object changed while it was in use (HTTP 412 to If-Match); start again with the new version`, false)
  if (status === 416) return new RemoteError('REMOTE_PROTOCOL', `${name}: the server says byte ${offset} is past the end of the object (HTTP 416)`, false)
  const retryable = status === 408 || status === 429 || status >= 500
  return new RemoteError(retryable ? 'REMOTE_UNAVAILABLE' : 'REMOTE_PROTOCOL', `${name}: HTTP ${status}`, retryable)
}
