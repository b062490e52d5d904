import cliProgress from 'cli-progress'

import {formatBytes} from '../core/units.js'
import {InterruptedError} from './base-command.js'

/**
 * A progress bar on stderr, drawn only when stderr is a terminal and output is not JSON: stdout
 * carries data and --json, and CI logs should not fill with redraws.
 */
export function progressBar(enabled: boolean, label: string): {update: (done: number, total: number) => void; stop: () => void} {
  if (!enabled || !process.stderr.isTTY) return {update: () => {}, stop: () => {}}
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {doneText} / {totalText} | {eta_formatted} left`,
      gracefulExit: false,
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  )
  let started = false
  return {
    update(done, total) {
      if (!started) {
        bar.start(total, 0, {doneText: formatBytes(0), totalText: formatBytes(total)})
        started = true
      }
      bar.update(done, {doneText: formatBytes(done), totalText: formatBytes(total)})
    },
    stop() {
      if (started) bar.stop()
    },
  }
}

/**
 * Runs `body` with SIGINT/SIGTERM turned into an abort of `controller` instead of an immediate
 * exit, so the command can clean up (remove temp files, resume a stopped process) first. `body`
 * must let the event loop run now and then, or the signal waits until it is done. Once it fails
 * after a signal, the failure is an InterruptedError saying `outcome`.
 */
export async function withInterruptHandling<T>(body: (signal: AbortSignal) => Promise<T>, outcome?: string): Promise<T> {
  const controller = new AbortController()
  let received: string | undefined
  const onSignal = (signal: NodeJS.Signals): void => {
    received = signal
    controller.abort()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    return await body(controller.signal)
  } catch (error) {
    if (received) throw new InterruptedError(received, outcome)
    throw error
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}
