import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {modeFlag, parseMode} from '../cli/mode-flag.js'
import {progressBar, withInterruptHandling} from '../cli/progress.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../cli/remote-flags.js'
import {formatBytes} from '../core/units.js'
import {type RemoteReport} from '../remote/remote-snapshot.js'
import {copySnapshot} from '../snapshot/copy.js'
import {LayeredReader} from '../snapshot/layered-reader.js'
import {isRecordedParent, openSnapshot} from '../snapshot/open.js'
import {type OutputLocation, outputLocation, type PreparedOutput, prepareOutput} from '../snapshot/outputs.js'
import {locationIn, prefixOf} from '../snapshot/parent-location.js'
import {describeLocation} from '../remote/location.js'
import {UffdError} from '../core/errors.js'
import {layersFlag} from '../cli/layers-flag.js'
import {readKeysFromFlags, readSealFlagSpecs} from '../cli/seal-flags.js'

export interface CopyReport {
  source: string
  destination: string
  bytes: number
  unitsVerified: number
  seconds: number
  /** For a layer: every file of its chain, base first, and whether it was copied (false: the same snapshot was there already). */
  files?: CopiedFile[]
  /** For a remote source: what fetching cost. */
  remote?: RemoteReport
}

export interface CopiedFile {
  source: string
  destination: string
  bytes: number
  unitsVerified: number
  copied: boolean
}

export default class Cp extends BaseCommand {
  static override summary = 'Copy a snapshot between local paths and object storage, verifying every chunk on the way.'
  static override description = `SRC is a path, an http(s):// URL or s3://BUCKET/KEY; DST a path or s3://BUCKET/KEY. The copy is byte for byte. A layer is copied with its chain: its ancestors (found next to SRC, or under --layers, each checked) go next to DST under the names the layer records, base first, so the copy resolves where it lands; an ancestor already there (the same snapshot, by identity) is kept, and another file in its place is OUTPUT_EXISTS without --force. The source's header and index are validated before anything is copied; then every chunk (and packed working-set block) is checked against its checksum and decoded as its bytes pass, in file order, in bounded memory (a remote source is fetched ahead with --fetch-concurrency, through the --cache-dir). The destination appears only when the copy is complete and verified: a local one atomically (temporary file, fsync, rename), an s3:// one as a multipart upload completed at the end. A corrupt source, any failure or an interrupt leaves nothing at the destination (the upload is aborted).`

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
    layers: layersFlag,
    ...oclifFlags(remoteFlagSpecs),
    ...oclifFlags(readSealFlagSpecs),
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
    // An encrypted snapshot is copied as it is; without its key (a host that moves snapshots but
    // holds no keys) its units are checked by checksum only, with it they are decrypted too.
    const keys = readKeysFromFlags(flags)
    const snapshot = await openSnapshot(args.source, options, flags.layers, keys, true)
    const bar = progressBar(!this.jsonEnabled(), 'cp')
    const files: CopiedFile[] = []
    try {
      const {reader} = snapshot
      // A layer comes with its chain: each ancestor goes next to the destination under the name
      // the layer records (where resume looks for it), base first, so a copy cut short never
      // leaves a layer without its parents. One already there, the very snapshot, is kept.
      const chain = reader instanceof LayeredReader ? reader.files : [reader]
      const top = chain.at(-1)!
      const targets: (PreparedOutput | undefined)[] = []
      for (const [k, parent] of (top.layer?.parents ?? []).entries()) {
        const at = ancestorOutput(location, parent.name)
        if (describeLocation(at) === prepared.destination) throw new UffdError('USAGE', `${prepared.destination} is where the chain's ${k === 0 ? 'base' : `ancestor ${k}`} ${parent.name} goes (next to the layer, by its recorded name): copy the layer to another name`)
        if (await isRecordedParent(at, options, parent.id, keys)) targets.push(undefined)
        else targets.push(await prepareOutput(at, {force: flags.force, mode, s3: options.s3}))
      }
      targets.push(prepared)
      const total = chain.reduce((sum, f) => sum + f.fileSize, 0)
      let before = 0
      for (const [k, file] of chain.entries()) {
        const target = targets[k]
        const entry = {source: reader instanceof LayeredReader ? reader.paths[k] : snapshot.name, destination: target?.destination ?? describeLocation(ancestorOutput(location, top.layer!.parents[k].name)), bytes: file.fileSize, unitsVerified: 0, copied: target !== undefined}
        if (target) {
          const at = before
          const copied = await withInterruptHandling((signal) => copySnapshot(file, target.open(file.fileSize), {signal, onProgress: (done) => bar.update(at + done, total)}))
          entry.unitsVerified = copied.unitsVerified
        }
        before += file.fileSize
        files.push(entry)
      }
    } finally {
      bar.stop()
      await snapshot.close()
    }
    const seconds = (performance.now() - started) / 1000
    const copied = files.filter((f) => f.copied)
    const bytes = copied.reduce((sum, f) => sum + f.bytes, 0)
    const unitsVerified = copied.reduce((sum, f) => sum + f.unitsVerified, 0)
    const kept = files.length - copied.length
    this.log(`${snapshot.name} -> ${prepared.destination}: ${formatBytes(bytes)}${files.length > 1 ? ` in ${copied.length} files of its chain${kept ? ` (${kept} already there)` : ''}` : ''}, ${unitsVerified} chunks verified, ${seconds.toFixed(2)} s (${formatBytes(bytes / Math.max(seconds, 1e-9))}/s)`)
    const remote = snapshot.report()
    return {source: snapshot.name, destination: prepared.destination, bytes, unitsVerified, seconds, ...(files.length > 1 ? {files} : {}), ...(remote ? {remote} : {})}
  }
}

/** Where an ancestor called `name` goes: beside the layer's destination, a path or an S3 object like it. */
function ancestorOutput(destination: OutputLocation, name: string): OutputLocation {
  return locationIn(prefixOf(destination), name) as OutputLocation
}
