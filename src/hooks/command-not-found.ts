import {Errors, type Hook} from '@oclif/core'

import {EXIT} from '../cli/base-command.js'

/**
 * oclif reports an unknown command itself, before any command (and so BaseCommand.catch) runs:
 * as text, even under --json. Scripts parse stdout under --json, so it gets the same USAGE
 * object as every other command-line error.
 */
const hook: Hook<'command_not_found'> = async function (options) {
  const argv = options.argv ?? []
  // `uffd --json nosuch` makes oclif take `--json` for the command id.
  const words = [options.id, ...argv]
  const name = words.find((w) => !w.startsWith('-')) ?? options.id
  const message = `command ${name.replaceAll(':', ' ')} not found (uffd --help lists the commands)`
  if (words.includes('--json')) {
    process.stdout.write(JSON.stringify({error: {code: 'USAGE', message, exitCode: EXIT.USAGE}}) + '\n')
    process.exitCode = EXIT.USAGE
    return
  }
  throw new Errors.CLIError(message, {exit: EXIT.USAGE})
}

export default hook
