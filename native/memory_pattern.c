/*
 * memory_pattern: a process whose memory contents are known exactly, for tests that snapshot a
 * live process (uffd snapshot --pid) or restore one (CRIU lazy pages).
 *
 *   memory_pattern --mib N | --kib K [--seed S] [--verify-loop | --signals]
 *
 * Maps N MiB (or K KiB, a multiple of 4: small enough for a dump kept as a test fixture) of private anonymous memory and fills page i as follows:
 *   i % 7 == 3   never touched (not populated: a snapshot must store it as a zero page)
 *   i % 5 == 0   written with zeros (populated, yet a zero page by content)
 *   otherwise    xorshift64 bytes seeded by (seed, i): the same on every run
 * Then prints one JSON line {"address":..,"size":..,"seed":..,"pid":..} and waits: until stdin
 * closes (default), or with --verify-loop re-checks the pattern every 100 ms, printing
 * {"verified":n} lines, and exits 1 at the first wrong byte (used after a restore).
 *
 * --signals (for layers: memory that changes a little between two snapshots) waits for signals
 * instead: each SIGUSR1 starts round r + 1, rewriting every page i with i % 97 == 1 with the
 * bytes seeded by (seed + r + 1, i) and printing {"changed":pages,"round":r+1}; SIGUSR2 starts
 * the verify loop, which then expects those pages to hold the last round's bytes.
 */
#include <getopt.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t page_seed(uint64_t seed, uint64_t page) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (page + 1) * 0xBF58476D1CE4E5B9ull;
  return x ? x : 1;
}

static void fill_page(uint8_t *p, uint64_t seed, uint64_t page) {
  uint64_t x = page_seed(seed, page);
  uint64_t *w = (uint64_t *)p;
  for (size_t i = 0; i < PAGE / 8; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    w[i] = x;
  }
}

/* Rounds of --signals changes made so far: part of the memory, so a restored process knows it. */
static uint64_t round_no;
#define CHANGED(i) (round_no > 0 && (i) % 97 == 1)

/* Returns the index of the first wrong page, or -1 when every page holds its pattern. */
static long check(const uint8_t *base, size_t pages, uint64_t seed) {
  static uint8_t expect[PAGE];
  for (size_t i = 0; i < pages; i++) {
    const uint8_t *p = base + i * PAGE;
    if (CHANGED(i)) {
      fill_page(expect, seed + round_no, i);
      if (memcmp(p, expect, PAGE)) return (long)i;
    } else if (i % 7 == 3 || i % 5 == 0) {
      for (size_t k = 0; k < PAGE; k++)
        if (p[k]) return (long)i;
    } else {
      fill_page(expect, seed, i);
      if (memcmp(p, expect, PAGE)) return (long)i;
    }
  }
  return -1;
}

static volatile sig_atomic_t want_change, want_verify;
static void on_signal(int sig) {
  if (sig == SIGUSR1) want_change = 1;
  else want_verify = 1;
}

/* --signals: SIGUSR1 changes a round of pages, SIGUSR2 returns (to the verify loop). */
static void serve_signals(uint8_t *base, size_t pages, uint64_t seed) {
  sigset_t block, empty;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  sigaddset(&block, SIGUSR2);
  sigemptyset(&empty);
  /* Blocked outside sigsuspend: a signal between the flag test and the wait is not lost. */
  sigprocmask(SIG_BLOCK, &block, NULL);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGUSR1, &sa, NULL);
  sigaction(SIGUSR2, &sa, NULL);
  for (;;) {
    while (!want_change && !want_verify) sigsuspend(&empty);
    if (want_change) {
      want_change = 0;
      round_no++;
      size_t n = 0;
      for (size_t i = 1; i < pages; i += 97, n++) fill_page(base + i * PAGE, seed + round_no, i);
      printf("{\"changed\":%zu,\"round\":%lu}\n", n, (unsigned long)round_no);
      fflush(stdout);
    }
    if (want_verify) return;
  }
}

int main(int argc, char **argv) {
  size_t mib = 0, kib = 0;
  uint64_t seed = 1;
  int verify_loop = 0, signals = 0;
  static const struct option opts[] = {
      {"mib", required_argument, 0, 'm'}, {"kib", required_argument, 0, 'k'}, {"seed", required_argument, 0, 's'}, {"verify-loop", no_argument, 0, 'v'}, {"signals", no_argument, 0, 'g'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    if (c == 'm') mib = strtoull(optarg, NULL, 10);
    else if (c == 'k') kib = strtoull(optarg, NULL, 10);
    else if (c == 's') seed = strtoull(optarg, NULL, 10);
    else if (c == 'v') verify_loop = 1;
    else if (c == 'g') signals = 1;
    else return 2;
  }
  if ((mib == 0) == (kib == 0) || kib % 4 != 0 || (verify_loop && signals)) {
    fprintf(stderr, "usage: memory_pattern --mib N | --kib K (a multiple of 4) [--seed S] [--verify-loop | --signals]\n");
    return 2;
  }
  size_t size = mib ? mib << 20 : kib << 10, pages = size / PAGE;
  uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    perror("mmap");
    return 2;
  }
  for (size_t i = 0; i < pages; i++) {
    if (i % 7 == 3) continue;
    if (i % 5 == 0) memset(base + i * PAGE, 0, PAGE); /* populates the page, contents zero */
    else fill_page(base + i * PAGE, seed, i);
  }
  printf("{\"address\":%lu,\"size\":%zu,\"seed\":%lu,\"pid\":%d}\n", (unsigned long)(uintptr_t)base, size, (unsigned long)seed, getpid());
  fflush(stdout);
  if (signals) serve_signals(base, pages, seed);
  else if (!verify_loop) {
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
  }
  for (unsigned long n = 1;; n++) {
    long bad = check(base, pages, seed);
    if (bad >= 0) {
      printf("{\"verified\":false,\"bad_page\":%ld}\n", bad);
      return 1;
    }
    printf("{\"verified\":%lu}\n", n);
    fflush(stdout);
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
