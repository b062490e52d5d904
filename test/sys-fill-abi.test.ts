// FILL_ABI (src/sys/fill.ts) against the table native/libuffd_fill reports of itself
// (uffd_fill_abi), the way sys-abi.test.ts checks the kernel's constants. The pairing below must
// cover both sides exactly: a value added, dropped or renumbered on one side only fails the test.

import {execFileSync} from 'node:child_process'
import {fileURLToPath} from 'node:url'

import {describe, expect, it} from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))

// Built before fill.ts is imported: libc.ts loads the library when it is first imported.
execFileSync('make', ['-s', '-C', 'native', 'build/libuffd_fill.so'], {cwd: root, stdio: 'inherit'})
const {FILL_ABI, nativeFillAbi} = await import('../src/sys/fill.js')

/** Each C name of the library's table, and the path of its value in FILL_ABI. */
const pairing: Record<string, string> = {
  PAGE_MISSING: 'page.missing',
  PAGE_PRESENT: 'page.present',
  PAGE_REMOVED: 'page.removed',
  OUT_COPIED: 'out.pagesCopied',
  OUT_ZEROED: 'out.pagesZeroed',
  OUT_COPY_IOCTLS: 'out.copyIoctls',
  OUT_ZERO_IOCTLS: 'out.zeropageIoctls',
  OUT_EEXIST: 'out.eexist',
  OUT_NEWLY_PRESENT: 'out.newlyPresent',
  OUT_STOP_PAGE: 'out.stopPage',
  OUT_FIELDS: 'out.fields',
  RUN_PAGE: 'run.page',
  RUN_COUNT: 'run.count',
  RUN_PAYLOAD: 'run.payloadPage',
  RUN_WORDS: 'run.words',
  RUN_ZERO: 'run.zero',
  JOB_RUNS: 'job.runs',
  JOB_NRUNS: 'job.runCount',
  JOB_PAYLOAD: 'job.payload',
  JOB_WORDS: 'job.words',
  JOB_PENDING: 'jobState.pending',
  JOB_RUNNING: 'jobState.running',
  JOB_DONE: 'jobState.done',
  TOTAL_STOP_PAGE: 'totals.stopPage',
  TOTAL_ERROR: 'totals.error',
  TOTAL_FINISHED: 'totals.finished',
  TOTAL_FIELDS: 'totals.fields',
  GATE_HELPER: 'gate.helper',
  GATE_LOOP: 'gate.loop',
  GATE_CELLS: 'gate.cells',
  'sizeof:fill_region': 'region.bytes',
  'offsetof:fill_region.offset': 'region.offset',
  'offsetof:fill_region.size': 'region.size',
  'offsetof:fill_region.base': 'region.base',
}

/** Every leaf of FILL_ABI, by its dotted path. */
function leaves(value: object, prefix = ''): Record<string, number> {
  const out: Record<string, number> = {}
  for (const [key, v] of Object.entries(value)) {
    if (typeof v === 'object' && v !== null) Object.assign(out, leaves(v as object, `${prefix}${key}.`))
    else out[`${prefix}${key}`] = v as number
  }
  return out
}

const fillDisabled = process.env.UFFD_NATIVE_FILL === '0'
if (fillDisabled) console.log('[sys-fill-abi] skipping: UFFD_NATIVE_FILL=0 keeps native/libuffd_fill from loading')

describe.skipIf(fillDisabled)('FILL_ABI matches native/libuffd_fill (uffd_fill_abi)', () => {
  const reported = nativeFillAbi()
  const ours = leaves(FILL_ABI)

  it('the library is loaded and reports its table', () => {
    expect(reported).toBeDefined()
  })

  it('pairs every name the library reports', () => {
    expect(Object.keys(pairing).sort()).toEqual(Object.keys(reported ?? {}).sort())
  })

  it('pairs every value of FILL_ABI, each once', () => {
    expect(Object.values(pairing).sort()).toEqual(Object.keys(ours).sort())
  })

  it.each(Object.keys(pairing).sort())('%s', (name) => {
    expect(ours[pairing[name]]).toBe(reported?.[name])
  })
})
