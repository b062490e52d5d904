import fs from 'node:fs'
import http from 'node:http'
import {type AddressInfo} from 'node:net'

/**
 * A node:http server serving one file with real range semantics (206, Content-Range, ETag,
 * If-Match, 416), or, with ignoreRange, as a server without range support (200 and the whole
 * file). Faults are injected by a FaultProxy in front of it.
 */
export class RangeServer {
  readonly requests: {range: string | undefined; status: number}[] = []
  /** Answer range requests with 200 and the whole object. */
  ignoreRange = false
  private etag: string
  private lastModified: string
  private readonly server: http.Server
  private readonly sockets = new Set<import('node:net').Socket>()

  private constructor(private file: string) {
    this.server = http.createServer((req, res) => this.answer(req, res))
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

  private answer(req: http.IncomingMessage, res: http.ServerResponse): void {
    const range = req.headers.range
    const record = (status: number): void => {
      this.requests.push({range, status})
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
    if (!m || this.ignoreRange) {
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
    res.end(body)
  }
}
