// Flags as plain data, without oclif: a command builds its oclif flags from these (oclif-flags.ts),
// and `uffd resume`'s fast path (resume-entry.ts) reads the same definitions without loading oclif,
// which takes longer than the rest of the path to listening.

import {UffdError} from '../core/errors.js'

interface CommonSpec {
  summary: string
  helpGroup?: string
  exactlyOne?: readonly string[]
  exclusive?: readonly string[]
  dependsOn?: readonly string[]
}

export interface StringSpec extends CommonSpec {
  kind: 'string'
  default?: string
  options?: readonly string[]
  /** May be given more than once: the values in order (parsePlainCommandLine leaves such a command line to oclif). */
  multiple?: boolean
}

export interface IntegerSpec extends CommonSpec {
  kind: 'integer'
  default?: number
  min?: number
  max?: number
}

export interface BooleanSpec extends CommonSpec {
  kind: 'boolean'
  /** Every boolean has one, so that its value is never undefined. */
  default: boolean
  allowNo?: boolean
}

export type FlagSpec = StringSpec | IntegerSpec | BooleanSpec

export type FlagValue<S> = S extends BooleanSpec ? boolean : S extends {multiple: true} ? string[] | undefined : S extends IntegerSpec ? (S extends {default: number} ? number : number | undefined) : S extends {default: string} ? string : string | undefined

export type FlagValues<T> = {[K in keyof T]: FlagValue<T[K]>}

/**
 * A flag's value that only the command can judge (a size, a multiple of the snapshot's page
 * size): a usage error, reported the way oclif reports its own (exit 2).
 */
export class FlagValueError extends UffdError {
  declare readonly code: 'USAGE'
  constructor(message: string) {
    super('USAGE', message)
    this.name = 'FlagValueError'
  }
}

/**
 * Parses `argv` against `specs` for a command with the positional arguments `positionals` (all
 * required), or returns undefined when the command line is anything but plain: --help, a flag
 * this command lacks, a value oclif would refuse, a broken flag relation, `--`, a short flag, a
 * repeated flag or one that may be repeated, a value that starts with '-'. The caller then hands the command line to oclif,
 * which prints its own help and errors: this parser never has to reproduce them, only agree with
 * oclif on what it accepts (test/resume-entry.test.ts compares the two).
 */
export function parsePlainCommandLine<T extends Record<string, FlagSpec>>(argv: readonly string[], specs: T, positionals: readonly string[]): {args: Record<string, string>; flags: FlagValues<T>} | undefined {
  const given = new Map<string, string | boolean>()
  const args: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const token = argv[i]
    if (!token.startsWith('-')) {
      if (args.length === positionals.length) return undefined
      args.push(token)
      continue
    }
    if (!token.startsWith('--') || token === '--') return undefined
    const eq = token.indexOf('=')
    let name = eq < 0 ? token.slice(2) : token.slice(2, eq)
    let negated = false
    if (!Object.hasOwn(specs, name) && name.startsWith('no-') && Object.hasOwn(specs, name.slice(3))) {
      name = name.slice(3)
      negated = true
    }
    if (!Object.hasOwn(specs, name) || given.has(name)) return undefined
    const spec: FlagSpec = specs[name]
    if (spec.kind === 'boolean') {
      if (eq >= 0 || (negated && !spec.allowNo)) return undefined
      given.set(name, !negated)
      continue
    }
    if (negated || (spec.kind === 'string' && spec.multiple)) return undefined
    const value = eq >= 0 ? token.slice(eq + 1) : argv[++i]
    if (value === undefined || value === '' || value.startsWith('-')) return undefined
    given.set(name, value)
  }
  if (args.length !== positionals.length) return undefined
  const flags: Record<string, string | number | boolean | undefined> = {}
  for (const [name, spec] of Object.entries(specs) as [string, FlagSpec][]) {
    const provided = (other: string): boolean => given.has(other)
    if (spec.exactlyOne && spec.exactlyOne.filter(provided).length !== 1) return undefined
    if (given.has(name) && spec.exclusive?.some((other) => other !== name && provided(other))) return undefined
    if (given.has(name) && spec.dependsOn?.some((other) => !provided(other))) return undefined
    const value = given.get(name)
    if (value === undefined) {
      flags[name] = spec.default
    } else if (spec.kind === 'integer') {
      if (!/^\d+$/.test(value as string)) return undefined
      const n = Number.parseInt(value as string, 10)
      if (!Number.isSafeInteger(n) || (spec.min !== undefined && n < spec.min) || (spec.max !== undefined && n > spec.max)) return undefined
      flags[name] = n
    } else if (spec.kind === 'string') {
      if (spec.options && !spec.options.includes(value as string)) return undefined
      flags[name] = value
    } else {
      flags[name] = value
    }
  }
  return {args: Object.fromEntries(positionals.map((p, i) => [p, args[i]])), flags: flags as FlagValues<T>}
}
