// libuffd_fill: installs the missing pages of one packed working-set block in one call.
//
// uffd resume decides in JavaScript what to install and in which order; this library does the
// per-page part of installing a block of the working set: skip pages already present, split at
// region boundaries, grow zero runs over the missing zero pages of their window, issue
// UFFDIO_COPY / UFFDIO_ZEROPAGE, and mark what was installed. Done in JavaScript that part cost
// ~2-3 us per ioctl on top of the kernel's own ~3 us (docs/BENCHMARKS.md), doubling the time to
// install a scattered working set. The JavaScript path (src/resume/fault-server.ts) does the
// same and stays the fallback when this library is not built.
//
// The caller owns every buffer; nothing is kept between calls. Only 4 KiB-page, cooperative
// clients come here (no hugetlbfs zero copies, no per-page ENOENT retries).

#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

// Page states, as src/resume/address-map.ts numbers them.
enum { PAGE_MISSING = 0, PAGE_PRESENT = 1 };

// Fields of `out`, as src/sys/uffd.ts reads them.
enum { OUT_COPIED, OUT_ZEROED, OUT_COPY_IOCTLS, OUT_ZERO_IOCTLS, OUT_EEXIST, OUT_NEWLY_PRESENT, OUT_STOP_PAGE, OUT_FIELDS };

// A client's memory region: image bytes [offset, offset + size) live at host address base.
struct fill_region {
	uint64_t offset, size, base;
};

struct fill {
	int uffd;
	uint8_t *states;
	const uint8_t *zero_map;
	uint64_t page;
	uint32_t *out;
};

static int is_zero(const uint8_t *map, uint64_t p)
{
	return map[p >> 3] & (1u << (p & 7));
}

static void mark_present(struct fill *f, uint64_t first, uint64_t end)
{
	for (uint64_t p = first; p < end; p++) {
		if (f->states[p] == PAGE_MISSING)
			f->out[OUT_NEWLY_PRESENT]++;
		f->states[p] = PAGE_PRESENT;
	}
}

// Installs image pages [first, first + count) of region r: copied from `src` (their bytes, in
// order), or zero pages when src is 0. Returns 0, or the errno that stopped it (pages before
// out[OUT_STOP_PAGE] are installed): EAGAIN with nothing installed (events are queued), ENOENT or
// ESRCH (the mapping or the process is gone), or an unexpected one.
static int install(struct fill *f, const struct fill_region *r, uint64_t first, uint64_t count, uint64_t src)
{
	uint64_t len = count * f->page, done = 0;
	uint64_t dst = r->base + first * f->page - r->offset;
	while (done < len) {
		int64_t field;
		int ret, err;
		if (src) {
			struct uffdio_copy c = {.dst = dst + done, .src = src + done, .len = len - done};
			ret = ioctl(f->uffd, UFFDIO_COPY, &c);
			err = ret ? errno : 0;
			field = c.copy;
			f->out[OUT_COPY_IOCTLS]++;
		} else {
			struct uffdio_zeropage z = {.range = {.start = dst + done, .len = len - done}};
			ret = ioctl(f->uffd, UFFDIO_ZEROPAGE, &z);
			err = ret ? errno : 0;
			field = z.zeropage;
			f->out[OUT_ZERO_IOCTLS]++;
		}
		// The kernel reports bytes installed, or -errno, in the struct (see uffdCopy in src/sys).
		uint64_t got = 0;
		if (ret == 0)
			got = (uint64_t)field;
		else if (field < 0)
			err = (int)-field;
		else
			got = (uint64_t)field;
		if (got) {
			uint64_t p = first + done / f->page;
			mark_present(f, p, p + got / f->page);
			f->out[src ? OUT_COPIED : OUT_ZEROED] += (uint32_t)(got / f->page);
			done += got;
		}
		if (!err)
			continue;
		if (err == EEXIST) {
			// Already there (a fault's install raced ours): mark it, wake any waiter, go on.
			struct uffdio_range wake = {.start = dst + done, .len = f->page};
			ioctl(f->uffd, UFFDIO_WAKE, &wake);
			mark_present(f, first + done / f->page, first + done / f->page + 1);
			f->out[OUT_EEXIST]++;
			done += f->page;
			continue;
		}
		// EAGAIN after progress: a present page follows (the next call reports EEXIST for it).
		if (err == EAGAIN && got)
			continue;
		f->out[OUT_STOP_PAGE] = (uint32_t)(first + done / f->page);
		return err;
	}
	return 0;
}

// Installs the missing pages of a packed block given as `nruns` runs (first image page, page
// count, payload page or -1 for zero pages) whose payload is at `payload`; run `first_run` (the
// faulting page's, or -1) first. `states` and `zero_map` cover `page_count` image pages: nothing
// past them is read or installed (a region may reach into the snapshot's padding). Zero runs grow
// over missing zero pages within their aligned window of `zero_window` pages. Returns 0 or the
// errno that stopped it (see install).
int uffd_fill_block(int uffd, uint8_t *states, uint64_t page_count, const uint8_t *zero_map, uint64_t page_size,
		    const struct fill_region *regions, uint32_t nregions, const int32_t *runs,
		    uint32_t nruns, uint64_t payload, int32_t first_run, uint64_t zero_window, uint32_t *out)
{
	struct fill f = {.uffd = uffd, .states = states, .zero_map = zero_map, .page = page_size, .out = out};
	for (int i = 0; i < OUT_FIELDS; i++)
		out[i] = 0;
	const struct fill_region *r = NULL;
	if (first_run >= (int32_t)nruns)
		first_run = -1;
	if (zero_window == 0)
		zero_window = 1;
	for (int64_t k = first_run >= 0 ? -1 : 0; k < (int64_t)nruns; k++) {
		if (k >= 0 && k == first_run)
			continue;
		uint32_t i = k < 0 ? (uint32_t)first_run : (uint32_t)k;
		uint64_t page = (uint64_t)runs[3 * i], end = page + (uint64_t)runs[3 * i + 1];
		if (end > page_count)
			end = page_count;
		int32_t payload_page = runs[3 * i + 2];
		for (uint64_t p = page; p < end;) {
			if (states[p] != PAGE_MISSING) {
				p++;
				continue;
			}
			uint64_t offset = p * page_size;
			if (!r || offset < r->offset || offset - r->offset >= r->size) {
				r = NULL;
				for (uint32_t j = 0; j < nregions && !r; j++)
					if (offset >= regions[j].offset && offset - regions[j].offset < regions[j].size)
						r = &regions[j];
			}
			if (!r) { // not in the client's memory
				p++;
				continue;
			}
			uint64_t rfirst = r->offset / page_size, rend = rfirst + r->size / page_size;
			if (rend > page_count)
				rend = page_count;
			uint64_t q = p + 1;
			while (q < end && q < rend && states[q] == PAGE_MISSING)
				q++;
			int err;
			if (payload_page < 0) {
				uint64_t wfirst = p - p % zero_window, wend = (q - 1) - (q - 1) % zero_window + zero_window;
				if (wfirst < rfirst)
					wfirst = rfirst;
				if (wend > rend)
					wend = rend;
				uint64_t from = p, to = q;
				while (from > wfirst && is_zero(zero_map, from - 1) && states[from - 1] == PAGE_MISSING)
					from--;
				while (to < wend && is_zero(zero_map, to) && states[to] == PAGE_MISSING)
					to++;
				err = install(&f, r, from, to - from, 0);
			} else {
				err = install(&f, r, p, q - p, payload + ((uint64_t)payload_page + (p - page)) * page_size);
			}
			if (err)
				return err;
			p = q;
		}
	}
	return 0;
}
