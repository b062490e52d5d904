// Bound units (docs/FORMAT.md, "Bound units", incompat bit 2): every stored unit's CRC is seeded
// with its place, so a CRC-consistent file whose index or table entries point at another unit's
// bytes (their CRC copied with them) is refused by verify and by resume serving a real client,
// which never gets a wrong byte. Files written before the bit (fixtures/unbound-snapshot, made by
// uffd d9898ca) read, verify and resume as they did.
import fs from 'node:fs'
import path from 'node:path'
import {crc32} from 'node:zlib'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {BoundKind, crc32Combine, placeRecord, placeSeed, unitCrc} from '../src/format/bind.js'
import {Codec, FOOTER_SIZE, INCOMPAT_BOUND, INDEX_ENTRY_SIZE, PACKED_BLOCK_ENTRY_SIZE} from '../src/format/constants.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {attachWorkingSet} from '../src/snapshot/relayout.js'
import {baseImage, changedImage, WORKING_SET_PAGES} from '../fixtures/unbound-snapshot/images.js'
import {isRoot, NATIVE, ROOT, uffd, uffdAsync} from './helpers/cli.js'
import {DirRangeServer} from './helpers/dir-range-server.js'
import {compressiblePage, pseudoRandom, tempDir} from './helpers/images.js'
import {runFcClient} from './helpers/layered.js'

const FC_CLIENT = path.join(NATIVE, 'fc_client')
const FIXTURES = path.join(ROOT, 'fixtures/unbound-snapshot')
/** docs/FORMAT.md's test vector: the seed of packed block 7, zstd, 8192 bytes, pages 3, 9 and 65537 (record 0203000007000000002000009059a3b2). */
const FORMAT_VECTOR_SEED = 'bf2b1d4d'
const clientSkip = !isRoot() ? 'not root (fc_client needs a kernel-mode userfaultfd)' : !fs.existsSync(FC_CLIENT) ? `${FC_CLIENT} is not built (npm run build)` : undefined
if (clientSkip) console.warn(`test/bound-units.test.ts: resumes by a real client are skipped: ${clientSkip}`)

let dir: string
const at = (name: string): string => path.join(dir, name)

function ok(args: string[]): Record<string, unknown> {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}: ${r.stdout}${r.stderr}`).toBe(0)
  return r.json as Record<string, unknown>
}

/** `uffd verify FILE` refuses it, naming `part` with a checksum mismatch. */
function verifyRefuses(file: string, part: RegExp, extra: string[] = []): void {
  const r = uffd(['verify', file, ...extra, '--json'])
  expect(r.status, `${r.stdout}${r.stderr}`).toBe(1)
  const out = r.json as {ok?: boolean; errors?: string[]; error?: {code: string; message: string}}
  const messages = out.errors ?? [out.error?.message ?? '']
  expect(messages.join('\n')).toMatch(part)
}

function opened(file: string): SnapshotReader {
  return SnapshotReader.open(file, file, undefined, true)
}

/**
 * An attacker's edit of `file`'s structures: `edit` changes the bytes (index or table entries),
 * then every structure's CRC is recomputed (tables located by the metadata, the header, its copy
 * in the footer, the index, the zero map, the footer): only the units' CRCs are left as they were.
 */
function craft(file: string, edit: (bytes: Buffer, reader: SnapshotReader) => void): void {
  const reader = opened(file)
  const bytes = fs.readFileSync(file)
  try {
    edit(bytes, reader)
    const {headerSize} = reader.header
    const meta = reader.header.metadata as {workingSet?: {packed?: {offset: number; length: number; crc: string}}; layer?: {blocks: {offset: number; length: number; crc: string}}}
    for (const table of [meta.workingSet?.packed, meta.layer?.blocks]) {
      if (!table) continue
      const fresh = crc32(bytes.subarray(table.offset, table.offset + table.length)).toString(16).padStart(8, '0')
      const where = bytes.subarray(0, headerSize).indexOf(`"crc":"${table.crc}"`)
      expect(where).toBeGreaterThan(0)
      bytes.write(fresh, where + 7, 'latin1')
    }
    const headerCrc = crc32(bytes.subarray(0, headerSize - 8))
    bytes.writeUInt32LE(headerCrc, headerSize - 8)
    const F = bytes.length - FOOTER_SIZE
    const {footer} = reader
    bytes.writeUInt32LE(headerCrc, F + 48)
    bytes.writeUInt32LE(crc32(bytes.subarray(footer.indexOffset, footer.indexOffset + footer.chunkCount * INDEX_ENTRY_SIZE)), F + 40)
    bytes.writeUInt32LE(crc32(bytes.subarray(footer.zeroMapOffset, footer.zeroMapOffset + footer.zeroMapSize)), F + 44)
    bytes.writeUInt32LE(crc32(bytes.subarray(F, F + 60)), F + 60)
  } finally {
    reader.close()
  }
  fs.writeFileSync(file, bytes)
}

/** Gives entry `to` (at `toAt`) the stored bytes of entry `from` (at `fromAt`): offset, length, CRC, codec; its payload length stays its own. */
function pointAt(bytes: Buffer, toAt: number, fromAt: number): void {
  bytes.copy(bytes, toAt, fromAt, fromAt + 12)
  bytes.copy(bytes, toAt + 16, fromAt + 16, fromAt + 21)
}

function copy(from: string, name: string): string {
  fs.copyFileSync(from, at(name))
  return at(name)
}

beforeAll(() => {
  dir = tempDir('uffd-bound-')
  fs.writeFileSync(at('base.raw'), baseImage())
  fs.writeFileSync(at('changed.raw'), changedImage())
  // A layer of three blocks (16, 16 and 8 full pages) over the base.
  const many = baseImage()
  for (let p = 40; p < 80; p++) compressiblePage(5000 + p).copy(many, p * 4096)
  fs.writeFileSync(at('many.raw'), many)
  ok(['snapshot', '--mem-file', at('base.raw'), '-o', at('base.uffd'), '--chunk-size', '64K'])
  ok(['snapshot', '--mem-file', at('many.raw'), '--parent', at('base.uffd'), '-o', at('many.uffd'), '--chunk-size', '64K'])
  fs.writeFileSync(at('ws.ws'), JSON.stringify(workingSetFor(at('base.uffd'))))
  ok(['working-set', 'attach', at('base.uffd'), at('ws.ws'), '-o', at('with-ws.uffd')])
})
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

function workingSetFor(snapshot: string): unknown {
  const r = opened(snapshot)
  const headerCrc = r.header.headerCrc
  r.close()
  return {kind: 'uffd-working-set', version: 1, snapshot: {logicalSize: 1 << 20, pageSize: 4096, headerCrc}, runs: 1, pages: WORKING_SET_PAGES, firstTouchMs: WORKING_SET_PAGES.map((_, i) => i)}
}

describe('the construction', () => {
  it('crc32Combine gives the CRC of the concatenation, and a unit CRC is the CRC of its place record then its bytes', () => {
    for (const [a, b] of [[0, 0], [1, 0], [0, 1], [20, 1], [20, 65536], [3, 4097], [1000, 123_457]]) {
      const x = pseudoRandom(a, a + 1)
      const y = pseudoRandom(b, b + 2)
      expect(crc32Combine(crc32(x), crc32(y), b), `${a}+${b}`).toBe(crc32(Buffer.concat([x, y])))
    }
    const pages = [3, 9, 0x1_0000 + 1]
    const place = {kind: BoundKind.PackedBlock, number: 7, codec: Codec.Zstd, payloadLength: 8192, pages}
    // The record as docs/FORMAT.md lays it out.
    const list = Buffer.alloc(12)
    pages.forEach((p, i) => list.writeUInt32LE(p, 4 * i))
    const record = Buffer.concat([Buffer.from([2, 3, 0, 0, 7, 0, 0, 0, 0, 0x20, 0, 0]), Buffer.alloc(4)])
    record.writeUInt32LE(crc32(list), 12)
    expect(placeRecord(place).equals(record)).toBe(true)
    expect(placeRecord({...place, kind: BoundKind.Chunk, pages: undefined}).subarray(12).equals(Buffer.alloc(4)), 'no page list: 0').toBe(true)
    const stored = pseudoRandom(5000, 9)
    expect(unitCrc(crc32(stored), stored.length, place)).toBe(crc32(Buffer.concat([record, stored])))
    expect(crc32(stored, placeSeed(place))).toBe(crc32(Buffer.concat([record, stored])))
    expect(unitCrc(crc32(stored), stored.length, undefined)).toBe(crc32(stored))
    // The test vector docs/FORMAT.md prints.
    expect(placeSeed(place).toString(16).padStart(8, '0')).toBe(FORMAT_VECTOR_SEED)
    expect(crc32(Buffer.from('uffd bound unit test vector'), placeSeed(place)).toString(16).padStart(8, '0')).toBe('04ff6bdc')
  })

  it('tells apart every two chunks of a file of 2^20, whatever their bytes; blocks that list other pages too', () => {
    for (const [codec, payloadLength] of [[Codec.Zstd, 262144], [Codec.Raw, 4096]]) {
      const seeds = new Set<number>()
      for (let n = 0; n < 1 << 20; n++) seeds.add(placeSeed({kind: BoundKind.Chunk, number: n, codec, payloadLength}))
      expect(seeds.size).toBe(1 << 20)
    }
    const block = {kind: BoundKind.PackedBlock, number: 3, codec: Codec.Zstd, payloadLength: 8192, pages: [10, 11]}
    for (const other of [{...block, number: 4}, {...block, pages: [10, 12]}, {...block, pages: [11, 12]}, {...block, kind: BoundKind.LayerBlock}, {...block, codec: Codec.Lz4}, {...block, payloadLength: 4096}]) {
      expect(placeSeed(other), JSON.stringify(other)).not.toBe(placeSeed(block))
    }
  })
})

describe('what uffd writes', () => {
  /** Each unit's stored CRC is bound to its own place (and is not the CRC of its bytes alone). */
  function expectBound(file: string): void {
    const reader = opened(file)
    try {
      expect(reader.header.incompatFeatures & INCOMPAT_BOUND, file).toBe(INCOMPAT_BOUND)
      for (let unit = 0; unit < reader.unitCount; unit++) {
        const e = reader.entry(unit)
        if (e.codec === Codec.None) continue
        const stored = Buffer.alloc(e.storedLength)
        reader.source.readAt(stored, e.dataOffset)
        expect(e.storedCrc, `${file} unit ${unit}`).toBe(crc32(stored, placeSeed(reader.boundPlace(unit))))
        expect(e.storedCrc, `${file} unit ${unit}`).not.toBe(crc32(stored))
      }
    } finally {
      reader.close()
    }
  }

  it('binds the units of snapshots, layers, attached sets, squashed chains; deduplicated chunks each to their own place', () => {
    const reader = opened(at('base.uffd'))
    const shared = [...reader.index].filter((e) => e.flags & 1)
    expect(shared.length, 'chunks 1, 5 and 7 share their bytes').toBe(3)
    expect(new Set(shared.map((e) => e.dataOffset)).size).toBe(1)
    expect(new Set(shared.map((e) => e.storedCrc)).size, 'each bound to its own place').toBe(3)
    reader.close()
    ok(['squash', at('many.uffd'), '-o', at('squashed.uffd')])
    for (const f of ['base.uffd', 'many.uffd', 'with-ws.uffd', 'squashed.uffd']) expectBound(at(f))
    expect(ok(['verify', at('squashed.uffd'), '--against', at('many.raw')]).ok).toBe(true)
    expect(ok(['verify', at('with-ws.uffd'), '--against', at('base.raw')]).ok).toBe(true)
  })

  it('learned runs are bound too: their CRC is of their place record and their bytes', () => {
    const f = at('learned.uffd')
    const pages = WORKING_SET_PAGES
    // What --learn writes (its own tests resume to get there).
    attachWorkingSet(at('base.uffd'), f, {pages, runs: 1, learned: {runs: [{pages, firstTouchMs: pages.map((_, i) => i)}], keep: 5}}, {codec: 'zstd', level: 1})
    const bound = opened(f)
    const where = (bound.header.metadata.workingSet as {learned: {offset: number; length: number; rawLength: number; crc: string}}).learned
    const stored = Buffer.alloc(where.length)
    bound.source.readAt(stored, where.offset)
    bound.close()
    expect(where.crc).toBe(crc32(stored, placeSeed({kind: BoundKind.LearnedRuns, number: 0, codec: Codec.Zstd, payloadLength: where.rawLength})).toString(16).padStart(8, '0'))
    expect(where.crc).not.toBe(crc32(stored).toString(16).padStart(8, '0'))
    expect(ok(['verify', f]).ok).toBe(true)
    // Copied (cp checks them as it copies).
    expect(ok(['cp', f, at('learned-copy.uffd')])).toBeDefined()
  })
})

describe('files written before the bit (fixtures/unbound-snapshot, by uffd d9898ca)', () => {
  it('read, verify and stat as before; a new layer over one is bound while its base stays as it is', () => {
    for (const [name, raw] of [['base.uffd', 'base.raw'], ['with-ws.uffd', 'base.raw']]) {
      const f = path.join(FIXTURES, name)
      const reader = opened(f)
      expect(reader.header.incompatFeatures & INCOMPAT_BOUND).toBe(0n)
      expect(reader.bound).toBe(false)
      reader.close()
      expect(ok(['verify', f, '--against', at(raw)]).ok, name).toBe(true)
    }
    fs.mkdirSync(at('old'))
    for (const name of ['base.uffd', 'with-ws.uffd', 'layer.uffd']) fs.copyFileSync(path.join(FIXTURES, name), at(`old/${name}`))
    expect(ok(['verify', at('old/layer.uffd'), '--against', at('changed.raw')]).ok).toBe(true)
    const layer = ok(['snapshot', '--mem-file', at('many.raw'), '--parent', at('old/base.uffd'), '-o', at('old/new-layer.uffd'), '--chunk-size', '64K'])
    expect(layer).toBeDefined()
    expect(opened(at('old/new-layer.uffd')).bound).toBe(true)
    expect(ok(['verify', at('old/new-layer.uffd'), '--against', at('many.raw')]).ok).toBe(true)
  })

  it('attach rewrites one unbound, keeping its identity, so layers made on it still resolve', () => {
    const before = opened(at('old/base.uffd'))
    const identity = before.identity
    before.close()
    fs.writeFileSync(at('old/ws.ws'), JSON.stringify(workingSetFor(at('old/base.uffd'))))
    ok(['working-set', 'attach', at('old/base.uffd'), at('old/ws.ws')])
    const after = opened(at('old/base.uffd'))
    expect(after.bound).toBe(false)
    expect(after.identity).toBe(identity)
    after.close()
    expect(ok(['verify', at('old/base.uffd'), '--against', at('base.raw')]).ok).toBe(true)
    expect(ok(['verify', at('old/layer.uffd'), '--against', at('changed.raw')]).ok).toBe(true)
  })
})

/** The crafted files, each with the part a reader must refuse. */
const crafted: {name: string; file: () => string; part: RegExp}[] = [
  {
    name: 'an index entry pointed at another chunk\'s bytes, its CRC copied',
    file: () => {
      const f = copy(at('base.uffd'), 'moved-chunk.uffd')
      craft(f, (bytes, r) => pointAt(bytes, r.footer.indexOffset + 2 * INDEX_ENTRY_SIZE, r.footer.indexOffset + 3 * INDEX_ENTRY_SIZE))
      return f
    },
    part: /chunk 2: checksum mismatch/,
  },
  {
    name: 'a deduplicated entry retargeted at another chunk\'s bytes',
    file: () => {
      const f = copy(at('base.uffd'), 'retargeted.uffd')
      craft(f, (bytes, r) => {
        expect(r.index.at(5).flags & 1).toBe(1)
        pointAt(bytes, r.footer.indexOffset + 5 * INDEX_ENTRY_SIZE, r.footer.indexOffset + 3 * INDEX_ENTRY_SIZE)
      })
      return f
    },
    part: /chunk 5: checksum mismatch/,
  },
  {
    name: 'two packed working-set blocks swapped',
    file: () => {
      const f = copy(at('with-ws.uffd'), 'swapped-blocks.uffd')
      craft(f, (bytes, r) => {
        const table = (r.header.metadata.workingSet as {packed: {offset: number}}).packed.offset
        expect(r.packed!.blocks[0].payloadLength).toBe(r.packed!.blocks[1].payloadLength)
        const first = Buffer.from(bytes.subarray(table, table + 21))
        pointAt(bytes, table, table + PACKED_BLOCK_ENTRY_SIZE)
        first.copy(bytes, table + PACKED_BLOCK_ENTRY_SIZE)
      })
      return f
    },
    part: /packed working set block [01]: checksum mismatch/,
  },
  {
    name: 'a layer block moved to another block\'s place',
    file: () => {
      const f = copy(at('many.uffd'), 'moved-layer-block.uffd')
      craft(f, (bytes, r) => {
        const table = (r.header.metadata.layer as {blocks: {offset: number}}).blocks.offset
        expect(r.layer!.set.blocks.length).toBe(3)
        pointAt(bytes, table + PACKED_BLOCK_ENTRY_SIZE, table)
      })
      return f
    },
    part: /layer block 1: checksum mismatch/,
  },
]

describe('CRC-consistent crafted files', () => {
  it('without the bit (a file written before it) the same crafting passes the checksums: what binding adds', () => {
    const f = copy(path.join(FIXTURES, 'base.uffd'), 'old-moved-chunk.uffd')
    craft(f, (bytes, r) => pointAt(bytes, r.footer.indexOffset + 2 * INDEX_ENTRY_SIZE, r.footer.indexOffset + 3 * INDEX_ENTRY_SIZE))
    // Chunk 2 reads as chunk 3's memory; only a comparison with the image tells.
    expect(ok(['verify', f]).ok).toBe(true)
    const r = uffd(['verify', f, '--against', at('base.raw'), '--json'])
    expect(r.status).toBe(1)
    expect((r.json as {against: {mismatchedPages: number}}).against.mismatchedPages).toBe(16)
  })

  for (const c of crafted) {
    it(`${c.name}: refused by verify`, () => {
      const f = c.file()
      // Every structure checks out: the file opens.
      opened(f).close()
      verifyRefuses(f, c.part)
    })
  }
})

describe.skipIf(clientSkip !== undefined)('resume with a real client (fc_client --verify-all)', () => {

  async function resume(snapshot: string, image: string, extra: string[] = [], clientArgs = ['--touch', 'sequential', '--verify-all']) {
    const socket = at(`${path.basename(snapshot)}.${Math.random().toString(36).slice(2)}.sock`)
    const ready = `${socket}.ready`
    const handler = uffdAsync(['resume', snapshot, '--socket', socket, '--ready-file', ready, '--timeout', '30', '--json', ...extra], {timeoutMs: 90_000})
    for (let i = 0; i < 1200 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
    expect(fs.existsSync(ready), 'the handler never became ready').toBe(true)
    const done = await runFcClient(socket, image, clientArgs)
    return {client: done, handler: await handler}
  }

  it('serves the old-format fixtures byte-exact: a snapshot with a packed working set, and a layer', async () => {
    fs.mkdirSync(at('old-resume'))
    for (const name of ['base.uffd', 'with-ws.uffd', 'layer.uffd']) fs.copyFileSync(path.join(FIXTURES, name), at(`old-resume/${name}`))
    for (const [name, raw] of [['with-ws.uffd', 'base.raw'], ['layer.uffd', 'changed.raw']]) {
      const {client: c, handler} = await resume(at(`old-resume/${name}`), at(raw))
      expect(c.status, `${name}: ${c.stdout}${c.stderr}\n${handler.stderr}`).toBe(0)
      expect(JSON.parse(c.stdout).verify_errors).toBe(0)
      expect(handler.status, handler.stderr).toBe(0)
    }
  }, 120_000)

  for (const c of crafted) {
    it(`${c.name}: the client is killed, never served a wrong byte`, async () => {
      const f = c.file()
      const image = f.includes('layer') ? at('many.raw') : at('base.raw')
      // Decoded in the fault loop and in the decoders alike.
      for (const extra of [['--decoders', '0'], []]) {
        const {client: cl, handler} = await resume(f, image, extra)
        // Killed before it could check (and print) anything: no page it read was wrong.
        expect(cl.signal, `${extra.join(' ')}: ${cl.stdout}${cl.stderr}\n${handler.stderr}`).toBe('SIGKILL')
        expect(cl.stdout).toBe('')
        expect(handler.status).toBe(1)
        expect(handler.stderr).toMatch(c.part)
        expect(JSON.parse(handler.stdout).error.code).toBe('CORRUPT')
      }
    }, 120_000)
  }

  it('from an HTTP server: a bound snapshot is served byte-exact (its fetched extents checked with their seeds), a crafted one refused', async () => {
    const server = await DirRangeServer.start(dir)
    try {
      const good = await resume(server.url('with-ws.uffd'), at('base.raw'), ['--cache-dir', at('cache-good')])
      expect(good.client.status, `${good.client.stdout}${good.client.stderr}\n${good.handler.stderr}`).toBe(0)
      expect(good.handler.status, good.handler.stderr).toBe(0)
      const out = JSON.parse(good.handler.stdout)
      // Every extent passed its seeded check the first time: none was answered "bad" and asked again.
      expect((out.remote ?? out.stats?.remote)?.badResponses, good.handler.stdout).toBe(0)
      const moved = path.basename(crafted[0].file())
      const bad = await resume(server.url(moved), at('base.raw'), ['--cache-dir', at('cache-bad')])
      expect(bad.client.signal, `${bad.client.status} ${bad.client.stdout} ${bad.client.stderr}\n${bad.handler.stderr}\n${bad.handler.stdout}`).toBe('SIGKILL')
      expect(bad.client.stdout).toBe('')
      expect(bad.handler.stderr).toMatch(/chunk 2: checksum mismatch/)
    } finally {
      await server.close()
    }
  }, 120_000)
})
