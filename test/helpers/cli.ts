import {type ChildProcess, spawn, spawnSync} from 'node:child_process'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')
export const UFFD_BIN = path.join(ROOT, 'bin/run.js')
export const NATIVE = path.join(ROOT, 'native/build')

export interface CliResult {
  status: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  /** stdout parsed as JSON when --json was given. */
  json: any
}

/**
 * The environment for CLI processes: vitest sets NODE_ENV=test, which would make oclif look for
 * TypeScript sources (slower, and not what users run).
 */
export function cliEnv(): NodeJS.ProcessEnv {
  const env = {...process.env}
  delete env.NODE_ENV
  return env
}

/** Runs the built CLI (npm test builds dist first) as a real process: exit codes and streams included. */
export function uffd(args: string[], options: {input?: string; timeoutMs?: number; cwd?: string} = {}): CliResult {
  const r = spawnSync(process.execPath, [UFFD_BIN, ...args], {encoding: 'utf8', input: options.input, timeout: options.timeoutMs ?? 120_000, cwd: options.cwd, env: cliEnv()})
  let json: unknown
  if (args.includes('--json')) {
    try {
      json = JSON.parse(r.stdout)
    } catch {
      json = undefined
    }
  }
  return {status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, json}
}

/** Starts the CLI without waiting; for commands that run until told to stop. `env`: added to its environment. */
export function uffdSpawn(args: string[], env: NodeJS.ProcessEnv = {}) {
  return spawn(process.execPath, [UFFD_BIN, ...args], {stdio: ['ignore', 'pipe', 'pipe'], env: {...cliEnv(), ...env}})
}

export function isRoot(): boolean {
  return process.getuid?.() === 0
}

/**
 * Runs the built CLI without blocking this process's event loop (uffd() does block it): for
 * commands that talk to servers the test itself runs (HTTP, S3 on loopback).
 */
export async function uffdAsync(args: string[], options: {timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string; onSpawn?: (child: ChildProcess) => void} = {}): Promise<CliResult> {
  const child = spawn(process.execPath, [UFFD_BIN, ...args], {stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? cliEnv(), cwd: options.cwd})
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000)
  const closed = new Promise<{status: number | null; signal: NodeJS.Signals | null}>((resolve, reject) => {
    child.on('error', reject)
    child.on('close', (code, sig) => resolve({status: code, signal: sig}))
  })
  options.onSpawn?.(child)
  const {status, signal} = await closed.finally(() => clearTimeout(timer))
  let json: unknown
  if (args.includes('--json')) {
    try {
      json = JSON.parse(stdout)
    } catch {
      json = undefined
    }
  }
  return {status, signal, stdout, stderr, json}
}
