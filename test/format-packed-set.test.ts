import {crc32} from 'node:zlib'

import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {Geometry} from '../src/format/geometry.js'
import {checkPackedLocation, decodePackedTable, encodePackedTable, type PackedBlock, packedBlockRuns, PackedPageLookup, packedTableLength, planPackedBlocks, zeroRunWindowBytes} from '../src/format/packed-set.js'
import {ZeroMap} from '../src/format/zero-map.js'

const geometry = new Geometry(4096, 64 * 1024, 256 * 4096) // 256 pages, 16 per chunk
const DATA_START = 4096
const DATA_END = 1 << 24

/** A well-formed table for `pages` (touch order), blocks of `perBlock`, raw blocks laid out in order. */
function build(pages: number[], perBlock: number, zero: ZeroMap): {blocks: PackedBlock[]; list: Uint32Array; table: Buffer} {
  const plans = planPackedBlocks(pages, perBlock)
  let at = DATA_START
  const blocks = plans.map((p) => {
    const payloadLength = p.pages.filter((x) => !zero.isZero(x)).length * 4096
    const b: PackedBlock = {dataOffset: payloadLength ? at : 0, storedLength: payloadLength, payloadLength, storedCrc: 0, codec: payloadLength ? Codec.Raw : Codec.None, flags: 0, listStart: p.listStart, pageCount: p.pageCount}
    at += payloadLength
    return b
  })
  const list = Uint32Array.from(plans.flatMap((p) => p.pages))
  return {blocks, list, table: encodePackedTable({blocks, pages: list})}
}

const location = (table: Buffer, blocks: number, pages: number) => ({offset: DATA_START, length: table.length, crc: 0, blocks, pages})
const withCrc = (table: Buffer, blocks: number, pages: number) => ({...location(table, blocks, pages), crc: crc32(table)})

describe('planPackedBlocks', () => {
  it('keeps touch order between blocks, sorts within one, and covers every page once', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({min: 0, max: 255}), {maxLength: 200}), fc.integer({min: 1, max: 16}), (pages, perBlock) => {
        const plans = planPackedBlocks(pages, perBlock)
        expect(plans.flatMap((p) => p.pages).sort((a, b) => a - b)).toEqual([...pages].sort((a, b) => a - b))
        plans.forEach((p, i) => {
          expect(p.listStart).toBe(i * perBlock)
          expect(p.pages).toEqual([...pages.slice(i * perBlock, (i + 1) * perBlock)].sort((a, b) => a - b))
        })
      }),
    )
  })
})

describe('PackedPageLookup', () => {
  it('finds the block of every packed page and no block for any other page', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({min: 0, max: 255}), {maxLength: 200}), fc.integer({min: 1, max: 16}), (pages, perBlock) => {
        const {blocks, list} = build(pages, perBlock, new ZeroMap(256))
        const lookup = new PackedPageLookup({blocks, pages: list})
        const oracle = new Map<number, number>()
        blocks.forEach((b, i) => list.slice(b.listStart, b.listStart + b.pageCount).forEach((page) => oracle.set(page, i)))
        for (let page = 0; page < 256; page++) expect(lookup.blockOf(page)).toBe(oracle.get(page) ?? -1)
      }),
    )
  })
})

describe('packed table', () => {
  it('splits each block into runs of one kind that cover its pages in order, data runs at their payload position', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({min: 0, max: 255}), {maxLength: 200}), fc.integer({min: 1, max: 16}), fc.array(fc.boolean(), {minLength: 256, maxLength: 256}), (pages, perBlock, zeros) => {
        const zero = new ZeroMap(256)
        zeros.forEach((z, p) => z && zero.setZero(p))
        const {blocks, list} = build(pages, perBlock, zero)
        for (let b = 0; b < blocks.length; b++) {
          const runs = packedBlockRuns({blocks, pages: list}, b, zero)
          const blockPages = Array.from(list.subarray(blocks[b].listStart, blocks[b].listStart + blocks[b].pageCount))
          const dataPages = blockPages.filter((p) => !zero.isZero(p))
          const covered: number[] = []
          for (let i = 0; i < runs.length; i += 3) {
            const [first, count, payloadPage] = [runs[i], runs[i + 1], runs[i + 2]]
            expect(count).toBeGreaterThan(0)
            for (let p = first; p < first + count; p++) {
              covered.push(p)
              expect(zero.isZero(p)).toBe(payloadPage < 0)
              // A data page's bytes are at its position among the block's data pages.
              if (payloadPage >= 0) expect(dataPages.indexOf(p)).toBe(payloadPage + p - first)
            }
            // Maximal: the next run does not continue this one with pages of the same kind.
            if (i + 3 < runs.length) expect(runs[i + 3] === first + count && runs[i + 5] < 0 === payloadPage < 0).toBe(false)
          }
          expect(covered).toEqual(blockPages)
        }
      }),
    )
  })

  it('grows zero runs over 2 MiB windows for sets of isolated pages, 256 KiB for sets that come in runs', () => {
    const setOf = (pages: number[]) => ({blocks: [], pages: Uint32Array.from(pages)})
    // Every 8th page, in touch order: no page has a set neighbour.
    expect(zeroRunWindowBytes(setOf([80, 8, 0, 160, 24, 16]))).toBe(2 * 1024 * 1024)
    // Runs of 4 in any order: 3 of 4 pages have their successor in the set.
    expect(zeroRunWindowBytes(setOf([103, 100, 102, 101, 3, 0, 2, 1]))).toBe(256 * 1024)
    // One adjacent pair among five pages is not "in runs".
    expect(zeroRunWindowBytes(setOf([0, 1, 10, 20, 30]))).toBe(2 * 1024 * 1024)
  })

  it('round-trips any set through encode and decode', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({min: 0, max: 255}), {maxLength: 256}), fc.array(fc.boolean(), {minLength: 256, maxLength: 256}), (pages, zeros) => {
        const zero = new ZeroMap(256)
        zeros.forEach((z, p) => z && zero.setZero(p))
        const {blocks, list, table} = build(pages, 16, zero)
        expect(table.length).toBe(packedTableLength(blocks.length, list.length))
        const decoded = decodePackedTable(table, withCrc(table, blocks.length, list.length), DATA_START, DATA_END, geometry, zero)
        expect(decoded.blocks).toEqual(blocks)
        expect([...decoded.pages]).toEqual([...list])
      }),
    )
  })

  it('refuses tables that lie, naming the block', () => {
    const zero = new ZeroMap(256)
    const pages = [9, 3, 200, 17, 18, 100]
    const cases: [string, (t: Buffer) => void, RegExp][] = [
      ['a page outside the image', (t) => t.writeUInt32LE(999, 2 * 32), /page 999 is outside/],
      ['pages out of order', (t) => t.writeUInt32LE(250, 2 * 32), /not ascending/],
      ['a payload that disagrees with the pages', (t) => t.writeUInt32LE(4096, 12), /disagrees/],
      ['blocks that do not partition the list', (t) => t.writeUInt32LE(1, 32 + 24), /expected/],
      ['an unknown codec', (t) => t.writeUInt8(9, 20), /unknown codec/],
      ['stored bytes outside the data section', (t) => t.writeBigUInt64LE(BigInt(DATA_END), 0), /outside the data section/],
      ['a reserved byte set', (t) => t.writeUInt8(1, 21), /reserved/],
    ]
    for (const [what, damage, message] of cases) {
      const {blocks, list, table} = build(pages, 4, zero)
      damage(table)
      const decode = () => decodePackedTable(table, withCrc(table, blocks.length, list.length), DATA_START, DATA_END, geometry, zero)
      expect(decode, what).toThrow(SnapshotFormatError)
      expect(decode, what).toThrow(message)
    }
    // A page in two blocks.
    const {blocks, list} = build(pages, 4, zero)
    list[4] = 3
    const twice = encodePackedTable({blocks, pages: list})
    expect(() => decodePackedTable(twice, withCrc(twice, blocks.length, list.length), DATA_START, DATA_END, geometry, zero)).toThrow(/packed twice/)
  })

  it('checks the table CRC and the location before reading', () => {
    const zero = new ZeroMap(256)
    const {blocks, list, table} = build([1, 2, 3], 16, zero)
    expect(() => decodePackedTable(table, {...withCrc(table, blocks.length, list.length), crc: 1}, DATA_START, DATA_END, geometry, zero)).toThrow(/checksum mismatch/)
    const good = {offset: DATA_START, length: table.length, crc: '0000abcd', blocks: blocks.length, pages: list.length}
    expect(checkPackedLocation(good, DATA_START, DATA_END, geometry).crc).toBe(0xabcd)
    expect(() => checkPackedLocation({...good, crc: 12}, DATA_START, DATA_END, geometry)).toThrow(/8 hex digits/)
    expect(() => checkPackedLocation({...good, length: 8}, DATA_START, DATA_END, geometry)).toThrow(/cannot hold/)
    expect(() => checkPackedLocation({...good, offset: DATA_END - 4}, DATA_START, DATA_END, geometry)).toThrow(/outside the data section/)
    expect(() => checkPackedLocation('x', DATA_START, DATA_END, geometry)).toThrow(/not an object/)
  })
})
