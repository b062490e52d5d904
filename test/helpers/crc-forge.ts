// An attacker's tool: CRC-32 is linear, so anyone can make bytes of their choosing keep a
// checksum by setting four other bytes. Tests use it to craft changes a checksum cannot see.
import {crc32} from 'node:zlib'

/**
 * Sets buf[at..at+4) so that crc32(buf, seed) equals `target` (solving the 32 linear equations
 * over GF(2)): a bound unit's CRC (docs/FORMAT.md, Bound units) is seeded with its place.
 */
export function forgeCrc(buf: Buffer, at: number, target: number, seed = 0): void {
  buf.fill(0, at, at + 4)
  const base = crc32(buf, seed)
  const zero = crc32(Buffer.alloc(buf.length))
  // What flipping each of the 32 bits changes in the checksum.
  const effects: number[] = []
  for (let bit = 0; bit < 32; bit++) {
    const probe = Buffer.alloc(buf.length)
    probe[at + (bit >> 3)] = 1 << (bit & 7)
    effects.push((crc32(probe) ^ zero) >>> 0)
  }
  // Gaussian elimination: rows are (effect, which bits make it).
  const rows = effects.map((effect, bit) => ({effect, bits: 1 << bit}))
  const want = (target ^ base) >>> 0
  const pivots: {effect: number; bits: number}[] = []
  for (let b = 31; b >= 0; b--) {
    const i = rows.findIndex((r) => (r.effect >>> b) & 1)
    if (i < 0) continue
    const pivot = rows.splice(i, 1)[0]
    for (const r of [...rows, ...pivots]) if ((r.effect >>> b) & 1) Object.assign(r, {effect: (r.effect ^ pivot.effect) >>> 0, bits: (r.bits ^ pivot.bits) >>> 0})
    pivots.push(pivot)
  }
  let x = 0
  let residual = want
  for (const p of pivots) {
    const top = 31 - Math.clz32(p.effect)
    if ((residual >>> top) & 1) {
      residual = (residual ^ p.effect) >>> 0
      x = (x ^ p.bits) >>> 0
    }
  }
  if (residual !== 0) throw new Error('no solution (cannot happen for CRC-32)')
  buf.writeUInt32LE(x, at)
  if (crc32(buf, seed) !== target >>> 0) throw new Error('forgery failed')
}
