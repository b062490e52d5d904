// Hostile handshakes for `uffd resume`: seeded cases of what a VMM's end of the socket can send
// (mutated and crafted region tables, the wrong kinds and numbers of fds, messages cut in parts,
// connections that stop halfway), played by this process against a real handler. Used by
// test/hostile-fuzz.test.ts (bounded, in CI) and bench/fuzz.ts --handshakes (longer).
import {spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {closeFd, connectUnix, createEventfd, createUserfaultfd, mmapAnonymous, munmap, poll, POLLIN, readSome, sendWithFds, uffdApi, uffdRegister, UFFDIO_REGISTER_MODE, writeAll} from '../../src/sys/index.js'
import {Rng} from './fuzz.js'

const PAGE = 4096

/** What goes with the message as SCM_RIGHTS: each a kind of fd the handler must refuse or cope with. */
export type FdKind =
  | 'uffd' // fresh, API not yet negotiated: what a VMM sends
  | 'uffd-negotiated' // UFFDIO_API already done (the handler's own API call fails)
  | 'uffd-registered' // negotiated and registered over memory of this process
  | 'dev-null'
  | 'fifo-forged' // a FIFO holding forged uffd_msg records (fork, remove, page faults)
  | 'fifo-empty'
  | 'eventfd'
  | 'socket' // a connection to the handler's own socket
  | 'directory'
  | 'regular-file'

export interface HostileCase {
  how: string
  payload: Buffer
  fds: FdKind[]
  /** Sent in two parts with a pause between, the fds with the first. */
  split: boolean
  /**
   * Send only the first part (or, for an empty message, nothing) and keep the connection open: a
   * handshake that never completes, which the handler must close by its deadline.
   */
  hold: boolean
}

const FD_KINDS: FdKind[] = ['uffd', 'uffd-negotiated', 'uffd-registered', 'dev-null', 'fifo-forged', 'fifo-empty', 'eventfd', 'socket', 'directory', 'regular-file']

function region(base: number, size: number, offset: number, pageSize = PAGE): Record<string, unknown> {
  return {base_host_virt_addr: base, size, offset, page_size: pageSize}
}

/** Values a numeric field is replaced with: wrong types, signs, precision, alignment, sizes. */
const BAD_NUMBERS: unknown[] = [-1, 0, 1, 1.5, 4095, 2 ** 53, 2 ** 64, -(2 ** 63), '4096', null, true, [], {}, 1e308, Number.MAX_SAFE_INTEGER, 0x7fff_ffff_f000, 2097152, 1234]

/** One hostile case for a snapshot of `size` bytes; the same (seed, i) always gives the same case. */
export function hostileCase(seed: number, i: number, size: number): HostileCase {
  const rng = new Rng(seed, 7_000_000 + i)
  const base = 0x7f00_0000_0000 + rng.int(1 << 16) * 0x20_0000
  const valid = [region(base, size, 0)]
  let how: string
  let payload: Buffer
  const kind = rng.int(12)
  if (kind === 0) {
    how = 'a valid region table'
    payload = Buffer.from(JSON.stringify(valid))
  } else if (kind === 1) {
    const field = rng.pick(['base_host_virt_addr', 'size', 'offset', 'page_size'])
    const value = rng.pick(BAD_NUMBERS)
    how = `${field} = ${JSON.stringify(value)}`
    payload = Buffer.from(JSON.stringify([{...valid[0], [field]: value}]))
  } else if (kind === 2) {
    const n = rng.pick([0, 2, 3, 700, 1025, 5000])
    const per = Math.max(PAGE, Math.floor(size / Math.max(n, 1) / PAGE) * PAGE)
    how = `${n} regions`
    payload = Buffer.from(JSON.stringify(Array.from({length: n}, (_, r) => region(base + r * (per + 0x20_0000), per, r * per))))
  } else if (kind === 3) {
    const shape = rng.int(5)
    how = ['two regions over one range', 'regions out of order', 'offsets not a running sum', 'more memory than the snapshot', 'a gap between offsets'][shape]
    const half = size / 2
    const tables = [
      [region(base, half, 0), region(base, half, half)],
      [region(base + half, half, half), region(base, half, 0)],
      [region(base, half, 0), region(base + half + 0x20_0000, half, half + PAGE)],
      [region(base, size * 2, 0)],
      [region(base, half, 0), region(base + half + 0x20_0000, half - PAGE, half + PAGE)],
    ]
    payload = Buffer.from(JSON.stringify(tables[shape]))
  } else if (kind === 4) {
    const shape = rng.int(8)
    how = ['empty message', 'an object, not an array', 'deep nesting', 'a 70 KB string', 'not JSON', 'random bytes', 'valid JSON then garbage', 'a number'][shape]
    const texts = ['', JSON.stringify({regions: valid}), '['.repeat(20_000) + ']'.repeat(20_000), JSON.stringify([{...valid[0], note: 'x'.repeat(70_000)}]), 'GET / HTTP/1.1\r\n\r\n', '', `${JSON.stringify(valid)}\u0000garbage`, '42']
    payload = shape === 5 ? Buffer.from(Array.from({length: 1 + rng.int(4096)}, () => rng.int(256))) : Buffer.from(texts[shape])
  } else if (kind === 5) {
    const text = JSON.stringify(valid)
    const at = rng.int(text.length)
    how = `cut at byte ${at}`
    payload = Buffer.from(text.slice(0, at))
  } else if (kind === 6) {
    const bytes = Buffer.from(JSON.stringify(valid))
    const flips = 1 + rng.int(4)
    for (let f = 0; f < flips; f++) bytes[rng.int(bytes.length)] = rng.int(256)
    how = `${flips} bytes changed`
    payload = bytes
  } else if (kind === 7) {
    how = 'Firecracker 1.1 shape (no page_size) with an extra field'
    payload = Buffer.from(JSON.stringify([{base_host_virt_addr: base, size, offset: 0, gpa_start: 0, is_guest_memfd: rng.pick([true, 'yes', 7])}]))
  } else if (kind === 8) {
    how = 'a 2 MiB page size on a 4 KiB snapshot'
    payload = Buffer.from(JSON.stringify([region(base, size, 0, 2097152)]))
  } else if (kind === 9) {
    how = 'a region at an unaligned or kernel address'
    payload = Buffer.from(JSON.stringify([region(rng.pick([base + 1, 0xffff_8000_0000_0000, 0, PAGE]), size, 0)]))
  } else if (kind === 10) {
    how = 'a 64 KiB+ message'
    payload = Buffer.from(JSON.stringify([...valid, ...Array.from({length: 1200}, () => ({pad: 'y'.repeat(50)}))]))
  } else {
    how = 'a valid table sent twice in one message'
    payload = Buffer.from(JSON.stringify(valid).repeat(2))
  }
  // Mostly what a VMM sends (one initialised uffd), so that the message itself is what is tested.
  const fdCount = rng.pick([0, 1, 1, 1, 1, 1, 1, 2, 3, 5])
  const fds = Array.from({length: fdCount}, (_, k): FdKind => (k === 0 && rng.chance(0.7) ? 'uffd-negotiated' : rng.pick(FD_KINDS)))
  // A held case must stay incomplete: a first half that is whole JSON already (a table sent twice)
  // is a handshake the handler may take.
  const hold = rng.int(25) === 0 && !isJson(payload.subarray(0, payload.length >> 1))
  const split = !hold && rng.int(6) === 0 && payload.length > 1
  return {how: `${how}; fds [${fds.join(', ')}]${split ? '; in two parts' : ''}${hold ? '; first half only, held open' : ''}`, payload, fds, split, hold}
}

function isJson(bytes: Buffer): boolean {
  try {
    JSON.parse(bytes.toString())
    return true
  } catch {
    return false
  }
}

/** A uffd_msg record (32 bytes) of `event` with its first argument. */
function forgedRecord(event: number, arg: bigint): Buffer {
  const b = Buffer.alloc(32)
  b[0] = event
  b.writeBigUInt64LE(arg, 8)
  return b
}

/** The fds of a case, made in this process; `release` closes them and unmaps what was registered. */
export class CaseFds {
  readonly fds: number[] = []
  private readonly mappings: {address: number; length: number}[] = []

  constructor(kinds: readonly FdKind[], socketPath: string, scratch: string, index: number) {
    for (const [k, kind] of kinds.entries()) this.fds.push(this.make(kind, socketPath, path.join(scratch, `fifo-${index}-${k}`)))
  }

  private make(kind: FdKind, socketPath: string, fifo: string): number {
    switch (kind) {
      case 'uffd':
        return createUserfaultfd()
      case 'uffd-negotiated': {
        const fd = createUserfaultfd()
        uffdApi(fd, 0)
        return fd
      }
      case 'uffd-registered': {
        const fd = createUserfaultfd()
        uffdApi(fd, 0)
        const length = 16 * PAGE
        const address = mmapAnonymous(length)
        this.mappings.push({address, length})
        uffdRegister(fd, address, length, UFFDIO_REGISTER_MODE.MISSING)
        return fd
      }
      case 'dev-null':
        return fs.openSync('/dev/null', 'r')
      case 'fifo-forged':
      case 'fifo-empty': {
        fs.rmSync(fifo, {force: true})
        // Node has no mkfifo(3); coreutils' is on every machine this runs on.
        if (spawnSync('mkfifo', ['-m', '600', fifo]).status !== 0) throw new Error(`mkfifo ${fifo} failed`)
        // O_RDWR: opening a FIFO read-only would wait for a writer.
        const fd = fs.openSync(fifo, fs.constants.O_RDWR | fs.constants.O_NONBLOCK)
        fs.rmSync(fifo)
        if (kind === 'fifo-forged') writeAll(fd, Buffer.concat([forgedRecord(0x13, 3n), forgedRecord(0x15, 0x7f00_0000_0000n), forgedRecord(0x12, 0x7f00_0000_1000n), forgedRecord(0x13, 0n)]))
        return fd
      }
      case 'eventfd':
        return createEventfd()
      case 'socket':
        return connectUnix(socketPath)
      case 'directory':
        return fs.openSync(path.dirname(fifo), 'r')
      case 'regular-file':
        return fs.openSync(process.execPath, 'r')
    }
  }

  /** Closes this process's copies (the handler holds its own duplicates) and unmaps registered memory. */
  release(): void {
    for (const fd of this.fds.splice(0)) closeFd(fd)
    for (const m of this.mappings.splice(0)) munmap(m.address, m.length)
  }
}

/** A connection still open after its case: the handler must close it within `deadlineMs`. */
export interface Held {
  connection: number
  index: number
  how: string
  openedAt: number
}

/**
 * Plays one case against the handler listening at `socketPath`. Returns the connection if the case
 * holds it open; otherwise it is closed here (the handler sees the peer go).
 */
export async function playCase(c: HostileCase, index: number, socketPath: string, scratch: string): Promise<Held | undefined> {
  const connection = connectUnix(socketPath)
  const fds = new CaseFds(c.fds, socketPath, scratch, index)
  try {
    const first = c.split || c.hold ? c.payload.subarray(0, c.payload.length >> 1) : c.payload
    if (fds.fds.length > 0) unlessRefused(() => sendWithFds(connection, first.length > 0 ? first : Buffer.from(' '), fds.fds))
    else if (first.length > 0) unlessRefused(() => writeAll(connection, first))
    if (c.split) {
      await new Promise((resolve) => setTimeout(resolve, 5))
      unlessRefused(() => writeAll(connection, c.payload.subarray(first.length)))
    }
  } finally {
    fds.release()
  }
  if (c.hold) return {connection, index, how: c.how, openedAt: Date.now()}
  closeFd(connection)
  return undefined
}

/** Sends, unless the handler has already refused the message and closed the connection (EPIPE, ECONNRESET: its answer). */
function unlessRefused(send: () => void): void {
  try {
    send()
  } catch (error) {
    if (!/EPIPE|ECONNRESET/.test(String((error as Error).message))) throw error
  }
}

/** Whether the handler has closed its end of a held connection (without waiting). */
export function closedByHandler(connection: number): boolean {
  if ((poll([{fd: connection, events: POLLIN}], 0)[0] ?? 0) === 0) return false
  try {
    return readSome(connection, 65536, 0).length === 0
  } catch {
    return true
  }
}

/** Codes a refused handshake or a failed hostile client may end with; anything else is a bug. */
export const EXPECTED_CODES = new Set(['BAD_HANDSHAKE', 'TIMEOUT', 'UFFD', 'UNSUPPORTED_EVENT', 'FAULT_OUTSIDE_REGIONS'])

export interface SessionReport {
  cases: number
  /** Cases whose connection the handler held open past its deadline. */
  hangs: string[]
  /** Set if the handler exited before it was told to stop: the case after which it did. */
  handlerDied?: string
  /** Real VMs (fc_client, every byte checked) served between the cases, and those that failed. */
  vms: number
  vmFailures: string[]
  /** Exit code after SIGTERM (130 expected) and the handler's --json result. */
  exitCode: number | null
  result: {clients: {ended: string; error?: {code: string; message: string}}[]; rejected: {code: string; message: string}[]; error?: {code: string}}
  /** Codes in the result outside EXPECTED_CODES, with an example message each. */
  unexpectedCodes: Record<string, string>
  stderr: string
}

/**
 * Runs cases from..from+count of `seed` against one `uffd resume SNAPSHOT --serve --no-kill`
 * (the hostile peer is this process, which must not be killed), a real verifying client every
 * `vmEvery` cases, then SIGTERM. `--timeout` is `handshakeSeconds`.
 */
export async function runHostileSession(o: {uffdBin: string; fcClient: string; snapshot: string; image: string; size: number; dir: string; seed: number; from: number; count: number; vmEvery: number; handshakeSeconds: number}): Promise<SessionReport> {
  const socket = path.join(o.dir, 'serve.sock')
  const ready = path.join(o.dir, 'serve.ready')
  const handler = spawn(process.execPath, [o.uffdBin, 'resume', o.snapshot, '--socket', socket, '--ready-file', ready, '--serve', '--no-kill', '--json', '--timeout', String(o.handshakeSeconds)], {stdio: ['ignore', 'pipe', 'pipe']})
  let stdout = ''
  let stderr = ''
  handler.stdout.on('data', (d) => (stdout += d))
  handler.stderr.on('data', (d) => (stderr = (stderr + d).slice(-200_000)))
  const exited = new Promise<number | null>((resolve) => handler.on('close', (code) => resolve(code)))
  const report: SessionReport = {cases: 0, hangs: [], vms: 0, vmFailures: [], exitCode: null, result: {clients: [], rejected: []}, unexpectedCodes: {}, stderr: ''}
  const held: Held[] = []
  const deadlineMs = o.handshakeSeconds * 1000 + 5000
  const name = (index: number, how: string): string => `case ${index} (seed ${o.seed}): ${how}`
  try {
    for (let t = Date.now(); !fs.existsSync(ready); ) {
      if (handler.exitCode !== null || Date.now() - t > 30_000) throw new Error(`uffd resume did not get ready:\n${stderr}`)
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    for (let i = o.from; i < o.from + o.count; i++) {
      const c = hostileCase(o.seed, i, o.size)
      const h = await playCase(c, i, socket, o.dir)
      report.cases++
      if (h) held.push(h)
      if (handler.exitCode !== null) {
        report.handlerDied = name(i, c.how)
        break
      }
      for (let k = held.length - 1; k >= 0; k--) {
        const late = Date.now() - held[k].openedAt > deadlineMs
        if (!closedByHandler(held[k].connection) && !late) continue
        const [done] = held.splice(k, 1)
        if (late) report.hangs.push(name(done.index, done.how))
        closeFd(done.connection)
      }
      if ((i - o.from) % o.vmEvery === o.vmEvery - 1) {
        const vm = spawnSync(o.fcClient, ['--socket', socket, '--image', o.image, '--touch', 'random', '--seed', String(i), '--verify-all', '--timeout-ms', '20000'], {encoding: 'utf8', timeout: 30_000})
        report.vms++
        if (vm.status !== 0) report.vmFailures.push(`after ${name(i, c.how)}: exit ${vm.status} ${vm.stdout.trim()} ${vm.stderr.trim()}`)
      }
    }
    for (const t = Date.now(); held.length > 0 && Date.now() - t < deadlineMs; ) {
      for (let k = held.length - 1; k >= 0; k--) if (closedByHandler(held[k].connection)) closeFd(held.splice(k, 1)[0].connection)
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    for (const h of held.splice(0)) {
      report.hangs.push(name(h.index, h.how))
      closeFd(h.connection)
    }
    handler.kill('SIGTERM')
    const timer = setTimeout(() => handler.kill('SIGKILL'), 10_000)
    report.exitCode = await exited
    clearTimeout(timer)
    try {
      report.result = JSON.parse(stdout)
    } catch {
      report.result = {clients: [], rejected: [], error: {code: `no --json result: ${stdout.slice(0, 200)}`}}
    }
    for (const e of [...report.result.rejected, ...report.result.clients.flatMap((c) => (c.error ? [c.error] : [])), ...(report.result.error ? [report.result.error as {code: string; message?: string}] : [])]) {
      if (!EXPECTED_CODES.has(e.code)) report.unexpectedCodes[e.code] ??= (e as {message?: string}).message ?? ''
    }
    report.stderr = stderr
    return report
  } finally {
    for (const h of held) closeFd(h.connection)
    handler.kill('SIGKILL')
  }
}
