import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {describeLocation, isRemote, type Location, parseLocation} from '../remote/location.js'
import {type S3Settings} from '../remote/s3-object.js'
import {AtomicFile} from './atomic-file.js'
import {type OutputSink} from './output-sink.js'

/** Where a command writes a snapshot: a local path or s3://BUCKET/KEY. */
export type OutputLocation = Extract<Location, {kind: 'file'} | {kind: 's3'}>

/**
 * Reads an output location from the command line. http(s):// is read-only, and file modes mean
 * nothing to an object store (its access is the bucket's policy): both are USAGE errors, found
 * before any work is done.
 */
export function outputLocation(text: string, options: {mode?: number; flag?: string} = {}): OutputLocation {
  const location = parseLocation(text)
  const flag = options.flag ?? 'the output'
  if (location.kind === 'http') throw new UffdError('USAGE', `${describeLocation(location)}: ${flag} cannot be an http(s):// URL (read-only); write to a path or s3://BUCKET/KEY`)
  if (location.kind === 's3' && options.mode !== undefined) throw new UffdError('USAGE', `--mode applies to local files only, not to ${describeLocation(location)} (access to an object is the bucket's policy)`)
  return location
}

/**
 * Where a command writes a file it then rewrites into the output (a snapshot or layer before its
 * working set is attached): beside a local output (same filesystem, its space), in $TMPDIR for
 * an upload. The caller removes it.
 */
export function asidePath(location: OutputLocation): string {
  if (location.kind !== 'file') return path.join(os.tmpdir(), `.uffd-${process.pid}.unattached.tmp`)
  return path.join(path.dirname(path.resolve(location.path)), `.${path.basename(location.path)}.${process.pid}.unattached.tmp`)
}

/** An output checked before any work, opened once the writer knows about how large it will be. */
export interface PreparedOutput {
  readonly destination: string
  readonly location: OutputLocation
  open(sizeHint: number): OutputSink
}

/**
 * Checks an output before work starts: without `force`, an existing file or object is
 * OUTPUT_EXISTS (for S3 a HeadObject, which is not atomic: see S3UploadSink.prepare). A local
 * output is an AtomicFile created with `mode`; an S3 one a multipart upload sized for `sizeHint`.
 */
export async function prepareOutput(location: OutputLocation, options: {force: boolean; mode?: number; s3: S3Settings}): Promise<PreparedOutput> {
  const destination = describeLocation(location)
  if (location.kind === 'file') {
    if (!options.force && fs.existsSync(location.path)) throw new UffdError('OUTPUT_EXISTS', `${location.path} exists (use --force to replace it)`)
    return {destination, location, open: () => new AtomicFile(location.path, {mode: options.mode})}
  }
  // Loaded only for an upload: the AWS SDK takes most of a second to import.
  const {S3UploadSink} = await import('../remote/s3-upload.js')
  const open = await S3UploadSink.prepare(options.s3, location.bucket, location.key, {force: options.force})
  return {destination, location, open}
}

/** Which of `chain`'s files (paths or URLs as they print) `output` is, by any name or hard link, or the same object; undefined if none. */
export function chainFileAt(output: Location, chain: readonly string[]): string | undefined {
  if (output.kind !== 'file') return chain.find((p) => p === describeLocation(output))
  const out = fs.statSync(output.path, {throwIfNoEntry: false})
  if (!out) return undefined
  return chain.find((p) => {
    if (isRemote(parseLocation(p))) return false
    const s = fs.statSync(p, {throwIfNoEntry: false})
    return s !== undefined && s.dev === out.dev && s.ino === out.ino
  })
}
