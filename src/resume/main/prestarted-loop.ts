// The fault-loop thread, started before its settings are known. Light on purpose: the command's
// fast path (resume-entry.ts) starts the thread with this before it loads the modules that open
// a snapshot and listen.
import {type Worker} from 'node:worker_threads'

import {RESUME_THREAD_LIMITS, startWorker} from '../../core/workers.js'

/** How long an unwanted prestarted worker may take to load and end by itself before it is terminated. */
const PRESTARTED_END_MS = 10_000

/**
 * A fault-loop worker started before the snapshot is open, for a FaultLoopHost to give its
 * settings to: a thread takes a while to start and load the loop's modules (~200 ms here, on a
 * core the main thread does not use meanwhile), which then passes while the main thread opens the
 * snapshot and listens. One that is not wanted after all is ended with endPrestarted.
 */
export function prestartFaultLoop(): Worker {
  const worker = startWorker(import.meta.url, '../fault-loop/worker', null, [], RESUME_THREAD_LIMITS)
  // A thread that failed to start is replaced by a new one (FaultLoopHost) or just ends.
  worker.on('error', () => {})
  return worker
}

/**
 * Ends a prestarted worker never given its settings: it is told to end and does once it has
 * loaded its modules (one torn down while koffi loads aborts the process), or is terminated
 * after PRESTARTED_END_MS. Harmless once the worker has ended.
 */
export async function endPrestarted(worker: Worker): Promise<void> {
  if (worker.threadId < 0) return
  const ended = new Promise<void>((resolve) => worker.once('exit', () => resolve()))
  worker.postMessage(null)
  const timer = setTimeout(() => void worker.terminate(), PRESTARTED_END_MS)
  await ended
  clearTimeout(timer)
}
