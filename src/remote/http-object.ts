import http from 'node:http'
import https from 'node:https'

import {checkRangeResponse, networkError, type ObjectIdentity, readBody, type ReadOptions, RemoteError, type RemoteObject} from './object.js'

/** Redirects followed for one request, at most (a presigned URL behind a CDN, an artifact server's storage). */
const MAX_REDIRECTS = 5

/**
 * An object behind an HTTP(S) URL (a presigned URL, an artifact server, a CDN), read with plain
 * range requests. Conditional headers ask the server to refuse a replaced object (If-Match needs
 * a strong ETag; else If-Unmodified-Since), and every answer is checked as well, since caches
 * and simple servers ignore them. Requests go through this object's own connection pool of at
 * most `sockets` connections (node:http's Agent; the fetcher passes --fetch-concurrency), kept
 * alive between requests; close() ends them.
 */
export class HttpObject implements RemoteObject {
  private readonly agents: {http: http.Agent; https: https.Agent}

  constructor(
    private readonly url: string,
    readonly name: string,
    sockets = Infinity,
  ) {
    const pool = {keepAlive: true, maxSockets: sockets, maxFreeSockets: Number.isFinite(sockets) ? sockets : 256}
    this.agents = {http: new http.Agent(pool), https: new https.Agent(pool)}
  }

  async openRange(length: number, options: ReadOptions): Promise<{identity: ObjectIdentity; bytes: Buffer}> {
    const answer = await this.request(0, length, undefined, options)
    const identity: ObjectIdentity = {size: answer.size, ...validators(answer.response)}
    const bytes = await this.body(answer, Math.min(length, answer.size), options)
    return {identity, bytes}
  }

  async read(offset: number, length: number, expected: ObjectIdentity, options: ReadOptions): Promise<Buffer> {
    return this.body(await this.request(offset, length, expected, options), length, options)
  }

  /** Closes the pool's connections (requests under way fail). */
  close(): void {
    this.agents.http.destroy()
    this.agents.https.destroy()
  }

  /** Sends one range request and checks its status and headers; the body is still to be read. */
  private async request(offset: number, length: number, expected: ObjectIdentity | undefined, options: ReadOptions): Promise<Answer> {
    const headers: Record<string, string> = {
      range: `bytes=${offset}-${offset + length - 1}`,
      // A compressed range answer would not be the stored bytes at those offsets.
      'accept-encoding': 'identity',
    }
    if (expected?.etag && !expected.etag.startsWith('W/')) headers['if-match'] = expected.etag
    else if (expected?.lastModified) headers['if-unmodified-since'] = expected.lastModified
    let url = new URL(this.url)
    for (let redirects = 0; ; redirects++) {
      const response = await this.send(url, headers, options)
      const location = response.headers.location
      if (response.statusCode !== undefined && REDIRECTS.has(response.statusCode) && location !== undefined) {
        response.destroy()
        if (redirects >= MAX_REDIRECTS) throw new RemoteError('REMOTE_PROTOCOL', `${this.name}: more than ${MAX_REDIRECTS} redirects`, false)
        const next = new URL(location, url)
        // Bytes fetched over https must not come over plain http after a redirect (a man in the
        // middle could then change them; only the CRCs would stand between them and the guest).
        if (url.protocol === 'https:' && next.protocol === 'http:') throw new RemoteError('REMOTE_PROTOCOL', `${this.name}: redirected from https to plain http (${next.host}): refused`, false)
        url = next
        continue
      }
      const abort = (): void => {
        response.destroy()
      }
      if (response.statusCode !== 206) {
        // An unread body holds its connection until the server finishes sending it.
        abort()
        throw statusError(this.name, response.statusCode ?? 0, offset)
      }
      try {
        const contentRange = response.headers['content-range']
        const {size} = checkRangeResponse(this.name, {offset, length}, contentRange, validators(response), expected)
        return {response, size, abort}
      } catch (error) {
        abort()
        throw error
      }
    }
  }

  /** One request, up to its response's headers, within the idle timeout; aborted with options.signal. */
  private send(url: URL, headers: Record<string, string>, options: ReadOptions): Promise<http.IncomingMessage> {
    const secure = url.protocol === 'https:'
    if (!secure && url.protocol !== 'http:') return Promise.reject(new RemoteError('REMOTE_PROTOCOL', `${this.name}: redirected to ${url.protocol} (only http and https are read)`, false))
    return new Promise((resolve, reject) => {
      let timedOut = false
      const request = (secure ? https : http).request(url, {headers, agent: secure ? this.agents.https : this.agents.http})
      const onAbort = (): void => {
        request.destroy(options.signal?.reason instanceof Error ? options.signal.reason : new Error('aborted'))
      }
      const timer = setTimeout(() => {
        timedOut = true
        request.destroy()
      }, options.idleTimeoutMs)
      const done = (): void => {
        clearTimeout(timer)
        options.signal?.removeEventListener('abort', onAbort)
      }
      options.signal?.addEventListener('abort', onAbort, {once: true})
      request.on('response', (response) => {
        done()
        resolve(response)
      })
      request.on('error', (error) => {
        done()
        reject(options.signal?.aborted ? error : networkError(this.name, error, timedOut, options.idleTimeoutMs))
      })
      request.end()
    })
  }

  private async body(answer: Answer, length: number, options: ReadOptions): Promise<Buffer> {
    options.signal?.addEventListener('abort', answer.abort, {once: true})
    try {
      return await readBody(this.name, answer.response, length, {...options, abort: answer.abort})
    } finally {
      options.signal?.removeEventListener('abort', answer.abort)
    }
  }
}

const REDIRECTS = new Set([301, 302, 303, 307, 308])

/** A checked 206 answer whose body is still to be read, and how to abort reading it. */
interface Answer {
  response: http.IncomingMessage
  size: number
  abort: () => void
}

function validators(response: http.IncomingMessage): {etag?: string; lastModified?: string} {
  const etag = response.headers.etag
  const lastModified = response.headers['last-modified']
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
