import {parentPort, workerData} from 'node:worker_threads'

import {type CompareJob, type CompareResult, compareByDigest} from './compare-job.js'
import {SegmentReader} from './segment-reader.js'

/**
 * A compare worker: reads a job's range of the new image straight from its source files and
 * compares it with the parent's digests (compare-job.ts). Replies {ok, result} or {ok:false, error} per job.
 */
const {key} = workerData as {key: Uint32Array}
const reader = new SegmentReader()
let image = Buffer.alloc(0)

function run(job: CompareJob): CompareResult {
  const length = job.pages * job.pageSize
  if (image.length < length) image = Buffer.alloc(length)
  const bytes = image.subarray(0, length)
  const present = reader.read(job.segments, job.start, bytes, job.pageSize, job.diff)
  return compareByDigest(job, bytes, job.diff ? present : undefined, key)
}

parentPort!.on('message', (job: CompareJob) => {
  try {
    const result = run(job)
    parentPort!.postMessage({ok: true, result}, [result.bytes.buffer as ArrayBuffer, result.digests.buffer as ArrayBuffer])
  } catch (error) {
    parentPort!.postMessage({ok: false, id: job.id, error: (error as Error).message, code: (error as NodeJS.ErrnoException).code})
  }
})
