#!/usr/bin/env node
// Checked before anything is imported: on an older Node the first module that imports crc32 from
// node:zlib (20.15+, 22.2+) would fail to link, with a message that does not say what to do.
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 20 || (major === 20 && minor < 15) || major === 21 || (major === 22 && minor < 2)) {
  process.stderr.write(`uffd: needs Node.js 20.15 or later (22.2 or later on 22), not ${process.version}\n`)
  process.exit(1)
}

// A VMM waits for `uffd resume` to listen on every resume: its plain command lines skip oclif
// (src/cli/resume-entry.ts); anything else, --help and usage errors included, goes to oclif.
const fast = process.argv[2] === 'resume' && (await (await import(await resumeEntry())).runResumeFast(process.argv.slice(3)))
if (!fast) {
  const {execute} = await import('@oclif/core')
  await execute({dir: import.meta.url})
}

/**
 * The resume path's bundle (scripts/bundle.mjs: a few files to load rather than each module),
 * when it was made from the dist/ there is now; after a bare tsc, which rewrites every file of
 * dist/ (minutes after the last build, as a rule), the modules themselves (their workers then
 * start unbundled too). Not to the second: npm extracts an installed package's files in no set
 * order, each with the time it was written, so a module may be a moment newer than its bundle.
 */
async function resumeEntry() {
  const staleAfterMs = 30_000
  const {statSync} = await import('node:fs')
  const bundle = new URL('../dist/bundle/cli-resume-entry.js', import.meta.url)
  const modules = new URL('../dist/cli/resume-entry.js', import.meta.url)
  try {
    if (statSync(bundle).mtimeMs >= statSync(modules).mtimeMs - staleAfterMs) return bundle.href
  } catch {
    // No bundle: the modules.
  }
  return modules.href
}
