// What `uffd resume` does once its command line is parsed, shared by the oclif command
// (src/commands/resume.ts) and the fast path past oclif (resume-entry.ts). The modules up to
// listening are the few imported here; the session's are loaded once the socket listens.

import os from 'node:os'
import {type Worker} from 'node:worker_threads'

import {UffdError} from '../core/errors.js'
import {formatBytes, parseSize} from '../core/units.js'
import {Listener, removeStaleReadyFile} from '../resume/main/listener.js'
import {endPrestarted, prestartFaultLoop} from '../resume/main/prestarted-loop.js'
import {listensAfterWorkingSet} from '../resume/main/prefetch-plan.js'
import {type AlsoServed, type ResumeResult} from '../resume/main/serving-session.js'
import {checkInput} from '../snapshot/input-file.js'
import {type OpenedSnapshot, openSnapshot} from '../snapshot/open.js'
import {SnapshotReader} from '../snapshot/reader.js'
import {FlagValueError} from './flag-specs.js'
import {remoteOptions} from './remote-flags.js'
import {readKeysFromFlags} from './seal-flags.js'
import {type ReadKeys} from '../snapshot/sealing.js'
import {InterruptedError} from './report-error.js'
import {DEFAULT_CACHE_MB, DEFAULT_DECODERS, DEFAULT_SERVE_CACHE_MB, DEFAULT_STAGE_MB, type ResumeFlags} from './resume-flags.js'

/**
 * Serves `snapshotArg` as `flags` say and returns what happened; under `json` it prints nothing
 * on stdout (the caller prints the result). A FlagValueError is thrown only before anything is
 * listened on or written, so a caller may hand the command line to oclif to report it.
 * `faultLoop`: the fault-loop thread, started as early as the caller could (prestartFaultLoop),
 * which the caller ends (endPrestarted); without it, this starts one and ends it itself.
 */
export async function resumeCommand(snapshotArg: string, flags: ResumeFlags, json: boolean, faultLoop?: Worker): Promise<ResumeResult> {
  if (faultLoop) return resumeWith(snapshotArg, flags, json, faultLoop)
  const own = prestartFaultLoop()
  try {
    return await resumeWith(snapshotArg, flags, json, own)
  } finally {
    // Never given its settings (an error before serving), or ended with the session already.
    await endPrestarted(own)
  }
}

async function resumeWith(snapshotArg: string, flags: ResumeFlags, json: boolean, faultLoop: Worker): Promise<ResumeResult> {
  // oclif's dependsOn counts --learn's default (false) as given, so it lets this through.
  if (flags['learn-runs'] !== undefined && !flags.learn) throw new UffdError('USAGE', '--learn-runs needs --learn')
  // The session opens the set itself, and would block on a FIFO before listening.
  if (flags['working-set'] && flags['working-set'] !== 'none') checkInput(flags['working-set'])
  const decoders = flags.decoders ?? Math.min(os.availableParallelism(), flags.serve ? Infinity : DEFAULT_DECODERS)
  const remote = remoteOptions(flags)
  // First of all: a script waiting for the ready file must not take an earlier run's for this
  // one's while the snapshot opens (over the network, that can take a while).
  if (flags['ready-file']) removeStaleReadyFile(flags['ready-file'])
  const keys = readKeysFromFlags(flags)
  const wanted = alsoServed(flags)
  const snapshot = await openSnapshot(snapshotArg, remote, flags.layers, keys)
  const also: AlsoServed[] = []
  try {
    for (const {snapshot: text, socketPath} of wanted) also.push({snapshot: await openSnapshot(text, remote, flags.layers, keys), socketPath})
    // A remote chunk is fetched by the fetcher thread and decoded by a decoder: the fault loop
    // itself never waits on the network (a fault whose chunk is not here yet waits, the loop
    // goes on serving).
    if ([snapshot, ...also.map((a) => a.snapshot)].some((s) => s.remote) && decoders === 0) throw new UffdError('USAGE', '--decoders 0 cannot serve a remote snapshot (decoders read what the network fetched)')
    if (flags.learn && !(snapshot.reader instanceof SnapshotReader)) throw new UffdError('USAGE', '--learn rewrites the snapshot in place: a layer cannot learn (learn on the base before layering, or squash the chain first)')
    if (flags.learn && snapshot.reader instanceof SnapshotReader && snapshot.reader.seal?.info.signature) throw new UffdError('USAGE', '--learn rewrites the snapshot in place: a signed snapshot cannot be rewritten here (its signature needs the signing key); attach learned sets where snapshots are signed (uffd working-set attach --sign-key)')
    if (snapshot.remote && flags.learn) throw new UffdError('USAGE', '--learn rewrites the snapshot in place: it needs a local file, not a URL (learn on a local copy, then `uffd cp` it back)')
    return await serve(snapshot, also, decoders, flags, json, keys, faultLoop)
  } finally {
    for (const a of also) await a.snapshot.close()
    await snapshot.close()
  }
}

/**
 * The --also SNAPSHOT=SOCKET entries. Split at the last '=': a URL's query may hold some, a
 * socket path hardly. Each socket once, none the --socket.
 */
function alsoServed(flags: ResumeFlags): {snapshot: string; socketPath: string}[] {
  const entries = flags.also ?? []
  if (entries.length === 0) return []
  // (Checked here: oclif's dependsOn counts --serve's default, false, as given.)
  if (!flags.serve) throw new UffdError('USAGE', '--also needs --serve: a handler serving several snapshots keeps accepting VMMs on every socket')
  for (const [flag, given] of [
    ['--record', flags.record !== undefined],
    ['--learn', flags.learn],
    ['--working-set FILE', flags['working-set'] !== undefined && flags['working-set'] !== 'none'],
  ] as const) {
    if (given) throw new UffdError('USAGE', `${flag} names one snapshot: it cannot be used with --also (which serves several)`)
  }
  const sockets = new Set([flags.socket])
  return entries.map((entry) => {
    const at = entry.lastIndexOf('=')
    const snapshot = entry.slice(0, Math.max(0, at))
    const socketPath = entry.slice(at + 1)
    if (at <= 0 || socketPath === '') throw new FlagValueError(`--also ${entry}: expected SNAPSHOT=SOCKET`)
    if (sockets.has(socketPath)) throw new FlagValueError(`--also ${entry}: socket ${socketPath} is given twice (each snapshot needs its own socket: a VMM's handshake does not say which snapshot it wants)`)
    sockets.add(socketPath)
    return {snapshot, socketPath}
  })
}

async function serve(snapshot: OpenedSnapshot, also: AlsoServed[], decoders: number, flags: ResumeFlags, json: boolean, keys: ReadKeys, faultLoop: Worker): Promise<ResumeResult> {
  const {chunkSize, pageSize} = snapshot.reader.geometry
  const window = faultAround(flags['fault-around'], chunkSize, pageSize)
  const readaheadBytes = size(flags.readahead, '--readahead')

  const controller = new AbortController()
  // A signal stops serving; with --learn, a second one stops the rewrite of the snapshot too.
  const learning = new AbortController()
  let signalName: string | undefined
  const onStop = (signal: NodeJS.Signals): void => {
    if (controller.signal.aborted) learning.abort()
    signalName = signal
    controller.abort()
  }
  let current: {stats: () => unknown} | undefined
  const onUsr1 = (): void => {
    if (current) process.stderr.write(`${JSON.stringify(current.stats())}\n`)
  }
  // Before the socket exists: a signal must never leave it (or the ready file) behind.
  process.on('SIGINT', onStop)
  process.on('SIGTERM', onStop)
  process.on('SIGUSR1', onUsr1)
  const log = (line: string): void => {
    process.stderr.write(`uffd resume: ${line}\n`)
  }
  let result: ResumeResult
  const cacheMb = flags['cache-mb'] ?? (flags.serve ? DEFAULT_SERVE_CACHE_MB : DEFAULT_CACHE_MB)
  const common = {
    snapshot,
    timeoutMs: flags.timeout * 1000,
    readyFile: flags['ready-file'],
    kill: flags.kill,
    cacheBytes: cacheMb * 1024 * 1024,
    stageBytes: (flags['cache-mb'] ?? DEFAULT_STAGE_MB) * 1024 * 1024,
    faultAroundBytes: window.maxBytes,
    faultAroundMinBytes: window.minBytes,
    kernelZeros: flags['kernel-zeros'],
    spinMicros: flags['spin-us'],
    decoders,
    readaheadBytes,
    statsFile: flags['stats-file'],
    faultLoop,
    signal: controller.signal,
    log,
    onStats: (statsOf: () => unknown) => {
      current = {stats: statsOf}
    },
  }
  let listeners: Listener[] | undefined
  // Beside serving, on libuv threads: the fault loop reads chunks from the page cache then.
  const prereading = new AbortController()
  // (A chain's local files are read ahead also when others of it are remote; a base several
  // served layers share, once.)
  const localFiles = [...new Set([snapshot, ...also.map((a) => a.snapshot)].flatMap((s) => s.localFiles()))]
  const preread = flags.preread === 'auto' && localFiles.length > 0 ? startPreread(localFiles, prereading.signal, log) : undefined
  try {
    if (flags['criu-dir']) {
      const {runCriuResume} = await import('../resume/main/criu-session.js')
      result = await runCriuResume({...common, criuDir: flags['criu-dir'], workDir: flags['work-dir'] ?? flags['criu-dir']})
    } else {
      const socketPath = flags.socket!
      // With nothing to stage, a VMM may connect at once: its handshake waits in the backlog
      // while the session's modules and the fault-loop worker load, and is served as soon as
      // they are up. With a working set the socket listens once the set is decoded.
      const readers = [snapshot.reader, ...also.map((a) => a.snapshot.reader)]
      if (!readers.some((reader) => listensAfterWorkingSet(reader, flags['working-set'], decoders))) {
        listeners = Listener.openAll([socketPath, ...also.map((a) => a.socketPath)], flags['ready-file'], log)
      }
      const {runResume} = await import('../resume/main/session.js')
      result = await runResume({
        ...common,
        listeners,
        also,
        socketPath,
        serve: flags.serve,
        populateAll: flags.populate === 'all',
        recordFile: flags.record,
        workingSetFile: flags['working-set'],
        countHits: flags['count-hits'],
        learn: flags.learn ? {path: snapshot.name, keep: flags['learn-runs'], signal: learning.signal, keys} : undefined,
      })
    }
  } finally {
    for (const listener of listeners ?? []) listener.close()
    // Serving is over: what is left to read ahead is not wanted (the step under way finishes).
    prereading.abort()
    await preread
    process.off('SIGINT', onStop)
    process.off('SIGTERM', onStop)
    process.off('SIGUSR1', onUsr1)
  }
  const s = result.stats
  if (!json) {
    console.log(
      `served ${s.faults.total} faults: ${s.pages.copied} pages copied (${formatBytes(s.bytes.copied)}), ${s.pages.zeroed} zeroed, ` +
        `${s.chunks.decoded} chunks decoded, latency p50 ${s.latencyUs.p50 ?? '-'} µs p99 ${s.latencyUs.p99 ?? '-'} µs`,
    )
  }
  if (result.error) {
    process.exitCode = 1
    if (!json) console.error(`uffd resume: ${result.error.message}`)
  } else if (result.interrupted || controller.signal.aborted) {
    // Also a signal after the clients were served, while --learn folded the run: it was obeyed.
    if (json) process.exitCode = 130
    else throw new InterruptedError(signalName ?? 'signal')
  }
  return result
}

/** Reads the snapshot into the page cache (preread.ts) and logs what it did; never fails the resume. */
async function startPreread(files: string[], signal: AbortSignal, log: (line: string) => void): Promise<void> {
  const {prereadFiles} = await import('../resume/main/preread.js')
  try {
    const done = await prereadFiles(files, signal)
    if (done.bytes > 0 && !done.skipped) log(`read ${formatBytes(done.bytes)} of the snapshot into the page cache ahead of faults (${Math.round(done.ms)} ms)`)
    else if (done.skipped && done.skipped !== 'stopped') log(`not reading the snapshot ahead: ${done.skipped}`)
  } catch (error) {
    // Only a speed-up: a file that cannot be read ahead is read when it faults, as without it.
    log(`not reading the snapshot ahead: ${(error as Error).message}`)
  }
}

function size(text: string, flag: string): number {
  try {
    return parseSize(text)
  } catch (error) {
    throw new FlagValueError(`${flag}: ${(error as Error).message}`)
  }
}

/**
 * The fault-around window's smallest and largest size. "auto" adapts: each snapshot's smallest
 * part that decodes on its own ('unit': a frame of a framed file, else a chunk, whose decode the
 * faulting page pays for anyway) growing to 2 MiB while faults land near each other; a size,
 * "chunk" or "page" is fixed.
 */
function faultAround(text: string, chunkSize: number, pageSize: number): {minBytes: number | 'unit'; maxBytes: number} {
  const fixed = (bytes: number): {minBytes: number; maxBytes: number} => ({minBytes: bytes, maxBytes: bytes})
  if (text === 'auto') return {minBytes: 'unit', maxBytes: Math.max(2 * 1024 * 1024, chunkSize, pageSize)}
  if (text === 'chunk') return fixed(chunkSize)
  if (text === 'page') return fixed(pageSize)
  let bytes: number
  try {
    bytes = parseSize(text)
  } catch (error) {
    throw new FlagValueError(`--fault-around: ${(error as Error).message}`)
  }
  if (bytes < pageSize || bytes % pageSize !== 0) throw new FlagValueError(`--fault-around must be a multiple of the snapshot's page size (${pageSize})`)
  return fixed(bytes)
}
