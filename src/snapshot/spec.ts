import {MessageChannel, type MessagePort, type Transferable} from 'node:worker_threads'

import {type FetcherMessage} from '../remote/fetcher/worker.js'
import {RemoteByteSource} from '../remote/remote-source.js'
import {type RemoteShare} from '../remote/shared.js'
import {type ImageReader, LayeredReader} from './layered-reader.js'
import {type SharedTables, SnapshotReader} from './reader.js'
import {type SharedBlocksShare} from './shared-blocks.js'
import {NO_READ_KEYS, type ReadKeys, readKeysFromShare, type ReadKeysShare} from './sealing.js'

/**
 * One file of a snapshot for a thread: a local path (opened at `openPath`), or a remote file's
 * share with this thread's own port to its fetcher; with the tables of the opening that made it.
 */
export type FileSpec = ({kind: 'file'; path: string; openPath?: string} | {kind: 'remote'; share: RemoteShare; port: MessagePort}) & {tables?: SharedTables}

/**
 * How a thread opens the snapshot a command opened: one file (local or remote), or a chain of
 * them (a layer and its ancestors, base first, as the command found and checked them; `landedFd`
 * is signalled when any remote file's bytes land, -1 when none is remote). Structured-cloneable;
 * pass specTransfer(spec) as the worker's transfer list.
 */
export type SnapshotSpec = (
  | FileSpec
  /** `checked`: the opening that made this spec checked the chain (LayeredReader.fromFiles). */
  | {kind: 'chain'; files: FileSpec[]; paths: string[]; landedFd: number; blocks?: SharedBlocksShare; checked?: boolean}
) & {
  /** The keys the command opened it with (sealed snapshots), for the thread to open it with too. */
  keys?: ReadKeysShare
}

export function openSpec(spec: SnapshotSpec): ImageReader {
  const keys = readKeysFromShare(spec.keys)
  if (spec.kind !== 'chain') return openFileSpec(spec, keys)
  const files: SnapshotReader[] = []
  try {
    for (const file of spec.files) files.push(openFileSpec(file, keys))
    return LayeredReader.fromFiles(files, spec.paths, undefined, spec.blocks, spec.checked === true)
  } catch (error) {
    for (const f of files) f.close()
    throw error
  }
}

/** Opens one file of a spec on this thread, with the keys the command opened it with. */
export function openFileSpec(spec: FileSpec, keys: ReadKeys = NO_READ_KEYS): SnapshotReader {
  return spec.kind === 'file' ? SnapshotReader.open(spec.path, spec.openPath, keys, false, spec.tables) : SnapshotReader.fromSource(new RemoteByteSource(spec.share, spec.port), keys, false, spec.tables)
}

/**
 * `spec`, for threads that will read beside `reader` (its opening here): a chain's readers there
 * then share this one's decoded layer blocks.
 */
export function sharingDecoded(spec: SnapshotSpec, reader: ImageReader): SnapshotSpec {
  return spec.kind === 'chain' && reader instanceof LayeredReader ? {...spec, blocks: reader.blockShare} : spec
}

export function specTransfer(spec: SnapshotSpec): Transferable[] {
  if (spec.kind === 'chain') return spec.files.flatMap((f) => (f.kind === 'remote' ? [f.port] : []))
  return spec.kind === 'remote' ? [spec.port] : []
}

/** The eventfd signalled when remote bytes land, for the fault loop's poll (-1: nothing remote). */
export function specLandedFd(spec: SnapshotSpec): number {
  if (spec.kind === 'remote') return spec.share.landedFd
  return spec.kind === 'chain' ? spec.landedFd : -1
}

/**
 * A spec for a thread started by this one (the fault loop starts the decoders): a remote file
 * gets a new port to its fetcher, sent to it through this thread's port. Call once per thread.
 */
export function childSpec(spec: SnapshotSpec): SnapshotSpec {
  if (spec.kind === 'file') return spec
  if (spec.kind === 'remote') return {...(childFileSpec(spec) as SnapshotSpec), keys: spec.keys}
  return {...spec, files: spec.files.map(childFileSpec)}
}

function childFileSpec(spec: FileSpec): FileSpec {
  if (spec.kind === 'file') return spec
  const {port1, port2} = new MessageChannel()
  const message: FetcherMessage = {type: 'port', port: port1}
  spec.port.postMessage(message, [port1])
  return {kind: 'remote', share: spec.share, port: port2, tables: spec.tables}
}
