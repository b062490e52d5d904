import {HttpObject} from './http-object.js'
import {describeLocation, type Location} from './location.js'
import {type RemoteObject} from './object.js'
import {type S3Settings} from './s3-object.js'

/**
 * The object a remote location names, read through the client users configure for it. The AWS
 * SDK is loaded only for s3:// (it costs ~200 ms and ~20 MiB at start-up, which local snapshots
 * and HTTP URLs should not pay).
 */
export async function remoteObject(location: Location, s3: S3Settings, maxAttempts?: number, sockets?: number): Promise<RemoteObject> {
  if (location.kind === 'http') return new HttpObject(location.url, describeLocation(location), sockets)
  if (location.kind === 's3') {
    const {S3Object, s3Client} = await import('./s3-object.js')
    return new S3Object(s3Client(s3, maxAttempts, sockets), location.bucket, location.key)
  }
  throw new TypeError(`${location.path} is a local file, not a remote object`)
}
