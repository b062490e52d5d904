// The decoded-chunk cache of uffd resume: against an LRU model for any sequence of lookups and
// adoptions (what it returns, what it keeps, what it counts, the budget), the reuse of evicted
// buffers, a unit that fails its check, and a real snapshot's payloads.
import fs from 'node:fs'
import path from 'node:path'

import fc from 'fast-check'
import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {Codec} from '../src/format/constants.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {ChunkCache} from '../src/resume/fault-loop/chunk-cache.js'
import {RunStats} from '../src/resume/run-stats.js'
import {memFileInput} from '../src/snapshot/inputs.js'
import {SnapshotReader} from '../src/snapshot/reader.js'
import {writeSnapshot} from '../src/snapshot/writer.js'
import {makeImage, tempDir} from './helpers/images.js'

const CHUNK = 4096 * 4

/** The byte every payload of `unit` is filled with, so a payload read back says whose it is. */
const fillOf = (unit: number): number => (unit * 37 + 1) & 0xff

/**
 * A reader of `lengths.length` units whose payload lengths are `lengths` (0: an all-zero unit,
 * which decodes to an empty buffer of its own, as SnapshotReader's does); `corrupt` units fail.
 */
class FakeReader {
  readonly geometry = {chunkSize: CHUNK}
  decodes = 0
  constructor(
    private readonly lengths: number[],
    private readonly corrupt = new Set<number>(),
    /** Units whose stored bytes are not on this host (a remote snapshot's, not fetched yet). */
    readonly remote = new Set<number>(),
  ) {}

  entry(unit: number): {payloadLength: number; codec: Codec} {
    return {payloadLength: this.lengths[unit], codec: this.lengths[unit] === 0 ? Codec.None : Codec.Raw}
  }

  readPayload(unit: number, dst: Buffer): Buffer {
    this.decodes++
    if (this.corrupt.has(unit)) throw new SnapshotFormatError('CORRUPT', `chunk ${unit}`, 'checksum mismatch')
    if (this.lengths[unit] === 0) return Buffer.alloc(0)
    return dst.subarray(0, this.lengths[unit]).fill(fillOf(unit))
  }

  readPayloadIfLocal(unit: number, dst: Buffer): Buffer | undefined {
    return this.remote.has(unit) ? undefined : this.readPayload(unit, dst)
  }
}

function cacheOf(reader: FakeReader, budget: number): {cache: ChunkCache; stats: RunStats} {
  const stats = new RunStats()
  return {cache: new ChunkCache(reader as unknown as SnapshotReader, budget, stats), stats}
}

/** The cache's contract: least recently used out first, within the budget, keeping the newest. */
class LruModel {
  readonly order: number[] = []
  hits = 0
  misses = 0
  constructor(
    private readonly lengths: number[],
    private readonly budget: number,
  ) {}

  get bytes(): number {
    return this.order.reduce((n, u) => n + this.lengths[u], 0)
  }

  payload(unit: number): void {
    const at = this.order.indexOf(unit)
    if (at >= 0) {
      this.hits++
      this.order.splice(at, 1)
    } else {
      this.misses++
    }
    this.order.push(unit)
    this.evict()
  }

  adopt(unit: number): void {
    if (this.order.includes(unit)) return
    this.order.push(unit)
    this.evict()
  }

  private evict(): void {
    while (this.bytes > this.budget && this.order.length > 1) this.order.shift()
  }
}

describe('ChunkCache', () => {
  const units = 12
  const lengths = fc.array(fc.integer({min: 1, max: 4}).map((pages) => pages * 4096), {minLength: units, maxLength: units})
  const op = fc.oneof(fc.record({kind: fc.constant('payload' as const), unit: fc.nat(units - 1)}), fc.record({kind: fc.constant('adopt' as const), unit: fc.nat(units - 1)}))

  it('behaves as an LRU model: the bytes it returns, what it keeps, its counters and its budget', () => {
    fc.assert(
      fc.property(lengths, fc.integer({min: 0, max: 6 * CHUNK}), fc.array(op, {maxLength: 80}), (sizes, budget, ops) => {
        const reader = new FakeReader(sizes)
        const {cache, stats} = cacheOf(reader, budget)
        const model = new LruModel(sizes, budget)
        for (const {kind, unit} of ops) {
          if (kind === 'payload') {
            const payload = cache.payload(unit)!
            model.payload(unit)
            expect(payload.length).toBe(sizes[unit])
            expect(payload.every((b) => b === fillOf(unit))).toBe(true)
          } else {
            // A payload decoded elsewhere (a decoder slot that is reused): the cache keeps a copy.
            const decoded = Buffer.alloc(sizes[unit], fillOf(unit))
            cache.adopt(unit, decoded)
            decoded.fill(0)
            model.adopt(unit)
          }
          for (let u = 0; u < units; u++) expect(cache.has(u), `unit ${u} after ${kind} ${unit}`).toBe(model.order.includes(u))
          expect(model.bytes <= budget || model.order.length === 1).toBe(true)
        }
        expect(stats.get('cacheHits')).toBe(model.hits)
        expect(stats.get('cacheMisses')).toBe(model.misses)
        // Decoded once per miss, never for a hit or an adoption.
        expect(stats.get('chunksDecoded')).toBe(model.misses)
        expect(reader.decodes).toBe(model.misses)
      }),
      {numRuns: 300},
    )
  })

  it('keeps the newest payload even when it alone exceeds the budget', () => {
    const {cache} = cacheOf(new FakeReader([CHUNK, CHUNK]), 100)
    cache.payload(0)
    expect(cache.has(0)).toBe(true)
    cache.payload(1)
    expect([cache.has(0), cache.has(1)]).toEqual([false, true])
  })

  it('reuses the buffers of evicted payloads for new ones instead of allocating', () => {
    const reader = new FakeReader(Array.from({length: 8}, () => CHUNK))
    const {cache} = cacheOf(reader, CHUNK)
    const first = cache.payload(0)!
    const second = cache.payload(1)! // evicts 0: its buffer is kept aside
    expect(second.buffer).not.toBe(first.buffer)
    const third = cache.payload(2)! // evicts 1, decodes into 0's old buffer
    expect(third.buffer).toBe(first.buffer)
    expect(third.every((b) => b === fillOf(2))).toBe(true)
  })

  it('a unit whose bytes are not on this host is undefined, not kept, and its buffer goes to the next unit', () => {
    const reader = new FakeReader([CHUNK, CHUNK], new Set(), new Set([0]))
    const {cache, stats} = cacheOf(reader, 4 * CHUNK)
    expect(cache.payload(0)).toBeUndefined()
    expect(cache.has(0)).toBe(false)
    expect(stats.get('chunksDecoded')).toBe(0)
    const next = cache.payload(1)!
    expect(next.every((b) => b === fillOf(1))).toBe(true)
    // Landed: the same lookup decodes it now.
    reader.remote.delete(0)
    expect(cache.payload(0)!.every((b) => b === fillOf(0))).toBe(true)
    expect(stats.get('chunksDecoded')).toBe(2)
  })

  it('a unit that fails its check throws, is not kept, and is counted as a miss, not a decode', () => {
    const {cache, stats} = cacheOf(new FakeReader([CHUNK, CHUNK], new Set([1])), 4 * CHUNK)
    cache.payload(0)
    expect(() => cache.payload(1)).toThrow(expect.objectContaining({code: 'CORRUPT'}))
    expect(cache.has(1)).toBe(false)
    expect(() => cache.payload(1)).toThrow(SnapshotFormatError)
    expect({misses: stats.get('cacheMisses'), decoded: stats.get('chunksDecoded'), hits: stats.get('cacheHits')}).toEqual({misses: 3, decoded: 1, hits: 0})
    // What it held before is still served.
    expect(cache.payload(0)!.every((b) => b === fillOf(0))).toBe(true)
    expect(stats.get('cacheHits')).toBe(1)
  })

  it('evicts an all-zero unit (an empty payload that is no chunk-sized buffer) like any other', () => {
    const {cache} = cacheOf(new FakeReader([0, CHUNK, CHUNK]), CHUNK)
    expect(cache.payload(0)!.length).toBe(0)
    cache.payload(1)
    cache.payload(2) // evicts 0 and 1
    expect([cache.has(0), cache.has(1), cache.has(2)]).toEqual([false, false, true])
    expect(cache.payload(1)!.every((b) => b === fillOf(1))).toBe(true)
  })
})

describe('ChunkCache over a real snapshot', () => {
  let dir: string
  let reader: SnapshotReader
  beforeAll(async () => {
    dir = tempDir('uffd-chunk-cache-test-')
    const raw = path.join(dir, 'image.mem')
    fs.writeFileSync(raw, makeImage('mixed', 1 << 20, 5))
    await writeSnapshot(memFileInput(raw), path.join(dir, 'image.uffd'), {codec: 'zstd', level: 1, chunkSize: 65536, pageSize: 4096, jobs: 1})
    reader = SnapshotReader.open(path.join(dir, 'image.uffd'))
  })
  afterAll(() => {
    reader?.close()
    fs.rmSync(dir, {recursive: true, force: true})
  })

  it("returns each chunk's verified payload, from the cache or decoded again after eviction", () => {
    const stats = new RunStats()
    const cache = new ChunkCache(reader, 3 * 65536, stats)
    const withData = [...reader.index].flatMap((e, c) => (e.codec === Codec.None ? [] : [c]))
    expect(withData.length).toBeGreaterThan(4)
    const expected = new Map(withData.map((c) => [c, Buffer.from(reader.readPayload(c))]))
    for (const round of [0, 1]) {
      for (const c of withData) expect(cache.payload(c)!.equals(expected.get(c)!), `chunk ${c}, round ${round}`).toBe(true)
    }
    // A budget of three chunks over more than four: the second round decodes everything again.
    expect(stats.get('cacheMisses')).toBe(2 * withData.length)
    expect(cache.payload(withData.at(-1)!)!.equals(expected.get(withData.at(-1)!)!)).toBe(true)
    expect(stats.get('cacheHits')).toBe(1)
  })
})
