// End-to-end tests of the two native test tools: fc_client (behaves like Firecracker restoring a
// snapshot with the Uffd backend) against baseline_handler (Firecracker's example on-demand
// handler, in C). They check the tools against each other over every handshake shape, touch
// order, fault source (user-mode load, syscall, get_user_pages), balloon removes, regions and
// hugepages, and that the verifier does catch wrong bytes.
import {type ChildProcess, execFileSync, spawn} from 'node:child_process'
import crypto from 'node:crypto'
import {existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {join, resolve} from 'node:path'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {reserveHugePages} from './helpers/hugepages.js'

const nativeDir = resolve(import.meta.dirname, '..', 'native')
const fcClient = join(nativeDir, 'build', 'fc_client')
const baselineHandler = join(nativeDir, 'build', 'baseline_handler')
const PAGE = 4096
const HUGE_PAGE = 2 * 1024 * 1024
// Odd on purpose: the last page is partly past the end of the image and must read as zeros.
const IMAGE_SIZE = 3 * 1024 * 1024 + 1234
const MEM_SIZE = Math.ceil(IMAGE_SIZE / PAGE) * PAGE
const PAGES = MEM_SIZE / PAGE
const TIMEOUT_MS = '15000'

function skipReason(): string | undefined {
  if (process.platform !== 'linux') return 'not Linux'
  // fc_client's uffd must also trap kernel-mode faults (like KVM's), which needs root.
  if (process.getuid?.() !== 0) return 'not root (a uffd that traps kernel-mode faults needs root)'
  if (!existsSync('/proc/sys/vm/unprivileged_userfaultfd') && !existsSync('/dev/userfaultfd'))
    return 'kernel built without userfaultfd'
  return undefined
}

const skip = skipReason()
if (skip) console.warn(`test/native-clients.test.ts skipped: ${skip}`)

/** Pages cycle through zeros, a byte pattern and random bytes; the tail is random. */
function makeImage(seed: string): Buffer {
  const key = crypto.createHash('sha256').update(seed).digest().subarray(0, 16)
  const image = crypto.createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(IMAGE_SIZE))
  for (let at = 0, page = 0; at < IMAGE_SIZE; at += PAGE, page++) {
    const end = Math.min(at + PAGE, IMAGE_SIZE)
    if (page % 5 === 0) image.fill(0, at, end)
    else if (page % 5 === 1) image.fill(page & 0xff || 1, at, end)
  }
  return image
}

interface Outcome {
  code: number | null
  signal: NodeJS.Signals | null
  stderr: string
  json: Record<string, any>
}

function collect(child: ChildProcess): Promise<Outcome> {
  let stdout = ''
  let stderr = ''
  child.stdout!.on('data', (d) => (stdout += d))
  child.stderr!.on('data', (d) => (stderr += d))
  return new Promise((resolveExit, reject) => {
    child.on('error', reject)
    child.on('close', (code, signal) => {
      const line = stdout.trim().split('\n').pop() ?? ''
      let json: Record<string, any> = {}
      try {
        json = JSON.parse(line)
      } catch {
        // leave {}: the assertions on json then show stdout is missing or not JSON
      }
      resolveExit({code, signal, stderr, json})
    })
  })
}

async function waitFor(what: string, cond: () => boolean, ms: number) {
  const until = Date.now() + ms
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

describe.skipIf(skip !== undefined)('fc_client against baseline_handler', () => {
  let dir: string
  let image: string
  let runs = 0

  beforeAll(() => {
    execFileSync('make', ['-s', '-C', nativeDir, 'build/fc_client', 'build/baseline_handler'], {stdio: 'inherit'})
    dir = mkdtempSync(join(tmpdir(), 'native-clients-'))
    image = join(dir, 'image.raw')
    writeFileSync(image, makeImage('native-clients'))
  })

  afterAll(() => {
    if (dir) rmSync(dir, {recursive: true, force: true})
  })

  /** Starts baseline_handler serving `served`, runs fc_client against it, returns both results. */
  async function pair(clientArgs: string[], served = image, handlerArgs: string[] = []) {
    const n = runs++
    const sock = join(dir, `h${n}.sock`)
    const ready = join(dir, `h${n}.ready`)
    const handlerProc = spawn(baselineHandler, [
      '--socket', sock, '--mem-file', served, '--ready-file', ready, '--timeout-ms', TIMEOUT_MS, ...handlerArgs,
    ])
    const handlerDone = collect(handlerProc)
    let exited = false
    void handlerDone.then(() => (exited = true))
    await waitFor('baseline_handler to listen', () => existsSync(ready) || exited, 5000)
    const client = await collect(spawn(fcClient, [
      '--socket', sock, '--image', image, '--timeout-ms', TIMEOUT_MS, ...clientArgs,
    ]))
    // The handler exits by itself once the client process is gone.
    const killer = setTimeout(() => handlerProc.kill('SIGKILL'), 5000)
    const handler = await handlerDone
    clearTimeout(killer)
    return {client, handler}
  }

  /** Both sides succeeded and every byte the client checked was right. */
  function expectClean({client, handler}: Awaited<ReturnType<typeof pair>>) {
    expect(client.code, `fc_client failed:\n${client.stderr}`).toBe(0)
    expect(handler.code, `baseline_handler failed:\n${handler.stderr}`).toBe(0)
    expect(client.json).toMatchObject({ok: true, verify_errors: 0, first_bad_offset: null})
    expect(handler.json).toMatchObject({ok: true, exit_reason: 'peer-exited'})
  }

  for (const version of ['1.1', '1.7', '1.12']) {
    for (const touch of ['sequential', 'random']) {
      it(`serves a Firecracker ${version} handshake, ${touch} touch, verify-all`, async () => {
        const r = await pair(['--fc-version', version, '--touch', touch, '--verify-all'])
        expectClean(r)
        expect(r.client.json).toMatchObject({
          fc_version: version, page_size: PAGE, mem_size: MEM_SIZE, image_size: IMAGE_SIZE,
          touches: PAGES, pages_touched: PAGES, verify: 'all', pages_verified: PAGES,
        })
        expect(r.client.json.first_touch_ns).toBeGreaterThan(0)
        expect(r.client.json.lat_p50_ns).toBeLessThanOrEqual(r.client.json.lat_max_ns)
        // One fault, one page-sized copy per page; the tail page is padded with zeros.
        expect(r.handler.json).toMatchObject({
          handshake_shape: version, regions: 1, page_size: PAGE, mem_size: MEM_SIZE, faults: PAGES,
          copies: PAGES, bytes_copied: MEM_SIZE, removes: 0,
        })
      })
    }
  }

  for (const threads of [1, 2]) {
    it(`--prefetch installs a page list on ${threads} thread(s) before the client touches it`, async () => {
      // Every other page, last first: data pages, zero pages (which grow into zero runs) and the
      // partial tail page; the client waits until the list is surely in, then checks every byte.
      const listed = Array.from({length: Math.ceil(PAGES / 2)}, (_, i) => (PAGES - 1 - 2 * i) * PAGE)
      const list = join(dir, `prefetch-${threads}.list`)
      writeFileSync(list, listed.join('\n'))
      const r = await pair(['--delay-ms', '300', '--touch', 'sequential', '--verify-all'], image, ['--prefetch', list, '--prefetch-threads', String(threads)])
      expectClean(r)
      expect(r.client.json).toMatchObject({pages_verified: PAGES})
      expect(r.handler.json).toMatchObject({prefetch_threads: threads, removes: 0})
      expect(r.handler.json.prefetch_done_ns).toBeGreaterThan(0)
      expect(r.handler.json.prefetched_pages).toBeGreaterThanOrEqual(listed.length)
      // Listed pages never fault: at most the others do.
      expect(r.handler.json.faults).toBeLessThanOrEqual(PAGES - listed.length)
    })
  }

  it('--prefetch-threads refuses a REMOVE it cannot order against its helpers', async () => {
    // A list long enough that the helper still runs when the balloon inflates right away.
    const list = join(dir, 'prefetch-remove.list')
    writeFileSync(list, Array.from({length: PAGES}, (_, p) => p * PAGE).join('\n'))
    const r = await pair(['--touch', 'none', '--balloon', '0:3M'], image, ['--prefetch', list, '--prefetch-threads', '2'])
    // Either the helper had finished (the REMOVE is served) or the handler stopped serving with
    // a clear error: never a silent refill.
    if (r.handler.code !== 0) expect(r.handler.stderr).toContain('REMOVE event arrived while --prefetch-threads helpers were installing')
    else expect(r.client.json).toMatchObject({balloon_ok: true})
  })

  it('serves kernel-mode faults (write(2) and get_user_pages) from two threads', async () => {
    const r = await pair(['--access', 'mixed', '--threads', '2', '--verify-all'])
    expectClean(r)
    expect(r.client.json).toMatchObject({access: 'mixed', threads: 2, touches: PAGES, pages_verified: PAGES})
    expect(r.handler.json.faults).toBeGreaterThanOrEqual(PAGES)
  })

  it('serves two regions with unknown fields and extra fds, like a fork', async () => {
    const r = await pair(['--regions', '2', '--extra-fields', '--fds', '3', '--touch', 'random', '--verify-all'])
    expectClean(r)
    expect(r.client.json).toMatchObject({regions: 2, fds: 3, pages_verified: PAGES})
    expect(r.handler.json).toMatchObject({regions: 2, extra_fds: 2, mem_size: MEM_SIZE, faults: PAGES})
  })

  it('reads zeros past the end of the image (memory larger than the file)', async () => {
    const r = await pair(['--size', '5M', '--syscall-touch', '--stride', '1000', '--verify'])
    expectClean(r)
    const pages = (5 * 1024 * 1024) / PAGE
    expect(r.client.json).toMatchObject({mem_size: 5 * 1024 * 1024, pages_touched: pages, pages_verified: pages})
    expect(r.client.json.touches).toBe(Math.ceil((5 * 1024 * 1024) / 1000))
    expect(r.handler.json).toMatchObject({faults: pages, copies: PAGES, zero_copies: pages - PAGES})
  })

  it('serves zeros after a balloon inflate (MADV_DONTNEED -> UFFD_EVENT_REMOVE)', async () => {
    // 100 random pages touched: the balloon ranges hold both present and never-faulted pages,
    // and all of them must read zeros afterwards, not snapshot data.
    const r = await pair(['--touch', 'random', '--count', '100', '--verify', '--balloon', '4096:64K,1M:12K'])
    expectClean(r)
    expect(r.client.json).toMatchObject({pages_touched: 100, balloon_ok: true, balloon_bytes: 65536 + 12288})
    expect(r.handler.json).toMatchObject({removes: 2, removed_bytes: 65536 + 12288, zeropages: 16 + 3})
  })

  it('survives a balloon inflate racing two faulting threads (EAGAIN path)', async () => {
    const balloon = Array.from({length: 20}, (_, i) => `${i * 131072}:32K`).join(',')
    const r = await pair(['--threads', '2', '--touch', 'random', '--verify-all', '--balloon', balloon, '--balloon-concurrent'])
    expectClean(r)
    expect(r.client.json).toMatchObject({balloon_ok: true, balloon_bytes: 20 * 32768})
    expect(r.handler.json.removes).toBe(20)
  })

  it('detects wrong bytes: verify fails against a handler serving another image', async () => {
    const other = Buffer.from(readFileSync(image))
    const at = 7 * PAGE + 123 // page 7 is random data
    other[at] ^= 0x5a
    const otherPath = join(dir, 'other.raw')
    writeFileSync(otherPath, other)
    const r = await pair(['--verify-all', '--touch', 'none'], otherPath)
    expect(r.client.code).toBe(1)
    expect(r.client.json).toMatchObject({
      ok: false, verify_errors: 1, first_bad_offset: at, expected_byte: other[at] ^ 0x5a, actual_byte: other[at],
    })
    expect(r.client.stderr).toContain(`first mismatch at guest offset 0x${at.toString(16)}`)
    expect(r.handler.code).toBe(0)
  })

  for (const kind of ['not-json', 'unaligned', 'two-page-sizes', 'no-fd', 'empty-array', 'huge-size']) {
    it(`baseline_handler rejects a malformed handshake: ${kind}`, async () => {
      const r = await pair(['--malformed', kind])
      expect(r.handler.code, r.handler.stderr).toBe(1)
      expect(r.handler.json).toMatchObject({ok: false, faults: 0})
      expect(r.client.code, r.client.stderr).toBe(0)
      expect(r.client.json).toMatchObject({ok: true, malformed: kind, handler_closed: true})
    })
  }

  it('baseline_handler exits cleanly when the client dies mid-restore', async () => {
    const r = await pair(['--crash-after', '50'])
    expect(r.client.signal).toBe('SIGABRT')
    expect(r.handler.code, r.handler.stderr).toBe(0)
    expect(r.handler.json).toMatchObject({ok: true, exit_reason: 'peer-exited', faults: 50})
  })

  it('serves 2 MiB hugepages (when they can be reserved)', async (ctx) => {
    const reservation = reserveHugePages(4) // --size 8M
    try {
      if (reservation.reason) {
        console.warn(`hugepage test skipped: ${reservation.reason}`)
        ctx.skip()
      }
      const r = await pair([
        '--hugepages', '--size', '8M', '--regions', '2', '--access', 'mixed', '--stride', '64K', '--verify-all',
        '--balloon', `${HUGE_PAGE}:${HUGE_PAGE}`,
      ])
      expectClean(r)
      expect(r.client.json).toMatchObject({page_size: HUGE_PAGE, mem_size: 8 * 1024 * 1024, regions: 2, balloon_ok: true})
      // UFFDIO_ZEROPAGE does not exist for hugetlb: past the image and after the balloon, zeros are copied.
      expect(r.handler.json).toMatchObject({page_size: HUGE_PAGE, copies: 2, zeropages: 0, removes: 1})
      expect(r.handler.json.zero_copies).toBe(3)
    } finally {
      reservation.release()
    }
  })
})
