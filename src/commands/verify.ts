import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../cli/base-command.js'
import {progressBar} from '../cli/progress.js'
import {oclifFlags} from '../cli/oclif-flags.js'
import {remoteFlagSpecs, remoteOptions} from '../cli/remote-flags.js'
import {formatBytes} from '../core/units.js'
import {type VerifyResult, verifySnapshot} from '../snapshot/inspect.js'
import {type ImageReader, LayeredReader} from '../snapshot/layered-reader.js'
import {type SnapshotReader} from '../snapshot/reader.js'
import {openSnapshot} from '../snapshot/open.js'
import {layersFlag} from '../cli/layers-flag.js'
import {readKeysFromFlags, readSealFlagSpecs} from '../cli/seal-flags.js'

export default class Verify extends BaseCommand {
  static override summary = 'Check a snapshot: header, index, zero map and every chunk checksum; optionally compare with the raw image.'
  static override description = 'Exits 0 when everything checks out and 1 when anything is wrong (each problem is listed, up to 20). A layer is checked with its chain: every file\'s identity and every stored unit of every file.'
  static override examples = ['<%= config.bin %> verify vm.uffd', '<%= config.bin %> verify vm.uffd --against vm.mem']
  static override args = {
    file: Args.string({description: 'Snapshot: a path, http(s):// URL or s3://BUCKET/KEY (every chunk is fetched, through the --cache-dir).', required: true}),
  }

  static override flags = {
    against: Flags.string({summary: 'Raw image the snapshot must decode to, byte for byte.'}),
    layers: layersFlag,
    ...oclifFlags(remoteFlagSpecs),
    ...oclifFlags(readSealFlagSpecs),
  }

  async run(): Promise<VerifyResult> {
    const {args, flags} = await this.parse(Verify)
    const snapshot = await openSnapshot(args.file, remoteOptions(flags), flags.layers, readKeysFromFlags(flags))
    const {reader} = snapshot
    const bar = progressBar(!this.jsonEnabled(), 'verify')
    let result: VerifyResult
    try {
      // Every unit is read in order: ask for all at once, so a remote snapshot streams in with
      // the fetcher's concurrency instead of one round trip per chunk.
      reader.fetchAhead(Array.from({length: reader.unitCount}, (_, unit) => unit))
      // A chain's files are each checked whole too, units the image no longer uses included.
      if (reader instanceof LayeredReader) for (const f of reader.files) f.fetchAhead(Array.from({length: f.unitCount}, (_, unit) => unit))
      result = verifySnapshot(reader, snapshot.name, flags.against, bar.update)
    } finally {
      bar.stop()
      await snapshot.close()
    }
    if (result.ok) {
      this.log(`${snapshot.name}: OK${sealedNote(reader)}, ${result.chunksChecked} chunks, ${formatBytes(result.bytesChecked)} verified${result.blocksChecked ? `, ${result.blocksChecked} packed working-set blocks match their chunks` : ''}${result.unitsChecked === undefined ? '' : `, ${result.unitsChecked} stored units of the chain decoded`}${result.pageDigestsChecked ? `, ${result.pageDigestsChecked} page digests match their pages` : ''}${flags.against ? `, identical to ${flags.against}` : ''}`)
    } else {
      for (const e of result.errors) process.stderr.write(`${e}\n`)
      if (!this.jsonEnabled()) process.stderr.write(`${snapshot.name}: FAILED\n`)
      process.exitCode = 1
    }
    return result
  }
}

/** What a sealed snapshot's OK stands on: its units authenticated under the key, its signature verified. */
function sealedNote(reader: ImageReader): string {
  const files = reader instanceof LayeredReader ? reader.files : [reader as SnapshotReader]
  const seals = files.map((f) => f.seal)
  if (seals.every((s) => s === undefined)) return ''
  const parts: string[] = []
  const keys = [...new Set(seals.flatMap((s) => (s?.encrypted ? [s.info.encryption!.keyId] : [])))]
  const all = seals.every((s) => s?.encrypted)
  if (keys.length > 0) parts.push(`${all ? 'every unit' : "the encrypted files' units"} authenticated under key ${keys.join(', ')}`)
  const signers = [...new Set(seals.flatMap((s) => (s?.verifiedSigner ? [s.verifiedSigner] : [])))]
  if (signers.length > 0) parts.push(`signed by ${signers.join(', ')} (verified)`)
  else if (seals.some((s) => s?.info.signature)) parts.push('signature not checked (give --verify-key)')
  return ` (${parts.join('; ')})`
}
