import http from 'node:http'
import {type AddressInfo, type Socket} from 'node:net'

/**
 * What the next requests get wrong, for tests of a lying or failing store. Each counted fault
 * applies to that many requests, then stops.
 */
export interface Faults {
  /** Answer this many requests with this status (e.g. 503), without asking the store. */
  status?: {code: number; count: number}
  /** Reset the connection of this many requests after the headers. */
  resetAfterHeaders?: number
  /** Send only half of the body of this many requests, then break the connection. */
  truncate?: number
  /** Flip a byte in the body of this many requests. */
  corrupt?: number
  /** Send nothing at all for this many requests (hang until the client gives up). */
  stall?: number
  /** Milliseconds added before every answer (latency the loopback does not have). */
  delayMs?: number
  /** The counted faults start only once this many requests were answered (e.g. once a snapshot is open). */
  after?: number
}

/**
 * An HTTP proxy on loopback in front of a real server (the range server, s3rver): forwards each
 * request and its answer, and injects faults on the way. Bodies of successful answers are
 * buffered, so a corruption or truncation lands on the bytes the client asked for.
 */
export class FaultProxy {
  readonly requests: {method: string; range: string | undefined; status: number}[] = []
  faults: Faults = {}
  /** Client connections open now, and the most that were open at once. */
  openConnections = 0
  maxOpenConnections = 0
  private readonly server: http.Server
  private readonly sockets = new Set<Socket>()

  private constructor(private readonly target: URL) {
    this.server = http.createServer((req, res) => {
      if (this.faults.delayMs) setTimeout(() => this.forward(req, res), this.faults.delayMs)
      else this.forward(req, res)
    })
    this.server.on('connection', (socket) => {
      this.sockets.add(socket)
      this.maxOpenConnections = Math.max(this.maxOpenConnections, ++this.openConnections)
      socket.on('close', () => {
        this.sockets.delete(socket)
        this.openConnections--
      })
    })
  }

  static async start(target: string): Promise<FaultProxy> {
    const proxy = new FaultProxy(new URL(target))
    await new Promise<void>((resolve) => proxy.server.listen(0, '127.0.0.1', resolve))
    return proxy
  }

  /** The proxy's origin, or the URL of `path` on it. */
  url(path = ''): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}${path}`
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }

  /** Counts one use of a fault, for a request that gets faults (see Faults.after). */
  private take(name: 'resetAfterHeaders' | 'truncate' | 'corrupt' | 'stall', faulty: boolean): boolean {
    if (!faulty) return false
    const n = this.faults[name] ?? 0
    if (n <= 0) return false
    this.faults[name] = n - 1
    return true
  }

  private forward(req: http.IncomingMessage, res: http.ServerResponse): void {
    const record = (status: number): void => {
      this.requests.push({method: req.method ?? '?', range: req.headers.range, status})
    }
    const faulty = this.requests.length >= (this.faults.after ?? 0)
    if (this.take('stall', faulty)) {
      record(0)
      return
    }
    const status = this.faults.status
    if (status && status.count > 0 && faulty) {
      status.count--
      record(status.code)
      res.writeHead(status.code, {'content-type': 'application/xml'}).end(`<?xml version="1.0"?><Error><Code>ServiceUnavailable</Code><Message>injected ${status.code}</Message></Error>`)
      return
    }
    const upstream = http.request({host: this.target.hostname, port: this.target.port, method: req.method, path: req.url, headers: {...req.headers, host: this.target.host}}, (answer) => {
      const chunks: Buffer[] = []
      answer.on('data', (d: Buffer) => chunks.push(d))
      answer.on('end', () => {
        const body = Buffer.concat(chunks)
        record(answer.statusCode ?? 0)
        const ok = (answer.statusCode ?? 0) < 300 && body.length > 0
        res.writeHead(answer.statusCode ?? 502, answer.headers)
        if (ok && this.take('resetAfterHeaders', faulty)) {
          res.flushHeaders()
          setTimeout(() => req.socket.destroy(), 5)
          return
        }
        if (ok && this.take('truncate', faulty)) {
          res.write(body.subarray(0, body.length >> 1))
          setTimeout(() => req.socket.destroy(), 5)
          return
        }
        if (ok && this.take('corrupt', faulty)) body[body.length >> 1] ^= 0xff
        res.end(body)
      })
    })
    upstream.on('error', () => res.destroy())
    req.pipe(upstream)
  }
}
