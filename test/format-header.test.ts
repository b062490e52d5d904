import fc from 'fast-check'
import {describe, expect, it} from 'vitest'
import {crc32} from 'node:zlib'

import {Codec, RegionKind} from '../src/format/constants.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {Geometry} from '../src/format/geometry.js'
import {decodeHeader, encodeHeader, type HeaderFields, type Region} from '../src/format/header.js'
import {type ChunkEntry, ChunkIndex, decodeFooter, decodeIndex, decodeZeroMap, encodeFooter, encodeIndex} from '../src/format/index-table.js'
import {ZeroMap} from '../src/format/zero-map.js'

const region = (imageOffset: number, size: number, name: string, kind = RegionKind.ProcessVma): Region => ({
  kind,
  imageOffset,
  size,
  address: 0x7f00_0000_0000 + imageOffset,
  fileOffset: 4096,
  prot: 5,
  flags: 2,
  owner: 1234,
  name,
})

const fields = (over: Partial<HeaderFields> = {}): HeaderFields => ({
  incompatFeatures: 0n,
  compatFeatures: 0n,
  pageSize: 4096,
  chunkSize: 65536,
  logicalSize: 5 * 65536 + 100,
  regions: [region(0, 65536, '/usr/lib/libc.so.6'), region(65536, 2 * 65536, '[heap]'), region(4 * 65536, 4096, 'ünïcode path')],
  metadata: {source: 'process', pid: 1234, command: 'sleep 100'},
  ...over,
})

function expectFormatError(fn: () => unknown, code: string, text: RegExp): void {
  try {
    fn()
  } catch (error) {
    expect(error).toBeInstanceOf(SnapshotFormatError)
    expect((error as SnapshotFormatError).code).toBe(code)
    expect((error as Error).message).toMatch(text)
    return
  }
  throw new Error('expected a SnapshotFormatError')
}

/** Rewrites the header CRC after a deliberate edit, to reach checks behind the checksum. */
function resealed(buf: Buffer): Buffer {
  buf.writeUInt32LE(crc32(buf.subarray(0, buf.length - 8)), buf.length - 8)
  return buf
}

describe('header', () => {
  it('round-trips every field', () => {
    const f = fields()
    const buf = encodeHeader(f)
    expect(buf.length % 8).toBe(0)
    const h = decodeHeader(buf, buf.length + 1000)
    expect(h).toMatchObject({...f, major: 1, minor: 0, headerSize: buf.length})
  })

  it('round-trips random region tables and metadata', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({min: 0, max: 4}), fc.integer({min: 1, max: 4}), fc.string({maxLength: 40})), {maxLength: 20}), fc.dictionary(fc.string(), fc.jsonValue()), (specs, metadata) => {
        let at = 0
        const regions = specs.map(([gap, pages, name]) => {
          const r = region((at += gap * 4096), pages * 4096, name)
          at += pages * 4096
          return r
        })
        const f = fields({regions, metadata, logicalSize: at + 1})
        const h = decodeHeader(encodeHeader(f), 1 << 30)
        expect(h.regions).toEqual(regions)
        expect(h.metadata).toEqual(JSON.parse(JSON.stringify(metadata)))
      }),
      {numRuns: 300},
    )
  })

  it('refuses bad magic, future versions, unknown incompatible features', () => {
    const buf = encodeHeader(fields())
    const other = Buffer.from(buf)
    other.write('NOTSNAPS', 0, 'ascii')
    expectFormatError(() => decodeHeader(other, 1 << 20), 'NOT_A_SNAPSHOT', /bad magic/)
    const future = Buffer.from(buf)
    future.writeUInt16LE(2, 8)
    expectFormatError(() => decodeHeader(future, 1 << 20), 'UNSUPPORTED_VERSION', /version 2\.0 is not supported/)
    const feature = Buffer.from(buf)
    feature.writeBigUInt64LE(1n << 5n, 16)
    expectFormatError(() => decodeHeader(resealed(feature), 1 << 20), 'UNSUPPORTED_VERSION', /incompatible features.*0x20/)
    const compat = Buffer.from(buf)
    compat.writeBigUInt64LE(1n << 7n, 24)
    expect(decodeHeader(resealed(compat), 1 << 20).compatFeatures).toBe(1n << 7n)
  })

  it('detects any flipped byte', () => {
    const buf = encodeHeader(fields())
    for (let i = 0; i < buf.length; i++) {
      const bad = Buffer.from(buf)
      bad[i] ^= 0x40
      expect(() => decodeHeader(bad, 1 << 20), `byte ${i}`).toThrow(SnapshotFormatError)
    }
  })

  it('checks sizes and regions behind a valid checksum', () => {
    const buf = encodeHeader(fields())
    const pages = Buffer.from(buf)
    pages.writeUInt32LE(8192, 32)
    expectFormatError(() => decodeHeader(resealed(pages), 1 << 20), 'INVALID', /page size 8192/)
    const chunk = Buffer.from(buf)
    chunk.writeUInt32LE(65536 * 3, 36)
    expectFormatError(() => decodeHeader(resealed(chunk), 1 << 20), 'INVALID', /power of two/)
    const small = Buffer.from(buf)
    small.writeBigUInt64LE(4096n, 40)
    expectFormatError(() => decodeHeader(resealed(small), 1 << 20), 'INVALID', /region 0: ends at 65536, past the image/)
    expectFormatError(() => decodeHeader(buf, buf.length - 1), 'TRUNCATED', /runs past the end/)
    const count = Buffer.from(buf)
    count.writeUInt32LE(1_000_000, 48)
    expectFormatError(() => decodeHeader(resealed(count), 1 << 20), 'CORRUPT', /do not match the header size/)
  })

  it('refuses to encode overlapping or unaligned regions', () => {
    expect(() => encodeHeader(fields({regions: [region(0, 8192, 'a'), region(4096, 4096, 'b')]}))).toThrow(/before the end/)
    expect(() => encodeHeader(fields({regions: [region(100, 4096, 'a')]}))).toThrow(/page-aligned/)
    expect(() => encodeHeader(fields({regions: [region(0, 1 << 30, 'a')]}))).toThrow(/past the image/)
  })
})

describe('footer, index and zero map', () => {
  const geometry = new Geometry(4096, 16384, 3 * 16384 + 4096)
  const headerSize = 256
  // Chunk 0: 4 pages, page 1 zero; chunk 1: all zero; chunk 2: no zero pages; chunk 3: 1 page.
  const zeroMap = new ZeroMap(geometry.pageCount)
  ;[1, 4, 5, 6, 7].forEach((p) => zeroMap.setZero(p))
  const entries: ChunkEntry[] = [
    {dataOffset: 256, storedLength: 100, payloadLength: 3 * 4096, storedCrc: 1, codec: 3, flags: 0},
    {dataOffset: 0, storedLength: 0, payloadLength: 0, storedCrc: 0, codec: 0, flags: 0},
    {dataOffset: 356, storedLength: 16384, payloadLength: 16384, storedCrc: 2, codec: 1, flags: 0},
    {dataOffset: 16740, storedLength: 50, payloadLength: 4096, storedCrc: 3, codec: 2, flags: 0},
  ]
  const index = encodeIndex(entries)
  const indexOffset = 16790
  const zeroMapOffset = indexOffset + index.length
  const fileSize = zeroMapOffset + zeroMap.bytes.length + 64
  const footer = {indexOffset, chunkCount: 4, zeroMapOffset, zeroMapSize: zeroMap.bytes.length, indexCrc: crc32(index), zeroMapCrc: crc32(zeroMap.bytes), headerCrc: 0xabcdef}

  it('round-trips', () => {
    const f = decodeFooter(encodeFooter(footer), fileSize, headerSize, 0xabcdef, geometry)
    expect(f).toEqual(footer)
    const map = decodeZeroMap(Buffer.from(zeroMap.bytes), f, geometry)
    expect([...decodeIndex(index, f, headerSize, geometry, map)]).toEqual(entries)
  })

  it('refuses a footer from another header, a wrong chunk count, out-of-file offsets', () => {
    expectFormatError(() => decodeFooter(encodeFooter(footer), fileSize, headerSize, 1, geometry), 'CORRUPT', /different header/)
    expectFormatError(() => decodeFooter(encodeFooter({...footer, chunkCount: 5}), fileSize, headerSize, 0xabcdef, geometry), 'CORRUPT', /chunk count 5/)
    expectFormatError(() => decodeFooter(encodeFooter({...footer, indexOffset: fileSize}), fileSize, headerSize, 0xabcdef, geometry), 'CORRUPT', /index .* outside/)
    expectFormatError(() => decodeFooter(encodeFooter({...footer, zeroMapOffset: 10}), fileSize, headerSize, 0xabcdef, geometry), 'CORRUPT', /zero map .* outside/)
    const torn = encodeFooter(footer)
    torn[20] ^= 1
    expectFormatError(() => decodeFooter(torn, fileSize, headerSize, 0xabcdef, geometry), 'CORRUPT', /footer: checksum/)
    expectFormatError(() => decodeFooter(Buffer.alloc(64), fileSize, headerSize, 0xabcdef, geometry), 'TRUNCATED', /no footer/)
  })

  it('cross-checks index entries against the zero map and the data section', () => {
    const f = decodeFooter(encodeFooter(footer), fileSize, headerSize, 0xabcdef, geometry)
    const map = decodeZeroMap(Buffer.from(zeroMap.bytes), f, geometry)
    const check = (edit: Partial<ChunkEntry>, at: number, text: RegExp): void => {
      const edited = entries.map((e, i) => (i === at ? {...e, ...edit} : e))
      const bytes = encodeIndex(edited)
      expectFormatError(() => decodeIndex(bytes, {...f, indexCrc: crc32(bytes)}, headerSize, geometry, map), 'CORRUPT', text)
    }
    check({payloadLength: 4 * 4096}, 0, /disagrees with the zero map/)
    check({codec: 9 as Codec}, 0, /unknown codec 9/)
    check({storedLength: 100}, 2, /raw data of 100 bytes/)
    check({dataOffset: 100}, 0, /outside the data section/)
    check({dataOffset: indexOffset - 10}, 0, /outside the data section/)
    check({storedLength: 1 << 20}, 3, /impossible/)
    check({flags: 4}, 0, /unknown flags/)
    expectFormatError(() => decodeIndex(Buffer.from(index).fill(1, 0, 1), f, headerSize, geometry, map), 'CORRUPT', /index: checksum/)
  })
})

describe('ChunkIndex', () => {
  const entry = fc.record({
    dataOffset: fc.integer({min: 0, max: Number.MAX_SAFE_INTEGER}),
    storedLength: fc.nat({max: 0xffff_ffff}),
    payloadLength: fc.nat({max: 0xffff_ffff}),
    storedCrc: fc.nat({max: 0xffff_ffff}),
    codec: fc.constantFrom(0, 1, 2, 3) as fc.Arbitrary<Codec>,
    flags: fc.nat({max: 1}),
  })

  it('reads back every field of what it encodes, sealed or not, offsets past 4 GiB included', () => {
    fc.assert(
      fc.property(fc.array(entry, {maxLength: 40}), fc.boolean(), (entries, sealed) => {
        const expected = entries.map((e, c) => (sealed && e.codec !== 0 ? {...e, sealedAs: c} : e))
        const index = ChunkIndex.of(entries, sealed)
        expect(index.length).toBe(entries.length)
        expect([...index]).toEqual(expected)
        expect([...index.keys()]).toEqual(entries.map((_, c) => c))
        expected.forEach((e, c) => {
          expect(index.at(c)).toEqual(e)
          expect(index.codec(c)).toBe(e.codec)
        })
        expect(() => index.at(entries.length)).toThrow(RangeError)
        expect(() => index.at(-1)).toThrow(RangeError)
      }),
    )
  })

  it('ofRawChunks is the index of raw chunks of those payload lengths (codec none for 0)', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(fc.constant(0), fc.nat({max: 0xffff_ffff})), {maxLength: 40}), (lengths) => {
        const expected = lengths.map((n): ChunkEntry => ({dataOffset: 0, storedLength: n, payloadLength: n, storedCrc: 0, codec: n === 0 ? Codec.None : Codec.Raw, flags: 0}))
        expect([...ChunkIndex.ofRawChunks(Uint32Array.from(lengths))]).toEqual([...ChunkIndex.of(expected)])
      }),
    )
  })
})
