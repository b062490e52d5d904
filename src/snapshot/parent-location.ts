import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {describeLocation, type Location, parseLocation} from '../remote/location.js'

/**
 * Where a layer's ancestors are looked for (docs/FORMAT.md, Layers): a layer records each one by
 * file name, so the same chain resolves wherever its files were copied together. Pure: no I/O.
 */

/** What `--layers` names: a local directory, an S3 prefix (bucket and key prefix) or an HTTP(S) directory URL. */
export type LayersPrefix = {kind: 'file'; dir: string} | {kind: 's3'; bucket: string; prefix: string} | {kind: 'http'; url: string}

/** Reads `--layers`: a directory, `s3://BUCKET[/PREFIX]` or `http(s)://HOST/DIR/`; anything else is USAGE. */
export function parseLayersPrefix(text: string): LayersPrefix {
  if (text.startsWith('s3://') || text.startsWith('S3://')) {
    const rest = text.slice('s3://'.length)
    const slash = rest.indexOf('/')
    const bucket = slash < 0 ? rest : rest.slice(0, slash)
    if (!bucket) throw new UffdError('USAGE', `--layers ${text} names no bucket (expected s3://BUCKET/PREFIX/)`)
    return {kind: 's3', bucket, prefix: slash < 0 ? '' : rest.slice(slash + 1)}
  }
  const location = parseLocation(text)
  if (location.kind === 'file') return {kind: 'file', dir: location.path}
  if (location.kind === 'http') {
    const url = new URL(location.url)
    url.search = ''
    url.hash = ''
    // A directory: a name is looked for below it, not beside it (URL resolution drops a last segment).
    if (!url.pathname.endsWith('/')) url.pathname += '/'
    return {kind: 'http', url: url.href}
  }
  return {kind: 's3', bucket: location.bucket, prefix: location.key}
}

/** The prefix of the directory a file is in: what a layer's parents are looked for in by default. */
export function prefixOf(location: Location): LayersPrefix {
  if (location.kind === 'file') return {kind: 'file', dir: path.dirname(location.path)}
  if (location.kind === 's3') {
    const slash = location.key.lastIndexOf('/')
    return {kind: 's3', bucket: location.bucket, prefix: slash < 0 ? '' : location.key.slice(0, slash + 1)}
  }
  // The URL's directory, without its query: a presigned URL's signature is for that one object.
  const url = new URL('./', location.url)
  url.search = ''
  url.hash = ''
  return {kind: 'http', url: url.href}
}

/** The location of the file called `name` (a recorded parent name: no slash, not . or ..) under `prefix`. */
export function locationIn(prefix: LayersPrefix, name: string): Location {
  if (name === '' || name.includes('/') || name === '.' || name === '..') throw new RangeError(`${JSON.stringify(name)} is not a file name`)
  if (prefix.kind === 'file') return {kind: 'file', path: path.join(prefix.dir, name)}
  if (prefix.kind === 's3') return {kind: 's3', bucket: prefix.bucket, key: prefix.prefix === '' || prefix.prefix.endsWith('/') ? `${prefix.prefix}${name}` : `${prefix.prefix}/${name}`}
  return {kind: 'http', url: new URL(encodeURIComponent(name), prefix.url).href}
}

/** How a prefix prints in messages. */
export function describePrefix(prefix: LayersPrefix): string {
  if (prefix.kind === 'file') return prefix.dir
  if (prefix.kind === 's3') return `s3://${prefix.bucket}/${prefix.prefix}`
  return describeLocation({kind: 'http', url: prefix.url})
}

/** The last part of a location's path: the name a layer records for it as a parent. */
export function fileNameOf(location: Location): string {
  if (location.kind === 'file') return path.basename(location.path)
  if (location.kind === 's3') return location.key.slice(location.key.lastIndexOf('/') + 1)
  return decodeURIComponent(new URL(location.url).pathname.split('/').at(-1) ?? '')
}
