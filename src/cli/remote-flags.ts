import {UffdError} from '../core/errors.js'
import {parseDuration, parseSize} from '../core/units.js'
import {defaultCacheRoot} from '../remote/location.js'
import {type RemoteOptions} from '../remote/remote-snapshot.js'
import {type S3Settings} from '../remote/s3-object.js'
import {type FlagSpec} from './flag-specs.js'

/** Flags of every command that reads a snapshot which may live in object storage (build oclif's with oclifFlags). */
export const remoteFlagSpecs = {
  's3-endpoint': {kind: 'string', summary: 'S3-compatible endpoint for s3:// locations (path-style addressing) [default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS]. Credentials and region come from the standard AWS chain.', helpGroup: 'REMOTE'},
  'cache-dir': {kind: 'string', summary: 'Local cache of chunks fetched from s3:// or http(s):// snapshots, shared by every handler on the host [default: /var/cache/uffd for root, else $XDG_CACHE_HOME/uffd or ~/.cache/uffd].', helpGroup: 'REMOTE'},
  'cache-dir-max': {kind: 'string', summary: 'Bytes the --cache-dir may hold; the least recently read chunks are evicted beyond it.', default: '10G', helpGroup: 'REMOTE'},
  'fetch-concurrency': {kind: 'integer', summary: 'Ranged requests in flight at once, at most, and connections open to the store (demand faults always get a slot).', default: 16, min: 1, max: 256, helpGroup: 'REMOTE'},
  'fetch-request-max': {kind: 'string', summary: 'Neighbouring chunks wanted at once are fetched in one ranged request of at most this many bytes.', default: '4M', helpGroup: 'REMOTE'},
  'fetch-timeout': {kind: 'string', summary: 'A request that receives no data for this long is aborted and retried (e.g. 500ms, 10s); a chunk another handler sharing the --cache-dir is fetching is waited for at most this long before it is fetched here too.', default: '10s', helpGroup: 'REMOTE'},
  'fetch-deadline': {kind: 'string', summary: 'A chunk that cannot be fetched within this long, despite retries with backoff, fails the resume (the client is killed, or frozen with --no-kill); the faulting vCPU waits meanwhile.', default: '60s', helpGroup: 'REMOTE'},
} as const satisfies Record<string, FlagSpec>

export interface RemoteFlagValues {
  's3-endpoint'?: string
  'cache-dir'?: string
  'cache-dir-max': string
  'fetch-concurrency': number
  'fetch-request-max': string
  'fetch-timeout': string
  'fetch-deadline': string
}

/** The S3 client settings of --s3-endpoint (the one remote flag of commands that only write). */
export function s3Settings(flags: {'s3-endpoint'?: string}): S3Settings {
  return flags['s3-endpoint'] ? {endpoint: flags['s3-endpoint']} : {}
}

/** The options of remoteFlagSpecs; a malformed size or duration is a USAGE error naming its flag. */
export function remoteOptions(flags: RemoteFlagValues): RemoteOptions {
  const named = <T>(flag: string, parse: () => T): T => {
    try {
      return parse()
    } catch (error) {
      throw new UffdError('USAGE', `--${flag}: ${(error as Error).message}`)
    }
  }
  const idleTimeoutMs = named('fetch-timeout', () => parseDuration(flags['fetch-timeout']))
  const deadlineMs = named('fetch-deadline', () => parseDuration(flags['fetch-deadline']))
  if (idleTimeoutMs <= 0 || deadlineMs <= 0) throw new UffdError('USAGE', '--fetch-timeout and --fetch-deadline must be more than 0')
  return {
    s3: s3Settings(flags),
    cacheRoot: flags['cache-dir'] ?? defaultCacheRoot(),
    cacheMaxBytes: named('cache-dir-max', () => parseSize(flags['cache-dir-max'])),
    fetch: {
      concurrency: flags['fetch-concurrency'],
      maxRequestBytes: named('fetch-request-max', () => parseSize(flags['fetch-request-max'])),
      idleTimeoutMs,
      deadlineMs,
    },
  }
}
