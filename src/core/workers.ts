import {type Transferable, Worker} from 'node:worker_threads'

import {UffdError} from './errors.js'

/**
 * Starts a worker from a module given by its path relative to the caller, without extension. Compiled code runs `name.js`.
 * When the caller itself runs from TypeScript source (tests, bin/dev.js), the worker registers
 * tsx first and then imports `name.ts`, so both paths run the same worker code. (A worker does
 * not inherit the parent's loader hooks, and `--import tsx` in a worker's execArgv is ignored.)
 * Code bundled by scripts/bundle.mjs (where process.env.UFFD_BUNDLE is "1" at build time) runs
 * the worker's bundle: dist/resume/decoder/worker.js is dist/bundle/resume-decoder-worker.js.
 */
export function startWorker(callerUrl: string, name: string, workerData: unknown, transferList: Transferable[] = [], limits: WorkerLimits = {}): Worker {
  const resourceLimits = limits.youngGenerationMb === undefined ? undefined : {maxYoungGenerationSizeMb: limits.youngGenerationMb}
  if (!callerUrl.endsWith('.ts')) return new Worker(process.env.UFFD_BUNDLE ? bundleOf(new URL(`./${name}.js`, callerUrl)) : new URL(`./${name}.js`, callerUrl), {workerData, transferList, resourceLimits})
  const url = new URL(`./${name}.ts`, callerUrl).href
  const bootstrap = `import('tsx/esm/api').then(({register}) => { register(); return import(${JSON.stringify(url)}) })`
  return new Worker(bootstrap, {eval: true, workerData, transferList, resourceLimits})
}

export interface WorkerLimits {
  /** V8's young generation for the thread's isolate, MiB (V8's default lets it grow to tens of MiB before it collects). */
  youngGenerationMb?: number
}

/**
 * The young generation of a resume's long-lived threads (the fault loop, the decoders): each
 * isolate otherwise grows its own to ~12 MiB of resident memory before scavenging, though these
 * threads allocate little per fault and keep less; a handler per VM on a host of many VMs pays
 * that per thread.
 */
export const RESUME_THREAD_LIMITS: WorkerLimits = {youngGenerationMb: 2}

/** The bundle of dist/ module `url` (scripts/bundle.mjs names it by its path in dist/). */
function bundleOf(url: URL): URL {
  const at = url.pathname.lastIndexOf('/dist/')
  if (at < 0) throw new UffdError('INTERNAL', `${url.href} is not a module of dist/ (a bundle started from elsewhere)`)
  return new URL(`${url.pathname.slice(0, at)}/dist/bundle/${url.pathname.slice(at + '/dist/'.length).replaceAll('/', '-')}`, url)
}

/**
 * What a pool sends a worker to end it (WorkerPool.close): the worker closes its port and its
 * thread ends by itself. A worker is never terminated while it may still be loading its modules:
 * one torn down while koffi loads aborts the whole process (SIGABRT), and a message is handled
 * only once they have loaded.
 */
export const WORKER_STOP = 'stop'
