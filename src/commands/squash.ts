import fs from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {layersFlag} from '../cli/layers-flag.js'
import {readKeysFromFlags, readSealFlagSpecs, sealingFromFlags, writeSealFlagSpecs} from '../cli/seal-flags.js'
import {checkSignable} from '../snapshot/opened-seal.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../cli/remote-flags.js'
import {modeFlag, parseMode} from '../cli/mode-flag.js'
import {progressBar, withInterruptHandling} from '../cli/progress.js'
import {UffdError} from '../core/errors.js'
import {formatBytes} from '../core/units.js'
import {type CompressionCodec, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL} from '../snapshot/codecs.js'
import {LayeredReader} from '../snapshot/layered-reader.js'
import {openSnapshot} from '../snapshot/open.js'
import {asidePath, chainFileAt, outputLocation, prepareOutput} from '../snapshot/outputs.js'
import {SnapshotReader} from '../snapshot/reader.js'
import {attachedSizeHint, attachedWorkingSet, describeAttached, packOptionsFor, type SetToAttach, writeAttached} from '../snapshot/relayout.js'
import {type SquashSummary, squashChain} from '../snapshot/squash.js'

/** The working set attached to a chain's top layer (a layer's is always packed: its page list is the set, in touch order between blocks). */
function topWorkingSet(chain: LayeredReader): (SetToAttach & {codec: string}) | undefined {
  const top = chain.files.at(-1)!
  const ws = attachedWorkingSet(top)
  if (!ws?.packed || !top.packed || top.packed.pages.length === 0) return undefined
  return {pages: Array.from(top.packed.pages), runs: ws.runs, codec: ws.packed.codec}
}

export default class Squash extends BaseCommand {
  static override summary = 'Write the image a layer and its chain resolve to as one self-contained snapshot.'
  static override description = `Reads TOP with its ancestors (found next to it by their recorded names, in the same directory, bucket prefix or URL directory, or under --layers, each checked against its recorded identity; remote files are fetched through the --cache-dir) and writes an ordinary snapshot of the same memory. Chunks whose pages all come from the base have its stored bytes copied, verified, without recompressing; the others are assembled from the chain and compressed with --codec. A working set attached to TOP is attached to the output too (packed again with its codec, its chunks stored first). The output appears atomically; an interrupted or failed run leaves nothing behind.`

  static override examples = ['<%= config.bin %> squash vm3.uffd -o vm3-full.uffd']

  static override args = {
    top: Args.string({description: 'The top layer of the chain: a path, http(s):// URL or s3://BUCKET/KEY.', required: true}),
  }

  static override flags = {
    output: Flags.string({char: 'o', summary: 'Snapshot to write (a local path).', required: true}),
    force: Flags.boolean({char: 'f', summary: 'Replace the output if it exists.', default: false}),
    codec: Flags.string({summary: 'Codec of the chunks that are compressed again [default: the top layer\'s].', options: ['zstd', 'lz4', 'raw']}),
    level: Flags.integer({summary: `zstd level of those chunks, ${ZSTD_MIN_LEVEL}..${ZSTD_MAX_LEVEL} [default: the top layer's].`, min: ZSTD_MIN_LEVEL, max: ZSTD_MAX_LEVEL}),
    layers: layersFlag,
    mode: modeFlag,
    ...oclifFlags(remoteFlagSpecs),
    ...oclifFlags(readSealFlagSpecs),
    ...oclifFlags(writeSealFlagSpecs),
  }

  async run(): Promise<SquashSummary> {
    const {args, flags} = await this.parse(Squash)
    const mode = parseMode(flags.mode)
    const location = outputLocation(flags.output, {mode, flag: '--output'})
    if (location.kind !== 'file') this.error('squash writes a local path (upload the result with uffd cp)', {exit: 2})
    const keys = readKeysFromFlags(flags)
    const snapshot = await openSnapshot(args.top, remoteOptions(flags), flags.layers, keys)
    const {reader} = snapshot
    try {
      if (!(reader instanceof LayeredReader)) throw new UffdError('USAGE', `${snapshot.name} is not a layer: it is self-contained already`)
      const clash = chainFileAt(location, reader.paths)
      if (clash) throw new UffdError('USAGE', `the output ${flags.output} is ${clash}, a file of the chain: replacing it would lose that file (the layers on it would no longer resolve)`)
      // A chain with an encrypted file squashes to an encrypted file (under the same key): its
      // memory must not come out in the clear because it was squashed.
      const encrypted = reader.files.some((f) => f.seal?.encrypted)
      const convergent = reader.files.some((f) => f.seal?.info.encryption?.convergent)
      const seal = sealingFromFlags({...flags, encrypt: flags.encrypt || encrypted, convergent: flags.convergent || convergent}, keys)
      const inputs = reader.files.map((f, k) => ({name: reader.paths[k], seal: f.seal}))
      // A signed chain squashes to a signed file, from inputs whose authenticity was checked.
      if (!seal.signingKey && inputs.some((f) => f.seal?.info.signature)) throw new UffdError('USAGE', `${snapshot.name}'s chain is signed: give --sign-key to sign the squashed file (it would otherwise be unsigned)`)
      if (seal.signingKey) checkSignable(inputs, seal.signingKey)
      const prepared = await prepareOutput(location, {force: flags.force, mode, s3: {}})
      const meta = reader.header.metadata
      const codec = (flags.codec ?? (['zstd', 'lz4', 'raw'].includes(meta.codec as string) ? meta.codec : 'zstd')) as CompressionCodec
      const level = flags.level ?? (Number.isInteger(meta.level) ? (meta.level as number) : 1)
      // The top layer's working set is the squashed file's too (the same memory): it is attached
      // to it, so the resumes it made fast stay fast. The chain is squashed aside first, then
      // attached to the output's name, so a failure leaves the output as it was.
      const set = topWorkingSet(reader)
      const aside = asidePath(location)
      const bar = progressBar(!this.jsonEnabled(), 'squash')
      const summary = await withInterruptHandling(async (signal): Promise<SquashSummary> => {
        let squashed: SquashSummary
        try {
          squashed = await squashChain(reader, set ? aside : prepared.destination, {codec, level, mode: set ? 0o600 : mode, signal, onProgress: bar.update, seal, name: prepared.destination})
        } finally {
          bar.stop()
        }
        if (!set) return squashed
        try {
          const plain = SnapshotReader.open(prepared.destination, aside, {keys: seal.key ? [seal.key] : [], verifyKeys: []})
          try {
            const attached = await writeAttached(plain, prepared.open(attachedSizeHint(plain, set)), set, {...packOptionsFor({codec, level}, set.codec), seal}, signal)
            this.logToStderr(`${prepared.destination}: the top layer's working set: ${describeAttached(attached, set)}`)
            return {...squashed, path: prepared.destination, fileSize: attached.fileSize, workingSetPages: set.pages.length}
          } finally {
            plain.close()
          }
        } finally {
          fs.rmSync(aside, {force: true})
        }
      }, `${prepared.destination} left as it was`)
      this.log(`${summary.path}: ${reader.files.length} files -> ${formatBytes(summary.fileSize)}, ${summary.copiedChunks} chunks copied from the base, ${summary.encodedChunks} compressed again, ${summary.seconds.toFixed(2)} s`)
      return summary
    } finally {
      await snapshot.close()
    }
  }
}
