import {Flags} from '@oclif/core'

import {UffdError} from '../core/errors.js'

/** `--mode OCTAL` of the commands that write snapshots. */
export const modeFlag = Flags.string({
  summary: 'Permission bits of the snapshot written, in octal (e.g. 640), set exactly [default: 600 less the umask: snapshots hold memory contents].',
})

/** The bits of `--mode`, or undefined without it; a message for anything that is not 0-7777 in octal. */
export function parseMode(text: string | undefined): number | undefined {
  if (text === undefined) return undefined
  if (!/^[0-7]{1,4}$/.test(text)) throw new UffdError('USAGE', `--mode: ${JSON.stringify(text)} is not an octal mode (0..7777, e.g. 640)`)
  return Number.parseInt(text, 8)
}
