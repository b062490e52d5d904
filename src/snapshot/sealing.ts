import crypto from 'node:crypto'

import {UffdError} from '../core/errors.js'
import {COMPAT_SIGNED, INCOMPAT_ENCRYPTED} from '../format/constants.js'
import {
  encodeSealRecord,
  fileKeys,
  type FileKeys,
  GENERATION_NAMES,
  type GenerationName,
  type Generations,
  manifestDigest,
  manifestMac,
  type ManifestPart,
  newGeneration,
  newSalt,
  openUnit,
  CONTENT_KEY_BYTES,
  contentKey,
  convergentKey,
  sealConvergent,
  SEAL_CIPHER,
  SEAL_VERSION,
  type SealInfo,
  type SealKey,
  sealMetadata,
  sealUnit,
  signerId,
  signManifest,
  TAG_BYTES,
  UnitKind,
  type UnitPlace,
} from '../format/seal.js'
import {type ChunkSealing} from './chunk-job.js'

/** What a command that writes snapshots was given: a key to encrypt with, a key to sign with. */
export interface SealingOptions {
  key?: SealKey
  signingKey?: crypto.KeyObject
  /** With `key`: seal units under keys derived from their content (docs/FORMAT.md, Sealed snapshots). */
  convergent?: boolean
}

/** What a command that reads snapshots was given: keys to decrypt with, public keys to require a signature from. */
export interface ReadKeys {
  keys: readonly SealKey[]
  /** When not empty, every file must be signed by one of these. */
  verifyKeys: readonly crypto.KeyObject[]
}

export const NO_READ_KEYS: ReadKeys = {keys: [], verifyKeys: []}

/**
 * What crosses to another thread (a decoder, the fault loop) so it opens the same files with the
 * same keys: raw bytes and PEM text, which structured cloning carries (KeyObjects it does not).
 */
export interface ReadKeysShare {
  keys: {bytes: Uint8Array; id: string}[]
  verifyKeys: string[]
}

export function shareReadKeys(keys: ReadKeys): ReadKeysShare {
  return {keys: keys.keys.map((k) => ({bytes: new Uint8Array(k.bytes), id: k.id})), verifyKeys: keys.verifyKeys.map((k) => k.export({type: 'spki', format: 'pem'}).toString())}
}

export function readKeysFromShare(share: ReadKeysShare | undefined): ReadKeys {
  if (!share) return NO_READ_KEYS
  return {keys: share.keys.map((k) => ({bytes: Buffer.from(k.bytes), id: k.id})), verifyKeys: share.verifyKeys.map((pem) => crypto.createPublicKey(pem))}
}

/**
 * How one file being written is sealed: the seal metadata its header carries, the feature bits,
 * the keys units are sealed with, and the record that closes it. Made once per file written; a
 * file rewritten with its units copied (a working set attached) keeps its salt and the
 * generations of the units it copies, and takes new generations for the units it writes anew.
 */
export class FileSealer {
  /** A convergent file's units' content keys, by unit number, for its key table. */
  private readonly contentKeys = new Map<number, Buffer>()

  private constructor(
    readonly info: SealInfo,
    private readonly keys: FileKeys | undefined,
    private readonly signingKey: crypto.KeyObject | undefined,
    /** A convergent file's key that content keys are derived with. */
    private readonly convergentKey: Buffer | undefined,
  ) {}

  /** A new file: a new salt, a new generation for each kind of unit it will hold. Undefined when neither encrypting nor signing. */
  static create(options: SealingOptions, kinds: readonly UnitKind[]): FileSealer | undefined {
    if (!options.key && !options.signingKey) return undefined
    const info: SealInfo = {version: SEAL_VERSION}
    let keys: FileKeys | undefined
    const convergent = options.key !== undefined && options.convergent === true
    if (options.key) {
      const salt = newSalt()
      const generations: Generations = {}
      for (const kind of [...kinds, ...(convergent ? [UnitKind.KeyTable] : [])]) generations[GENERATION_NAMES[kind]] = newGeneration()
      info.encryption = {cipher: SEAL_CIPHER, keyId: options.key.id, salt, generations, convergent}
      keys = fileKeys(options.key.bytes, salt)
    }
    if (options.signingKey) info.signature = {signer: signerId(crypto.createPublicKey(options.signingKey))}
    return new FileSealer(info, keys, options.signingKey, convergent ? convergentKey(options.key!.bytes) : undefined)
  }

  /**
   * The sealing of a file rewritten from `existing`'s units (the same key, which must be given):
   * the salt and the generations of `kept` stay, the kinds in `renewed` get new generations.
   */
  static rewrite(existing: SealInfo | undefined, options: SealingOptions, kept: readonly UnitKind[], renewed: readonly UnitKind[], name: string): FileSealer | undefined {
    if (!existing) return FileSealer.create({signingKey: options.signingKey}, renewed)
    let keys: FileKeys | undefined
    const info: SealInfo = {version: SEAL_VERSION}
    if (existing.encryption) {
      const e = existing.encryption
      if (!options.key) throw new UffdError('KEY_REQUIRED', `${name} is encrypted: give its key (--key-file, UFFD_KEY_FILE or UFFD_KEY)`)
      if (options.key.id !== e.keyId) throw new UffdError('KEY_MISMATCH', `${name} is encrypted with key ${e.keyId}, not with the key given (${options.key.id})`)
      const generations: Generations = {}
      for (const kind of kept) {
        const g = e.generations[GENERATION_NAMES[kind]]
        if (g) generations[GENERATION_NAMES[kind]] = g
      }
      // A convergent file's key table is written anew with the file.
      for (const kind of [...renewed, ...(e.convergent ? [UnitKind.KeyTable] : [])]) generations[GENERATION_NAMES[kind]] = newGeneration()
      info.encryption = {...e, generations}
      keys = fileKeys(options.key.bytes, e.salt)
    }
    if (existing.signature && !options.signingKey) {
      throw new UffdError('USAGE', `${name} is signed: rewriting it needs the signing key (--sign-key), or the result would not be signed`)
    }
    if (options.signingKey) info.signature = {signer: signerId(crypto.createPublicKey(options.signingKey))}
    return new FileSealer(info, keys, options.signingKey, info.encryption?.convergent ? convergentKey(options.key!.bytes) : undefined)
  }

  get convergent(): boolean {
    return this.convergentKey !== undefined
  }

  get encrypted(): boolean {
    return this.keys !== undefined
  }

  get signed(): boolean {
    return this.signingKey !== undefined
  }

  get metadata(): Record<string, unknown> {
    return sealMetadata(this.info)
  }

  get incompatFeatures(): bigint {
    return this.encrypted ? INCOMPAT_ENCRYPTED : 0n
  }

  get compatFeatures(): bigint {
    return this.signed ? COMPAT_SIGNED : 0n
  }

  /** What a compression worker needs to seal chunks as it encodes them. */
  chunkSealing(): ChunkSealing | undefined {
    if (!this.keys) return undefined
    if (this.convergentKey) return {convergentKey: new Uint8Array(this.convergentKey)}
    return {unitKey: new Uint8Array(this.keys.unit), generation: new Uint8Array(this.generation('chunks'))}
  }

  /** A convergent file: unit `unit`'s content key (sealed by a worker, or copied from the file rewritten). */
  recordKey(unit: number, key: Uint8Array): void {
    this.contentKeys.set(unit, Buffer.from(key))
  }

  /** A convergent file's key table for `unitCount` units, sealed under the file's key; undefined otherwise. */
  keyTable(unitCount: number): Buffer | undefined {
    if (!this.convergentKey || !this.keys) return undefined
    const table = Buffer.alloc(unitCount * CONTENT_KEY_BYTES)
    for (const [unit, key] of this.contentKeys) {
      if (unit >= unitCount) throw new UffdError('INTERNAL', `a content key for unit ${unit} of ${unitCount}`)
      key.copy(table, unit * CONTENT_KEY_BYTES)
    }
    return sealUnit(this.keys.unit, this.generation('keys'), {kind: UnitKind.KeyTable, number: 0, codec: 0, payloadLength: table.length}, table)
  }

  private generation(name: GenerationName): Buffer {
    const g = this.info.encryption?.generations[name]
    if (!g) throw new UffdError('INTERNAL', `no ${name} generation in this file's seal`)
    return g
  }

  /** A unit's stored bytes as the file holds them: sealed when encrypting, else as they are. */
  seal(place: UnitPlace, stored: Buffer): Buffer {
    if (!this.keys || stored.length === 0) return stored
    if (this.convergentKey && place.unit !== undefined) {
      const key = contentKey(this.convergentKey, place.codec, place.payloadLength, stored)
      this.contentKeys.set(place.unit, key)
      return sealConvergent(key, place.codec, place.payloadLength, stored)
    }
    return sealUnit(this.keys.unit, this.generation(GENERATION_NAMES[place.kind]), place, stored)
  }

  /** A unit this file sealed, opened again (deduplication compares what was sealed). */
  open(place: UnitPlace, sealed: Buffer): Buffer {
    const plain = Buffer.alloc(sealed.length - TAG_BYTES)
    if (!this.keys || !openUnit(this.keys.unit, this.generation(GENERATION_NAMES[place.kind]), place, sealed, plain)) throw new UffdError('INTERNAL', `a unit this writer sealed does not open (${JSON.stringify(place)})`)
    return plain
  }

  /** The seal record for a file whose manifest parts are these (docs/FORMAT.md, Sealed snapshots). */
  record(parts: readonly {part: ManifestPart; bytes: Uint8Array}[]): Buffer {
    const digest = manifestDigest(parts)
    return encodeSealRecord({
      mac: this.keys ? manifestMac(this.keys.mac, digest) : Buffer.alloc(32),
      signature: this.signingKey ? signManifest(this.signingKey, digest) : undefined,
    })
  }
}
