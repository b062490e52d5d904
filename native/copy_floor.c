/*
 * copy_floor: this machine's floor for filling memory through a userfaultfd, the reference that
 * background population is measured against (bench/resume). Registers SIZE bytes of fresh
 * anonymous memory with a uffd in this process and fills it with UFFDIO_COPY (from a source
 * buffer of non-zero bytes) in pieces of STEP bytes, with no faulting thread waiting: the
 * kernel's page allocation + copy cost and nothing else. Also times UFFDIO_ZEROPAGE.
 *
 *   copy_floor --size BYTES [--step BYTES]     (K/M/G suffixes; default step 2M)
 *
 * Prints {"size":..,"step":..,"copy_ns":..,"zeropage_ns":..}. Needs a uffd (root, or
 * vm.unprivileged_userfaultfd=1: user-mode-only faults are enough here).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t parse_size(const char *s) {
  char *end;
  uint64_t v = strtoull(s, &end, 0);
  switch (*end) {
  case 'G': case 'g': v <<= 10; /* fall through */
  case 'M': case 'm': v <<= 10; /* fall through */
  case 'K': case 'k': v <<= 10;
  }
  return v;
}

static void die(const char *what) {
  fprintf(stderr, "copy_floor: %s: %s\n", what, strerror(errno));
  exit(2);
}

static int make_uffd(void *base, uint64_t size) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(fd, UFFDIO_API, &api)) die("UFFDIO_API");
  struct uffdio_register reg = {.range = {.start = (uintptr_t)base, .len = size}, .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(fd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
  return fd;
}

int main(int argc, char **argv) {
  uint64_t size = 0, step = 2 << 20;
  static const struct option opts[] = {{"size", required_argument, 0, 's'}, {"step", required_argument, 0, 't'}, {0, 0, 0, 0}};
  for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    if (c == 's') size = parse_size(optarg);
    else if (c == 't') step = parse_size(optarg);
    else return 2;
  }
  if (!size || !step || size % 4096 || step % 4096) {
    fprintf(stderr, "usage: copy_floor --size BYTES [--step BYTES] (multiples of 4096)\n");
    return 2;
  }
  uint8_t *src = malloc(step);
  if (!src) die("malloc");
  for (uint64_t i = 0; i < step; i++) src[i] = (uint8_t)(i * 131 + 7); /* non-zero, as real data */

  uint64_t ns[2];
  for (int zero = 0; zero < 2; zero++) {
    uint8_t *dst = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (dst == MAP_FAILED) die("mmap");
    int fd = make_uffd(dst, size);
    uint64_t t0 = now_ns();
    for (uint64_t at = 0; at < size; at += step) {
      uint64_t len = size - at < step ? size - at : step;
      if (zero) {
        struct uffdio_zeropage z = {.range = {.start = (uintptr_t)(dst + at), .len = len}};
        if (ioctl(fd, UFFDIO_ZEROPAGE, &z)) die("UFFDIO_ZEROPAGE");
      } else {
        struct uffdio_copy c = {.dst = (uintptr_t)(dst + at), .src = (uintptr_t)src, .len = len};
        if (ioctl(fd, UFFDIO_COPY, &c)) die("UFFDIO_COPY");
      }
    }
    ns[zero] = now_ns() - t0;
    close(fd);
    munmap(dst, size);
  }
  printf("{\"size\":%llu,\"step\":%llu,\"copy_ns\":%llu,\"zeropage_ns\":%llu}\n", (unsigned long long)size, (unsigned long long)step, (unsigned long long)ns[0], (unsigned long long)ns[1]);
  return 0;
}
