import {spawn} from 'node:child_process'
import path from 'node:path'

import {expect} from 'vitest'

import {NATIVE, uffd} from './cli.js'
import {pseudoRandom} from './images.js'

export const FC_CLIENT = path.join(NATIVE, 'fc_client')

/** `image` with every `stride`-th page (from `seed % stride`) replaced by fresh bytes: a sandbox's scattered changes. */
export function scatteredChange(image: Buffer, seed: number, stride: number, pageSize = 4096): Buffer {
  const out = Buffer.from(image)
  const fresh = pseudoRandom(image.length, seed)
  for (let p = seed % stride; p < image.length / pageSize; p += stride) fresh.copy(out, p * pageSize, p * pageSize, (p + 1) * pageSize)
  return out
}

/** `uffd ARGS --json`, expected to succeed; its JSON. */
export function uffdOk(args: string[]): any {
  const r = uffd([...args, '--json'])
  expect(r.status, `uffd ${args.join(' ')}:\n${r.stdout}${r.stderr}`).toBe(0)
  return r.json
}

/** Runs fc_client on `socket` with the expected `image` to its end, without blocking the event loop. */
export function runFcClient(socket: string, image: string, args: string[]): Promise<{status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string}> {
  const child = spawn(FC_CLIENT, ['--socket', socket, '--image', image, ...args, '--timeout-ms', '30000'], {stdio: ['ignore', 'pipe', 'pipe']})
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  return new Promise((resolve) => child.on('close', (status, signal) => resolve({status, signal, stdout, stderr})))
}
