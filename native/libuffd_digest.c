// libuffd_digest: per-page content digests (docs/FORMAT.md, Page digests). A layer compares the
// digest of each page of the new image with the one its parent stored, instead of decoding the
// parent's chunks: the digest must be cheap (1 GiB well under 0.2 s on one core) and, for content
// chosen without knowledge of the key, collide for two different pages with probability 2^-64.
//
// The hash is NH (Black et al., UMAC; the universal hash Adiantum uses) over the page as 32-bit
// little-endian words m[0..1023], twice with the key shifted by two words (Toeplitz):
//   pass j: sum over even i of ((m[i] + k[i+2j]) mod 2^32) * ((m[i+1] + k[i+1+2j]) mod 2^32) mod 2^64
// Each pass collides for two different equal-length inputs with probability <= 2^-32 over the
// key; the Toeplitz pair, <= 2^-64. The digest is pass 0 then pass 1, 8 bytes LE each.
//
// Loaded by src/sys/libc.ts when built; without it src/format/page-digest.ts computes the same
// digests in JavaScript (slowly). The AVX2 path and the scalar one give identical results.
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#define PAGE_BYTES 4096
#define PAGE_WORDS (PAGE_BYTES / 4)
// Words of key a page needs: one per word, and the shift of the second pass.
#define KEY_WORDS (PAGE_WORDS + 2)

static inline uint32_t load32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v; // x86-64 is little-endian, as the format's words are
}

// Returns whether the page is all zeros (found in the same pass: a layer writer needs both).
static int nh_page_scalar(const uint8_t *page, const uint32_t *key, uint8_t *out)
{
	uint64_t a = 0, b = 0;
	uint32_t any = 0;
	for (int i = 0; i < PAGE_WORDS; i += 2) {
		uint32_t m0 = load32(page + 4 * i), m1 = load32(page + 4 * i + 4);
		any |= m0 | m1;
		a += (uint64_t)(uint32_t)(m0 + key[i]) * (uint32_t)(m1 + key[i + 1]);
		b += (uint64_t)(uint32_t)(m0 + key[i + 2]) * (uint32_t)(m1 + key[i + 3]);
	}
	memcpy(out, &a, 8);
	memcpy(out + 8, &b, 8);
	return any == 0;
}

#ifdef __x86_64__
// Eight words at a time: the sums as four 64-bit lanes of (even word, odd word), and
// _mm256_mul_epu32 multiplies each lane's low half by its high half shifted down.
__attribute__((target("avx2"))) static int nh_page_avx2(const uint8_t *page, const uint32_t *key, uint8_t *out)
{
	__m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0, any = a0;
	for (int i = 0; i < PAGE_WORDS; i += 16) {
		__m256i m0 = _mm256_loadu_si256((const __m256i *)(page + 4 * i));
		__m256i m1 = _mm256_loadu_si256((const __m256i *)(page + 4 * i + 32));
		any = _mm256_or_si256(any, _mm256_or_si256(m0, m1));
		__m256i s0 = _mm256_add_epi32(m0, _mm256_loadu_si256((const __m256i *)(key + i)));
		__m256i s1 = _mm256_add_epi32(m1, _mm256_loadu_si256((const __m256i *)(key + i + 8)));
		__m256i t0 = _mm256_add_epi32(m0, _mm256_loadu_si256((const __m256i *)(key + i + 2)));
		__m256i t1 = _mm256_add_epi32(m1, _mm256_loadu_si256((const __m256i *)(key + i + 10)));
		a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(s0, _mm256_srli_epi64(s0, 32)));
		a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(s1, _mm256_srli_epi64(s1, 32)));
		b0 = _mm256_add_epi64(b0, _mm256_mul_epu32(t0, _mm256_srli_epi64(t0, 32)));
		b1 = _mm256_add_epi64(b1, _mm256_mul_epu32(t1, _mm256_srli_epi64(t1, 32)));
	}
	uint64_t la[4], lb[4];
	_mm256_storeu_si256((__m256i *)la, _mm256_add_epi64(a0, a1));
	_mm256_storeu_si256((__m256i *)lb, _mm256_add_epi64(b0, b1));
	uint64_t a = la[0] + la[1] + la[2] + la[3], b = lb[0] + lb[1] + lb[2] + lb[3];
	memcpy(out, &a, 8);
	memcpy(out + 8, &b, 8);
	return _mm256_testz_si256(any, any);
}

static int has_avx2(void)
{
	static int avx2 = -1;
	if (avx2 < 0) {
		__builtin_cpu_init();
		avx2 = __builtin_cpu_supports("avx2");
	}
	return avx2;
}
#endif

// The number of key words uffd_page_digests reads (the caller's key must hold that many).
int uffd_page_digest_key_words(void)
{
	return KEY_WORDS;
}

// Digests of `count` consecutive 4 KiB pages at `pages`: 16 bytes each to `out`; with `zero` (may
// be NULL), zero[p] = 1 when page p is all zeros, else 0. `scalar` forces the portable path (for
// tests that compare the two).
void uffd_page_digests(const uint8_t *pages, size_t count, const uint32_t *key, uint8_t *out, uint8_t *zero, int scalar)
{
#ifdef __x86_64__
	if (!scalar && has_avx2()) {
		for (size_t p = 0; p < count; p++) {
			int z = nh_page_avx2(pages + p * PAGE_BYTES, key, out + p * 16);
			if (zero)
				zero[p] = (uint8_t)z;
		}
		return;
	}
#endif
	(void)scalar;
	for (size_t p = 0; p < count; p++) {
		int z = nh_page_scalar(pages + p * PAGE_BYTES, key, out + p * 16);
		if (zero)
			zero[p] = (uint8_t)z;
	}
}

// A file mapped while it is digested can shrink under the mapping (a memory file truncated by
// its VMM): touching a page past its new end raises SIGBUS, which would kill the process. The
// handler below turns that into an error return for the thread digesting that mapping, and
// leaves any other SIGBUS as it would have been: to the handler installed before, or fatal.
//
// The guard is thread-local, initial-exec (static TLS: reading it in a signal handler allocates
// nothing, where a dlopen'd library's default TLS model may call malloc on a thread's first
// access), and looked at only while some thread has one set.
#define GUARD_TLS __thread __attribute__((tls_model("initial-exec")))
static GUARD_TLS sigjmp_buf *guard_jump;
static GUARD_TLS const uint8_t *guard_start;
static GUARD_TLS const uint8_t *guard_end;
static int guards_set;
static struct sigaction previous_bus;
static pthread_once_t bus_once = PTHREAD_ONCE_INIT;

static void on_bus(int sig, siginfo_t *info, void *context)
{
	if (__atomic_load_n(&guards_set, __ATOMIC_ACQUIRE) > 0 && guard_jump) {
		const uint8_t *at = info->si_addr;
		if (at >= guard_start && at < guard_end)
			siglongjmp(*guard_jump, 1);
	}
	if (previous_bus.sa_flags & SA_SIGINFO) {
		previous_bus.sa_sigaction(sig, info, context);
		return;
	}
	if (previous_bus.sa_handler != SIG_DFL && previous_bus.sa_handler != SIG_IGN) {
		previous_bus.sa_handler(sig);
		return;
	}
	if (info->si_code <= 0) {
		// Sent (kill, tgkill), not a fault: ignored if it was, else its default action, now.
		if (previous_bus.sa_handler == SIG_IGN)
			return;
		signal(sig, SIG_DFL);
		raise(sig);
		return;
	}
	// A fault outside any guard: the kernel kills a process that ignores or does not handle one,
	// and so it does once the faulting access runs again under the default action.
	signal(sig, SIG_DFL);
}

static void install_bus_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_bus;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &previous_bus);
}

// The mapping of the file the calling thread digests: the whole file, mapped once and kept
// until uffd_file_digests_release (or another file is asked for). Mapping and unmapping each
// range instead costs a TLB shootdown on every CPU per unmap, which made it no faster than read().
static GUARD_TLS const uint8_t *held_map;
static GUARD_TLS size_t held_length;
static GUARD_TLS dev_t held_dev;
static GUARD_TLS ino_t held_ino;
// A mapping is the process's: a thread that ends without releasing it (a worker terminated)
// has it unmapped by this key's destructor, which runs as the thread exits.
static pthread_key_t held_key;
static pthread_once_t held_key_once = PTHREAD_ONCE_INIT;

void uffd_file_digests_release(void)
{
	if (held_map)
		munmap((void *)held_map, held_length);
	held_map = NULL;
	held_length = 0;
}

static void release_at_thread_exit(void *unused)
{
	(void)unused;
	uffd_file_digests_release();
}

static void create_held_key(void)
{
	pthread_key_create(&held_key, release_at_thread_exit);
}

// uffd_page_digests of `count` pages of file `fd` from byte `offset` (a multiple of 4096), read
// through a private read-only mapping instead of being copied out: the kernel maps the page
// cache's pages, which costs several times less than read() copying them (a layer written from a
// full memory image digests every page of it). Returns 0; -errno when the range cannot be mapped
// (not a regular file, past its end: the caller reads it instead and reports what is wrong), or
// -EFAULT when the file shrank while it was being digested.
int uffd_file_page_digests(int fd, int64_t offset, size_t count, const uint32_t *key, uint8_t *out, uint8_t *zero)
{
	if (offset < 0 || offset % PAGE_BYTES != 0)
		return -EINVAL;
	if (count == 0)
		return 0;
	struct stat st;
	if (fstat(fd, &st) != 0)
		return -errno;
	size_t length = count * PAGE_BYTES;
	if (!S_ISREG(st.st_mode) || (uint64_t)offset + length > (uint64_t)st.st_size)
		return -ERANGE;
	if (!held_map || held_dev != st.st_dev || held_ino != st.st_ino || (uint64_t)offset + length > held_length) {
		uffd_file_digests_release();
		void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (map == MAP_FAILED)
			return -errno;
		held_map = map;
		held_length = (size_t)st.st_size;
		held_dev = st.st_dev;
		held_ino = st.st_ino;
		pthread_once(&held_key_once, create_held_key);
		pthread_setspecific(held_key, (void *)1);
	}
	pthread_once(&bus_once, install_bus_handler);
	const uint8_t *pages = held_map + offset;
	sigjmp_buf jump;
	int result = 0;
	if (sigsetjmp(jump, 1) == 0) {
		guard_start = held_map;
		guard_end = held_map + held_length;
		guard_jump = &jump;
		__atomic_add_fetch(&guards_set, 1, __ATOMIC_RELEASE);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		uffd_page_digests(pages, count, key, out, zero, 0);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
	} else {
		result = -EFAULT;
	}
	guard_jump = NULL;
	__atomic_sub_fetch(&guards_set, 1, __ATOMIC_RELEASE);
	// The file shrank: map it again on the next call.
	if (result == -EFAULT)
		uffd_file_digests_release();
	return result;
}
