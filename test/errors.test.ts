// The error codes are a public API (docs/ERRORS.md): this keeps the documentation, the table in
// src/core/errors.ts and the codes the source actually throws the same set, and checks through
// the built CLI (`npm run build` first) that --json reports documented codes.
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {ERROR_CODES, errorFromWorker, isErrorCode, UffdError} from '../src/core/errors.js'
import {parseSize} from '../src/core/units.js'
import {SnapshotFormatError} from '../src/format/errors.js'
import {isErrnoName} from '../src/sys/errors.js'
import {ROOT, uffd} from './helpers/cli.js'
import {tempDir} from './helpers/images.js'

const SRC = path.join(ROOT, 'src')
const documentedCodes = Object.keys(ERROR_CODES)

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, {withFileTypes: true}).flatMap((e) => {
    const full = path.join(dir, e.name)
    if (e.isDirectory()) return sourceFiles(full)
    return e.name.endsWith('.ts') ? [full] : []
  })
}

/** The text between the parenthesis at `open` and its partner. */
function argumentsAt(text: string, open: number): string {
  let depth = 0
  for (let i = open; i < text.length; i++) {
    if (text[i] === '(') depth++
    else if (text[i] === ')' && --depth === 0) return text.slice(open + 1, i)
  }
  return text.slice(open + 1)
}

const CODE_LITERAL = /'([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)'/g
/** Arguments of these are not error codes: SysError takes a syscall name ('UFFDIO_COPY'). */
const NOT_CODE_ARGUMENTS = new Set(['SysError', 'RangeError', 'TypeError'])

/** Every upper-case string literal the source uses as an error code, with where it is. */
function codeLiterals(): {code: string; where: string}[] {
  const found: {code: string; where: string}[] = []
  for (const file of sourceFiles(SRC)) {
    const text = fs.readFileSync(file, 'utf8')
    const where = path.relative(ROOT, file)
    const literalsIn = (snippet: string): void => {
      for (const m of snippet.matchAll(CODE_LITERAL)) found.push({code: m[1], where})
    }
    // `code = 'X'`, `code: 'X' | 'Y'`, `code === 'X'`, and unions named ...ErrorCode.
    for (const m of text.matchAll(/\bcode\??\s*(?::|=|===|!==)\s*((?:'[^'\n]*'\s*\|?\s*)+)/g)) literalsIn(m[1])
    for (const m of text.matchAll(/\btype\s+\w*ErrorCode\s*=\s*((?:\|?\s*'[^'\n]*'\s*)+)/g)) literalsIn(m[1])
    // Arguments of error constructors, super() of error classes, and helpers like chunkError().
    for (const m of text.matchAll(/\b(?:new\s+)?(\w*Error|super)\s*\(/g)) {
      if (!NOT_CODE_ARGUMENTS.has(m[1])) literalsIn(argumentsAt(text, m.index + m[0].length - 1))
    }
  }
  return found
}

/** The codes in the first column of the table under "## Codes" in docs/ERRORS.md. */
function tableCodes(): string[] {
  const doc = fs.readFileSync(path.join(ROOT, 'docs/ERRORS.md'), 'utf8')
  const section = doc.split(/^## /m).find((s) => s.startsWith('Codes\n'))
  expect(section, 'docs/ERRORS.md has a "## Codes" section').toBeDefined()
  return [...section!.matchAll(/^\| `([A-Z0-9_]+)` \|/gm)].map((m) => m[1])
}

describe('the error vocabulary', () => {
  it('docs/ERRORS.md lists exactly the codes of ERROR_CODES, each once', () => {
    const inDocs = tableCodes()
    expect(new Set(inDocs).size, 'a code listed twice').toBe(inDocs.length)
    expect([...inDocs].sort()).toEqual([...documentedCodes].sort())
  })

  it('docs/ERRORS.md gives each code its exit code, 2 for USAGE and 130 for INTERRUPTED', () => {
    const doc = fs.readFileSync(path.join(ROOT, 'docs/ERRORS.md'), 'utf8')
    const exitOf = Object.fromEntries([...doc.matchAll(/^\| `([A-Z0-9_]+)` \|.*\| (\d+) \|$/gm)].map((m) => [m[1], Number(m[2])]))
    expect(Object.keys(exitOf).sort()).toEqual([...documentedCodes].sort())
    for (const [code, exit] of Object.entries(exitOf)) expect(exit, code).toBe(code === 'USAGE' ? 2 : code === 'INTERRUPTED' ? 130 : 1)
  })

  it('every code literal in src is documented (or an errno name passed through from a system call)', () => {
    const literals = codeLiterals()
    // The scan must see the codes of every kind of thrower, or it proves nothing.
    const seen = new Set(literals.map((l) => l.code))
    for (const code of ['NOT_A_SNAPSHOT', 'CORRUPT', 'BAD_HANDSHAKE', 'CRIU_IMAGE', 'NO_SUCH_PROCESS', 'BAD_WORKING_SET', 'INTERRUPTED', 'TIMEOUT', 'USAGE', 'INTERNAL']) {
      expect(seen, `the scan found no use of ${code}`).toContain(code)
    }
    const undocumented = literals.filter((l) => !isErrorCode(l.code) && !isErrnoName(l.code))
    expect(undocumented, 'codes used in src but missing from ERROR_CODES').toEqual([])
  })

  it('no plain Error is thrown where users can see it without a code', () => {
    const dirs = ['snapshot', 'format', 'core', 'criu', 'commands', 'cli']
    const files = [...dirs.flatMap((d) => sourceFiles(path.join(SRC, d))), path.join(SRC, 'sys/lz4.ts')]
    const plain = files.flatMap((file) =>
      fs
        .readFileSync(file, 'utf8')
        .split('\n')
        .map((line, i) => ({line: line.trim(), where: `${path.relative(ROOT, file)}:${i + 1}`}))
        // errorFromWorker's fallback keeps the code an error arrived with.
        .filter(({line}) => /\bnew Error\(/.test(line) && !/Object\.assign\(new Error\(/.test(line)),
    )
    expect(plain).toEqual([])
  })

  it('the error classes are UffdErrors and keep their names and messages', () => {
    const e = new SnapshotFormatError('TRUNCATED', 'footer', 'cut short', 'a.uffd')
    expect(e).toBeInstanceOf(UffdError)
    expect(e).toMatchObject({name: 'SnapshotFormatError', code: 'TRUNCATED', message: 'a.uffd: footer: cut short'})
    expect(() => parseSize('12Q')).toThrow(expect.objectContaining({code: 'USAGE', message: 'invalid size "12Q" (examples: 4096, 64K, 2M, 1G)'}))
  })

  it('an error rebuilt from a worker keeps its code', () => {
    const documented = errorFromWorker('chunk 3: checksum mismatch', 'CORRUPT')
    expect(documented).toBeInstanceOf(UffdError)
    expect(documented).toMatchObject({code: 'CORRUPT', message: 'chunk 3: checksum mismatch'})
    expect(errorFromWorker("ENOENT: no such file or directory, open 'x'", 'ENOENT')).toMatchObject({code: 'ENOENT'})
    expect((errorFromWorker('x is not a function', undefined) as {code?: string}).code).toBeUndefined()
  })
})

describe('--json errors of the CLI carry documented codes', () => {
  let dir: string
  beforeAll(() => {
    dir = tempDir('uffd-errors-test-')
  })
  afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

  function expectJsonError(args: string[], code: string, exitCode: number): void {
    const r = uffd([...args, '--json'])
    expect(r.status, `${args.join(' ')}: exit status (stdout: ${r.stdout}, stderr: ${r.stderr})`).toBe(exitCode)
    expect(r.json?.error, `${args.join(' ')}: ${r.stdout}`).toMatchObject({code, exitCode})
    expect(isErrorCode(r.json.error.code) || isErrnoName(r.json.error.code), `${r.json.error.code} is documented`).toBe(true)
  }

  it('a missing file is its errno name', () => {
    expectJsonError(['stats', path.join(dir, 'missing.uffd')], 'ENOENT', 1)
  })

  it('a file that is not a snapshot is NOT_A_SNAPSHOT', () => {
    const text = path.join(dir, 'notes.txt')
    fs.writeFileSync(text, 'not a snapshot\n')
    expectJsonError(['verify', text], 'NOT_A_SNAPSHOT', 1)
  })

  it('a malformed size is USAGE, exit 2', () => {
    const image = path.join(dir, 'image.mem')
    fs.writeFileSync(image, Buffer.alloc(64 * 1024))
    expectJsonError(['snapshot', '--mem-file', image, '-o', path.join(dir, 'out.uffd'), '--chunk-size', '12Q'], 'USAGE', 2)
  })

  it('an existing output is OUTPUT_EXISTS, a directory as input NOT_A_FILE', () => {
    const image = path.join(dir, 'image.mem')
    fs.writeFileSync(image, Buffer.alloc(64 * 1024))
    expectJsonError(['snapshot', '--mem-file', image, '-o', image], 'OUTPUT_EXISTS', 1)
    expectJsonError(['snapshot', '--mem-file', dir, '-o', path.join(dir, 'dir.uffd')], 'NOT_A_FILE', 1)
  })

  it('an unknown command is USAGE, exit 2, wherever --json stands', () => {
    expectJsonError(['nosuchcmd'], 'USAGE', 2)
    expectJsonError(['working-set', 'nosuch'], 'USAGE', 2)
    const first = uffd(['--json', 'nosuchcmd'])
    expect(first.status).toBe(2)
    expect(JSON.parse(first.stdout).error).toMatchObject({code: 'USAGE', exitCode: 2, message: expect.stringContaining('nosuchcmd')})
    // Without --json it stays one line on stderr, and nothing on stdout.
    const plain = uffd(['nosuchcmd'])
    expect(plain.status).toBe(2)
    expect(plain.stdout).toBe('')
    expect(plain.stderr).toMatch(/nosuchcmd not found/)
  })
})
