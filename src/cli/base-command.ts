import {Command, Errors} from '@oclif/core'

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
 * Turns every failure into one line on stderr (or an {error} object under --json) and the exit
 * code scripts can rely on; a stack trace is a bug report, not an error message.
 */
export abstract class BaseCommand extends Command {
  static override enableJsonFlag = true

  protected override async catch(error: Error & {exitCode?: number; oclif?: {exit?: number}; code?: string}): Promise<unknown> {
    const isUsage = error instanceof Errors.CLIError && error.oclif?.exit === 2
    const code = reportedCode(error, isUsage)
    // From the code, so the exit status is always the one docs/ERRORS.md gives for it.
    const exitCode = isUsage || code === 'USAGE' ? EXIT.USAGE : code === 'INTERRUPTED' ? EXIT.INTERRUPTED : (error.oclif?.exit ?? EXIT.FAILURE)
    process.exitCode = exitCode
    const message = error.name === 'AbortError' ? 'interrupted' : isNodeSystemError(error) ? nodeErrorMessage(error) : error.message
    if (this.jsonEnabled()) {
      this.logJson({error: {code, message, exitCode}})
      return undefined
    }
    if (isUsage) throw error
    process.stderr.write(`${this.commandName()}: ${message}\n`)
    return undefined
  }

  /** `uffd working-set merge`: oclif's ids separate topics with colons, users type spaces. */
  protected commandName(): string {
    return this.id ? `uffd ${this.id.replaceAll(':', ' ')}` : 'uffd'
  }
}
