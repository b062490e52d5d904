// Sizes as users type them (--chunk-size 256K, --readahead 256M) and as uffd prints them.
import fc from 'fast-check'
import {describe, expect, it} from 'vitest'

import {UffdError} from '../src/core/errors.js'
import {formatBytes, formatPercent, parseSize} from '../src/core/units.js'

const UNITS = [
  {letter: 'k', factor: 1024},
  {letter: 'm', factor: 1024 ** 2},
  {letter: 'g', factor: 1024 ** 3},
  {letter: 't', factor: 1024 ** 4},
]

/** The reading of a size as the documentation describes it, from scratch: the oracle. */
function oracle(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$/i.exec(text)
  if (!m) return undefined
  const factor = m[2] === '' ? 1 : UNITS.find((u) => u.letter === m[2].toLowerCase())!.factor
  const value = Number(m[1]) * factor
  return Number.isSafeInteger(value) ? value : undefined
}

describe('parseSize', () => {
  it('reads plain byte counts', () => {
    fc.assert(
      fc.property(fc.maxSafeNat(), (n) => {
        expect(parseSize(String(n))).toBe(n)
      }),
    )
  })

  it('reads every spelling of the binary units: 64K, 64k, 64KiB, 64kb, 64 M, 2G, 1T', () => {
    const spelling = fc.record({
      count: fc.nat(4096),
      unit: fc.constantFrom(...UNITS),
      upper: fc.boolean(),
      suffix: fc.constantFrom('', 'b', 'B', 'ib', 'iB', 'IB'),
      space: fc.constantFrom('', ' ', '  '),
    })
    fc.assert(
      fc.property(spelling, ({count, unit, upper, suffix, space}) => {
        const text = `${count}${space}${upper ? unit.letter.toUpperCase() : unit.letter}${suffix}`
        expect(parseSize(text), text).toBe(count * unit.factor)
      }),
    )
    expect(parseSize('256K')).toBe(262144)
    expect(parseSize(' 2M ')).toBe(2 * 1024 * 1024)
  })

  it('takes fractions that make whole bytes, and refuses the others', () => {
    expect(parseSize('1.5K')).toBe(1536)
    expect(parseSize('0.5M')).toBe(512 * 1024)
    expect(() => parseSize('0.5')).toThrow(expect.objectContaining({code: 'USAGE', message: 'invalid size "0.5": not a whole number of bytes'}))
    expect(() => parseSize('1.0001K')).toThrow(/not a whole number of bytes/)
  })

  it('refuses sizes past 2^53 bytes rather than rounding them', () => {
    expect(() => parseSize('9007199254740993')).toThrow(/not a whole number of bytes/)
    expect(() => parseSize('9000T')).toThrow(/not a whole number of bytes/)
    expect(parseSize('8191T')).toBe(8191 * 1024 ** 4)
  })

  it('any text is either a size the oracle reads the same, or a USAGE error naming it', () => {
    const sizeLike = fc.stringMatching(/^ ?\d{0,4}(\.\d{0,3})? ?[kmgtKMGTxQ]?[iI]?[bB]?[ -]?$/)
    fc.assert(
      fc.property(fc.oneof(fc.string(), sizeLike), (text) => {
        const expected = oracle(text)
        if (expected === undefined) {
          let thrown: unknown
          try {
            parseSize(text)
          } catch (error) {
            thrown = error
          }
          expect(thrown, JSON.stringify(text)).toBeInstanceOf(UffdError)
          expect(thrown).toMatchObject({code: 'USAGE', message: expect.stringContaining(`invalid size ${JSON.stringify(text)}`)})
        } else {
          expect(parseSize(text), JSON.stringify(text)).toBe(expected)
        }
      }),
      {numRuns: 2000},
    )
    for (const bad of ['', 'K', '-1', '1e3', '0x10', '12Q', '1 2', '.5K', 'Infinity', '1,024']) expect(() => parseSize(bad), bad).toThrow(UffdError)
  })
})

describe('formatBytes', () => {
  const shape = /^(\d+)(\.\d{1,2})? (B|KiB|MiB|GiB|TiB)$/
  const factorOf: Record<string, number> = {B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4}

  it('shows whole bytes below 1 KiB, and exact multiples without decimals', () => {
    for (const n of [0, 1, 512, 1023]) expect(formatBytes(n)).toBe(`${n} B`)
    expect(formatBytes(1024)).toBe('1 KiB')
    expect(formatBytes(256 * 1024)).toBe('256 KiB')
    expect(formatBytes(2 * 1024 ** 2)).toBe('2 MiB')
    expect(formatBytes(1.5 * 1024 ** 3)).toBe('1.50 GiB')
    expect(formatBytes(10.5 * 1024)).toBe('10.5 KiB')
    expect(formatBytes(3 * 1024 ** 5)).toBe('3072 TiB')
  })

  it('rounds a rate to whole bytes (566.6 B/s printed with 13 decimals before)', () => {
    expect(formatBytes(566.6059742899928)).toBe('567 B')
    expect(formatBytes(0.4)).toBe('0 B')
  })

  it('a value that rounds up to 1024 of a unit is 1.00 of the next', () => {
    expect(formatBytes(1023.6)).toBe('1.00 KiB')
    expect(formatBytes(1024 ** 2 - 1)).toBe('1.00 MiB')
    expect(formatBytes(1024 ** 3 - 100)).toBe('1.00 GiB')
  })

  it('is within 0.5% of the value, below 1024 of its unit (but TiB), with at most three significant digits or a whole number', () => {
    fc.assert(
      fc.property(fc.oneof(fc.maxSafeNat(), fc.double({min: 0, max: 2 ** 50, noNaN: true})), (n) => {
        const text = formatBytes(n)
        const m = shape.exec(text)
        expect(m, text).not.toBeNull()
        const shown = Number(`${m![1]}${m![2] ?? ''}`)
        const unit = m![3]
        if (unit !== 'TiB') expect(shown, text).toBeLessThan(1024)
        if (unit !== 'B') expect(shown, text).toBeGreaterThanOrEqual(1)
        if (m![2]) expect(m![1].length + m![2].length - 1, text).toBeLessThanOrEqual(3)
        const back = shown * factorOf[unit]
        if (unit === 'B') expect(back).toBe(Math.round(n))
        else expect(Math.abs(back - n) / n, `${n} -> ${text}`).toBeLessThanOrEqual(0.005)
      }),
      {numRuns: 2000},
    )
  })
})

describe('formatPercent', () => {
  it('is 0% of nothing, else one decimal of the share', () => {
    expect(formatPercent(5, 0)).toBe('0%')
    expect(formatPercent(1, 3)).toBe('33.3%')
    expect(formatPercent(3, 3)).toBe('100.0%')
    fc.assert(
      fc.property(fc.nat(10 ** 9), fc.integer({min: 1, max: 10 ** 9}), (a, b) => {
        const [part, whole] = a <= b ? [a, b] : [b, a || 1]
        const text = formatPercent(part, whole)
        expect(text).toMatch(/^\d{1,3}\.\d%$/)
        expect(Math.abs(Number(text.slice(0, -1)) - (100 * part) / whole)).toBeLessThanOrEqual(0.05 + 1e-9)
      }),
    )
  })
})
