import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../cli/base-command.js'
import {modeFlag, parseMode} from '../../cli/mode-flag.js'
import {withInterruptHandling} from '../../cli/progress.js'
import {oclifFlags} from '../../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../../cli/remote-flags.js'
import {readKeysFromFlags, readSealFlagSpecs, sealingFromFlags, writeSealFlagSpecs} from '../../cli/seal-flags.js'
import {checkMatches, parseWorkingSet} from '../../format/working-set.js'
import {readInputText} from '../../snapshot/input-file.js'
import {layersFlag} from '../../cli/layers-flag.js'
import {UffdError} from '../../core/errors.js'
import {LayeredReader} from '../../snapshot/layered-reader.js'
import {checkSignable} from '../../snapshot/opened-seal.js'
import {type SnapshotReader} from '../../snapshot/reader.js'
import {openSnapshot} from '../../snapshot/open.js'
import {chainFileAt, outputLocation, prepareOutput} from '../../snapshot/outputs.js'
import {workingSetIdentity} from '../../snapshot/attached-set.js'
import {attachedSizeHint, describeAttached, PACK_CODECS, packOptionsFor, writeAttached} from '../../snapshot/relayout.js'

export default class WorkingSetAttach extends BaseCommand {
  static override summary = 'Attach a working set to a snapshot: its pages are stored first, packed, and prefetched by `uffd resume` on connect.'
  static override description = `The set's pages are copied into blocks of their own (in first-touch order, compressed with --pack), so prefetching a set scattered over the whole image decodes only its pages; its chunks follow, then the rest. The chunks still hold every page, so the file grows by the packed copy and older readers lose nothing. Chunks' stored bytes are copied (each checked against its checksum), not recompressed. The snapshot is rewritten atomically in place, or written to --output.

A layer (snapshot --parent) takes a working set too: the set's pages are read from the image its chain resolves to, whichever file holds them, and packed into the layer, which is the only file rewritten; its identity does not change, so layers made on it still resolve. Its parents are found as resume finds them (next to it, or under --layers).

The snapshot may be an http(s):// URL (then --output is needed) or s3://BUCKET/KEY; its chunks are fetched through the --cache-dir. An s3:// result is uploaded as it is written and appears only when complete (the in-place rewrite of an s3:// snapshot replaces the object at the end); a failed or interrupted run aborts the upload.`
  static override examples = [
    '<%= config.bin %> working-set attach vm.uffd vm.ws',
    '<%= config.bin %> working-set attach vm.uffd vm.ws -o vm-ws.uffd',
    '<%= config.bin %> working-set attach s3://snapshots/vm.uffd vm.ws -o s3://snapshots/vm-ws.uffd',
  ]

  static override args = {
    snapshot: Args.string({description: 'Snapshot: a path, http(s):// URL or s3://BUCKET/KEY.', required: true}),
    'working-set': Args.string({description: 'Working set (from `uffd resume --record` or `uffd working-set merge`).', required: true}),
  }

  static override flags = {
    output: Flags.string({char: 'o', summary: 'Write the result here (a path or s3://BUCKET/KEY) instead of replacing the snapshot.'}),
    mode: modeFlag,
    pack: Flags.string({summary: "Codec of the packed copy of the set's pages [default: the snapshot's codec]; none: reorder chunks only (not for a layer, which has no chunks).", options: PACK_CODECS}),
    layers: layersFlag,
    ...oclifFlags(remoteFlagSpecs),
    ...oclifFlags(readSealFlagSpecs),
    // A signed snapshot is signed again (its header changes); an encrypted one keeps its key and salt.
    ...oclifFlags({'sign-key': writeSealFlagSpecs['sign-key']}),
  }

  async run(): Promise<{output: string; fileSize: number; chunksFirst: number; packedBlocks: number; packedBytes: number; pages: number}> {
    const {args, flags} = await this.parse(WorkingSetAttach)
    let mode: number | undefined
    try {
      mode = parseMode(flags.mode)
    } catch (error) {
      this.error((error as Error).message, {exit: 2})
    }
    const options = remoteOptions(flags)
    // In place unless --output: an http(s):// snapshot cannot be rewritten, which is a usage error.
    const location = outputLocation(flags.output ?? args.snapshot, {mode, flag: flags.output === undefined ? 'a snapshot rewritten in place (without --output)' : '--output'})
    const set = parseWorkingSet(readInputText(args['working-set']), args['working-set'])
    const keys = readKeysFromFlags(flags)
    const snapshot = await openSnapshot(args.snapshot, options, flags.layers, keys)
    try {
      const {reader} = snapshot
      // A layer is rewritten alone; its ancestors are read (the set's pages may be theirs), never replaced.
      const clash = reader instanceof LayeredReader ? chainFileAt(location, reader.paths.slice(0, -1)) : undefined
      if (clash) throw new UffdError('USAGE', `the output ${flags.output} is ${clash}, a parent of ${snapshot.name}: writing it would lose that file`)
      checkMatches(set, workingSetIdentity(reader), args['working-set'])
      // Replacing is what attach does (in place by default): no --force, as for a local file.
      const prepared = await prepareOutput(location, {force: true, mode, s3: options.s3})
      const seal = {...sealingFromFlags({...flags, encrypt: false, convergent: false}, keys), ...(keys.keys[0] ? {key: keys.keys[0]} : {})}
      if (seal.signingKey) {
        // Every file the result's bytes come from (a layer's ancestors too) must have been authenticated.
        const files = reader instanceof LayeredReader ? reader.files.map((f, k) => ({name: reader.paths[k], seal: f.seal})) : [{name: snapshot.name, seal: (reader as SnapshotReader).seal}]
        checkSignable(files, seal.signingKey)
      }
      const result = await withInterruptHandling((signal) => writeAttached(reader, prepared.open(attachedSizeHint(reader, set)), set, {...packOptionsFor(reader.header.metadata, flags.pack), seal}, signal), `${prepared.destination} left as it was`)
      this.log(`${prepared.destination}: ${describeAttached(result, set)}`)
      return {output: prepared.destination, ...result, pages: set.pages.length}
    } finally {
      await snapshot.close()
    }
  }
}
