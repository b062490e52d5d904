import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {modeFlag, parseMode} from '../cli/mode-flag.js'
import {progressBar, withInterruptHandling} from '../cli/progress.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../cli/remote-flags.js'
import {formatBytes} from '../core/units.js'
import {type RemoteReport} from '../remote/remote-snapshot.js'
import {copySnapshot} from '../snapshot/copy.js'
import {openSnapshot, singleFile} from '../snapshot/open.js'
import {outputLocation, prepareOutput} from '../snapshot/outputs.js'

export interface CopyReport {
  source: string
  destination: string
  bytes: number
  unitsVerified: number
  seconds: number
  /** For a remote source: what fetching cost. */
  remote?: RemoteReport
}

export default class Cp extends BaseCommand {
  static override summary = 'Copy a snapshot between local paths and object storage, verifying every chunk on the way.'
  static override description = `SRC is a path, an http(s):// URL or s3://BUCKET/KEY; DST a path or s3://BUCKET/KEY. The copy is byte for byte. The source's header and index are validated before anything is copied; then every chunk (and packed working-set block) is checked against its checksum and decoded as its bytes pass, in file order, in bounded memory (a remote source is fetched ahead with --fetch-concurrency, through the --cache-dir). The destination appears only when the copy is complete and verified: a local one atomically (temporary file, fsync, rename), an s3:// one as a multipart upload completed at the end. A corrupt source, any failure or an interrupt leaves nothing at the destination (the upload is aborted).`

  static override examples = [
    '<%= config.bin %> cp vm.uffd s3://snapshots/vm.uffd',
    '<%= config.bin %> cp s3://snapshots/vm.uffd /var/lib/vms/vm.uffd',
    '<%= config.bin %> cp https://artifacts.example.com/vm.uffd s3://snapshots/vm.uffd --json',
  ]

  static override args = {
    source: Args.string({description: 'Snapshot to copy: a path, http(s):// URL or s3://BUCKET/KEY.', required: true}),
    destination: Args.string({description: 'Where to write it: a path or s3://BUCKET/KEY.', required: true}),
  }

  static override flags = {
    force: Flags.boolean({char: 'f', summary: 'Replace the destination if it exists (for s3://, checked with HeadObject before starting; not atomic against another writer).', default: false}),
    mode: modeFlag,
    ...oclifFlags(remoteFlagSpecs),
  }

  async run(): Promise<CopyReport> {
    const {args, flags} = await this.parse(Cp)
    let mode: number | undefined
    try {
      mode = parseMode(flags.mode)
    } catch (error) {
      this.error((error as Error).message, {exit: 2})
    }
    const options = remoteOptions(flags)
    const location = outputLocation(args.destination, {mode, flag: 'the destination'})
    const prepared = await prepareOutput(location, {force: flags.force, mode, s3: options.s3})
    const started = performance.now()
    const snapshot = await openSnapshot(args.source, options)
    let reader
    try {
      reader = singleFile(snapshot, 'uffd cp')
    } catch (error) {
      await snapshot.close()
      throw error
    }
    const bar = progressBar(!this.jsonEnabled(), 'cp')
    let copied: Awaited<ReturnType<typeof copySnapshot>>
    try {
      copied = await withInterruptHandling((signal) => copySnapshot(reader, prepared.open(reader.fileSize), {signal, onProgress: bar.update}))
    } finally {
      bar.stop()
      await snapshot.close()
    }
    const seconds = (performance.now() - started) / 1000
    this.log(`${snapshot.name} -> ${prepared.destination}: ${formatBytes(copied.bytes)}, ${copied.unitsVerified} chunks verified, ${seconds.toFixed(2)} s (${formatBytes(copied.bytes / Math.max(seconds, 1e-9))}/s)`)
    const remote = snapshot.report()
    return {source: snapshot.name, destination: prepared.destination, ...copied, seconds, ...(remote ? {remote} : {})}
  }
}
