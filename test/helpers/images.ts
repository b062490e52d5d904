import crypto from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {type SnapshotReader} from '../../src/snapshot/reader.js'

/** Deterministic pseudo-random bytes (AES-CTR keystream), reproducible from a seed. */
export function pseudoRandom(length: number, seed: number): Buffer {
  const key = crypto.createHash('sha256').update(`uffd-test-${seed}`).digest().subarray(0, 16)
  return crypto.createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(length))
}

/** Text-like, compressible page content. */
export function compressiblePage(seed: number, pageSize = 4096): Buffer {
  const words = ['kernel', 'page', 'cache', 'inode', 'dentry', 'slab', 'task', 'struct', 'mm', 'vma']
  let s = ''
  for (let i = 0; s.length < pageSize; i++) s += `${words[(seed + i * 7) % words.length]}=${(seed * 31 + i) % 1000};`
  return Buffer.from(s.slice(0, pageSize))
}

export type ImageKind = 'random' | 'zero' | 'mixed' | 'incompressible' | 'compressible'

/**
 * A memory-like image: `mixed` has zero pages, compressible pages, random pages and chunks that
 * repeat earlier ones (so zero maps, codecs, raw fallback and dedup all get exercised).
 */
export function makeImage(kind: ImageKind, size: number, seed = 1): Buffer {
  switch (kind) {
    case 'random':
    case 'incompressible':
      return pseudoRandom(size, seed)
    case 'zero':
      return Buffer.alloc(size)
    case 'compressible': {
      const out = Buffer.alloc(size)
      for (let at = 0, p = 0; at < size; at += 4096, p++) compressiblePage(seed + p).copy(out, at)
      return out
    }
    case 'mixed': {
      const out = Buffer.alloc(size)
      const random = pseudoRandom(size, seed)
      for (let at = 0, p = 0; at < size; at += 4096, p++) {
        const pick = (p * 2654435761 + seed) % 11
        if (pick < 4) continue // zero page
        if (pick < 7) compressiblePage(seed + p).copy(out, at)
        else random.copy(out, at, at, Math.min(size, at + 4096))
      }
      // Repeat an early 64 KiB block further on, twice, for deduplication.
      if (size >= 8 * 65536) {
        out.copy(out, 5 * 65536, 65536, 2 * 65536)
        out.copy(out, 7 * 65536, 65536, 2 * 65536)
      }
      return out
    }
  }
}

export function tempDir(prefix = 'uffd-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix))
}

/**
 * A sparse file of `size` bytes: data only at the given [offset, length] extents, holes
 * elsewhere. Returns the equivalent in-memory image.
 */
export function writeSparse(file: string, size: number, extents: [number, number][], seed = 7): Buffer {
  const image = Buffer.alloc(size)
  const fd = fs.openSync(file, 'w')
  try {
    fs.ftruncateSync(fd, size)
    for (const [i, [offset, length]] of extents.entries()) {
      const data = pseudoRandom(length, seed + i)
      data.copy(image, offset)
      fs.writeSync(fd, data, 0, length, offset)
    }
  } finally {
    fs.closeSync(fd)
  }
  return image
}

/** Decodes a whole snapshot through its reader, chunk by chunk, cut at the logical size. */
export function decodeImage(reader: SnapshotReader): Buffer {
  const {geometry} = reader
  const out = Buffer.alloc(geometry.paddedSize)
  const chunk = Buffer.alloc(geometry.chunkSize)
  for (let c = 0; c < geometry.chunkCount; c++) {
    reader.readChunk(c, chunk)
    chunk.copy(out, geometry.chunkStart(c), 0, geometry.chunkPaddedLength(c))
  }
  return out.subarray(0, geometry.logicalSize)
}
