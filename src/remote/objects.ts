import {HttpObject} from './http-object.js'
import {describeLocation, type Location} from './location.js'
import {type RemoteObject} from './object.js'
import {S3Object, s3Client, type S3Settings} from './s3-object.js'

/** The object a remote location names, read through the client users configure for it. */
export function remoteObject(location: Exclude<Location, {kind: 'file'}> | Location, s3: S3Settings, maxAttempts?: number): RemoteObject {
  if (location.kind === 'http') return new HttpObject(location.url, describeLocation(location))
  if (location.kind === 's3') return new S3Object(s3Client(s3, maxAttempts), location.bucket, location.key)
  throw new TypeError(`${location.path} is a local file, not a remote object`)
}
