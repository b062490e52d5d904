import fs from 'node:fs'
import http from 'node:http'
import {type AddressInfo} from 'node:net'

/**
 * What the next requests get wrong, for tests of a lying or failing server. Each fault applies to
 * the requests it counts, then stops.
 */
export interface Faults {
  /** Answer this many requests with this status (e.g. 503). */
  status?: {code: number; count: number}
  /** Reset the connection of this many requests after the headers. */
  resetAfterHeaders?: number
  /** Send only half of the body of this many requests, then end. */
  truncate?: number
  /** Flip a byte in the body of this many requests. */
  corrupt?: number
  /** Send nothing at all for this many requests (hang until the client gives up). */
  stall?: number
  /** Answer every range request with 200 and the whole object. */
  ignoreRange?: boolean
  /** Milliseconds added before every answer. */
  delayMs?: number
}

/** A node:http server serving one file with real range semantics (206, Content-Range, ETag, If-Match), and injectable faults. */
export class RangeServer {
  readonly requests: {range: string | undefined; status: number}[] = []
  faults: Faults = {}
  private etag: string
  private lastModified: string
  private readonly server: http.Server
  private readonly sockets = new Set<import('node:net').Socket>()

  private constructor(private file: string) {
    this.server = http.createServer((req, res) => this.handle(req, res))
    this.server.on('connection', (socket) => {
      this.sockets.add(socket)
      socket.on('close', () => this.sockets.delete(socket))
    })
    ;({etag: this.etag, lastModified: this.lastModified} = this.validators())
  }

  static async start(file: string): Promise<RangeServer> {
    const server = new RangeServer(file)
    await new Promise<void>((resolve) => server.server.listen(0, '127.0.0.1', resolve))
    return server
  }

  url(name = 'snapshot.uffd'): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/${name}`
  }

  /** Serves another file from now on (a replaced object: new ETag and Last-Modified). */
  replace(file: string): void {
    this.file = file
    const next = this.validators()
    this.etag = `"${next.etag.slice(1, -1)}-r"`
    this.lastModified = new Date(Date.parse(this.lastModified) + 1000).toUTCString()
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }

  private validators(): {etag: string; lastModified: string} {
    const stat = fs.statSync(this.file)
    return {etag: `"${stat.size.toString(16)}-${Math.floor(stat.mtimeMs).toString(16)}"`, lastModified: new Date(Math.floor(stat.mtimeMs / 1000) * 1000).toUTCString()}
  }

  private take(name: 'resetAfterHeaders' | 'truncate' | 'corrupt' | 'stall'): boolean {
    const n = this.faults[name] ?? 0
    if (n <= 0) return false
    this.faults[name] = n - 1
    return true
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const answer = (): void => this.answer(req, res)
    if (this.faults.delayMs) setTimeout(answer, this.faults.delayMs)
    else answer()
  }

  private answer(req: http.IncomingMessage, res: http.ServerResponse): void {
    const range = req.headers.range
    const record = (status: number): void => {
      this.requests.push({range, status})
    }
    if (this.take('stall')) {
      record(0)
      return
    }
    const status = this.faults.status
    if (status && status.count > 0) {
      status.count--
      record(status.code)
      res.writeHead(status.code).end()
      return
    }
    const size = fs.statSync(this.file).size
    const ifMatch = req.headers['if-match']
    if (ifMatch && ifMatch !== this.etag) {
      record(412)
      res.writeHead(412).end()
      return
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(range ?? '')
    const headers = {etag: this.etag, 'last-modified': this.lastModified, 'accept-ranges': 'bytes'}
    if (!m || this.faults.ignoreRange) {
      record(200)
      res.writeHead(200, {...headers, 'content-length': size})
      fs.createReadStream(this.file).pipe(res)
      return
    }
    const first = Number(m[1])
    if (first >= size) {
      record(416)
      res.writeHead(416, {'content-range': `bytes */${size}`}).end()
      return
    }
    const last = Math.min(Number(m[2]), size - 1)
    const body = Buffer.alloc(last - first + 1)
    const fd = fs.openSync(this.file, 'r')
    fs.readSync(fd, body, 0, body.length, first)
    fs.closeSync(fd)
    record(206)
    res.writeHead(206, {...headers, 'content-range': `bytes ${first}-${last}/${size}`, 'content-length': body.length})
    if (this.take('resetAfterHeaders')) {
      res.flushHeaders()
      setTimeout(() => req.socket.destroy(), 5)
      return
    }
    if (this.take('truncate')) {
      res.write(body.subarray(0, body.length >> 1))
      setTimeout(() => req.socket.destroy(), 5)
      return
    }
    if (this.take('corrupt')) body[body.length >> 1] ^= 0xff
    res.end(body)
  }
}
