import {MessageChannel, type MessagePort, type Transferable} from 'node:worker_threads'

import {type FetcherMessage} from '../remote/fetcher/worker.js'
import {RemoteByteSource} from '../remote/remote-source.js'
import {type RemoteShare} from '../remote/shared.js'
import {type ImageReader, openImage} from './layered-reader.js'
import {SnapshotReader} from './reader.js'

/**
 * How a thread opens the snapshot a command opened: a local path, or a remote snapshot's share
 * with this thread's own port to the fetcher. Structured-cloneable; pass specTransfer(spec) as
 * the worker's transfer list.
 */
export type SnapshotSpec = {kind: 'file'; path: string; layersDir?: string; openPath?: string} | {kind: 'remote'; share: RemoteShare; port: MessagePort}

export function openSpec(spec: SnapshotSpec): ImageReader {
  return spec.kind === 'file' ? openImage(spec.path, spec.layersDir, spec.openPath) : SnapshotReader.fromSource(new RemoteByteSource(spec.share, spec.port))
}

export function specTransfer(spec: SnapshotSpec): Transferable[] {
  return spec.kind === 'remote' ? [spec.port] : []
}

/**
 * A spec for a thread started by this one (the fault loop starts the decoders): a remote one
 * gets a new port to the fetcher, sent to it through this thread's port. Call once per thread.
 */
export function childSpec(spec: SnapshotSpec): SnapshotSpec {
  if (spec.kind === 'file') return spec
  const {port1, port2} = new MessageChannel()
  const message: FetcherMessage = {type: 'port', port: port1}
  spec.port.postMessage(message, [port1])
  return {kind: 'remote', share: spec.share, port: port2}
}
