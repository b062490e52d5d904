import {type Worker} from 'node:worker_threads'

import {errorFromWorker, UffdError} from '../core/errors.js'
import {startWorker, WORKER_STOP} from '../core/workers.js'
import {type ChunkJob, type ChunkJobResult, type ChunkSealing} from './chunk-job.js'
import {type CompressionCodec} from './codecs.js'

/** How long close() waits for a worker to end by itself before it is terminated. */
const STOP_MS = 5000

type Reply<R> = {ok: true; result: R} | {ok: false; id: number; error: string; code?: string}

/** A fixed set of workers running one module; jobs queue until a worker is idle. */
export class WorkerPool<J, R> {
  private readonly idle: Worker[] = []
  private readonly queue: {job: J; resolve: (r: R) => void; reject: (e: Error) => void}[] = []
  private readonly pending = new Map<Worker, {resolve: (r: R) => void; reject: (e: Error) => void}>()
  private readonly workers: Worker[] = []
  private failure: Error | undefined
  private closing = false

  /** `module`: the worker's module next to this one (as startWorker takes it), started with `workerData`. */
  constructor(size: number, module: string, workerData: unknown) {
    for (let i = 0; i < size; i++) {
      const worker = startWorker(import.meta.url, module, workerData)
      worker.on('message', (reply: Reply<R>) => this.onReply(worker, reply))
      worker.on('error', (error) => this.fail(error))
      worker.on('exit', (code) => {
        if (code !== 0 && !this.failure && !this.closing) this.fail(new UffdError('WORKER_EXIT', `${module} exited with code ${code}`))
      })
      this.workers.push(worker)
      this.idle.push(worker)
    }
  }

  submit(job: J): Promise<R> {
    if (this.failure) return Promise.reject(this.failure)
    return new Promise((resolve, reject) => {
      this.queue.push({job, resolve, reject})
      this.dispatch()
    })
  }

  /**
   * Ends the workers: each is asked to stop and ends once its modules have loaded and its job (if
   * any) is done (see WORKER_STOP); one that has not within STOP_MS is terminated.
   */
  async close(): Promise<void> {
    this.closing = true
    this.fail(new UffdError('INTERNAL', 'worker pool closed'))
    await Promise.all(
      this.workers.map(async (worker) => {
        const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()))
        if (worker.threadId < 0) return
        worker.postMessage(WORKER_STOP)
        let timer: NodeJS.Timeout | undefined
        const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), STOP_MS)))
        if ((await Promise.race([exited, late])) === 'late') await worker.terminate()
        clearTimeout(timer)
      }),
    )
  }

  private dispatch(): void {
    while (this.idle.length > 0 && this.queue.length > 0) {
      const worker = this.idle.pop()!
      const {job, resolve, reject} = this.queue.shift()!
      this.pending.set(worker, {resolve, reject})
      worker.postMessage(job)
    }
  }

  private onReply(worker: Worker, reply: Reply<R>): void {
    const waiter = this.pending.get(worker)
    this.pending.delete(worker)
    this.idle.push(worker)
    if (waiter) {
      if (reply.ok) waiter.resolve(reply.result)
      else waiter.reject(errorFromWorker(reply.error, reply.code))
    }
    this.dispatch()
  }

  private fail(error: Error): void {
    this.failure = error
    for (const waiter of this.pending.values()) waiter.reject(error)
    for (const queued of this.queue.splice(0)) queued.reject(error)
    this.pending.clear()
  }
}

/** Compression workers (compress-worker.ts). */
export class CompressionPool extends WorkerPool<ChunkJob, ChunkJobResult> {
  /** `sealing`: encrypt each chunk's stored bytes for its place (FileSealer.chunkSealing). */
  constructor(size: number, codec: CompressionCodec, level: number, sealing?: ChunkSealing) {
    super(size, 'compress-worker', {codec, level, sealing})
  }
}
