import {describe, expect, it} from 'vitest'

import {parseSmaps, referencedPages} from '../src/resume/main/smaps.js'

const SMAPS = `55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234   /usr/bin/fc
Size:                132 kB
Referenced:          132 kB
VmFlags: rd mr mw me dw
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:               40960 kB
Referenced:        12288 kB
Anonymous:         40960 kB
VmFlags: rd wr mr mw me ac um
7f0040000000-7f0040001000 ---p 00000000 00:00 0
Size:                  4 kB
Referenced:            0 kB
`

describe('smaps', () => {
  it('reads each mapping and its Referenced count', () => {
    expect(parseSmaps(SMAPS)).toEqual([
      {start: 0x55d0c0a00000, end: 0x55d0c0a21000, referencedKb: 132},
      {start: 0x7f0000000000, end: 0x7f0040000000, referencedKb: 12288},
      {start: 0x7f0040000000, end: 0x7f0040001000, referencedKb: 0},
    ])
  })

  it('sums the mappings that overlap the client regions, in pages', () => {
    const mappings = parseSmaps(SMAPS)
    expect(referencedPages(mappings, [{start: 0x7f0000000000, end: 0x7f0040000000}], 4096)).toBe(3072)
    expect(referencedPages(mappings, [{start: 0x7f0010000000, end: 0x7f0010001000}], 4096)).toBe(3072)
    expect(referencedPages(mappings, [{start: 0x1000, end: 0x2000}], 4096)).toBe(0)
    expect(referencedPages(parseSmaps(''), [{start: 0, end: 1 << 30}], 4096)).toBe(0)
  })
})
