// The fault-loop worker thread's entry: builds the loop from its settings and runs it.
import {parentPort, workerData} from 'node:worker_threads'

import {type WorkerConfig} from '../protocol.js'
import {FaultLoop} from './loop.js'

const config = workerData as WorkerConfig
const loop = FaultLoop.start(config, FaultLoop.channelOf(config, (message) => parentPort!.postMessage(message)))
loop.run()
await loop.close()
process.exit(0)
