import {type ChildProcess} from 'node:child_process'

/** A child process's end, as the tests look at it. */
export interface Outcome {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  /** The last stdout line as JSON (fc_client), or all of stdout with `jsonWhole` (uffd --json). */
  json: any
}

export interface Running {
  child: ChildProcess
  done: Promise<Outcome>
  exited: boolean
  stdout: () => string
  stderr: () => string
}

/**
 * Follows a child: its output, its end, and a SIGKILL after `killAfterMs` so that none outlives
 * its test. Every tracked child still running is in `live`, for an afterEach to kill.
 */
export function track(live: Set<ChildProcess>, child: ChildProcess, jsonWhole = false, killAfterMs = 90_000): Running {
  live.add(child)
  let stdout = ''
  let stderr = ''
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs)
  const running: Running = {
    child,
    exited: false,
    stdout: () => stdout,
    stderr: () => stderr,
    done: new Promise((resolve, reject) => {
      child.on('error', reject)
      child.on('close', (code, signal) => {
        clearTimeout(timer)
        live.delete(child)
        running.exited = true
        resolve({code, signal, stdout, stderr, json: parseJson(stdout, jsonWhole)})
      })
    }),
  }
  return running
}

/** SIGKILLs every child in `live` and waits until each is gone. */
export async function killAll(live: Set<ChildProcess>): Promise<void> {
  const pending = [...live]
  for (const child of pending) child.kill('SIGKILL')
  await Promise.all(pending.map((child) => new Promise((resolve) => (live.has(child) ? child.once('close', resolve) : resolve(undefined)))))
}

function parseJson(stdout: string, whole: boolean): any {
  try {
    return JSON.parse(whole ? stdout : (stdout.trim().split('\n').at(-1) ?? ''))
  } catch {
    return undefined
  }
}

export async function waitFor(what: string, condition: () => boolean, timeoutMs: number, everyMs = 10): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

/** The process's outcome, or an error (with its stderr) if it has not exited within `ms`. */
export async function exitWithin(p: Running, ms: number, what: string): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not exit within ${ms} ms; stderr so far:\n${p.stderr()}`)), ms)
  })
  try {
    return await Promise.race([p.done, timeout])
  } finally {
    clearTimeout(timer)
  }
}
