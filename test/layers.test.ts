// Layered snapshots end to end: real files, the real CLI, real fc_client resumes checking every byte.
import {spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {AtomicFile} from '../src/snapshot/atomic-file.js'
import {writeLayer} from '../src/snapshot/layer-writer.js'
import {LayeredReader} from '../src/snapshot/layered-reader.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {UnitCache} from '../src/snapshot/unit-cache.js'
import {isRoot, NATIVE, uffd, uffdAsync} from './helpers/cli.js'
import {makeImage, pseudoRandom, tempDir} from './helpers/images.js'

const PAGE = 4096
const SIZE = 8 * 1024 * 1024
const PAGES = SIZE / PAGE
const FC_CLIENT = path.join(NATIVE, 'fc_client')
const KVM_VMM = path.join(NATIVE, 'kvm_vmm')
const MEMORY_PATTERN = path.join(NATIVE, 'memory_pattern')
const kvmSkip = !isRoot() ? 'not root (needs /dev/kvm and a kernel-mode userfaultfd)' : !fs.existsSync('/dev/kvm') ? 'no /dev/kvm on this machine' : !fs.existsSync(KVM_VMM) ? `${KVM_VMM} is not built (npm run build)` : undefined
if (kvmSkip) console.warn(`test/layers.test.ts: the KVM guest restored from a layer is skipped: ${kvmSkip}`)

let dir: string
const at = (name: string): string => path.join(dir, name)

/** `image` with pages changed: scattered (every `stride`-th page), a cluster, and a zeroed run. */
function changed(image: Buffer, seed: number, stride: number, cluster: number): Buffer {
  const out = Buffer.from(image)
  const fresh = pseudoRandom(SIZE, seed)
  for (let p = seed % stride; p < PAGES; p += stride) fresh.copy(out, p * PAGE, p * PAGE, (p + 1) * PAGE)
  fresh.copy(out, cluster * PAGE, cluster * PAGE, (cluster + 48) * PAGE)
  out.fill(0, (cluster + 100) * PAGE, (cluster + 108) * PAGE)
  return out
}

/** `bytes`' first `length` bytes (zero-padded), in shared memory. */
function sameSize(bytes: SharedArrayBuffer, length: number): SharedArrayBuffer {
  const out = new SharedArrayBuffer(length)
  new Uint8Array(out).set(new Uint8Array(bytes).subarray(0, length))
  return out
}

function ok(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

async function resumeAndCheck(snapshot: string, image: string, extra: string[] = [], clientArgs = ['--touch', 'random', '--verify-all']): Promise<{client: any; resume: any}> {
  const socket = at(`s-${path.basename(snapshot)}.sock`)
  const ready = `${socket}.ready`
  const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30', '--json', ...extra], {timeoutMs: 60_000})
  for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
  expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
  const client = spawnSync(FC_CLIENT, ['--socket', socket, '--image', image, ...clientArgs, '--timeout-ms', '30000'], {encoding: 'utf8', timeout: 60_000})
  const done = await handler
  expect(client.status, `fc_client:\n${client.stdout}${client.stderr}\nresume:\n${done.stderr}`).toBe(0)
  const report = JSON.parse(client.stdout)
  expect(report.verify_errors).toBe(0)
  expect(done.status, done.stderr).toBe(0)
  return {client: report, resume: JSON.parse(done.stdout)}
}

beforeAll(() => {
  dir = tempDir('uffd-layers-')
  const base = makeImage('mixed', SIZE, 7)
  const v1 = changed(base, 3, 37, 300)
  const v2 = changed(v1, 5, 101, 1200)
  fs.writeFileSync(at('base.raw'), base)
  fs.writeFileSync(at('v1.raw'), v1)
  fs.writeFileSync(at('v2.raw'), v2)
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd')])
  ok(['snapshot', '--mem-file', at('v1.raw'), '--parent', at('base.uffd'), '-o', at('v1.uffd')])
  ok(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('v1.uffd'), '-o', at('v2.uffd')])
})

afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe('layers', () => {
  it('store only the changed pages and verify byte-exact against the full image', () => {
    const base = fs.statSync(at('base.uffd')).size
    for (const [layer, raw] of [
      ['v1.uffd', 'v1.raw'],
      ['v2.uffd', 'v2.raw'],
    ]) {
      expect(fs.statSync(at(layer)).size).toBeLessThan(base / 4)
      const v = ok(['verify', at(layer), '--against', at(raw)])
      expect(v.ok).toBe(true)
      expect(v.against.mismatchedPages).toBe(0)
    }
    // A layer differs from a wrong image: verify is not vacuous.
    expect(uffd(['verify', at('v2.uffd'), '--against', at('v1.raw')]).status).toBe(1)
  })

  it('stats shows the chain and what each file provides', () => {
    const s = ok(['stats', at('v2.uffd')])
    expect(s.chain.map((f: any) => f.role)).toEqual(['base', 'layer 1', 'layer 2'])
    expect(s.layer.depth).toBe(2)
    const provided = s.chain.reduce((n: number, f: any) => n + f.pagesProvided, 0)
    expect(provided + s.zeroPages).toBe(PAGES)
    expect(s.chain[2].pagesProvided).toBe(s.layer.pages)
  })

  it("a chain serves a chunk its base holds unchanged from the base's frames, and assembles any other whole", () => {
    // One 64-page (one-chunk) run changed: every other chunk is the base's.
    const changedImage = fs.readFileSync(at('base.raw'))
    pseudoRandom(64 * PAGE, 12).copy(changedImage, 128 * PAGE)
    fs.writeFileSync(at('fr.raw'), changedImage)
    ok(['snapshot', '--mem-file', at('fr.raw'), '--parent', at('base.uffd'), '-o', at('fr.uffd')])
    const names = ['base.uffd', 'fr.uffd']
    const chain = LayeredReader.fromFiles(names.map((f) => SnapshotReader.open(at(f))), names, new UnitCache())
    const base = SnapshotReader.open(at('base.uffd'))
    const image = changedImage
    try {
      expect(chain.framePages).toBe(16)
      const dst = Buffer.alloc(256 * 1024)
      let framed = 0
      let whole = 0
      for (let c = 0; c < chain.index.length; c++) {
        const page = c * 64 + 20
        if (chain.zeroMap.isZero(page)) continue
        const got = chain.readFramesIfLocal(c, page, page + 1, dst)
        if (got === undefined) throw new Error('a local file is always here')
        if (got === 'whole') {
          whole++
          continue
        }
        framed++
        // Only where the chunk is the base's unchanged: its resolved payload is the base's.
        expect(chain.readPayload(c).equals(base.readPayload(c))).toBe(true)
        const at = (page - c * 64 - chain.zeroMap.countZero(c * 64, 20) - got.payloadPage) * PAGE
        expect(got.payload.subarray(at, at + PAGE).equals(image.subarray(page * PAGE, (page + 1) * PAGE))).toBe(true)
      }
      expect(framed).toBeGreaterThan(0)
      expect(whole).toBeGreaterThan(0)
    } finally {
      chain.close()
      base.close()
    }
  })

  it('squash writes one self-contained snapshot of the chain, copying base chunks it can', () => {
    // Scattered changes touch every chunk: all are assembled again.
    // Over a file of its own chain: refused, the file kept (its layers would no longer resolve).
    const base = fs.readFileSync(at('base.uffd'))
    const clash = uffd(['squash', at('v2.uffd'), '-o', at('base.uffd'), '--force', '--json'])
    expect(clash.status).toBe(2)
    expect(clash.json.error.code).toBe('USAGE')
    expect(fs.readFileSync(at('base.uffd')).equals(base)).toBe(true)
    const s = ok(['squash', at('v2.uffd'), '-o', at('sq.uffd')])
    expect(s.copiedChunks).toBe(0)
    expect(s.encodedChunks).toBeGreaterThan(0)
    // A clustered change on the base leaves the other chunks' stored bytes to copy.
    const c = fs.readFileSync(at('base.raw'))
    pseudoRandom(64 * PAGE, 11).copy(c, 64 * PAGE)
    fs.writeFileSync(at('c.raw'), c)
    ok(['snapshot', '--mem-file', at('c.raw'), '--parent', at('base.uffd'), '-o', at('c.uffd')])
    const sc = ok(['squash', at('c.uffd'), '-o', at('sqc.uffd')])
    expect(sc.encodedChunks).toBe(1)
    expect(sc.copiedChunks).toBeGreaterThan(0)
    expect(ok(['verify', at('sqc.uffd'), '--against', at('c.raw')]).ok).toBe(true)
    // The base's stored chunks are framed (the default): copied as they are, the output frames
    // the same way, and its chunks compressed again too.
    expect(ok(['stats', at('base.uffd')]).frameSize).toBe(64 * 1024)
    expect(ok(['stats', at('sqc.uffd')]).frameSize).toBe(64 * 1024)
    const squashed = SnapshotReader.open(at('sqc.uffd'))
    try {
      const frames = [...Array(squashed.index.length).keys()].map((c) => squashed.readFramesIfLocal(c, c * 64, c * 64 + 1, Buffer.alloc(256 * 1024)))
      expect(frames.some((f) => typeof f === 'object')).toBe(true)
    } finally {
      squashed.close()
    }
    const moved = tempDir('uffd-layers-squashed-')
    try {
      // Alone in a directory: nothing of the chain is needed.
      fs.renameSync(at('sq.uffd'), path.join(moved, 'sq.uffd'))
      const stats = ok(['stats', path.join(moved, 'sq.uffd')])
      expect(stats.layer).toBeUndefined()
      expect(ok(['verify', path.join(moved, 'sq.uffd'), '--against', at('v2.raw')]).ok).toBe(true)
    } finally {
      fs.rmSync(moved, {recursive: true, force: true})
    }
    expect(uffd(['squash', at('base.uffd'), '-o', at('x.uffd'), '--json']).json.error.code).toBe('USAGE')
    expect(fs.existsSync(at('x.uffd'))).toBe(false)
  })

  it('a Firecracker-style sparse diff gives the same image as the full file', () => {
    // Holes are "unchanged": only the pages that differ from v1 (and one rewritten with the same bytes) are written.
    const v1 = fs.readFileSync(at('v1.raw'))
    const v2 = fs.readFileSync(at('v2.raw'))
    const fd = fs.openSync(at('v2.diff'), 'w')
    fs.ftruncateSync(fd, SIZE)
    for (let p = 0; p < PAGES; p++) {
      if (p === 10 || !v1.subarray(p * PAGE, (p + 1) * PAGE).equals(v2.subarray(p * PAGE, (p + 1) * PAGE))) fs.writeSync(fd, v2, p * PAGE, PAGE, p * PAGE)
    }
    fs.closeSync(fd)
    const layer = ok(['snapshot', '--mem-file', at('v2.diff'), '--diff', '--parent', at('v1.uffd'), '-o', at('v2d.uffd')])
    expect(layer.comparedPages).toBeLessThan(PAGES / 4)
    expect(ok(['verify', at('v2d.uffd'), '--against', at('v2.raw')]).ok).toBe(true)
    // Without --diff the holes are zeros: a different image.
    ok(['snapshot', '--mem-file', at('v2.diff'), '--parent', at('v1.uffd'), '-o', at('v2z.uffd')])
    expect(uffd(['verify', at('v2z.uffd'), '--against', at('v2.raw')]).status).toBe(1)
  })

  it('a diff is compared with the parent chunks its data pages need, and only those are decoded', async () => {
    // Dirty pages that were zero pages of the base need no decoding; one that was a data page
    // needs its chunk. One page rewritten with the base's bytes is not stored.
    const base = fs.readFileSync(at('base.raw'))
    const PPC = (256 * 1024) / PAGE
    const isZero = (p: number): boolean => base.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === 0)
    const dataPage = Array.from({length: PAGES}, (_, p) => p).find((p) => !isZero(p))!
    // Zero pages in chunks that hold data too (an all-zero chunk is never decoded), not the data page's.
    const zeroPages = Array.from({length: PAGES}, (_, p) => p).filter((p) => isZero(p) && Math.floor(p / PPC) !== Math.floor(dataPage / PPC) && Array.from({length: PPC}, (_, i) => Math.floor(p / PPC) * PPC + i).some((q) => !isZero(q)))
    expect(zeroPages.length).toBeGreaterThan(8)
    const image = Buffer.from(base)
    const fd = fs.openSync(at('zd.diff'), 'w')
    fs.ftruncateSync(fd, SIZE)
    for (const p of [...zeroPages.slice(0, 8), dataPage]) {
      if (p !== dataPage) pseudoRandom(PAGE, p).copy(image, p * PAGE)
      fs.writeSync(fd, image, p * PAGE, PAGE, p * PAGE)
    }
    fs.closeSync(fd)
    fs.writeFileSync(at('zd.raw'), image)
    // Compared by decoding: a base without page digests. With them (base.uffd), nothing is decoded.
    ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base-nd.uffd'), '--no-page-digests'])
    for (const [file, expected] of [
      ['base-nd.uffd', [Math.floor(dataPage / PPC)]],
      ['base.uffd', []],
    ] as const) {
      const parent = SnapshotReader.open(at(file))
      const decoded: number[] = []
      const read = parent.readPayload.bind(parent)
      parent.readPayload = (unit: number, dst?: Buffer): Buffer => {
        decoded.push(unit)
        return read(unit, dst)
      }
      try {
        const s = await writeLayer(memFileInput(at('zd.diff')), {reader: parent, shown: at(file), fileName: file}, () => new AtomicFile(at(`zd-${file}`)), {codec: 'zstd', level: 1, diff: true})
        expect(s.comparedPages).toBe(9)
        expect(s.storedPages).toBe(8)
        expect(s.compared).toBe(expected.length ? 'decoded' : 'digests')
        expect(decoded).toEqual(expected)
      } finally {
        parent.close()
      }
      expect(ok(['verify', at(`zd-${file}`), '--against', at('zd.raw')]).ok).toBe(true)
    }
  })

  it('a missing, swapped or corrupt parent is refused with a code naming it', () => {
    const moved = tempDir('uffd-layers-moved-')
    try {
      fs.copyFileSync(at('v2.uffd'), path.join(moved, 'v2.uffd'))
      const missing = uffd(['stats', path.join(moved, 'v2.uffd'), '--json'])
      expect(missing.status).toBe(1)
      expect(missing.json.error.code).toBe('PARENT_MISSING')
      expect(missing.json.error.message).toContain('base.uffd')
      // --layers DIR finds them.
      expect(ok(['verify', path.join(moved, 'v2.uffd'), '--layers', dir, '--against', at('v2.raw')]).ok).toBe(true)
      // Another snapshot under the parent's name.
      fs.copyFileSync(at('v2.uffd'), path.join(moved, 'v1.uffd'))
      ok(['snapshot', '--mem-file', at('v1.raw'), '-o', path.join(moved, 'base.uffd')])
      const swapped = uffd(['stats', path.join(moved, 'v2.uffd'), '--json'])
      expect(swapped.json.error.code).toBe('PARENT_MISMATCH')
      expect(swapped.json.error.message).toContain('base.uffd')
      // A copy of the parent with one chunk's byte flipped: same identity (chunk data is covered
      // by its CRC), refused when the chunk is read.
      fs.copyFileSync(at('base.uffd'), path.join(moved, 'base.uffd'))
      fs.copyFileSync(at('v1.uffd'), path.join(moved, 'v1.uffd'))
      const bytes = fs.readFileSync(path.join(moved, 'base.uffd'))
      bytes[bytes.readUInt32LE(12) + 100] ^= 0xff
      fs.writeFileSync(path.join(moved, 'base.uffd'), bytes)
      const corrupt = uffd(['verify', path.join(moved, 'v2.uffd'), '--json'])
      expect(corrupt.status).toBe(1)
      expect(corrupt.json.errors.join('\n')).toMatch(/base\.uffd: chunk \d+: checksum mismatch/)
    } finally {
      fs.rmSync(moved, {recursive: true, force: true})
    }
  })

  it('a working set attached to the base keeps its layers resolving (the identity is of content); other memory is still refused', () => {
    const moved = tempDir('uffd-layers-attached-')
    try {
      for (const f of ['base.uffd', 'v1.uffd', 'v2.uffd']) fs.copyFileSync(at(f), path.join(moved, f))
      const base = SnapshotReader.open(at('base.uffd'))
      const ws = {kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: SIZE, pageSize: PAGE, headerCrc: base.header.headerCrc}, runs: 1, pages: Array.from({length: 300}, (_, i) => (i * 7) % PAGES), firstTouchMs: Array.from({length: 300}, (_, i) => i)}
      base.close()
      fs.writeFileSync(path.join(moved, 'ws.json'), JSON.stringify(ws))
      ok(['working-set', 'attach', path.join(moved, 'base.uffd'), path.join(moved, 'ws.json')])
      expect(fs.readFileSync(path.join(moved, 'base.uffd')).equals(fs.readFileSync(at('base.uffd')))).toBe(false)
      expect(ok(['stats', path.join(moved, 'base.uffd')]).workingSet).toBeDefined()
      for (const [layer, raw] of [
        ['v1.uffd', 'v1.raw'],
        ['v2.uffd', 'v2.raw'],
      ]) {
        expect(ok(['verify', path.join(moved, layer), '--against', at(raw)]).ok).toBe(true)
      }
      // A layer written on the attached base is recognised by the base as it was before.
      ok(['snapshot', '--mem-file', at('v1.raw'), '--parent', path.join(moved, 'base.uffd'), '-o', path.join(moved, 'v1b.uffd')])
      fs.copyFileSync(at('base.uffd'), path.join(moved, 'base.uffd'))
      expect(ok(['verify', path.join(moved, 'v1b.uffd'), '--against', at('v1.raw')]).ok).toBe(true)
      // Other memory under the base's name.
      ok(['snapshot', '--mem-file', at('v1.raw'), '-o', path.join(moved, 'base.uffd'), '--force'])
      const other = uffd(['verify', path.join(moved, 'v2.uffd'), '--json'])
      expect(other.json.error.code).toBe('PARENT_MISMATCH')
    } finally {
      fs.rmSync(moved, {recursive: true, force: true})
    }
  })

  it('a layer written over a file of its own chain is refused, the file kept', () => {
    const before = fs.readFileSync(at('base.uffd'))
    fs.linkSync(at('base.uffd'), at('base-link.uffd'))
    try {
      for (const out of ['base.uffd', 'base-link.uffd']) {
        const r = uffd(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('v1.uffd'), '-o', at(out), '--force', '--json'])
        expect(r.status, out).toBe(2)
        expect(r.json.error.message).toContain("a file of the parent's chain")
      }
      expect(fs.readFileSync(at('base.uffd')).equals(before)).toBe(true)
    } finally {
      fs.rmSync(at('base-link.uffd'), {force: true})
    }
  })

  it('a layer whose own tables or blocks were changed is refused as CORRUPT', () => {
    const bytes = fs.readFileSync(at('v1.uffd'))
    const headerSize = bytes.readUInt32LE(12)
    // From the reader: a regular expression over the header's bytes also takes in a '}' that its CRC may hold.
    const opened = SnapshotReader.open(at('v1.uffd'), at('v1.uffd'), undefined, true)
    const meta = opened.header.metadata as any
    opened.close()
    const flip = (offset: number, name: string): any => {
      const copy = Buffer.from(bytes)
      copy[offset] ^= 0x01
      fs.writeFileSync(at(name), copy)
      return uffd(['verify', at(name), '--json']).json
    }
    expect(flip(meta.layer.runs.offset + 4, 'bad-runs.uffd').error.code).toBe('CORRUPT')
    expect(flip(meta.layer.blocks.offset + 8, 'bad-blocks.uffd').error.code).toBe('CORRUPT')
    const data = flip(headerSize + 10, 'bad-data.uffd')
    expect(data.ok).toBe(false)
    expect(data.errors.join('\n')).toMatch(/layer block 0: checksum mismatch/)
  })

  it('reading a chain in any order decodes each layer block once', () => {
    // 16 KiB chunks: the scattered changes of v1 and v2 fill many blocks of 4 pages, more than a
    // handful of decoded units; every chunk read in a shuffled order, twice.
    ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('b16.uffd'), '--chunk-size', '16K'])
    ok(['snapshot', '--mem-file', at('v1.raw'), '--parent', at('b16.uffd'), '-o', at('v1-16.uffd')])
    ok(['snapshot', '--mem-file', at('v2.raw'), '--parent', at('v1-16.uffd'), '-o', at('v2-16.uffd')])
    const chain = LayeredReader.fromFiles(['b16.uffd', 'v1-16.uffd', 'v2-16.uffd'].map((f) => SnapshotReader.open(at(f))), ['b16.uffd', 'v1-16.uffd', 'v2-16.uffd'], new UnitCache())
    try {
      const decodes = chain.files.map(() => new Map<number, number>())
      chain.files.forEach((f: SnapshotReader, k) => {
        const read = f.readPayload.bind(f)
        f.readPayload = (unit: number, dst?: Buffer): Buffer => {
          decodes[k].set(unit, (decodes[k].get(unit) ?? 0) + 1)
          return read(unit, dst)
        }
      })
      expect(chain.files[1].layer!.set.blocks.length).toBeGreaterThan(20)
      const v2 = fs.readFileSync(at('v2.raw'))
      const chunks = chain.geometry.chunkCount
      const order = Array.from({length: chunks}, (_, c) => (c * 389) % chunks)
      const dst = Buffer.alloc(chain.geometry.chunkSize)
      for (const c of [...order, ...order]) {
        chain.readChunk(c, dst)
        expect(dst.equals(v2.subarray(c * 16384, (c + 1) * 16384)), `chunk ${c}`).toBe(true)
      }
      for (const k of [1, 2]) {
        expect(decodes[k].size).toBe(chain.files[k].layer!.set.blocks.length)
        expect(Math.max(...decodes[k].values()), `layer ${k}: a block decoded again`).toBe(1)
      }
    } finally {
      chain.close()
    }
  })

  it("a chain opened with another opening's tables reads the same bytes without checking them again; another layer's tables are refused", () => {
    const names = ['base.uffd', 'v1.uffd', 'v2.uffd']
    const first = LayeredReader.fromFiles(names.map((f) => SnapshotReader.open(at(f))), names, new UnitCache())
    const again = LayeredReader.fromFiles(first.files.map((f, k) => SnapshotReader.open(at(names[k]), at(names[k]), undefined, false, f.tables)), names, new UnitCache(), undefined, true)
    try {
      expect(first.files.map((f) => f.checkedElsewhere)).toEqual([false, false, false])
      expect(again.files.map((f) => f.checkedElsewhere)).toEqual([true, true, true])
      // The same memory, not copies; the layer's own runs are decoded only when asked.
      expect(again.files[1].tables.layerRuns).toBe(first.files[1].tables.layerRuns)
      expect(again.files[2].layer!.runs).toEqual(first.files[2].layer!.runs)
      const v2 = fs.readFileSync(at('v2.raw'))
      const dst = Buffer.alloc(again.geometry.chunkSize)
      for (let c = 0; c < again.geometry.chunkCount; c++) {
        again.readChunk(c, dst)
        expect(dst.equals(v2.subarray(c * again.geometry.chunkSize, (c + 1) * again.geometry.chunkSize)), `chunk ${c}`).toBe(true)
      }
      // v1's run table for v2 (the same size, crafted so): not the layout checked, refused.
      const v1 = first.files[1].tables
      const v2Tables = first.files[2].tables
      const swapped = {...v2Tables, layerRuns: sameSize(v1.layerRuns!, v2Tables.layerRuns!.byteLength)}
      expect(() => SnapshotReader.open(at('v2.uffd'), at('v2.uffd'), undefined, false, swapped)).toThrow(/changed since it was opened/)
      // Another file's tables whole: its zero map fails this file's footer CRC.
      expect(() => SnapshotReader.open(at('v2.uffd'), at('v2.uffd'), undefined, false, v1)).toThrow(/zero map: checksum mismatch/)
      // Tables checked for another layout of this file (it was rewritten in place since): refused.
      expect(() => SnapshotReader.open(at('v2.uffd'), at('v2.uffd'), undefined, false, {...v2Tables, layout: '0'.repeat(64)})).toThrow(/changed since it was opened/)
      // Files each of a checked layout, but not said to be a checked chain: the chain is checked.
      const unsaid = LayeredReader.fromFiles(first.files.map((f, k) => SnapshotReader.open(at(names[k]), at(names[k]), undefined, false, f.tables)), names, new UnitCache())
      expect(unsaid.files.every((f) => f.checkedElsewhere)).toBe(true)
      unsaid.close()
    } finally {
      again.close()
      first.close()
    }
  })

  it('a layer carries incompatible bit 0 (older readers refuse it) and bit 2 (bound units), and cp copies it byte for byte, its base kept where it is already', () => {
    const bytes = fs.readFileSync(at('v1.uffd'))
    expect(bytes.readBigUInt64LE(16)).toBe(0b101n)
    const cp = ok(['cp', at('v1.uffd'), at('copy.uffd')])
    expect(cp.files.map((f: {copied: boolean}) => f.copied)).toEqual([false, true])
    expect(fs.readFileSync(at('copy.uffd')).equals(bytes)).toBe(true)
    expect(ok(['verify', at('copy.uffd'), '--against', at('v1.raw')]).ok).toBe(true)
    fs.rmSync(at('copy.uffd'))
  })

  describe.skipIf(!isRoot() || !fs.existsSync(FC_CLIENT))('resume (fc_client --verify-all)', () => {
    it('serves the base, a layer and a layer on a layer byte-exact', async () => {
      await resumeAndCheck(at('base.uffd'), at('base.raw'))
      await resumeAndCheck(at('v1.uffd'), at('v1.raw'))
      await resumeAndCheck(at('v2.uffd'), at('v2.raw'))
    }, 180_000)

    it('serves a layer with decoding in this thread, and with population of all memory', async () => {
      await resumeAndCheck(at('v2.uffd'), at('v2.raw'), ['--decoders', '0'])
      await resumeAndCheck(at('v2.uffd'), at('v2.raw'), ['--populate', 'all'])
    }, 180_000)

    it('a balloon removal on a layer reads as zeros and is never refilled', async () => {
      const r = await resumeAndCheck(at('v2.uffd'), at('v2.raw'), ['--populate', 'all'], ['--touch', 'random', '--count', '300', '--verify', '--balloon', '4096:64K,1M:12K'])
      expect(r.client).toMatchObject({balloon_ok: true, balloon_bytes: 65536 + 12288, balloon_bad_pages: 0})
    }, 120_000)

    it('a working set recorded on a layer prefetches on the next resume of it', async () => {
      const ws = at('v2.ws')
      const recorded = await resumeAndCheck(at('v2.uffd'), at('v2.raw'), ['--record', ws, '--fault-around', 'page', '--readahead', '0'], ['--touch', 'random', '--count', '400', '--verify'])
      expect(recorded.resume.stats.faults.total).toBeGreaterThan(0)
      // The guest waits before touching: the set is installed by then, and no touch faults.
      const r = await resumeAndCheck(at('v2.uffd'), at('v2.raw'), ['--working-set', ws, '--readahead', '0'], ['--touch', 'random', '--count', '400', '--verify', '--delay-ms', '300'])
      expect(r.resume.stats.pages.prefetched).toBeGreaterThan(0)
      expect(r.resume.stats.faults.total).toBe(0)
    }, 120_000)

    it('resume --learn on the base keeps its layers resolving', async () => {
      const moved = tempDir('uffd-layers-learned-')
      try {
        for (const f of ['base.uffd', 'v1.uffd', 'v2.uffd']) fs.copyFileSync(at(f), path.join(moved, f))
        await resumeAndCheck(path.join(moved, 'base.uffd'), at('base.raw'), ['--learn'], ['--touch', 'random', '--count', '300', '--verify'])
        expect(ok(['stats', path.join(moved, 'base.uffd')]).workingSet).toBeDefined()
        expect(ok(['verify', path.join(moved, 'v2.uffd'), '--against', at('v2.raw')]).ok).toBe(true)
        await resumeAndCheck(path.join(moved, 'v2.uffd'), at('v2.raw'))
      } finally {
        fs.rmSync(moved, {recursive: true, force: true})
      }
    }, 120_000)

    it('serves a layer made from a sparse diff like the full image', async () => {
      await resumeAndCheck(at('v2d.uffd'), at('v2.raw'))
    }, 120_000)
  })

  describe.skipIf(!isRoot() || !fs.existsSync(MEMORY_PATTERN))('snapshot --pid --parent (a live process)', () => {
    it('stores the pages the process changed since its base snapshot, and resolves to its memory now', async () => {
      const child = spawn(MEMORY_PATTERN, ['--mib', '16', '--seed', '5', '--signals'], {stdio: ['ignore', 'pipe', 'inherit']})
      let out = ''
      child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d))
      const line = async (n: number): Promise<any> => {
        for (let i = 0; i < 400 && out.split('\n').filter(Boolean).length < n; i++) await new Promise((r) => setTimeout(r, 25))
        return JSON.parse(out.split('\n').filter(Boolean)[n - 1])
      }
      try {
        const {pid} = await line(1)
        ok(['snapshot', '--pid', String(pid), '-o', at('p-base.uffd')])
        child.kill('SIGUSR1')
        const {changed} = await line(2)
        expect(changed).toBeGreaterThan(30)
        // Stopped while the layer and the full snapshot to compare it with are taken: its other
        // mappings (stack, libc's data) may change between two snapshots of a running process.
        child.kill('SIGSTOP')
        const layer = ok(['snapshot', '--pid', String(pid), '--parent', at('p-base.uffd'), '-o', at('p-layer.uffd')])
        // The changed pages, and the few of the stack and libc the signal wrote.
        expect(layer.changedPages).toBeGreaterThanOrEqual(changed)
        expect(layer.changedPages).toBeLessThan(changed + 32)
        expect(layer.fileSize).toBeLessThan(fs.statSync(at('p-base.uffd')).size / 10)
        ok(['snapshot', '--pid', String(pid), '-o', at('p-full.uffd')])
        child.kill('SIGCONT')
        const chain = LayeredReader.fromFiles(['p-base.uffd', 'p-layer.uffd'].map((f) => SnapshotReader.open(at(f))), ['p-base.uffd', 'p-layer.uffd'], new UnitCache())
        const full = SnapshotReader.open(at('p-full.uffd'))
        const base = SnapshotReader.open(at('p-base.uffd'))
        try {
          expect(chain.geometry.logicalSize).toBe(full.geometry.logicalSize)
          const a = Buffer.alloc(chain.geometry.chunkSize)
          const b = Buffer.alloc(chain.geometry.chunkSize)
          let differFromBase = 0
          for (let c = 0; c < chain.geometry.chunkCount; c++) {
            chain.readChunk(c, a)
            full.readChunk(c, b)
            expect(a.equals(b), `chunk ${c}`).toBe(true)
            base.readChunk(c, b)
            if (!a.equals(b)) differFromBase++
          }
          expect(differFromBase).toBeGreaterThan(0)
        } finally {
          chain.close()
          full.close()
          base.close()
        }
        expect(ok(['verify', at('p-layer.uffd')]).ok).toBe(true)
      } finally {
        child.kill('SIGKILL')
      }
    }, 60_000)
  })

  describe.skipIf(kvmSkip !== undefined)('a KVM guest (kvm_vmm) restored from a layer', () => {
    // The guest's memory (mem.raw) is the top of a chain whose base and middle layer are other
    // images: pages changed scattered and in a run, data pages zeroed, zero pages filled. Only a
    // chain that gives back every page of mem.raw lets the guest compute its checksum.
    let snapDir: string
    let checksum: string
    const kvm = (name: string): string => path.join(snapDir, name)

    beforeAll(() => {
      snapDir = at('kvm')
      const run = spawnSync(KVM_VMM, ['run', '--mem-mib', '64', '--snapshot-dir', snapDir, '--timeout-ms', '30000'], {encoding: 'utf8', timeout: 60_000})
      if (run.status !== 0) throw new Error(`kvm_vmm run failed (${run.status}):\n${run.stderr}`)
      checksum = JSON.parse(run.stdout.trim().split('\n').at(-1)!).checksum
      const mem = fs.readFileSync(kvm('mem.raw'))
      const pages = mem.length / PAGE
      const other = (seed: number): Buffer => {
        const out = Buffer.from(mem)
        const fresh = pseudoRandom(mem.length, seed)
        for (let p = 600 + seed; p < pages; p += 53) fresh.copy(out, p * PAGE, p * PAGE, (p + 1) * PAGE)
        fresh.copy(out, (1000 + seed * 100) * PAGE, (1000 + seed * 100) * PAGE, (1040 + seed * 100) * PAGE)
        out.fill(0, (3000 + seed * 10) * PAGE, (3008 + seed * 10) * PAGE)
        fresh.copy(out, (pages - 100) * PAGE, (pages - 100) * PAGE, (pages - 90) * PAGE) // the tail the guest never touches: zero in mem.raw
        return out
      }
      fs.writeFileSync(kvm('a.raw'), other(1))
      fs.writeFileSync(kvm('b.raw'), other(2))
      // A Firecracker-style Diff of mem.raw against b.raw: only the pages that differ.
      const b = fs.readFileSync(kvm('b.raw'))
      const fd = fs.openSync(kvm('mem.diff'), 'w')
      fs.ftruncateSync(fd, mem.length)
      for (let p = 0; p < pages; p++) if (!mem.subarray(p * PAGE, (p + 1) * PAGE).equals(b.subarray(p * PAGE, (p + 1) * PAGE))) fs.writeSync(fd, mem, p * PAGE, PAGE, p * PAGE)
      fs.closeSync(fd)
      ok(['snapshot', '--mem-file', kvm('a.raw'), '-o', kvm('a.uffd')])
      ok(['snapshot', '--mem-file', kvm('b.raw'), '--parent', kvm('a.uffd'), '-o', kvm('b.uffd')])
      ok(['snapshot', '--mem-file', kvm('mem.raw'), '--parent', kvm('b.uffd'), '-o', kvm('mem.uffd')])
      ok(['snapshot', '--mem-file', kvm('mem.diff'), '--diff', '--parent', kvm('b.uffd'), '-o', kvm('mem-diff.uffd')])
    })

    /** Resumes `snapshot` into a fresh VM; the VM's exit, its JSON line and the handler's exit. */
    async function restore(snapshot: string, regions: string): Promise<{status: number | null; vm: any; stderr: string; handler: number | null}> {
      const socket = kvm(`${path.basename(snapshot)}.sock`)
      const ready = `${socket}.ready`
      const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30', '--json'], {timeoutMs: 60_000})
      for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
      expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
      const vm = spawnSync(KVM_VMM, ['restore', '--snapshot-dir', snapDir, '--uffd-socket', socket, '--regions', regions, '--timeout-ms', '30000'], {encoding: 'utf8', timeout: 60_000})
      const done = await handler
      return {status: vm.status, vm: JSON.parse(vm.stdout.trim().split('\n').at(-1)!), stderr: `kvm_vmm restore:\n${vm.stderr}\nresume:\n${done.stderr}`, handler: done.status}
    }

    it('passes its checksum restored from a layer on a layer, and from a layer of its Diff file', async () => {
      // Not vacuous: the middle layer is another image, and the guest's checksum tells.
      const wrong = await restore(kvm('b.uffd'), '1')
      expect(wrong.status, wrong.stderr).toBe(1)
      expect(wrong.vm.error).toContain('checksum mismatch after restore')
      for (const [snapshot, regions] of [
        ['mem.uffd', '1'],
        ['mem.uffd', '2'],
        ['mem-diff.uffd', '1'],
      ]) {
        const r = await restore(kvm(snapshot), regions)
        expect(r.status, r.stderr).toBe(0)
        expect(r.handler, r.stderr).toBe(0)
        expect(r.vm, snapshot).toMatchObject({ok: true, mode: 'uffd', regions: Number(regions), checksum})
      }
    }, 180_000)
  })
})
