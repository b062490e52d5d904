import fs from 'node:fs'

import {UffdError} from '../core/errors.js'
import {type LayerParent} from '../format/layer.js'
import {describeLocation, isRemote, type Location, parseLocation} from '../remote/location.js'
import {type RemoteOptions, type RemoteReport, type RemoteSnapshot} from '../remote/remote-snapshot.js'
import {closeFd, createEventfd} from '../sys/index.js'
import {FileByteSource} from './byte-source.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {describePrefix, type LayersPrefix, locationIn, parseLayersPrefix, prefixOf} from './parent-location.js'
import {SnapshotReader} from './reader.js'
import {NO_READ_KEYS, type ReadKeys, shareReadKeys} from './sealing.js'
import {type FileSpec, openFileSpec, type SnapshotSpec} from './spec.js'

/**
 * A snapshot a command opened, wherever it lives: a reader for the main thread, specs for the
 * threads it starts, and (for object storage) what fetching cost.
 */
export interface OpenedSnapshot {
  reader: ImageReader
  /** How it prints: the path, or the URL without credentials. */
  name: string
  /** Where it was opened from (a chain: its top layer). */
  location: Location
  /** Whether any of its files is in object storage. */
  remote: boolean
  /** A spec for one new thread (call once per thread: a remote file carries its own port). */
  spec(): SnapshotSpec
  /** What fetching cost, summed over its remote files and those of `others` (snapshots served beside it); undefined when none is remote. */
  report(...others: OpenedSnapshot[]): RemoteReport | undefined
  /** Its files in object storage. */
  remotes(): RemoteSnapshot[]
  /** The local files it is read from, as this process has them open (/proc/self/fd/N): none for a URL. */
  localFiles(): string[]
  close(): Promise<void>
}

/** One file of a snapshot, opened: its reader, and how a thread opens the same file. */
interface OpenedFile {
  reader: SnapshotReader
  name: string
  spec(): FileSpec
  remote: RemoteSnapshot | undefined
}

/**
 * Opens a local path, `http(s)://` URL or `s3://BUCKET/KEY`, validating it as strictly wherever
 * it lives. A layer comes with its chain: each ancestor found by its recorded name next to the
 * layer (same directory, bucket prefix or URL directory) or under `layers` (a directory, an
 * s3:// prefix or an http(s):// directory), its identity checked before it is used, and every
 * file read through the same machinery (a remote one fetched lazily into the --cache-dir, keyed
 * by its own identity).
 */
export async function openSnapshot(text: string, remote: RemoteOptions, layers?: string, keys: ReadKeys = NO_READ_KEYS, locked = false): Promise<OpenedSnapshot> {
  const location = parseLocation(text)
  const prefix = layers === undefined ? undefined : parseLayersPrefix(layers)
  const opening: Opening = {remote, keys, locked}
  const top = await openFile(location, opening)
  const shared = keys.keys.length > 0 || keys.verifyKeys.length > 0 ? {keys: shareReadKeys(keys)} : {}
  if (!top.reader.layer) {
    return {
      reader: top.reader,
      name: top.name,
      location,
      remote: top.remote !== undefined,
      spec: () => ({...single(top), ...shared}),
      report: (...others) => reportOf([...(top.remote ? [top.remote] : []), ...others.flatMap((o) => o.remotes())]),
      remotes: () => (top.remote ? [top.remote] : []),
      localFiles: () => localFiles([top]),
      close: () => closeFile(top),
    }
  }
  // Remote files of a chain signal one eventfd when their bytes land (the fault loop polls one):
  // the top's own, or one made here.
  let landedFd = top.remote?.share.landedFd ?? -1
  let ownFd = -1
  const parents: OpenedFile[] = []
  const closeAll = async (): Promise<void> => {
    // Parents first: their fetchers may signal the top's eventfd until they stop.
    for (const p of parents.reverse()) await closeFile(p)
    await closeFile(top)
    if (ownFd >= 0) closeFd(ownFd)
  }
  let reader: LayeredReader
  try {
    const recorded = top.reader.layer.parents
    const where = prefix ?? prefixOf(location)
    for (const [k, parent] of recorded.entries()) {
      const at = locationIn(where, parent.name)
      if (isRemote(at) && landedFd < 0) landedFd = ownFd = createEventfd()
      parents.push(await openParent(at, parent, k, recorded.length, top.name, where, opening, landedFd))
    }
    const files = [...parents, top]
    reader = LayeredReader.fromFiles(
      files.map((f) => f.reader),
      files.map((f) => f.name),
    )
  } catch (error) {
    await closeAll()
    throw error
  }
  const files = [...parents, top]
  const remotes = files.flatMap((f) => (f.remote ? [f.remote] : []))
  return {
    reader,
    name: top.name,
    location,
    remote: remotes.length > 0,
    // (The reader was made by LayeredReader.fromFiles, which checked the chain.)
    spec: () => ({kind: 'chain', files: files.map((f) => f.spec()), paths: [...reader.paths], landedFd, ...shared, checked: true}),
    report: (...others) => reportOf([...remotes, ...others.flatMap((o) => o.remotes())]),
    remotes: () => [...remotes],
    localFiles: () => localFiles(files),
    close: async () => {
      // The chain first (it lets go of its share of the thread's unit cache), then its files.
      reader.close()
      await closeAll()
    },
  }
}

/** How a command opens every file of a snapshot. */
interface Opening {
  remote: RemoteOptions
  keys: ReadKeys
  /** An encrypted file without its key opens locked (stats), rather than failing. */
  locked: boolean
}

async function openFile(location: Location, opening: Opening, landedFd?: number): Promise<OpenedFile> {
  if (!isRemote(location)) {
    const reader = SnapshotReader.open(location.path, location.path, opening.keys, opening.locked)
    // Threads open the file this one has open, not the name: another handler's --learn may
    // rename a new layout over it meanwhile, and two layouts' packed units differ.
    return {reader, name: location.path, remote: undefined, spec: () => ({kind: 'file', path: location.path, openPath: localSource(reader).sameFilePath, tables: reader.tables})}
  }
  // Loaded only for URLs: a local snapshot's start-up does not pay for the remote machinery.
  const {RemoteSnapshot} = await import('../remote/remote-snapshot.js')
  const snapshot = await RemoteSnapshot.open(location, opening.remote, landedFd, opening.keys, opening.locked)
  return {reader: snapshot.reader, name: describeLocation(location), remote: snapshot, spec: () => ({kind: 'remote', ...snapshot.threadShare(), tables: snapshot.reader.tables})}
}

async function openParent(at: Location, parent: LayerParent, k: number, count: number, layer: string, where: LayersPrefix, opening: Opening, landedFd: number): Promise<OpenedFile> {
  const which = `${k === 0 ? 'its base' : `its ancestor ${k}`} ${parent.name} (${k + 1} of ${count})`
  const shown = describeLocation(at)
  const missing = (detail: string): UffdError => new UffdError('PARENT_MISSING', `${layer}: ${which} is not at ${shown}${detail} (put it in ${describePrefix(where)}, or give --layers DIR, s3://BUCKET/PREFIX/ or an http(s):// directory)`)
  if (!isRemote(at) && !fs.existsSync(at.path)) throw missing('')
  let file: OpenedFile
  try {
    file = await openFile(at, opening, landedFd)
  } catch (error) {
    if ((error as {code?: string}).code === 'REMOTE_NOT_FOUND') throw missing(`: ${(error as Error).message}`)
    throw error
  }
  // Layers written before parents had a content identity recorded the digest of the parent's
  // bytes, which is its layout digest now: still accepted (such a parent must be the very file).
  if (file.reader.identity !== parent.id && file.reader.layout !== parent.id) {
    await closeFile(file)
    throw new UffdError('PARENT_MISMATCH', `${layer}: ${shown} is not ${which} it was made on (its content identity differs: another snapshot, or its chunks written again since)`)
  }
  return file
}

/**
 * Whether the one snapshot file at `location` (not its chain) is the parent a layer recorded as
 * `id`: its identity, or the digest of its bytes an older layer recorded (see openParent).
 * False when there is none there, or what is there cannot be opened as a snapshot.
 */
export async function isRecordedParent(location: Location, remote: RemoteOptions, id: string, keys: ReadKeys = NO_READ_KEYS): Promise<boolean> {
  if (!isRemote(location) && !fs.existsSync(location.path)) return false
  let file: OpenedFile
  try {
    file = await openFile(location, {remote, keys, locked: true})
  } catch {
    return false
  }
  await closeFile(file)
  return file.reader.identity === id || file.reader.layout === id
}

function reportOf(remotes: readonly RemoteSnapshot[]): RemoteReport | undefined {
  const [first, ...others] = remotes
  return first?.report(...others)
}

function single(file: OpenedFile): SnapshotSpec {
  const spec = file.spec()
  return spec.kind === 'file' ? {kind: 'file', path: spec.path, openPath: spec.openPath, tables: spec.tables} : spec
}

async function closeFile(file: OpenedFile): Promise<void> {
  if (file.remote) await file.remote.close()
  else file.reader.close()
}

/**
 * The chain of a layer just written at `layerPath` over `parent` (opened by the caller, which
 * checked its chain): the parent's files opened again on this thread, then the layer. For
 * attaching a working set to a layer before it takes its name, when it is not yet where its
 * parents would be looked for. The reader is the caller's to close.
 */
export function layerOver(parent: OpenedSnapshot, layerPath: string, keys: ReadKeys = NO_READ_KEYS): LayeredReader {
  const spec = parent.spec()
  const files: SnapshotReader[] = []
  try {
    for (const file of spec.kind === 'chain' ? spec.files : [spec]) files.push(openFileSpec(file, keys))
    // Just written, not signed yet by anyone: its own seal, if any, is checked with the key alone.
    files.push(SnapshotReader.open(layerPath, layerPath, {keys: keys.keys, verifyKeys: []}))
    return LayeredReader.fromFiles(files, [...(parent.reader instanceof LayeredReader ? parent.reader.paths : [parent.name]), layerPath])
  } catch (error) {
    for (const f of files) f.close()
    throw error
  }
}

function localFiles(files: readonly OpenedFile[]): string[] {
  return files.filter((f) => f.remote === undefined).map((f) => localSource(f.reader).sameFilePath)
}

function localSource(reader: SnapshotReader): FileByteSource {
  if (!(reader.source instanceof FileByteSource)) throw new UffdError('INTERNAL', `${reader.source.name} is not a local file`)
  return reader.source
}
