import crypto from 'node:crypto'

import {UffdError} from '../core/errors.js'
import {FOOTER_SIZE} from '../format/constants.js'
import {SnapshotFormatError} from '../format/errors.js'
import {type SnapshotMetadata} from '../format/header.js'
import {
  CONTENT_KEY_BYTES,
  decodeSealRecord,
  openConvergent,
  TAG_BYTES,
  UnitKind,
  fileKeys,
  type FileKeys,
  GENERATION_NAMES,
  manifestDigest,
  manifestMac,
  ManifestPart,
  openUnit,
  SEAL_RECORD_SIZE,
  type SealInfo,
  signatureValid,
  signerId,
  UNIT_DIGEST_BYTES,
  unitDigest,
  type UnitPlace,
} from '../format/seal.js'
import {type ByteSource} from './byte-source.js'
import {type ReadKeys} from './sealing.js'

/** What the reader found of a sealed or signed file's structures, for openSeal to check. */
export interface SealedStructures {
  /** The manifest's parts read so far (header, footer, index, zero map, tables), in part order. */
  manifest: {part: ManifestPart; bytes: Uint8Array}[]
  /** Chunks and blocks: the rows of a signed file's unit digest table. */
  unitCount: number
  /** Where the index and zero map end: the seal's tail must start at or after it. */
  structuresEnd: number
  /** The learned runs' stored bytes' place, when the metadata names a plausible one. */
  learned: {offset: number; length: number} | undefined
}

/**
 * A sealed or signed file as opened: what was authenticated, and (with the key) how its units
 * are decrypted. A file opened without its key (`uffd stats` of an encrypted file) is locked:
 * its structures are unauthenticated and none of its units can be read.
 */
export class OpenedSeal {
  constructor(
    readonly info: SealInfo,
    private readonly keys: FileKeys | undefined,
    /** The signer's id when its signature was verified against a trusted key (see trustSigner). */
    private verified: string | undefined,
    private readonly digests: Buffer | undefined,
    private readonly name: string,
    /** The file's bytes between its structures and its footer (key table, unit digests, seal record), as read. */
    readonly tail: Buffer,
    /** A convergent file's content keys (CONTENT_KEY_BYTES per unit), once decrypted with the file's key. */
    private readonly contentKeys: Buffer | undefined,
    /** The manifest digest and the signature over it, to check against a key given later (signedBy). */
    private readonly manifest: Buffer,
    private readonly signature: Buffer | undefined,
  ) {}

  get verifiedSigner(): string | undefined {
    return this.verified
  }

  /**
   * Verifies the file's signature with `publicKey` (a key trusted after opening: the signing key
   * of a command that signs its output) and, when it holds, checks every unit read from then on
   * against the signed digests, as --verify-key would have. Returns whether it held.
   */
  trustSigner(publicKey: crypto.KeyObject): boolean {
    if (this.signature === undefined || this.info.signature?.signer !== signerId(publicKey) || !signatureValid(publicKey, this.manifest, this.signature)) return false
    this.verified = this.info.signature.signer
    return true
  }

  /** A convergent file's content key of `unit` (what seals its bytes). */
  contentKeyOf(unit: number): Buffer {
    if (!this.contentKeys) throw keyRequired(this.name, this.info)
    return this.contentKeys.subarray(unit * CONTENT_KEY_BYTES, (unit + 1) * CONTENT_KEY_BYTES)
  }

  get encrypted(): boolean {
    return this.info.encryption !== undefined
  }

  /** Encrypted and opened without its key. */
  get locked(): boolean {
    return this.encrypted && this.keys === undefined
  }

  /** Throws KEY_REQUIRED when the file is encrypted and was opened without its key. */
  requireKey(): void {
    if (this.locked) throw keyRequired(this.name, this.info)
  }

  /** Whether the header, index and tables were authenticated (by the file key's MAC, or a verified signature). */
  get authenticated(): boolean {
    return this.keys !== undefined || this.verifiedSigner !== undefined
  }

  /**
   * Whether units are checked against the digest table: always, in a signed file. With its
   * signature verified the table is authentic; without, it still binds the file to what a layer
   * over it recorded (its identity covers the table), so a parent changed under a layer is found.
   */
  get digestsChecked(): boolean {
    return this.digests !== undefined
  }

  /** Decrypts a sealed unit into `dst`; false when it does not authenticate. Throws KEY_REQUIRED when locked. */
  open(place: UnitPlace, sealed: Buffer, dst: Buffer): boolean {
    if (!this.keys) throw keyRequired(this.name, this.info)
    if (this.contentKeys && place.unit !== undefined) return openConvergent(this.contentKeyOf(place.unit), place.codec, place.payloadLength, sealed, dst)
    const generation = this.info.encryption!.generations[GENERATION_NAMES[place.kind]]
    if (!generation) throw new SnapshotFormatError('CORRUPT', 'seal', `the file holds ${GENERATION_NAMES[place.kind]} units but its seal has no generation for them`, this.name)
    return openUnit(this.keys.unit, generation, place, sealed, dst)
  }

  /** The unit digest table's rows [first, first + count) (a signed file's; empty otherwise). */
  digestRows(first: number, count: number): Buffer {
    return this.digests?.subarray(first * UNIT_DIGEST_BYTES, (first + count) * UNIT_DIGEST_BYTES) ?? Buffer.alloc(0)
  }

  digestMatches(unit: number, stored: Buffer): boolean {
    const at = unit * UNIT_DIGEST_BYTES
    return this.digests !== undefined && unitDigest(stored).equals(this.digests.subarray(at, at + UNIT_DIGEST_BYTES))
  }
}

function keyRequired(name: string, info: SealInfo): UffdError {
  return new UffdError('KEY_REQUIRED', `${name} is encrypted (key ${info.encryption!.keyId}): give its key with --key-file, UFFD_KEY_FILE or UFFD_KEY`)
}

/**
 * Reads and checks a sealed or signed file's tail (docs/FORMAT.md, Sealed snapshots): its unit
 * digest table and seal record, then the manifest's MAC under the file's key and, when public
 * keys are given, its signature by one of them. Everything is checked before a unit is read.
 */
export function openSeal(source: ByteSource, info: SealInfo, found: SealedStructures, keys: ReadKeys, locked: boolean): OpenedSeal {
  const name = source.name
  const fail = (code: 'CORRUPT' | 'TRUNCATED' | 'NOT_AUTHENTIC' | 'SIGNATURE_INVALID', part: string, detail: string): never => {
    throw new SnapshotFormatError(code, part, detail)
  }
  const recordAt = source.size - FOOTER_SIZE - SEAL_RECORD_SIZE
  const digestBytes = info.signature ? found.unitCount * UNIT_DIGEST_BYTES : 0
  const keyTableBytes = info.encryption?.convergent ? found.unitCount * CONTENT_KEY_BYTES + TAG_BYTES : 0
  const tailStart = recordAt - digestBytes - keyTableBytes
  if (tailStart < found.structuresEnd) fail('CORRUPT', 'seal record', `the index and zero map run into the seal's tail (they end at ${found.structuresEnd}, it starts at ${tailStart})`)
  const recordBytes = Buffer.alloc(SEAL_RECORD_SIZE)
  source.readAt(recordBytes, recordAt)
  const record = decodeSealRecord(recordBytes)
  const parts = [...found.manifest]
  if (found.learned) {
    const learned = Buffer.alloc(found.learned.length)
    source.readAt(learned, found.learned.offset)
    parts.push({part: ManifestPart.LearnedRuns, bytes: learned})
  }
  let digests: Buffer | undefined
  if (info.signature) {
    digests = Buffer.alloc(digestBytes)
    source.readAt(digests, tailStart + keyTableBytes)
    parts.push({part: ManifestPart.UnitDigests, bytes: digests})
  }
  let keyTable: Buffer | undefined
  if (keyTableBytes > 0) {
    keyTable = Buffer.alloc(keyTableBytes)
    source.readAt(keyTable, tailStart)
    parts.push({part: ManifestPart.KeyTable, bytes: keyTable})
  }
  const digest = manifestDigest(parts)

  let fileKeyPair: FileKeys | undefined
  if (info.encryption) {
    const key = keys.keys.find((k) => k.id === info.encryption!.keyId)
    if (!key && keys.keys.length > 0) {
      throw new UffdError('KEY_MISMATCH', `${name} names key ${info.encryption.keyId} as the key it is encrypted with; the key given is ${keys.keys.map((k) => k.id).join(', ')} (another key, or the file's header was changed)`)
    }
    if (!key && !locked) throw keyRequired(name, info)
    if (key) {
      fileKeyPair = fileKeys(key.bytes, info.encryption.salt)
      const mac = manifestMac(fileKeyPair.mac, digest)
      if (!crypto.timingSafeEqual(mac, record.mac)) fail('NOT_AUTHENTIC', 'seal record', "the file's header, index, zero map, tables or learned runs do not authenticate under its key (changed since it was sealed)")
    }
  }
  let contentKeys: Buffer | undefined
  if (keyTable && fileKeyPair) {
    const generation = info.encryption!.generations.keys!
    contentKeys = Buffer.alloc(keyTable.length - TAG_BYTES)
    if (!openUnit(fileKeyPair.unit, generation, {kind: UnitKind.KeyTable, number: 0, codec: 0, payloadLength: contentKeys.length}, keyTable, contentKeys)) fail('NOT_AUTHENTIC', 'key table', "does not authenticate under the file's key")
  }

  let verifiedSigner: string | undefined
  if (keys.verifyKeys.length > 0) {
    if (!info.signature || !record.signature) fail('SIGNATURE_INVALID', 'signature', 'the file is not signed, and --verify-key requires a signature')
    const signer = info.signature!.signer
    const trusted = keys.verifyKeys.find((k) => signerId(k) === signer)
    if (!trusted) fail('SIGNATURE_INVALID', 'signature', `signed by key ${signer}, which is not among the trusted keys (${keys.verifyKeys.map((k) => signerId(k)).join(', ')})`)
    if (!signatureValid(trusted!, digest, record.signature!)) fail('SIGNATURE_INVALID', 'signature', `does not verify with key ${signer}: the file changed since it was signed`)
    verifiedSigner = signer
  }
  return new OpenedSeal(info, fileKeyPair, verifiedSigner, digests, name, Buffer.concat([keyTable ?? Buffer.alloc(0), digests ?? Buffer.alloc(0), recordBytes]), contentKeys, digest, record.signature)
}

/** Where metadata.workingSet.learned says learned runs lie, if that is inside the data section. */
export function learnedLocation(metadata: SnapshotMetadata, dataStart: number, dataEnd: number): {offset: number; length: number} | undefined {
  const learned = (metadata.workingSet as {learned?: {offset?: unknown; length?: unknown}} | undefined)?.learned
  const {offset, length} = learned ?? {}
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length)) return undefined
  const [o, n] = [offset as number, length as number]
  return o >= dataStart && n >= 0 && o + n <= dataEnd ? {offset: o, length: n} : undefined
}

/**
 * Refuses to sign (with `signingKey`) a file made from `inputs` unless each was authenticated:
 * encrypted and opened with its key (its MAC held), or signed with a verified signature (by a
 * --verify-key, or by the signing key itself). Signing what only CRC-32s checked would vouch for
 * bytes an attacker could have chosen.
 */
export function checkSignable(inputs: readonly {name: string; seal: OpenedSeal | undefined}[], signingKey: crypto.KeyObject): void {
  const publicKey = crypto.createPublicKey(signingKey)
  for (const {name, seal} of inputs) {
    if (seal?.verifiedSigner !== undefined || seal?.trustSigner(publicKey) || (seal?.encrypted && !seal.locked)) continue
    const what = seal?.info.signature ? `signed by ${seal.info.signature.signer}, whose signature was not checked` : 'neither encrypted nor signed'
    throw new UffdError('USAGE', `${name} is ${what}: signing a file made from it would vouch for bytes only checksums checked (give --verify-key with the key that signs it)`)
  }
}
