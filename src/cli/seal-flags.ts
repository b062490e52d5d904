// The flags of sealed snapshots (docs/FORMAT.md, Sealed snapshots), as data: keys come from files
// (or file descriptors: --key-file /dev/fd/3) or the environment, never from the command line,
// which every user of the host can read in /proc/PID/cmdline.
import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {parseKey, parseSigningKey, parseVerifyingKey, type SealKey} from '../format/seal.js'
import {type ReadKeys, type SealingOptions} from '../snapshot/sealing.js'
import {type FlagSpec} from './flag-specs.js'

const KEY_FILE_SUMMARY = 'Key of encrypted snapshots: a file holding 32 bytes, or 64 hex digits or their base64 (keep it 0600; /dev/fd/N reads an inherited descriptor) [default: the file named by UFFD_KEY_FILE, else the key in UFFD_KEY].'

/** Flags of every command that reads a snapshot. */
export const readSealFlagSpecs = {
  'key-file': {kind: 'string', summary: KEY_FILE_SUMMARY, helpGroup: 'SEALING'},
  'verify-key': {kind: 'string', summary: 'Refuse a snapshot (every file of a chain) not signed by this Ed25519 public key (PEM), or by one of the *.pem keys in this directory, before reading a byte of memory [default: UFFD_VERIFY_KEY].', helpGroup: 'SEALING'},
} as const satisfies Record<string, FlagSpec>

/** Flags of commands that write a new snapshot file. */
export const writeSealFlagSpecs = {
  encrypt: {kind: 'boolean', summary: 'Encrypt every stored unit with AES-256-GCM, under keys derived from the --key-file key and a salt of its own; every reader then needs that key. The header (sizes, regions, metadata) stays readable.', default: false, helpGroup: 'SEALING'},
  convergent: {kind: 'boolean', summary: "With --encrypt: derive each unit's key from its content (and the --key-file key), so identical chunks seal to identical bytes in every snapshot under that key and deduplicate across them (an object store, a cache); the price: whoever sees two such snapshots learns which of their chunks are equal.", default: false, helpGroup: 'SEALING'},
  'sign-key': {kind: 'string', summary: 'Sign the snapshot with this Ed25519 private key (PEM: `openssl genpkey -algorithm ed25519 -out KEY`); readers refuse it unsigned or changed with --verify-key [default: UFFD_SIGN_KEY].', helpGroup: 'SEALING'},
} as const satisfies Record<string, FlagSpec>

export interface ReadSealFlags {
  'key-file'?: string
  'verify-key'?: string
}

export interface WriteSealFlags extends ReadSealFlags {
  encrypt: boolean
  convergent: boolean
  'sign-key'?: string
}

type Env = Record<string, string | undefined>

function readKeyFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file)
  } catch (error) {
    throw new UffdError('KEY_INVALID', `${what} ${file}: ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (error as Error).message}`)
  }
}

/** The snapshot key given by --key-file, UFFD_KEY_FILE or UFFD_KEY, if any. */
export function keyFromFlags(flags: ReadSealFlags, env: Env = process.env): SealKey | undefined {
  const file = flags['key-file'] ?? env.UFFD_KEY_FILE
  if (file) return parseKey(readKeyFile(file, flags['key-file'] ? '--key-file' : 'UFFD_KEY_FILE'), file)
  // Text only: 32 characters of a passphrase must not pass for a key.
  if (env.UFFD_KEY) return parseKey(Buffer.from(env.UFFD_KEY, 'latin1'), 'UFFD_KEY', false)
  return undefined
}

/** What a reading command was given: the key, and the public keys a signature must come from. */
export function readKeysFromFlags(flags: ReadSealFlags, env: Env = process.env): ReadKeys {
  const key = keyFromFlags(flags, env)
  const where = flags['verify-key'] ?? env.UFFD_VERIFY_KEY
  const verifyKeys = []
  if (where) {
    const flag = flags['verify-key'] ? '--verify-key' : 'UFFD_VERIFY_KEY'
    let files = [where]
    if (fs.statSync(where, {throwIfNoEntry: false})?.isDirectory()) {
      files = fs
        .readdirSync(where)
        .filter((n) => n.endsWith('.pem'))
        .sort()
        .map((n) => path.join(where, n))
      if (files.length === 0) throw new UffdError('KEY_INVALID', `${flag} ${where}: the directory holds no *.pem key`)
    }
    for (const file of files) verifyKeys.push(parseVerifyingKey(readKeyFile(file, flag), file))
  }
  return {keys: key ? [key] : [], verifyKeys}
}

/**
 * How a writing command seals its output, with the key `keys` holds (read once: a pipe or
 * /dev/fd/N gives its bytes only once); --encrypt without a key is a USAGE error.
 */
export function sealingFromFlags(flags: WriteSealFlags, keys: ReadKeys, env: Env = process.env): SealingOptions {
  const key = keys.keys[0]
  if (flags.encrypt && !key) throw new UffdError('USAGE', '--encrypt needs a key: --key-file FILE, or UFFD_KEY_FILE or UFFD_KEY in the environment (`head -c 32 /dev/urandom > FILE` makes one)')
  if (flags.convergent && !flags.encrypt) throw new UffdError('USAGE', '--convergent needs --encrypt')
  const signFile = flags['sign-key'] ?? env.UFFD_SIGN_KEY
  const signingKey = signFile ? parseSigningKey(readKeyFile(signFile, flags['sign-key'] ? '--sign-key' : 'UFFD_SIGN_KEY'), signFile) : undefined
  return {...(flags.encrypt ? {key, convergent: flags.convergent} : {}), ...(signingKey ? {signingKey} : {})}
}
