import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../cli/base-command.js'
import {modeFlag, parseMode} from '../../cli/mode-flag.js'
import {withInterruptHandling} from '../../cli/progress.js'
import {formatBytes} from '../../core/units.js'
import {checkMatches, parseWorkingSet} from '../../format/working-set.js'
import {readInputText} from '../../snapshot/input-file.js'
import {SnapshotReader} from '../../snapshot/reader.js'
import {attachWorkingSet, PACK_CODECS, packOptionsFor} from '../../snapshot/relayout.js'

export function describeAttached(result: {chunksFirst: number; packedBlocks: number; packedBytes: number}, set: {pages: readonly number[]; runs: number}): string {
  const packed = result.packedBlocks > 0 ? `${set.pages.length} pages packed in ${result.packedBlocks} blocks (${formatBytes(result.packedBytes)}), then ` : ''
  return `${packed}${result.chunksFirst} working-set chunks stored first (a set of ${set.pages.length} pages from ${set.runs} run(s))`
}

export default class WorkingSetAttach extends BaseCommand {
  static override summary = 'Attach a working set to a snapshot: its pages are stored first, packed, and prefetched by `uffd resume` on connect.'
  static override description = `The set's pages are copied into blocks of their own (in first-touch order, compressed with --pack), so prefetching a set scattered over the whole image decodes only its pages; its chunks follow, then the rest. The chunks still hold every page, so the file grows by the packed copy and older readers lose nothing. Chunks' stored bytes are copied, not recompressed. The snapshot is rewritten atomically in place, or written to --output; SIGINT/SIGTERM stop it with exit 130, the destination left as it was and no temporary file behind.`
  static override examples = ['<%= config.bin %> working-set attach vm.uffd vm.ws', '<%= config.bin %> working-set attach vm.uffd vm.ws -o vm-ws.uffd']
  static override args = {
    snapshot: Args.string({description: 'Snapshot file.', required: true}),
    'working-set': Args.string({description: 'Working set (from `uffd resume --record` or `uffd working-set merge`).', required: true}),
  }

  static override flags = {
    output: Flags.string({char: 'o', summary: 'Write the result here instead of replacing the snapshot.'}),
    mode: modeFlag,
    pack: Flags.string({summary: "Codec of the packed copy of the set's pages [default: the snapshot's codec]; none: reorder chunks only.", options: PACK_CODECS}),
  }

  async run(): Promise<{output: string; fileSize: number; chunksFirst: number; packedBlocks: number; packedBytes: number; pages: number}> {
    const {args, flags} = await this.parse(WorkingSetAttach)
    let mode: number | undefined
    try {
      mode = parseMode(flags.mode)
    } catch (error) {
      this.error((error as Error).message, {exit: 2})
    }
    const set = parseWorkingSet(readInputText(args['working-set']), args['working-set'])
    const reader = SnapshotReader.open(args.snapshot)
    const {geometry, header} = reader
    reader.close()
    checkMatches(set, {logicalSize: geometry.logicalSize, pageSize: geometry.pageSize, headerCrc: header.headerCrc}, args['working-set'])
    const output = flags.output ?? args.snapshot
    const result = await withInterruptHandling((signal) => attachWorkingSet(args.snapshot, output, set, packOptionsFor(header.metadata, flags.pack), mode, signal), `${output} left as it was`)
    this.log(`${output}: ${describeAttached(result, set)}`)
    return {output, ...result, pages: set.pages.length}
  }
}
