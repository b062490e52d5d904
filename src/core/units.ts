import {UffdError} from './errors.js'

/** Human sizes: "64K", "256KiB", "2M", "1g", "4096". Binary multiples throughout. */
const SIZE = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i
const MULTIPLIER: Record<string, number> = {'': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4}

export function parseSize(text: string): number {
  const m = SIZE.exec(text.trim())
  if (!m) throw new UffdError('USAGE', `invalid size ${JSON.stringify(text)} (examples: 4096, 64K, 2M, 1G)`)
  const value = Number(m[1]) * MULTIPLIER[m[2].toLowerCase()]
  if (!Number.isSafeInteger(value)) throw new UffdError('USAGE', `invalid size ${JSON.stringify(text)}: not a whole number of bytes`)
  return value
}

/**
 * "512 B", "64 KiB", "1.50 MiB": three significant digits at most (whole numbers as they are), in
 * the largest unit the value reaches. A value that rounds up to 1024 of a unit is 1.00 of the
 * next, and a fractional byte count (a rate) is rounded to whole bytes.
 */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = n
  let unit = 0
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
  }
  let text = shown(value, unit)
  if (Math.abs(Number(text)) >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
    text = shown(value, unit)
  }
  return `${text} ${units[unit]}`
}

function shown(value: number, unit: number): string {
  if (unit === 0) return String(Math.round(value))
  const magnitude = Math.abs(value)
  return value.toFixed(Number.isInteger(value) || magnitude >= 100 ? 0 : magnitude >= 10 ? 1 : 2)
}

export function formatPercent(part: number, whole: number): string {
  return whole === 0 ? '0%' : `${((100 * part) / whole).toFixed(1)}%`
}

/** Human durations: "500ms", "10s", "2m", "1h"; a bare number is seconds. */
const DURATION = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/i
const DURATION_MS: Record<string, number> = {ms: 1, s: 1000, m: 60_000, h: 3_600_000}

export function parseDuration(text: string): number {
  const m = DURATION.exec(text.trim())
  if (!m) throw new UffdError('USAGE', `invalid duration ${JSON.stringify(text)} (examples: 500ms, 10s, 2m)`)
  return Number(m[1]) * DURATION_MS[(m[2] ?? 's').toLowerCase()]
}
