/**
 * The one error vocabulary of uffd. Every failure a user can see carries a `code` from
 * ERROR_CODES: it is what `--json` prints as `error.code`, a public API that scripts switch on
 * (docs/ERRORS.md lists them, and a test keeps that list and this table the same). Errors from
 * system calls keep their errno name as the code (SysError: 'ENOENT', 'EACCES', ...).
 */
export const ERROR_CODES = {
  // The snapshot file (format/errors.ts, SnapshotFormatError).
  NOT_A_SNAPSHOT: 'the file is not a uffd snapshot (wrong magic)',
  UNSUPPORTED_VERSION: 'a format version or incompatible feature this build does not know',
  TRUNCATED: 'the file ends before a structure it declares, or an input file shrank while it was read',
  CORRUPT: 'a checksum or cross-check disagrees: the stored bytes are not what was written',
  INVALID: 'a value in the file lies outside its allowed range',
  // Layers (a snapshot stored as its differences from a parent snapshot).
  PARENT_MISSING: "a layer's parent (or an ancestor further down) is not where it is looked for",
  PARENT_MISMATCH: "the file found under a layer's parent's name is not the snapshot the layer was made on",
  // Sealed snapshots (encrypted and/or signed).
  KEY_REQUIRED: 'the snapshot is encrypted and no key was given (--key-file, UFFD_KEY_FILE or UFFD_KEY)',
  KEY_MISMATCH: 'the key given is not the one the snapshot was encrypted with (the message names both key ids)',
  KEY_INVALID: 'a key file or variable does not hold a key of the kind asked for',
  NOT_AUTHENTIC: 'a sealed unit, or the structures of a sealed or signed file, do not authenticate: changed, moved, or taken from another snapshot',
  NOT_SEALED: 'a key was given (so an encrypted snapshot is expected) and the file, or a file of its chain, is not encrypted',
  SIGNATURE_INVALID: 'a signature was required (--verify-key) and the file is unsigned, signed by another key, or its signature does not verify',
  // Serving a client (uffd resume).
  BAD_HANDSHAKE: "the VMM's handshake is malformed or does not match the snapshot",
  FAULT_OUTSIDE_REGIONS: 'a fault at an address outside every region the client announced',
  UNSUPPORTED_EVENT: 'a userfaultfd event the handler cannot follow for this kind of client',
  TIMEOUT: 'no client connected (or sent its handshake) within --timeout',
  WORKER_EXIT: 'the fault-loop or a compression thread stopped unexpectedly (a bug: please report it)',
  NO_RECORDING: 'the fault loop ended without handing over the --record working set (a bug)',
  // CRIU (uffd snapshot --criu-dir, uffd resume --criu-dir).
  CRIU_IMAGE: 'a CRIU image file is malformed or of a kind this tool does not read',
  CRIU_PROTOCOL: 'criu restore sent something the lazy-pages protocol does not allow',
  RESTORE_FAILED: 'criu restore closed the lazy-pages socket before the restore finished',
  NOT_THIS_DUMP: 'the snapshot was not made from this CRIU dump',
  // Inputs of uffd snapshot.
  NO_SUCH_PROCESS: 'the --pid process does not exist',
  PERMISSION: 'not allowed to read the --pid process (needs root or ptrace rights)',
  EXITED: 'the --pid process exited while it was being read',
  NOT_A_FILE: 'an input or output path is not a regular file',
  INPUT_MISMATCH: 'the input does not fit the options (a --mem-file that is not a whole number of --page-size pages)',
  OUTPUT_EXISTS: 'the output file or object exists and --force was not given',
  // Snapshots in object storage (s3://, http://, https://) and the local chunk cache.
  REMOTE_NOT_FOUND: 'the object, bucket or URL does not exist (404)',
  REMOTE_DENIED: 'the store refused access (401/403, an expired presigned URL) or no credentials were found',
  REMOTE_CHANGED: 'the object changed while it was in use (its ETag, Last-Modified or size differs, or 412 to If-Match)',
  REMOTE_PROTOCOL: 'the server answered wrongly: a 200 instead of 206, a wrong Content-Range, a body longer than asked',
  REMOTE_UNAVAILABLE: 'a request failed in a way a retry can fix (5xx, reset, idle timeout); seen only when retrying is not possible',
  FETCH_DEADLINE: 'a chunk could not be fetched within --fetch-deadline (the message carries the last failure)',
  CACHE_DIR: 'the --cache-dir cannot be created or written',
  // Working sets.
  BAD_WORKING_SET: 'a working-set file is malformed or belongs to another snapshot',
  // Every command.
  USAGE: 'the command line is wrong (exit code 2)',
  INTERRUPTED: 'stopped by SIGINT or SIGTERM (exit code 130)',
  INTERNAL: 'an unexpected failure inside uffd (a bug: please report it with the message)',
} as const

export type ErrorCode = keyof typeof ERROR_CODES

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_CODES, code)
}

/** An error a user sees, with one of the documented codes. */
export class UffdError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: {cause?: unknown},
  ) {
    super(message, options)
    this.name = 'UffdError'
  }
}

/**
 * Rebuilds an error that crossed a worker boundary as its message and code (an Error does not
 * survive postMessage with its class), so the code a script sees does not depend on which thread
 * failed. A code outside the vocabulary (an errno name from Node's fs) is kept as it is.
 */
export function errorFromWorker(message: string, code: string | undefined): Error {
  if (isErrorCode(code)) return new UffdError(code, message)
  return Object.assign(new Error(message), code === undefined ? {} : {code})
}
