import {describeLocation, isRemote, parseLocation} from '../remote/location.js'
import {type RemoteOptions, type RemoteReport} from '../remote/remote-snapshot.js'
import {UffdError} from '../core/errors.js'
import {FileByteSource} from './byte-source.js'
import {type ImageReader, openImage} from './layered-reader.js'
import {SnapshotReader} from './reader.js'
import {type SnapshotSpec} from './spec.js'

/**
 * A snapshot a command opened, wherever it lives: a reader for the main thread, specs for the
 * threads it starts, and (for object storage) what fetching cost.
 */
export interface OpenedSnapshot {
  reader: ImageReader
  /** How it prints: the path, or the URL without credentials. */
  name: string
  remote: boolean
  /** A spec for one new thread (call once per thread: a remote one carries its own port). */
  spec(): SnapshotSpec
  report(): RemoteReport | undefined
  /** The local files it is read from, as this process has them open (/proc/self/fd/N): none for a URL. */
  localFiles(): string[]
  close(): Promise<void>
}

/** Opens a local path, `http(s)://` URL or `s3://BUCKET/KEY`, validating it as strictly wherever it lives. */
export async function openSnapshot(text: string, remote: RemoteOptions, layersDir?: string): Promise<OpenedSnapshot> {
  const location = parseLocation(text)
  if (!isRemote(location)) {
    // A layer comes with its chain, found next to it or in layersDir, and read as one image.
    const reader = openImage(location.path, layersDir)
    return {
      reader,
      name: location.path,
      remote: false,
      // Threads open the file this one has open, not the name: another handler's --learn may
      // rename a new layout over it meanwhile, and two layouts' packed units differ.
      spec: () => ({kind: 'file', path: location.path, layersDir, openPath: topFile(reader).sameFilePath}),
      report: () => undefined,
      localFiles: () => (reader instanceof SnapshotReader ? [reader] : reader.files).map((f) => localFile(f).sameFilePath),
      close: async () => reader.close(),
    }
  }
  // Loaded only for URLs: a local snapshot's start-up does not pay for the remote machinery.
  const {RemoteSnapshot} = await import('../remote/remote-snapshot.js')
  const snapshot = await RemoteSnapshot.open(location, remote)
  if (snapshot.reader.layer) {
    await snapshot.close()
    throw new UffdError('USAGE', `${describeLocation(location)} is a layer: layers are read from local files for now (copy the chain here with uffd cp, or squash it first)`)
  }
  return {
    reader: snapshot.reader,
    name: describeLocation(location),
    remote: true,
    spec: () => ({kind: 'remote', ...snapshot.threadShare()}),
    report: () => snapshot.report(),
    localFiles: () => [],
    close: () => snapshot.close(),
  }
}

/**
 * The snapshot's one file, for commands that rewrite or copy a file as it is (cp, working-set
 * attach): a layer is refused, since its chain would not come with it.
 */
export function singleFile(snapshot: OpenedSnapshot, command: string): SnapshotReader {
  const {reader} = snapshot
  if (reader instanceof SnapshotReader) return reader
  throw new UffdError('USAGE', `${snapshot.name} is a layer: ${command} takes one self-contained snapshot (uffd squash makes one from the chain)`)
}

/** The file a local image was opened from (a chain's top layer). */
function topFile(reader: ImageReader): FileByteSource {
  return localFile(reader instanceof SnapshotReader ? reader : reader.files[reader.files.length - 1])
}

function localFile(reader: SnapshotReader): FileByteSource {
  if (!(reader.source instanceof FileByteSource)) throw new UffdError('INTERNAL', `${reader.source.name} is not a local file`)
  return reader.source
}
