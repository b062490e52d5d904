import os from 'node:os'

import {Args, Flags, type Interfaces} from '@oclif/core'

import {BaseCommand, InterruptedError} from '../cli/base-command.js'
import {remoteFlags, remoteOptions} from '../cli/remote-flags.js'
import {UffdError} from '../core/errors.js'
import {MAX_LEARN_RUNS} from '../format/learned-runs.js'
import {formatBytes, parseSize} from '../core/units.js'
import {runCriuResume} from '../resume/main/criu-session.js'
import {type ResumeResult} from '../resume/main/serving-session.js'
import {runResume} from '../resume/main/session.js'
import {checkInput} from '../snapshot/input-file.js'
import {type OpenedSnapshot, openSnapshot} from '../snapshot/open.js'
import {layersFlag} from '../cli/layers-flag.js'
import {SnapshotReader} from '../snapshot/reader.js'

export default class Resume extends BaseCommand {
  static override summary = 'Serve a snapshot to a VMM or process as its userfaultfd page-fault handler.'
  static override description = `Listens on a Unix socket for Firecracker's Uffd memory backend handshake (the VMM sends its memory regions as JSON and the userfaultfd as SCM_RIGHTS), then serves every page fault from the snapshot: the faulting chunk is decoded (and cached), verified against its checksum, and the missing pages around the fault are installed with one UFFDIO_COPY; zero pages are mapped with UFFDIO_ZEROPAGE. Memory the client removes (balloon, UFFD_EVENT_REMOVE) reads as zeros afterwards.

Ready when the socket exists (and --ready-file is written); "listening on PATH" is logged to stderr. Handshakes are read as they arrive, side by side: a connection that sends nothing, or a byte at a time, holds up neither other VMs nor a signal, and is refused once its --timeout (with --serve at most 10 s) has passed since it connected. Ends with exit 0 when the client exits. On a corrupt chunk or any error that makes correct serving impossible the client is killed (pid from SO_PEERCRED) and the exit code is 1; with --no-kill the client is left frozen instead, never fed wrong bytes. SIGINT/SIGTERM stop the handler (killing clients that still depend on it, unless --no-kill; exit 130). SIGUSR1 prints live statistics to stderr.

With --criu-dir DIR it is the lazy-pages daemon of \`criu restore --lazy-pages\` instead (in place of \`criu lazy-pages\`), serving a snapshot made with \`uffd snapshot --criu-dir DIR\`: it listens on lazy-pages.socket in --work-dir (default DIR, criu restore's own default working directory), takes each restored task's pid and userfaultfd, serves its faults, follows fork (the child is served too), mremap, munmap and MADV_DONTNEED, and once the restore finished fills all remaining memory in the background. Exit 0 when every task's memory has been delivered (the tasks then run on without the handler) or the tasks are gone; on a fatal error the restored tasks and their descendants are killed (unless --no-kill) and the exit code is 1.`

  static override examples = [
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --ready-file /tmp/ready --stats-file run.json',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --serve --cache-mb 1024',
    '<%= config.bin %> resume vm.uffd --socket /tmp/uffd.sock --learn   # every resume makes the next one faster',
    '<%= config.bin %> resume app.uffd --criu-dir /tmp/dump &  criu restore -D /tmp/dump --lazy-pages --shell-job -d',
  ]

  static override args = {
    snapshot: Args.string({description: 'Snapshot to serve: a path, an http(s):// URL or s3://BUCKET/KEY (chunks are fetched as they fault or are prefetched, into the --cache-dir).', required: true}),
  }

  static override flags = {
    layers: layersFlag,
    socket: Flags.string({summary: 'Unix socket to listen on (created 0600; a stale socket file is replaced).', exactlyOne: ['socket', 'criu-dir']}),
    'criu-dir': Flags.string({summary: 'Serve `criu restore --lazy-pages` of this CRIU dump (the one the snapshot was made from) instead of a VMM.', exactlyOne: ['socket', 'criu-dir'], exclusive: ['serve', 'record', 'working-set', 'learn']}),
    'work-dir': Flags.string({summary: 'With --criu-dir: criu restore\'s --work-dir, where it looks for lazy-pages.socket [default: the --criu-dir].', dependsOn: ['criu-dir']}),
    timeout: Flags.integer({summary: 'Seconds to wait for the client to connect, and for each connection to send its whole handshake; 0 waits forever. With --serve a handshake gets at most 10 s, also with 0.', default: 60, min: 0}),
    'ready-file': Flags.string({summary: 'Written (atomically) once the socket is listening and the working set is staged (decoded into memory), for scripts to wait on; a stale one is removed at start, and this one at exit.'}),
    serve: Flags.boolean({summary: 'Keep accepting clients (VMs resumed from the same snapshot share one decoded-chunk cache) until SIGINT/SIGTERM.', default: false}),
    kill: Flags.boolean({summary: 'Kill a client that can no longer be served correctly (--no-kill leaves it frozen).', default: true, allowNo: true}),
    'cache-mb': Flags.integer({summary: 'Memory for decoded chunks, MiB; the working set staged before the first client gets as much again.', default: 256, min: 1}),
    'fault-around': Flags.string({summary: 'Bytes installed around each faulting page: a size (e.g. 64K, 2M), "chunk" (the snapshot\'s chunk size), "page" (no fault-around) or "auto" (2 MiB, or the chunk size if larger: a fault round trip costs far more than copying 2 MiB, see docs/BENCHMARKS.md).', default: 'auto'}),
    populate: Flags.string({summary: 'Fill memory ahead of faults: "none" (lazy; sequential readahead only) or "all" (the whole memory in the background, demand faults first).', options: ['none', 'all'], default: 'none'}),
    readahead: Flags.string({summary: 'Most memory installed ahead of a sequential run of faults (a size, 0 to disable); the distance doubles with each fault that continues the run.', default: '256M'}),
    decoders: Flags.integer({summary: 'Threads decoding chunks ahead of need [default: number of CPUs]; 0 decodes in the fault loop only.', min: 0, max: 64}),
    record: Flags.string({summary: 'Write the working set (the pages each fault installed, faulting page first, in fault order, with times) to this file at exit.'}),
    learn: Flags.boolean({
      summary: "At exit, fold the pages this run touched into the snapshot's attached working set: the snapshot remembers the last --learn-runs runs, attaches the pages a majority of them touched, and is rewritten atomically in place (other handlers serving it are not disturbed; concurrent learners take turns). A local snapshot file only.",
      default: false,
    }),
    'learn-runs': Flags.integer({summary: 'With --learn: how many recent runs the snapshot remembers [default: what it remembers already, else 5].', min: 1, max: MAX_LEARN_RUNS, dependsOn: ['learn']}),
    'working-set': Flags.string({summary: 'Prefetch this recorded working set (from --record or `uffd working-set merge`) as soon as a client connects [default: the one attached to the snapshot, if any; "none" to ignore it].'}),
    'spin-us': Flags.integer({summary: 'Microseconds to keep polling after a fault before sleeping (saves a cross-CPU wake-up per fault; costs CPU).', default: 0, min: 0, max: 1_000_000}),
    'stats-file': Flags.string({summary: 'Write run statistics as JSON here at exit (render with `uffd stats FILE`).'}),
    ...remoteFlags,
    'count-hits': Flags.boolean({summary: "Count prefetch hits and waste: clears the accessed bits of pages installed ahead of need (process_madvise MADV_COLD, which also moves them to the inactive LRU list; the fault-loop thread stays on one CPU meanwhile) and reads the client's /proc/PID/smaps twice a second. Needs CAP_SYS_NICE.", default: false, exclusive: ['criu-dir']}),
  }

  async run(): Promise<ResumeResult> {
    const {args, flags} = await this.parse(Resume)
    // The session opens the set itself, and would block on a FIFO before listening.
    if (flags['working-set'] && flags['working-set'] !== 'none') checkInput(flags['working-set'])
    const decoders = flags.decoders ?? os.availableParallelism()
    const remote = remoteOptions(flags)
    const snapshot = await openSnapshot(args.snapshot, remote, flags.layers)
    try {
      // A remote chunk is fetched by the fetcher thread and decoded by a decoder: the fault loop
      // itself never waits on the network (a fault whose chunk is not here yet waits, the loop
      // goes on serving).
      if (snapshot.remote && decoders === 0) throw new UffdError('USAGE', '--decoders 0 cannot serve a remote snapshot (decoders read what the network fetched)')
      if (flags.learn && !(snapshot.reader instanceof SnapshotReader)) throw new UffdError('USAGE', '--learn rewrites the snapshot in place: a layer cannot learn (learn on the base before layering, or squash the chain first)')
      if (snapshot.remote && flags.learn) throw new UffdError('USAGE', '--learn rewrites the snapshot in place: it needs a local file, not a URL (learn on a local copy, then `uffd cp` it back)')
      return await this.serve(snapshot, decoders, flags)
    } finally {
      await snapshot.close()
    }
  }

  private async serve(snapshot: OpenedSnapshot, decoders: number, flags: Interfaces.InferredFlags<typeof Resume.flags>): Promise<ResumeResult> {
    const {chunkSize, pageSize} = snapshot.reader.geometry
    const faultAroundBytes = this.faultAround(flags['fault-around'], chunkSize, pageSize)

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
    process.on('SIGINT', onStop)
    process.on('SIGTERM', onStop)
    process.on('SIGUSR1', onUsr1)
    let result: ResumeResult
    const common = {
      snapshot,
      timeoutMs: flags.timeout * 1000,
      readyFile: flags['ready-file'],
      kill: flags.kill,
      cacheBytes: flags['cache-mb'] * 1024 * 1024,
      faultAroundBytes,
      spinMicros: flags['spin-us'],
      decoders,
      readaheadBytes: this.size(flags.readahead, '--readahead'),
      statsFile: flags['stats-file'],
      signal: controller.signal,
      log: (line: string) => process.stderr.write(`uffd resume: ${line}\n`),
      onStats: (statsOf: () => unknown) => {
        current = {stats: statsOf}
      },
    }
    try {
      if (flags['criu-dir']) {
        result = await runCriuResume({...common, criuDir: flags['criu-dir'], workDir: flags['work-dir'] ?? flags['criu-dir']})
      } else {
        result = await runResume({
          ...common,
          socketPath: flags.socket!,
          serve: flags.serve,
          populateAll: flags.populate === 'all',
          recordFile: flags.record,
          workingSetFile: flags['working-set'],
          countHits: flags['count-hits'],
          learn: flags.learn ? {path: snapshot.name, keep: flags['learn-runs'], signal: learning.signal} : undefined,
        })
      }
    } finally {
      process.off('SIGINT', onStop)
      process.off('SIGTERM', onStop)
      process.off('SIGUSR1', onUsr1)
    }
    const s = result.stats
    this.log(
      `served ${s.faults.total} faults: ${s.pages.copied} pages copied (${formatBytes(s.bytes.copied)}), ${s.pages.zeroed} zeroed, ` +
        `${s.chunks.decoded} chunks decoded, latency p50 ${s.latencyUs.p50 ?? '-'} µs p99 ${s.latencyUs.p99 ?? '-'} µs`,
    )
    if (result.error) {
      process.exitCode = 1
      if (!this.jsonEnabled()) this.logToStderr(`uffd resume: ${result.error.message}`)
    } else if (result.interrupted) {
      if (this.jsonEnabled()) process.exitCode = 130
      else throw new InterruptedError(signalName ?? 'signal')
    }
    return result
  }

  private size(text: string, flag: string): number {
    try {
      return parseSize(text)
    } catch (error) {
      this.error(`${flag}: ${(error as Error).message}`, {exit: 2})
    }
  }

  private faultAround(text: string, chunkSize: number, pageSize: number): number {
    if (text === 'auto') return Math.max(2 * 1024 * 1024, chunkSize)
    if (text === 'chunk') return chunkSize
    if (text === 'page') return pageSize
    let bytes: number
    try {
      bytes = parseSize(text)
    } catch (error) {
      this.error(`--fault-around: ${(error as Error).message}`, {exit: 2})
    }
    if (bytes < pageSize || bytes % pageSize !== 0) this.error(`--fault-around must be a multiple of the snapshot's page size (${pageSize})`, {exit: 2})
    return bytes
  }
}
