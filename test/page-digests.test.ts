// Page digests (docs/FORMAT.md, Page digests): the hash against its documented vectors and its
// JavaScript reference, the table, and end to end through the real CLI: layers compared by digest
// equal layers compared by decoding, a corrupt table is caught, squash/attach/cp carry it, and a
// real client resumes a layer over a digest base byte for byte.
import {spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {decodeDigestTable, DIGEST_TRAILER_BYTES, encodeDigestTable, expandDigestKey, PAGE_DIGEST_BYTES, pageDigestsJs} from '../src/format/page-digest.js'
import {type WorkingSetFile} from '../src/format/working-set.js'
import {workingSetIdentity} from '../src/snapshot/attached-set.js'
import {readFileDigests} from '../src/snapshot/page-digests.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {crc32} from '../src/sys/crc.js'
import {filePageDigests, nativeDigests, pageDigests, releaseFilePageDigests} from '../src/sys/digest.js'
import {filePageDigestsNative} from '../src/sys/libc.js'
import {isRoot, NATIVE, uffd, uffdAsync} from './helpers/cli.js'
import {makeImage, pseudoRandom, tempDir} from './helpers/images.js'

const PAGE = 4096
const hasPython = spawnSync('python3', ['-c', '']).status === 0
if (!hasPython) console.warn('page-digests: the shrinking-file test is skipped: python3 is not installed')
const KEY = Buffer.from(Array.from({length: 32}, (_, i) => i)).toString('hex')

function digestOf(page: Buffer, key = expandDigestKey(KEY)): string {
  const out = Buffer.alloc(PAGE_DIGEST_BYTES)
  pageDigests(page, 1, key, out)
  return out.toString('hex')
}

describe('page digest (NH-128)', () => {
  it('gives the vectors of docs/FORMAT.md, natively and in JavaScript', () => {
    const key = expandDigestKey(KEY)
    expect(key.length).toBe(1026)
    expect(key[0].toString(16).padStart(8, '0')).toBe('b1e62843')
    expect(key[1025].toString(16).padStart(8, '0')).toBe('e7e6d82b')
    const vectors: [Buffer, string][] = [
      [Buffer.alloc(PAGE), '3e30298ee786c052a7505b060c5307b8'],
      [Buffer.from(Array.from({length: PAGE}, (_, i) => i & 0xff)), '5634034dae04ad55772fa48c7dc3373d'],
      [Buffer.alloc(PAGE, 0xff), '66d2ea8fe984c052cc55cb740d5107b8'],
    ]
    for (const [page, expected] of vectors) {
      const js = Buffer.alloc(16)
      pageDigestsJs(page, 1, key, js)
      expect(js.toString('hex')).toBe(expected)
      expect(digestOf(page, key)).toBe(expected)
    }
  })

  it.skipIf(!nativeDigests)('native (vector and scalar paths) equals the JavaScript reference, one call for many pages', () => {
    fc.assert(
      fc.property(fc.integer({min: 1, max: 9}), fc.integer({min: 0, max: 2 ** 31}), fc.uint8Array({minLength: 32, maxLength: 32}), (count, seed, rawKey) => {
        const pages = pseudoRandom(count * PAGE, seed)
        // Words that overflow 2^32 when the key is added, and whose products overflow 2^64 when summed.
        pages.fill(0xff, 0, Math.min(pages.length, 1024))
        const key = expandDigestKey(Buffer.from(rawKey).toString('hex'))
        const js = Buffer.alloc(count * 16)
        const fast = Buffer.alloc(count * 16)
        const scalar = Buffer.alloc(count * 16)
        pageDigestsJs(pages, count, key, js)
        pageDigests(pages, count, key, fast)
        pageDigests(pages, count, key, scalar, undefined, true)
        expect(fast.equals(js)).toBe(true)
        expect(scalar.equals(js)).toBe(true)
        // Zero pages found in the same pass, by both paths.
        if (count > 1) pages.fill(0, PAGE, 2 * PAGE)
        const zero = new Uint8Array(count)
        const zeroScalar = new Uint8Array(count)
        pageDigests(pages, count, key, fast, zero)
        pageDigests(pages, count, key, scalar, zeroScalar, true)
        const expected = Array.from({length: count}, (_, p) => (pages.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === 0) ? 1 : 0))
        expect([...zero]).toEqual(expected)
        expect([...zeroScalar]).toEqual(expected)
        expect(fast.equals(scalar)).toBe(true)
      }),
      {numRuns: 40},
    )
  })

  it.skipIf(!nativeDigests)('digests pages where they lie in a file (mapped) as it does them in memory; a range past the end is refused', () => {
    const file = path.join(tempDir('uffd-digest-map-'), 'image')
    const pages = 300
    const bytes = pseudoRandom(pages * PAGE, 5)
    bytes.fill(0, 7 * PAGE, 9 * PAGE)
    fs.writeFileSync(file, bytes)
    const key = expandDigestKey(KEY)
    const fd = fs.openSync(file, 'r')
    try {
      const inMemory = Buffer.alloc(pages * 16)
      const zeroInMemory = new Uint8Array(pages)
      pageDigests(bytes, pages, key, inMemory, zeroInMemory)
      for (const [from, count] of [[0, pages], [7, 3], [299, 1], [100, 50]]) {
        const out = Buffer.alloc(count * 16)
        const zero = new Uint8Array(count)
        expect(filePageDigests(fd, from * PAGE, count, key, out, zero)).toBe(true)
        expect(out.equals(inMemory.subarray(from * 16, (from + count) * 16))).toBe(true)
        expect([...zero]).toEqual([...zeroInMemory.subarray(from, from + count)])
      }
      // Past the end, or not page-aligned: not done (the caller reads, and meets the error there).
      expect(filePageDigests(fd, 299 * PAGE, 2, key, Buffer.alloc(32), new Uint8Array(2))).toBe(false)
      expect(filePageDigests(fd, 100, 1, key, Buffer.alloc(16), new Uint8Array(1))).toBe(false)
    } finally {
      fs.closeSync(fd)
    }
    // Another file under the same descriptor number is mapped anew, not read through the old mapping.
    const other = pseudoRandom(pages * PAGE, 6)
    fs.writeFileSync(`${file}.other`, other)
    const again = fs.openSync(`${file}.other`, 'r')
    try {
      expect(again).toBe(fd)
      const expected = Buffer.alloc(pages * 16)
      pageDigests(other, pages, key, expected)
      const out = Buffer.alloc(pages * 16)
      expect(filePageDigests(again, 0, pages, key, out, new Uint8Array(pages))).toBe(true)
      expect(out.equals(expected)).toBe(true)
    } finally {
      fs.closeSync(again)
      releaseFilePageDigests()
    }
  })

  it.skipIf(!nativeDigests || !hasPython)('a file shrinking while it is digested through its mapping fails the call (SIGBUS caught), not the process', {timeout: 30_000}, async () => {
    const file = path.join(tempDir('uffd-digest-shrink-'), 'image')
    const pages = 16384
    fs.writeFileSync(file, pseudoRandom(pages * PAGE, 9))
    // Another process cuts the file to one page every 2 ms and restores its length at once: a call
    // finding it whole (fstat) then loses its pages while it hashes them.
    const cutter = spawn('python3', ['-c', `import os, time\nfd = os.open(${JSON.stringify(file)}, os.O_RDWR)\nwhile True:\n  time.sleep(0.002)\n  os.ftruncate(fd, 4096)\n  os.ftruncate(fd, ${pages * PAGE})\n`], {stdio: 'ignore'})
    const key = expandDigestKey(KEY)
    const fd = fs.openSync(file, 'r')
    const codes = new Map<number, number>()
    try {
      await new Promise((resolve) => setTimeout(resolve, 200))
      const out = Buffer.alloc(pages * 16)
      const zero = new Uint8Array(pages)
      // Until the race is met (a few hundred calls, usually), for at most 15 s.
      for (const until = Date.now() + 15_000; !codes.has(-14) && Date.now() < until; ) {
        const code = filePageDigestsNative!(fd, 0, pages, key, out, zero)
        codes.set(code, (codes.get(code) ?? 0) + 1)
      }
    } finally {
      cutter.kill('SIGKILL')
      fs.closeSync(fd)
      releaseFilePageDigests()
    }
    // -EFAULT (14): the mapping lost its pages under the hash; -ERANGE (34): short when checked; 0: whole throughout.
    expect([...codes.keys()].every((c) => [0, -14, -34].includes(c)), JSON.stringify([...codes])).toBe(true)
    expect(codes.get(-14) ?? 0, JSON.stringify([...codes])).toBeGreaterThan(0)
  })

  it('changes when any single byte of the page changes', () => {
    const key = expandDigestKey(KEY)
    fc.assert(
      fc.property(fc.integer({min: 0, max: 2 ** 31}), fc.integer({min: 0, max: PAGE - 1}), fc.integer({min: 1, max: 255}), fc.boolean(), (seed, at, xor, zero) => {
        const page = zero ? Buffer.alloc(PAGE) : pseudoRandom(PAGE, seed)
        const before = digestOf(page, key)
        page[at] ^= xor
        expect(digestOf(page, key)).not.toBe(before)
      }),
      {numRuns: 300},
    )
  })

  it('depends on the key', () => {
    const page = pseudoRandom(PAGE, 9)
    expect(digestOf(page, expandDigestKey('11'.repeat(32)))).not.toBe(digestOf(page))
  })
})

describe('page digest table', () => {
  it('round-trips, and refuses a changed byte, a wrong count or a wrong length', () => {
    const rows = pseudoRandom(5 * PAGE_DIGEST_BYTES, 3)
    const table = encodeDigestTable(rows, crc32)
    expect(table.length).toBe(5 * PAGE_DIGEST_BYTES + DIGEST_TRAILER_BYTES)
    expect(decodeDigestTable(table, 5, crc32).equals(rows)).toBe(true)
    expect(() => decodeDigestTable(table, 4, crc32)).toThrow(/cannot hold 4 rows/)
    for (const at of [0, 40, table.length - 8, table.length - 1]) {
      const bad = Buffer.from(table)
      bad[at] ^= 1
      expect(() => decodeDigestTable(bad, 5, crc32)).toThrow(/page digest table.*checksum mismatch/)
    }
  })
})

// --- end to end -----------------------------------------------------------------------------

const SIZE = 8 * 1024 * 1024
const PAGES = SIZE / PAGE
let dir: string
const at = (name: string): string => path.join(dir, name)

function ok(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

/** `image` with single pages changed every `stride` pages, a changed cluster, a zeroed run and a zero page made data. */
function changed(image: Buffer, seed: number, stride: number, cluster: number): Buffer {
  const out = Buffer.from(image)
  const fresh = pseudoRandom(SIZE, seed)
  for (let p = seed % stride; p < PAGES; p += stride) out[p * PAGE + ((p * 37) % PAGE)] ^= 0x5a
  fresh.copy(out, cluster * PAGE, cluster * PAGE, (cluster + 48) * PAGE)
  out.fill(0, (cluster + 100) * PAGE, (cluster + 108) * PAGE)
  return out
}

/** A Firecracker-style Diff of `to` against `from`: only the pages that differ, as data; holes elsewhere. */
function writeDiff(file: string, from: Buffer, to: Buffer): void {
  const fd = fs.openSync(file, 'w')
  try {
    fs.ftruncateSync(fd, to.length)
    for (let p = 0; p < PAGES; p++) {
      const a = from.subarray(p * PAGE, (p + 1) * PAGE)
      const b = to.subarray(p * PAGE, (p + 1) * PAGE)
      if (!a.equals(b)) fs.writeSync(fd, b, 0, PAGE, p * PAGE)
    }
  } finally {
    fs.closeSync(fd)
  }
}

/** What a layer file is, whatever its parent's bytes: its pages and runs (the chain resolves through them). */
function layerShape(file: string): {pages: number[]; runs: string} {
  const r = SnapshotReader.open(file)
  try {
    return {pages: [...r.layer!.set.pages], runs: JSON.stringify(r.layer!.runs)}
  } finally {
    r.close()
  }
}

beforeAll(() => {
  dir = tempDir('uffd-digests-')
  const base = makeImage('mixed', SIZE, 11)
  fs.writeFileSync(at('base.raw'), base)
  const scattered = changed(base, 3, 29, 300)
  fs.writeFileSync(at('scattered.raw'), scattered)
  // Clustered: whole runs changed, nothing scattered.
  const clustered = Buffer.from(base)
  pseudoRandom(64 * PAGE, 5).copy(clustered, 900 * PAGE)
  pseudoRandom(64 * PAGE, 6).copy(clustered, 1500 * PAGE)
  fs.writeFileSync(at('clustered.raw'), clustered)
  writeDiff(at('scattered.diff'), base, scattered)
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd')])
  // The same memory without digests: the same chunks, so the same identity (layers over either resolve alike).
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('old.uffd'), '--no-page-digests'])
})

afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe('snapshots and layers with page digests', () => {
  it('a snapshot stores one row per data page; verify checks every row', () => {
    const r = SnapshotReader.open(at('base.uffd'))
    const zeros = r.zeroMap.countZero(0, r.geometry.pageCount)
    const table = readFileDigests(r)!
    expect(table.rows.length).toBe((PAGES - zeros) * PAGE_DIGEST_BYTES)
    expect(table.offset + table.length).toBe(r.footer.indexOffset)
    r.close()
    const v = ok(['verify', at('base.uffd'), '--against', at('base.raw')])
    expect(v.pageDigestsChecked).toBe(PAGES - zeros)
    expect(SnapshotReader.open(at('old.uffd')).header.metadata.pageDigests).toBeUndefined()
    // stats shows the table without reading it; a file without one shows none.
    const s = ok(['stats', at('base.uffd')])
    expect(s.pageDigests).toEqual({rows: PAGES - zeros, bytes: table.length})
    expect(ok(['stats', at('old.uffd')]).pageDigests).toBeUndefined()
  })

  for (const [name, input, diff] of [
    ['scattered', 'scattered.raw', false],
    ['clustered', 'clustered.raw', false],
    ['a --diff file', 'scattered.diff', true],
  ] as const) {
    it(`compares by digest to the same layer as decoding does (${name})`, () => {
      const flags = ['--mem-file', at(input), ...(diff ? ['--diff'] : [])]
      const byDigest = ok(['snapshot', ...flags, '--parent', at('base.uffd'), '-o', at(`${name}-d.uffd`)])
      const byDecode = ok(['snapshot', ...flags, '--parent', at('old.uffd'), '-o', at(`${name}-o.uffd`)])
      expect(byDigest.compared).toBe('digests')
      expect(byDecode.compared).toBe('decoded')
      expect(byDigest.changedPages).toBeGreaterThan(0)
      expect(byDigest.changedPages).toBe(byDecode.changedPages)
      expect(byDigest.zeroedPages).toBe(byDecode.zeroedPages)
      expect(layerShape(at(`${name}-d.uffd`))).toEqual(layerShape(at(`${name}-o.uffd`)))
      // Its own table: a row per stored page; none over a parent without digests.
      expect(byDigest.pageDigestBytes).toBe(byDigest.storedPages * PAGE_DIGEST_BYTES + DIGEST_TRAILER_BYTES)
      expect(byDecode.pageDigestBytes).toBe(0)
      const raw = diff ? 'scattered.raw' : input
      const v = ok(['verify', at(`${name}-d.uffd`), '--against', at(raw)])
      expect(v.pageDigestsChecked).toBeGreaterThan(byDigest.storedPages)
      ok(['verify', at(`${name}-o.uffd`), '--against', at(raw)])
    })
  }

  it('a large image is compared in worker threads, through mappings of the file, to the same layer as decoding gives: sparse holes over data, a partial last page', () => {
    // More data than the writer compares on its own thread (64 MiB): compare workers, each
    // digesting its range of the file through a mapping.
    const big = path.join(dir, 'big')
    fs.mkdirSync(big, {recursive: true})
    // 80 MiB and 100 bytes: the last page is partial (and changed).
    const size = 80 * 1024 * 1024 + 100
    const base = Buffer.concat([makeImage('mixed', size - 100, 21), pseudoRandom(100, 22)])
    fs.writeFileSync(path.join(big, 'base.raw'), base)
    ok(['snapshot', '--mem-file', path.join(big, 'base.raw'), '-o', path.join(big, 'base.uffd')])
    ok(['snapshot', '--mem-file', path.join(big, 'base.raw'), '-o', path.join(big, 'old.uffd'), '--no-page-digests'])
    // The new image: scattered changes, and holes punched where the base has data (a sparse file
    // written with gaps: those pages read as zero, and became zero).
    const next = Buffer.from(base)
    const pages = Math.ceil(size / PAGE)
    for (let p = 3; p < pages; p += 97) next[Math.min(size - 1, p * PAGE + ((p * 37) % PAGE))] ^= 0x5a
    next[size - 1] ^= 0xff
    const image = path.join(big, 'next.raw')
    const fd = fs.openSync(image, 'w')
    const hole = (p: number): boolean => p % 5000 < 40
    for (let p = 0; p < pages; p++) if (!hole(p)) fs.writeSync(fd, next, p * PAGE, Math.min(PAGE, size - p * PAGE), p * PAGE)
    fs.ftruncateSync(fd, size)
    fs.closeSync(fd)
    const expected = Buffer.from(next)
    for (let p = 0; p < pages; p++) if (hole(p)) expected.fill(0, p * PAGE, Math.min(size, (p + 1) * PAGE))
    const byDigest = ok(['snapshot', '--mem-file', image, '--parent', path.join(big, 'base.uffd'), '-o', path.join(big, 'd.uffd'), '--jobs', '2'])
    const byDecode = ok(['snapshot', '--mem-file', image, '--parent', path.join(big, 'old.uffd'), '-o', path.join(big, 'o.uffd')])
    expect(byDigest.compared).toBe('digests')
    expect(byDigest.zeroedPages).toBeGreaterThan(0)
    expect(byDigest.changedPages).toBe(byDecode.changedPages)
    expect(byDigest.zeroedPages).toBe(byDecode.zeroedPages)
    expect(layerShape(path.join(big, 'd.uffd'))).toEqual(layerShape(path.join(big, 'o.uffd')))
    fs.writeFileSync(path.join(big, 'expected.raw'), expected)
    const v = ok(['verify', path.join(big, 'd.uffd'), '--against', path.join(big, 'expected.raw')])
    expect(v.ok).toBe(true)
    expect(v.pageDigestsChecked).toBeGreaterThan(byDigest.storedPages)
    fs.rmSync(big, {recursive: true, force: true})
  }, 120_000)

  it('a layer on a layer compares with the chain resolved: each page by the digest of the file holding it', () => {
    const v1 = fs.readFileSync(at('scattered.raw'))
    const v2 = changed(v1, 7, 53, 1700)
    // Pages changed by the first layer changed back to the base's bytes: the second layer stores them again.
    fs.readFileSync(at('base.raw')).copy(v2, 300 * PAGE, 300 * PAGE, 310 * PAGE)
    fs.writeFileSync(at('v2.raw'), v2)
    const d = ok(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('scattered-d.uffd'), '-o', at('v2-d.uffd')])
    const o = ok(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('scattered-o.uffd'), '-o', at('v2-o.uffd')])
    expect(d.compared).toBe('digests')
    expect(o.compared).toBe('decoded')
    expect(layerShape(at('v2-d.uffd'))).toEqual(layerShape(at('v2-o.uffd')))
    ok(['verify', at('v2-d.uffd'), '--against', at('v2.raw')])
    // stats: each file of the chain with its own table's size; the decoded chain's layers have none.
    const withDigests = ok(['stats', at('v2-d.uffd')])
    expect(withDigests.chain.map((f: any) => f.pageDigestBytes)).toEqual([withDigests.chain[0].pageDigestBytes, ok(['stats', at('scattered-d.uffd')]).pageDigests.bytes, d.pageDigestBytes])
    expect(withDigests.chain.every((f: any) => f.pageDigestBytes > 0)).toBe(true)
    expect(withDigests.pageDigests.bytes).toBe(d.pageDigestBytes)
    expect(ok(['stats', at('v2-o.uffd')]).chain.map((f: any) => f.pageDigestBytes)).toEqual([0, 0, 0])
  })

  it('a corrupt digest table is caught by verify and refused by the layer writer', () => {
    const r = SnapshotReader.open(at('base.uffd'))
    const table = readFileDigests(r)!
    r.close()
    const bytes = fs.readFileSync(at('base.uffd'))
    // A flipped bit: the table's checksum fails.
    const flipped = Buffer.from(bytes)
    flipped[table.offset + 100] ^= 1
    fs.writeFileSync(at('flipped.uffd'), flipped)
    const v = uffd(['verify', at('flipped.uffd'), '--json'])
    expect(v.status).toBe(1)
    expect(v.json.errors.join('\n')).toMatch(/page digest table: checksum mismatch/)
    const w = uffd(['snapshot', '--mem-file', at('scattered.raw'), '--parent', at('flipped.uffd'), '-o', at('never.uffd'), '--json'])
    expect(w.status).toBe(1)
    expect(w.json.error.code).toBe('CORRUPT')
    expect(w.json.error.message).toMatch(/page digest table/)
    expect(fs.existsSync(at('never.uffd'))).toBe(false)
    // A wrong row with a checksum to match (as a bug would write it): verify compares it with the page.
    const forged = Buffer.from(bytes)
    const rows = Buffer.from(table.rows)
    rows[5 * PAGE_DIGEST_BYTES] ^= 1
    encodeDigestTable(rows, crc32).copy(forged, table.offset)
    fs.writeFileSync(at('forged.uffd'), forged)
    const f = uffd(['verify', at('forged.uffd'), '--json'])
    expect(f.status).toBe(1)
    expect(f.json.errors.join('\n')).toMatch(/row 5 \(data page \d+ of chunk \d+\) is not the digest of the page it stands for/)
  })

  it('squash, working-set attach and cp keep the table (verify passes after each)', () => {
    const squashed = ok(['squash', at('v2-d.uffd'), '-o', at('squashed.uffd')])
    expect(squashed.fileSize).toBeGreaterThan(0)
    const s = ok(['verify', at('squashed.uffd'), '--against', at('v2.raw')])
    const sq = SnapshotReader.open(at('squashed.uffd'))
    expect(s.pageDigestsChecked).toBe(PAGES - sq.zeroMap.countZero(0, PAGES))
    sq.close()
    // A layer over the squashed file compares by its digests.
    expect(ok(['snapshot', '--mem-file', at('scattered.raw'), '--parent', at('squashed.uffd'), '-o', at('over-squashed.uffd')]).compared).toBe('digests')
    ok(['verify', at('over-squashed.uffd'), '--against', at('scattered.raw')])

    const pages = Array.from({length: 200}, (_, i) => (i * 13) % PAGES)
    for (const file of ['base.uffd', 'v2-d.uffd']) {
      const copy = at(`attached-${file}`)
      fs.copyFileSync(at(file), copy)
      const reader0 = SnapshotReader.open(copy)
      const set: WorkingSetFile = {kind: 'uffd-working-set', version: 1, snapshot: workingSetIdentity(reader0), runs: 1, pages, firstTouchMs: pages.map((_, i) => i)}
      reader0.close()
      fs.writeFileSync(at(`${file}.ws`), JSON.stringify(set))
      const attach = uffd(['working-set', 'attach', copy, at(`${file}.ws`), '--json'])
      if (attach.status !== 0) throw new Error(`attach: ${attach.stdout}${attach.stderr}`)
      const reader = SnapshotReader.open(copy)
      expect(readFileDigests(reader)?.rows.length).toBeGreaterThan(0)
      reader.close()
    }
    ok(['verify', at('attached-base.uffd'), '--against', at('base.raw')])
    // The attached layer verifies with its chain (its parents next to it, under their names).
    fs.copyFileSync(at('attached-v2-d.uffd'), at('v2-attached.uffd'))
    expect(ok(['verify', at('v2-attached.uffd'), '--against', at('v2.raw')]).pageDigestsChecked).toBeGreaterThan(0)
    // The attached base keeps its identity: the layer over it still resolves, and layers over it compare by digest.
    fs.mkdirSync(at('attached'), {recursive: true})
    fs.copyFileSync(at('attached-base.uffd'), at('attached/base.uffd'))
    expect(ok(['snapshot', '--mem-file', at('scattered.raw'), '--parent', at('attached/base.uffd'), '-o', at('attached/l.uffd')]).compared).toBe('digests')
    ok(['verify', at('attached/l.uffd'), '--against', at('scattered.raw')])

    const cp = ok(['cp', at('base.uffd'), at('copied.uffd')])
    expect(cp.bytes).toBe(fs.statSync(at('base.uffd')).size)
    expect(fs.readFileSync(at('copied.uffd')).equals(fs.readFileSync(at('base.uffd')))).toBe(true)
    ok(['verify', at('copied.uffd')])
    // cp refuses a corrupt table rather than copy it.
    const bad = uffd(['cp', at('flipped.uffd'), at('copied-bad.uffd'), '--json'])
    expect(bad.status).toBe(1)
    expect(fs.existsSync(at('copied-bad.uffd'))).toBe(false)

  })

  it('an encrypted snapshot stores no digests; a layer over it decodes its parent', () => {
    fs.writeFileSync(at('k.key'), Buffer.alloc(32, 7))
    fs.chmodSync(at('k.key'), 0o600)
    ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('enc.uffd'), '--encrypt', '--key-file', at('k.key')])
    const r = SnapshotReader.open(at('enc.uffd'), at('enc.uffd'), undefined, true)
    expect(r.header.metadata.pageDigests).toBeUndefined()
    r.close()
    const l = ok(['snapshot', '--mem-file', at('scattered.raw'), '--parent', at('enc.uffd'), '-o', at('enc-l.uffd'), '--key-file', at('k.key')])
    expect(l.compared).toBe('decoded')
    expect(l.pageDigestBytes).toBe(0)
  })

  describe.skipIf(!isRoot() || !fs.existsSync(path.join(NATIVE, 'fc_client')))('resume (fc_client --verify-all)', () => {
    it('a layer compared by digests resumes byte for byte', async () => {
      const socket = at('s.sock')
      const ready = `${socket}.ready`
      const handler = uffdAsync(['resume', at('v2-d.uffd'), '--socket', socket, '--ready-file', ready, '--timeout', '30', '--json'], {timeoutMs: 60_000})
      for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
      expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
      const client = spawnSync(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', at('v2.raw'), '--touch', 'random', '--verify-all', '--timeout-ms', '30000'], {encoding: 'utf8', timeout: 60_000})
      const done = await handler
      expect(client.status, `fc_client:\n${client.stdout}${client.stderr}\nresume:\n${done.stderr}`).toBe(0)
      expect(JSON.parse(client.stdout).verify_errors).toBe(0)
      expect(done.status, done.stderr).toBe(0)
    })
  })
})
