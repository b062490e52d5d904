import fs from 'node:fs'
import http from 'node:http'
import {type AddressInfo, type Socket} from 'node:net'
import path from 'node:path'

/**
 * A node:http server serving the files of one directory (a chain of snapshot files side by side)
 * with real range semantics (206, Content-Range, ETag, If-Match, 404 for a missing file), and a
 * log of every request: which file, which bytes.
 */
export class DirRangeServer {
  readonly requests: {file: string; first: number; last: number; status: number}[] = []
  private readonly server: http.Server
  private readonly sockets = new Set<Socket>()

  private constructor(private readonly dir: string) {
    this.server = http.createServer((req, res) => this.answer(req, res))
    this.server.on('connection', (socket) => {
      this.sockets.add(socket)
      socket.on('close', () => this.sockets.delete(socket))
    })
  }

  static async start(dir: string): Promise<DirRangeServer> {
    const server = new DirRangeServer(dir)
    await new Promise<void>((resolve) => server.server.listen(0, '127.0.0.1', resolve))
    return server
  }

  /** The URL of `name` (a path below the directory). */
  url(name = ''): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/${name}`
  }

  /** Bytes of `file` sent, in all. */
  bytesOf(file: string): number {
    return this.requests.filter((r) => r.file === file && r.status === 206).reduce((sum, r) => sum + r.last - r.first + 1, 0)
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }

  private answer(req: http.IncomingMessage, res: http.ServerResponse): void {
    const name = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname).replace(/^\/+/, '')
    const file = path.join(this.dir, name)
    const record = (status: number, first = 0, last = -1): void => {
      this.requests.push({file: name, first, last, status})
    }
    const stat = name && !name.split('/').includes('..') ? fs.statSync(file, {throwIfNoEntry: false}) : undefined
    if (!stat?.isFile()) {
      record(404)
      res.writeHead(404).end()
      return
    }
    const etag = `"${stat.size.toString(16)}-${Math.floor(stat.mtimeMs).toString(16)}-${stat.ino.toString(16)}"`
    const headers = {etag, 'last-modified': new Date(Math.floor(stat.mtimeMs / 1000) * 1000).toUTCString(), 'accept-ranges': 'bytes'}
    if (req.headers['if-match'] && req.headers['if-match'] !== etag) {
      record(412)
      res.writeHead(412).end()
      return
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')
    if (!m) {
      record(200, 0, stat.size - 1)
      res.writeHead(200, {...headers, 'content-length': stat.size})
      fs.createReadStream(file).pipe(res)
      return
    }
    const first = Number(m[1])
    if (first >= stat.size) {
      record(416)
      res.writeHead(416, {'content-range': `bytes */${stat.size}`}).end()
      return
    }
    const last = Math.min(Number(m[2]), stat.size - 1)
    const body = Buffer.alloc(last - first + 1)
    const fd = fs.openSync(file, 'r')
    fs.readSync(fd, body, 0, body.length, first)
    fs.closeSync(fd)
    record(206, first, last)
    res.writeHead(206, {...headers, 'content-range': `bytes ${first}-${last}/${stat.size}`, 'content-length': body.length})
    res.end(body)
  }
}
