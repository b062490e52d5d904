import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../cli/base-command.js'
import {writeFileAtomically} from '../../snapshot/atomic-file.js'
import {readInputText} from '../../snapshot/input-file.js'
import {mergeWorkingSets, parseWorkingSet, type WorkingSetFile} from '../../format/working-set.js'

export default class WorkingSetMerge extends BaseCommand {
  static override summary = 'Merge working sets recorded by `uffd resume --record` into one.'
  static override description =
    'The order of faults varies between resumes; the set of pages barely does. union keeps every page any run touched; majority keeps pages touched in more than half of the runs. Pages are ordered by their median first-touch time.'

  static override examples = ['<%= config.bin %> working-set merge run1.ws run2.ws run3.ws --mode majority -o vm.ws']
  static override strict = false
  static override args = {
    files: Args.string({description: 'Working-set files, recorded on the same snapshot (usually two or more; one is rewritten as it is).', required: true}),
  }

  static override flags = {
    mode: Flags.string({summary: 'Which pages to keep.', options: ['union', 'majority'], default: 'majority'}),
    output: Flags.string({char: 'o', summary: 'Merged working-set file to write.', required: true}),
  }

  async run(): Promise<{output: string; runs: number; pages: number; mode: string}> {
    const {argv, flags} = await this.parse(WorkingSetMerge)
    const files = argv as string[]
    const sets: WorkingSetFile[] = files.map((f) => parseWorkingSet(readInputText(f), f))
    const merged = mergeWorkingSets(sets, flags.mode as 'union' | 'majority', files)
    writeFileAtomically(flags.output, `${JSON.stringify(merged)}\n`)
    this.log(`${flags.output}: ${merged.pages.length} pages from ${merged.runs} runs (${flags.mode})`)
    return {output: flags.output, runs: merged.runs, pages: merged.pages.length, mode: flags.mode}
  }
}
