// The npm package a new user installs. This checks what goes into it and the install script's
// behaviour quickly; scripts/check-package.sh (run by .ci/run) packs a clean tree, installs the
// tarball into a temporary prefix and runs every command of the installed uffd.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {afterAll, beforeAll, describe, expect, it} from 'vitest'

import {ROOT} from './helpers/cli.js'
import {tempDir} from './helpers/images.js'

const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'))

describe('package.json', () => {
  it('says where uffd runs: Linux on x86-64 with glibc, Node with crc32 in node:zlib', () => {
    expect(pkg.os).toEqual(['linux'])
    expect(pkg.cpu).toEqual(['x64'])
    expect(pkg.libc).toEqual(['glibc'])
    // zlib.crc32 arrived in 20.15.0 and 22.2.0 (not in 21).
    expect(pkg.engines.node).toBe('^20.15.0 || >=22.2.0')
  })

  it('builds dist when packed and the native libraries when installed', () => {
    expect(pkg.scripts.prepack).toMatch(/tsc -p tsconfig\.build\.json/)
    expect(pkg.scripts.prepack).toMatch(/oclif manifest/)
    // bin/run.js imports resume's bundle, made from dist/ after tsc.
    expect(pkg.scripts.prepack).toMatch(/tsc -p tsconfig\.build\.json && node scripts\/bundle\.mjs/)
    expect(pkg.scripts.build).toMatch(/tsc -p tsconfig\.build\.json && node scripts\/bundle\.mjs/)
    expect(pkg.scripts.install).toBe('sh scripts/build-native.sh')
  })
})

describe('npm pack', () => {
  let files: string[]
  beforeAll(() => {
    // Scripts off: this looks at the list only (the build already ran); the real pack is in check-package.sh.
    const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {cwd: ROOT, encoding: 'utf8'})
    expect(r.status, r.stderr).toBe(0)
    files = (JSON.parse(r.stdout) as {files: {path: string}[]}[])[0].files.map((f) => f.path)
  })

  it('ships the built commands, the manifest and the C sources of the libraries with their build', () => {
    for (const f of ['bin/run.js', 'dist/commands/stats.js', 'dist/commands/working-set/merge.js', 'dist/bundle/cli-resume-entry.js', 'dist/bundle/resume-fault-loop-worker.js', 'dist/bundle/resume-decoder-worker.js', 'dist/bundle/remote-fetcher-worker.js', 'oclif.manifest.json', 'native/Makefile', 'native/libuffd_fill.c', 'native/libuffd_crc.c', 'scripts/build-native.sh', 'docs/ERRORS.md']) {
      expect(files, f).toContain(f)
    }
  })

  it('ships no binary built here, no test program, no TypeScript source and no dev launcher', () => {
    const unwanted = files.filter((f) => /^native\/build\//.test(f) || (/^native\/.*\.c$/.test(f) && !/^native\/lib/.test(f)) || /^(src|test|bench|fixtures)\//.test(f) || f === 'bin/dev.js' || f.endsWith('.map'))
    expect(unwanted).toEqual([])
  })
})

describe('scripts/build-native.sh (the install script)', () => {
  let dir: string
  beforeAll(() => {
    dir = tempDir('uffd-package-test-')
    // What the package holds of native/: the libraries' sources and the Makefile.
    fs.mkdirSync(path.join(dir, 'native'))
    fs.mkdirSync(path.join(dir, 'scripts'))
    for (const f of ['Makefile', 'libuffd_fill.c', 'libuffd_crc.c', 'libuffd_digest.c']) fs.copyFileSync(path.join(ROOT, 'native', f), path.join(dir, 'native', f))
    fs.copyFileSync(path.join(ROOT, 'scripts/build-native.sh'), path.join(dir, 'scripts/build-native.sh'))
  })
  afterAll(() => fs.rmSync(dir, {recursive: true, force: true}))

  it('builds the shared libraries, and only those', () => {
    const r = spawnSync('sh', [path.join(dir, 'scripts/build-native.sh')], {encoding: 'utf8'})
    expect(r.status, r.stderr).toBe(0)
    expect(fs.readdirSync(path.join(dir, 'native/build')).sort()).toEqual(['libuffd_crc.so', 'libuffd_digest.so', 'libuffd_fill.so'])
  })

  it('without a C compiler, fails with a message that says what to install', () => {
    const r = spawnSync('sh', [path.join(dir, 'scripts/build-native.sh')], {encoding: 'utf8', env: {...process.env, CC: 'no-such-gcc'}})
    expect(r.status).toBe(1)
    expect(r.stderr).toMatch(/needs a C compiler \(no-such-gcc\)/)
    expect(r.stderr).toMatch(/apt-get install gcc make/)
  })
})
