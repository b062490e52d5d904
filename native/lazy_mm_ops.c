/*
 * lazy_mm_ops: a process that changes its memory layout right after a lazy restore, for the CRIU
 * lazy-pages tests: fork, mremap (move and grow), munmap and MADV_DONTNEED of memory that is
 * still being served through userfaultfd.
 *
 *   lazy_mm_ops --mib N --seed S --go FILE
 *
 * Fills N MiB like memory_pattern (page i: never touched if i % 7 == 3, zeros if i % 5 == 0,
 * else xorshift64 bytes of (seed, i)), prints {"address":..,"size":..,"seed":..,"pid":..}, then
 * polls every 10 ms for FILE. When it exists (after the restore) it:
 *   1. forks; the child checks every page and exits 0, or 1 at a wrong one;
 *   2. moves the third quarter elsewhere with mremap (MREMAP_MAYMOVE|MREMAP_FIXED) and checks it
 *      there; then grows the moved quarter to twice its size (the new half must read zeros);
 *   3. munmaps the last eighth; MADV_DONTNEEDs pages 16..31 (they must read zeros);
 *   4. checks the rest, waits for the child and prints {"ok":true} (exit 0) or
 *      {"ok":false,"what":..} (exit 1).
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t seed;

static void fill_page(uint8_t *p, uint64_t page) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (page + 1) * 0xBF58476D1CE4E5B9ull;
  if (!x) x = 1;
  uint64_t *w = (uint64_t *)p;
  for (size_t i = 0; i < PAGE / 8; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    w[i] = x;
  }
}

static int is_zero(const uint8_t *p, size_t len) {
  for (size_t k = 0; k < len; k++)
    if (p[k]) return 0;
  return 1;
}

/* Checks pages [first, end) of the pattern, found at `at` (the address of page `first`). */
static long check(const uint8_t *at, size_t first, size_t end) {
  static uint8_t expect[PAGE];
  for (size_t i = first; i < end; i++) {
    const uint8_t *p = at + (i - first) * PAGE;
    if (i % 7 == 3 || i % 5 == 0) {
      if (!is_zero(p, PAGE)) return (long)i;
    } else {
      fill_page(expect, i);
      if (memcmp(p, expect, PAGE)) return (long)i;
    }
  }
  return -1;
}

static int fail(const char *what, long page) {
  printf("{\"ok\":false,\"what\":\"%s\",\"page\":%ld}\n", what, page);
  fflush(stdout);
  return 1;
}

int main(int argc, char **argv) {
  size_t mib = 0;
  const char *go = NULL;
  static const struct option opts[] = {{"mib", required_argument, 0, 'm'}, {"seed", required_argument, 0, 's'}, {"go", required_argument, 0, 'g'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    if (c == 'm') mib = strtoull(optarg, NULL, 10);
    else if (c == 's') seed = strtoull(optarg, NULL, 10);
    else if (c == 'g') go = optarg;
    else return 2;
  }
  if (mib < 1 || !go) {
    fprintf(stderr, "usage: lazy_mm_ops --mib N --seed S --go FILE\n");
    return 2;
  }
  size_t size = mib << 20, pages = size / PAGE;
  uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return 2;
  for (size_t i = 0; i < pages; i++) {
    if (i % 7 == 3) continue;
    if (i % 5 == 0) memset(base + i * PAGE, 0, PAGE);
    else fill_page(base + i * PAGE, i);
  }
  printf("{\"address\":%lu,\"size\":%zu,\"seed\":%lu,\"pid\":%d}\n", (unsigned long)(uintptr_t)base, size, (unsigned long)seed, getpid());
  fflush(stdout);
  while (access(go, F_OK) != 0) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }

  /* 1. A child reads all of the memory through its own (inherited) lazy state. */
  pid_t child = fork();
  if (child < 0) return fail("fork", -1);
  if (child == 0) _exit(check(base, 0, pages) >= 0 ? 1 : 0);

  /* 2. Move the third quarter to a fresh address, then grow it in place or by moving again. */
  size_t q = pages / 4, moved_first = 2 * q;
  uint8_t *target = mmap(NULL, 4 * q * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (target == MAP_FAILED) return fail("reserve", -1);
  uint8_t *moved = mremap(base + moved_first * PAGE, q * PAGE, q * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  if (moved == MAP_FAILED) return fail("mremap move", -1);
  long bad = check(moved, moved_first, moved_first + q);
  if (bad >= 0) return fail("moved quarter", bad);
  uint8_t *grown = mremap(moved, q * PAGE, 2 * q * PAGE, MREMAP_MAYMOVE);
  if (grown == MAP_FAILED) return fail("mremap grow", -1);
  if (!is_zero(grown + q * PAGE, q * PAGE)) return fail("grown part not zero", -1);
  bad = check(grown, moved_first, moved_first + q);
  if (bad >= 0) return fail("grown quarter", bad);

  /* 3. Drop the last eighth; discard pages 16..31 (zeros from now on). */
  size_t kept_end = pages - pages / 8;
  if (munmap(base + kept_end * PAGE, (pages - kept_end) * PAGE)) return fail("munmap", -1);
  if (madvise(base + 16 * PAGE, 16 * PAGE, MADV_DONTNEED)) return fail("madvise", -1);
  if (!is_zero(base + 16 * PAGE, 16 * PAGE)) return fail("discarded pages not zero", 16);

  /* 4. The rest is untouched by all this. */
  bad = check(base, 0, 16);
  if (bad < 0) bad = check(base + 32 * PAGE, 32, moved_first);
  if (bad < 0) bad = check(base + 3 * q * PAGE, 3 * q, kept_end);
  if (bad >= 0) return fail("remaining memory", bad);
  int status;
  if (waitpid(child, &status, 0) != child) return fail("waitpid", -1);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fail("child saw wrong memory", -1);
  printf("{\"ok\":true}\n");
  fflush(stdout);
  return 0;
}
