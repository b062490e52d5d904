// libuffd_crc: CRC-32 (the zlib/gzip polynomial, reflected, as zlib.crc32 computes it) with
// carry-less multiplication. Every chunk a resume decodes is checked against its stored CRC
// first; zlib's table-driven crc32 ran at ~2.3 GB/s here, ~8% of populating a guest image.
//
// The method: a CRC is the remainder of the message polynomial modulo P. Multiplying a 128-bit
// piece by x^k mod P (one PCLMULQDQ per 64-bit half) moves it k bits further along the message
// without changing that remainder, so four 128-bit lanes are folded forward over each 64 bytes
// and then into one lane. What is left is a 16-byte message with the same CRC as everything
// folded into it, finished byte by byte with a table, like the tail. The fold constants are
// x^(4*128+32) mod P, x^(4*128-32) mod P (64 bytes ahead) and x^(128+32), x^(128-32) mod P
// (16 bytes ahead), bit-reflected and shifted by one, as the bit-reflected product needs.
//
// Loaded by src/sys/libc.ts when built; without it, or on a CPU without PCLMULQDQ/SSE4.1, the
// program uses zlib.crc32 (same results).
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

static uint32_t table[256];

__attribute__((constructor)) static void make_table(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		table[i] = c;
	}
}

// The raw remainder (no initial or final inversion), continued over `len` bytes.
static uint32_t crc_bytes(uint32_t crc, const uint8_t *p, size_t len)
{
	while (len--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

#ifdef __x86_64__
// Moves `x` 64 or 16 bytes ahead (the constants' pair) and adds the data found there.
__attribute__((target("pclmul,sse4.1"))) static inline __m128i fold(__m128i x, __m128i k, __m128i data)
{
	__m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
	__m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
	return _mm_xor_si128(_mm_xor_si128(lo, hi), data);
}

__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_folded(uint32_t raw, const uint8_t *p, size_t len)
{
	const __m128i k64 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
	const __m128i k16 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
	__m128i x0 = _mm_loadu_si128((const __m128i *)p);
	__m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
	__m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
	__m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
	// The running remainder enters as the first 4 bytes of the message.
	x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)raw));
	p += 64;
	len -= 64;
	for (; len >= 64; p += 64, len -= 64) {
		x0 = fold(x0, k64, _mm_loadu_si128((const __m128i *)p));
		x1 = fold(x1, k64, _mm_loadu_si128((const __m128i *)(p + 16)));
		x2 = fold(x2, k64, _mm_loadu_si128((const __m128i *)(p + 32)));
		x3 = fold(x3, k64, _mm_loadu_si128((const __m128i *)(p + 48)));
	}
	x0 = fold(x0, k16, x1);
	x0 = fold(x0, k16, x2);
	x0 = fold(x0, k16, x3);
	for (; len >= 16; p += 16, len -= 16)
		x0 = fold(x0, k16, _mm_loadu_si128((const __m128i *)p));
	uint8_t rest[16];
	_mm_storeu_si128((__m128i *)rest, x0);
	return crc_bytes(crc_bytes(0, rest, 16), p, len);
}
#endif

// 1 when this CPU has what uffd_crc32 folds with (else it works byte by byte: use zlib instead).
int uffd_crc32_fast(void)
{
#ifdef __x86_64__
	static int fast = -1;
	if (fast < 0) {
		__builtin_cpu_init();
		fast = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
	}
	return fast;
#else
	return 0;
#endif
}

// zlib's crc32(crc, buf, len): `crc` is a previous result (0 to start).
uint32_t uffd_crc32(uint32_t crc, const uint8_t *buf, size_t len)
{
	uint32_t raw = ~crc;
#ifdef __x86_64__
	if (len >= 64 && uffd_crc32_fast())
		return ~crc_folded(raw, buf, len);
#endif
	return ~crc_bytes(raw, buf, len);
}
