import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {progressBar} from '../cli/progress.js'
import {formatBytes} from '../core/units.js'
import {type VerifyResult, verifySnapshot} from '../snapshot/inspect.js'
import {SnapshotReader} from '../snapshot/reader.js'

export default class Verify extends BaseCommand {
  static override summary = 'Check a snapshot: header, index, zero map and every chunk checksum; optionally compare with the raw image.'
  static override description = 'Exits 0 when everything checks out and 1 when anything is wrong (each problem is listed, up to 20).'
  static override examples = ['<%= config.bin %> verify vm.uffd', '<%= config.bin %> verify vm.uffd --against vm.mem']
  static override args = {
    file: Args.string({description: 'Snapshot file.', required: true}),
  }

  static override flags = {
    against: Flags.string({summary: 'Raw image the snapshot must decode to, byte for byte.'}),
  }

  async run(): Promise<VerifyResult> {
    const {args, flags} = await this.parse(Verify)
    const reader = SnapshotReader.open(args.file)
    const bar = progressBar(!this.jsonEnabled(), 'verify')
    let result: VerifyResult
    try {
      result = verifySnapshot(reader, args.file, flags.against, bar.update)
    } finally {
      bar.stop()
      reader.close()
    }
    if (result.ok) {
      this.log(`${args.file}: OK, ${result.chunksChecked} chunks, ${formatBytes(result.bytesChecked)} verified${result.blocksChecked ? `, ${result.blocksChecked} packed working-set blocks match their chunks` : ''}${flags.against ? `, identical to ${flags.against}` : ''}`)
    } else {
      for (const e of result.errors) process.stderr.write(`${e}\n`)
      if (!this.jsonEnabled()) process.stderr.write(`${args.file}: FAILED\n`)
      process.exitCode = 1
    }
    return result
  }
}
