// How a command's failure reaches the user, without oclif: BaseCommand.catch and `uffd resume`'s
// fast path (resume-entry.ts) both report what failureReport says.

import {isErrorCode, UffdError} from '../core/errors.js'
import {isErrnoName, isNodeSystemError, nodeErrorMessage} from '../sys/errors.js'

/** Exit codes shared by every command (README: "Exit codes"). */
export const EXIT = {
  OK: 0,
  /** The operation failed: bad or corrupt input, I/O error, verification failed, peer error. */
  FAILURE: 1,
  /** The command line is wrong. */
  USAGE: 2,
  /** Interrupted by SIGINT/SIGTERM (128 + SIGINT). */
  INTERRUPTED: 130,
} as const

export class InterruptedError extends UffdError {
  declare readonly code: 'INTERRUPTED'
  /** `outcome`: what the interruption left, for the user (e.g. "vm.uffd left as it was"). */
  constructor(signal: string, outcome?: string) {
    super('INTERRUPTED', `interrupted by ${signal}${outcome ? `; ${outcome}` : ''}`)
    this.name = 'InterruptedError'
  }
}

/**
 * The `error.code` of --json: only documented codes (docs/ERRORS.md) reach scripts, so one
 * without a code, or with a code of some library's own, is reported as the bug it is.
 */
function reportedCode(error: Error & {code?: unknown}, isUsage: boolean): string {
  if (isErrorCode(error.code) || isErrnoName(error.code)) return error.code
  if (isUsage) return 'USAGE'
  if (error.name === 'AbortError') return 'INTERRUPTED'
  return 'INTERNAL'
}

/**
 * What a failure tells the user and scripts: the exit code (from the code, so the exit status is
 * always the one docs/ERRORS.md gives for it) and the `{error}` object of --json, whose message is
 * also the one line printed on stderr without --json (a stack trace is a bug report, not an error
 * message). `isUsage`: oclif's own usage error (a bad flag).
 */
export function failureReport(error: Error & {oclif?: {exit?: number}; code?: unknown}, isUsage: boolean): {exitCode: number; error: {code: string; message: string; exitCode: number}} {
  const code = reportedCode(error, isUsage)
  const exitCode = isUsage || code === 'USAGE' ? EXIT.USAGE : code === 'INTERRUPTED' ? EXIT.INTERRUPTED : (error.oclif?.exit ?? EXIT.FAILURE)
  const message = error.name === 'AbortError' ? 'interrupted' : isNodeSystemError(error) ? nodeErrorMessage(error) : error.message
  return {exitCode, error: {code, message, exitCode}}
}
