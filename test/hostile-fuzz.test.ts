// 1,000 seeded hostile handshakes (test/helpers/hostile-handshakes.ts) against one real
// `uffd resume --serve`, with a real verifying client (native/build/fc_client) served every 100:
// the handler must refuse or cope with each, close every connection by its deadline, stay up,
// serve every real VM byte-exactly, and stop on SIGTERM with 130. bench/fuzz.ts --handshakes
// runs more of the same cases.
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {NATIVE, UFFD_BIN, uffd} from './helpers/cli.js'
import {runHostileSession} from './helpers/hostile-handshakes.js'
import {makeImage, tempDir} from './helpers/images.js'

const FC_CLIENT = path.join(NATIVE, 'fc_client')
const MiB = 1024 * 1024
const SEED = Number(process.env.UFFD_FUZZ_SEED ?? 20261202)
const CASES = 1000

const skip = ((): string | undefined => {
  if (process.platform !== 'linux') return 'not Linux'
  if (process.getuid?.() !== 0) return 'not root (a uffd that traps kernel-mode faults needs root)'
  if (!fs.existsSync(FC_CLIENT)) return `${FC_CLIENT} is not built (npm run build)`
  return undefined
})()
if (skip) console.warn(`test/hostile-fuzz.test.ts skipped: ${skip}`)

let dir: string
let image: string
let snapshot: string
beforeAll(() => {
  dir = tempDir('uffd-hostile-fuzz-')
  image = path.join(dir, 'mixed.raw')
  fs.writeFileSync(image, makeImage('mixed', 8 * MiB, 5))
  snapshot = path.join(dir, 'mixed.uffd')
  const made = uffd(['snapshot', '--mem-file', image, '-o', snapshot])
  if (made.status !== 0) throw new Error(`uffd snapshot failed:\n${made.stderr}`)
})
afterAll(() => {
  if (dir) fs.rmSync(dir, {recursive: true, force: true})
})

describe.skipIf(skip !== undefined)(`hostile handshakes (seed ${SEED})`, () => {
  it(`${CASES.toLocaleString('en')} hostile handshakes against one --serve handler: each refused or coped with, none held past its deadline, every real VM between them served byte-exactly`, async () => {
    const r = await runHostileSession({uffdBin: UFFD_BIN, fcClient: FC_CLIENT, snapshot, image, size: 8 * MiB, dir, seed: SEED, from: 0, count: CASES, vmEvery: 100, handshakeSeconds: 2})
    const tail = r.stderr.slice(-4000)
    expect(r.handlerDied, tail).toBeUndefined()
    expect(r.vmFailures, tail).toEqual([])
    expect(r.vms).toBe(CASES / 100)
    expect(r.hangs, 'connections the handler held past their deadline').toEqual([])
    expect(r.exitCode, tail).toBe(130)
    expect(r.unexpectedCodes, 'error codes outside the documented refusals (raw errno names, INTERNAL)').toEqual({})
    expect(r.stderr).not.toMatch(/INTERNAL|TypeError|RangeError|at .*\.js:\d+/)
    // Most cases are refused at the handshake; the rest became clients that failed or left.
    expect(r.result.rejected.length).toBeGreaterThan(CASES / 2)
    expect(r.result.clients.filter((c) => c.ended === 'exited').length).toBeGreaterThanOrEqual(r.vms)
  }, 300_000)
})
