import fs from 'node:fs'

import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {closeFd, listenUnix} from '../../sys/socket.js'

/**
 * The handler's listening socket and its ready file: both mean "a client can connect now", so
 * the ready file is written only once the socket listens, and both go when the handler stops.
 * Kept apart from the session so that `uffd resume` can listen before the session's modules and
 * the fault-loop worker are loaded (a connection waits in the backlog meanwhile).
 */
export class Listener {
  private listening: boolean

  private constructor(
    readonly path: string,
    readonly fd: number,
    /** The socket file listenUnix made: only that one is removed at exit. */
    private readonly made: {dev: number; ino: number},
    private readonly readyFile: string | undefined,
  ) {
    this.listening = true
  }

  /**
   * Listens on `path` (created 0600), then writes `readyFile` and logs the readiness line. A ready
   * file left by an earlier run is removed first: it would tell a waiting script to go on before
   * this handler listens.
   */
  static open(path: string, readyFile: string | undefined, log: (line: string) => void): Listener {
    return Listener.openAll([path], readyFile, log)[0]
  }

  /**
   * Listens on every one of `paths` (a handler serving several snapshots, one socket each), and
   * only then writes `readyFile` (it lists them all) and logs the readiness line: ready means a
   * client can connect to any of them. The first listener owns the ready file (its close removes it).
   */
  static openAll(paths: readonly string[], readyFile: string | undefined, log: (line: string) => void): Listener[] {
    if (readyFile) removeStaleReadyFile(readyFile)
    const listeners: Listener[] = []
    try {
      for (const [i, path] of paths.entries()) listeners.push(Listener.bind(path, i === 0 ? readyFile : undefined))
      const ready = paths.length === 1 ? {socket: paths[0], pid: process.pid} : {socket: paths[0], sockets: [...paths], pid: process.pid}
      if (readyFile) writeFileAtomically(readyFile, `${JSON.stringify(ready)}\n`)
    } catch (error) {
      for (const listener of listeners) listener.close()
      throw error
    }
    log(`listening on ${paths.join(', ')}`)
    return listeners
  }

  private static bind(path: string, readyFile: string | undefined): Listener {
    const fd = listenUnix(path, {mode: 0o600})
    try {
      const st = fs.lstatSync(path)
      return new Listener(path, fd, {dev: st.dev, ino: st.ino}, readyFile)
    } catch (error) {
      closeFd(fd)
      throw error
    }
  }

  /** Closes the socket and removes its path: nobody else can connect. The ready file stays until close. */
  stop(): void {
    if (!this.listening) return
    this.listening = false
    closeFd(this.fd)
    removeIfSame(this.path, this.made)
  }

  /** Stops listening and removes the ready file. */
  close(): void {
    this.stop()
    if (this.readyFile) fs.rmSync(this.readyFile, {force: true})
  }
}

/** A ready file from an earlier run must not survive until this one listens. */
export function removeStaleReadyFile(readyFile: string): void {
  fs.rmSync(readyFile, {force: true})
}

/**
 * Removes `path` if it is still the socket file this handler made: anyone may have replaced it
 * meanwhile (with a file of theirs, or another listener's socket), and that is not ours to remove.
 */
function removeIfSame(path: string, made: {dev: number; ino: number}): void {
  let st: fs.Stats
  try {
    st = fs.lstatSync(path)
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return
    throw error
  }
  if (st.isSocket() && st.dev === made.dev && st.ino === made.ino) fs.rmSync(path, {force: true})
}
