import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {Flags, type Interfaces} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {modeFlag, parseMode} from '../cli/mode-flag.js'
import {progressBar, withInterruptHandling} from '../cli/progress.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions, s3Settings} from '../cli/remote-flags.js'
import {readKeysFromFlags, readSealFlagSpecs, sealingFromFlags, writeSealFlagSpecs} from '../cli/seal-flags.js'
import {type ReadKeys, type SealingOptions} from '../snapshot/sealing.js'
import {UffdError} from '../core/errors.js'
import {formatBytes, formatPercent, parseSize} from '../core/units.js'
import {MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PAGE_SIZE_2M, PAGE_SIZE_4K} from '../format/constants.js'
import {geometryProblem} from '../format/geometry.js'
import {type CompressionCodec, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL} from '../snapshot/codecs.js'
import {readInputText} from '../snapshot/input-file.js'
import {criuDirInput, freezeProcess, memFileInput, ProcessInput, processExists, ProcessSnapshotError} from '../snapshot/inputs.js'
import {parseWorkingSet, WorkingSetError} from '../format/working-set.js'
import {type OutputSink} from '../snapshot/output-sink.js'
import {asidePath, chainFileAt, outputLocation, prepareOutput} from '../snapshot/outputs.js'
import {SnapshotReader} from '../snapshot/reader.js'
import {attachedSizeHint, describeAttached, PACK_CODECS, packOptionsFor, writeAttached} from '../snapshot/relayout.js'
import {type ImageInput, type WriteSummary, writeSnapshot} from '../snapshot/writer.js'
import {type LayerSummary, writeLayer} from '../snapshot/layer-writer.js'
import {LayeredReader} from '../snapshot/layered-reader.js'
import {layerOver, type OpenedSnapshot, openSnapshot} from '../snapshot/open.js'
import {AtomicFile} from '../snapshot/atomic-file.js'
import {fileNameOf} from '../snapshot/parent-location.js'
import {describeLocation, isRemote, type Location, parseLocation} from '../remote/location.js'

export const DEFAULT_CODEC: CompressionCodec = 'zstd'
export const DEFAULT_LEVEL = 1
export const DEFAULT_CHUNK_SIZE = '256K'
const SOURCES = ['mem-file', 'pid', 'criu-dir']

export default class Snapshot extends BaseCommand {
  static override summary = 'Turn guest memory, a live process or a CRIU dump into a chunked, compressed, checksummed snapshot.'
  static override description = `Reads a raw memory image (--mem-file: a Firecracker full-snapshot memory file, a QEMU RAM dump, any raw image) or a live process (--pid) and writes one snapshot file: fixed-size chunks compressed independently, zero pages recorded in a bitmap and never stored, identical chunks stored once, every chunk checksummed. The file appears atomically (temporary file, fsync, rename); an interrupted or failed run leaves nothing behind.

With --pid the process is stopped (SIGSTOP) while its memory is read, for a consistent image, and resumed afterwards, also on error or Ctrl-C; pages it never populated are stored as zero pages.

With --criu-dir the page images of a CRIU dump (criu dump -D DIR) are converted: one region per VMA of every task in the dumped tree, owned by the task's pid; pages CRIU did not dump are zero pages. An incremental dump (criu dump --prev-images-dir --track-mem: pages in its parent dump) is written as a layer with --parent SNAPSHOT, the snapshot of its parent dump; without --parent it is refused, as are --lazy-pages dumps.

With --parent BASE the snapshot is a layer over BASE (an ordinary snapshot, or itself a layer): every page is compared with BASE's and only those that differ are stored, packed in compressed blocks, with a table saying which file of the chain holds each page. The layer records each ancestor's file name and identity; resume, stats, verify, squash and cp find them next to the layer (its directory, S3 prefix or URL directory, or under --layers) and refuse a missing or different one. BASE may be local, s3:// or http(s)://, and the layer may go to a path or to s3:// (uploaded when written). Its page and chunk size are BASE's. With --diff, --mem-file is a Firecracker Diff snapshot: its holes are pages unchanged since BASE (not zeros), and its data pages are compared with BASE too.

With -o s3://BUCKET/KEY the snapshot is uploaded as it is written (a multipart upload: parts go out while later chunks are still being compressed, a few parts in memory at once); the object appears only when it is complete, and a failed or interrupted run aborts the upload, leaving nothing. With --working-set, the snapshot is first written to a temporary file in $TMPDIR, then uploaded with the set attached.`

  static override examples = [
    '<%= config.bin %> snapshot --mem-file vm.mem -o vm.uffd',
    '<%= config.bin %> snapshot --mem-file vm.mem -o vm.uffd --codec lz4 --chunk-size 1M',
    '<%= config.bin %> snapshot --pid 1234 -o app.uffd --json',
    '<%= config.bin %> snapshot --criu-dir ./dump -o app.uffd',
    '<%= config.bin %> snapshot --mem-file vm.mem -o s3://snapshots/vm.uffd',
    '<%= config.bin %> snapshot --mem-file vm2.mem --parent vm.uffd -o vm2.uffd',
    '<%= config.bin %> snapshot --mem-file vm.diff --diff --parent vm.uffd -o vm2.uffd',
  ]

  static override flags = {
    'mem-file': Flags.string({summary: 'Raw memory image to snapshot (sparse holes are skipped without reading).', exactlyOne: SOURCES}),
    pid: Flags.integer({summary: 'Live process to snapshot (needs root or ptrace access).', min: 1, exactlyOne: SOURCES}),
    'criu-dir': Flags.string({summary: 'CRIU dump directory (criu dump -D DIR) whose page images to convert.', exactlyOne: SOURCES}),
    output: Flags.string({char: 'o', summary: 'Snapshot to write: a path or s3://BUCKET/KEY [default: <image>.uffd, pid-<PID>.uffd or <dir>.uffd].'}),
    force: Flags.boolean({char: 'f', summary: 'Replace the output if it exists (for s3://, checked with HeadObject before starting; not atomic against another writer).', default: false}),
    codec: Flags.string({summary: 'Compression codec per chunk: zstd is smallest, lz4 ~20% larger and decodes ~2.5x faster (for resumes that populate all memory). Chunks that do not shrink are stored raw.', options: ['zstd', 'lz4', 'raw'], default: DEFAULT_CODEC}),
    level: Flags.integer({summary: `zstd level, ${ZSTD_MIN_LEVEL}..${ZSTD_MAX_LEVEL}; negative levels are zstd's fast modes. Ignored by lz4 and raw.`, min: ZSTD_MIN_LEVEL, max: ZSTD_MAX_LEVEL, default: DEFAULT_LEVEL}),
    'chunk-size': Flags.string({summary: 'Bytes per independently compressed chunk: a power of two, 4K..4M, at least the page size.', default: DEFAULT_CHUNK_SIZE}),
    'frame-size': Flags.string({summary: 'Bytes of image per independently decodable zstd frame within a chunk, so an isolated first touch decodes one frame, not its whole chunk (~1.3% larger at 64K on a guest image): a power of two; 0, less than the page size or at least the chunk size: one frame a chunk. zstd only; a layer (--parent) stores blocks decoded whole.', default: '64K'}),
    'page-size': Flags.string({summary: 'Page size of the memory the snapshot will serve: 4K, or 2M for hugetlbfs-backed guests.', options: ['4K', '2M'], default: '4K'}),
    regions: Flags.string({summary: 'Comma-separated sizes of the guest memory regions in the mem file (default: one region).', dependsOn: ['mem-file']}),
    jobs: Flags.integer({char: 'j', summary: 'Compression worker threads [default: number of CPUs].', min: 1, max: 256}),
    'working-set': Flags.string({summary: 'Attach a working set recorded by `uffd resume --record` (on a snapshot of the same memory): its pages are stored first, packed, and prefetched on resume.'}),
    pack: Flags.string({summary: "With --working-set: codec of the packed copy of the set's pages [default: --codec]; none: reorder chunks only.", options: PACK_CODECS, dependsOn: ['working-set']}),
    parent: Flags.string({summary: "Write a layer over this snapshot (a path, http(s):// URL or s3://BUCKET/KEY; itself a layer or not): only the pages whose content differs from the parent's are stored."}),
    'page-digests': Flags.boolean({summary: "Store a 16-byte digest of every page the file holds (~0.4% of their bytes), so a layer written over it compares digests instead of decoding it (--no-page-digests: store none). Never in an encrypted or signed file; only for 4K pages. A layer compares by its parent chain's digests whenever every file of the chain has them.", default: true, allowNo: true}),
    diff: Flags.boolean({summary: 'With --parent and --mem-file: the file is a Firecracker Diff snapshot, whose holes are pages unchanged since the parent.'}),
    layers: Flags.string({summary: "Where the parent's own ancestors are, when the parent is a layer: a directory, s3://BUCKET/PREFIX/ or an http(s):// directory [default: next to the parent].", dependsOn: ['parent']}),
    mode: modeFlag,
    freeze: Flags.boolean({summary: 'Stop the process while reading it (--no-freeze reads it running: faster for the process, inconsistent image).', default: true, allowNo: true}),
    ...oclifFlags(remoteFlagSpecs),
    ...oclifFlags(writeSealFlagSpecs),
    ...oclifFlags(readSealFlagSpecs),
  }

  async run(): Promise<(WriteSummary & {ratio: number; source: string}) | (LayerSummary & {source: string})> {
    const {flags} = await this.parse(Snapshot)
    if (flags.diff && (flags.parent === undefined || flags['mem-file'] === undefined)) this.error('--diff needs --parent and --mem-file: a Diff snapshot is read as changes to its parent', {exit: 2})
    const keys = readKeysFromFlags(flags)
    // A key given to write with, and no --encrypt: the memory would go out in the clear.
    if (flags['key-file'] !== undefined && !flags.encrypt && flags.parent === undefined) this.error('--key-file without --encrypt: the snapshot would not be encrypted (give --encrypt, or leave the key out)', {exit: 2})
    const seal = sealingFromFlags(flags, keys)
    if (flags.parent !== undefined) return this.layer(flags, seal, keys)
    if (keys.keys.length > 0 && !flags.encrypt) this.logToStderr('uffd snapshot: a key is set in the environment (UFFD_KEY_FILE or UFFD_KEY) but --encrypt was not given: the snapshot is not encrypted')
    const chunkSize = this.sizeFlag(flags['chunk-size'], '--chunk-size')
    const pageSize = flags['page-size'] === '2M' ? PAGE_SIZE_2M : PAGE_SIZE_4K
    if (flags['mem-file'] === undefined && pageSize !== PAGE_SIZE_4K) this.error('--page-size 2M applies to guest memory files, not processes', {exit: 2})
    const problem = geometryProblem(pageSize, chunkSize, 0)
    if (problem) this.error(`--chunk-size: ${problem} (allowed ${formatBytes(MIN_CHUNK_SIZE)}..${formatBytes(MAX_CHUNK_SIZE)})`, {exit: 2})
    const frameSize = this.sizeFlag(flags['frame-size'], '--frame-size')
    if (frameSize !== 0 && (frameSize & (frameSize - 1)) !== 0) this.error(`--frame-size: ${formatBytes(frameSize)} is not 0 or a power of two`, {exit: 2})
    const regionSizes = flags.regions?.split(',').map((s) => this.sizeFlag(s, '--regions'))
    const badRegion = regionSizes?.find((size) => size <= 0 || size % pageSize !== 0)
    if (badRegion !== undefined) this.error(`--regions: ${badRegion} is not a positive multiple of the ${formatBytes(pageSize)} page size`, {exit: 2})

    const {mode, source, location} = this.output(flags)
    const prepared = await prepareOutput(location, {force: flags.force, mode, s3: s3Settings(flags)})
    const output = prepared.destination
    // The set is checked before anything is written: a bad one must not cost the output, nor
    // (with --force) the file it would replace. Recorded against an earlier snapshot of the same
    // memory, its header CRC differs, so only the geometry must match; a stale set costs
    // prefetch work, never correctness.
    const workingSetFile = flags['working-set']
    const set = workingSetFile === undefined ? undefined : parseWorkingSet(readInputText(workingSetFile), workingSetFile)
    const checkSet = (input: ImageInput): void => {
      if (set && (set.snapshot.logicalSize !== input.logicalSize || set.snapshot.pageSize !== pageSize)) {
        throw new WorkingSetError(`${workingSetFile} was recorded on ${set.snapshot.logicalSize} bytes of ${set.snapshot.pageSize}-byte pages, not on this image (${input.logicalSize} bytes of ${pageSize}-byte pages)`)
      }
    }
    // With a set, the snapshot is written aside first (beside a local output, in $TMPDIR for an
    // upload) and only the attached result takes the output's name, so a failed attach leaves
    // the output as it was.
    const aside = asidePath(location)
    const written = set ? aside : undefined
    // (Errors about the file aside name the output, unless that is an object: then $TMPDIR is what fills up.)
    // Opened only once the input is known to fit (and the set to fit it): nothing is uploaded before.
    const target = (input: ImageInput): string | OutputSink => written ?? prepared.open(input.logicalSize)
    const options = {codec: flags.codec as CompressionCodec, level: flags.level, chunkSize, pageSize, frameSize, jobs: flags.jobs ?? os.availableParallelism(), mode, name: location.kind === 'file' ? output : undefined, seal, pageDigests: flags['page-digests']}
    const bar = progressBar(!this.jsonEnabled(), flags.pid ? source : path.basename(source))

    // One handler for both steps: between two, a signal would meet the default action (an
    // immediate exit, the unattached file left behind).
    const summary = await withInterruptHandling(async (signal) => {
      let plain: WriteSummary
      try {
        plain = await this.write(flags, regionSizes, pageSize, checkSet, target, {...options, signal, onProgress: bar.update})
      } finally {
        bar.stop()
      }
      if (!set) return plain
      try {
        const reader = SnapshotReader.open(plain.path, plain.path, {keys: seal.key ? [seal.key] : [], verifyKeys: []})
        try {
          const attached = await writeAttached(reader, prepared.open(attachedSizeHint(reader, set)), set, {...packOptionsFor({codec: flags.codec, level: flags.level}, flags.pack), seal}, signal)
          this.logToStderr(`${output}: ${describeAttached(attached, set)}`)
          return {...plain, fileSize: attached.fileSize, path: output}
        } finally {
          reader.close()
        }
      } finally {
        fs.rmSync(plain.path, {force: true})
      }
    }, `${output} left as it was`)
    const ratio = summary.fileSize === 0 ? 0 : summary.logicalSize / summary.fileSize
    this.log(
      `${summary.path}: ${formatBytes(summary.logicalSize)} -> ${formatBytes(summary.fileSize)} (${ratio.toFixed(2)}x), ` +
        `${formatPercent(summary.zeroPages, summary.pageCount)} zero pages, ${summary.chunkCount} chunks of ${formatBytes(chunkSize)}` +
        `${summary.dedupChunks ? `, ${summary.dedupChunks} deduplicated` : ''}, ${summary.seconds.toFixed(2)} s ` +
        `(${formatBytes(summary.logicalSize / Math.max(summary.seconds, 1e-9))}/s)`,
    )
    return {...summary, ratio, source}
  }

  /** The --mode, what the input is called, and where the output goes (-o, or a name made from the input). */
  private output(flags: Interfaces.InferredFlags<typeof Snapshot.flags>): {mode: number | undefined; source: string; location: ReturnType<typeof outputLocation>} {
    let mode: number | undefined
    try {
      mode = parseMode(flags.mode)
    } catch (error) {
      this.error((error as Error).message, {exit: 2})
    }
    const source = flags['mem-file'] ?? flags['criu-dir'] ?? `pid ${flags.pid}`
    const location = outputLocation(flags.output ?? (flags.pid === undefined ? `${path.basename(path.resolve(source))}.uffd` : `pid-${flags.pid}.uffd`), {mode})
    return {mode, source, location}
  }

  /** `snapshot --parent`: a layer of the input over the parent (local or remote, as its chain is), to a path or s3://. */
  private async layer(flags: Interfaces.InferredFlags<typeof Snapshot.flags>, given: SealingOptions, keys: ReadKeys): Promise<LayerSummary & {source: string}> {
    if (flags.regions !== undefined) this.error("--regions with --parent: a layer has its parent's regions", {exit: 2})
    const {mode, source, location} = this.output(flags)
    const parentLocation = parseLocation(flags.parent!)
    const remote = remoteOptions(flags)
    const prepared = await prepareOutput(location, {force: flags.force, mode, s3: remote.s3})
    const parent = await openSnapshot(flags.parent!, remote, flags.layers, keys)
    // A layer over an encrypted parent is encrypted too, as the parent is (its memory is the parent's, changed).
    const files = parent.reader instanceof LayeredReader ? parent.reader.files : [parent.reader as SnapshotReader]
    const parentSeal = files.find((f) => f.seal?.encrypted)?.seal?.info.encryption
    const seal: SealingOptions = parentSeal && !given.key ? {...given, key: keys.keys[0], convergent: given.convergent || parentSeal.convergent} : given
    const parentPath = parent.name
    try {
      const clash = chainClash(location, parent)
      if (clash) throw new UffdError('USAGE', `the output ${prepared.destination} is ${clash}, a file of the parent's chain: writing it would lose that file`)
      const pageSize = flags['page-size'] === '2M' ? PAGE_SIZE_2M : PAGE_SIZE_4K
      if (pageSize !== parent.reader.geometry.pageSize) throw new UffdError('INPUT_MISMATCH', `--page-size ${flags['page-size']}: the parent ${parentPath} has ${formatBytes(parent.reader.geometry.pageSize)} pages`)
      // A set is checked before anything is written (as for a snapshot), against the image's
      // geometry: the parent's.
      const workingSetFile = flags['working-set']
      const set = workingSetFile === undefined ? undefined : parseWorkingSet(readInputText(workingSetFile), workingSetFile)
      const {geometry} = parent.reader
      if (set && (set.snapshot.logicalSize !== geometry.logicalSize || set.snapshot.pageSize !== geometry.pageSize)) {
        throw new WorkingSetError(`${workingSetFile} was recorded on ${set.snapshot.logicalSize} bytes of ${set.snapshot.pageSize}-byte pages, not on this image (${geometry.logicalSize} bytes of ${geometry.pageSize}-byte pages)`)
      }
      // With a set, the layer is written aside first (beside a local output, in $TMPDIR for an
      // upload), then attached to the output's name, so a failed attach leaves the output as it was.
      const aside = asidePath(location)
      const open = set ? (): OutputSink => new AtomicFile(aside, {mode: 0o600}) : prepared.open
      const bar = progressBar(!this.jsonEnabled(), flags.pid ? source : path.basename(source))
      const write = (input: ImageInput, signal: AbortSignal): Promise<LayerSummary> =>
        writeLayer(input, {reader: parent.reader, shown: parentPath, fileName: fileNameOf(parentLocation)}, open, {codec: flags.codec as CompressionCodec, level: flags.level, diff: flags.diff ?? false, signal, onProgress: bar.update, seal, pageDigests: flags['page-digests'], jobs: flags.jobs ?? os.availableParallelism()})
      const summary = await withInterruptHandling(async (signal) => {
        let layer: LayerSummary
        try {
          if (flags['mem-file']) layer = await write(memFileInput(flags['mem-file']), signal)
          else if (flags['criu-dir']) layer = await write(criuDirInput(flags['criu-dir']), signal)
          else layer = await this.layerOfProcess(flags.pid!, flags.freeze, (input) => write(input, signal))
        } finally {
          bar.stop()
        }
        if (!set) return layer
        try {
          const chain = layerOver(parent, aside, keys)
          try {
            const attached = await writeAttached(chain, prepared.open(attachedSizeHint(chain, set)), set, {...packOptionsFor({codec: flags.codec, level: flags.level}, flags.pack), seal}, signal)
            this.logToStderr(`${prepared.destination}: ${describeAttached(attached, set)}`)
            return {...layer, fileSize: attached.fileSize, path: prepared.destination}
          } finally {
            chain.close()
          }
        } finally {
          fs.rmSync(aside, {force: true})
        }
      }, `${prepared.destination} left as it was`)
      const full = summary.logicalSize / Math.max(1, summary.fileSize)
      this.log(
        `${summary.path}: layer ${summary.depth} over ${parentPath}: ${summary.changedPages} of ${summary.pageCount} pages changed (${formatPercent(summary.changedPages, summary.pageCount)}` +
          `${summary.zeroedPages ? `, ${summary.zeroedPages} now zero` : ''}), ${summary.storedPages} stored in ${summary.blocks} blocks, ${formatBytes(summary.fileSize)} (${full.toFixed(1)}x smaller than the image), ${summary.seconds.toFixed(2)} s`,
      )
      return {...summary, source}
    } finally {
      await parent.close()
    }
  }

  private async layerOfProcess(pid: number, freeze: boolean, write: (input: ImageInput) => Promise<LayerSummary>): Promise<LayerSummary> {
    if (!processExists(pid)) throw new ProcessSnapshotError(`no process with pid ${pid}`, 'NO_SUCH_PROCESS')
    const resume = freeze ? await freezeProcess(pid) : () => {}
    try {
      return await write(new ProcessInput(pid))
    } catch (error) {
      if (!processExists(pid)) throw new ProcessSnapshotError(`process ${pid} exited during the snapshot`, 'EXITED')
      throw error
    } finally {
      resume()
    }
  }

  /** Writes the snapshot of whichever input the flags name to `target(input)`. */
  private async write(
    flags: {'mem-file'?: string; 'criu-dir'?: string; pid?: number; freeze: boolean},
    regionSizes: number[] | undefined,
    pageSize: number,
    checkSet: (input: ImageInput) => void,
    target: (input: ImageInput) => string | OutputSink,
    options: Parameters<typeof writeSnapshot>[2],
  ): Promise<WriteSummary> {
    if (flags['mem-file']) {
      const input = memFileInput(flags['mem-file'], regionSizes)
      if (regionSizes && regionSizes.reduce((a, b) => a + b, 0) > Math.ceil(input.logicalSize / pageSize) * pageSize) {
        this.error(`--regions add up to more than the ${input.logicalSize}-byte file`, {exit: 2})
      }
      if (input.logicalSize % pageSize !== 0 && pageSize === PAGE_SIZE_2M) throw new UffdError('INPUT_MISMATCH', `${flags['mem-file']} is not a whole number of 2 MiB pages`)
      checkSet(input)
      return writeSnapshot(input, target(input), options)
    }
    if (flags['criu-dir']) {
      const input = criuDirInput(flags['criu-dir'])
      checkSet(input)
      return writeSnapshot(input, target(input), options)
    }
    return this.snapshotProcess(flags.pid!, flags.freeze, target, options, checkSet)
  }

  private async snapshotProcess(pid: number, freeze: boolean, target: (input: ImageInput) => string | OutputSink, options: Parameters<typeof writeSnapshot>[2], checkInput: (input: ImageInput) => void): Promise<WriteSummary> {
    if (!processExists(pid)) throw new ProcessSnapshotError(`no process with pid ${pid}`, 'NO_SUCH_PROCESS')
    const resume = freeze ? await freezeProcess(pid) : () => {}
    try {
      let input: ImageInput
      try {
        input = new ProcessInput(pid)
        checkInput(input)
        return await writeSnapshot(input, target(input), options)
      } catch (error) {
        if (!processExists(pid)) throw new ProcessSnapshotError(`process ${pid} exited during the snapshot`, 'EXITED')
        throw error
      }
    } finally {
      resume()
    }
  }

  private sizeFlag(text: string, flag: string): number {
    try {
      return parseSize(text)
    } catch (error) {
      this.error(`${flag}: ${(error as Error).message}`, {exit: 2})
    }
  }
}

/**
 * Which file of the parent's chain the output is (by any name or hard link, or the same object),
 * or undefined: replacing it would lose that file and leave the new layer, and every layer on
 * it, without a parent.
 */
function chainClash(output: Location, parent: OpenedSnapshot): string | undefined {
  return chainFileAt(output, parent.reader instanceof LayeredReader ? parent.reader.paths : [parent.name])
}
