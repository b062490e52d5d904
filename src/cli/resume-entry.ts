// `uffd resume` without oclif: loading oclif and its command takes longer than everything else up
// to listening, and a VMM waits for the socket on every resume. bin/run.js calls this first; for a
// command line that is not plain (help, a usage error, anything parsePlainCommandLine leaves to
// oclif) it returns false before doing anything, and oclif runs the command as it always did.

import {type Worker} from 'node:worker_threads'

import {endPrestarted, prestartFaultLoop} from '../resume/main/prestarted-loop.js'
import {FlagValueError, parsePlainCommandLine} from './flag-specs.js'
import {failureReport} from './report-error.js'
import {jsonFlagSpec, resumeFlagSpecs} from './resume-flags.js'

const FLAGS = {...resumeFlagSpecs, ...jsonFlagSpec}

/** Runs `uffd resume ARGV` and returns true, or returns false having done nothing (the caller runs oclif). */
export async function runResumeFast(argv: readonly string[]): Promise<boolean> {
  // oclif's --json also follows UFFD_CONTENT_TYPE=json (and themes the JSON it prints on a terminal).
  if (process.env.UFFD_CONTENT_TYPE !== undefined) return false
  const parsed = parsePlainCommandLine(argv, FLAGS, ['snapshot'])
  if (!parsed) return false
  const {json} = parsed.flags
  if (json && process.stdout.isTTY) return false
  let faultLoop: Worker | undefined
  try {
    // The fault-loop thread starts now, beside loading and opening what comes before listening.
    faultLoop = prestartFaultLoop()
    // Loaded only for a command line this path runs: the modules behind it define koffi's types,
    // which the modules oclif loads for any other command line would define a second time (koffi
    // refuses a duplicate type name) when this file comes from the bundle.
    const {resumeCommand} = await import('./resume-command.js')
    const result = await resumeCommand(parsed.args.snapshot, parsed.flags, json, faultLoop)
    if (json) console.log(JSON.stringify(result, null, 2))
  } catch (error) {
    // Thrown before anything was listened on or written: oclif reports it as its own.
    if (error instanceof FlagValueError) return false
    const report = failureReport(error as Error, false)
    process.exitCode = report.exitCode
    if (json) console.log(JSON.stringify({error: report.error}, null, 2))
    else process.stderr.write(`uffd resume: ${report.error.message}\n`)
  } finally {
    // Never given its settings (a failure before serving, the import's included: a thread left
    // waiting for them would keep the process alive), or ended with the session already.
    if (faultLoop) await endPrestarted(faultLoop)
  }
  return true
}
