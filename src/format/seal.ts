import crypto from 'node:crypto'

import {UffdError} from '../core/errors.js'
import {SnapshotFormatError} from './errors.js'

/**
 * Sealed snapshots (docs/FORMAT.md, Sealed snapshots): every stored unit encrypted and
 * authenticated with AES-256-GCM under a key derived from the user's key and the file's salt, its
 * kind and number bound in (as the nonce and the associated data) so a unit moved, swapped or
 * replayed fails; the file's structures authenticated by an HMAC over a digest of all of them (the
 * manifest) and optionally signed with Ed25519. Pure: node:crypto, no I/O.
 */

export const SEAL_VERSION = 1
export const SEAL_CIPHER = 'aes-256-gcm'
export const KEY_BYTES = 32
export const SALT_BYTES = 32
export const GENERATION_BYTES = 8
export const TAG_BYTES = 16
export const NONCE_BYTES = 12
/** Truncated SHA-256 of a unit's stored bytes in the unit digest table of a signed file. */
export const UNIT_DIGEST_BYTES = 16
export const SEAL_RECORD_SIZE = 128
export const SEAL_RECORD_MAGIC = 'UFFDSEAL'
export const SIGNATURE_BYTES = 64
const MAC_BYTES = 32

/** What a stored unit is; part of its nonce's context and of its associated data. */
export enum UnitKind {
  Chunk = 1,
  PackedBlock = 2,
  LayerBlock = 3,
  LearnedRuns = 4,
  /** A convergent file's table of its units' content keys. */
  KeyTable = 5,
}

export type GenerationName = 'chunks' | 'packed' | 'layer' | 'learned' | 'keys'
export type Generations = Partial<Record<GenerationName, Buffer>>

function isGenerationName(name: string): name is GenerationName {
  return name === 'chunks' || name === 'packed' || name === 'layer' || name === 'learned' || name === 'keys'
}

/** The generation names in metadata.seal.generations, per kind. */
export const GENERATION_NAMES: Record<UnitKind, GenerationName> = {
  [UnitKind.Chunk]: 'chunks',
  [UnitKind.PackedBlock]: 'packed',
  [UnitKind.LayerBlock]: 'layer',
  [UnitKind.LearnedRuns]: 'learned',
  [UnitKind.KeyTable]: 'keys',
}

const LABEL_KEY_ID = Buffer.from('uffd seal v1 key id', 'ascii')
const LABEL_FILE_KEYS = Buffer.from('uffd seal v1 file keys', 'ascii')
const LABEL_UNIT = Buffer.from('uffd seal v1 unit', 'ascii')
const LABEL_MANIFEST = Buffer.from('uffd seal v1 manifest', 'ascii')
const LABEL_SIGNATURE = Buffer.from('uffd seal v1 signature', 'ascii')
const LABEL_CONVERGENT_KEY = Buffer.from('uffd seal v1 convergent key', 'ascii')
const LABEL_CONTENT = Buffer.from('uffd seal v1 content', 'ascii')
const LABEL_CONVERGENT_UNIT = Buffer.from('uffd seal v1 convergent unit', 'ascii')
/** Bytes of a content key in a convergent file's key table. */
export const CONTENT_KEY_BYTES = 32

/** A user's snapshot key and its public name (which key, never the key). */
export interface SealKey {
  bytes: Buffer
  /** 16 hex digits: HMAC-SHA256(key, "uffd seal v1 key id"), first 8 bytes. */
  id: string
}

/**
 * Reads a key as a user gives it: 32 raw bytes, or 64 hex digits, or the base64 of 32 bytes
 * (surrounding whitespace, like a file's trailing newline, ignored in the text forms).
 */
export function parseKey(given: Buffer, where: string, raw = true): SealKey {
  if (given.length === 0) throw new UffdError('KEY_INVALID', `${where} is empty (a pipe or descriptor already read?): it must hold the key`)
  let bytes: Buffer | undefined
  if (raw && given.length === KEY_BYTES) bytes = Buffer.from(given)
  else {
    const text = given.toString('latin1').trim()
    if (/^[0-9a-fA-F]{64}$/.test(text)) bytes = Buffer.from(text, 'hex')
    else if (/^[A-Za-z0-9+/]{43}=$/.test(text)) bytes = Buffer.from(text, 'base64')
  }
  if (bytes?.length !== KEY_BYTES) throw new UffdError('KEY_INVALID', `${where} is not a key: give 32 bytes, 64 hex digits or their base64 (for example \`head -c 32 /dev/urandom > KEY\`)`)
  return {bytes, id: keyId(bytes)}
}

export function keyId(key: Buffer): string {
  return crypto.createHmac('sha256', key).update(LABEL_KEY_ID).digest().subarray(0, 8).toString('hex')
}

/** The keys of one file: `unit` seals its units, `mac` authenticates its manifest. */
export interface FileKeys {
  unit: Buffer
  mac: Buffer
}

/** HKDF-SHA256 of the user's key, salted with the file's own random salt: every file has its own keys. */
export function fileKeys(key: Buffer, salt: Buffer): FileKeys {
  const okm = Buffer.from(crypto.hkdfSync('sha256', key, salt, LABEL_FILE_KEYS, 2 * KEY_BYTES))
  return {unit: okm.subarray(0, KEY_BYTES), mac: okm.subarray(KEY_BYTES)}
}

/** Where a unit sits: what its seal binds it to. */
export interface UnitPlace {
  kind: UnitKind
  /** The unit's number within its kind (a chunk's index, a block's position in its table, 0). */
  number: number
  codec: number
  payloadLength: number
  /**
   * Its number among all the file's units (chunks, then blocks): the row of a convergent file's
   * key table. Undefined for learned runs and the key table (sealed with the file's key).
   */
  unit?: number
}

/**
 * The nonce of a unit: the generation of its kind (8 random bytes, new each time units of that
 * kind are written into the file) then its number (u32 LE). Unique for one file key as long as
 * generations do not repeat (64 random bits each; the salt makes the key new for every file).
 */
export function unitNonce(generation: Buffer, number: number): Buffer {
  if (generation.length !== GENERATION_BYTES) throw new RangeError(`generation of ${generation.length} bytes`)
  const nonce = Buffer.alloc(NONCE_BYTES)
  generation.copy(nonce, 0)
  nonce.writeUInt32LE(number, GENERATION_BYTES)
  return nonce
}

/** Associated data of a unit: label, kind (u8), number (u32), codec (u8), payload length (u32). */
export function unitAad(place: UnitPlace): Buffer {
  const aad = Buffer.alloc(LABEL_UNIT.length + 10)
  LABEL_UNIT.copy(aad, 0)
  let at = LABEL_UNIT.length
  aad.writeUInt8(place.kind, at)
  aad.writeUInt32LE(place.number, at + 1)
  aad.writeUInt8(place.codec, at + 5)
  aad.writeUInt32LE(place.payloadLength, at + 6)
  at += 10
  return aad
}

/** AES-256-GCM of `plain`: the ciphertext, then the 16-byte tag. */
function gcmSeal(key: Buffer, nonce: Buffer, aad: Buffer, plain: Buffer): Buffer {
  const cipher = crypto.createCipheriv(SEAL_CIPHER, key, nonce)
  cipher.setAAD(aad)
  const out = Buffer.allocUnsafe(plain.length + TAG_BYTES)
  const n = cipher.update(plain).copy(out, 0)
  cipher.final().copy(out, n)
  cipher.getAuthTag().copy(out, plain.length)
  return out
}

/** Opens gcmSeal's output into `dst` (its plaintext's length); false, `dst` wiped, when it does not authenticate. */
function gcmOpen(key: Buffer, nonce: Buffer, aad: Buffer, sealed: Buffer, dst: Buffer): boolean {
  if (sealed.length < TAG_BYTES || dst.length !== sealed.length - TAG_BYTES) return false
  const decipher = crypto.createDecipheriv(SEAL_CIPHER, key, nonce)
  decipher.setAAD(aad)
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES))
  const n = decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES)).copy(dst, 0)
  try {
    decipher.final()
  } catch {
    dst.fill(0, 0, n)
    return false
  }
  return true
}

/** Encrypts a unit's stored form (its codec's bytes) for its place: ciphertext then the 16-byte tag. */
export function sealUnit(unitKey: Buffer, generation: Buffer, place: UnitPlace, plain: Buffer): Buffer {
  return gcmSeal(unitKey, unitNonce(generation, place.number), unitAad(place), plain)
}

/**
 * Decrypts a sealed unit into `dst` (exactly `sealed.length - TAG_BYTES` bytes); false when it
 * does not authenticate (a wrong key, a unit moved or changed), and then `dst` must not be used.
 */
export function openUnit(unitKey: Buffer, generation: Buffer, place: UnitPlace, sealed: Buffer, dst: Buffer): boolean {
  return gcmOpen(unitKey, unitNonce(generation, place.number), unitAad(place), sealed, dst)
}

/**
 * Convergent sealing: a unit's key is derived from its content, so identical units seal to
 * identical bytes in every file under one user key (they deduplicate across snapshots), at the
 * price of telling anyone who sees two files which of their units are equal.
 */
export function convergentKey(key: Buffer): Buffer {
  return Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), LABEL_CONVERGENT_KEY, KEY_BYTES))
}

/** HMAC-SHA256(convergent key, label, codec (u8), payload length (u32 LE), the unit's codec bytes). */
export function contentKey(convergent: Buffer, codec: number, payloadLength: number, plain: Buffer): Buffer {
  const head = Buffer.alloc(5)
  head.writeUInt8(codec, 0)
  head.writeUInt32LE(payloadLength, 1)
  return crypto.createHmac('sha256', convergent).update(LABEL_CONTENT).update(head).update(plain).digest()
}

function convergentAad(codec: number, payloadLength: number): Buffer {
  const aad = Buffer.alloc(LABEL_CONVERGENT_UNIT.length + 5)
  LABEL_CONVERGENT_UNIT.copy(aad, 0)
  aad.writeUInt8(codec, LABEL_CONVERGENT_UNIT.length)
  aad.writeUInt32LE(payloadLength, LABEL_CONVERGENT_UNIT.length + 1)
  return aad
}

/** A unit sealed under its content key: the nonce is zeros (each key seals one plaintext only). */
export function sealConvergent(key: Buffer, codec: number, payloadLength: number, plain: Buffer): Buffer {
  return gcmSeal(key, Buffer.alloc(NONCE_BYTES), convergentAad(codec, payloadLength), plain)
}

/** Decrypts a convergently sealed unit into `dst`; false when it does not authenticate under `key`. */
export function openConvergent(key: Buffer, codec: number, payloadLength: number, sealed: Buffer, dst: Buffer): boolean {
  return gcmOpen(key, Buffer.alloc(NONCE_BYTES), convergentAad(codec, payloadLength), sealed, dst)
}

/** The parts of a file the manifest covers, each once, in this order when present. */
export enum ManifestPart {
  Header = 1,
  Footer = 2,
  Index = 3,
  ZeroMap = 4,
  PackedTable = 5,
  LayerBlockTable = 6,
  LayerRunTable = 7,
  LearnedRuns = 8,
  UnitDigests = 9,
  KeyTable = 10,
}

/**
 * SHA-256 over the label and, for each part, its number (u32 LE), its length (u64 LE) and its
 * bytes: a digest of everything that says what each unit is and where it goes. Authenticating it
 * (the MAC, the signature) authenticates all of those.
 */
export function manifestDigest(parts: readonly {part: ManifestPart; bytes: Uint8Array}[]): Buffer {
  const hash = crypto.createHash('sha256').update(LABEL_MANIFEST)
  const head = Buffer.alloc(12)
  let last = 0
  for (const {part, bytes} of parts) {
    if (part <= last) throw new RangeError(`manifest parts out of order (${part} after ${last})`)
    last = part
    head.writeUInt32LE(part, 0)
    head.writeBigUInt64LE(BigInt(bytes.length), 4)
    hash.update(head).update(bytes)
  }
  return hash.digest()
}

export function manifestMac(macKey: Buffer, digest: Buffer): Buffer {
  return crypto.createHmac('sha256', macKey).update(digest).digest()
}

/** What an Ed25519 signature of a file signs: the label then the manifest digest. */
function signedMessage(digest: Buffer): Buffer {
  return Buffer.concat([LABEL_SIGNATURE, digest])
}

export function signManifest(privateKey: crypto.KeyObject, digest: Buffer): Buffer {
  return crypto.sign(null, signedMessage(digest), privateKey)
}

export function signatureValid(publicKey: crypto.KeyObject, digest: Buffer, signature: Buffer): boolean {
  try {
    return crypto.verify(null, signedMessage(digest), publicKey, signature)
  } catch {
    return false
  }
}

/** 16 hex digits naming a signing key: SHA-256 of its public key (SubjectPublicKeyInfo DER), first 8 bytes. */
export function signerId(publicKey: crypto.KeyObject): string {
  return crypto.createHash('sha256').update(publicKey.export({type: 'spki', format: 'der'})).digest().subarray(0, 8).toString('hex')
}

/** A signing key from its PEM (PKCS#8, as `openssl genpkey -algorithm ed25519` writes it). */
export function parseSigningKey(pem: Buffer, where: string): crypto.KeyObject {
  let key: crypto.KeyObject
  try {
    key = crypto.createPrivateKey(pem)
  } catch (error) {
    throw new UffdError('KEY_INVALID', `${where} is not a private key in PEM (${(error as Error).message}; make one with \`openssl genpkey -algorithm ed25519 -out KEY\`)`)
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new UffdError('KEY_INVALID', `${where} is a ${key.asymmetricKeyType ?? 'symmetric'} key, not an Ed25519 one`)
  return key
}

/** A verifying key from its PEM: a public key (SPKI), or a private key whose public half is meant. */
export function parseVerifyingKey(pem: Buffer, where: string): crypto.KeyObject {
  // Hosts that verify need only the public half: a signing key copied onto each would let any of them sign.
  if (pem.includes('PRIVATE KEY')) throw new UffdError('KEY_INVALID', `${where} is a private key: give its public half (\`openssl pkey -in KEY -pubout -out KEY.pub\`), and keep the signing key where snapshots are made`)
  let key: crypto.KeyObject
  try {
    key = crypto.createPublicKey(pem)
  } catch (error) {
    throw new UffdError('KEY_INVALID', `${where} is not a public key in PEM (${(error as Error).message}; \`openssl pkey -in KEY -pubout -out KEY.pub\` makes one)`)
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new UffdError('KEY_INVALID', `${where} is a ${key.asymmetricKeyType ?? 'symmetric'} key, not an Ed25519 one`)
  return key
}

/** The record before the footer of a sealed or signed file. */
export interface SealRecord {
  /** HMAC-SHA256 of the manifest digest under the file's mac key; zeros when the file is signed only. */
  mac: Buffer
  /** Ed25519 signature of the manifest; undefined when unsigned. */
  signature: Buffer | undefined
}

const RECORD_FLAG_SIGNED = 1

/**
 * 128 bytes: magic (8), version (u32), flags (u32, bit 0 signed), mac (32), signature (64, zeros
 * when unsigned), reserved (16, zeros). Not covered by the manifest (it authenticates it).
 */
export function encodeSealRecord(record: SealRecord): Buffer {
  const buf = Buffer.alloc(SEAL_RECORD_SIZE)
  buf.write(SEAL_RECORD_MAGIC, 0, 'ascii')
  buf.writeUInt32LE(SEAL_VERSION, 8)
  buf.writeUInt32LE(record.signature ? RECORD_FLAG_SIGNED : 0, 12)
  if (record.mac.length !== MAC_BYTES) throw new RangeError('mac of the wrong size')
  record.mac.copy(buf, 16)
  if (record.signature) {
    if (record.signature.length !== SIGNATURE_BYTES) throw new RangeError('signature of the wrong size')
    record.signature.copy(buf, 48)
  }
  return buf
}

export function decodeSealRecord(buf: Buffer): SealRecord {
  const fail = (detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', 'seal record', detail)
  }
  if (buf.length !== SEAL_RECORD_SIZE || buf.toString('latin1', 0, 8) !== SEAL_RECORD_MAGIC) fail('missing (no seal record before the footer)')
  if (buf.readUInt32LE(8) !== SEAL_VERSION) fail(`version ${buf.readUInt32LE(8)} is not ${SEAL_VERSION}`)
  const flags = buf.readUInt32LE(12)
  if ((flags & ~RECORD_FLAG_SIGNED) !== 0) fail(`unknown flags 0x${flags.toString(16)}`)
  if (!buf.subarray(112).every((b) => b === 0)) fail('reserved bytes are not zero')
  const signature = Buffer.from(buf.subarray(48, 112))
  if (!(flags & RECORD_FLAG_SIGNED) && !signature.every((b) => b === 0)) fail('an unsigned record carries signature bytes')
  return {mac: Buffer.from(buf.subarray(16, 48)), signature: flags & RECORD_FLAG_SIGNED ? signature : undefined}
}

/** A unit's entry in the digest table: SHA-256 of its stored bytes, first 16 bytes. */
export function unitDigest(stored: Uint8Array): Buffer {
  return crypto.createHash('sha256').update(stored).digest().subarray(0, UNIT_DIGEST_BYTES)
}

/** `metadata.seal`, as read from a header (untrusted until the manifest checks out). */
export interface SealInfo {
  version: 1
  /** Present when units are encrypted. */
  encryption?: {
    cipher: typeof SEAL_CIPHER
    keyId: string
    salt: Buffer
    /** Per unit kind that the file holds, its generation. */
    generations: Generations
    /** Units sealed under keys derived from their content, listed in a sealed key table. */
    convergent: boolean
  }
  /** Present when the file is signed: the signer's id (see signerId). */
  signature?: {signer: string}
}

/** metadata.seal as the header carries it (hex strings). */
export function sealMetadata(info: SealInfo): Record<string, unknown> {
  const out: Record<string, unknown> = {version: info.version}
  if (info.encryption) {
    const e = info.encryption
    out.encryption = {cipher: e.cipher, keyId: e.keyId, salt: e.salt.toString('hex'), generations: Object.fromEntries(Object.entries(e.generations).map(([k, v]) => [k, v.toString('hex')])), ...(e.convergent ? {convergent: true} : {})}
  }
  if (info.signature) out.signature = {...info.signature}
  return out
}

/** Checks metadata.seal's shape; `encrypted` and `signed` say what the feature bits claim. */
export function checkSealMetadata(value: unknown, encrypted: boolean, signed: boolean): SealInfo {
  const fail = (detail: string): never => {
    throw new SnapshotFormatError('CORRUPT', 'seal', detail)
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return fail('metadata.seal is missing or not an object')
  const v = value as Record<string, unknown>
  if (v.version !== SEAL_VERSION) fail(`version ${String(v.version)} is not ${SEAL_VERSION}`)
  const hexOf = (x: unknown, bytes: number, what: string): Buffer => {
    if (typeof x !== 'string' || x.length !== 2 * bytes || !/^[0-9a-f]+$/.test(x)) fail(`${what} is not ${2 * bytes} lowercase hex digits`)
    return Buffer.from(x as string, 'hex')
  }
  const info: SealInfo = {version: 1}
  if (encrypted !== (v.encryption !== undefined)) fail(encrypted ? 'the file is marked encrypted but metadata.seal.encryption is missing' : 'metadata.seal.encryption is present on a file not marked encrypted')
  if (signed !== (v.signature !== undefined)) fail(signed ? 'the file is marked signed but metadata.seal.signature is missing' : 'metadata.seal.signature is present on a file not marked signed')
  if (encrypted) {
    const e = v.encryption as Record<string, unknown>
    if (typeof e !== 'object' || e === null) return fail('metadata.seal.encryption is not an object')
    if (e.cipher !== SEAL_CIPHER) fail(`cipher ${String(e.cipher)} is not ${SEAL_CIPHER}`)
    const keyIdBytes = hexOf(e.keyId, 8, 'keyId')
    const salt = hexOf(e.salt, SALT_BYTES, 'salt')
    const g = e.generations as Record<string, unknown>
    if (typeof g !== 'object' || g === null) return fail('generations is not an object')
    const generations: Generations = {}
    for (const [name, value] of Object.entries(g)) {
      if (!isGenerationName(name)) return fail(`unknown generation ${name}`)
      generations[name] = hexOf(value, GENERATION_BYTES, `generation ${name}`)
    }
    if (e.convergent !== undefined && e.convergent !== true) fail('convergent is present and not true')
    const convergent = e.convergent === true
    if (convergent && !generations.keys) fail('a convergent file without a key table generation')
    info.encryption = {cipher: SEAL_CIPHER, keyId: keyIdBytes.toString('hex'), salt, generations, convergent}
  }
  if (signed) {
    const s = v.signature as Record<string, unknown>
    if (typeof s !== 'object' || s === null) return fail('metadata.seal.signature is not an object')
    info.signature = {signer: hexOf(s.signer, 8, 'signer').toString('hex')}
  }
  return info
}

export function newSalt(): Buffer {
  return crypto.randomBytes(SALT_BYTES)
}

export function newGeneration(): Buffer {
  return crypto.randomBytes(GENERATION_BYTES)
}
