// fc_client: behaves like Firecracker restoring a snapshot with the Uffd memory backend, so that
// page-fault handlers can be tested and benchmarked end to end without a VMM.
//
// Like Firecracker it maps guest memory as anonymous private memory, creates a userfaultfd that
// is NOT user-mode-only (KVM resolves guest memory with get_user_pages, a kernel-mode fault),
// registers every region in MISSING mode, connects to the handler's Unix socket and sends the
// region table as JSON together with the uffd in a single sendmsg, and keeps the socket open
// until it exits. Then it touches guest memory (every first access to a page blocks in the
// kernel until the handler resolves it), verifies the bytes against the raw image the handler
// serves, and optionally simulates a balloon inflate (MADV_DONTNEED, after which the handler
// must serve zeros).
//
// Prints one JSON line on stdout. Exit status: 0 ok, 1 wrong bytes (or a kernel-mode access
// failed), 2 usage or setup error, 3 timeout (the handler did not serve in time).
//
// The JSON line: ok, fc_version, page_size, mem_size, image_size, regions, fds, access, touch,
// threads; handshake_ns (connect + sendmsg); touches (accesses made), pages_touched (distinct
// pages), touch_ns (wall time of the touch phase), first_touch_ns (thread 0's first access: a
// full fault round trip with a cold handler), lat_p50/p90/p99_ns (per access, from a log-linear
// histogram, at most 6.25% low) and lat_max_ns (exact); verify (none|touched|all),
// pages_verified, verify_ns, verify_errors (bad pages), first_bad_offset, expected_byte,
// actual_byte (null when none); balloon_ok (null without --balloon), balloon_bytes, balloon_ns,
// balloon_bad_pages, balloon_first_bad_offset. With --malformed: ok, malformed, handler_closed,
// wait_ns. On timeout: ok:false, error:"timeout", phase, timeout_ms, touches_done.

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

enum { EXIT_VERIFY = 1, EXIT_SETUP = 2, EXIT_TIMEOUT = 3 };

#define SMALL_PAGE 4096ULL
#define HUGE_PAGE (2ULL << 20)
// Distance between regions in our address space. Firecracker's regions are separate mmaps; a
// gap guarantees they are never adjacent, so a handler that derives file offsets from the first
// region's base instead of each region's own base/offset reads the wrong bytes and fails verify.
#define REGION_GAP HUGE_PAGE
#define MAX_REGIONS 64
#define MAX_BALLOON 64
#define LAT_BUCKETS 1024

enum fc_shape { FC_1_1, FC_1_7, FC_1_12 };
static const char *const shape_names[] = {"1.1", "1.7", "1.12"};
enum touch_kind { TOUCH_SEQUENTIAL, TOUCH_RANDOM, TOUCH_TRACE, TOUCH_NONE };
static const char *const touch_names[] = {"sequential", "random", "trace", "none"};
enum access_kind { ACCESS_LOAD, ACCESS_SYSCALL, ACCESS_GUP, ACCESS_MIXED };
static const char *const access_names[] = {"load", "syscall", "gup", "mixed"};
enum verify_mode { VERIFY_NONE, VERIFY_TOUCHED, VERIFY_ALL };
static const char *const verify_names[] = {"none", "touched", "all"};
enum malformed_kind {
	MAL_NONE, MAL_NOT_JSON, MAL_UNALIGNED, MAL_TWO_PAGE_SIZES, MAL_NO_FD, MAL_EMPTY_ARRAY,
	MAL_HUGE_SIZE,
};
static const char *const malformed_names[] = {
	"", "not-json", "unaligned", "two-page-sizes", "no-fd", "empty-array", "huge-size",
};
// Well-formed VMMs that misbehave in one way (the handler must contain them):
// partial-handshake: sends its uffd with the first half of the JSON only, then touches memory;
// fault-outside: registers all of its memory but announces one page less, and touches that page;
// connect-twice: sends its handshake on two connections, the second with a dup() of its uffd;
// unregistered: sends an initialised uffd with no memory registered on it, then does not touch
// its memory (it would read its own zeros) and stays until --hold-ms has passed.
enum hostile_kind { HOSTILE_NONE, HOSTILE_PARTIAL, HOSTILE_FAULT_OUTSIDE, HOSTILE_TWICE, HOSTILE_UNREGISTERED };
static const char *const hostile_names[] = {"", "partial-handshake", "fault-outside", "connect-twice", "unregistered"};

struct range {
	uint64_t off, len;
};

static struct {
	const char *socket_path, *image_path, *trace_path;
	uint64_t size; // 0 = image size
	unsigned nregions;
	bool hugepages, extra_fields, count_set, balloon_concurrent, file_backend;
	enum fc_shape shape;
	int nfds;
	enum touch_kind touch;
	enum access_kind access;
	enum verify_mode verify;
	enum malformed_kind malformed;
	enum hostile_kind hostile;
	uint64_t seed, count, stride, hold_ms, delay_ms, crash_after, timeout_ms;
	uint64_t split_at;   // 0: region 0 is one mapping
	int64_t slots_free;  // -1: leave the mapping count alone
	unsigned threads;
	struct range balloon[MAX_BALLOON];
	unsigned nballoon;
} opt = {
	.nregions = 1, .shape = FC_1_12, .nfds = 1, .seed = 1, .threads = 1, .timeout_ms = 120000,
	.slots_free = -1,
};

struct region {
	uint8_t *base;
	uint64_t size, offset; // offset: running sum of sizes, as Firecracker computes it
};

// Guest memory as the client lays it out. Guest offset == memory file offset, because region
// offsets are a running sum of region sizes.
static struct {
	uint64_t page, total, region_span; // region_span: size of every region but the last
	struct region r[MAX_REGIONS];
	unsigned n;
	const uint8_t *image;
	uint64_t image_size;
	const uint8_t *zeros; // page-sized, for comparisons
	int file_fd;          // --file-backend: the image, mapped privately as guest memory
} mem;

// ---------------------------------------------------------------------------------------------
// Errors and small helpers

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...)
{
	va_list ap;
	fputs("fc_client: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

#define die_errno(what, ...) die(EXIT_SETUP, what ": %s", ##__VA_ARGS__, strerror(errno))

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
	}
}

static uint64_t round_up(uint64_t v, uint64_t align) { return (v + align - 1) / align * align; }

// Parses a decimal or 0x-hex unsigned integer with an optional binary K/M/G suffix (sizes only).
// A leading 0 is decimal, not octal: trace files and sizes are written by people.
static bool parse_u64(const char *s, uint64_t *out, bool allow_suffix, const char **end)
{
	int base = (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) ? 16 : 10;
	if (base == 16)
		s += 2;
	if (!(base == 16 ? isxdigit((unsigned char)s[0]) : isdigit((unsigned char)s[0])))
		return false;
	char *e;
	errno = 0;
	unsigned long long v = strtoull(s, &e, base);
	if (errno)
		return false;
	if (allow_suffix && *e && strchr("KMG", *e)) {
		unsigned shift = *e == 'K' ? 10 : *e == 'M' ? 20 : 30;
		if (v > (UINT64_MAX >> shift))
			return false;
		v <<= shift;
		e++;
	}
	*out = v;
	if (end)
		*end = e;
	else if (*e)
		return false;
	return true;
}

static uint64_t arg_u64(const char *name, const char *s, bool allow_suffix)
{
	uint64_t v;
	if (!parse_u64(s, &v, allow_suffix, NULL))
		die(EXIT_SETUP, "--%s: not a non-negative integer: '%s'", name, s);
	return v;
}

static int arg_enum(const char *name, const char *s, const char *const *names, int n)
{
	for (int i = 0; i < n; i++)
		if (strcmp(s, names[i]) == 0)
			return i;
	die(EXIT_SETUP, "--%s: unknown value '%s'", name, s);
}

// ---------------------------------------------------------------------------------------------
// Watchdog: a handler that stops serving leaves faulting threads blocked in the kernel forever
// (exactly what happens to a Firecracker guest). Rather than hang a test, report and exit.

static atomic_int phase;
static const char *const phase_names[] = {"setup", "handshake", "touch", "verify", "balloon",
					  "wait-close"};
enum { PH_SETUP, PH_HANDSHAKE, PH_TOUCH, PH_VERIFY, PH_BALLOON, PH_WAIT_CLOSE };

struct worker; // progress counters are summed by the watchdog
static struct worker *workers;
static _Atomic unsigned nworkers; // published after `workers` is filled in
static uint64_t worker_progress(void);

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool done;
	pthread_t thread;
} wd = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void *watchdog_main(void *arg)
{
	(void)arg;
	struct timespec deadline;
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += (time_t)(opt.timeout_ms / 1000);
	deadline.tv_nsec += (long)(opt.timeout_ms % 1000) * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&wd.mu);
	int rc = 0;
	while (!wd.done && rc != ETIMEDOUT)
		rc = pthread_cond_timedwait(&wd.cv, &wd.mu, &deadline);
	if (!wd.done) {
		int ph = atomic_load(&phase);
		// dprintf, not stdio: the other threads are stuck in page faults, maybe inside stdio.
		dprintf(STDOUT_FILENO,
			"{\"ok\":false,\"error\":\"timeout\",\"phase\":\"%s\",\"timeout_ms\":%" PRIu64
			",\"touches_done\":%" PRIu64 "}\n",
			phase_names[ph], opt.timeout_ms, worker_progress());
		dprintf(STDERR_FILENO, "fc_client: timeout after %" PRIu64 " ms in phase %s\n",
			opt.timeout_ms, phase_names[ph]);
		_exit(EXIT_TIMEOUT);
	}
	pthread_mutex_unlock(&wd.mu);
	return NULL;
}

static void watchdog_start(void)
{
	if (!opt.timeout_ms)
		return;
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&wd.cv, &ca);
	int rc = pthread_create(&wd.thread, NULL, watchdog_main, NULL);
	if (rc)
		die(EXIT_SETUP, "pthread_create(watchdog): %s", strerror(rc));
}

static void watchdog_stop(void)
{
	if (!opt.timeout_ms)
		return;
	pthread_mutex_lock(&wd.mu);
	wd.done = true;
	pthread_cond_signal(&wd.cv);
	pthread_mutex_unlock(&wd.mu);
	pthread_join(wd.thread, NULL);
}

// ---------------------------------------------------------------------------------------------
// Guest memory and the userfaultfd

static void map_guest_memory(void)
{
	uint64_t pages = mem.total / mem.page;
	uint64_t per = (pages + mem.n - 1) / mem.n;
	if (per * (mem.n - 1) >= pages)
		die(EXIT_SETUP, "%" PRIu64 " pages cannot be split into %u non-empty regions", pages,
		    mem.n);
	mem.region_span = per * mem.page;

	// Reserve one PROT_NONE span, then map each region at a page-aligned address inside it with
	// a gap after it (hugetlb mappings need 2 MiB-aligned addresses).
	uint64_t reserve = mem.total + (uint64_t)mem.n * REGION_GAP + mem.page;
	uint8_t *span = mmap(NULL, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			     -1, 0);
	if (span == MAP_FAILED)
		die_errno("mmap(reserve %" PRIu64 " bytes)", reserve);
	uint8_t *cursor = (uint8_t *)round_up((uintptr_t)span, mem.page);

	// Firecracker's File backend maps the memory file privately: the kernel reads what is
	// touched (with its own readahead) and copies a page only when the guest writes it.
	int flags = MAP_PRIVATE | MAP_NORESERVE | MAP_FIXED | (opt.file_backend ? 0 : MAP_ANONYMOUS);
	if (opt.hugepages)
		flags |= MAP_HUGETLB | MAP_HUGE_2MB;
	uint64_t offset = 0;
	for (unsigned i = 0; i < mem.n; i++) {
		uint64_t size = i + 1 < mem.n ? mem.region_span : mem.total - offset;
		void *p = mmap(cursor, size, PROT_READ | PROT_WRITE, flags,
			       opt.file_backend ? mem.file_fd : -1, opt.file_backend ? (off_t)offset : 0);
		if (p == MAP_FAILED)
			die_errno("mmap(region %u, %" PRIu64 " bytes%s)", i, size,
				  opt.hugepages ? ", MAP_HUGETLB" : "");
		mem.r[i] = (struct region){.base = p, .size = size, .offset = offset};
		offset += size;
		cursor += size + REGION_GAP;
	}
}

// --split-at: region 0 becomes two VMAs at that guest offset (MADV_NOHUGEPAGE on its tail gives
// the tail other vm_flags, so the kernel never merges the two), as when a VMM advises part of
// its guest memory: a handler's range over the boundary then spans two mappings.
static void split_region(void)
{
	struct region *r = &mem.r[0];
	if (!opt.split_at)
		return;
	if (opt.split_at % mem.page || opt.split_at >= r->size)
		die(EXIT_SETUP, "--split-at: must be page-aligned and inside region 0 (%" PRIu64 " bytes)",
		    r->size);
	if (madvise(r->base + opt.split_at, r->size - opt.split_at, MADV_NOHUGEPAGE) < 0)
		die_errno("madvise(MADV_NOHUGEPAGE, region 0 from %" PRIu64 ")", opt.split_at);
}

// The process's VMAs as the kernel counts them against vm.max_map_count (mm->map_count):
// /proc/self/maps also shows the [vsyscall] gate area, which is no VMA.
static uint64_t count_mappings(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	if (!f)
		die_errno("open(/proc/self/maps)");
	uint64_t n = 0;
	char line[512];
	while (fgets(line, sizeof line, f))
		if (strchr(line, '\n') && !strstr(line, "[vsyscall]"))
			n++;
	fclose(f);
	return n;
}

// --map-slots-free N: maps PROT_NONE/PROT_EXEC pages until the process has exactly N mappings
// left under vm.max_map_count, so that whatever splits its VMAs next (a handler's UNREGISTER,
// which splits a VMA at each end of its range) runs into the limit (ENOMEM) after N splits.
static void leave_map_slots(void)
{
	if (opt.slots_free < 0)
		return;
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
	unsigned long long max = 0;
	if (!f || fscanf(f, "%llu", &max) != 1)
		die_errno("read(/proc/sys/vm/max_map_count)");
	fclose(f);
	uint64_t target = max - (uint64_t)opt.slots_free;
	uint64_t have = count_mappings();
	if (have > target)
		die(EXIT_SETUP, "--map-slots-free: %" PRIu64 " mappings already, limit %llu", have, max);
	// Each odd page made executable splits the reservation twice; page 0 once, for an odd gap.
	uint64_t pairs = (target - have) / 2 + 2, pages = 2 * pairs + 2;
	uint8_t *span = mmap(NULL, pages * SMALL_PAGE, PROT_NONE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (span == MAP_FAILED)
		die_errno("mmap(%" PRIu64 " pages for --map-slots-free)", pages);
	uint64_t next = 3;
	bool first_used = false;
	while ((have = count_mappings()) < target) {
		uint64_t gap = target - have;
		if (gap == 1 && !first_used) {
			first_used = true;
			if (mprotect(span, SMALL_PAGE, PROT_EXEC) < 0)
				die_errno("mprotect(--map-slots-free)");
			continue;
		}
		if (gap == 1 || next >= pages - 1)
			die(EXIT_SETUP, "--map-slots-free: could not reach %" PRIu64 " mappings", target);
		for (uint64_t k = 0; k < gap / 2 && next < pages - 1; k++, next += 2)
			if (mprotect(span + next * SMALL_PAGE, SMALL_PAGE, PROT_EXEC) < 0)
				die_errno("mprotect(--map-slots-free)");
	}
	if (have != target)
		die(EXIT_SETUP, "--map-slots-free: %" PRIu64 " mappings, wanted %" PRIu64, have, target);
}

static int create_uffd(void)
{
	// The syscall is what Firecracker uses. Root (or CAP_SYS_PTRACE) may create a uffd that also
	// traps kernel-mode faults; /dev/userfaultfd grants the same to whoever can open it.
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		int sys_errno = errno;
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			die(EXIT_SETUP, "userfaultfd: %s; /dev/userfaultfd: %s", strerror(sys_errno),
			    strerror(errno));
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		if (fd < 0)
			die_errno("ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)");
		close(dev);
	}

	// EVENT_REMOVE makes MADV_DONTNEED on registered memory (balloon inflate) block until the
	// handler has read a REMOVE event, so it learns that the range must read as zeros from now
	// on. MISSING_HUGETLBFS: the kernel has to support MISSING registration of hugetlb memory.
	uint64_t want = UFFD_FEATURE_EVENT_REMOVE;
	if (opt.hugepages)
		want |= UFFD_FEATURE_MISSING_HUGETLBFS;
	struct uffdio_api api = {.api = UFFD_API, .features = want};
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		die_errno("ioctl(UFFDIO_API, features 0x%" PRIx64 ")", want);
	if ((api.features & want) != want)
		die(EXIT_SETUP, "UFFDIO_API: kernel lacks features 0x%" PRIx64,
		    want & ~(uint64_t)api.features);

	for (unsigned i = 0; i < mem.n && opt.hostile != HOSTILE_UNREGISTERED; i++) {
		struct uffdio_register reg = {
			.range = {.start = (uintptr_t)mem.r[i].base, .len = mem.r[i].size},
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
			die_errno("ioctl(UFFDIO_REGISTER, region %u)", i);
		if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)))
			die(EXIT_SETUP, "UFFDIO_REGISTER: region %u does not support UFFDIO_COPY", i);
	}
	return fd;
}

// ---------------------------------------------------------------------------------------------
// The handshake

struct strbuf {
	char *s;
	size_t len, cap;
};

static void sb_printf(struct strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct strbuf *b, const char *fmt, ...)
{
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		int n = vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			die(EXIT_SETUP, "vsnprintf failed");
		if ((size_t)n < b->cap - b->len) {
			b->len += (size_t)n;
			return;
		}
		b->cap = (b->cap + (size_t)n + 1) * 2;
		b->s = realloc(b->s, b->cap);
		if (!b->s)
			die(EXIT_SETUP, "out of memory");
	}
}

// The region table in the shape a given Firecracker version sends (serde field order), or a
// deliberately broken variant of it.
static void build_handshake(struct strbuf *b)
{
	*b = (struct strbuf){.cap = 256, .s = malloc(256)};
	if (!b->s)
		die(EXIT_SETUP, "out of memory");
	if (opt.malformed == MAL_NOT_JSON) {
		sb_printf(b, "this is not JSON {");
		return;
	}
	sb_printf(b, "[");
	for (unsigned i = 0; opt.malformed != MAL_EMPTY_ARRAY && i < mem.n; i++) {
		const struct region *r = &mem.r[i];
		uint64_t base = (uintptr_t)r->base, size = r->size, page = mem.page;
		if (opt.malformed == MAL_UNALIGNED)
			base += mem.page / 2;
		if (opt.malformed == MAL_HUGE_SIZE)
			size = UINT64_MAX - SMALL_PAGE + 1; // page-aligned, but base + size overflows
		if (opt.hostile == HOSTILE_FAULT_OUTSIDE && i == mem.n - 1)
			size -= page;
		if (opt.malformed == MAL_TWO_PAGE_SIZES && i == 1)
			page = page == SMALL_PAGE ? HUGE_PAGE : SMALL_PAGE;
		sb_printf(b, "%s{", i ? "," : "");
		if (opt.extra_fields)
			sb_printf(b, "\"gpa_start\":%" PRIu64 ",", r->offset);
		sb_printf(b, "\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64,
			  base, size, r->offset);
		if (opt.shape == FC_1_12)
			sb_printf(b, ",\"page_size\":%" PRIu64, page);
		if (opt.shape >= FC_1_7) // named _kib, but holds bytes
			sb_printf(b, ",\"page_size_kib\":%" PRIu64, page);
		if (opt.extra_fields)
			sb_printf(b, ",\"is_guest_memfd\":false");
		sb_printf(b, "}");
	}
	sb_printf(b, "]");
}

static int connect_and_send(int uffd, uint64_t *handshake_ns, bool second)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(opt.socket_path) >= sizeof addr.sun_path)
		die(EXIT_SETUP, "--socket: path longer than %zu bytes", sizeof addr.sun_path - 1);
	strcpy(addr.sun_path, opt.socket_path);

	// Extra fds like forks send after the uffd (a memfd backing guest memory, a bitmap, ...):
	// a handler must take fd[0] and close the rest.
	int fds[3] = {uffd, -1, -1};
	if (opt.nfds >= 2) {
		fds[1] = memfd_create("fc_client_guest_mem", MFD_CLOEXEC);
		if (fds[1] < 0 || ftruncate(fds[1], (off_t)mem.total) < 0)
			die_errno("memfd_create/ftruncate");
	}
	if (opt.nfds >= 3 && (fds[2] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
		die_errno("open(/dev/null)");

	struct strbuf json;
	build_handshake(&json);

	uint64_t t0 = now_ns();
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die_errno("socket(AF_UNIX)");
	if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
		die_errno("connect(%s)", opt.socket_path);

	// A partial handshake: the uffd rides on the first bytes, the rest never comes.
	size_t send_len = opt.hostile == HOSTILE_PARTIAL ? json.len / 2 : json.len;
	struct iovec iov = {.iov_base = json.s, .iov_len = send_len};
	union {
		char buf[CMSG_SPACE(sizeof fds)];
		struct cmsghdr align;
	} ctl = {0};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
	if (opt.malformed != MAL_NO_FD) {
		size_t fds_len = sizeof(int) * (size_t)opt.nfds;
		msg.msg_control = ctl.buf;
		msg.msg_controllen = CMSG_SPACE(fds_len);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(fds_len);
		memcpy(CMSG_DATA(c), fds, fds_len);
	}
	ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	if (sent < 0)
		die_errno("sendmsg(handshake)");
	if ((size_t)sent != send_len)
		die(EXIT_SETUP, "sendmsg(handshake): sent %zd of %zu bytes", sent, send_len);
	*handshake_ns = now_ns() - t0;

	// The handler holds its own references now; ours to the extra fds are not needed. The uffd
	// stays open here, as in Firecracker: if the handler dies, faults hang instead of silently
	// turning into zero-filled anonymous memory.
	for (int i = 1; i < 3; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (second)
		close(uffd); // the dup() sent the second time
	free(json.s);
	return sock; // never closed before exit: Firecracker >= 1.12 keeps its end open too
}

// ---------------------------------------------------------------------------------------------
// Touch plan

static struct {
	uint64_t n;
	uint64_t *offsets; // NULL: sequential, offset = i * stride
} plan;

static inline uint64_t plan_offset(uint64_t i) { return plan.offsets ? plan.offsets[i] : i * opt.stride; }

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void load_trace(void)
{
	FILE *f = fopen(opt.trace_path, "r");
	if (!f)
		die_errno("open trace %s", opt.trace_path);
	size_t cap = 1024;
	plan.offsets = malloc(cap * sizeof *plan.offsets);
	char line[256];
	unsigned lineno = 0;
	while (plan.offsets && fgets(line, sizeof line, f)) {
		lineno++;
		char *s = line + strspn(line, " \t");
		s[strcspn(s, "#\r\n")] = 0;
		char *e = s + strlen(s);
		while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
			*--e = 0;
		if (!*s)
			continue;
		uint64_t off;
		if (!parse_u64(s, &off, false, NULL))
			die(EXIT_SETUP, "%s:%u: not an offset: '%s'", opt.trace_path, lineno, s);
		if (off >= mem.total)
			die(EXIT_SETUP, "%s:%u: offset %" PRIu64 " beyond guest memory (%" PRIu64 " bytes)",
			    opt.trace_path, lineno, off, mem.total);
		if (plan.n == cap)
			plan.offsets = realloc(plan.offsets, (cap *= 2) * sizeof *plan.offsets);
		if (plan.offsets)
			plan.offsets[plan.n++] = off;
	}
	if (!plan.offsets)
		die(EXIT_SETUP, "out of memory reading trace");
	fclose(f);
}

static void build_plan(void)
{
	uint64_t units = (mem.total + opt.stride - 1) / opt.stride;
	switch (opt.touch) {
	case TOUCH_NONE:
		plan.n = 0;
		break;
	case TOUCH_SEQUENTIAL:
		plan.n = units;
		break;
	case TOUCH_RANDOM: {
		// Partial Fisher-Yates: only the first `count` positions need shuffling.
		uint64_t take = opt.count_set && opt.count < units ? opt.count : units;
		plan.offsets = malloc(units * sizeof *plan.offsets);
		if (!plan.offsets)
			die(EXIT_SETUP, "out of memory for %" PRIu64 " touch offsets", units);
		for (uint64_t i = 0; i < units; i++)
			plan.offsets[i] = i * opt.stride;
		uint64_t s = opt.seed;
		for (uint64_t i = 0; i < take && i + 1 < units; i++) {
			uint64_t j = i + splitmix64(&s) % (units - i);
			uint64_t t = plan.offsets[i];
			plan.offsets[i] = plan.offsets[j];
			plan.offsets[j] = t;
		}
		plan.n = take;
		break;
	}
	case TOUCH_TRACE:
		load_trace();
		break;
	}
	if (opt.count_set && opt.count < plan.n)
		plan.n = opt.count;
}

static inline uint8_t *guest_addr(uint64_t off)
{
	uint64_t i = off / mem.region_span;
	if (i >= mem.n)
		i = mem.n - 1;
	return mem.r[i].base + (off - mem.r[i].offset);
}

// ---------------------------------------------------------------------------------------------
// Touch phase

// Log-linear latency histogram: 16 sub-buckets per power of two, so a percentile read from it
// is at most 1/16 (6.25%) below the true value, in constant memory per thread.
static unsigned lat_bucket(uint64_t ns)
{
	if (ns < 16)
		return (unsigned)ns;
	unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
	return (msb - 3) * 16 + (unsigned)((ns >> (msb - 4)) & 15);
}

static uint64_t bucket_floor(unsigned b)
{
	if (b < 16)
		return b;
	return (16ULL + b % 16) << (b / 16 - 1);
}

struct worker {
	pthread_t thread;
	uint64_t lo, hi;      // plan indices [lo, hi)
	_Atomic uint64_t done; // touches completed (read by the watchdog)
	uint64_t first_ns, max_ns;
	uint64_t hist[LAT_BUCKETS];
	int pipe_r, pipe_w; // syscall access: the kernel reads guest memory in write(2)
	const char *error;  // set when a kernel-mode access failed
	int error_errno;
	uint64_t error_off;
};

static uint8_t *touched;     // one byte per guest page
static uint64_t balloon_bytes;
static _Atomic uint64_t touch_count; // only maintained for --crash-after
static pthread_barrier_t start_barrier;

static uint64_t worker_progress(void)
{
	uint64_t sum = 0;
	unsigned n = atomic_load(&nworkers);
	for (unsigned i = 0; i < n; i++)
		sum += atomic_load_explicit(&workers[i].done, memory_order_relaxed);
	return sum;
}

// One access to guest memory. Loads fault from user mode. The other two fault from kernel mode,
// as KVM's accesses do: write(2) into a pipe copies from the page with copy_from_user, and
// process_vm_readv resolves it with get_user_pages (the path KVM's hva_to_pfn takes). A
// user-mode-only uffd would fail those with EFAULT instead of waiting for the handler.
static bool access_once(struct worker *w, enum access_kind how, uint8_t *p)
{
	uint8_t byte;
	switch (how) {
	case ACCESS_LOAD:
		byte = *(volatile uint8_t *)p;
		(void)byte;
		return true;
	case ACCESS_SYSCALL:
		if (write(w->pipe_w, p, 1) != 1) {
			w->error = "write(pipe) from guest memory";
			return false;
		}
		if (read(w->pipe_r, &byte, 1) != 1) {
			w->error = "read(pipe)";
			return false;
		}
		return true;
	case ACCESS_GUP: {
		struct iovec local = {.iov_base = &byte, .iov_len = 1};
		struct iovec remote = {.iov_base = p, .iov_len = 1};
		if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != 1) {
			w->error = "process_vm_readv of guest memory";
			return false;
		}
		return true;
	}
	case ACCESS_MIXED:
		break;
	}
	return false;
}

static void crash_now(void)
{
	// Not dumpable: no core file left behind, and no dump reading guest memory whose handler
	// is about to lose its client.
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	abort();
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	if (opt.threads > 1)
		pthread_barrier_wait(&start_barrier);
	for (uint64_t i = w->lo; i < w->hi; i++) {
		uint64_t off = plan_offset(i);
		uint8_t *p = guest_addr(off);
		enum access_kind how = opt.access == ACCESS_MIXED ? (enum access_kind)(i % 3) : opt.access;
		uint64_t t0 = now_ns();
		if (!access_once(w, how, p)) {
			w->error_errno = errno;
			w->error_off = off;
			break;
		}
		uint64_t dt = now_ns() - t0;
		if (i == w->lo)
			w->first_ns = dt;
		if (dt > w->max_ns)
			w->max_ns = dt;
		w->hist[lat_bucket(dt)]++;
		__atomic_store_n(&touched[off / mem.page], 1, __ATOMIC_RELAXED);
		atomic_store_explicit(&w->done, i - w->lo + 1, memory_order_relaxed);
		if (opt.crash_after && atomic_fetch_add(&touch_count, 1) + 1 >= opt.crash_after)
			crash_now();
	}
	return NULL;
}

// Balloon inflate as Firecracker does it: MADV_DONTNEED drops the pages. Because the uffd has
// EVENT_REMOVE, madvise blocks until the handler has read the REMOVE event; every later access
// faults again, and the handler must now serve zeros, not snapshot data.
static void balloon_inflate(void)
{
	for (unsigned b = 0; b < opt.nballoon; b++) {
		uint64_t off = opt.balloon[b].off, end = off + opt.balloon[b].len;
		while (off < end) { // split at region boundaries: one madvise per mapping
			uint64_t ri = off / mem.region_span < mem.n ? off / mem.region_span : mem.n - 1;
			const struct region *r = &mem.r[ri];
			uint64_t stop = end < r->offset + r->size ? end : r->offset + r->size;
			if (madvise(guest_addr(off), stop - off, MADV_DONTNEED) < 0)
				die_errno("madvise(MADV_DONTNEED, offset 0x%" PRIx64 ", %" PRIu64 " bytes)",
					  off, stop - off);
			balloon_bytes += stop - off;
			off = stop;
		}
	}
}

static bool in_balloon(uint64_t off)
{
	for (unsigned b = 0; b < opt.nballoon; b++)
		if (off - opt.balloon[b].off < opt.balloon[b].len)
			return true;
	return false;
}

// --balloon-concurrent: inflate once half of the touches are done, while the workers keep
// faulting. Their faults then race the REMOVE events, which is what makes a handler's
// UFFDIO_COPY fail with EAGAIN (and what a handler must survive).
static void *balloon_thread_main(void *arg)
{
	uint64_t half = *(const uint64_t *)arg / 2;
	const struct timespec tick = {.tv_nsec = 100000};
	while (worker_progress() < half)
		nanosleep(&tick, NULL);
	balloon_inflate();
	return NULL;
}

struct touch_result {
	uint64_t touches, pages, touch_ns, first_ns, p50, p90, p99, max;
};

static uint64_t percentile(const uint64_t *hist, uint64_t total, double q)
{
	uint64_t rank = (uint64_t)(q * (double)total + 0.999999), seen = 0;
	if (rank == 0)
		rank = 1;
	for (unsigned b = 0; b < LAT_BUCKETS; b++) {
		seen += hist[b];
		if (seen >= rank)
			return bucket_floor(b);
	}
	return 0;
}

static void run_touch(struct touch_result *res)
{
	unsigned n = opt.threads;
	touched = calloc(mem.total / mem.page, 1);
	workers = calloc(n, sizeof *workers);
	if (!touched || !workers)
		die(EXIT_SETUP, "out of memory");
	for (unsigned t = 0; t < n; t++) {
		struct worker *w = &workers[t];
		w->lo = plan.n * t / n;
		w->hi = plan.n * (t + 1) / n;
		w->pipe_r = w->pipe_w = -1;
		if (opt.access == ACCESS_SYSCALL || opt.access == ACCESS_MIXED) {
			int p[2];
			if (pipe2(p, O_CLOEXEC) < 0)
				die_errno("pipe2");
			w->pipe_r = p[0];
			w->pipe_w = p[1];
		}
	}

	atomic_store(&nworkers, n);
	atomic_store(&phase, PH_TOUCH);
	pthread_t balloon_thread;
	if (opt.balloon_concurrent) {
		int rc = pthread_create(&balloon_thread, NULL, balloon_thread_main, &plan.n);
		if (rc)
			die(EXIT_SETUP, "pthread_create(balloon): %s", strerror(rc));
	}
	uint64_t t0;
	if (n == 1) {
		t0 = now_ns();
		worker_main(&workers[0]);
	} else {
		pthread_barrier_init(&start_barrier, NULL, n + 1);
		for (unsigned t = 0; t < n; t++) {
			int rc = pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]);
			if (rc)
				die(EXIT_SETUP, "pthread_create: %s", strerror(rc));
		}
		pthread_barrier_wait(&start_barrier);
		t0 = now_ns();
		for (unsigned t = 0; t < n; t++)
			pthread_join(workers[t].thread, NULL);
	}
	*res = (struct touch_result){.touch_ns = now_ns() - t0, .first_ns = workers[0].first_ns};
	if (opt.balloon_concurrent)
		pthread_join(balloon_thread, NULL);

	uint64_t hist[LAT_BUCKETS] = {0};
	for (unsigned t = 0; t < n; t++) {
		struct worker *w = &workers[t];
		if (w->error)
			die(EXIT_VERIFY, "%s at offset 0x%" PRIx64 " failed: %s (kernel-mode faults are "
			    "not being served: user-mode-only uffd?)", w->error, w->error_off,
			    strerror(w->error_errno));
		res->touches += w->hi - w->lo;
		if (w->max_ns > res->max)
			res->max = w->max_ns;
		for (unsigned b = 0; b < LAT_BUCKETS; b++)
			hist[b] += w->hist[b];
		if (w->pipe_r >= 0) {
			close(w->pipe_r);
			close(w->pipe_w);
		}
	}
	for (uint64_t p = 0; p < mem.total / mem.page; p++)
		res->pages += touched[p];
	if (res->touches) {
		res->p50 = percentile(hist, res->touches, 0.50);
		res->p90 = percentile(hist, res->touches, 0.90);
		res->p99 = percentile(hist, res->touches, 0.99);
	}
}

// ---------------------------------------------------------------------------------------------
// Verification

struct mismatch {
	uint64_t pages_bad, first_off;
	uint8_t expected, actual;
	bool any;
};

// Compares guest bytes [off, off+len) (within one page) with `want` (NULL: zeros).
static void compare(uint64_t off, const uint8_t *got, const uint8_t *want, uint64_t len,
		    struct mismatch *m, bool *page_bad)
{
	if (memcmp(got, want ? want : mem.zeros, len) == 0)
		return;
	if (!*page_bad) {
		*page_bad = true;
		m->pages_bad++;
	}
	if (m->any)
		return;
	for (uint64_t i = 0; i < len; i++) {
		uint8_t w = want ? want[i] : 0;
		if (got[i] != w) {
			*m = (struct mismatch){.pages_bad = m->pages_bad, .first_off = off + i,
					       .expected = w, .actual = got[i], .any = true};
			return;
		}
	}
}

// A page must hold the image bytes at the same offset, and zeros past the end of the image.
// Reading it with plain loads faults it in if it is not present yet (--verify-all).
static void verify_page(uint64_t off, struct mismatch *m)
{
	const uint8_t *got = guest_addr(off);
	uint64_t from_image = off < mem.image_size ? mem.image_size - off : 0;
	if (from_image > mem.page)
		from_image = mem.page;
	bool bad = false;
	if (from_image)
		compare(off, got, mem.image + off, from_image, m, &bad);
	if (from_image < mem.page)
		compare(off + from_image, got + from_image, NULL, mem.page - from_image, m, &bad);
}

static void report_mismatch(const char *what, const struct mismatch *m)
{
	fprintf(stderr,
		"fc_client: %s: %" PRIu64 " bad page(s); first mismatch at guest offset 0x%" PRIx64
		" (%" PRIu64 "): expected 0x%02x, got 0x%02x\n",
		what, m->pages_bad, m->first_off, m->first_off, m->expected, m->actual);
}

// ---------------------------------------------------------------------------------------------
// Malformed handshakes: the handler must refuse them and close the connection.

static void wait_for_close(int sock)
{
	atomic_store(&phase, PH_WAIT_CLOSE);
	uint64_t t0 = now_ns();
	char buf[256];
	for (;;) {
		ssize_t n = recv(sock, buf, sizeof buf, 0);
		if (n == 0 || (n < 0 && errno == ECONNRESET))
			break;
		if (n < 0 && errno != EINTR)
			die_errno("recv(socket)");
	}
	watchdog_stop();
	printf("{\"ok\":true,\"malformed\":\"%s\",\"handler_closed\":true,\"wait_ns\":%" PRIu64 "}\n",
	       malformed_names[opt.malformed], now_ns() - t0);
}

// ---------------------------------------------------------------------------------------------

static void usage(FILE *f)
{
	fputs(
	    "usage: fc_client --socket PATH --image RAW [options]\n"
	    "       fc_client --file-backend --image RAW [options]\n"
	    "  --file-backend          no handler: map RAW privately as guest memory, as\n"
	    "                          Firecracker's File backend does (no uffd, no socket)\n"
	    "  --size BYTES            guest memory size (default: image size, page-rounded); K/M/G ok\n"
	    "  --regions N             equal page-aligned regions, offsets a running sum (default 1)\n"
	    "  --hugepages             MAP_HUGETLB 2 MiB pages\n"
	    "  --fc-version V          handshake shape: 1.1 | 1.7 | 1.12 (default 1.12)\n"
	    "  --extra-fields          add unknown fields (gpa_start, is_guest_memfd)\n"
	    "  --fds N                 1: uffd; 2: + memfd; 3: + /dev/null (default 1)\n"
	    "  --touch KIND            sequential | random | trace:FILE | none (default sequential)\n"
	    "  --count N               touch only the first N entries of the plan\n"
	    "  --seed N                random permutation seed (default 1)\n"
	    "  --stride BYTES          touch granularity (default: page size)\n"
	    "  --access HOW            load | syscall | gup | mixed (default load)\n"
	    "  --syscall-touch         same as --access syscall (kernel-mode faults via write(2))\n"
	    "  --threads N             touch with N threads (default 1)\n"
	    "  --verify                compare touched pages with the image\n"
	    "  --verify-all            compare all of guest memory with the image\n"
	    "  --balloon OFF:LEN[,..]  after touching, MADV_DONTNEED these ranges and expect zeros\n"
	    "  --balloon-concurrent    inflate the balloon halfway through touching instead\n"
	    "  --crash-after N         abort() after N touches\n"
	    "  --malformed KIND        not-json | unaligned | two-page-sizes | no-fd | empty-array |\n"
	    "                          huge-size; then wait until the handler closes the socket\n"
	    "  --hostile KIND          partial-handshake (uffd + half the JSON, then touch) |\n"
	    "                          fault-outside (announce one page less, touch it) |\n"
	    "                          connect-twice (the handshake again on a second connection\n"
	    "                          with a dup() of the uffd) | unregistered (send a uffd that\n"
	    "                          has no memory registered, touch nothing, stay --hold-ms)\n"
	    "  --timeout-ms N          give up with exit 3 after N ms (default 120000, 0: never)\n"
	    "  --hold-ms N             sleep N ms after printing the result\n"
	    "  --delay-ms N            sleep N ms between the handshake and the first touch (a guest\n"
	    "                          busy elsewhere before it touches memory; lets prefetch run)\n"
	    "  --split-at BYTES        make region 0 two mappings at this offset (MADV_NOHUGEPAGE\n"
	    "                          on its tail): ranges over the boundary span two VMAs\n"
	    "  --map-slots-free N      before the handshake, map pages until only N more mappings\n"
	    "                          fit under vm.max_map_count (a handler's VMA splits then\n"
	    "                          fail with ENOMEM after N); use with one touch thread\n"
	    "exit: 0 ok, 1 wrong bytes, 2 usage/setup error, 3 timeout\n",
	    f);
}

static void parse_balloon(const char *s)
{
	while (*s) {
		const char *e;
		struct range r;
		if (opt.nballoon == MAX_BALLOON)
			die(EXIT_SETUP, "--balloon: at most %d ranges", MAX_BALLOON);
		if (!parse_u64(s, &r.off, true, &e) || *e != ':' || !parse_u64(e + 1, &r.len, true, &e) ||
		    (*e && *e != ','))
			die(EXIT_SETUP, "--balloon: expected OFF:LEN[,OFF:LEN...], got '%s'", s);
		opt.balloon[opt.nballoon++] = r;
		s = *e ? e + 1 : e;
	}
}

static void parse_args(int argc, char **argv)
{
	enum {
		O_SOCKET = 256, O_IMAGE, O_SIZE, O_REGIONS, O_HUGEPAGES, O_FC_VERSION, O_EXTRA_FIELDS,
		O_FDS, O_TOUCH, O_SEED, O_COUNT, O_STRIDE, O_VERIFY, O_VERIFY_ALL, O_BALLOON, O_THREADS,
		O_HOLD_MS, O_DELAY_MS, O_CRASH_AFTER, O_MALFORMED, O_ACCESS, O_SYSCALL_TOUCH, O_TIMEOUT_MS,
		O_BALLOON_CONCURRENT, O_FILE_BACKEND, O_SPLIT_AT, O_MAP_SLOTS_FREE, O_HOSTILE,
	};
	static const struct option longopts[] = {
		{"socket", required_argument, 0, O_SOCKET},
		{"image", required_argument, 0, O_IMAGE},
		{"size", required_argument, 0, O_SIZE},
		{"regions", required_argument, 0, O_REGIONS},
		{"hugepages", no_argument, 0, O_HUGEPAGES},
		{"fc-version", required_argument, 0, O_FC_VERSION},
		{"extra-fields", no_argument, 0, O_EXTRA_FIELDS},
		{"fds", required_argument, 0, O_FDS},
		{"touch", required_argument, 0, O_TOUCH},
		{"seed", required_argument, 0, O_SEED},
		{"count", required_argument, 0, O_COUNT},
		{"stride", required_argument, 0, O_STRIDE},
		{"verify", no_argument, 0, O_VERIFY},
		{"verify-all", no_argument, 0, O_VERIFY_ALL},
		{"balloon", required_argument, 0, O_BALLOON},
		{"balloon-concurrent", no_argument, 0, O_BALLOON_CONCURRENT},
		{"threads", required_argument, 0, O_THREADS},
		{"hold-ms", required_argument, 0, O_HOLD_MS},
		{"delay-ms", required_argument, 0, O_DELAY_MS},
		{"crash-after", required_argument, 0, O_CRASH_AFTER},
		{"malformed", required_argument, 0, O_MALFORMED},
		{"hostile", required_argument, 0, O_HOSTILE},
		{"access", required_argument, 0, O_ACCESS},
		{"syscall-touch", no_argument, 0, O_SYSCALL_TOUCH},
		{"timeout-ms", required_argument, 0, O_TIMEOUT_MS},
		{"file-backend", no_argument, 0, O_FILE_BACKEND},
		{"split-at", required_argument, 0, O_SPLIT_AT},
		{"map-slots-free", required_argument, 0, O_MAP_SLOTS_FREE},
		{"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (c) {
		case O_SOCKET: opt.socket_path = optarg; break;
		case O_IMAGE: opt.image_path = optarg; break;
		case O_SIZE: opt.size = arg_u64("size", optarg, true); break;
		case O_REGIONS: opt.nregions = (unsigned)arg_u64("regions", optarg, false); break;
		case O_HUGEPAGES: opt.hugepages = true; break;
		case O_FC_VERSION:
			opt.shape = (enum fc_shape)arg_enum("fc-version", optarg, shape_names, 3);
			break;
		case O_EXTRA_FIELDS: opt.extra_fields = true; break;
		case O_FDS: opt.nfds = (int)arg_u64("fds", optarg, false); break;
		case O_TOUCH:
			if (strncmp(optarg, "trace:", 6) == 0) {
				opt.touch = TOUCH_TRACE;
				opt.trace_path = optarg + 6;
			} else {
				opt.touch = (enum touch_kind)arg_enum("touch", optarg, touch_names, 4);
				if (opt.touch == TOUCH_TRACE)
					die(EXIT_SETUP, "--touch: use trace:FILE");
			}
			break;
		case O_SEED: opt.seed = arg_u64("seed", optarg, false); break;
		case O_COUNT:
			opt.count = arg_u64("count", optarg, false);
			opt.count_set = true;
			break;
		case O_STRIDE: opt.stride = arg_u64("stride", optarg, true); break;
		case O_VERIFY:
			if (opt.verify == VERIFY_NONE)
				opt.verify = VERIFY_TOUCHED;
			break;
		case O_VERIFY_ALL: opt.verify = VERIFY_ALL; break;
		case O_BALLOON: parse_balloon(optarg); break;
		case O_BALLOON_CONCURRENT: opt.balloon_concurrent = true; break;
		case O_THREADS: opt.threads = (unsigned)arg_u64("threads", optarg, false); break;
		case O_HOLD_MS: opt.hold_ms = arg_u64("hold-ms", optarg, false); break;
		case O_DELAY_MS: opt.delay_ms = arg_u64("delay-ms", optarg, false); break;
		case O_HOSTILE:
			opt.hostile = (enum hostile_kind)arg_enum("hostile", optarg, hostile_names, 5);
			if (opt.hostile == HOSTILE_NONE)
				die(EXIT_SETUP, "--hostile: empty kind");
			break;
		case O_CRASH_AFTER: opt.crash_after = arg_u64("crash-after", optarg, false); break;
		case O_MALFORMED:
			opt.malformed = (enum malformed_kind)arg_enum("malformed", optarg, malformed_names, 7);
			if (opt.malformed == MAL_NONE)
				die(EXIT_SETUP, "--malformed: empty kind");
			break;
		case O_ACCESS: opt.access = (enum access_kind)arg_enum("access", optarg, access_names, 4); break;
		case O_SYSCALL_TOUCH: opt.access = ACCESS_SYSCALL; break;
		case O_TIMEOUT_MS: opt.timeout_ms = arg_u64("timeout-ms", optarg, false); break;
		case O_FILE_BACKEND: opt.file_backend = true; break;
		case O_SPLIT_AT: opt.split_at = arg_u64("split-at", optarg, true); break;
		case O_MAP_SLOTS_FREE:
			opt.slots_free = (int64_t)arg_u64("map-slots-free", optarg, false);
			break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); exit(EXIT_SETUP);
		}
	}
	if (optind < argc)
		die(EXIT_SETUP, "unexpected argument '%s' (see --help)", argv[optind]);
	if (!opt.image_path || (!opt.socket_path && !opt.file_backend))
		die(EXIT_SETUP, "--socket and --image are required (see --help)");
	if (opt.file_backend && (opt.socket_path || opt.hugepages || opt.malformed != MAL_NONE ||
				 opt.size || opt.nballoon))
		die(EXIT_SETUP, "--file-backend takes none of --socket, --hugepages, --malformed, "
		    "--size, --balloon");
	if (opt.nregions < 1 || opt.nregions > MAX_REGIONS)
		die(EXIT_SETUP, "--regions: 1..%d", MAX_REGIONS);
	if (opt.nfds < 1 || opt.nfds > 3)
		die(EXIT_SETUP, "--fds: 1, 2 or 3");
	if (opt.threads < 1 || opt.threads > 256)
		die(EXIT_SETUP, "--threads: 1..256");
	if (opt.hugepages && opt.shape == FC_1_1)
		die(EXIT_SETUP, "--hugepages needs --fc-version 1.7 or later (1.1 sends no page size)");
	// Two page sizes need two regions to disagree with each other.
	if (opt.balloon_concurrent && !opt.nballoon)
		die(EXIT_SETUP, "--balloon-concurrent needs --balloon");
	if (opt.malformed == MAL_TWO_PAGE_SIZES && opt.nregions < 2)
		opt.nregions = 2;
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	mem.page = opt.hugepages ? HUGE_PAGE : SMALL_PAGE;
	mem.n = opt.nregions;
	if (!opt.stride)
		opt.stride = mem.page;

	int img = open(opt.image_path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (img < 0 || fstat(img, &st) < 0)
		die_errno("open(%s)", opt.image_path);
	mem.file_fd = img;
	mem.image_size = (uint64_t)st.st_size;
	if (mem.image_size) {
		mem.image = mmap(NULL, mem.image_size, PROT_READ, MAP_PRIVATE, img, 0);
		if (mem.image == MAP_FAILED)
			die_errno("mmap(%s)", opt.image_path);
	}
	mem.total = round_up(opt.size ? opt.size : mem.image_size, mem.page);
	if (!mem.total)
		die(EXIT_SETUP, "guest memory would be empty: the image is empty and --size not given");
	for (unsigned b = 0; b < opt.nballoon; b++) {
		struct range r = opt.balloon[b];
		if (r.off % mem.page || r.len % mem.page || !r.len || r.off > mem.total ||
		    r.len > mem.total - r.off)
			die(EXIT_SETUP, "--balloon %" PRIu64 ":%" PRIu64 ": must be non-empty, aligned to "
			    "%" PRIu64 " and inside guest memory (%" PRIu64 " bytes)",
			    r.off, r.len, mem.page, mem.total);
	}
	uint8_t *zeros = calloc(1, mem.page);
	if (!zeros)
		die(EXIT_SETUP, "out of memory");
	mem.zeros = zeros;

	watchdog_start();
	map_guest_memory();
	split_region();
	close(img);
	int uffd = opt.file_backend ? -1 : create_uffd();
	if (opt.malformed == MAL_NONE)
		build_plan(); // before the handshake: no setup cost inside the handler's timing window
	// Last before the handshake: nothing after it maps memory (one touch thread, a heap in use).
	leave_map_slots();

	atomic_store(&phase, PH_HANDSHAKE);
	uint64_t handshake_ns = 0;
	int sock = opt.file_backend ? -1 : connect_and_send(uffd, &handshake_ns, false);
	if (opt.hostile == HOSTILE_TWICE) {
		int copy = dup(uffd);
		uint64_t again_ns;
		if (copy < 0)
			die_errno("dup(uffd)");
		(void)connect_and_send(copy, &again_ns, true); // kept open until exit, like the first
	}
	if (opt.malformed != MAL_NONE) {
		wait_for_close(sock);
		return 0;
	}
	if (opt.hostile == HOSTILE_UNREGISTERED) {
		watchdog_stop();
		printf("{\"ok\":true,\"hostile\":\"unregistered\"}\n");
		fflush(stdout);
		sleep_ms(opt.hold_ms);
		return 0;
	}

	struct touch_result tr;
	if (opt.delay_ms)
		sleep_ms(opt.delay_ms);
	run_touch(&tr);

	atomic_store(&phase, PH_VERIFY);
	struct mismatch vm = {0};
	uint64_t pages_verified = 0, t0 = now_ns();
	for (uint64_t p = 0; opt.verify != VERIFY_NONE && p < mem.total / mem.page; p++) {
		if (opt.verify == VERIFY_TOUCHED && !touched[p])
			continue;
		// Ballooned while being touched: image bytes or zeros are both right until the
		// balloon check below.
		if (opt.balloon_concurrent && in_balloon(p * mem.page))
			continue;
		verify_page(p * mem.page, &vm);
		pages_verified++;
	}
	uint64_t verify_ns = now_ns() - t0;
	if (vm.pages_bad)
		report_mismatch("verify", &vm);

	atomic_store(&phase, PH_BALLOON);
	struct mismatch bm = {0};
	t0 = now_ns();
	if (opt.nballoon && !opt.balloon_concurrent)
		balloon_inflate();
	for (unsigned b = 0; b < opt.nballoon; b++) // every access faults again: must read zeros
		for (uint64_t off = opt.balloon[b].off; off < opt.balloon[b].off + opt.balloon[b].len;
		     off += mem.page) {
			bool bad = false;
			compare(off, guest_addr(off), NULL, mem.page, &bm, &bad);
		}
	bool balloon_ok = bm.pages_bad == 0;
	uint64_t balloon_ns = now_ns() - t0;
	if (!balloon_ok)
		report_mismatch("balloon (expected zeros after MADV_DONTNEED)", &bm);
	watchdog_stop();

	bool ok = !vm.pages_bad && balloon_ok;
	char first_touch[32] = "null", first_bad[32] = "null", exp[8] = "null", act[8] = "null",
	     bal[8] = "null", bal_bad[32] = "null";
	if (tr.touches)
		snprintf(first_touch, sizeof first_touch, "%" PRIu64, tr.first_ns);
	if (vm.any) {
		snprintf(first_bad, sizeof first_bad, "%" PRIu64, vm.first_off);
		snprintf(exp, sizeof exp, "%u", vm.expected);
		snprintf(act, sizeof act, "%u", vm.actual);
	}
	if (opt.nballoon)
		strcpy(bal, balloon_ok ? "true" : "false");
	if (bm.any)
		snprintf(bal_bad, sizeof bal_bad, "%" PRIu64, bm.first_off);
	printf("{\"ok\":%s,\"fc_version\":\"%s\",\"page_size\":%" PRIu64 ",\"mem_size\":%" PRIu64
	       ",\"image_size\":%" PRIu64 ",\"regions\":%u,\"fds\":%d,\"access\":\"%s\",\"touch\":\"%s\""
	       ",\"threads\":%u,\"handshake_ns\":%" PRIu64 ",\"touches\":%" PRIu64
	       ",\"pages_touched\":%" PRIu64 ",\"touch_ns\":%" PRIu64 ",\"first_touch_ns\":%s"
	       ",\"lat_p50_ns\":%" PRIu64 ",\"lat_p90_ns\":%" PRIu64 ",\"lat_p99_ns\":%" PRIu64
	       ",\"lat_max_ns\":%" PRIu64 ",\"verify\":\"%s\",\"pages_verified\":%" PRIu64
	       ",\"verify_ns\":%" PRIu64 ",\"verify_errors\":%" PRIu64 ",\"first_bad_offset\":%s"
	       ",\"expected_byte\":%s,\"actual_byte\":%s,\"balloon_ok\":%s,\"balloon_bytes\":%" PRIu64
	       ",\"balloon_ns\":%" PRIu64 ",\"balloon_bad_pages\":%" PRIu64
	       ",\"balloon_first_bad_offset\":%s}\n",
	       ok ? "true" : "false", shape_names[opt.shape], mem.page, mem.total, mem.image_size, mem.n,
	       opt.nfds, access_names[opt.access], touch_names[opt.touch], opt.threads, handshake_ns,
	       tr.touches, tr.pages, tr.touch_ns, first_touch, tr.p50, tr.p90, tr.p99,
	       tr.max, verify_names[opt.verify], pages_verified, verify_ns, vm.pages_bad, first_bad,
	       exp, act, bal, balloon_bytes, balloon_ns, bm.pages_bad, bal_bad);
	fflush(stdout);
	if (opt.hold_ms)
		sleep_ms(opt.hold_ms);
	(void)sock; // closed by exit, like Firecracker's end of the connection
	return ok ? 0 : EXIT_VERIFY;
}
