// End-to-end tests of `uffd snapshot`, `uffd stats` and `uffd verify` as a user scripts them: the
// built CLI runs as a real process, and what counts is its exit code, its stdout/--json and its
// stderr. Library-level round trips live in snapshot-roundtrip.test.ts; the codec's own checks in
// format-*.test.ts. Needs `npm run build` first (dist/ and native/build/).
import {type ChildProcess, spawn} from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {CHUNK_FLAG_SHARED, Codec, FOOTER_SIZE, INDEX_ENTRY_SIZE} from '../src/format/constants.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {type CliResult, isRoot, NATIVE, uffdAsync} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

const KiB = 1024
const MiB = 1024 * 1024
const PAGE = 4096

let dir: string
beforeAll(() => {
  dir = tempDir('uffd-cli-test-')
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

// ---------------------------------------------------------------------------------------------
// Running the CLI

/**
 * Runs the built CLI without blocking the event loop (so several can run at once, and a test can
 * watch the file system or signal a process meanwhile). At most MAX_PARALLEL run at a time.
 */
const MAX_PARALLEL = 4
/**
 * The environment of a user's shell: without vitest's NODE_ENV=test, which makes oclif look for
 * TypeScript sources (slow, and a warning on stderr).
 */
const CLI_ENV: NodeJS.ProcessEnv = Object.fromEntries(Object.entries(process.env).filter(([name]) => name !== 'NODE_ENV'))
let running = 0
const waiting: (() => void)[] = []

async function run(args: string[], options: {cwd?: string; onSpawn?: (child: ChildProcess) => void} = {}): Promise<CliResult> {
  while (running >= MAX_PARALLEL) await new Promise<void>((resolve) => waiting.push(resolve))
  running++
  try {
    return await uffdAsync(args, {cwd: options.cwd, env: CLI_ENV, onSpawn: options.onSpawn, timeoutMs: 60_000})
  } finally {
    running--
    waiting.shift()?.()
  }
}

/** A JavaScript stack trace line, which must never reach a user. */
const STACK_LINE = /^\s{4}at /m

function expectNoCrash(r: CliResult, what: string): void {
  expect(r.signal, `${what}: killed by a signal`).toBeNull()
  expect(r.stderr, `${what}: stack trace on stderr`).not.toMatch(STACK_LINE)
  expect(r.stdout, `${what}: stack trace on stdout`).not.toMatch(STACK_LINE)
}

/** Expects exit 1 and one clear line on stderr naming the file, the part and what is wrong. */
function expectFailure(r: CliResult, what: string, file: string, text: RegExp): void {
  expectNoCrash(r, what)
  expect(r.status, `${what}: exit code (stderr: ${r.stderr})`).toBe(1)
  expect(r.stderr, what).toContain(file)
  expect(r.stderr, what).toMatch(text)
}

/** Expects exit 1 and {"error":{code,message,exitCode:1}} on stdout. */
function expectJsonError(r: CliResult, what: string, code: string, file: string, text: RegExp): void {
  expectNoCrash(r, what)
  expect(r.status, `${what}: exit code`).toBe(1)
  expect(r.json, `${what}: stdout is not JSON: ${r.stdout}`).toBeDefined()
  expect(r.json.error, what).toMatchObject({code, exitCode: 1})
  expect(r.json.error.message, what).toContain(file)
  expect(r.json.error.message, what).toMatch(text)
}

function tmpFilesIn(d: string): string[] {
  return fs.readdirSync(d).filter((name) => name.endsWith('.tmp'))
}

function processState(pid: number): string {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3)
}

async function waitFor(what: string, condition: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

/** Pages of `image` (whole pages, the last one padded with zeros) that are all zero. */
function countZeroPages(image: Buffer): number {
  const zero = Buffer.alloc(PAGE)
  let n = 0
  for (let at = 0; at < image.length; at += PAGE) {
    const page = image.subarray(at, Math.min(image.length, at + PAGE))
    if (zero.compare(page, 0, page.length, 0, page.length) === 0) n++
  }
  return n
}

// ---------------------------------------------------------------------------------------------
// 1. Damaged files: clear errors, the right exit code and error code, never a crash or wrong data

describe('damaged and foreign files', () => {
  const SIZE = 4 * MiB + 12345
  const CHUNK = 64 * KiB
  let image: Buffer
  let rawPath: string
  let good: Buffer
  let goodPath: string
  let headerSize: number
  let chunkCount: number
  let footer: SnapshotReader['footer']
  /** A chunk stored on its own (not shared with another), and where its stored bytes lie. */
  let victim: {chunk: number; dataOffset: number; storedLength: number}

  beforeAll(async () => {
    image = makeImage('mixed', SIZE, 5)
    rawPath = path.join(dir, 'damage.raw')
    fs.writeFileSync(rawPath, image)
    goodPath = path.join(dir, 'damage-good.uffd')
    const r = await run(['snapshot', '--mem-file', rawPath, '-o', goodPath, '--chunk-size', '64K', '--json'])
    expect(r.status, r.stderr).toBe(0)
    good = fs.readFileSync(goodPath)
    const reader = SnapshotReader.open(goodPath)
    try {
      headerSize = reader.header.headerSize
      footer = reader.footer
      chunkCount = reader.geometry.chunkCount
      const c = [...reader.index].findIndex((e, i) => i >= 3 && e.codec !== Codec.None && (e.flags & CHUNK_FLAG_SHARED) === 0)
      expect(c).toBeGreaterThanOrEqual(3)
      victim = {chunk: c, dataOffset: reader.index.at(c).dataOffset, storedLength: reader.index.at(c).storedLength}
    } finally {
      reader.close()
    }
    expect(chunkCount).toBe(Math.ceil(SIZE / CHUNK))
  })

  /** A copy of the good snapshot with one byte flipped. */
  const flipped = (at: number): Buffer => {
    expect(at).toBeLessThan(good.length)
    const b = Buffer.from(good)
    b[at] ^= 0x40
    return b
  }
  /** Rewrites the header CRC after a deliberate edit, to reach the checks behind it. */
  const resealHeader = (b: Buffer): Buffer => {
    b.writeUInt32LE(crc32(b.subarray(0, headerSize - 8)), headerSize - 8)
    return b
  }
  /** Rewrites the index CRC in the footer and the footer's CRC after an edit of the index. */
  const resealIndex = (b: Buffer): Buffer => {
    const footerAt = b.length - FOOTER_SIZE
    b.writeUInt32LE(crc32(b.subarray(footer.indexOffset, footer.indexOffset + chunkCount * INDEX_ENTRY_SIZE)), footerAt + 40)
    b.writeUInt32LE(crc32(b.subarray(footerAt, footerAt + 60)), footerAt + 60)
    return b
  }

  interface Variant {
    name: string
    bytes: () => Buffer
    code: 'CORRUPT' | 'TRUNCATED' | 'NOT_A_SNAPSHOT' | 'UNSUPPORTED_VERSION'
    /** The part of the file and what is wrong, as the message must say it. */
    text: RegExp
  }

  const variants: Variant[] = [
    {name: 'flipped byte in the fixed header (logical size)', bytes: () => flipped(40), code: 'CORRUPT', text: /: header: checksum mismatch/},
    {name: 'flipped byte in the region table', bytes: () => flipped(64 + 16), code: 'CORRUPT', text: /: header: checksum mismatch/},
    {
      name: 'flipped byte in the metadata',
      bytes: () => flipped(good.subarray(0, headerSize).indexOf('"createdAt"') + 3),
      code: 'CORRUPT',
      text: /: header: checksum mismatch/,
    },
    {name: 'flipped byte in the index', bytes: () => flipped(footer.indexOffset + 3 * INDEX_ENTRY_SIZE + 16), code: 'CORRUPT', text: /: index: checksum mismatch/},
    {
      name: 'index entry pointing past the data section (checksums resealed)',
      bytes: () => {
        const b = Buffer.from(good)
        b.writeBigUInt64LE(BigInt(footer.indexOffset - 10), footer.indexOffset + victim.chunk * INDEX_ENTRY_SIZE)
        return resealIndex(b)
      },
      code: 'CORRUPT',
      text: /: index entry \d+: stored bytes .* lie outside the data section/,
    },
    {name: 'flipped byte in the zero map', bytes: () => flipped(footer.zeroMapOffset + 2), code: 'CORRUPT', text: /: zero map: checksum mismatch/},
    {name: 'flipped byte in the footer', bytes: () => flipped(good.length - FOOTER_SIZE + 10), code: 'CORRUPT', text: /: footer: checksum mismatch/},
    {
      name: 'wrong magic',
      bytes: () => {
        const b = Buffer.from(good)
        b.write('QEMUSNAP', 0, 'latin1')
        return b
      },
      code: 'NOT_A_SNAPSHOT',
      text: /: header: not a uffd snapshot/,
    },
    {
      name: 'future major version (header CRC resealed)',
      bytes: () => {
        const b = Buffer.from(good)
        b.writeUInt16LE(2, 8)
        return resealHeader(b)
      },
      code: 'UNSUPPORTED_VERSION',
      text: /: header: format version 2\.0 is not supported/,
    },
    {
      name: 'unknown incompatible feature bit (header CRC resealed)',
      bytes: () => {
        const b = Buffer.from(good)
        b.writeBigUInt64LE(1n << 9n, 16)
        return resealHeader(b)
      },
      code: 'UNSUPPORTED_VERSION',
      text: /: header: .*incompatible features.*0x200/,
    },
    {name: 'truncated to half', bytes: () => good.subarray(0, good.length >> 1), code: 'TRUNCATED', text: /: footer: .*truncated/},
    {name: 'truncated by 1 byte', bytes: () => good.subarray(0, good.length - 1), code: 'TRUNCATED', text: /: footer: .*truncated/},
    {name: 'truncated after the header', bytes: () => good.subarray(0, headerSize), code: 'TRUNCATED', text: /: footer: file of \d+ bytes ends before its footer/},
    {name: 'truncated inside the header', bytes: () => good.subarray(0, 100), code: 'TRUNCATED', text: /: header: header of \d+ bytes runs past the end of the 100-byte file/},
    {name: 'truncated inside the fixed header', bytes: () => good.subarray(0, 40), code: 'TRUNCATED', text: /: header: file is 40 bytes, too short/},
    {name: 'empty file', bytes: () => Buffer.alloc(0), code: 'TRUNCATED', text: /: header: file is 0 bytes, too short/},
    {name: 'a raw memory image, not a snapshot', bytes: () => image, code: 'NOT_A_SNAPSHOT', text: /: header: not a uffd snapshot/},
    {name: 'a short text file', bytes: () => Buffer.from('hello\n'), code: 'NOT_A_SNAPSHOT', text: /: header: not a uffd snapshot/},
  ]

  // Each variant goes through both commands, one in words and one under --json, alternating which
  // (both commands open files through the same reader and report through the same error path;
  // four CLI runs per variant would double this file's runtime for little more coverage).
  it.concurrent.each(variants.map((v, i) => [v.name, v, i] as const))('%s', async (_name, v, i) => {
    const file = path.join(dir, `damaged-${i}.uffd`)
    fs.writeFileSync(file, v.bytes())
    const [human, json] = i % 2 === 0 ? (['stats', 'verify'] as const) : (['verify', 'stats'] as const)
    const [r, rJson] = await Promise.all([run([human, file]), run([json, file, '--json'])])
    expectFailure(r, `${v.name}: ${human}`, file, v.text)
    expect(r.stdout, `${v.name}: ${human} printed data`).toBe('')
    expect(r.stderr.trimEnd().split('\n'), `${v.name}: ${human}: one line`).toHaveLength(1)
    expect(r.stderr).toMatch(new RegExp(`^uffd ${human}: `))
    expectJsonError(rJson, `${v.name}: ${json} --json`, v.code, file, v.text)
  })

  it('a flipped byte in a chunk\'s stored data fails exactly that chunk; the others still verify', async () => {
    const file = path.join(dir, 'damaged-data.uffd')
    fs.writeFileSync(file, flipped(victim.dataOffset + (victim.storedLength >> 1)))
    const [verify, verifyJson, stats] = await Promise.all([run(['verify', file]), run(['verify', file, '--json']), run(['stats', file, '--json'])])
    const chunkError = new RegExp(`: chunk ${victim.chunk}: (checksum mismatch|zstd data does not decode|lz4 data does not decode)`)

    expectFailure(verify, 'verify', file, chunkError)
    expect(verify.stderr).toMatch(/FAILED/)
    expect(verify.stdout).not.toMatch(/OK/)

    expectNoCrash(verifyJson, 'verify --json')
    expect(verifyJson.status).toBe(1)
    expect(verifyJson.json).toMatchObject({ok: false, chunksChecked: chunkCount - 1})
    expect(verifyJson.json.errors).toHaveLength(1)
    expect(verifyJson.json.errors[0]).toContain(file)
    expect(verifyJson.json.errors[0]).toMatch(chunkError)
    expect(verifyJson.json.bytesChecked).toBe(SIZE - CHUNK)

    // stats reads only the header, index and zero map (it is O(index), for any size of snapshot);
    // what it shows of a file with bad chunk data is still right, and verify is what decodes.
    expectNoCrash(stats, 'stats --json')
    expect(stats.status).toBe(0)
    expect(stats.json).toMatchObject({logicalSize: SIZE, chunkCount})
  })

  it('a damaged packed working-set table is refused with the part named; a damaged block fails verify only', async () => {
    // A working set of every 5th page, in reverse, attached (packed) to a copy of the good snapshot.
    const reader = SnapshotReader.open(goodPath)
    const identity = {logicalSize: reader.geometry.logicalSize, pageSize: reader.geometry.pageSize, headerCrc: reader.header.headerCrc}
    const pages = [...Array(reader.geometry.pageCount).keys()].filter((p) => p % 5 === 0).reverse()
    reader.close()
    const wsFile = path.join(dir, 'damage.ws')
    fs.writeFileSync(wsFile, JSON.stringify({kind: 'uffd-working-set', version: 1, snapshot: identity, runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}))
    const packedPath = path.join(dir, 'damage-packed.uffd')
    const attach = await run(['working-set', 'attach', goodPath, wsFile, '-o', packedPath, '--json'])
    expect(attach.status, attach.stderr).toBe(0)
    const packed = fs.readFileSync(packedPath)
    const ok = await run(['verify', packedPath, '--against', rawPath])
    expect(ok.status, ok.stderr).toBe(0)
    const location = (await run(['stats', packedPath, '--json'])).json.metadata.workingSet.packed

    // The table (block entries and page list) is checked when the file is opened: every command
    // refuses the file, one line, naming the part.
    const badTable = path.join(dir, 'damage-packed-table.uffd')
    const t = Buffer.from(packed)
    t[location.offset + location.length - 2] ^= 0x10
    fs.writeFileSync(badTable, t)
    const [stats, verify] = await Promise.all([run(['stats', badTable]), run(['verify', badTable, '--json'])])
    expectFailure(stats, 'stats of a damaged packed table', badTable, /packed working set: checksum mismatch/)
    expectJsonError(verify, 'verify --json of a damaged packed table', 'CORRUPT', badTable, /packed working set: checksum mismatch/)

    // A block's stored bytes are checked when read: verify names the block, stats still works.
    const badBlock = path.join(dir, 'damage-packed-block.uffd')
    const b = Buffer.from(packed)
    b[location.offset - 3] ^= 0x10
    fs.writeFileSync(badBlock, b)
    const [v2, s2] = await Promise.all([run(['verify', badBlock]), run(['stats', badBlock, '--json'])])
    expectFailure(v2, 'verify of a damaged packed block', badBlock, /packed working set block \d+: (checksum mismatch|zstd data does not decode)/)
    expect(s2.status, s2.stderr).toBe(0)
    expect(s2.json.workingSet.packed.pages).toBe(pages.length)
  })

  it('a missing file and a directory are clear errors too', async () => {
    const missing = path.join(dir, 'no-such.uffd')
    const [stats, verify, statsDir] = await Promise.all([run(['stats', missing]), run(['verify', missing, '--json']), run(['stats', dir])])
    expectFailure(stats, 'stats missing', missing, /no such file/i)
    expectNoCrash(verify, 'verify missing')
    expect(verify.status).toBe(1)
    expect(verify.json.error).toMatchObject({code: 'ENOENT', exitCode: 1})
    expectFailure(statsDir, 'stats dir', dir, /not a regular file/)
  })

  // -------------------------------------------------------------------------------------------
  // 2. verify --against RAW

  describe('verify --against', () => {
    it('passes on the image the snapshot was made from', async () => {
      const [human, json] = await Promise.all([run(['verify', goodPath, '--against', rawPath]), run(['verify', goodPath, '--against', rawPath, '--json'])])
      expectNoCrash(human, 'verify --against')
      expect(human.status, human.stderr).toBe(0)
      expect(human.stdout).toMatch(new RegExp(`OK, ${chunkCount} chunks.*identical to ${rawPath}`))
      expect(json.status).toBe(0)
      expect(json.json).toMatchObject({ok: true, chunksChecked: chunkCount, bytesChecked: SIZE, errors: [], against: {mismatchedPages: 0, firstMismatchOffset: null}})
    })

    it('reports the exact first differing byte of a raw file with one changed byte', async () => {
      // One change in a page with data, one in a page the snapshot holds as a zero page.
      const zeroPage = [...Array(Math.floor(SIZE / PAGE)).keys()].find((p) => p > 300 && image.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === 0))!
      const dataPage = [...Array(Math.floor(SIZE / PAGE)).keys()].find((p) => p > 500 && image.subarray(p * PAGE, (p + 1) * PAGE).some((b) => b !== 0))!
      const cases = [
        {name: 'data page', offset: dataPage * PAGE + 1234},
        {name: 'zero page', offset: zeroPage * PAGE + 4095},
      ]
      await Promise.all(
        cases.map(async ({name, offset}) => {
          const changed = Buffer.from(image)
          changed[offset] ^= 0x01
          const rawChanged = path.join(dir, `changed-${name.replace(' ', '-')}.raw`)
          fs.writeFileSync(rawChanged, changed)
          const [human, json] = await Promise.all([run(['verify', goodPath, '--against', rawChanged]), run(['verify', goodPath, '--against', rawChanged, '--json'])])
          expectFailure(human, `${name}: verify --against`, rawChanged, new RegExp(`1 pages differ from .*; first difference at byte ${offset}\\b`))
          expect(human.stderr).toMatch(/FAILED/)
          expectNoCrash(json, `${name}: verify --against --json`)
          expect(json.status).toBe(1)
          // The snapshot itself is fine: every chunk decoded and checked.
          expect(json.json).toMatchObject({ok: false, chunksChecked: chunkCount, against: {file: rawChanged, mismatchedPages: 1, firstMismatchOffset: offset}})
        }),
      )
    })

    it('fails on a raw file of a different size', async () => {
      const longer = path.join(dir, 'longer.raw')
      fs.writeFileSync(longer, Buffer.concat([image, Buffer.alloc(PAGE)]))
      const shorter = path.join(dir, 'shorter.raw')
      fs.writeFileSync(shorter, image.subarray(0, SIZE - 1))
      const results = await Promise.all([
        run(['verify', goodPath, '--against', longer]),
        run(['verify', goodPath, '--against', shorter, '--json']),
      ])
      expectFailure(results[0], 'longer', longer, new RegExp(`${longer} is ${SIZE + PAGE} bytes, the snapshot image is ${SIZE}`))
      expectNoCrash(results[1], 'shorter')
      expect(results[1].status).toBe(1)
      expect(results[1].json.ok).toBe(false)
      expect(results[1].json.errors.join('\n')).toContain(`${shorter} is ${SIZE - 1} bytes, the snapshot image is ${SIZE}`)
    })
  })
})

// ---------------------------------------------------------------------------------------------
// 3. snapshot: output, overwriting, usage errors, regions, Ctrl-C

describe('snapshot --mem-file', () => {
  const SIZE = 3 * MiB + 5000
  let image: Buffer
  let rawPath: string
  let ux: string

  beforeAll(() => {
    ux = path.join(dir, 'ux')
    fs.mkdirSync(ux)
    image = makeImage('mixed', SIZE, 9)
    rawPath = path.join(ux, 'guest.mem')
    fs.writeFileSync(rawPath, image)
  })

  it('--json reports the sizes, ratio, zero pages, chunks and codecs of what it wrote', async () => {
    const out = path.join(ux, 'json.uffd')
    const r = await run(['snapshot', '--mem-file', rawPath, '-o', out, '--chunk-size', '128K', '--json'])
    expectNoCrash(r, 'snapshot --json')
    expect(r.status, r.stderr).toBe(0)
    const s = r.json
    const fileSize = fs.statSync(out).size
    expect(s).toMatchObject({path: out, logicalSize: SIZE, fileSize, chunkCount: Math.ceil(SIZE / (128 * KiB)), chunkSize: 128 * KiB, pageCount: Math.ceil(SIZE / PAGE)})
    expect(s.zeroPages).toBe(countZeroPages(image))
    expect(s.ratio).toBeCloseTo(SIZE / fileSize, 6)
    expect(s.ratio).toBeGreaterThan(1)
    const codecs = s.codecs as Record<string, {chunks: number; payloadBytes: number; storedBytes: number}>
    expect(Object.keys(codecs).every((c) => ['zstd', 'raw', 'none'].includes(c))).toBe(true)
    expect(codecs.zstd.chunks).toBeGreaterThan(0)
    expect(Object.values(codecs).reduce((n, c) => n + c.chunks, 0)).toBe(s.chunkCount)
    expect(Object.values(codecs).reduce((n, c) => n + c.payloadBytes, 0)).toBe((Math.ceil(SIZE / PAGE) - s.zeroPages) * PAGE)
    // Nothing but the JSON document on stdout, nothing on stderr.
    expect(r.stderr).toBe('')
    expect(tmpFilesIn(ux)).toEqual([])

    // stats agrees, in JSON and in words.
    const [stats, human] = await Promise.all([run(['stats', out, '--json']), run(['stats', out])])
    expect(stats.status).toBe(0)
    expect(stats.json).toMatchObject({logicalSize: SIZE, fileSize, zeroPages: s.zeroPages, chunkCount: s.chunkCount})
    expect(stats.json.ratio).toBeCloseTo(s.ratio, 6)
    expect(human.status).toBe(0)
    expect(human.stdout).toMatch(new RegExp(`ratio ${s.ratio.toFixed(2)}x`))
    expect(human.stdout).toMatch(new RegExp(`zero pages\\s+${s.zeroPages} \\(\\d+\\.\\d%`))
    expect(human.stdout).toContain(`${SIZE} bytes`)
  })

  it('refuses to overwrite an existing output without --force, and replaces it with --force', async () => {
    const out = path.join(ux, 'existing.uffd')
    fs.writeFileSync(out, 'precious data\n')
    const before = fs.statSync(out)
    const [refused, refusedJson] = await Promise.all([
      run(['snapshot', '--mem-file', rawPath, '-o', out]),
      run(['snapshot', '--mem-file', rawPath, '-o', out, '--json']),
    ])
    expectFailure(refused, 'no --force', out, /exists.*--force/)
    expect(refusedJson.status).toBe(1)
    expect(refusedJson.json.error).toMatchObject({exitCode: 1})
    expect(refusedJson.json.error.message).toMatch(/exists.*--force/)
    expect(fs.readFileSync(out, 'utf8')).toBe('precious data\n')
    expect(fs.statSync(out).mtimeMs).toBe(before.mtimeMs)
    expect(fs.statSync(out).ino).toBe(before.ino)

    const forced = await run(['snapshot', '--mem-file', rawPath, '-o', out, '--force'])
    expectNoCrash(forced, '--force')
    expect(forced.status, forced.stderr).toBe(0)
    expect(forced.stdout).toContain(out)
    const verify = await run(['verify', out, '--against', rawPath])
    expect(verify.status, verify.stderr).toBe(0)
    expect(tmpFilesIn(ux)).toEqual([])
  })

  it('usage errors exit 2 and write nothing', async () => {
    const out = path.join(ux, 'usage.uffd')
    const cases: [string, string[], RegExp][] = [
      ['both --mem-file and --pid', ['--mem-file', rawPath, '--pid', String(process.pid)], /--pid/],
      ['neither --mem-file nor --pid', [], /--mem-file.*--pid|--pid.*--mem-file/s],
      ['--chunk-size 3000', ['--mem-file', rawPath, '--chunk-size', '3000'], /--chunk-size.*power of two/],
      ['--chunk-size 8M', ['--mem-file', rawPath, '--chunk-size', '8M'], /--chunk-size.*4 MiB/],
      ['--level 99', ['--mem-file', rawPath, '--level', '99'], /--level/],
      ['--codec foo', ['--mem-file', rawPath, '--codec', 'foo'], /--codec.*zstd, lz4, raw/],
      ['--regions not whole pages', ['--mem-file', rawPath, '--regions', '1000,4096'], /--regions: 1000 is not a positive multiple/],
      ['--regions larger than the file', ['--mem-file', rawPath, '--regions', '2M,2M'], /--regions add up to more than/],
    ]
    // In words for all; under --json for one of each kind (oclif's own flag checks, a flag that
    // does not parse, a check of the command's).
    const withJson = new Set(['neither --mem-file nor --pid', '--level 99', '--chunk-size 8M'])
    const results = await Promise.all(
      cases.map(async ([name, args]) => ({
        human: await run(['snapshot', ...args, '-o', out]),
        json: withJson.has(name) ? await run(['snapshot', ...args, '-o', out, '--json']) : undefined,
      })),
    )
    for (const [i, [name, , text]] of cases.entries()) {
      const {human, json} = results[i]
      expectNoCrash(human, name)
      expect(human.status, `${name}: exit code (stderr: ${human.stderr})`).toBe(2)
      // oclif wraps usage errors to the terminal width, with a ' ›' margin.
      expect(human.stderr.replace(/\s*\n\s*(›\s*)?/g, ' '), name).toMatch(text)
      if (!json) continue
      expectNoCrash(json, `${name} --json`)
      expect(json.status, `${name} --json: exit code`).toBe(2)
      expect(json.json?.error, `${name} --json: ${json.stdout}`).toMatchObject({code: 'USAGE', exitCode: 2})
      expect(json.json.error.message, name).toMatch(text)
    }
    expect(results.filter((r) => r.json).length).toBe(withJson.size)
    expect(fs.existsSync(out)).toBe(false)
    expect(tmpFilesIn(ux)).toEqual([])
  })

  it('a missing mem file exits 1 with a clear message', async () => {
    const missing = path.join(ux, 'missing.mem')
    const out = path.join(ux, 'missing.uffd')
    const [human, json] = await Promise.all([run(['snapshot', '--mem-file', missing, '-o', out]), run(['snapshot', '--mem-file', missing, '-o', out, '--json'])])
    expectFailure(human, 'missing mem file', missing, /no such file/i)
    expect(human.stderr.trimEnd().split('\n')).toHaveLength(1)
    expectNoCrash(json, 'missing mem file --json')
    expect(json.status).toBe(1)
    expect(json.json.error).toMatchObject({code: 'ENOENT', exitCode: 1})
    expect(fs.existsSync(out)).toBe(false)
    expect(tmpFilesIn(ux)).toEqual([])
  })

  it('writes <image>.uffd in the current directory by default', async () => {
    const cwd = path.join(ux, 'cwd')
    fs.mkdirSync(cwd)
    fs.copyFileSync(rawPath, path.join(cwd, 'vm.mem'))
    const r = await run(['snapshot', '--mem-file', 'vm.mem'], {cwd})
    expectNoCrash(r, 'default output')
    expect(r.status, r.stderr).toBe(0)
    expect(r.stdout).toMatch(/^vm\.mem\.uffd: /)
    expect(fs.readdirSync(cwd).sort()).toEqual(['vm.mem', 'vm.mem.uffd'])
    const verify = await run(['verify', 'vm.mem.uffd', '--against', 'vm.mem'], {cwd})
    expect(verify.status, verify.stderr).toBe(0)
  })

  it('--regions with two sizes shows up as two guest memory regions in stats', async () => {
    const out = path.join(ux, 'regions.uffd')
    const r = await run(['snapshot', '--mem-file', rawPath, '-o', out, '--regions', '1M,2M'])
    expect(r.status, r.stderr).toBe(0)
    const stats = await run(['stats', out, '--json'])
    expect(stats.status).toBe(0)
    expect(stats.json.regions).toHaveLength(2)
    expect(stats.json.regions[0]).toMatchObject({kind: 'guest-memory', imageOffset: 0, size: MiB})
    expect(stats.json.regions[1]).toMatchObject({kind: 'guest-memory', imageOffset: MiB, size: 2 * MiB})
    expect(stats.json.metadata).toMatchObject({source: 'mem-file', sourcePath: rawPath, codec: 'zstd', level: 1})
  })

  it('Ctrl-C during a large snapshot exits 130 and leaves neither the output nor a temporary file', async () => {
    const big = path.join(dir, 'sigint')
    fs.mkdirSync(big)
    const raw = path.join(big, 'big.mem')
    // 512 MiB of random bytes: incompressible and without holes, so it takes seconds to snapshot.
    const fd = fs.openSync(raw, 'w')
    const block = Buffer.alloc(16 * MiB)
    for (let at = 0; at < 512 * MiB; at += block.length) fs.writeSync(fd, crypto.randomFillSync(block), 0, block.length, at)
    fs.closeSync(fd)
    const out = path.join(big, 'big.uffd')
    let child: ChildProcess | undefined
    const result = run(['snapshot', '--mem-file', raw, '-o', out], {onSpawn: (c) => (child = c)})
    try {
      // Interrupt it mid-way: once its temporary file holds some chunks.
      await waitFor('the temporary file to grow', () => tmpFilesIn(big).some((f) => (fs.statSync(path.join(big, f), {throwIfNoEntry: false})?.size ?? 0) > 16 * MiB))
      child!.kill('SIGINT')
      const r = await result
      expectNoCrash(r, 'SIGINT')
      expect(r.status, r.stderr).toBe(130)
      expect(r.stderr).toMatch(/interrupted/)
      expect(fs.readdirSync(big)).toEqual(['big.mem'])
    } finally {
      child?.kill('SIGKILL')
      await result.catch(() => {})
      fs.rmSync(big, {recursive: true, force: true})
    }
  })
})

// ---------------------------------------------------------------------------------------------
// 4. snapshot --pid of a process whose memory is known exactly (native/memory_pattern.c)

const pidSkip = process.platform !== 'linux' ? 'not Linux' : !isRoot() ? 'not root (reading /proc/PID/mem of another process needs ptrace access)' : undefined
if (pidSkip) console.warn(`test/snapshot-cli.test.ts: snapshot --pid tests skipped: ${pidSkip}`)

interface Pattern {
  child: ChildProcess
  pid: number
  address: number
  size: number
  seed: number
}

const M64 = (1n << 64n) - 1n

/** page_seed() of memory_pattern.c, as two 32-bit halves. */
function pageSeed(seed: number, page: number): [number, number] {
  let x = ((BigInt(seed) * 0x9e3779b97f4a7c15n) & M64) ^ ((BigInt(page + 1) * 0xbf58476d1ce4e5b9n) & M64)
  if (x === 0n) x = 1n
  return [Number(x & 0xffffffffn), Number(x >> 32n)]
}

/** fill_page() of memory_pattern.c: xorshift64 (13, 7, 17), one 64-bit word at a time. */
function fillPage(out: Buffer, seed: number, page: number): void {
  let [lo, hi] = pageSeed(seed, page)
  for (let i = 0; i < PAGE / 8; i++) {
    // x ^= x << 13
    hi = (hi ^ ((hi << 13) | (lo >>> 19))) >>> 0
    lo = (lo ^ (lo << 13)) >>> 0
    // x ^= x >> 7
    lo = (lo ^ ((lo >>> 7) | (hi << 25))) >>> 0
    hi = (hi ^ (hi >>> 7)) >>> 0
    // x ^= x << 17
    hi = (hi ^ ((hi << 17) | (lo >>> 15))) >>> 0
    lo = (lo ^ (lo << 17)) >>> 0
    out.writeUInt32LE(lo, i * 8)
    out.writeUInt32LE(hi, i * 8 + 4)
  }
}

const patternChildren = new Set<ChildProcess>()

/** Starts memory_pattern and reads its JSON line; it runs until its stdin closes (or it is killed). */
async function startPattern(mib: number, seed: number): Promise<Pattern> {
  const child = spawn(path.join(NATIVE, 'memory_pattern'), ['--mib', String(mib), '--seed', String(seed)], {stdio: ['pipe', 'pipe', 'inherit']})
  patternChildren.add(child)
  child.on('exit', () => patternChildren.delete(child))
  const line = await new Promise<string>((resolve, reject) => {
    let out = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d
      if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')))
    })
    child.on('error', reject)
    child.on('exit', (code) => reject(new Error(`memory_pattern exited with ${code} before printing its layout`)))
  })
  const info = JSON.parse(line) as {address: number; size: number; seed: number; pid: number}
  expect(info).toMatchObject({size: mib * MiB, seed, pid: child.pid})
  return {child, pid: info.pid, address: info.address, size: info.size, seed}
}

async function stopPattern(p: Pattern): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return
  const exited = new Promise((resolve) => p.child.once('exit', resolve))
  p.child.kill('SIGKILL')
  await exited
}

/**
 * Checks the snapshot holds the pattern's mapping byte for byte: the region at its address, every
 * pattern page equal to what memory_pattern.c wrote, every zero page (never touched, or zeroed)
 * in the zero map.
 */
function checkPattern(file: string, p: Pattern): void {
  const reader = SnapshotReader.open(file)
  try {
    const {geometry} = reader
    expect(reader.header.metadata).toMatchObject({source: 'process', pid: p.pid})
    expect(String(reader.header.metadata.command)).toContain('memory_pattern')
    const region = reader.header.regions.find((r) => r.address === p.address)
    expect(region, `no region at 0x${p.address.toString(16)}`).toBeDefined()
    expect(region!.size).toBeGreaterThanOrEqual(p.size)
    expect(region!.owner).toBe(p.pid)
    expect(region!.prot & 3).toBe(3)
    const pages = p.size / PAGE
    const firstPage = region!.imageOffset / PAGE
    const expected = Buffer.alloc(PAGE)
    const chunk = Buffer.alloc(geometry.chunkSize)
    let loaded = -1
    let wrong = 0
    for (let i = 0; i < pages; i++) {
      const page = firstPage + i
      const c = Math.floor((page * PAGE) / geometry.chunkSize)
      if (c !== loaded) {
        reader.readChunk(c, chunk)
        loaded = c
      }
      const at = page * PAGE - geometry.chunkStart(c)
      const actual = chunk.subarray(at, at + PAGE)
      const zero = i % 7 === 3 || i % 5 === 0
      if (zero) {
        if (!reader.zeroMap.isZero(page)) throw new Error(`page ${i} of the mapping should be in the zero map`)
        expected.fill(0)
      } else {
        fillPage(expected, p.seed, i)
        if (reader.zeroMap.isZero(page)) throw new Error(`page ${i} of the mapping holds data but is in the zero map`)
      }
      if (!actual.equals(expected)) wrong++
    }
    expect(wrong, 'pages that differ from the pattern').toBe(0)
  } finally {
    reader.close()
  }
}

describe.skipIf(pidSkip !== undefined)('snapshot --pid', () => {
  let pidDir: string
  beforeAll(() => {
    pidDir = path.join(dir, 'pid')
    fs.mkdirSync(pidDir)
  })
  afterAll(async () => {
    await Promise.all([...patternChildren].map((child) => stopPattern({child} as Pattern)))
  })

  it('captures a live process exactly and resumes it afterwards', async () => {
    const p = await startPattern(64, 11)
    try {
      const out = path.join(pidDir, 'live.uffd')
      const r = await run(['snapshot', '--pid', String(p.pid), '-o', out, '--json'])
      expectNoCrash(r, 'snapshot --pid')
      expect(r.status, r.stderr).toBe(0)
      expect(r.json).toMatchObject({path: out, source: `pid ${p.pid}`})
      expect(r.json.zeroPages).toBeGreaterThanOrEqual(Math.ceil((p.size / PAGE) * (1 - (6 / 7) * (4 / 5))) - 1)
      checkPattern(out, p)
      // Resumed, and alive.
      expect(processState(p.pid)).not.toBe('T')
      expect(p.child.exitCode).toBeNull()
      expect(() => process.kill(p.pid, 0)).not.toThrow()
      expect(tmpFilesIn(pidDir)).toEqual([])
    } finally {
      await stopPattern(p)
    }
  })

  it('--no-freeze reads the process while it runs; the default output is pid-<PID>.uffd', async () => {
    const p = await startPattern(16, 12)
    try {
      const r = await run(['snapshot', '--pid', String(p.pid), '--no-freeze'], {cwd: pidDir})
      expectNoCrash(r, '--no-freeze')
      expect(r.status, r.stderr).toBe(0)
      const out = path.join(pidDir, `pid-${p.pid}.uffd`)
      expect(fs.existsSync(out)).toBe(true)
      checkPattern(out, p)
      expect(processState(p.pid)).not.toBe('T')
    } finally {
      await stopPattern(p)
    }
  })

  it('a process stopped before the snapshot stays stopped', async () => {
    const p = await startPattern(16, 13)
    try {
      process.kill(p.pid, 'SIGSTOP')
      await waitFor('the process to stop', () => processState(p.pid) === 'T')
      const out = path.join(pidDir, 'stopped.uffd')
      const r = await run(['snapshot', '--pid', String(p.pid), '-o', out])
      expectNoCrash(r, 'stopped process')
      expect(r.status, r.stderr).toBe(0)
      expect(processState(p.pid)).toBe('T')
      checkPattern(out, p)
    } finally {
      await stopPattern(p)
    }
  })

  it('a pid with no process exits 1 with "no process with pid"', async () => {
    const pid = 1 << 30 // above any pid_max
    const out = path.join(pidDir, 'nobody.uffd')
    const [human, json] = await Promise.all([run(['snapshot', '--pid', String(pid), '-o', out]), run(['snapshot', '--pid', String(pid), '-o', out, '--json'])])
    expectNoCrash(human, 'missing pid')
    expect(human.status).toBe(1)
    expect(human.stderr).toMatch(new RegExp(`no process with pid ${pid}\\b`))
    expect(json.status).toBe(1)
    expect(json.json.error).toMatchObject({code: 'NO_SUCH_PROCESS', exitCode: 1})
    expect(fs.existsSync(out)).toBe(false)
    expect(tmpFilesIn(pidDir)).toEqual([])
  })

  describe('a large process', () => {
    let p: Pattern
    let bigDir: string
    beforeAll(async () => {
      p = await startPattern(256, 14)
      bigDir = path.join(pidDir, 'big')
      fs.mkdirSync(bigDir)
    })
    afterAll(async () => {
      if (p) await stopPattern(p)
    })

    it('Ctrl-C while it is frozen: exits 130, resumes it, leaves no files', async () => {
      const out = path.join(bigDir, 'interrupted.uffd')
      let cli: ChildProcess | undefined
      const result = run(['snapshot', '--pid', String(p.pid), '-o', out, '--json'], {onSpawn: (c) => (cli = c)})
      await waitFor('the snapshot to start', () => tmpFilesIn(bigDir).length > 0)
      expect(processState(p.pid)).toBe('T')
      cli!.kill('SIGINT')
      const r = await result
      expectNoCrash(r, 'SIGINT --pid')
      expect(r.status, r.stderr).toBe(130)
      expect(r.json?.error).toMatchObject({code: 'INTERRUPTED', exitCode: 130})
      expect(processState(p.pid)).not.toBe('T')
      expect(p.child.exitCode).toBeNull()
      expect(fs.readdirSync(bigDir)).toEqual([])
    })

    it('a process that exits during the snapshot gives a clear error and leaves no files', async () => {
      const out = path.join(bigDir, 'exited.uffd')
      let cli: ChildProcess | undefined
      const result = run(['snapshot', '--pid', String(p.pid), '-o', out, '--no-freeze', '--json'], {onSpawn: (c) => (cli = c)})
      // Deterministic: once the snapshot is under way, hold the CLI still (SIGSTOP), kill the
      // process and let the CLI go on, so the process is gone while its memory is still being read.
      await waitFor('the snapshot to start', () => tmpFilesIn(bigDir).length > 0)
      cli!.kill('SIGSTOP')
      try {
        await stopPattern(p)
      } finally {
        cli!.kill('SIGCONT')
      }
      const r = await result
      expectNoCrash(r, 'process exited')
      expect(r.status, r.stdout + r.stderr).toBe(1)
      expect(r.json?.error).toMatchObject({code: 'EXITED', exitCode: 1})
      expect(r.json.error.message).toMatch(new RegExp(`process ${p.pid} exited during the snapshot`))
      expect(fs.readdirSync(bigDir)).toEqual([])
    })
  })
})
