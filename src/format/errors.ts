import {UffdError} from '../core/errors.js'

/**
 * The codes of a snapshot file's problems; their meanings are in ERROR_CODES, and narrowing
 * UffdError's `code` to them fails to compile if one is not a key there.
 */
export type SnapshotErrorCode = 'NOT_A_SNAPSHOT' | 'UNSUPPORTED_VERSION' | 'TRUNCATED' | 'CORRUPT' | 'INVALID' | 'NOT_AUTHENTIC' | 'SIGNATURE_INVALID' | 'NOT_SEALED'

/**
 * Every inconsistency in a snapshot file becomes one of these, naming the file, the part of it
 * and what is wrong, so a user can tell a truncated copy from a version mismatch from bit rot.
 */
export class SnapshotFormatError extends UffdError {
  declare readonly code: SnapshotErrorCode
  /** The part of the file: 'header', 'footer', 'index', 'zero map', 'chunk 12', 'region 3'. */
  readonly part: string
  readonly detail: string
  file: string | undefined

  constructor(code: SnapshotErrorCode, part: string, detail: string, file?: string) {
    super(code, SnapshotFormatError.describe(file, part, detail))
    this.name = 'SnapshotFormatError'
    this.part = part
    this.detail = detail
    this.file = file
  }

  /** Attaches the file name once the I/O layer knows it (pure decoders do not). */
  withFile(file: string): this {
    this.file = file
    this.message = SnapshotFormatError.describe(file, this.part, this.detail)
    return this
  }

  private static describe(file: string | undefined, part: string, detail: string): string {
    return file ? `${file}: ${part}: ${detail}` : `${part}: ${detail}`
  }
}
