import os from 'node:os'
import path from 'node:path'

import {UffdError} from '../core/errors.js'

/** Where a snapshot (or any file uffd reads or writes) lives: a local path, an HTTP(S) URL or an S3 object. */
export type Location = {kind: 'file'; path: string} | {kind: 'http'; url: string} | {kind: 's3'; bucket: string; key: string}

const SCHEME = /^([a-z][a-z0-9+.-]*):\/\//i

/**
 * Reads a command-line location. Anything without a `scheme://` is a local path (so a file
 * named `host:port` still works); an unknown scheme is a usage error, never read as a path.
 */
export function parseLocation(text: string): Location {
  const scheme = SCHEME.exec(text)?.[1]?.toLowerCase()
  if (scheme === undefined) return {kind: 'file', path: text}
  if (scheme === 'http' || scheme === 'https') {
    let url: URL
    try {
      url = new URL(text)
    } catch {
      throw new UffdError('USAGE', `${text} is not a valid URL`)
    }
    if (!url.hostname) throw new UffdError('USAGE', `${text} names no host`)
    return {kind: 'http', url: url.href}
  }
  if (scheme === 's3') {
    const rest = text.slice('s3://'.length)
    const slash = rest.indexOf('/')
    const bucket = slash < 0 ? rest : rest.slice(0, slash)
    const key = slash < 0 ? '' : rest.slice(slash + 1)
    if (!bucket) throw new UffdError('USAGE', `${text} names no bucket (expected s3://BUCKET/KEY)`)
    if (!key || key.endsWith('/')) throw new UffdError('USAGE', `${text} names no object key (expected s3://BUCKET/KEY)`)
    return {kind: 's3', bucket, key}
  }
  throw new UffdError('USAGE', `${text}: unknown scheme ${scheme}:// (a local path, http://, https:// or s3://BUCKET/KEY)`)
}

/** How a location prints in messages and reports. Query strings (presigned URLs carry credentials in them) are left out. */
export function describeLocation(location: Location): string {
  if (location.kind === 'file') return location.path
  if (location.kind === 's3') return `s3://${location.bucket}/${location.key}`
  const url = new URL(location.url)
  return `${url.origin}${url.pathname}${url.search ? '?…' : ''}`
}

export function isRemote(location: Location): location is Exclude<Location, {kind: 'file'}> {
  return location.kind !== 'file'
}

/**
 * The default cache directory: /var/cache/uffd for root (shared by every handler on the host),
 * else $XDG_CACHE_HOME/uffd or ~/.cache/uffd.
 */
export function defaultCacheRoot(): string {
  if (process.getuid?.() === 0) return '/var/cache/uffd'
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache')
  return path.join(base, 'uffd')
}
