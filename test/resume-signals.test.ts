// SIGUSR1 prints live statistics while a client is being served, without disturbing it.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, describe, expect, it} from 'vitest'

import {cliEnv, isRoot, NATIVE, UFFD_BIN, uffd} from './helpers/cli.js'
import {makeImage, tempDir} from './helpers/images.js'

const skip = !isRoot() ? 'needs root (a uffd for kernel-mode faults)' : undefined
if (skip) console.warn(`test/resume-signals.test.ts skipped: ${skip}`)
const dir = tempDir('uffd-signals-')
afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

describe.skipIf(skip)('uffd resume signals', () => {
  it('prints live statistics on SIGUSR1 and carries on serving', async () => {
    const raw = path.join(dir, 'img.raw')
    const snapshot = path.join(dir, 'img.uffd')
    fs.writeFileSync(raw, makeImage('mixed', 8 * 1024 * 1024, 3))
    expect(uffd(['snapshot', '--mem-file', raw, '-o', snapshot]).status).toBe(0)
    const socket = path.join(dir, 's.sock')
    const ready = path.join(dir, 'ready')
    const handler = spawn(process.execPath, [UFFD_BIN, 'resume', snapshot, '--socket', socket, '--ready-file', ready], {env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe']})
    let stderr = ''
    handler.stderr!.on('data', (d) => (stderr += d))
    const exited = new Promise<number | null>((resolve) => handler.on('close', resolve))
    try {
      for (let i = 0; i < 400 && !fs.existsSync(ready); i++) await new Promise((r) => setTimeout(r, 25))
      // The client touches everything, then holds on for a second while we ask for statistics.
      const client = spawn(path.join(NATIVE, 'fc_client'), ['--socket', socket, '--image', raw, '--touch', 'sequential', '--verify-all', '--hold-ms', '1500'], {stdio: ['ignore', 'pipe', 'pipe']})
      let out = ''
      client.stdout!.on('data', (d) => (out += d))
      const clientDone = new Promise<number | null>((resolve) => client.on('close', resolve))
      for (let i = 0; i < 200 && !out.includes('"ok"'); i++) await new Promise((r) => setTimeout(r, 25))
      handler.kill('SIGUSR1')
      for (let i = 0; i < 200 && !stderr.includes('uffd-resume-stats'); i++) await new Promise((r) => setTimeout(r, 25))
      const line = stderr.split('\n').find((l) => l.includes('uffd-resume-stats'))
      expect(line, stderr).toBeDefined()
      const live = JSON.parse(line!)
      expect(live.faults.total).toBeGreaterThan(0)
      expect(live.clients.served).toBe(1)
      expect(await clientDone).toBe(0)
      expect(JSON.parse(out).verify_errors).toBe(0)
      expect(await exited).toBe(0)
    } finally {
      handler.kill('SIGKILL')
    }
  })
})
