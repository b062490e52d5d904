// The pieces of the CRIU lazy-pages daemon that need no criu: the restore stream's framing, how
// the address map follows mremap/munmap, and what a forked child inherits.
import fs from 'node:fs'

import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {AddressMap} from '../src/resume/fault-loop/address-map.js'
import {PAGE_MISSING, PAGE_PRESENT, PAGE_REMOVED, PageStates} from '../src/resume/fault-loop/page-states.js'
import {RESTORE_FINISHED, RestoreCandidate, RestoreStream} from '../src/resume/main/criu-session.js'
import {closeFd, createUserfaultfd} from '../src/sys/index.js'
import {type GuestRegion} from '../src/resume/main/handshake.js'

const P = 4096

function int32(value: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeInt32LE(value)
  return b
}

describe('RestoreStream', () => {
  it('parses pids, uffds, zombies and RSTF however the bytes are split', () => {
    // Task 100 (fd 7), zombie 101, task 102 (fd 9), then RSTF; fds ride on the one-byte messages.
    const parts: [Buffer, number[]][] = [
      [int32(100), []],
      [Buffer.from([0]), [7]],
      [int32(-101), []],
      [int32(102), []],
      [Buffer.from([0]), [9]],
      [int32(RESTORE_FINISHED), []],
    ]
    const bytes = Buffer.concat(parts.map(([b]) => b))
    fc.assert(
      fc.property(fc.array(fc.integer({min: 1, max: bytes.length}), {maxLength: 6}), (cuts) => {
        const stream = new RestoreStream()
        const got: unknown[] = []
        // Split anywhere, but an fd always comes with its byte (the kernel delivers them together).
        const fdAt = new Map([
          [4, 7],
          [13, 9],
        ])
        const points = [...new Set([0, ...cuts, bytes.length])].sort((a, b) => a - b)
        for (let i = 0; i + 1 < points.length; i++) {
          const fds = [...fdAt].filter(([at]) => at >= points[i] && at < points[i + 1]).map(([, fd]) => fd)
          stream.push(bytes.subarray(points[i], points[i + 1]), fds)
          for (let m = stream.next(); m; m = stream.next()) got.push(m)
        }
        expect(got).toEqual([{kind: 'task', pid: 100, uffd: 7}, {kind: 'zombie', pid: 101}, {kind: 'task', pid: 102, uffd: 9}, {kind: 'finished'}])
      }),
    )
  })

  it('refuses a task without its uffd', () => {
    const stream = new RestoreStream()
    stream.push(Buffer.concat([int32(5), Buffer.from([0])]), [])
    expect(() => stream.next()).toThrow(/task 5 without its userfaultfd/)
  })

  it('peek shows the next message and leaves it, with its fd, for next', () => {
    const stream = new RestoreStream()
    stream.push(int32(100), [])
    expect(stream.peek()).toBeUndefined()
    stream.push(Buffer.from([0]), [7])
    expect(stream.peek()).toEqual({kind: 'task', pid: 100, uffd: 7})
    expect(stream.peek()).toEqual({kind: 'task', pid: 100, uffd: 7})
    expect(stream.next()).toEqual({kind: 'task', pid: 100, uffd: 7})
    expect(stream.next()).toBeUndefined()
  })
})

describe('RestoreCandidate: is this connection the restore?', () => {
  const regions = new Map<number, GuestRegion[]>([
    [100, []],
    [101, []],
  ])
  const judged = (data: Buffer, fds: number[]): ReturnType<RestoreCandidate['judge']> => {
    const candidate = new RestoreCandidate(false)
    candidate.stream.push(data, fds)
    return candidate.judge(regions)
  }

  it('waits for a whole first message', () => {
    expect(judged(Buffer.alloc(0), [])).toEqual({state: 'waiting'})
    expect(judged(int32(100), [])).toEqual({state: 'waiting'})
  })

  it('takes a task of the dump with a userfaultfd, or a zombie of the dump', () => {
    const uffd = createUserfaultfd()
    try {
      expect(judged(Buffer.concat([int32(100), Buffer.from([0])]), [uffd])).toEqual({state: 'restore'})
    } finally {
      closeFd(uffd)
    }
    expect(judged(int32(-101), [])).toEqual({state: 'restore'})
  })

  it('turns away a pid not in the dump, a non-uffd, RSTF first, or bytes of another protocol', () => {
    const devNull = fs.openSync('/dev/null', 'r')
    try {
      expect(judged(Buffer.concat([int32(100), Buffer.from([0])]), [devNull])).toMatchObject({state: 'refused', code: 'CRIU_PROTOCOL', reason: 'task 100 came with a file descriptor that is not a userfaultfd'})
    } finally {
      fs.closeSync(devNull)
    }
    expect(judged(int32(-7), [])).toMatchObject({state: 'refused', reason: 'its first task, pid 7, is not a task of this dump'})
    expect(judged(int32(RESTORE_FINISHED), [])).toMatchObject({state: 'refused', reason: 'it announced the end of a restore before any task'})
    expect(judged(Buffer.from('GET / HTTP/1.1'), [])).toMatchObject({state: 'refused', code: 'CRIU_PROTOCOL', reason: expect.stringMatching(/^not the lazy-pages protocol/)})
  })
})

describe('AddressMap follows the process', () => {
  const A = 0x7f0000000000
  const regions: GuestRegion[] = [
    {baseHostVirtAddr: A, size: 8 * P, offset: 0, pageSize: P},
    {baseHostVirtAddr: A + 16 * P, size: 4 * P, offset: 8 * P, pageSize: P},
  ]

  it('mremap moves the pages of the moved range and keeps their image offsets', () => {
    const map = new AddressMap(regions)
    const B = 0x7e0000000000
    map.remap(A + 2 * P, B, 3 * P)
    expect(map.locate(A + 2 * P)).toBeUndefined()
    expect(map.locate(B + P)!.imageOffset).toBe(3 * P)
    expect(map.locate(A + 5 * P)!.imageOffset).toBe(5 * P)
    expect(map.locate(A + P)!.imageOffset).toBe(P)
    expect(map.all.reduce((s, r) => s + r.size, 0)).toBe(12 * P)
  })

  it('mremap onto mapped memory replaces it; munmap forgets the addresses', () => {
    const map = new AddressMap(regions)
    map.remap(A + 16 * P, A + 6 * P, 2 * P)
    expect(map.locate(A + 6 * P)!.imageOffset).toBe(8 * P)
    expect(map.locate(A + 7 * P)!.imageOffset).toBe(9 * P)
    expect(map.locate(A + 16 * P)).toBeUndefined()
    expect(map.locate(A + 18 * P)!.imageOffset).toBe(10 * P)
    map.unmap(A, A + 3 * P)
    expect(map.locate(A + 2 * P)).toBeUndefined()
    expect(map.locate(A + 3 * P)!.imageOffset).toBe(3 * P)
  })
})

describe('PageStates for forks', () => {
  it('counts present and removed pages as settled; a clone is independent', () => {
    const states = new PageStates(10)
    states.markPresent(0, 3)
    states.markRemoved(2, 3)
    expect([states.presentCount, states.settledCount]).toEqual([2, 5])
    const child = states.clone()
    child.markPresent(5, 5)
    expect([child.presentCount, child.settledCount]).toEqual([7, 10])
    expect([states.presentCount, states.settledCount]).toEqual([2, 5])
    expect([states.get(1), states.get(3), states.get(6)]).toEqual([PAGE_PRESENT, PAGE_REMOVED, PAGE_MISSING])
  })
})
