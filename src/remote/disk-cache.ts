import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import {UffdError} from '../core/errors.js'
import {tryLockExclusive} from '../sys/index.js'

/** A stored extent: where its bytes lie in the snapshot object. */
export interface ExtentRange {
  offset: number
  length: number
}

/** Files in the cache hold guest memory: readable by their owner only. */
const FILE_MODE = 0o600
const DIR_MODE = 0o700
/** A cached extent whose mtime is older than this is touched when read, so eviction (oldest mtime first) keeps what is in use. */
const TOUCH_AFTER_MS = 60 * 60 * 1000

/**
 * The local chunk cache: one directory per snapshot identity (a digest of its header, index,
 * zero map and footer, so a replaced object never meets the old one's bytes), one file per
 * stored extent, named by its offset and length, holding exactly the stored (compressed) bytes.
 *
 * Several handlers may use one directory at once. A file is written under a temporary name and
 * renamed into place, so a reader sees it complete or not at all. Nothing is fsync'd: after a
 * crash a file can hold garbage, which fails its CRC when read and is fetched again. Files may
 * be evicted (unlinked) at any time by any handler; a reader that finds one gone fetches it.
 *
 * Handlers sharing a directory fetch each extent once between them: a fetcher first claims the
 * extent (claim()), and a handler that finds it claimed waits for the holder to publish it.
 */
export class DiskCache {
  constructor(readonly dir: string) {}

  /** Creates the directory (and its root) if needed; CACHE_DIR when that is impossible. */
  static prepare(root: string, digest: string): DiskCache {
    const dir = path.join(root, digest)
    try {
      fs.mkdirSync(dir, {recursive: true, mode: DIR_MODE})
      fs.accessSync(dir, fs.constants.W_OK | fs.constants.R_OK)
    } catch (error) {
      throw new UffdError('CACHE_DIR', `cache directory ${dir}: ${(error as Error).message} (choose another with --cache-dir)`, {cause: error})
    }
    // What is in the cache is served into guest memory after only a CRC check: a directory
    // someone else can write to lets them plant chunks (a CRC is no signature) or swap files.
    for (const d of [root, dir]) checkOwnership(d)
    return new DiskCache(dir)
  }

  pathOf(extent: ExtentRange): string {
    return path.join(this.dir, `${extent.offset.toString(16)}-${extent.length.toString(16)}`)
  }

  has(extent: ExtentRange): boolean {
    try {
      return fs.statSync(this.pathOf(extent)).size === extent.length
    } catch {
      return false
    }
  }

  /**
   * Fills `dst` (extent.length bytes) from the cached file; false when there is none (or it has
   * the wrong size: someone else's torn write, or a different file). The caller checks the CRC.
   */
  read(extent: ExtentRange, dst: Uint8Array): boolean {
    let fd: number
    try {
      fd = fs.openSync(this.pathOf(extent), 'r')
    } catch (error) {
      // A file there that cannot be opened (another user's, an I/O error) would be found by the
      // fetcher and never fetched again: remove it, so the next ask fetches.
      if ((error as {code?: string}).code !== 'ENOENT') this.discard(extent)
      return false
    }
    try {
      const stat = fs.fstatSync(fd)
      if (stat.size !== extent.length) return false
      let done = 0
      while (done < dst.length) {
        const n = fs.readSync(fd, dst, done, dst.length - done, done)
        if (n === 0) return false
        done += n
      }
      if (Date.now() - stat.mtimeMs > TOUCH_AFTER_MS) {
        const now = new Date()
        // Only an eviction hint: a file we may read but not touch is still good.
        try {
          fs.futimesSync(fd, now, now)
        } catch {}
      }
      return true
    } catch {
      this.discard(extent)
      return false
    } finally {
      fs.closeSync(fd)
    }
  }

  /**
   * Publishes verified bytes; throws on a write failure (a full disk) after removing its
   * temporary file. A directory removed under us (an operator clearing the cache) is made again.
   */
  publish(extent: ExtentRange, bytes: Uint8Array): void {
    try {
      this.write(extent, bytes)
    } catch (error) {
      if ((error as {code?: string}).code !== 'ENOENT') throw error
      fs.mkdirSync(this.dir, {recursive: true, mode: DIR_MODE})
      this.write(extent, bytes)
    }
  }

  private write(extent: ExtentRange, bytes: Uint8Array): void {
    const final = this.pathOf(extent)
    const temp = path.join(this.dir, `.tmp-${process.pid}-${crypto.randomBytes(6).toString('hex')}`)
    try {
      fs.writeFileSync(temp, bytes, {mode: FILE_MODE, flag: 'wx'})
      fs.renameSync(temp, final)
    } catch (error) {
      fs.rmSync(temp, {force: true})
      throw error
    }
  }

  /**
   * Claims the fetch of an extent for this handler, across every handler sharing the directory:
   * an exclusive flock on its claim file (.claim-OFFSET-LENGTH). Returns the claim (the claim
   * file's descriptor, for unclaim()), 'held' when another handler holds it, or 'none' when no
   * claim can be made (the directory refuses new files): fetch without one. A flock goes with its
   * holder, so a handler killed mid-fetch (SIGKILL) blocks nobody.
   */
  claim(extent: ExtentRange): number | 'held' | 'none' {
    const file = this.claimPathOf(extent)
    // A claimer that opened the file just before its holder unlinked it locks a file nobody else
    // finds: it looks again (a few times; each time someone else made progress).
    for (let attempt = 0; attempt < 4; attempt++) {
      let fd: number
      try {
        fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, FILE_MODE)
      } catch (error) {
        if ((error as {code?: string}).code === 'ENOENT') {
          // The snapshot's directory was removed under us: publish() makes it again.
          try {
            fs.mkdirSync(this.dir, {recursive: true, mode: DIR_MODE})
          } catch {
            return 'none'
          }
          continue
        }
        return 'none'
      }
      let locked: boolean
      try {
        locked = tryLockExclusive(fd)
      } catch {
        fs.closeSync(fd)
        return 'none'
      }
      if (!locked) {
        fs.closeSync(fd)
        return 'held'
      }
      if (sameFile(fd, file)) return fd
      fs.closeSync(fd)
    }
    return 'none'
  }

  /** Ends a claim (after the extent is published, or failed): removes its file if it is still the claimed one, and drops the lock. */
  unclaim(extent: ExtentRange, fd: number): void {
    const file = this.claimPathOf(extent)
    try {
      if (sameFile(fd, file)) fs.unlinkSync(file)
    } catch {
      // A read-only directory keeps the file; the lock still goes with the descriptor.
    }
    fs.closeSync(fd)
  }

  private claimPathOf(extent: ExtentRange): string {
    return path.join(this.dir, `.claim-${extent.offset.toString(16)}-${extent.length.toString(16)}`)
  }

  /** Removes a cached extent that failed its check, so the next read fetches it. */
  discard(extent: ExtentRange): void {
    try {
      fs.rmSync(this.pathOf(extent), {force: true})
    } catch {
      // Not ours to remove: the fetch that follows replaces it by rename, or fails with CACHE_DIR.
    }
  }
}

/** Whether `fd` is the file `file` names now (not one unlinked or replaced since it was opened). */
function sameFile(fd: number, file: string): boolean {
  try {
    const held = fs.fstatSync(fd)
    const named = fs.statSync(file)
    return held.ino === named.ino && held.dev === named.dev
  } catch {
    return false
  }
}

/** Refuses a cache directory another user owns, or one that group or others may write. */
function checkOwnership(dir: string): void {
  const stat = fs.statSync(dir)
  const uid = process.getuid?.()
  if (uid !== undefined && stat.uid !== uid) {
    throw new UffdError('CACHE_DIR', `cache directory ${dir}: owned by uid ${stat.uid}, not by this user (uid ${uid}); its files would be served into guest memory (choose another with --cache-dir)`)
  }
  if ((stat.mode & 0o022) !== 0) {
    throw new UffdError('CACHE_DIR', `cache directory ${dir}: writable by group or others (mode ${(stat.mode & 0o777).toString(8)}); its files would be served into guest memory (chmod go-w it, or choose another with --cache-dir)`)
  }
}

/** The names the cache gives its own directories (identity digests) and files (extents, temporaries): eviction removes nothing else. */
const DIGEST_NAME = /^[0-9a-f]{32}$/
const EXTENT_NAME = /^([0-9a-f]+)-([0-9a-f]+)$/
const TEMP_NAME = /^\.tmp-\d+-[0-9a-f]{12}$/
const CLAIM_NAME = /^\.claim-[0-9a-f]+-[0-9a-f]+$/

/** The extent a cache file holds, by its name; undefined for a name the cache does not make. */
export function extentOfName(name: string): ExtentRange | undefined {
  const m = EXTENT_NAME.exec(name)
  return m ? {offset: parseInt(m[1], 16), length: parseInt(m[2], 16)} : undefined
}

/** Temporary files older than this were left by a handler that died mid-write (claim files: mid-fetch). */
const STALE_TEMP_MS = 10 * 60 * 1000

/** Removes a claim file no handler holds (its holder died; a live holder's lock makes this a no-op). */
function removeUnheldClaim(file: string): void {
  let fd: number
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW)
  } catch {
    return
  }
  try {
    if (tryLockExclusive(fd) && sameFile(fd, file)) fs.unlinkSync(file)
  } catch {
    // Left for the next scan.
  } finally {
    fs.closeSync(fd)
  }
}

/**
 * Keeps a cache root under `maxBytes`: when a scan finds more, the files read least recently
 * (oldest mtime: reads touch files, see TOUCH_AFTER_MS) are removed, across every snapshot's
 * directory, down to 90% of the bound. Runs in the fetcher thread, asynchronously; racing
 * another handler's eviction is harmless (a file removed twice is removed). Only names the cache
 * makes are touched: a --cache-dir that also holds other things keeps them. Returns the evicted
 * extents per digest directory, so a handler can forget that it had them.
 */
export async function evict(root: string, maxBytes: number): Promise<{bytes: number; evictedBytes: number; evicted: {dir: string; extent: ExtentRange}[]}> {
  const files: {file: string; dir: string; extent: ExtentRange; size: number; mtimeMs: number}[] = []
  let total = 0
  let dirs: string[]
  try {
    dirs = await fs.promises.readdir(root)
  } catch {
    return {bytes: 0, evictedBytes: 0, evicted: []}
  }
  const now = Date.now()
  for (const name of dirs) {
    if (!DIGEST_NAME.test(name)) continue
    const dir = path.join(root, name)
    let entries: string[]
    try {
      entries = await fs.promises.readdir(dir)
    } catch {
      continue
    }
    for (const entry of entries) {
      const file = path.join(dir, entry)
      try {
        const stat = await fs.promises.stat(file)
        if (!stat.isFile()) continue
        if (TEMP_NAME.test(entry)) {
          if (now - stat.mtimeMs > STALE_TEMP_MS) await fs.promises.rm(file, {force: true})
          continue
        }
        if (CLAIM_NAME.test(entry)) {
          if (now - stat.mtimeMs > STALE_TEMP_MS) removeUnheldClaim(file)
          continue
        }
        const extent = extentOfName(entry)
        if (!extent) continue
        files.push({file, dir, extent, size: stat.size, mtimeMs: stat.mtimeMs})
        total += stat.size
      } catch {
        // Removed meanwhile by another handler.
      }
    }
  }
  if (total <= maxBytes) return {bytes: total, evictedBytes: 0, evicted: []}
  files.sort((a, b) => a.mtimeMs - b.mtimeMs)
  let evictedBytes = 0
  const evicted: {dir: string; extent: ExtentRange}[] = []
  for (const f of files) {
    if (total - evictedBytes <= maxBytes * 0.9) break
    await fs.promises.rm(f.file, {force: true})
    evictedBytes += f.size
    evicted.push({dir: f.dir, extent: f.extent})
  }
  return {bytes: total - evictedBytes, evictedBytes, evicted}
}
