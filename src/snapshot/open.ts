import {describeLocation, isRemote, parseLocation} from '../remote/location.js'
import {type RemoteOptions, type RemoteReport} from '../remote/remote-snapshot.js'
import {SnapshotReader} from './reader.js'
import {type SnapshotSpec} from './spec.js'

/**
 * A snapshot a command opened, wherever it lives: a reader for the main thread, specs for the
 * threads it starts, and (for object storage) what fetching cost.
 */
export interface OpenedSnapshot {
  reader: SnapshotReader
  /** How it prints: the path, or the URL without credentials. */
  name: string
  remote: boolean
  /** A spec for one new thread (call once per thread: a remote one carries its own port). */
  spec(): SnapshotSpec
  report(): RemoteReport | undefined
  close(): Promise<void>
}

/** Opens a local path, `http(s)://` URL or `s3://BUCKET/KEY`, validating it as strictly wherever it lives. */
export async function openSnapshot(text: string, remote: RemoteOptions): Promise<OpenedSnapshot> {
  const location = parseLocation(text)
  if (!isRemote(location)) {
    const reader = SnapshotReader.open(location.path)
    return {
      reader,
      name: location.path,
      remote: false,
      spec: () => ({kind: 'file', path: location.path}),
      report: () => undefined,
      close: async () => reader.close(),
    }
  }
  // Loaded only for URLs: a local snapshot's start-up does not pay for the remote machinery.
  const {RemoteSnapshot} = await import('../remote/remote-snapshot.js')
  const snapshot = await RemoteSnapshot.open(location, remote)
  return {
    reader: snapshot.reader,
    name: describeLocation(location),
    remote: true,
    spec: () => ({kind: 'remote', ...snapshot.threadShare()}),
    report: () => snapshot.report(),
    close: () => snapshot.close(),
  }
}
