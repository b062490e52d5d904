// Bundles what `uffd resume` runs into dist/bundle/: the fast path past oclif
// (dist/cli/resume-entry.js, which bin/run.js imports as cli-resume-entry.js) and each worker
// thread it starts (resume/fault-loop/worker.js as resume-fault-loop-worker.js), with the code
// they share and each dynamic import in chunks beside them (a dynamic import stays one: the
// modules after listening, and the remote and CRIU machinery, load only when wanted).
// Node's ESM loader resolves, opens and compiles every module file on its own, and the modules
// up to listening are about a hundred: loading them was most of the time from exec to the ready
// file, and with many open at once the loader failed under a low RLIMIT_NOFILE (EMFILE). One
// file or a few are read and compiled instead.
//
// Run after tsc (npm run build, prepack); the bundles are made from dist/, never from src/.
// Packages with native code or heavy trees stay imports (they load from node_modules as before).
// A module's import.meta.url is rewritten to the URL its dist/ file has (every output file lies
// in dist/bundle/ itself), so paths made from it (package.json, native/build/, createRequire)
// stay right; startWorker maps a worker's dist/ URL to its bundle (process.env.UFFD_BUNDLE is
// defined as "1" here, at build time).
import fs from 'node:fs/promises'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

import {build} from 'esbuild'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const dist = path.join(root, 'dist')
const pkg = JSON.parse(await fs.readFile(path.join(root, 'package.json'), 'utf8'))

// Every dependency stays external except the pure-JavaScript one the path to listening uses,
// which is hundreds of small ESM files.
const bundled = new Set(['@sinclair/typebox'])
const external = Object.keys(pkg.dependencies).filter((name) => !bundled.has(name))

export const ENTRIES = ['cli/resume-entry', 'resume/fault-loop/worker', 'resume/decoder/worker', 'remote/fetcher/worker', 'snapshot/compress-worker', 'snapshot/compare-worker']

const outdir = path.join(dist, 'bundle')

/** Rewrites import.meta.url in each dist/ module to that module's own URL, found from its output file's. */
const moduleUrls = {
  name: 'module-urls',
  setup(b) {
    b.onLoad({filter: /\.js$/}, async (args) => {
      const contents = await fs.readFile(args.path, 'utf8')
      if (!args.path.startsWith(dist + path.sep) || !contents.includes('import.meta.url')) return {contents, loader: 'js'}
      const relative = path.relative(outdir, args.path).split(path.sep).join('/')
      return {contents: contents.replaceAll('import.meta.url', `new URL(${JSON.stringify(relative)}, import.meta.url).href`), loader: 'js'}
    })
  },
}

await fs.rm(outdir, {recursive: true, force: true})
await build({
  entryPoints: Object.fromEntries(ENTRIES.map((entry) => [entry.replaceAll('/', '-'), path.join(dist, `${entry}.js`)])),
  outdir,
  bundle: true,
  splitting: true,
  chunkNames: 'chunk-[hash]',
  format: 'esm',
  platform: 'node',
  target: 'node20',
  external,
  define: {'process.env.UFFD_BUNDLE': '"1"'},
  plugins: [moduleUrls],
  logLevel: 'warning',
})
