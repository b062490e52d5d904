// The one error class for failed system calls, modelled on Node's own errno errors: a string
// `code` ('EEXIST') that callers switch on, the numeric errno, the call that failed and the step
// of the program that was running it, so a message read in a log says what was being attempted.

import {constants} from 'node:os'
import {getSystemErrorMap} from 'node:util'

// Node's errno table (from libuv): errno -> [name, description]. Built once; pure JS, so usable
// from any thread without touching libc.
const errnoTable = getSystemErrorMap()

const errnoNames = new Set([...errnoTable.values()].map(([name]) => name))

/** The symbolic name of a positive errno value ('EINVAL' for 22), or `E<n>` if unknown. */
export function errnoName(errno: number): string {
  return errnoTable.get(-errno)?.[0] ?? `E${errno}`
}

/** Whether `code` is a name errnoName can return: the `code` of a SysError or of Node's fs errors. */
export function isErrnoName(code: unknown): code is string {
  return typeof code === 'string' && (errnoNames.has(code) || /^E\d+$/.test(code))
}

function errnoDescription(errno: number): string {
  const text = errnoTable.get(-errno)?.[1]
  if (text === undefined) return `unknown error ${errno}`
  return text.charAt(0).toUpperCase() + text.slice(1)
}

/** errno values the callers branch on, taken from Node's table of the platform's values. */
export const Errno = {
  EAGAIN: constants.errno.EAGAIN,
  EBADF: constants.errno.EBADF,
  EEXIST: constants.errno.EEXIST,
  EINTR: constants.errno.EINTR,
  EINVAL: constants.errno.EINVAL,
  EMSGSIZE: constants.errno.EMSGSIZE,
  ENODATA: constants.errno.ENODATA,
  ENOENT: constants.errno.ENOENT,
  ENOPROTOOPT: constants.errno.ENOPROTOOPT,
  ENXIO: constants.errno.ENXIO,
  EPERM: constants.errno.EPERM,
  ESRCH: constants.errno.ESRCH,
  ETIMEDOUT: constants.errno.ETIMEDOUT,
  ECONNABORTED: constants.errno.ECONNABORTED,
  ECONNREFUSED: constants.errno.ECONNREFUSED,
  EADDRINUSE: constants.errno.EADDRINUSE,
} as const

/**
 * A system call failed. `message` reads like
 * `uffd: UFFDIO_REGISTER failed while registering region 0 (EINVAL: Invalid argument)`.
 */
export class SysError extends Error {
  /** The call that failed: a libc function ('recvmsg') or an ioctl ('UFFDIO_COPY'). */
  readonly syscall: string
  /** errno name, e.g. 'EEXIST': the --json error code (docs/ERRORS.md, "System errors"). */
  readonly code: string
  /** errno value, e.g. 17. */
  readonly errno: number
  /** What the program was doing, e.g. 'registering region 0'. */
  readonly step: string

  constructor(syscall: string, errno: number, step: string, detail?: string) {
    const code = errnoName(errno)
    super(`uffd: ${syscall} failed while ${step} (${code}: ${detail ?? errnoDescription(errno)})`)
    this.name = 'SysError'
    this.syscall = syscall
    this.code = code
    this.errno = errno
    this.step = step
  }
}

/**
 * Rethrows an error from Node's fs module (which we use for path operations: lstat, rename,
 * chmod, open) as a SysError with the same errno; anything else is rethrown unchanged.
 */
export function rethrowAsSysError(error: unknown, syscall: string, step: string): never {
  const code = (error as NodeJS.ErrnoException | undefined)?.code
  const errno = code === undefined ? undefined : (constants.errno as Record<string, number | undefined>)[code]
  if (errno === undefined) throw error
  throw new SysError(syscall, errno, step)
}

/** Whether `error` is one of Node's own system errors (fs, net): an errno name as code and the call. */
export function isNodeSystemError(error: unknown): error is NodeJS.ErrnoException & {code: string; syscall: string} {
  const e = error as NodeJS.ErrnoException | undefined
  return e instanceof Error && !(e instanceof SysError) && !(e instanceof FileError) && isErrnoName(e.code) && typeof e.syscall === 'string'
}

/**
 * The message of a Node system error that no caller turned into a FileError, in the same shape:
 * `open x: permission denied (EACCES)` rather than `EACCES: permission denied, open 'x'`.
 */
export function nodeErrorMessage(error: NodeJS.ErrnoException & {code: string; syscall: string; dest?: string}): string {
  const description = (error.errno === undefined ? undefined : errnoTable.get(error.errno)?.[1]) ?? error.message
  const paths = [error.path, error.dest].filter((p) => p !== undefined).join(' -> ')
  return `${error.syscall}${paths ? ` ${paths}` : ''}: ${description} (${error.code})`
}

/**
 * A file operation of Node's fs failed on a file the user named. Node's own message names the
 * call, and a path only when the call took one: a write that fails with ENOSPC, or a read with
 * EIO, says `ENOSPC: no space left on device, write`, and a file written through a temporary one
 * would be named by that. This message names the user's path and what was being done to it;
 * the code stays the errno name (docs/ERRORS.md, "System errors").
 */
export class FileError extends Error {
  /** errno name, e.g. 'ENOSPC': the --json error code. */
  readonly code: string
  readonly errno: number | undefined
  readonly syscall: string
  /** The path the user gave (the destination of a file written atomically). */
  readonly path: string

  constructor(path: string, doing: string, cause: NodeJS.ErrnoException & {code: string}) {
    const description = (cause.errno === undefined ? undefined : errnoTable.get(cause.errno)?.[1]) ?? cause.message
    super(`${doing} ${path}: ${description} (${cause.code})`, {cause})
    this.name = 'FileError'
    this.code = cause.code
    this.errno = cause.errno === undefined ? undefined : -cause.errno
    this.syscall = cause.syscall ?? 'unknown'
    this.path = path
  }
}

/**
 * `error` as a FileError about `path` (`doing`: 'writing', 'opening', ...) if Node's fs raised
 * it, else unchanged: an error that already says what went wrong (a UffdError, a SysError) keeps
 * its own message.
 */
export function fileError(error: unknown, path: string, doing: string): unknown {
  return isNodeSystemError(error) ? new FileError(path, doing, error) : error
}

/** Runs `operation`, turning an error of Node's fs into a FileError about `path`. */
export function onFile<T>(path: string, doing: string, operation: () => T): T {
  try {
    return operation()
  } catch (error) {
    throw fileError(error, path, doing)
  }
}
