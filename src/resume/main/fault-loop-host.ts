import {MessageChannel, type Worker} from 'node:worker_threads'

import {UffdError} from '../../core/errors.js'
import {RESUME_THREAD_LIMITS, startWorker} from '../../core/workers.js'
import {closeFd, createEventfd, eventfdSignal} from '../../sys/index.js'
import {type FromWorker, type ToWorker, type WorkerConfig} from '../protocol.js'
import {RunStats} from '../run-stats.js'
import {type OpenedSnapshot} from '../../snapshot/open.js'
import {specTransfer} from '../../snapshot/spec.js'

/** How chunks are served, the same for a VMM's client and for CRIU's restored processes. */
export type ServingSettings = Pick<WorkerConfig, 'cacheBytes' | 'stageBytes' | 'faultAroundBytes' | 'faultAroundMinBytes' | 'kernelZeros' | 'spinMicros' | 'decoders' | 'readaheadBytes'> & {
  /** The snapshot the command opened (a local file, or object storage through the fetcher thread). */
  snapshot: OpenedSnapshot
}

/**
 * The serving settings out of a command's options, as the worker receives them: picked field by
 * field, since the options also hold things a worker cannot receive (an AbortSignal, callbacks).
 */
export function servingSettings(o: ServingSettings): Pick<WorkerConfig, 'snapshot' | 'cacheBytes' | 'stageBytes' | 'faultAroundBytes' | 'faultAroundMinBytes' | 'kernelZeros' | 'spinMicros' | 'decoders' | 'readaheadBytes'> {
  return {snapshot: o.snapshot.spec(), cacheBytes: o.cacheBytes, stageBytes: o.stageBytes, faultAroundBytes: o.faultAroundBytes, faultAroundMinBytes: o.faultAroundMinBytes, kernelZeros: o.kernelZeros, spinMicros: o.spinMicros, decoders: o.decoders, readaheadBytes: o.readaheadBytes}
}

/**
 * The main thread's side of the fault-loop worker: starts it with its statistics buffer and
 * control channel, sends it messages (a MessagePort message plus an eventfd poke, since the
 * worker sleeps in poll(), not in an event loop), and stops it.
 */
export class FaultLoopHost {
  readonly stats = new RunStats()
  readonly events: WorkerEvents
  private readonly controlFd: number
  private readonly channel = new MessageChannel()

  /** `prestarted`: a worker from prestartFaultLoop, given its settings here (else one is started). */
  constructor(config: Omit<WorkerConfig, 'stats' | 'control' | 'controlFd'>, prestarted?: Worker) {
    this.controlFd = createEventfd()
    const full: WorkerConfig = {...config, stats: this.stats.buffer, control: this.channel.port2, controlFd: this.controlFd}
    const specs = [config.snapshot, ...(config.also ?? []).map((a) => a.snapshot)]
    const transfer = [this.channel.port2, ...specs.flatMap((spec) => specTransfer(spec))]
    // (threadId is -1 once its end has been seen.)
    const worker = prestarted && prestarted.threadId >= 0 ? prestarted : undefined
    if (worker) worker.postMessage(full, transfer)
    this.events = new WorkerEvents(worker ?? startWorker(import.meta.url, '../fault-loop/worker', full, transfer, RESUME_THREAD_LIMITS))
  }

  send(message: ToWorker): void {
    this.channel.port1.postMessage(message)
    eventfdSignal(this.controlFd)
  }

  /** Tells the worker to stop, waits for it to exit (its last messages delivered), releases the channel. */
  async stop(): Promise<void> {
    this.send({type: 'stop'})
    await this.events.exit()
    closeFd(this.controlFd)
    this.channel.port1.close()
  }
}

/** Worker messages as awaitable events, and the worker's end as a promise. */
export class WorkerEvents {
  onMessage: ((m: FromWorker) => void) | undefined
  private waiters: ((m: FromWorker | undefined) => void)[] = []
  private failure: Error | undefined
  private readonly exited: Promise<void>

  constructor(private readonly worker: Worker) {
    worker.on('message', (m: FromWorker) => {
      this.onMessage?.(m)
      for (const w of this.waiters.splice(0)) w(m)
    })
    worker.on('error', (error) => {
      this.failure = error
      for (const w of this.waiters.splice(0)) w(undefined)
    })
    this.exited = new Promise((resolve) => worker.once('exit', () => resolve()))
    this.exited.then(() => {
      this.failure ??= new UffdError('WORKER_EXIT', 'the fault-loop worker stopped unexpectedly')
      for (const w of this.waiters.splice(0)) w(undefined)
    })
  }

  private check(): void {
    if (this.failure) throw this.failure
  }

  async next(match: (m: FromWorker) => boolean): Promise<FromWorker> {
    for (;;) {
      this.check()
      const m = await new Promise<FromWorker | undefined>((resolve) => this.waiters.push(resolve))
      this.check()
      if (m && match(m)) return m
    }
  }

  async nextOrAbort(signal: AbortSignal): Promise<void> {
    this.check()
    await new Promise<void>((resolve) => {
      const done = (): void => {
        signal.removeEventListener('abort', done)
        resolve()
      }
      signal.addEventListener('abort', done)
      this.waiters.push(done)
    })
    if (!signal.aborted) this.check()
  }

  async nextOrTimeout(ms: number): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, Math.max(0, ms))
      this.waiters.push(() => {
        clearTimeout(timer)
        resolve()
      })
    })
  }

  async yieldToEventLoop(): Promise<void> {
    this.check()
    await new Promise((resolve) => setImmediate(resolve))
  }

  async exit(): Promise<void> {
    if (this.failure instanceof UffdError && this.failure.code === 'WORKER_EXIT') return
    await this.exited
  }
}
