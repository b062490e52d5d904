// The flags of `uffd resume`, as data: the oclif command (src/commands/resume.ts) and the fast
// path past oclif (resume-entry.ts) both read them from here.

import {MAX_LEARN_RUNS} from '../format/constants.js'
import {type FlagSpec, type FlagValues} from './flag-specs.js'
import {remoteFlagSpecs} from './remote-flags.js'
import {readSealFlagSpecs} from './seal-flags.js'

/**
 * --cache-mb without --serve: a chunk is installed whole or nearly, so a client seldom faults on
 * it again (bench/first-touch decodes as many chunks with 8 MiB as with 256 in every pattern).
 */
export const DEFAULT_CACHE_MB = 8
/**
 * --decoders without --serve, at most: one client's faults are installed by the one fault loop,
 * which two decoders keep ahead of, and each decoder is a thread of its own (~13 MiB resident):
 * one per CPU of a large host would multiply a handler's memory for no speed.
 */
export const DEFAULT_DECODERS = 2
/** --cache-mb with --serve: every client of the snapshot faults on the same chunks. */
export const DEFAULT_SERVE_CACHE_MB = 256
/** Room for the working set decoded before the first client, unless --cache-mb says otherwise. */
export const DEFAULT_STAGE_MB = 256

export const RESUME_SNAPSHOT_ARG = 'Snapshot to serve: a path, an http(s):// URL or s3://BUCKET/KEY (chunks are fetched as they fault or are prefetched, into the --cache-dir).'

export const resumeFlagSpecs = {
  layers: {kind: 'string', summary: "Where a layer's parents are, by the names recorded in it: a directory, s3://BUCKET/PREFIX/ or an http(s):// directory [default: next to the layer: its directory, bucket prefix or URL directory]. Each is checked against the identity the layer recorded."},
  socket: {kind: 'string', summary: 'Unix socket to listen on (created 0600; a stale socket file is replaced).', exactlyOne: ['socket', 'criu-dir']},
  'criu-dir': {kind: 'string', summary: 'Serve `criu restore --lazy-pages` of this CRIU dump (the one the snapshot was made from) instead of a VMM. Only the connection of criu restore is served: others (another user, not the protocol) are turned away.', exactlyOne: ['socket', 'criu-dir'], exclusive: ['serve', 'record', 'working-set', 'learn']},
  'work-dir': {kind: 'string', summary: 'With --criu-dir: criu restore\'s --work-dir, where it looks for lazy-pages.socket [default: the --criu-dir].', dependsOn: ['criu-dir']},
  timeout: {kind: 'integer', summary: 'Seconds to wait for the client to connect, and for each connection to send its whole handshake; 0 waits forever. With --serve a handshake gets at most 10 s, also with 0.', default: 60, min: 0},
  'ready-file': {kind: 'string', summary: 'Written (atomically) once the socket is listening and the working set of a local snapshot is staged (decoded into memory), for scripts to wait on; a stale one is removed at start, and this one at exit.'},
  serve: {kind: 'boolean', summary: 'Keep accepting clients (VMs resumed from the same snapshot share one decoded-chunk cache) until SIGINT/SIGTERM.', default: false},
  also: {
    kind: 'string',
    multiple: true,
    summary:
      "SNAPSHOT=SOCKET: also serve SNAPSHOT (a path or URL, a layer's parents found as for the first) to the VMMs that connect to SOCKET; repeatable. A VMM's handshake does not name a snapshot, so each gets its own socket. One fault loop and one set of decoders serve them all: layers over a common base share its decoded chunks (counted as chunks.storedUnitsShared); the snapshots' caches share --cache-mb, and decoded base chunks are kept within as much again. Ready (--ready-file, listing every socket, and the 'listening on' line) once every socket listens. With --serve; not with --working-set FILE, --record or --learn, which name one snapshot.",
  },
  kill: {kind: 'boolean', summary: 'Kill a client that can no longer be served correctly (--no-kill leaves it frozen).', default: true, allowNo: true},
  'cache-mb': {
    kind: 'integer',
    summary: `Memory for decoded chunks kept for faults to come, MiB (default ${DEFAULT_CACHE_MB}, with --serve ${DEFAULT_SERVE_CACHE_MB}: one client rarely faults again where a chunk was installed, many clients of one snapshot do). Given, it also bounds the working set decoded before the first client (else ${DEFAULT_STAGE_MB} MiB).`,
    min: 1,
  },
  'fault-around': {kind: 'string', summary: 'Bytes installed around each faulting page: "auto" adapts (for an isolated fault the chunk, or one frame of a framed chunk, doubling up to 2 MiB, or the chunk size if larger, while faults land next to each other; zero runs over the whole 2 MiB); a size (e.g. 64K, 2M), "chunk" (the snapshot\'s chunk size) or "page" (no fault-around) is a fixed window.', default: 'auto'},
  'kernel-zeros': {
    kind: 'boolean',
    summary: "Hand the snapshot's large all-zero ranges (2 MiB or more, the longest 128) back to the kernel when a VMM connects (UFFDIO_UNREGISTER): their first touch then costs no fault, and the kernel maps zeros there, also after a balloon removal (which is then not reported). Each range splits the VMM's mapping (up to two more VMAs); one the kernel cannot hand over whole (vm.max_map_count) is registered again and served by faults. Not for --criu-dir. --no-kernel-zeros serves them with faults.",
    default: true,
    allowNo: true,
  },
  populate: {kind: 'string', summary: 'Fill memory ahead of faults: "none" (lazy; sequential readahead only) or "all" (the whole memory in the background, demand faults first).', options: ['none', 'all'], default: 'none'},
  preread: {
    kind: 'string',
    summary: 'Read the snapshot file into the page cache in the background from the start, so that on a fresh host first faults do not each wait for the disk (2 MiB at a time, each once the one before it is in, so a fault\'s own read waits behind little): "auto" (when the file is at most a quarter of the memory available) or "off".',
    options: ['auto', 'off'],
    default: 'auto',
  },
  readahead: {kind: 'string', summary: 'Most memory installed ahead of a sequential run of faults (a size, 0 to disable); the distance doubles with each fault that continues the run.', default: '256M'},
  decoders: {kind: 'integer', summary: `Threads decoding chunks ahead of need [default: ${DEFAULT_DECODERS}, or the number of CPUs if fewer; with --serve the number of CPUs]; 0 decodes in the fault loop only.`, min: 0, max: 64},
  record: {kind: 'string', summary: 'Write the working set (the pages each fault installed, faulting page first, in fault order, with times) to this file at exit.'},
  learn: {
    kind: 'boolean',
    summary: "At exit, fold the pages this run touched into the snapshot's attached working set: the snapshot remembers the last --learn-runs runs, attaches the pages a majority of them touched, and is rewritten atomically in place (other handlers serving it are not disturbed; concurrent learners take turns). A local snapshot file only.",
    default: false,
  },
  'learn-runs': {kind: 'integer', summary: 'With --learn: how many recent runs the snapshot remembers [default: what it remembers already, else 5].', min: 1, max: MAX_LEARN_RUNS, dependsOn: ['learn']},
  'working-set': {kind: 'string', summary: 'Prefetch this recorded working set (from --record or `uffd working-set merge`) as soon as a client connects [default: the one attached to the snapshot, if any; "none" to ignore it].'},
  'spin-us': {kind: 'integer', summary: 'Microseconds to keep polling after a fault before sleeping (saves a cross-CPU wake-up per fault; costs CPU).', default: 0, min: 0, max: 1_000_000},
  'stats-file': {kind: 'string', summary: 'Write run statistics as JSON here at exit (render with `uffd stats FILE`).'},
  ...remoteFlagSpecs,
  ...readSealFlagSpecs,
  'count-hits': {kind: 'boolean', summary: "Count prefetch hits and waste: clears the accessed bits of pages installed ahead of need (process_madvise MADV_COLD, which also moves them to the inactive LRU list; the fault-loop thread stays on one CPU meanwhile) and reads the client's /proc/PID/smaps twice a second. Needs CAP_SYS_NICE.", default: false, exclusive: ['criu-dir']},
} as const satisfies Record<string, FlagSpec>

/** What oclif's --json adds to every command (BaseCommand.enableJsonFlag), for the fast path. */
export const jsonFlagSpec = {json: {kind: 'boolean', summary: 'Format output as json.', default: false}} as const satisfies Record<string, FlagSpec>

export type ResumeFlags = FlagValues<typeof resumeFlagSpecs>
