// Sealed snapshots (docs/FORMAT.md, Sealed snapshots): the construction checked against an
// independent implementation of the page's words and its test vectors, then the real CLI on real
// files: round trips, stats without the key, and an attacker's changes at every kind of place
// (header, index, zero map, units, tags, the seal record, signatures, units replayed from another
// snapshot under the same key), CRC-consistent where a checksum would otherwise give them away.
import {spawnSync} from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {Codec, FOOTER_SIZE} from '../src/format/constants.js'
import {contentKey, convergentKey, fileKeys, keyId, manifestDigest, ManifestPart, openConvergent, openUnit, parseKey, SEAL_RECORD_SIZE, sealConvergent, sealUnit, unitAad, UnitKind, unitNonce} from '../src/format/seal.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {attachWorkingSet} from '../src/snapshot/relayout.js'
import {cliEnv, isRoot, NATIVE, ROOT, uffd, uffdAsync} from './helpers/cli.js'
import {forgeCrc} from './helpers/crc-forge.js'
import {DirRangeServer} from './helpers/dir-range-server.js'
import {makeImage, tempDir} from './helpers/images.js'
import {runFcClient} from './helpers/layered.js'

const PAGE = 4096
const SIZE = 8 * 1024 * 1024
const FC_CLIENT = path.join(NATIVE, 'fc_client')
const clientSkip = !isRoot() ? 'not root (fc_client needs a kernel-mode userfaultfd)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built (npm run build)` : undefined
if (clientSkip) console.warn(`test/sealed.test.ts: resumes by a real client are skipped: ${clientSkip}`)

// The page's test vector inputs.
const VECTOR_KEY = Buffer.from(Array.from({length: 32}, (_, i) => i))
const VECTOR_SALT = Buffer.from(Array.from({length: 32}, (_, i) => 0x20 + i))
const VECTOR_GENERATION = Buffer.from(Array.from({length: 8}, (_, i) => 0x40 + i))
const VECTOR_PLAIN = Buffer.from('uffd sealed unit test vector', 'ascii')
const VECTOR_PLACE = {kind: UnitKind.Chunk, number: 5, codec: Codec.Zstd, payloadLength: 8192}

describe('the construction, as docs/FORMAT.md words it', () => {
  it('derives keys, nonces and associated data as an independent reading of the page does, and matches its test vectors', () => {
    // Written from the page alone, with node:crypto's primitives.
    const okm = Buffer.from(crypto.hkdfSync('sha256', VECTOR_KEY, VECTOR_SALT, Buffer.from('uffd seal v1 file keys'), 64))
    const keys = fileKeys(VECTOR_KEY, VECTOR_SALT)
    expect(keys.unit.toString('hex')).toBe(okm.subarray(0, 32).toString('hex'))
    expect(keys.mac.toString('hex')).toBe(okm.subarray(32).toString('hex'))
    const nonce = Buffer.concat([VECTOR_GENERATION, Buffer.from([5, 0, 0, 0])])
    expect(unitNonce(VECTOR_GENERATION, 5).equals(nonce)).toBe(true)
    const aad = Buffer.concat([Buffer.from('uffd seal v1 unit'), Buffer.from([1, 5, 0, 0, 0, 3, 0x00, 0x20, 0, 0])])
    expect(unitAad(VECTOR_PLACE).equals(aad)).toBe(true)
    const cipher = crypto.createCipheriv('aes-256-gcm', okm.subarray(0, 32), nonce)
    cipher.setAAD(aad)
    const independent = Buffer.concat([cipher.update(VECTOR_PLAIN), cipher.final(), cipher.getAuthTag()])
    const sealed = sealUnit(keys.unit, VECTOR_GENERATION, VECTOR_PLACE, VECTOR_PLAIN)
    expect(sealed.toString('hex')).toBe(independent.toString('hex'))
    expect(keyId(VECTOR_KEY)).toBe(crypto.createHmac('sha256', VECTOR_KEY).update('uffd seal v1 key id').digest().subarray(0, 8).toString('hex'))
    // The vectors printed in docs/FORMAT.md.
    expect({unitKey: keys.unit.toString('hex'), macKey: keys.mac.toString('hex'), keyId: keyId(VECTOR_KEY), sealed: sealed.toString('hex')}).toEqual(FORMAT_VECTORS)
    const manifest = manifestDigest([
      {part: ManifestPart.Header, bytes: Buffer.from('h')},
      {part: ManifestPart.Index, bytes: Buffer.from('ii')},
    ])
    const head = (part: number, length: number): Buffer => Buffer.concat([Buffer.from([part, 0, 0, 0]), Buffer.from([length, 0, 0, 0, 0, 0, 0, 0])])
    const expected = crypto.createHash('sha256').update('uffd seal v1 manifest').update(head(1, 1)).update('h').update(head(3, 2)).update('ii').digest()
    expect(manifest.equals(expected)).toBe(true)
  })

  it('derives convergent keys and seals convergent units as the page words it, matching its vectors', () => {
    const ck = Buffer.from(crypto.hkdfSync('sha256', VECTOR_KEY, Buffer.alloc(0), Buffer.from('uffd seal v1 convergent key'), 32))
    expect(convergentKey(VECTOR_KEY).equals(ck)).toBe(true)
    const key = crypto.createHmac('sha256', ck).update('uffd seal v1 content').update(Buffer.from([3, 0x00, 0x20, 0, 0])).update(VECTOR_PLAIN).digest()
    expect(contentKey(ck, Codec.Zstd, 8192, VECTOR_PLAIN).equals(key)).toBe(true)
    const cipher = crypto.createCipheriv('aes-256-gcm', key, Buffer.alloc(12))
    cipher.setAAD(Buffer.concat([Buffer.from('uffd seal v1 convergent unit'), Buffer.from([3, 0x00, 0x20, 0, 0])]))
    const independent = Buffer.concat([cipher.update(VECTOR_PLAIN), cipher.final(), cipher.getAuthTag()])
    expect(sealConvergent(key, Codec.Zstd, 8192, VECTOR_PLAIN).equals(independent)).toBe(true)
    expect({convergentKey: ck.toString('hex'), contentKey: key.toString('hex'), sealed: independent.toString('hex')}).toEqual({
      convergentKey: 'a248d905f3214a62712243d81b3482c132a51acb785c566b23aa913868c57110',
      contentKey: '98d1e46d392cb869b53a5a32dbe060f703d36330d71a19178c9dc3c5e4e1c902',
      sealed: 'e4533f44f6b75f1977b3864e45ff6804e854240fba9a76e14deb4f7e1adb19f99efec8ca4336ee81d38f5a1e',
    })
    const dst = Buffer.alloc(VECTOR_PLAIN.length)
    expect(openConvergent(key, Codec.Zstd, 8192, independent, dst) && dst.equals(VECTOR_PLAIN)).toBe(true)
    expect(openConvergent(key, Codec.Lz4, 8192, independent, dst), 'another codec').toBe(false)
  })

  it('refuses a unit opened for any other place, generation, codec or length, or changed by one bit', () => {
    const keys = fileKeys(VECTOR_KEY, VECTOR_SALT)
    const sealed = sealUnit(keys.unit, VECTOR_GENERATION, VECTOR_PLACE, VECTOR_PLAIN)
    const dst = Buffer.alloc(VECTOR_PLAIN.length)
    expect(openUnit(keys.unit, VECTOR_GENERATION, VECTOR_PLACE, sealed, dst)).toBe(true)
    expect(dst.equals(VECTOR_PLAIN)).toBe(true)
    const others = [
      {...VECTOR_PLACE, number: 6},
      {...VECTOR_PLACE, kind: UnitKind.PackedBlock},
      {...VECTOR_PLACE, kind: UnitKind.LayerBlock},
      {...VECTOR_PLACE, codec: Codec.Lz4},
      {...VECTOR_PLACE, payloadLength: 4096},
    ]
    for (const place of others) expect(openUnit(keys.unit, VECTOR_GENERATION, place, sealed, dst), JSON.stringify(place)).toBe(false)
    expect(openUnit(keys.unit, Buffer.alloc(8), VECTOR_PLACE, sealed, dst), 'another generation').toBe(false)
    expect(openUnit(fileKeys(VECTOR_KEY, Buffer.alloc(32)).unit, VECTOR_GENERATION, VECTOR_PLACE, sealed, dst), 'another file (salt)').toBe(false)
    for (let bit = 0; bit < sealed.length * 8; bit += 7) {
      const bad = Buffer.from(sealed)
      bad[bit >> 3] ^= 1 << (bit & 7)
      expect(openUnit(keys.unit, VECTOR_GENERATION, VECTOR_PLACE, bad, dst), `bit ${bit} flipped`).toBe(false)
    }
    expect(openUnit(keys.unit, VECTOR_GENERATION, VECTOR_PLACE, sealed.subarray(0, sealed.length - 1), Buffer.alloc(VECTOR_PLAIN.length - 1)), 'a truncated tag').toBe(false)
  })

  it('reads keys as 32 bytes, hex or base64, and refuses anything else', () => {
    const raw = crypto.randomBytes(32)
    for (const form of [raw, Buffer.from(`${raw.toString('hex')}\n`), Buffer.from(raw.toString('base64'))]) expect(parseKey(form, 'k').bytes.equals(raw)).toBe(true)
    for (const bad of [Buffer.alloc(31), Buffer.from('zz'.repeat(32)), Buffer.from(raw.toString('hex').slice(2)), Buffer.alloc(33)]) expect(() => parseKey(bad, 'k')).toThrow(/is not a key/)
  })
})

/** The values docs/FORMAT.md prints for the vector inputs above. */
const FORMAT_VECTORS = {
  unitKey: '30ee757aa4c93e47cbad2fbeb12e3799ddd4b4b1ca7c6913503d16272c3cccb7',
  macKey: '814ed195feafd4bbcf9a257e5ebb6cb69e796238ba636a56576d93ba611f8108',
  keyId: '07400e94dc7915bf',
  sealed: '35490616dbf4d24f23dd7b7f82cea25226733b04f3cf50ef474eb11c4f506cf522202d8cd031b4bca94e3faf',
}

let dir: string
const at = (name: string): string => path.join(dir, name)
let image: string
let data: Buffer
/** `uffd snapshot --json` of each file made in beforeAll. */
const written: Record<string, {dedupChunks: number}> = {}

function ok(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

/**
 * A failing command's --json error code and message. verify lists what it found wrong in units
 * (it goes on past a bad one) rather than failing with one error: its first problem, then.
 */
function fails(args: string[]): {code: string; message: string} {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')} should fail:\n${r.stdout}${r.stderr}`).toBe(1)
  if (r.json.error) return r.json.error
  expect(r.json.ok).toBe(false)
  return {code: 'LISTED', message: r.json.errors.join('\n')}
}

function copy(from: string, name: string): string {
  fs.copyFileSync(from, at(name))
  return at(name)
}

function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+')
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset)
  } finally {
    fs.closeSync(fd)
  }
}

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r')
  try {
    const b = Buffer.alloc(length)
    fs.readSync(fd, b, 0, length, offset)
    return b
  } finally {
    fs.closeSync(fd)
  }
}

const keyFile = (): string => at('key')
/** A file's structures (read without keys, unauthenticated: where to aim a change). */
const opened = (file: string): SnapshotReader => SnapshotReader.open(file, file, {keys: [], verifyKeys: []}, true)

/**
 * Rewrites the header's bytes [offset, offset + bytes.length) and makes every checksum agree
 * again (header CRC, the footer's copy of it, the footer's CRC): a change only authentication sees.
 */
function craftHeader(file: string, offset: number, bytes: Buffer): void {
  const reader = SnapshotReader.open(file, file, {keys: [], verifyKeys: []}, true)
  const {headerSize} = reader.header
  const size = reader.fileSize
  reader.close()
  const header = readAt(file, 0, headerSize)
  bytes.copy(header, offset)
  const crc = crc32(header.subarray(0, headerSize - 8))
  header.writeUInt32LE(crc, headerSize - 8)
  patch(file, 0, header)
  const footer = readAt(file, size - FOOTER_SIZE, FOOTER_SIZE)
  footer.writeUInt32LE(crc, 48)
  footer.writeUInt32LE(crc32(footer.subarray(0, 60)), 60)
  patch(file, size - FOOTER_SIZE, footer)
}

/** Rewrites the index with `edit` applied and fixes its CRC in the footer. */
function craftIndex(file: string, edit: (index: Buffer) => void): void {
  const reader = SnapshotReader.open(file, file, {keys: [], verifyKeys: []}, true)
  const {indexOffset, chunkCount} = reader.footer
  const size = reader.fileSize
  reader.close()
  const index = readAt(file, indexOffset, chunkCount * 32)
  edit(index)
  patch(file, indexOffset, index)
  const footer = readAt(file, size - FOOTER_SIZE, FOOTER_SIZE)
  footer.writeUInt32LE(crc32(index), 40)
  footer.writeUInt32LE(crc32(footer.subarray(0, 60)), 60)
  patch(file, size - FOOTER_SIZE, footer)
}

/** Stored zstd chunks, unshared, at least 256 bytes: where units get tampered with. */
function storedChunks(file: string): number[] {
  const reader = opened(file)
  try {
    return [...reader.index].flatMap((e, c) => (e.codec === Codec.Zstd && (e.flags & 1) === 0 && e.storedLength >= 256 ? [c] : []))
  } finally {
    reader.close()
  }
}

/** A unit's index entry, and the seed its bound CRC starts from (docs/FORMAT.md, Bound units). */
function entryOf(file: string, chunk: number): {dataOffset: number; storedLength: number; storedCrc: number; seed: number} {
  const reader = opened(file)
  try {
    return {...reader.entry(chunk), seed: reader.crcSeed(chunk)}
  } finally {
    reader.close()
  }
}

beforeAll(() => {
  dir = tempDir('uffd-sealed-')
  data = makeImage('mixed', SIZE, 23)
  image = at('image.raw')
  fs.writeFileSync(image, data)
  fs.writeFileSync(at('key'), crypto.randomBytes(32), {mode: 0o600})
  fs.writeFileSync(at('other.key'), crypto.randomBytes(32).toString('hex'))
  const sign = spawnSync('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', at('sign.pem')])
  expect(sign.status, String(sign.stderr)).toBe(0)
  expect(spawnSync('openssl', ['pkey', '-in', at('sign.pem'), '-pubout', '-out', at('sign.pub')]).status).toBe(0)
  expect(spawnSync('openssl', ['genpkey', '-algorithm', 'ed25519', '-out', at('other.pem')]).status).toBe(0)
  expect(spawnSync('openssl', ['pkey', '-in', at('other.pem'), '-pubout', '-out', at('other.pub')]).status).toBe(0)
  for (const [name, extra] of [
    ['plain', []],
    ['enc', ['--encrypt', '--key-file', at('key')]],
    ['signed', ['--sign-key', at('sign.pem')]],
    ['both', ['--encrypt', '--key-file', at('key'), '--sign-key', at('sign.pem')]],
    ['enc2', ['--encrypt', '--key-file', at('key')]],
  ] as const) {
    written[name] = ok(['snapshot', '--mem-file', image, '-o', at(`${name}.uffd`), '--chunk-size', '64K', ...extra])
  }
})

afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

describe('sealed snapshots through the CLI', () => {
  it('round-trips byte for byte, encrypted, signed and both, and holds no page in the clear', () => {
    for (const name of ['enc', 'signed', 'both']) {
      const signature = name === 'enc' ? [] : ['--verify-key', at('sign.pub')]
      const key = name === 'signed' ? [] : ['--key-file', at('key')]
      const r = ok(['verify', at(`${name}.uffd`), '--against', image, ...key, ...signature])
      expect(r.ok, name).toBe(true)
      expect(r.against.mismatchedPages).toBe(0)
    }
    // A compressible page of the image (the mixed image's text-like pages) appears in the plain file, not in the encrypted one.
    const plain = fs.readFileSync(at('plain.uffd'))
    const enc = fs.readFileSync(at('enc.uffd'))
    const needle = readAt(at('plain.uffd'), entryOf(at('plain.uffd'), storedChunks(at('plain.uffd'))[0]).dataOffset, 64)
    expect(plain.includes(needle)).toBe(true)
    expect(enc.includes(needle)).toBe(false)
    // Identical chunks are still stored once (compared before sealing).
    expect(written.plain.dedupChunks).toBeGreaterThan(0)
    for (const name of ['enc', 'signed', 'both']) expect(written[name].dedupChunks, name).toBe(written.plain.dedupChunks)
    // Two encryptions of one image share no unit (a salt per file).
    const e1 = entryOf(at('enc.uffd'), storedChunks(at('enc.uffd'))[0])
    const e2 = entryOf(at('enc2.uffd'), storedChunks(at('enc.uffd'))[0])
    expect(readAt(at('enc.uffd'), e1.dataOffset, 64).equals(readAt(at('enc2.uffd'), e2.dataOffset, 64))).toBe(false)
  })

  it('takes the key from UFFD_KEY_FILE or UFFD_KEY too, and names what is missing or wrong', async () => {
    const noKey = fails(['verify', at('enc.uffd')])
    expect(noKey.code).toBe('KEY_REQUIRED')
    expect(noKey.message).toMatch(/is encrypted \(key [0-9a-f]{16}\): give its key with --key-file/)
    const wrong = fails(['verify', at('enc.uffd'), '--key-file', at('other.key')])
    expect(wrong.code).toBe('KEY_MISMATCH')
    expect(wrong.message).toContain(keyId(fs.readFileSync(at('key'))))
    const garbage = fails(['verify', at('enc.uffd'), '--key-file', image])
    expect(garbage.code).toBe('KEY_INVALID')
    const viaFile = await uffdAsync(['verify', at('enc.uffd'), '--json'], {env: {...process.env, UFFD_KEY_FILE: at('key')}})
    expect(viaFile.status, viaFile.stderr).toBe(0)
    const viaEnv = await uffdAsync(['verify', at('enc.uffd'), '--json'], {env: {...process.env, UFFD_KEY: fs.readFileSync(at('key')).toString('base64')}})
    expect(viaEnv.status, viaEnv.stderr).toBe(0)
    const usage = uffd(['snapshot', '--mem-file', image, '-o', at('nokey.uffd'), '--encrypt'])
    expect(usage.status).toBe(2)
    expect(usage.stderr).toMatch(/--encrypt needs a key/)
    expect(fs.existsSync(at('nokey.uffd'))).toBe(false)
  })

  it('a key given means an encrypted file is expected: an unencrypted one put in its place is refused (NOT_SEALED), and --key-file without --encrypt writes nothing', async () => {
    for (const name of ['plain', 'signed']) {
      const e = fails(['verify', at(`${name}.uffd`), '--key-file', at('key')])
      expect(e.code, name).toBe('NOT_SEALED')
    }
    const viaEnv = await uffdAsync(['stats', at('plain.uffd'), '--json'], {env: {...process.env, UFFD_KEY_FILE: at('key')}})
    expect(JSON.parse(viaEnv.stdout).error.code).toBe('NOT_SEALED')
    const r = uffd(['snapshot', '--mem-file', image, '-o', at('nope.uffd'), '--key-file', at('key')])
    expect(r.status).toBe(2)
    expect(r.stderr).toMatch(/--key-file without --encrypt/)
    expect(fs.existsSync(at('nope.uffd'))).toBe(false)
    // A passphrase of 32 characters in UFFD_KEY is not a key (only a file may hold raw bytes).
    const pass = await uffdAsync(['verify', at('enc.uffd'), '--json'], {env: {...process.env, UFFD_KEY: 'correct horse battery staple 123'}})
    expect(JSON.parse(pass.stdout).error.code).toBe('KEY_INVALID')
  })

  it('stats shows what is not secret without the key, and says what it could not check', () => {
    const locked = ok(['stats', at('both.uffd')])
    expect(locked.logicalSize).toBe(SIZE)
    expect(locked.seal).toEqual({encryption: {cipher: 'aes-256-gcm', keyId: keyId(fs.readFileSync(at('key'))), opened: false, convergent: false}, signature: {signer: expect.stringMatching(/^[0-9a-f]{16}$/), verified: false}, authenticated: false})
    const checked = ok(['stats', at('both.uffd'), '--key-file', at('key'), '--verify-key', at('sign.pub')])
    expect(checked.seal).toMatchObject({encryption: {opened: true}, signature: {verified: true}, authenticated: true})
    const text = uffd(['stats', at('enc.uffd')])
    expect(text.stdout).toMatch(/sealed\s+encrypted \(aes-256-gcm, key [0-9a-f]{16}; not opened: no key given\); what is shown is not authenticated/)
  })

  it('a reader opened without the key (stats, cp) never hands out a payload: KEY_REQUIRED', () => {
    const reader = opened(at('enc.uffd'))
    try {
      const chunk = [...reader.index].findIndex((e) => e.codec !== Codec.None)
      expect(() => reader.readPayload(chunk)).toThrow(/is encrypted .*give its key/)
      expect(() => reader.codecBytes(chunk)).toThrow(/is encrypted .*give its key/)
      // Its stored bytes, for copying as they are, checksum checked.
      expect(reader.storedBytes(chunk).length).toBe(reader.entry(chunk).storedLength)
    } finally {
      reader.close()
    }
  })

  it('--verify-key refuses an unsigned file, another signer, and a signature over other bytes; a directory of keys is trusted', () => {
    expect(fails(['verify', at('plain.uffd'), '--verify-key', at('sign.pub')]).code).toBe('SIGNATURE_INVALID')
    const other = fails(['verify', at('signed.uffd'), '--verify-key', at('other.pub')])
    expect(other.code).toBe('SIGNATURE_INVALID')
    expect(other.message).toMatch(/signed by key [0-9a-f]{16}, which is not among the trusted keys/)
    fs.mkdirSync(at('trusted'))
    fs.copyFileSync(at('other.pub'), at('trusted/a.pem'))
    fs.copyFileSync(at('sign.pub'), at('trusted/b.pem'))
    expect(ok(['verify', at('signed.uffd'), '--verify-key', at('trusted')]).ok).toBe(true)
    // The signature bytes themselves.
    const bad = copy(at('signed.uffd'), 'bad-signature.uffd')
    const size = fs.statSync(bad).size
    const sigAt = size - FOOTER_SIZE - SEAL_RECORD_SIZE + 48
    patch(bad, sigAt, Buffer.from([readAt(bad, sigAt, 1)[0] ^ 1]))
    const e = fails(['verify', bad, '--verify-key', at('sign.pub')])
    expect(e.code).toBe('SIGNATURE_INVALID')
    expect(e.message).toMatch(/does not verify/)
    // Stripping the signature (the signed bit cleared, every checksum made to agree).
    const stripped = copy(at('signed.uffd'), 'stripped.uffd')
    const compat = readAt(stripped, 24, 8)
    compat.writeBigUInt64LE(compat.readBigUInt64LE(0) & ~4n)
    craftHeader(stripped, 24, compat)
    expect(fails(['verify', stripped, '--verify-key', at('sign.pub')]).code).toMatch(/SIGNATURE_INVALID|CORRUPT/)
  })

  it('signs a rewrite only of what was authenticated: a forged unit of a signed file is not laundered by attach --sign-key; a signed chain squashes only signed', () => {
    const f = copy(at('signed.uffd'), 'launder.uffd')
    const reader = SnapshotReader.open(f)
    const chunk = [...reader.index].findIndex((e, c) => c > 8 && e.codec === Codec.Zstd && !(e.flags & 1))
    const e = {...reader.entry(chunk), seed: reader.crcSeed(chunk)}
    const headerCrc = reader.header.headerCrc
    reader.close()
    const bytes = readAt(f, e.dataOffset, e.storedLength)
    bytes[30] ^= 0x01
    forgeCrc(bytes, 50, e.storedCrc, e.seed)
    patch(f, e.dataOffset, bytes)
    const pages = Array.from({length: 50}, (_, i) => i * 3)
    fs.writeFileSync(at('launder.ws'), JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    // Signed by this very key: its signature is checked, and with it every unit copied.
    const same = fails(['working-set', 'attach', f, at('launder.ws'), '-o', at('laundered.uffd'), '--sign-key', at('sign.pem')])
    expect(same.message).toMatch(new RegExp(`chunk ${chunk}: its digest differs`))
    expect(fs.existsSync(at('laundered.uffd'))).toBe(false)
    // Signed by another key, not trusted: refused before anything is read.
    const other = uffd(['working-set', 'attach', f, at('launder.ws'), '-o', at('laundered.uffd'), '--sign-key', at('other.pem'), '--json'])
    expect(other.status).toBe(2)
    expect(other.json.error.message).toMatch(/whose signature was not checked/)
    const plainReader = opened(at('plain.uffd'))
    plainReader.close()
    fs.writeFileSync(at('launder-plain.ws'), JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc: plainReader.header.headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    const plain = uffd(['working-set', 'attach', at('plain.uffd'), at('launder-plain.ws'), '-o', at('laundered.uffd'), '--sign-key', at('sign.pem'), '--json'])
    expect(plain.status).toBe(2)
    expect(plain.json.error.message).toMatch(/neither encrypted nor signed/)
    // A chain with a signed file squashes only to a signed file.
    const changed = Buffer.from(data)
    crypto.randomBytes(PAGE).copy(changed, 7 * PAGE)
    fs.writeFileSync(at('signed-chain.raw'), changed)
    ok(['snapshot', '--mem-file', at('signed-chain.raw'), '--parent', at('both.uffd'), '-o', at('signed-chain.uffd'), '--key-file', at('key'), '--sign-key', at('sign.pem')])
    const unsigned = uffd(['squash', at('signed-chain.uffd'), '-o', at('signed-squashed.uffd'), '--key-file', at('key'), '--json'])
    expect(unsigned.status).toBe(2)
    expect(unsigned.json.error.message).toMatch(/chain is signed: give --sign-key/)
    ok(['squash', at('signed-chain.uffd'), '-o', at('signed-squashed.uffd'), '--key-file', at('key'), '--sign-key', at('sign.pem')])
    expect(ok(['verify', at('signed-squashed.uffd'), '--against', at('signed-chain.raw'), '--key-file', at('key'), '--verify-key', at('sign.pub')]).ok).toBe(true)
  })

  it('a layer over a signed parent is bound to it by its unit digests: a parent chunk changed with its CRC kept is refused, without --verify-key too', () => {
    fs.mkdirSync(at('bound'))
    fs.copyFileSync(at('signed.uffd'), at('bound/base.uffd'))
    const changed = Buffer.from(data)
    crypto.randomBytes(PAGE).copy(changed, 11 * PAGE)
    fs.writeFileSync(at('bound/changed.raw'), changed)
    ok(['snapshot', '--mem-file', at('bound/changed.raw'), '--parent', at('bound/base.uffd'), '-o', at('bound/top.uffd'), '--sign-key', at('sign.pem')])
    expect(ok(['verify', at('bound/top.uffd'), '--against', at('bound/changed.raw')]).ok).toBe(true)
    const reader = opened(at('bound/base.uffd'))
    const chunk = [...reader.index].findIndex((e, c) => c > 20 && e.codec === Codec.Zstd && !(e.flags & 1))
    const e = {...reader.entry(chunk), seed: reader.crcSeed(chunk)}
    reader.close()
    const bytes = readAt(at('bound/base.uffd'), e.dataOffset, e.storedLength)
    bytes[10] ^= 0x02
    forgeCrc(bytes, 30, e.storedCrc, e.seed)
    patch(at('bound/base.uffd'), e.dataOffset, bytes)
    // The layer's record of its parent covers the parent's digest table, and a signed file's units
    // are always checked against it: no --verify-key is needed for this.
    expect(fails(['verify', at('bound/top.uffd')]).message).toMatch(new RegExp(`chunk ${chunk}: its digest differs`))
  })

  describe('an attacker who can write the file', () => {
    const both = (): string[] => ['--key-file', at('key'), '--verify-key', at('sign.pub')]

    it('changes the header (CRC-consistent): metadata, the salt, a generation (the nonces): refused before any unit is read', () => {
      for (const name of ['enc', 'both']) {
        for (const [field, value] of [
          ['"createdAt":"', '1999'],
          ['"salt":"', '00'],
          ['"chunks":"', 'ff'],
        ]) {
          const f = copy(at(`${name}.uffd`), `header-${name}.uffd`)
          const reader = SnapshotReader.open(f, f, {keys: [], verifyKeys: []}, true)
          const text = readAt(f, 0, reader.header.headerSize).toString('latin1')
          reader.close()
          const where = text.indexOf(field)
          expect(where, field).toBeGreaterThan(0)
          craftHeader(f, where + field.length, Buffer.from(value))
          const e = fails(['verify', f, ...(name === 'both' ? both() : ['--key-file', at('key')])])
          expect(e.code, `${name} ${field}: ${e.message}`).toMatch(/NOT_AUTHENTIC|SIGNATURE_INVALID/)
        }
      }
    })

    it('changes a packed block, a layer block or the learned runs keeping their CRCs: refused naming the unit', () => {
      const cases: {file: string; name: string; offset: number; length: number; crcAt?: undefined; expected: RegExp}[] = []
      // A packed block: attach a set to an encrypted snapshot.
      const r0 = SnapshotReader.open(at('enc.uffd'), at('enc.uffd'), {keys: [], verifyKeys: []}, true)
      r0.close()
      const pages = Array.from({length: 120}, (_, i) => (i * 53) % (SIZE / PAGE))
      fs.writeFileSync(at('tamper.ws'), JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc: r0.header.headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
      ok(['working-set', 'attach', at('enc.uffd'), at('tamper.ws'), '-o', at('tamper-packed.uffd'), '--key-file', at('key')])
      const packed = opened(at('tamper-packed.uffd'))
      const block = packed.packed!.blocks.findIndex((b) => b.storedLength > 64)
      cases.push({file: 'tamper-packed.uffd', name: 'packed', offset: packed.packed!.blocks[block].dataOffset, length: packed.packed!.blocks[block].storedLength, expected: new RegExp(`packed working set block ${block}: does not authenticate`)})
      packed.close()
      // A layer block.
      const changed = Buffer.from(data)
      for (let p = 5; p < SIZE / PAGE; p += 131) crypto.randomBytes(PAGE).copy(changed, p * PAGE)
      fs.writeFileSync(at('tamper-changed.raw'), changed)
      ok(['snapshot', '--mem-file', at('tamper-changed.raw'), '--parent', at('enc.uffd'), '-o', at('tamper-layer.uffd'), '--encrypt', '--key-file', at('key')])
      const layer = opened(at('tamper-layer.uffd'))
      cases.push({file: 'tamper-layer.uffd', name: 'layer', offset: layer.layer!.set.blocks[0].dataOffset, length: layer.layer!.set.blocks[0].storedLength, expected: /layer block 0: does not authenticate/})
      layer.close()
      for (const c of cases) {
        const f = at(c.file)
        const bytes = readAt(f, c.offset, c.length)
        const crc = crc32(bytes)
        bytes[Math.floor(c.length / 3)] ^= 0x20
        forgeCrc(bytes, Math.floor(c.length / 2), crc)
        patch(f, c.offset, bytes)
        const e = fails(['verify', f, '--key-file', at('key')])
        expect(e.message, c.name).toMatch(c.expected)
      }
      // Learned runs (as --learn stores them), changed keeping the CRC the metadata records: the manifest covers them.
      const key = parseKey(fs.readFileSync(at('key')), 'key')
      const learned = at('tamper-learned.uffd')
      attachWorkingSet(at('enc.uffd'), learned, {pages, runs: 1, learned: {runs: [{pages, firstTouchMs: pages.map((_, i) => i)}], keep: 5}}, {codec: 'zstd', level: 1, seal: {key}})
      expect(ok(['verify', learned, '--key-file', at('key')]).ok).toBe(true)
      const reader = opened(learned)
      const where = (reader.header.metadata.workingSet as {learned: {offset: number; length: number}}).learned
      reader.close()
      const bytes = readAt(learned, where.offset, where.length)
      const crc = crc32(bytes)
      bytes[2] ^= 0x01
      forgeCrc(bytes, 6, crc)
      patch(learned, where.offset, bytes)
      expect(fails(['verify', learned, '--key-file', at('key')]).message).toMatch(/seal record: .*learned runs do not authenticate/)
    })

    it('points an index entry at another chunk\'s bytes, or changes the zero map (CRC-consistent): refused', () => {
      for (const name of ['enc', 'signed', 'both']) {
        const f = copy(at(`${name}.uffd`), `index-${name}.uffd`)
        const [a, b] = storedChunks(f)
        craftIndex(f, (index) => {
          // Swap where the two entries' bytes are, lengths and CRCs with them: each still checks out.
          const ea = Buffer.from(index.subarray(a * 32, a * 32 + 20))
          const eb = Buffer.from(index.subarray(b * 32, b * 32 + 20))
          eb.copy(index, a * 32)
          ea.copy(index, b * 32)
          // Payload lengths are the chunks' own (from the zero map): keep them.
          index.writeUInt32LE(ea.readUInt32LE(12), a * 32 + 12)
          index.writeUInt32LE(eb.readUInt32LE(12), b * 32 + 12)
        })
        const args = name === 'enc' ? ['--key-file', at('key')] : name === 'signed' ? ['--verify-key', at('sign.pub')] : both()
        const e = fails(['verify', f, ...args])
        expect(e.code, `${name}: ${e.message}`).toMatch(/NOT_AUTHENTIC|SIGNATURE_INVALID/)
      }
    })

    it('changes a unit\'s ciphertext or tag keeping its CRC: refused naming the chunk', () => {
      for (const [label, from] of [
        ['ciphertext', (len: number) => Math.floor(len / 2)],
        ['tag', (len: number) => len - 3],
      ] as const) {
        const f = copy(at('enc.uffd'), `unit-${label}.uffd`)
        const chunk = storedChunks(f)[3]
        const e = entryOf(f, chunk)
        const bytes = readAt(f, e.dataOffset, e.storedLength)
        bytes[from(e.storedLength)] ^= 0x10
        forgeCrc(bytes, 8, e.storedCrc, e.seed)
        patch(f, e.dataOffset, bytes)
        const err = fails(['verify', f, '--key-file', at('key')])
        expect(err.message).toContain(`chunk ${chunk}: does not authenticate under the file's key`)
      }
    })

    it('replays a unit from another snapshot under the same key, CRC forged: refused', () => {
      const f = copy(at('enc.uffd'), 'replayed.uffd')
      const chunk = storedChunks(f)[2]
      const mine = entryOf(f, chunk)
      const theirs = entryOf(at('enc2.uffd'), chunk)
      expect(theirs.storedLength, 'the same memory compresses to the same length').toBe(mine.storedLength)
      const bytes = readAt(at('enc2.uffd'), theirs.dataOffset, theirs.storedLength)
      forgeCrc(bytes, 0, mine.storedCrc, mine.seed)
      patch(f, mine.dataOffset, bytes)
      const err = fails(['verify', f, '--key-file', at('key')])
      expect(err.message).toContain(`chunk ${chunk}: does not authenticate under the file's key`)
    })

    it('changes a signed (unencrypted) unit keeping its CRC: refused with --verify-key', () => {
      const f = copy(at('signed.uffd'), 'signed-unit.uffd')
      const reader = SnapshotReader.open(f)
      const chunk = [...reader.index].findIndex((e, c) => c > 8 && e.codec === Codec.Zstd && !(e.flags & 1))
      const e = {...reader.entry(chunk), seed: reader.crcSeed(chunk)}
      reader.close()
      const bytes = readAt(f, e.dataOffset, e.storedLength)
      bytes[20] ^= 0x01
      forgeCrc(bytes, 40, e.storedCrc, e.seed)
      patch(f, e.dataOffset, bytes)
      const err = fails(['verify', f, '--verify-key', at('sign.pub')])
      expect(err.message).toMatch(new RegExp(`chunk ${chunk}: its digest differs`))
      // Without --verify-key too: a signed file's units are always checked against its digest table.
      expect(uffd(['verify', f, '--json']).json.errors.join('')).toMatch(/digest differs/)
    })

    it('changes the MAC in the seal record: refused', () => {
      const f = copy(at('enc.uffd'), 'mac.uffd')
      const macAt = fs.statSync(f).size - FOOTER_SIZE - SEAL_RECORD_SIZE + 16
      patch(f, macAt, Buffer.from([readAt(f, macAt, 1)[0] ^ 0x80]))
      const err = fails(['verify', f, '--key-file', at('key')])
      expect(err.code).toBe('NOT_AUTHENTIC')
      expect(err.message).toMatch(/seal record/)
    })
  })

  it('attaches a working set to an encrypted snapshot (its key kept, the blocks sealed) and refuses to re-sign without the signing key', () => {
    const pages = Array.from({length: 300}, (_, i) => (i * 37) % (SIZE / PAGE))
    const ws = at('set.ws')
    const headerCrc = (name: string): number => {
      const r = SnapshotReader.open(at(name), at(name), {keys: [], verifyKeys: []}, true)
      r.close()
      return r.header.headerCrc
    }
    const setFor = (name: string): string => {
      fs.writeFileSync(ws, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc: headerCrc(name)}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
      return ws
    }
    setFor('enc.uffd')
    const attached = at('enc-ws.uffd')
    ok(['working-set', 'attach', at('enc.uffd'), ws, '-o', attached, '--key-file', at('key')])
    const r = ok(['verify', attached, '--against', image, '--key-file', at('key')])
    expect(r.blocksChecked).toBeGreaterThan(0)
    const stats = ok(['stats', attached, '--key-file', at('key')])
    expect(stats.workingSet.packed.pages).toBe(new Set(pages).size)
    expect(stats.seal.encryption.keyId).toBe(keyId(fs.readFileSync(at('key'))))
    expect(fails(['working-set', 'attach', at('enc.uffd'), ws, '-o', at('x.uffd')]).code).toBe('KEY_REQUIRED')
    setFor('both.uffd')
    const signed = uffd(['working-set', 'attach', at('both.uffd'), ws, '-o', at('y.uffd'), '--key-file', at('key'), '--json'])
    expect(signed.status).toBe(2)
    expect(signed.json.error.message).toMatch(/signed: rewriting it needs the signing key/)
    ok(['working-set', 'attach', at('both.uffd'), ws, '-o', at('both-ws.uffd'), '--key-file', at('key'), '--sign-key', at('sign.pem')])
    expect(ok(['verify', at('both-ws.uffd'), '--against', image, '--key-file', at('key'), '--verify-key', at('sign.pub')]).ok).toBe(true)
  })

  it('--convergent: identical chunks seal to identical bytes in two snapshots; attach, squash and tampering as for any sealed file', () => {
    for (const name of ['conv1', 'conv2']) ok(['snapshot', '--mem-file', image, '-o', at(`${name}.uffd`), '--chunk-size', '64K', '--encrypt', '--convergent', '--key-file', at('key')])
    const dataOf = (name: string): Buffer => {
      const r = SnapshotReader.open(at(name), at(name), {keys: [], verifyKeys: []}, true)
      r.close()
      return readAt(at(name), r.header.headerSize, r.footer.indexOffset - r.header.headerSize)
    }
    expect(dataOf('conv1.uffd').equals(dataOf('conv2.uffd')), 'the data sections of two convergent snapshots of one image').toBe(true)
    expect(dataOf('enc.uffd').equals(dataOf('enc2.uffd'))).toBe(false)
    expect(ok(['verify', at('conv1.uffd'), '--against', image, '--key-file', at('key')]).ok).toBe(true)
    expect(ok(['stats', at('conv1.uffd'), '--key-file', at('key')]).seal.encryption.convergent).toBe(true)
    expect(uffd(['snapshot', '--mem-file', image, '-o', at('conv-x.uffd'), '--convergent']).status).toBe(2)
    // A unit moved to another chunk's place (same length, CRC forged) does not open under that place's key.
    const f = copy(at('conv1.uffd'), 'conv-moved.uffd')
    const chunks = storedChunks(f)
    const lengths = new Map<number, number>()
    let pair: [number, number] | undefined
    for (const c of chunks) {
      const len = entryOf(f, c).storedLength
      if (lengths.has(len)) pair = [lengths.get(len)!, c]
      lengths.set(len, c)
    }
    const [from, to] = pair ?? [chunks[0], chunks[1]]
    const src = entryOf(f, from)
    const dst = entryOf(f, to)
    const bytes = Buffer.alloc(dst.storedLength)
    readAt(f, src.dataOffset, Math.min(src.storedLength, dst.storedLength)).copy(bytes)
    forgeCrc(bytes, 4, dst.storedCrc, dst.seed)
    patch(f, dst.dataOffset, bytes)
    expect(fails(['verify', f, '--key-file', at('key')]).message).toContain(`chunk ${to}: does not authenticate`)
    // A set attached: the chunks are copied with their content keys, the packed blocks sealed convergently too.
    const r = SnapshotReader.open(at('conv1.uffd'), at('conv1.uffd'), {keys: [], verifyKeys: []}, true)
    r.close()
    const pages = Array.from({length: 200}, (_, i) => (i * 41) % (SIZE / PAGE))
    fs.writeFileSync(at('conv.ws'), JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc: r.header.headerCrc}, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    ok(['working-set', 'attach', at('conv1.uffd'), at('conv.ws'), '-o', at('conv-ws.uffd'), '--key-file', at('key')])
    const attached = ok(['verify', at('conv-ws.uffd'), '--against', image, '--key-file', at('key')])
    expect(attached.blocksChecked).toBeGreaterThan(0)
  })

  it('layers: an encrypted layer over an encrypted base, squashed to an encrypted file; cp copies without the key', () => {
    const changed = Buffer.from(data)
    for (let p = 3; p < SIZE / PAGE; p += 97) crypto.randomBytes(PAGE).copy(changed, p * PAGE)
    fs.writeFileSync(at('changed.raw'), changed)
    ok(['snapshot', '--mem-file', at('changed.raw'), '--parent', at('enc.uffd'), '-o', at('layer.uffd'), '--encrypt', '--key-file', at('key')])
    // Without --encrypt too: a layer over an encrypted parent is encrypted as its parent is.
    ok(['snapshot', '--mem-file', at('changed.raw'), '--parent', at('enc.uffd'), '-o', at('layer-implied.uffd'), '--key-file', at('key')])
    expect(ok(['stats', at('layer-implied.uffd'), '--key-file', at('key')]).seal.encryption.opened).toBe(true)
    expect(fs.readFileSync(at('layer-implied.uffd')).includes(changed.subarray(3 * PAGE, 3 * PAGE + 64))).toBe(false)
    // A key read once, through a pipe, whatever the command does with it (squash reads and writes with it).
    const piped = spawnSync('bash', ['-c', `node ${JSON.stringify(path.join(ROOT, 'bin/run.js'))} squash ${JSON.stringify(at('layer.uffd'))} -o ${JSON.stringify(at('piped.uffd'))} --key-file <(cat ${JSON.stringify(at('key'))})`], {encoding: 'utf8', env: cliEnv()})
    expect(piped.status, piped.stderr).toBe(0)
    expect(ok(['verify', at('layer.uffd'), '--against', at('changed.raw'), '--key-file', at('key')]).ok).toBe(true)
    expect(fails(['verify', at('layer.uffd')]).code).toBe('KEY_REQUIRED')
    ok(['squash', at('layer.uffd'), '-o', at('squashed.uffd'), '--key-file', at('key')])
    const s = ok(['stats', at('squashed.uffd'), '--key-file', at('key')])
    expect(s.seal.encryption.opened).toBe(true)
    expect(ok(['verify', at('squashed.uffd'), '--against', at('changed.raw'), '--key-file', at('key')]).ok).toBe(true)
    fs.mkdirSync(at('copies'))
    const copied = ok(['cp', at('layer.uffd'), at('copies/layer.uffd')])
    expect(copied.files).toHaveLength(2)
    expect(fs.readFileSync(at('copies/layer.uffd')).equals(fs.readFileSync(at('layer.uffd')))).toBe(true)
    expect(ok(['verify', at('copies/layer.uffd'), '--against', at('changed.raw'), '--key-file', at('key')]).ok).toBe(true)
  })
})

describe.skipIf(clientSkip !== undefined)('resuming a sealed snapshot with a real client', () => {
  /** fc_client on the sealed image, without blocking this process (which may be serving it over HTTP). */
  const client = (socket: string, args: string[]): ReturnType<typeof runFcClient> => runFcClient(socket, image, args)

  async function resume(snapshot: string, extra: string[], clientArgs: string[]) {
    const socket = at(`${path.basename(snapshot)}.${Math.random().toString(36).slice(2)}.sock`)
    const ready = `${socket}.ready`
    const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30', '--json', ...extra], {timeoutMs: 60_000})
    for (let i = 0; i < 800 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
    const done = await client(socket, clientArgs)
    return {client: done, handler: await handler}
  }

  it('serves every byte of an encrypted, signed snapshot, decrypting in the fault loop and the decoders, lazily and with --populate all', async () => {
    for (const extra of [[], ['--populate', 'all'], ['--decoders', '0']]) {
      const {client, handler} = await resume(at('both.uffd'), ['--key-file', at('key'), '--verify-key', at('sign.pub'), ...extra], ['--touch', 'random', '--verify-all'])
      expect(client.status, `${extra.join(' ')}: ${client.stdout}${client.stderr}\n${handler.stderr}`).toBe(0)
      expect(JSON.parse(String(client.stdout)).verify_errors).toBe(0)
      expect(handler.status, handler.stderr).toBe(0)
    }
  })

  it('from an HTTP server with a fresh cache directory: every byte served, the cache holds only sealed bytes', async () => {
    const server = await DirRangeServer.start(dir)
    try {
      const cache = at('cache-http')
      const {client, handler} = await resume(server.url('enc.uffd'), ['--key-file', at('key'), '--cache-dir', cache], ['--touch', 'random', '--verify-all'])
      expect(client.status, `${client.stdout}${client.stderr}\n${handler.stderr}`).toBe(0)
      expect(handler.status, handler.stderr).toBe(0)
      // The cache holds what was fetched: sealed bytes, not memory in the clear.
      const needle = data.subarray(storedChunks(at('plain.uffd'))[0] * 64 * 1024, storedChunks(at('plain.uffd'))[0] * 64 * 1024 + 64)
      const cached = fs.readdirSync(cache, {recursive: true, withFileTypes: true}).filter((e) => e.isFile())
      expect(cached.length).toBeGreaterThan(0)
      for (const e of cached) expect(fs.readFileSync(path.join(e.parentPath, e.name)).includes(needle), e.name).toBe(false)
      // (Not spawnSync: this process serves the HTTP requests.)
      const noKey = await uffdAsync(['verify', server.url('enc.uffd'), '--cache-dir', cache, '--json'], {timeoutMs: 60_000})
      expect(JSON.parse(noKey.stdout).error.code).toBe('KEY_REQUIRED')
    } finally {
      await server.close()
    }
  })

  it('--serve: two clients of one encrypted snapshot, each verified', async () => {
    const socket = at('serve.sock')
    const ready = `${socket}.ready`
    const handler = uffdAsync(['resume', at('both.uffd'), '--serve', '--socket', socket, '--ready-file', ready, '--key-file', at('key'), '--verify-key', at('sign.pub'), '--json'], {timeoutMs: 60_000})
    for (let i = 0; i < 800 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    const clients = await Promise.all(['random', 'sequential'].map((touch) => client(socket, ['--touch', touch, '--verify-all'])))
    for (const c of clients) expect(c.status, `${c.stdout}${c.stderr}`).toBe(0)
    const pid = Number(fs.readFileSync(ready, 'utf8').match(/"pid":\s*(\d+)/)?.[1] ?? 0)
    if (pid) process.kill(pid, 'SIGTERM')
    const done = await handler
    expect(done.status, done.stderr).toBe(130)
    expect(JSON.parse(done.stdout).stats.clients.served).toBe(2)
  })

  it('--learn on an encrypted snapshot rewrites it under its key, and the next resume prefetches what was learned', async () => {
    const f = copy(at('enc.uffd'), 'learn.uffd')
    const first = await resume(f, ['--key-file', at('key'), '--learn'], ['--touch', 'random', '--count', '200', '--verify'])
    expect(first.client.status, `${first.client.stderr}\n${first.handler.stderr}`).toBe(0)
    expect(first.handler.status, first.handler.stderr).toBe(0)
    expect(JSON.parse(first.handler.stdout).learned.folded, first.handler.stdout).toBe(true)
    const stats = ok(['stats', f, '--key-file', at('key')])
    expect(stats.workingSet.learned.runs).toBe(1)
    expect(stats.seal.encryption.opened).toBe(true)
    expect(ok(['verify', f, '--against', image, '--key-file', at('key')]).ok).toBe(true)
    const second = await resume(f, ['--key-file', at('key')], ['--touch', 'random', '--verify-all'])
    expect(second.client.status, second.handler.stderr).toBe(0)
    expect(JSON.parse(second.handler.stdout).stats.pages.prefetched).toBeGreaterThan(0)
  })

  it('without the key: refused before listening (KEY_REQUIRED), nothing served', async () => {
    const r = await uffdAsync(['resume', at('enc.uffd'), '--socket', at('never.sock'), '--json'], {timeoutMs: 30_000})
    expect(r.status).toBe(1)
    expect(JSON.parse(r.stdout).error.code).toBe('KEY_REQUIRED')
    expect(fs.existsSync(at('never.sock'))).toBe(false)
  })

  it('a tampered unit (CRC forged) kills the client rather than serve one byte of it', async () => {
    const f = copy(at('enc.uffd'), 'resume-tampered.uffd')
    const chunk = storedChunks(f)[5]
    const e = entryOf(f, chunk)
    const bytes = readAt(f, e.dataOffset, e.storedLength)
    bytes[7] ^= 0x04
    forgeCrc(bytes, 100, e.storedCrc, e.seed)
    patch(f, e.dataOffset, bytes)
    const {client, handler} = await resume(f, ['--key-file', at('key')], ['--touch', 'sequential', '--verify-all'])
    expect(client.signal, `${client.stdout}${client.stderr}`).toBe('SIGKILL')
    expect(client.stdout).toBe('')
    expect(handler.status).toBe(1)
    expect(handler.stderr).toMatch(new RegExp(`chunk ${chunk}: does not authenticate`))
  })
})
