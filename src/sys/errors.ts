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
  ENOENT: constants.errno.ENOENT,
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
