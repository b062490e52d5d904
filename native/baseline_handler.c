// baseline_handler: the reference point for benchmarks. It does what Firecracker's example
// on-demand handler does: one page-sized UFFDIO_COPY per page fault, straight from the raw
// memory file mapped read-only, no prefetch, no compression.
//
// Protocol (Firecracker's Uffd backend): listen on a Unix socket, accept one connection, receive
// one message holding a JSON array of regions and the userfaultfd as SCM_RIGHTS, then serve the
// faults of that uffd until the client goes away.
//
// With --prefetch FILE it is also the bound for any working-set prefetcher: right after the
// handshake it installs the listed pages (image offsets, one per line, in that order) straight
// from the mapped file, consecutive pages of one kind with one ioctl (UFFDIO_ZEROPAGE for pages
// that are all zeros), serving queued faults before each batch. No decompression, no checksum,
// no reading: what is left is the kernel's cost of installing the set while the client touches.
// With --prefetch-threads N the list is cut into N consecutive parts, each installed by its own
// thread (the first by the serving thread, between faults): the bound for a prefetcher that uses
// every core. The helpers take no lock, so a REMOVE could land between a helper's check and its
// copy (refilling removed memory with file data): the bound stops serving if one arrives while
// helpers run. A prefetcher that handles REMOVE pays for that; the bound does not.
//
// Prints one JSON line on stdout at exit. Exit status: 0 the client went away, 1 handshake
// rejected or a fault could not be served, 2 usage or setup error.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { EXIT_FAIL = 1, EXIT_SETUP = 2 };

#define MAX_FDS 8
#define MAX_HANDSHAKE (1 << 20)
#define UFFD_MSG_BATCH 64

struct region {
	uint64_t base, size, offset, page_size;
	uint64_t *removed; // bitmap, one bit per page: REMOVE seen, must read as zeros from now on
};

static struct {
	const char *socket_path, *mem_path, *ready_path, *prefetch_path;
	uint64_t timeout_ms;
	unsigned prefetch_threads;
} opt = {.timeout_ms = 60000, .prefetch_threads = 1};

static struct {
	const uint8_t *file; // the memory file, mapped read-only
	uint64_t file_size;
	struct region *r;
	unsigned n;
	uint64_t page;
	const char *shape; // which Firecracker handshake shape was received
	uint8_t *zeros;    // page-sized zero source (hugetlb has no UFFDIO_ZEROPAGE)
	uint8_t *bounce;   // the page that straddles the end of the file
	int uffd, sock;
	pid_t peer;
} h = {.uffd = -1, .sock = -1};

static struct {
	uint64_t faults, copies, zero_copies, zeropages, eexist, eagain, gone, removes, removed_bytes,
	    bytes, ioctl_ns, extra_fds;
} st;

// --prefetch: the pages to install, and which image pages are in place already.
static struct {
	uint64_t *off; // image offsets, page-aligned, in prefetch order
	size_t n;
	uint8_t *zero;    // one byte per image page: all zeros in the file
	uint8_t *present; // one byte per image page: installed by prefetch or a fault (any thread)
	uint64_t zero_window; // pages: the window zero runs grow in, chosen as uffd resume does
} pf;

// One thread's consecutive part of the prefetch list, and what it did (a cache line of its own:
// each thread updates its part after every ioctl).
struct pf_part {
	size_t next, end;
	uint64_t pages, ioctls, eagain, done_ns, ioctl_ns;
	pthread_t thread;
} __attribute__((aligned(64)));
#define MAX_PREFETCH_THREADS 8
static struct pf_part parts[MAX_PREFETCH_THREADS];
static int helpers_stop, helpers_running;
static __thread uint64_t thread_ioctl_ns; // summed into st.ioctl_ns when the helpers stop

static bool is_present(uint64_t page)
{
	return __atomic_load_n(&pf.present[page], __ATOMIC_RELAXED);
}

static void set_present(uint64_t page)
{
	__atomic_store_n(&pf.present[page], 1, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------------------------

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "baseline_handler: %s\n", msg);
	if (code == EXIT_FAIL) {
		// JSON-escape the message for the result line (it may quote received bytes).
		printf("{\"ok\":false,\"error\":\"");
		for (const char *c = msg; *c; c++) {
			if (*c == '"' || *c == '\\')
				printf("\\%c", *c);
			else if ((unsigned char)*c < 0x20)
				printf("\\u%04x", (unsigned char)*c);
			else
				putchar(*c);
		}
		printf("\",\"faults\":%" PRIu64 "}\n", st.faults);
	}
	exit(code);
}

#define die_errno(code, what, ...) die(code, what ": %s", ##__VA_ARGS__, strerror(errno))

// After the handshake the client's faulting threads are blocked until we serve them. If we
// cannot, Firecracker's advice is to kill the VMM rather than leave its guest frozen forever.
static void fatal_serving(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal_serving(const char *fmt, ...)
{
	char msg[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (h.peer > 0 && kill(h.peer, SIGKILL) == 0)
		die(EXIT_FAIL, "%s (killed client pid %d)", msg, (int)h.peer);
	die(EXIT_FAIL, "%s", msg);
}

// ---------------------------------------------------------------------------------------------
// A small JSON reader: enough for an array of flat objects with integer fields, skipping any
// other value (unknown fields of any type are ignored, as Firecracker's serde structs do).

struct json {
	const char *p, *end;
	const char *err;
};

static void ws(struct json *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static bool fail(struct json *j, const char *err)
{
	if (!j->err)
		j->err = err;
	return false;
}

static bool expect(struct json *j, char c)
{
	ws(j);
	if (j->p >= j->end || *j->p != c)
		return fail(j, c == ']' || c == '}' ? "expected ',' or a closing bracket" : "unexpected character");
	j->p++;
	return true;
}

static bool peek(struct json *j, char c)
{
	ws(j);
	return j->p < j->end && *j->p == c;
}

static int hexval(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
	       : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

// Reads a string. If `out` is given, stores it decoded (NUL-terminated); characters that cannot
// appear in the keys we look for (non-ASCII, or too long) make it "?" so it matches none.
static bool string(struct json *j, char *out, size_t outlen)
{
	if (!expect(j, '"'))
		return false;
	size_t n = 0;
	bool unmatchable = false;
	while (j->p < j->end && *j->p != '"') {
		unsigned c = (unsigned char)*j->p++;
		if (c < 0x20)
			return fail(j, "control character in string");
		if (c == '\\') {
			if (j->p >= j->end)
				break;
			char e = *j->p++;
			const char *simple = strchr("\"\\/bfnrt", e);
			if (e && simple)
				c = (unsigned char)"\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
			else if (e == 'u') {
				c = 0;
				for (int i = 0; i < 4; i++) {
					int v = j->p < j->end ? hexval(*j->p++) : -1;
					if (v < 0)
						return fail(j, "bad \\u escape");
					c = c * 16 + (unsigned)v;
				}
			} else
				return fail(j, "bad escape");
		}
		if (c >= 0x80 || c == 0 || n + 1 >= outlen)
			unmatchable = true;
		else if (out)
			out[n++] = (char)c;
	}
	if (!expect(j, '"'))
		return fail(j, "unterminated string");
	if (out) {
		out[n] = 0;
		if (unmatchable)
			strcpy(out, "?");
	}
	return true;
}

// A JSON number that must be a non-negative integer fitting in 64 bits. Addresses above 2^53
// are common (and sizes near 2^64 are an attack), so parse digits exactly, never via double.
static bool u64(struct json *j, uint64_t *out, const char *field)
{
	ws(j);
	static char err[96];
	const char *s = j->p;
	uint64_t v = 0;
	while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
		unsigned d = (unsigned)(*j->p - '0');
		if (v > (UINT64_MAX - d) / 10) {
			snprintf(err, sizeof err, "field %s does not fit in 64 bits", field);
			return fail(j, err);
		}
		v = v * 10 + d;
		j->p++;
	}
	bool leading_zero = j->p - s > 1 && s[0] == '0';
	if (j->p == s || leading_zero || (j->p < j->end && strchr(".eE-+", *j->p))) {
		snprintf(err, sizeof err, "field %s must be a non-negative integer", field);
		return fail(j, err);
	}
	*out = v;
	return true;
}

static bool skip_value(struct json *j, int depth)
{
	if (depth > 32)
		return fail(j, "nested too deeply");
	ws(j);
	if (j->p >= j->end)
		return fail(j, "unexpected end");
	char c = *j->p;
	if (c == '"')
		return string(j, NULL, 0);
	if (c == '[' || c == '{') {
		char close = c == '[' ? ']' : '}';
		j->p++;
		if (peek(j, close))
			return j->p++, true;
		do {
			if (c == '{' && !(string(j, NULL, 0) && expect(j, ':')))
				return false;
			if (!skip_value(j, depth + 1))
				return false;
		} while (peek(j, ',') && j->p++);
		return expect(j, close);
	}
	static const char *const words[] = {"true", "false", "null"};
	for (int i = 0; i < 3; i++) {
		size_t len = strlen(words[i]);
		if ((size_t)(j->end - j->p) >= len && memcmp(j->p, words[i], len) == 0) {
			j->p += len;
			return true;
		}
	}
	// Any other number: -? digits (. digits)? ([eE] [+-]? digits)?
	const char *s = j->p;
	if (*j->p == '-')
		j->p++;
	size_t digits = strspn(j->p, "0123456789");
	if (!digits)
		return fail(j, "unexpected character");
	j->p += digits;
	if (j->p < j->end && *j->p == '.') {
		j->p++;
		if (!(digits = strspn(j->p, "0123456789")))
			return fail(j, "bad number");
		j->p += digits;
	}
	if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
		j->p++;
		if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
			j->p++;
		if (!(digits = strspn(j->p, "0123456789")))
			return fail(j, "bad number");
		j->p += digits;
	}
	return j->p > s;
}

// Field presence bits while reading one region object.
enum { F_BASE = 1, F_SIZE = 2, F_OFFSET = 4, F_PAGE_SIZE = 8, F_PAGE_SIZE_KIB = 16 };

static bool region_object(struct json *j, struct region *r, unsigned *seen)
{
	static const struct {
		const char *name;
		unsigned bit;
	} fields[] = {
		{"base_host_virt_addr", F_BASE}, {"size", F_SIZE}, {"offset", F_OFFSET},
		{"page_size", F_PAGE_SIZE}, {"page_size_kib", F_PAGE_SIZE_KIB},
	};
	uint64_t page_size = 0, page_size_kib = 0;
	*seen = 0;
	if (!expect(j, '{'))
		return fail(j, "regions must be JSON objects");
	if (peek(j, '}'))
		return j->p++, true;
	do {
		char key[32];
		if (!string(j, key, sizeof key) || !expect(j, ':'))
			return false;
		unsigned bit = 0;
		for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
			if (strcmp(key, fields[i].name) == 0)
				bit = fields[i].bit;
		if (!bit) {
			if (!skip_value(j, 1))
				return false;
			continue;
		}
		if (*seen & bit)
			return fail(j, "duplicate field");
		*seen |= bit;
		uint64_t *dst = bit == F_BASE ? &r->base : bit == F_SIZE ? &r->size
			      : bit == F_OFFSET ? &r->offset : bit == F_PAGE_SIZE ? &page_size : &page_size_kib;
		if (!u64(j, dst, key))
			return false;
	} while (peek(j, ',') && j->p++);
	if (!expect(j, '}'))
		return false;
	// v1.12+: page_size; v1.7-1.11: page_size_kib, which holds bytes despite its name; v1.1: none.
	if ((*seen & F_PAGE_SIZE) && (*seen & F_PAGE_SIZE_KIB) && page_size != page_size_kib)
		return fail(j, "page_size and page_size_kib disagree");
	r->page_size = (*seen & F_PAGE_SIZE) ? page_size : (*seen & F_PAGE_SIZE_KIB) ? page_size_kib : 4096;
	return true;
}

// Parses and validates the region table; on error returns a message.
static const char *parse_regions(const char *buf, size_t len)
{
	static char err[160];
	struct json j = {.p = buf, .end = buf + len};
	size_t cap = 4;
	h.r = calloc(cap, sizeof *h.r);
	if (!h.r || !expect(&j, '['))
		return j.err ? "handshake is not a JSON array" : "out of memory";
	unsigned any_seen = 0;
	if (!peek(&j, ']')) {
		do {
			if (h.n == cap && !(h.r = realloc(h.r, (cap *= 2) * sizeof *h.r)))
				return "out of memory";
			unsigned seen;
			h.r[h.n] = (struct region){0};
			if (!region_object(&j, &h.r[h.n], &seen))
				break;
			if ((seen & (F_BASE | F_SIZE | F_OFFSET)) != (F_BASE | F_SIZE | F_OFFSET)) {
				snprintf(err, sizeof err, "region %u lacks base_host_virt_addr, size or offset", h.n);
				return err;
			}
			any_seen |= seen;
			h.n++;
		} while (peek(&j, ',') && j.p++);
	}
	if (!j.err && expect(&j, ']')) {
		ws(&j);
		if (j.p != j.end)
			fail(&j, "trailing data after the array");
	}
	if (j.err) {
		snprintf(err, sizeof err, "bad handshake JSON at byte %td: %s", j.p - buf, j.err);
		return err;
	}
	if (!h.n)
		return "handshake has no regions";
	h.shape = (any_seen & F_PAGE_SIZE) ? "1.12" : (any_seen & F_PAGE_SIZE_KIB) ? "1.7" : "1.1";

	// Firecracker uses one page size for all regions: 4 KiB, or 2 MiB with hugetlbfs.
	h.page = h.r[0].page_size;
	if (h.page != 4096 && h.page != (2u << 20)) {
		snprintf(err, sizeof err, "unsupported page size %" PRIu64, h.page);
		return err;
	}
	for (unsigned i = 0; i < h.n; i++) {
		struct region *r = &h.r[i];
		if (r->page_size != h.page) {
			snprintf(err, sizeof err, "regions disagree on the page size (%" PRIu64 " vs %" PRIu64 ")",
				 r->page_size, h.page);
			return err;
		}
		if (!r->size || r->base % h.page || r->size % h.page || r->offset % h.page) {
			snprintf(err, sizeof err,
				 "region %u: base 0x%" PRIx64 ", size %" PRIu64 " and offset %" PRIu64
				 " must be non-zero multiples of the page size %" PRIu64,
				 i, r->base, r->size, r->offset, h.page);
			return err;
		}
		// The top of a 64-bit user address space is far below 2^63; anything past it is garbage.
		if (r->base > (1ULL << 57) || r->size > (1ULL << 57) - r->base || r->offset > (1ULL << 57)) {
			snprintf(err, sizeof err, "region %u: base/size/offset out of range", i);
			return err;
		}
		for (unsigned k = 0; k < i; k++)
			if (r->base < h.r[k].base + h.r[k].size && h.r[k].base < r->base + r->size) {
				snprintf(err, sizeof err, "regions %u and %u overlap", k, i);
				return err;
			}
		r->removed = calloc((r->size / h.page + 63) / 64, sizeof(uint64_t));
		if (!r->removed)
			return "out of memory";
	}
	return NULL;
}

// ---------------------------------------------------------------------------------------------
// The handshake

// Where a JSON array read from a stream is complete: 1 yes, 0 need more bytes, -1 not an array.
static int array_complete(const char *s, size_t len)
{
	size_t i = 0;
	while (i < len && strchr(" \t\r\n", s[i]))
		i++;
	if (i == len)
		return 0;
	if (s[i] != '[')
		return -1;
	int depth = 0;
	bool in_str = false;
	for (; i < len; i++) {
		char c = s[i];
		if (in_str) {
			if (c == '\\')
				i++;
			else if (c == '"')
				in_str = false;
		} else if (c == '"')
			in_str = true;
		else if (c == '[' || c == '{')
			depth++;
		else if ((c == ']' || c == '}') && --depth == 0)
			return 1;
	}
	return 0;
}

static int remaining_ms(uint64_t deadline)
{
	if (!opt.timeout_ms)
		return -1;
	uint64_t now = now_ns();
	return now >= deadline ? 0 : (int)((deadline - now + 999999) / 1000000);
}

static void wait_readable(int fd, uint64_t deadline, const char *what)
{
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int n = poll(&p, 1, remaining_ms(deadline));
		if (n > 0)
			return;
		if (n == 0)
			die(EXIT_FAIL, "timed out after %" PRIu64 " ms waiting for %s", opt.timeout_ms, what);
		if (errno != EINTR)
			die_errno(EXIT_SETUP, "poll");
	}
}

// Reads the one handshake message: JSON bytes plus SCM_RIGHTS fds, possibly over several reads.
// Firecracker sends it in one sendmsg; a read can still come back with nothing (EAGAIN after a
// wakeup), and a stream may split a large message, so read until the array is complete.
static void receive_handshake(uint64_t deadline, char **json, size_t *json_len, int *fds, int *nfds)
{
	size_t cap = 4096, len = 0;
	char *buf = malloc(cap);
	if (!buf)
		die(EXIT_SETUP, "out of memory");
	*nfds = 0;
	for (;;) {
		wait_readable(h.sock, deadline, "the handshake");
		if (len + 1 >= cap) {
			if (cap >= MAX_HANDSHAKE)
				die(EXIT_FAIL, "handshake larger than %d bytes", MAX_HANDSHAKE);
			if (!(buf = realloc(buf, cap *= 2)))
				die(EXIT_SETUP, "out of memory");
		}
		struct iovec iov = {.iov_base = buf + len, .iov_len = cap - len - 1};
		union {
			char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
			struct cmsghdr align;
		} ctl;
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
				     .msg_controllen = sizeof ctl.b};
		ssize_t n = recvmsg(h.sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (n < 0)
			die_errno(EXIT_FAIL, "recvmsg(handshake)");
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < k; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
				if (*nfds < MAX_FDS)
					fds[(*nfds)++] = fd;
				else
					close(fd);
			}
		}
		if (msg.msg_flags & MSG_CTRUNC)
			fprintf(stderr, "baseline_handler: more than %d fds sent; the kernel dropped the rest\n", MAX_FDS);
		len += (size_t)n;
		buf[len] = 0;
		int complete = array_complete(buf, len);
		if (complete < 0 || memchr(buf, 0, len)) {
			size_t show = len < 64 ? len : 64;
			for (size_t i = 0; i < show; i++)
				if ((unsigned char)buf[i] < 0x20 || (unsigned char)buf[i] >= 0x7f)
					buf[i] = '?';
			die(EXIT_FAIL, "handshake is not a JSON array: '%.*s%s'", (int)show, buf,
			    len > show ? "..." : "");
		}
		if (complete)
			break;
		if (n == 0)
			die(EXIT_FAIL, "client closed the connection %s", len ? "mid-handshake" : "before the handshake");
	}
	*json = buf;
	*json_len = len;
}

static bool is_userfaultfd(int fd)
{
	char path[64], target[64];
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, target, sizeof target - 1);
	if (n < 0)
		return false;
	target[n] = 0;
	return strcmp(target, "anon_inode:[userfaultfd]") == 0;
}

// ---------------------------------------------------------------------------------------------
// Serving faults

static struct region *region_of(uint64_t addr)
{
	for (unsigned i = 0; i < h.n; i++)
		if (addr >= h.r[i].base && addr - h.r[i].base < h.r[i].size)
			return &h.r[i];
	return NULL;
}

// Returns 0 or the errno of the ioctl.
static int do_ioctl(unsigned long req, void *arg)
{
	uint64_t t0 = now_ns();
	int rc = ioctl(h.uffd, req, arg);
	int e = rc < 0 ? errno : 0;
	thread_ioctl_ns += now_ns() - t0;
	return e;
}

// Resolves the fault on one page with exactly one ioctl. A single page is never copied in part:
// the kernel installs it whole or fails, so uffdio_copy.copy is either the length or -errno.
static int serve_page(uint64_t addr)
{
	struct region *r = region_of(addr);
	if (!r)
		fatal_serving("fault at 0x%" PRIx64 " is outside every region", addr);
	uint64_t page = (addr - r->base) / h.page, foff = r->offset + (addr - r->base);
	bool removed = r->removed[page / 64] & (1ULL << (page % 64));

	if (removed && h.page == 4096) {
		// Maps the shared zero page; the client's first write to it then takes a normal COW fault.
		struct uffdio_zeropage z = {.range = {.start = addr, .len = h.page}};
		int e = do_ioctl(UFFDIO_ZEROPAGE, &z);
		if (!e)
			st.zeropages++;
		return e;
	}
	const uint8_t *src;
	if (removed || foff >= h.file_size)
		src = h.zeros; // hugetlb has no UFFDIO_ZEROPAGE: copy zeros instead
	else if (h.file_size - foff >= h.page)
		src = h.file + foff;
	else {
		memcpy(h.bounce, h.file + foff, h.file_size - foff);
		memset(h.bounce + (h.file_size - foff), 0, h.page - (h.file_size - foff));
		src = h.bounce;
	}
	struct uffdio_copy c = {.dst = addr, .src = (uintptr_t)src, .len = h.page};
	int e = do_ioctl(UFFDIO_COPY, &c);
	if (pf.present && (!e || e == EEXIST) && foff < h.file_size)
		set_present(foff / h.page);
	if (!e) {
		if (src == h.zeros)
			st.zero_copies++;
		else
			st.copies++;
		st.bytes += h.page;
	}
	return e;
}

static struct {
	uint64_t *addr;
	size_t n, cap;
} pending;

static void apply_remove(uint64_t start, uint64_t end)
{
	st.removes++;
	st.removed_bytes += end - start;
	for (unsigned i = 0; i < h.n; i++) {
		struct region *r = &h.r[i];
		uint64_t lo = start > r->base ? start : r->base;
		uint64_t hi = end < r->base + r->size ? end : r->base + r->size;
		// A partial page cannot be zapped (madvise works on whole pages), so mark every page the
		// range touches.
		for (uint64_t a = lo - (lo - r->base) % h.page; a < hi; a += h.page) {
			uint64_t p = (a - r->base) / h.page;
			r->removed[p / 64] |= 1ULL << (p % 64);
		}
	}
}

// Reads every queued message. Faults are only queued here, not served: while a REMOVE event is
// unread every COPY/ZEROPAGE fails with EAGAIN, and a fault read before a REMOVE may be for a
// page that the REMOVE covers (events are not in causal order), so removes are applied first.
static void drain(void)
{
	struct uffd_msg msgs[UFFD_MSG_BATCH];
	for (;;) {
		// Sampled before the read: once read() returns a REMOVE, the madvise goes on to zap, so a
		// helper that was running at the read may copy after the zap and then finish. Checked
		// after the read, helpers_running could already be 0 with the refill done.
		int helpers_at_read = __atomic_load_n(&helpers_running, __ATOMIC_ACQUIRE);
		ssize_t n = read(h.uffd, msgs, sizeof msgs);
		if (n < 0) {
			if (errno == EAGAIN)
				return;
			if (errno == EINTR)
				continue;
			fatal_serving("read(uffd): %s", strerror(errno));
		}
		for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
			struct uffd_msg *m = &msgs[i];
			switch (m->event) {
			case UFFD_EVENT_PAGEFAULT:
				st.faults++;
				if (pending.n == pending.cap) {
					pending.cap = pending.cap ? pending.cap * 2 : 64;
					if (!(pending.addr = realloc(pending.addr, pending.cap * sizeof *pending.addr)))
						fatal_serving("out of memory");
				}
				pending.addr[pending.n++] = m->arg.pagefault.address & ~(h.page - 1);
				break;
			case UFFD_EVENT_REMOVE:
				if (helpers_at_read)
					fatal_serving("a REMOVE event arrived while --prefetch-threads helpers were installing: "
						      "they take no lock, so the removed range may have been refilled");
				apply_remove(m->arg.remove.start, m->arg.remove.end);
				break;
			default:
				// Only REMOVE was enabled (by the client, in UFFDIO_API).
				fatal_serving("unexpected uffd event %u", m->event);
			}
		}
	}
}

// Serves queued faults in order; stops at the first EAGAIN (a REMOVE is in flight: everything
// else would fail the same way) and keeps the rest queued.
static void serve_pending(void)
{
	size_t i = 0;
	for (; i < pending.n; i++) {
		int e = serve_page(pending.addr[i]);
		if (e == EAGAIN) {
			st.eagain++;
			break;
		}
		if (e == EEXIST) // already present (another thread's fault on it was served): done
			st.eexist++;
		else if (e == ESRCH || e == ENOENT) // the client's mm or that mapping is gone
			st.gone++;
		else if (e)
			fatal_serving("%s at 0x%" PRIx64 " failed: %s",
				      h.page == 4096 ? "UFFDIO_COPY/ZEROPAGE" : "UFFDIO_COPY (hugetlb)",
				      pending.addr[i], strerror(e));
	}
	memmove(pending.addr, pending.addr + i, (pending.n - i) * sizeof *pending.addr);
	pending.n -= i;
}

// The region holding image offset `foff`, or NULL.
static struct region *region_of_offset(uint64_t foff)
{
	for (unsigned i = 0; i < h.n; i++)
		if (foff >= h.r[i].offset && foff - h.r[i].offset < h.r[i].size)
			return &h.r[i];
	return NULL;
}

// Image page `p` of region `r` is all zeros in the file, not installed and not removed.
static bool zero_missing(const struct region *r, uint64_t p)
{
	uint64_t rp = p - r->offset / h.page;
	return p < h.file_size / h.page && pf.zero[p] && !is_present(p) && !(r->removed[rp / 64] & (1ULL << (rp % 64)));
}

// Installs up to `budget` runs of a part of the prefetch list. Returns false when it must wait
// (EAGAIN: a REMOVE is being read; the serving thread drains events first).
static bool prefetch_step(struct pf_part *part, unsigned budget)
{
	while (budget-- && part->next < part->end) {
		uint64_t foff = pf.off[part->next], page = foff / h.page;
		struct region *r = region_of_offset(foff);
		uint64_t rp = r ? (foff - r->offset) / h.page : 0;
		if (!r || foff >= h.file_size || is_present(page) || (r->removed[rp / 64] & (1ULL << (rp % 64)))) {
			part->next++;
			continue;
		}
		bool zero = pf.zero[page];
		size_t k = part->next + 1;
		while (k < part->end && pf.off[k] == pf.off[k - 1] + h.page && pf.off[k] < h.file_size &&
		       pf.off[k] - r->offset < r->size && pf.zero[pf.off[k] / h.page] == zero &&
		       !is_present(pf.off[k] / h.page)) {
			uint64_t q = (pf.off[k] - r->offset) / h.page;
			if (r->removed[q / 64] & (1ULL << (q % 64)))
				break;
			k++;
		}
		uint64_t count = k - part->next, addr = r->base + (foff - r->offset);
		int e;
		if (zero) {
			// Like uffd resume: grow the zero run over the missing zero pages of its aligned
			// window, so scattered zero pages cost one ioctl per window.
			uint64_t first = page, end = page + count, rfirst = r->offset / h.page, rend = rfirst + r->size / h.page;
			uint64_t w = pf.zero_window;
			uint64_t wfirst = first - first % w > rfirst ? first - first % w : rfirst;
			uint64_t wend = (end - 1) - (end - 1) % w + w < rend ? (end - 1) - (end - 1) % w + w : rend;
			while (first > wfirst && zero_missing(r, first - 1))
				first--;
			while (end < wend && zero_missing(r, end))
				end++;
			struct uffdio_zeropage z = {.range = {.start = r->base + (first * h.page - r->offset), .len = (end - first) * h.page}};
			e = do_ioctl(UFFDIO_ZEROPAGE, &z);
			if (!e) {
				for (uint64_t p = first; p < end; p++)
					set_present(p);
				part->pages += end - first - count; // the list's own pages are added below
			}
		} else {
			struct uffdio_copy c = {.dst = addr, .src = (uintptr_t)(h.file + foff), .len = count * h.page};
			e = do_ioctl(UFFDIO_COPY, &c);
		}
		part->ioctls++;
		if (e == EAGAIN) {
			part->eagain++;
			return false;
		}
		if (e == EEXIST && count > 1) {
			// Part of the run was faulted in meanwhile: go on page by page from here.
			k = part->next + 1;
			count = 1;
			if (zero) {
				struct uffdio_zeropage z = {.range = {.start = addr, .len = h.page}};
				e = do_ioctl(UFFDIO_ZEROPAGE, &z);
			} else {
				struct uffdio_copy c = {.dst = addr, .src = (uintptr_t)(h.file + foff), .len = h.page};
				e = do_ioctl(UFFDIO_COPY, &c);
			}
		}
		if (e && e != EEXIST && e != ESRCH && e != ENOENT)
			fatal_serving("prefetch at 0x%" PRIx64 " (%" PRIu64 " pages) failed: %s", addr, count, strerror(e));
		for (size_t i = part->next; i < k; i++)
			set_present(pf.off[i] / h.page);
		if (!e)
			part->pages += count;
		part->next = k;
	}
	return true;
}

// A helper thread: installs its part; yields while events are queued (EAGAIN).
static void *prefetch_helper(void *arg)
{
	struct pf_part *part = arg;
	while (part->next < part->end && !__atomic_load_n(&helpers_stop, __ATOMIC_RELAXED))
		if (!prefetch_step(part, 16))
			sched_yield();
	if (part->next >= part->end)
		part->done_ns = now_ns();
	part->ioctl_ns = thread_ioctl_ns;
	__atomic_fetch_sub(&helpers_running, 1, __ATOMIC_RELEASE);
	return NULL;
}

// Cuts the list into opt.prefetch_threads parts and starts a helper for each but the first.
static void start_prefetch(void)
{
	unsigned n = opt.prefetch_threads;
	for (unsigned t = 0; t < n; t++)
		parts[t] = (struct pf_part){.next = pf.n * t / n, .end = pf.n * (t + 1) / n};
	helpers_running = (int)n - 1;
	for (unsigned t = 1; t < n; t++) {
		int rc = pthread_create(&parts[t].thread, NULL, prefetch_helper, &parts[t]);
		if (rc)
			die(EXIT_SETUP, "pthread_create(prefetch helper): %s", strerror(rc));
	}
}

static void stop_prefetch(void)
{
	__atomic_store_n(&helpers_stop, 1, __ATOMIC_RELAXED);
	for (unsigned t = 1; t < opt.prefetch_threads; t++) {
		pthread_join(parts[t].thread, NULL);
		st.ioctl_ns += parts[t].ioctl_ns;
	}
}

// Serves until the client is gone. Its exit is seen through a pidfd when we have one: Firecracker
// before 1.12 closed the socket right after the handshake while the VM kept running, so socket
// EOF only means "gone" when the pid is unknown (another pid namespace) or pidfds are missing.
static const char *serve(void)
{
	int pidfd = h.peer > 0 ? (int)syscall(SYS_pidfd_open, h.peer, 0) : -1;
	struct pollfd p[3] = {
		{.fd = h.uffd, .events = POLLIN},
		{.fd = h.sock, .events = POLLIN | POLLRDHUP},
		{.fd = pidfd, .events = POLLIN},
	};
	unsigned spins = 0;
	for (;;) {
		// With faults deferred by EAGAIN, do not sleep until the next event: the REMOVE behind
		// it may already be read, and then no further event comes; the kernel only lets COPY
		// through once the madvise thread, woken by our read, has run and dropped its "mm
		// changing" count. Yield so that thread can run (it is often queued on our CPU: without
		// the yield, a spin of 1000 polls never let it in), and fall back to 1 ms retries.
		int timeout = pending.n ? (spins++ < 1000 ? 0 : 1) : parts[0].next < parts[0].end ? 0 : -1;
		if (!pending.n)
			spins = 0;
		else if (timeout == 0)
			sched_yield();
		if (poll(p, 3, timeout) < 0) {
			if (errno == EINTR)
				continue;
			fatal_serving("poll: %s", strerror(errno));
		}
		if (p[2].revents)
			return "peer-exited";
		if (p[1].revents & POLLIN) {
			char junk[256];
			ssize_t n = recv(h.sock, junk, sizeof junk, MSG_DONTWAIT);
			if (n > 0)
				fprintf(stderr, "baseline_handler: ignoring %zd unexpected bytes from the client\n", n);
			else if (n == 0 || (errno != EAGAIN && errno != EINTR))
				p[1].revents |= POLLHUP;
		}
		if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR)) {
			if (pidfd < 0)
				return "peer-closed";
			p[1].fd = -1; // keep serving until the process itself exits
		}
		if (p[0].revents & POLLERR)
			fatal_serving("the uffd reports an error (UFFDIO_API not done by the client?)");
		if (p[0].revents & POLLIN)
			drain();
		serve_pending();
		// Faults first: prefetch only when none is queued, a few ioctls at a time.
		if (!pending.n && parts[0].next < parts[0].end && prefetch_step(&parts[0], 16) && parts[0].next == parts[0].end)
			parts[0].done_ns = now_ns();
	}
}

// ---------------------------------------------------------------------------------------------

static void usage(FILE *f)
{
	fputs("usage: baseline_handler --socket PATH --mem-file RAW [--ready-file PATH] [--timeout-ms N]\n"
	      "                        [--prefetch FILE [--prefetch-threads N]]\n"
	      "  --socket PATH      Unix socket to listen on (a stale socket file is replaced)\n"
	      "  --mem-file RAW     raw guest memory image to serve (zeros past its end)\n"
	      "  --ready-file PATH  created once the socket is listening\n"
	      "  --timeout-ms N     give up waiting for the connection and handshake after N ms\n"
	      "                     (default 60000, 0: wait forever)\n"
	      "  --prefetch FILE    after the handshake, install these image offsets (one per line,\n"
	      "                     in order) before the client asks: the bound for a prefetcher\n"
	      "  --prefetch-threads N  install the list on N threads, 1-8 (default 1)\n"
	      "exit: 0 client went away, 1 handshake rejected / serving failed, 2 usage/setup error\n",
	      f);
}

static void parse_args(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"socket", required_argument, 0, 's'}, {"mem-file", required_argument, 0, 'm'},
		{"ready-file", required_argument, 0, 'r'}, {"timeout-ms", required_argument, 0, 't'},
		{"prefetch", required_argument, 0, 'p'}, {"prefetch-threads", required_argument, 0, 'T'},
		{"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (c) {
		case 's': opt.socket_path = optarg; break;
		case 'm': opt.mem_path = optarg; break;
		case 'r': opt.ready_path = optarg; break;
		case 'p': opt.prefetch_path = optarg; break;
		case 'T': {
			char *e;
			unsigned long v = strtoul(optarg, &e, 10);
			if (!*optarg || *e || v < 1 || v > MAX_PREFETCH_THREADS)
				die(EXIT_SETUP, "--prefetch-threads: not a thread count from 1 to %d: '%s'", MAX_PREFETCH_THREADS, optarg);
			opt.prefetch_threads = (unsigned)v;
			break;
		}
		case 't': {
			char *e;
			errno = 0;
			opt.timeout_ms = strtoull(optarg, &e, 10);
			if (errno || !*optarg || *e || *optarg == '-' || opt.timeout_ms > INT_MAX)
				die(EXIT_SETUP, "--timeout-ms: not a number of milliseconds: '%s'", optarg);
			break;
		}
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); exit(EXIT_SETUP);
		}
	}
	if (optind < argc)
		die(EXIT_SETUP, "unexpected argument '%s' (see --help)", argv[optind]);
	if (!opt.socket_path || !opt.mem_path)
		die(EXIT_SETUP, "--socket and --mem-file are required (see --help)");
	if (opt.prefetch_threads > 1 && !opt.prefetch_path)
		die(EXIT_SETUP, "--prefetch-threads needs --prefetch");
}

static int listen_on(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof addr.sun_path)
		die(EXIT_SETUP, "--socket: path longer than %zu bytes", sizeof addr.sun_path - 1);
	strcpy(addr.sun_path, path);
	struct stat sb;
	if (lstat(path, &sb) == 0) {
		if (!S_ISSOCK(sb.st_mode))
			die(EXIT_SETUP, "--socket %s exists and is not a socket", path);
		if (unlink(path) < 0)
			die_errno(EXIT_SETUP, "unlink stale socket %s", path);
	}
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die_errno(EXIT_SETUP, "socket(AF_UNIX)");
	if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
		die_errno(EXIT_SETUP, "bind(%s)", path);
	if (listen(s, 1) < 0)
		die_errno(EXIT_SETUP, "listen(%s)", path);
	return s;
}

static int compare_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

// Reads the --prefetch list and classifies every page of the file (all zeros or not), before
// listening: the bound pays none of that while the client waits.
static void load_prefetch(void)
{
	FILE *f = fopen(opt.prefetch_path, "r");
	if (!f)
		die_errno(EXIT_SETUP, "open --prefetch %s", opt.prefetch_path);
	size_t cap = 0;
	char line[64];
	while (fgets(line, sizeof line, f)) {
		char *e;
		errno = 0;
		uint64_t off = strtoull(line, &e, 0);
		if (e == line)
			continue; // blank line
		if (errno || (*e && *e != '\n' && *e != '\r'))
			die(EXIT_SETUP, "--prefetch %s: not an offset: '%s'", opt.prefetch_path, line);
		if (pf.n == cap && !(pf.off = realloc(pf.off, (cap = cap ? cap * 2 : 4096) * sizeof *pf.off)))
			die(EXIT_SETUP, "out of memory");
		pf.off[pf.n++] = off & ~(uint64_t)4095;
	}
	fclose(f);
	// As zeroRunWindowBytes (src/format/packed-set.ts): 2 MiB windows when most of the set's
	// pages have no set neighbour, 256 KiB when the set comes in runs.
	uint64_t *sorted = malloc((pf.n + 1) * sizeof *sorted), adjacent = 0;
	if (!sorted)
		die(EXIT_SETUP, "out of memory");
	memcpy(sorted, pf.off, pf.n * sizeof *sorted);
	qsort(sorted, pf.n, sizeof *sorted, compare_u64);
	for (size_t i = 1; i < pf.n; i++)
		adjacent += sorted[i] == sorted[i - 1] + 4096;
	free(sorted);
	pf.zero_window = adjacent * 2 < pf.n ? 512 : 64;
	uint64_t pages = (h.file_size + 4095) / 4096;
	static const uint8_t zeros[4096];
	pf.zero = calloc(pages + 1, 1);
	pf.present = calloc(pages + 1, 1);
	if (!pf.zero || !pf.present)
		die(EXIT_SETUP, "out of memory");
	for (uint64_t p = 0; p + 1 <= h.file_size / 4096; p++)
		pf.zero[p] = !memcmp(h.file + p * 4096, zeros, 4096);
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);

	// Map (and pre-read, as Firecracker's example does) the memory file before listening, so the
	// client's timing measures serving faults, not reading the file from disk.
	int mf = open(opt.mem_path, O_RDONLY | O_CLOEXEC);
	struct stat sb;
	if (mf < 0 || fstat(mf, &sb) < 0)
		die_errno(EXIT_SETUP, "open(%s)", opt.mem_path);
	h.file_size = (uint64_t)sb.st_size;
	if (h.file_size) {
		h.file = mmap(NULL, h.file_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, mf, 0);
		if (h.file == MAP_FAILED)
			die_errno(EXIT_SETUP, "mmap(%s)", opt.mem_path);
	}
	close(mf);
	if (opt.prefetch_path)
		load_prefetch();

	int ls = listen_on(opt.socket_path);
	if (opt.ready_path) {
		int fd = open(opt.ready_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0)
			die_errno(EXIT_SETUP, "create --ready-file %s", opt.ready_path);
		close(fd);
	}

	uint64_t deadline = now_ns() + opt.timeout_ms * 1000000ULL;
	wait_readable(ls, deadline, "a connection");
	h.sock = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	if (h.sock < 0)
		die_errno(EXIT_SETUP, "accept(%s)", opt.socket_path);
	// One client per handler: stop listening and remove the socket file.
	close(ls);
	unlink(opt.socket_path);

	struct ucred cred;
	socklen_t cl = sizeof cred;
	if (getsockopt(h.sock, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0)
		h.peer = cred.pid;

	char *json;
	size_t json_len;
	int fds[MAX_FDS], nfds;
	receive_handshake(deadline, &json, &json_len, fds, &nfds);
	uint64_t t_start = now_ns();
	if (!nfds)
		die(EXIT_FAIL, "handshake carried no file descriptor (expected the uffd via SCM_RIGHTS)");
	// fd[0] is the uffd; forks append others (memfd, guest_memfd, bitmap) that we do not use.
	h.uffd = fds[0];
	for (int i = 1; i < nfds; i++)
		close(fds[i]);
	st.extra_fds = (uint64_t)nfds - 1;
	if (!is_userfaultfd(h.uffd))
		die(EXIT_FAIL, "the first fd of the handshake is not a userfaultfd");
	const char *err = parse_regions(json, json_len);
	if (err)
		die(EXIT_FAIL, "handshake rejected: %s", err);
	if (opt.prefetch_path && h.page != 4096)
		die(EXIT_FAIL, "--prefetch supports 4 KiB pages only (the client's are %" PRIu64 " bytes)", h.page);
	free(json);
	// The uffd was created O_NONBLOCK by the client (it is the same open file); make sure, since
	// drain() relies on read() returning EAGAIN.
	int fl = fcntl(h.uffd, F_GETFL);
	if (fl < 0 || fcntl(h.uffd, F_SETFL, fl | O_NONBLOCK) < 0)
		die_errno(EXIT_FAIL, "fcntl(uffd, O_NONBLOCK)");

	h.zeros = mmap(NULL, h.page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	h.bounce = aligned_alloc(h.page, h.page);
	if (h.zeros == MAP_FAILED || !h.bounce)
		die(EXIT_SETUP, "out of memory");

	if (opt.prefetch_path)
		start_prefetch();
	const char *reason = serve();
	uint64_t pf_pages = 0, pf_ioctls = 0, pf_done = 0;
	st.ioctl_ns += thread_ioctl_ns;
	if (opt.prefetch_path) {
		stop_prefetch();
		for (unsigned t = 0; t < opt.prefetch_threads; t++) {
			pf_pages += parts[t].pages;
			pf_ioctls += parts[t].ioctls;
			st.eagain += parts[t].eagain;
			if (parts[t].done_ns > pf_done)
				pf_done = parts[t].done_ns;
		}
		// Done when the last part is; 0 when some part never finished.
		for (unsigned t = 0; t < opt.prefetch_threads; t++)
			if (!parts[t].done_ns && parts[t].next < parts[t].end)
				pf_done = 0;
	}
	uint64_t mem_size = 0;
	for (unsigned i = 0; i < h.n; i++)
		mem_size += h.r[i].size;
	printf("{\"ok\":true,\"exit_reason\":\"%s\",\"handshake_shape\":\"%s\",\"regions\":%u"
	       ",\"page_size\":%" PRIu64 ",\"mem_size\":%" PRIu64 ",\"file_size\":%" PRIu64
	       ",\"extra_fds\":%" PRIu64 ",\"peer_pid\":%d,\"faults\":%" PRIu64 ",\"copies\":%" PRIu64
	       ",\"zero_copies\":%" PRIu64 ",\"zeropages\":%" PRIu64 ",\"bytes_copied\":%" PRIu64
	       ",\"eexist\":%" PRIu64 ",\"eagain\":%" PRIu64 ",\"gone\":%" PRIu64 ",\"removes\":%" PRIu64
	       ",\"removed_bytes\":%" PRIu64 ",\"ioctl_ns\":%" PRIu64 ",\"elapsed_ns\":%" PRIu64
	       ",\"prefetched_pages\":%" PRIu64 ",\"prefetch_ioctls\":%" PRIu64 ",\"prefetch_done_ns\":%" PRIu64
	       ",\"prefetch_threads\":%u}\n",
	       reason, h.shape, h.n, h.page, mem_size, h.file_size, st.extra_fds, (int)h.peer, st.faults,
	       st.copies, st.zero_copies, st.zeropages, st.bytes, st.eexist, st.eagain, st.gone,
	       st.removes, st.removed_bytes, st.ioctl_ns, now_ns() - t_start, pf_pages, pf_ioctls,
	       pf_done ? pf_done - t_start : 0, opt.prefetch_threads);
	return 0;
}
