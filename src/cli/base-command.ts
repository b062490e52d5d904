import {Command, Errors} from '@oclif/core'

import {failureReport} from './report-error.js'

export {EXIT, InterruptedError} from './report-error.js'

/**
 * Turns every failure into one line on stderr (or an {error} object under --json) and the exit
 * code scripts can rely on; a stack trace is a bug report, not an error message.
 */
export abstract class BaseCommand extends Command {
  static override enableJsonFlag = true

  protected override async catch(error: Error & {oclif?: {exit?: number}; code?: string}): Promise<unknown> {
    const isUsage = error instanceof Errors.CLIError && error.oclif?.exit === 2
    if (isUsage && !this.jsonEnabled()) {
      // oclif prints its own usage errors, with the help hint.
      process.exitCode = 2
      throw error
    }
    const report = failureReport(error, isUsage)
    process.exitCode = report.exitCode
    if (this.jsonEnabled()) this.logJson({error: report.error})
    else process.stderr.write(`${this.commandName()}: ${report.error.message}\n`)
    return undefined
  }

  /** `uffd working-set merge`: oclif's ids separate topics with colons, users type spaces. */
  protected commandName(): string {
    return this.id ? `uffd ${this.id.replaceAll(':', ' ')}` : 'uffd'
  }
}
