import path from 'node:path'

import {type ImageReader, LayeredReader} from '../../src/snapshot/layered-reader.js'
import {SnapshotReader} from '../../src/snapshot/reader.js'
import {UnitCache} from '../../src/snapshot/unit-cache.js'

/**
 * The image a local snapshot resolves to, opened synchronously for tests that read it chunk by
 * chunk: a self-contained file as it is, a layer with the ancestors its table names, from its own
 * directory (their identities are not checked here: `uffd` does that, and tests of it use it).
 */
export function openLocalImage(file: string): ImageReader {
  const top = SnapshotReader.open(file)
  if (!top.layer) return top
  const names = top.layer.parents.map((p) => p.name)
  const files = [...names.map((n) => SnapshotReader.open(path.join(path.dirname(file), n))), top]
  return LayeredReader.fromFiles(files, [...names, path.basename(file)], new UnitCache())
}
