import fs from 'node:fs'

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages'
/** mkdir is atomic: the lock that serialises test files changing the global pool. */
const LOCK = '/tmp/uffd-test-hugepages.lock'

function free(): number {
  return Number(/HugePages_Free:\s+(\d+)/.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0)
}

function locked<T>(body: () => T): T {
  const deadline = Date.now() + 10_000
  for (;;) {
    try {
      fs.mkdirSync(LOCK)
      break
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error
      // A holder that died leaves the lock behind; a live one holds it for a few syscalls only.
      if (Date.now() > deadline) fs.rmSync(LOCK, {recursive: true, force: true})
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5)
    }
  }
  try {
    return body()
  } finally {
    fs.rmSync(LOCK, {recursive: true, force: true})
  }
}

export interface HugePageReservation {
  /** Why the pages could not be had (the tests that need them skip with it), or undefined. */
  reason: string | undefined
  /** Gives back what was added: relative, so what other test files added at the same time stays. */
  release(): void
}

/**
 * Grows the kernel's pool of 2 MiB pages by `pages` for the tests of one file. The pool is
 * global, and vitest runs files side by side: each change is a read-modify-write of the sysctl
 * under a lock, relative to what is there, so two files never undo each other's reservation.
 */
export function reserveHugePages(pages: number): HugePageReservation {
  let added = 0
  let reason: string | undefined
  try {
    locked(() => {
      const before = Number(fs.readFileSync(NR_HUGEPAGES, 'utf8'))
      fs.writeFileSync(NR_HUGEPAGES, String(before + pages))
      added = Number(fs.readFileSync(NR_HUGEPAGES, 'utf8')) - before
    })
    if (free() < pages) reason = `only ${free()} free 2 MiB pages after asking for ${pages} more (memory too fragmented?)`
  } catch (error) {
    reason = `cannot reserve 2 MiB pages through ${NR_HUGEPAGES}: ${(error as Error).message}`
  }
  return {
    reason,
    release: () => {
      if (added === 0) return
      locked(() => fs.writeFileSync(NR_HUGEPAGES, String(Math.max(0, Number(fs.readFileSync(NR_HUGEPAGES, 'utf8')) - added))))
      added = 0
    },
  }
}
