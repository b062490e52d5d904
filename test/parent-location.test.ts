// Where a layer's parents are looked for: pure location math, unit and property tests.
import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {describeLocation} from '../src/remote/location.js'
import {fileNameOf, locationIn, parseLayersPrefix, prefixOf} from '../src/snapshot/parent-location.js'

describe('parent locations', () => {
  it('are next to the top layer by default: its directory, bucket prefix or URL directory', () => {
    expect(locationIn(prefixOf({kind: 'file', path: '/srv/vm/v2.uffd'}), 'base.uffd')).toEqual({kind: 'file', path: '/srv/vm/base.uffd'})
    expect(locationIn(prefixOf({kind: 'file', path: 'v2.uffd'}), 'base.uffd')).toEqual({kind: 'file', path: 'base.uffd'})
    expect(locationIn(prefixOf({kind: 's3', bucket: 'b', key: 'a/b/v2.uffd'}), 'base.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'a/b/base.uffd'})
    expect(locationIn(prefixOf({kind: 's3', bucket: 'b', key: 'v2.uffd'}), 'base.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'base.uffd'})
    // A presigned URL's query is its own signature: the parent's URL has none.
    expect(locationIn(prefixOf({kind: 'http', url: 'https://h.example/x/v2.uffd?X-Amz-Signature=abc'}), 'base.uffd')).toEqual({kind: 'http', url: 'https://h.example/x/base.uffd'})
  })

  it('are under --layers: a directory, an s3:// prefix with or without its slash, an http(s):// directory', () => {
    expect(locationIn(parseLayersPrefix('/srv/layers'), 'base.uffd')).toEqual({kind: 'file', path: '/srv/layers/base.uffd'})
    expect(locationIn(parseLayersPrefix('s3://b/p/'), 'base.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'p/base.uffd'})
    expect(locationIn(parseLayersPrefix('s3://b/p'), 'base.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'p/base.uffd'})
    expect(locationIn(parseLayersPrefix('s3://b'), 'base.uffd')).toEqual({kind: 's3', bucket: 'b', key: 'base.uffd'})
    expect(locationIn(parseLayersPrefix('https://h.example/dir'), 'base.uffd')).toEqual({kind: 'http', url: 'https://h.example/dir/base.uffd'})
    expect(locationIn(parseLayersPrefix('http://h.example'), 'base.uffd')).toEqual({kind: 'http', url: 'http://h.example/base.uffd'})
    expect(() => parseLayersPrefix('s3:///p/')).toThrow(/names no bucket/)
    expect(() => parseLayersPrefix('ftp://h/dir/')).toThrow(/unknown scheme/)
  })

  it('refuse a name that is not a file name (recorded names are checked at open; this is the second line)', () => {
    for (const name of ['', '.', '..', 'a/b']) expect(() => locationIn({kind: 'file', dir: '/x'}, name)).toThrow(RangeError)
  })

  it('round-trip: the name a layer records for its parent finds it again next to it, whatever the characters', () => {
    const name = fc.string({minLength: 1, maxLength: 40, unit: 'binary'}).filter((s) => !s.includes('/') && s !== '.' && s !== '..')
    const top = fc.oneof(
      fc.constant({kind: 'file' as const, path: '/srv/chain/top.uffd'}),
      fc.constant({kind: 's3' as const, bucket: 'snapshots', key: 'fleet/a/top.uffd'}),
      fc.constant({kind: 'http' as const, url: 'https://cdn.example/fleet/a/top.uffd?sig=1'}),
    )
    fc.assert(
      fc.property(top, name, (t, n) => {
        const parent = locationIn(prefixOf(t), n)
        expect(parent.kind).toBe(t.kind)
        expect(fileNameOf(parent)).toBe(n)
        // The same directory as the top: only the last part differs.
        const shown = describeLocation(parent)
        const dirOf = (s: string): string => s.slice(0, s.lastIndexOf('/', s.indexOf('?') < 0 ? undefined : s.indexOf('?')))
        expect(dirOf(shown)).toBe(dirOf(describeLocation(t)))
      }),
      {numRuns: 500},
    )
  })
})
