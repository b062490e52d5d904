// What the tests that pit `uffd resume` against fc_client processes share: why they skip, a
// handler started and waited for until it is ready, and fc_client started against it.
import {type ChildProcess, spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {NATIVE, uffdSpawn} from './cli.js'
import {type Running, track, waitFor} from './processes.js'

export const FC_CLIENT = path.join(NATIVE, 'fc_client')

/** Why fc_client tests cannot run here, or undefined. */
export function fcClientSkipReason(): string | undefined {
  if (process.platform !== 'linux') return 'not Linux'
  // fc_client's uffd traps kernel-mode faults too (like Firecracker's, for KVM): that needs root.
  if (process.getuid?.() !== 0) return 'not root (a uffd that traps kernel-mode faults needs root)'
  if (!fs.existsSync(FC_CLIENT)) return `${FC_CLIENT} is not built (npm run build)`
  return undefined
}

export interface Handler {
  proc: Running
  socket: string
}

let names = 0

/** `uffd resume FILE --socket ... --ready-file ... ARGS` in `dir` (`env` added to its environment), once its ready file is written. */
export async function startHandler(live: Set<ChildProcess>, dir: string, file: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Handler> {
  const name = `r${process.pid}-${names++}`
  const socket = path.join(dir, `${name}.sock`)
  const ready = path.join(dir, `${name}.ready`)
  const proc = track(live, uffdSpawn(['resume', file, '--socket', socket, '--ready-file', ready, ...args], env), args.includes('--json'))
  await waitFor('uffd resume to write its ready file', () => fs.existsSync(ready) || proc.exited, 30_000)
  if (!fs.existsSync(ready)) throw new Error(`uffd resume exited (${(await proc.done).code}) before it was ready:\n${proc.stderr()}`)
  return {proc, socket}
}

/** fc_client against `handler`, restoring `image`; its own watchdog ends it after `timeoutMs`. */
export function startFcClient(live: Set<ChildProcess>, handler: Handler, image: string, args: string[], timeoutMs: number): Running {
  return track(live, spawn(FC_CLIENT, ['--socket', handler.socket, '--image', image, '--timeout-ms', String(timeoutMs), ...args], {stdio: ['ignore', 'pipe', 'pipe']}))
}
