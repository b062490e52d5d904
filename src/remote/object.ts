import {type ErrorCode, UffdError} from '../core/errors.js'

/**
 * What identifies one version of a remote object. Every ranged read is checked against the
 * identity seen when the snapshot was opened: bytes of a replaced object never mix with the old.
 */
export interface ObjectIdentity {
  size: number
  etag?: string
  lastModified?: string
}

/** The codes a remote read fails with. */
export type RemoteErrorCode = Extract<ErrorCode, 'REMOTE_NOT_FOUND' | 'REMOTE_DENIED' | 'REMOTE_CHANGED' | 'REMOTE_PROTOCOL' | 'REMOTE_UNAVAILABLE'>

/**
 * A failed request to an object store. `retryable` says whether asking again can help: a 503, a
 * reset connection or a stalled body can; a 404, a 403, a changed object or a server that ignores
 * ranges cannot, and fails at once instead of after the fetch deadline.
 */
export class RemoteError extends UffdError {
  declare readonly code: RemoteErrorCode
  constructor(
    code: RemoteErrorCode,
    message: string,
    readonly retryable: boolean,
    options?: {cause?: unknown},
  ) {
    super(code, message, options)
    this.name = 'RemoteError'
  }
}

export interface ReadOptions {
  /** Abort when no byte of the response arrived for this long (the request is retried). */
  idleTimeoutMs: number
  signal?: AbortSignal
}

/**
 * One remote object read by ranges. Implementations check what servers can get wrong: the
 * status (206, never a 200 with the whole object), the Content-Range, the body's length, and the
 * object's identity (ETag, Last-Modified, size) against `expected`.
 */
export interface RemoteObject {
  /** The location as it prints in messages (no credentials). */
  readonly name: string
  /**
   * The first request: bytes [0, min(length, size)) and the object's identity (its size comes
   * from the Content-Range, so no separate HEAD is needed).
   */
  openRange(length: number, options: ReadOptions): Promise<{identity: ObjectIdentity; bytes: Buffer}>
  /** Exactly bytes [offset, offset + length) of the object version `expected`. */
  read(offset: number, length: number, expected: ObjectIdentity, options: ReadOptions): Promise<Buffer>
  /** Closes its connections: the object is not read again. */
  close(): void
}

/** Parses `bytes FIRST-LAST/SIZE` (the SIZE may be `*` only in a 416, which is not accepted here). */
export function parseContentRange(value: string | null | undefined): {first: number; last: number; size: number} | undefined {
  const match = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(value?.trim() ?? '')
  if (!match) return undefined
  const [first, last, size] = [Number(match[1]), Number(match[2]), Number(match[3])]
  if (!Number.isSafeInteger(size) || first > last || last >= size) return undefined
  return {first, last, size}
}

/**
 * Checks a 206 response's range and identity against what was asked. Throws the RemoteError a
 * wrong answer deserves: a changed object is REMOTE_CHANGED, anything else REMOTE_PROTOCOL.
 */
export function checkRangeResponse(
  name: string,
  asked: {offset: number; length: number},
  contentRange: string | null | undefined,
  got: {etag?: string; lastModified?: string},
  expected: ObjectIdentity | undefined,
): {size: number} {
  const range = parseContentRange(contentRange)
  if (!range) throw new RemoteError('REMOTE_PROTOCOL', `${name}: the server answered a range request with Content-Range ${JSON.stringify(contentRange ?? null)}`, false)
  if (expected) {
    if (range.size !== expected.size) throw changed(name, `its size is now ${range.size} bytes, was ${expected.size}`)
    if (expected.etag !== undefined && got.etag !== undefined && got.etag !== expected.etag) throw changed(name, `its ETag is now ${got.etag}, was ${expected.etag}`)
    if (expected.lastModified !== undefined && got.lastModified !== undefined && got.lastModified !== expected.lastModified) {
      throw changed(name, `it was modified at ${got.lastModified}, was ${expected.lastModified}`)
    }
  }
  const wantedLast = Math.min(asked.offset + asked.length, range.size) - 1
  if (range.first !== asked.offset || range.last !== wantedLast) {
    throw new RemoteError('REMOTE_PROTOCOL', `${name}: asked for bytes ${asked.offset}-${asked.offset + asked.length - 1}, the server sent ${range.first}-${range.last}`, false)
  }
  return {size: range.size}
}

export function changed(name: string, detail: string): RemoteError {
  return new RemoteError('REMOTE_CHANGED', `${name}: the object changed while it was in use (${detail}); start again with the new version`, false)
}

/**
 * Reads a response body into exactly `length` bytes, aborting when nothing arrives for
 * `idleTimeoutMs`. A body that ends early, or runs past `length`, is an error: a short read
 * could be a reset connection (worth a retry), a long one is a server that ignored the range.
 */
export async function readBody(name: string, body: AsyncIterable<Uint8Array>, length: number, options: ReadOptions & {abort: () => void}): Promise<Buffer> {
  const out = Buffer.allocUnsafe(length)
  let done = 0
  let timedOut = false
  let timer: NodeJS.Timeout | undefined
  const arm = (): void => {
    clearTimeout(timer)
    timer = setTimeout(() => {
      timedOut = true
      options.abort()
    }, options.idleTimeoutMs)
  }
  arm()
  try {
    for await (const piece of body) {
      if (done + piece.length > length) {
        // The rest of the body is not wanted: abort it, or its socket stays busy until the server stops.
        options.abort()
        throw new RemoteError('REMOTE_PROTOCOL', `${name}: the server sent more than the ${length} bytes asked for`, false)
      }
      out.set(piece, done)
      done += piece.length
      arm()
    }
  } catch (error) {
    if (error instanceof RemoteError) throw error
    if (timedOut) throw new RemoteError('REMOTE_UNAVAILABLE', `${name}: no data for ${options.idleTimeoutMs} ms (idle timeout)`, true)
    if (options.signal?.aborted) throw error
    throw new RemoteError('REMOTE_UNAVAILABLE', `${name}: the response broke off after ${done} of ${length} bytes (${(error as Error).message})`, true, {cause: error})
  } finally {
    clearTimeout(timer)
  }
  if (done !== length) throw new RemoteError('REMOTE_UNAVAILABLE', `${name}: the response ended after ${done} of ${length} bytes`, true)
  return out
}

/**
 * Whether an error code is a TLS failure: a certificate that does not verify (expired, self-signed,
 * another host's) or a handshake no cipher satisfies. Asking again meets the same certificate.
 */
export function isTlsError(code: string | undefined): boolean {
  if (code === undefined) return false
  return /^(ERR_TLS_|ERR_SSL_|CERT_|UNABLE_TO_(GET|VERIFY|DECRYPT)_|DEPTH_ZERO_SELF_SIGNED_CERT$|SELF_SIGNED_CERT_IN_CHAIN$|HOSTNAME_MISMATCH$)/.test(code)
}

/** A thrown error as a RemoteError: network failures (resets, refused connections, DNS) can be retried; TLS failures cannot. */
export function networkError(name: string, error: unknown, timedOut: boolean, idleTimeoutMs: number): RemoteError {
  if (error instanceof RemoteError) return error
  if (timedOut) return new RemoteError('REMOTE_UNAVAILABLE', `${name}: no response for ${idleTimeoutMs} ms (idle timeout)`, true)
  const cause = (error as {cause?: {code?: string; message?: string}}).cause
  const code = cause?.code ?? (error as {code?: string}).code
  if (isTlsError(code)) {
    return new RemoteError('REMOTE_PROTOCOL', `${name}: TLS failed (${code}: ${cause?.message ?? (error as Error).message}); not retried`, false, {cause: error})
  }
  const detail = cause?.code ?? cause?.message ?? (error as Error).message
  return new RemoteError('REMOTE_UNAVAILABLE', `${name}: ${detail}`, true, {cause: error})
}
