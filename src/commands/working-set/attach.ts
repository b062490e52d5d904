import fs from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../cli/base-command.js'
import {checkMatches, chunksInTouchOrder, parseWorkingSet} from '../../resume/working-set.js'
import {SnapshotReader} from '../../snapshot/reader.js'
import {attachWorkingSet} from '../../snapshot/relayout.js'

export default class WorkingSetAttach extends BaseCommand {
  static override summary = 'Attach a working set to a snapshot: its chunks are stored first and prefetched by `uffd resume` on connect.'
  static override description = 'Stored bytes are copied, not recompressed. The snapshot is rewritten atomically in place, or written to --output.'
  static override examples = ['<%= config.bin %> working-set attach vm.uffd vm.ws', '<%= config.bin %> working-set attach vm.uffd vm.ws -o vm-ws.uffd']
  static override args = {
    snapshot: Args.string({description: 'Snapshot file.', required: true}),
    'working-set': Args.string({description: 'Working set (from `uffd resume --record` or `uffd working-set merge`).', required: true}),
  }

  static override flags = {
    output: Flags.string({char: 'o', summary: 'Write the result here instead of replacing the snapshot.'}),
  }

  async run(): Promise<{output: string; fileSize: number; chunksFirst: number; pages: number}> {
    const {args, flags} = await this.parse(WorkingSetAttach)
    const set = parseWorkingSet(fs.readFileSync(args['working-set'], 'utf8'), args['working-set'])
    const reader = SnapshotReader.open(args.snapshot)
    const {geometry, header} = reader
    reader.close()
    checkMatches(set, {logicalSize: geometry.logicalSize, pageSize: geometry.pageSize, headerCrc: header.headerCrc}, args['working-set'])
    const output = flags.output ?? args.snapshot
    const result = attachWorkingSet(args.snapshot, output, {chunks: chunksInTouchOrder(set.pages, geometry.pagesPerChunk), pages: set.pages.length, runs: set.runs})
    this.log(`${output}: ${result.chunksFirst} working-set chunks stored first (${set.pages.length} pages from ${set.runs} run(s))`)
    return {output, ...result, pages: set.pages.length}
  }
}
