/**
 * bench/range-server: the object store of bench/remote, run inside the benchmark's network
 * namespace (so the link's shaping applies to what it sends). Serves the files named on the
 * command line with HTTP range requests (206, Content-Range, ETag), streaming from the page
 * cache, and holds every response back --delay-ms before its headers: the per-request latency
 * of an object store or CDN, which this kernel cannot add on the link (it has no netem).
 *
 *   node --import tsx bench/range-server.ts --host 10.213.7.2 --delay-ms 20 NAME=PATH [NAME=PATH...]
 *
 * Prints `listening PORT` once it accepts connections, then a request count on SIGTERM.
 */
import fs from 'node:fs'
import http from 'node:http'
import {type AddressInfo} from 'node:net'

import {arg} from './lib.js'

const host = arg('host', '127.0.0.1')
const delayMs = Number(arg('delay-ms', '0'))
const files = new Map<string, {path: string; size: number; etag: string}>()
for (const a of process.argv.slice(2)) {
  const m = /^([\w.-]+)=(.+)$/.exec(a)
  if (!m) continue
  const stat = fs.statSync(m[2])
  files.set(`/${m[1]}`, {path: m[2], size: stat.size, etag: `"${stat.size.toString(16)}-${Math.floor(stat.mtimeMs).toString(16)}"`})
}
let requests = 0

function answer(req: http.IncomingMessage, res: http.ServerResponse): void {
  requests++
  const file = files.get(req.url ?? '')
  if (!file) {
    res.writeHead(404).end()
    return
  }
  const headers = {etag: file.etag, 'accept-ranges': 'bytes', 'last-modified': new Date(0).toUTCString()}
  if (req.headers['if-match'] && req.headers['if-match'] !== file.etag) {
    res.writeHead(412).end()
    return
  }
  const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')
  if (!m) {
    res.writeHead(200, {...headers, 'content-length': file.size})
    if (req.method === 'HEAD') res.end()
    else fs.createReadStream(file.path).pipe(res)
    return
  }
  const first = Number(m[1])
  const last = Math.min(Number(m[2]), file.size - 1)
  if (first > last) {
    res.writeHead(416, {'content-range': `bytes */${file.size}`}).end()
    return
  }
  res.writeHead(206, {...headers, 'content-range': `bytes ${first}-${last}/${file.size}`, 'content-length': last - first + 1})
  fs.createReadStream(file.path, {start: first, end: last, highWaterMark: 1 << 20}).pipe(res)
}

const server = http.createServer((req, res) => setTimeout(() => answer(req, res), delayMs))
server.keepAliveTimeout = 60_000
server.listen(0, host, () => console.log(`listening ${(server.address() as AddressInfo).port}`))
process.on('SIGTERM', () => {
  console.log(`requests ${requests}`)
  process.exit(0)
})
