// The fault-loop worker thread's entry: builds the loop from its settings and runs it.
import {parentPort, workerData} from 'node:worker_threads'

import {type WorkerConfig} from '../protocol.js'

// Started before the main thread knows its settings (prestartFaultLoop), it loads the loop's
// modules at once, beside the main thread's start-up, and gets its settings as its first message
// (null: it is not wanted, and ends).
const {FaultLoop} = await import('./loop.js')
const config = (workerData as WorkerConfig | null) ?? (await new Promise<WorkerConfig | null>((resolve) => parentPort!.once('message', resolve)))
if (config) {
  const loop = FaultLoop.start(config, FaultLoop.channelOf(config, (message) => parentPort!.postMessage(message)))
  try {
    loop.run()
  } finally {
    // Also when the loop throws: its decoders may still be loading their native modules, and a
    // thread ended under them then would abort the process (the pool lets them end by themselves).
    await loop.close()
  }
}
process.exit(0)
