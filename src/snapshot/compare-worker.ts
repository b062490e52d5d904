import {parentPort, workerData} from 'node:worker_threads'

import {WORKER_STOP} from '../core/workers.js'
import {type CompareJob, CompareRunner} from './compare-job.js'

/**
 * A compare worker: reads a job's range of the new image straight from its source files and
 * compares it with the parent's digests (compare-job.ts). Replies {ok, result} or {ok:false, error} per job.
 */
const runner = new CompareRunner((workerData as {key: Uint32Array}).key)

parentPort!.on('message', (job: CompareJob | typeof WORKER_STOP) => {
  if (job === WORKER_STOP) {
    // Its file mapping is the process's, not the thread's: it would outlive the thread.
    runner.close()
    return parentPort!.close()
  }
  try {
    const result = runner.run(job)
    parentPort!.postMessage({ok: true, result}, [result.bytes.buffer as ArrayBuffer, result.digests.buffer as ArrayBuffer])
  } catch (error) {
    parentPort!.postMessage({ok: false, id: job.id, error: (error as Error).message, code: (error as NodeJS.ErrnoException).code})
  }
})
