import {type Transferable, Worker} from 'node:worker_threads'

/**
 * Starts a worker from a module given by its path relative to the caller, without extension. Compiled code runs `name.js`.
 * When the caller itself runs from TypeScript source (tests, bin/dev.js), the worker registers
 * tsx first and then imports `name.ts`, so both paths run the same worker code. (A worker does
 * not inherit the parent's loader hooks, and `--import tsx` in a worker's execArgv is ignored.)
 */
export function startWorker(callerUrl: string, name: string, workerData: unknown, transferList: Transferable[] = []): Worker {
  if (!callerUrl.endsWith('.ts')) return new Worker(new URL(`./${name}.js`, callerUrl), {workerData, transferList})
  const url = new URL(`./${name}.ts`, callerUrl).href
  const bootstrap = `import('tsx/esm/api').then(({register}) => { register(); return import(${JSON.stringify(url)}) })`
  return new Worker(bootstrap, {eval: true, workerData, transferList})
}
