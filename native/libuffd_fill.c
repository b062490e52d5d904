// libuffd_fill: installs the missing pages of one packed working-set block in one call.
//
// uffd resume decides in JavaScript what to install and in which order; this library does the
// per-page part of installing a block of the working set: skip pages already present, split at
// region boundaries, grow zero runs over the missing zero pages of their window, issue
// UFFDIO_COPY / UFFDIO_ZEROPAGE, and mark what was installed. Done in JavaScript that part cost
// ~2-3 us per ioctl on top of the kernel's own ~3 us (docs/BENCHMARKS.md), doubling the time to
// install a scattered working set. The JavaScript path (src/resume/fault-loop/fault-server.ts)
// does the same and stays the fallback when this library is not built.
//
// uffd_helper_start runs the same fill on a helper thread over a list of blocks, beside the
// caller's fault loop: single-page copies cost ~2-3 us each in the kernel, and a second thread
// copying into the same process runs beside the first (baseline_handler --prefetch-threads:
// ~1.3x on 2 cores). Page states are then shared: every page goes from missing to present by one
// compare-and-swap, counted by whoever made it. REMOVE events are ordered against the helper by
// a two-flag gate (see gate_enter).
//
// The caller owns every buffer; nothing is kept between calls but a helper's own state. Only
// 4 KiB-page, cooperative clients come here (no hugetlbfs zero copies, no per-page ENOENT retries).

#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

// --- the ABI shared with src/sys/fill.ts -----------------------------------------------------
// Every index and value the caller and this library both use on shared memory. uffd_fill_abi
// reports them all, and test/sys-fill-abi.test.ts checks them against FILL_ABI in src/sys/fill.ts.

// Page states, one byte per image page, as src/resume/fault-loop/address-map.ts numbers them. Only
// a missing page is installed here; a removed one (the client dropped it: a REMOVE event) must
// read as zeros, so only the fault loop fills it again, on a fault.
enum { PAGE_MISSING = 0, PAGE_PRESENT = 1, PAGE_REMOVED = 2 };

// Fields of `out` (uint32 each): what uffd_fill_block did, and with an error where it stopped.
enum { OUT_COPIED, OUT_ZEROED, OUT_COPY_IOCTLS, OUT_ZERO_IOCTLS, OUT_EEXIST, OUT_NEWLY_PRESENT, OUT_STOP_PAGE, OUT_FIELDS };

// A run of a packed block (int32 each): its first image page, its page count, and the block's
// payload page holding its first page, or RUN_ZERO for zero pages.
enum { RUN_PAGE, RUN_COUNT, RUN_PAYLOAD, RUN_WORDS };
enum { RUN_ZERO = -1 };

// A job of a helper (uint64 each): the address of its runs, their count, its payload's address.
enum { JOB_RUNS, JOB_NRUNS, JOB_PAYLOAD, JOB_WORDS };
// A job's state (uint32), written by the helper: not started, being installed, installed.
enum { JOB_PENDING, JOB_RUNNING, JOB_DONE };

// A helper's totals (uint32 each, shared, added to atomically): the OUT_* counts at their OUT_*
// index, the page it stopped at, then the errno that stopped it (0: none), then whether it has
// finished (nonzero once all jobs are done, or it stopped or failed).
enum { TOTAL_STOP_PAGE = OUT_STOP_PAGE, TOTAL_ERROR = OUT_FIELDS, TOTAL_FINISHED, TOTAL_FIELDS };

// A helper's gate (uint32 cells, see gate_enter): the helper's flag, then the fault loop's.
enum { GATE_HELPER, GATE_LOOP, GATE_CELLS };

// A client's memory region: image bytes [offset, offset + size) live at host address base.
struct fill_region {
	uint64_t offset, size, base;
};

struct uffd_fill_abi_entry {
	const char *name;
	int64_t value;
};

#define ABI(name) {#name, name}
#define ABI_SIZE(type) {"sizeof:" #type, sizeof(struct type)}
#define ABI_OFF(type, field) {"offsetof:" #type "." #field, offsetof(struct type, field)}

static const struct uffd_fill_abi_entry abi[] = {
	ABI(PAGE_MISSING), ABI(PAGE_PRESENT), ABI(PAGE_REMOVED),
	ABI(OUT_COPIED), ABI(OUT_ZEROED), ABI(OUT_COPY_IOCTLS), ABI(OUT_ZERO_IOCTLS), ABI(OUT_EEXIST),
	ABI(OUT_NEWLY_PRESENT), ABI(OUT_STOP_PAGE), ABI(OUT_FIELDS),
	ABI(RUN_PAGE), ABI(RUN_COUNT), ABI(RUN_PAYLOAD), ABI(RUN_WORDS), ABI(RUN_ZERO),
	ABI(JOB_RUNS), ABI(JOB_NRUNS), ABI(JOB_PAYLOAD), ABI(JOB_WORDS),
	ABI(JOB_PENDING), ABI(JOB_RUNNING), ABI(JOB_DONE),
	ABI(TOTAL_STOP_PAGE), ABI(TOTAL_ERROR), ABI(TOTAL_FINISHED), ABI(TOTAL_FIELDS),
	ABI(GATE_HELPER), ABI(GATE_LOOP), ABI(GATE_CELLS),
	ABI_SIZE(fill_region), ABI_OFF(fill_region, offset), ABI_OFF(fill_region, size), ABI_OFF(fill_region, base),
	{NULL, 0},
};

// The table above, ended by a NULL name. Keys are the C names, "sizeof:<struct>" and
// "offsetof:<struct>.<field>", as in native/abi_dump.c.
const struct uffd_fill_abi_entry *uffd_fill_abi(void)
{
	return abi;
}

// --- installing a block -------------------------------------------------------------------------

struct fill {
	int uffd;
	uint8_t *states;
	const uint8_t *zero_map;
	uint64_t page;
	uint32_t *out;
	uint32_t *gate; // a helper's gate (see gate_enter), or NULL on the fault loop's own thread
};

// The gate orders a helper's installs against the fault loop's reading of events. Once the loop has
// read a REMOVE, the kernel lets the client's madvise go on and zap the range; a copy landing after
// that would refill removed memory with snapshot data. So a helper raises gate[GATE_HELPER] from
// checking a page's state until it is marked installed, and the loop raises gate[GATE_LOOP] while
// it reads and applies events. Each raises its own flag, then looks at the other's (both
// sequentially consistent: the store-then-load cannot be reordered), so the two never both go
// ahead. The helper yields to the loop; the loop waits at most one ioctl for the helper.

static void gate_enter(uint32_t *gate)
{
	for (;;) {
		__atomic_store_n(&gate[GATE_HELPER], 1, __ATOMIC_SEQ_CST);
		if (!__atomic_load_n(&gate[GATE_LOOP], __ATOMIC_SEQ_CST))
			return;
		__atomic_store_n(&gate[GATE_HELPER], 0, __ATOMIC_RELEASE);
		while (__atomic_load_n(&gate[GATE_LOOP], __ATOMIC_ACQUIRE))
			__builtin_ia32_pause();
	}
}

static void gate_leave(uint32_t *gate)
{
	__atomic_store_n(&gate[GATE_HELPER], 0, __ATOMIC_RELEASE);
}

static int is_zero(const uint8_t *map, uint64_t p)
{
	return map[p >> 3] & (1u << (p & 7));
}

static int missing(const uint8_t *states, uint64_t p)
{
	return __atomic_load_n(&states[p], __ATOMIC_RELAXED) == PAGE_MISSING;
}

// A page goes from missing to present once, counted by whoever moved it (the fault loop and a
// helper can both install it; the kernel lets only one copy in, the other gets EEXIST).
static void mark_present(struct fill *f, uint64_t first, uint64_t end)
{
	for (uint64_t p = first; p < end; p++) {
		uint8_t expected = PAGE_MISSING;
		if (__atomic_compare_exchange_n(&f->states[p], &expected, PAGE_PRESENT, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
			f->out[OUT_NEWLY_PRESENT]++;
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

// Installs the missing pages of a packed block given as `nruns` runs (RUN_WORDS int32 each: first
// image page, page count, payload page or RUN_ZERO) whose payload is at `payload`; run `first_run`
// (the faulting page's, or -1) first. `states` and `zero_map` cover `page_count` image pages:
// nothing past them is read or installed (a region may reach into the snapshot's padding). Zero
// runs grow over missing zero pages within their aligned window of `zero_window` pages. Returns 0
// or the errno that stopped it (see install).
static int fill_one(struct fill *f, uint64_t page_count, const struct fill_region *regions, uint32_t nregions,
		    const int32_t *runs, uint32_t nruns, uint64_t payload, int32_t first_run, uint64_t zero_window)
{
	uint8_t *states = f->states;
	const uint8_t *zero_map = f->zero_map;
	uint64_t page_size = f->page;
	const struct fill_region *r = NULL;
	if (first_run >= (int32_t)nruns)
		first_run = -1;
	if (zero_window == 0)
		zero_window = 1;
	for (int64_t k = first_run >= 0 ? -1 : 0; k < (int64_t)nruns; k++) {
		if (k >= 0 && k == first_run)
			continue;
		uint32_t i = k < 0 ? (uint32_t)first_run : (uint32_t)k;
		const int32_t *run = runs + (uint64_t)RUN_WORDS * i;
		uint64_t page = (uint64_t)run[RUN_PAGE], end = page + (uint64_t)run[RUN_COUNT];
		if (end > page_count)
			end = page_count;
		int32_t payload_page = run[RUN_PAYLOAD];
		for (uint64_t p = page; p < end;) {
			if (!missing(states, p)) {
				p++;
				continue;
			}
			// Decided and installed inside the gate (a helper only): see gate_enter.
			if (f->gate) {
				gate_enter(f->gate);
				if (!missing(states, p)) {
					gate_leave(f->gate);
					p++;
					continue;
				}
			}
			uint64_t offset = p * page_size;
			if (!r || offset < r->offset || offset - r->offset >= r->size) {
				r = NULL;
				for (uint32_t j = 0; j < nregions && !r; j++)
					if (offset >= regions[j].offset && offset - regions[j].offset < regions[j].size)
						r = &regions[j];
			}
			if (!r) { // not in the client's memory
				if (f->gate)
					gate_leave(f->gate);
				p++;
				continue;
			}
			uint64_t rfirst = r->offset / page_size, rend = rfirst + r->size / page_size;
			if (rend > page_count)
				rend = page_count;
			uint64_t q = p + 1;
			while (q < end && q < rend && missing(states, q))
				q++;
			int err;
			if (payload_page < 0) { // RUN_ZERO
				uint64_t wfirst = p - p % zero_window, wend = (q - 1) - (q - 1) % zero_window + zero_window;
				if (wfirst < rfirst)
					wfirst = rfirst;
				if (wend > rend)
					wend = rend;
				uint64_t from = p, to = q;
				while (from > wfirst && is_zero(zero_map, from - 1) && missing(states, from - 1))
					from--;
				while (to < wend && is_zero(zero_map, to) && missing(states, to))
					to++;
				err = install(f, r, from, to - from, 0);
			} else {
				err = install(f, r, p, q - p, payload + ((uint64_t)payload_page + (p - page)) * page_size);
			}
			if (f->gate)
				gate_leave(f->gate);
			if (err)
				return err;
			p = q;
		}
	}
	return 0;
}

int uffd_fill_block(int uffd, uint8_t *states, uint64_t page_count, const uint8_t *zero_map, uint64_t page_size,
		    const struct fill_region *regions, uint32_t nregions, const int32_t *runs,
		    uint32_t nruns, uint64_t payload, int32_t first_run, uint64_t zero_window, uint32_t *out)
{
	struct fill f = {.uffd = uffd, .states = states, .zero_map = zero_map, .page = page_size, .out = out};
	for (int i = 0; i < OUT_FIELDS; i++)
		out[i] = 0;
	return fill_one(&f, page_count, regions, nregions, runs, nruns, payload, first_run, zero_window);
}

// --- a helper thread ----------------------------------------------------------------------------

struct helper {
	pthread_t thread;
	int uffd;
	uint8_t *states;
	uint64_t page_count, page_size, zero_window;
	const uint8_t *zero_map;
	const struct fill_region *regions;
	uint32_t nregions, njobs;
	const uint64_t *jobs;
	uint32_t *job_state, *gate, *totals;
	int notify_fd;
	int stop;
};

static void *helper_main(void *arg)
{
	struct helper *hp = arg;
	for (uint32_t k = 0; k < hp->njobs && !__atomic_load_n(&hp->stop, __ATOMIC_RELAXED); k++) {
		const uint64_t *job = hp->jobs + (uint64_t)k * JOB_WORDS;
		__atomic_store_n(&hp->job_state[k], JOB_RUNNING, __ATOMIC_RELEASE);
		int err;
		for (;;) {
			uint32_t out[OUT_FIELDS] = {0};
			struct fill f = {.uffd = hp->uffd, .states = hp->states, .zero_map = hp->zero_map, .page = hp->page_size, .out = out, .gate = hp->gate};
			err = fill_one(&f, hp->page_count, hp->regions, hp->nregions, (const int32_t *)(uintptr_t)job[JOB_RUNS],
				       (uint32_t)job[JOB_NRUNS], job[JOB_PAYLOAD], -1, hp->zero_window);
			for (int i = 0; i < OUT_FIELDS; i++)
				if (i != TOTAL_STOP_PAGE)
					__atomic_fetch_add(&hp->totals[i], out[i], __ATOMIC_RELAXED);
			if (err == EAGAIN && !__atomic_load_n(&hp->stop, __ATOMIC_RELAXED)) {
				// Events are queued: the fault loop reads them; try this block again after.
				sched_yield();
				continue;
			}
			if (err && err != EAGAIN) {
				__atomic_store_n(&hp->totals[TOTAL_STOP_PAGE], out[OUT_STOP_PAGE], __ATOMIC_RELAXED);
				__atomic_store_n(&hp->totals[TOTAL_ERROR], (uint32_t)err, __ATOMIC_RELEASE);
				__atomic_store_n(&hp->stop, 1, __ATOMIC_RELAXED);
			}
			break;
		}
		if (!err)
			__atomic_store_n(&hp->job_state[k], JOB_DONE, __ATOMIC_RELEASE);
	}
	__atomic_store_n(&hp->totals[TOTAL_FINISHED], 1, __ATOMIC_RELEASE);
	// Wakes the fault loop's poll (an eventfd), so it collects the helper's work.
	if (hp->notify_fd >= 0) {
		uint64_t one = 1;
		(void)!write(hp->notify_fd, &one, sizeof one);
	}
	return NULL;
}

// Starts a helper thread that installs `njobs` packed blocks (`jobs`: JOB_WORDS uint64 each), in
// order, into one client, beside the caller, with the arguments of uffd_fill_block. The caller
// keeps every buffer alive and unchanged until uffd_helper_stop; `job_state` (uint32 per job),
// `gate` (GATE_CELLS uint32, zero) and `totals` (TOTAL_FIELDS uint32, zero) are shared with it: the
// caller reads job states and totals, and raises gate[GATE_LOOP] around reading events. When the
// helper stops it writes 1 to the eventfd `notify_fd` (if not -1). Returns a handle, or NULL if
// no thread could be started.
void *uffd_helper_start(int uffd, uint8_t *states, uint64_t page_count, const uint8_t *zero_map, uint64_t page_size,
			const struct fill_region *regions, uint32_t nregions, const uint64_t *jobs, uint32_t njobs,
			uint64_t zero_window, uint32_t *job_state, uint32_t *gate, uint32_t *totals, int notify_fd)
{
	struct helper *hp = calloc(1, sizeof *hp);
	if (!hp)
		return NULL;
	*hp = (struct helper){.uffd = uffd, .states = states, .page_count = page_count, .page_size = page_size,
			      .zero_window = zero_window ? zero_window : 1, .zero_map = zero_map, .regions = regions,
			      .nregions = nregions, .njobs = njobs, .jobs = jobs, .job_state = job_state, .gate = gate,
			      .totals = totals, .notify_fd = notify_fd};
	if (pthread_create(&hp->thread, NULL, helper_main, hp) != 0) {
		free(hp);
		return NULL;
	}
	return hp;
}

// Stops a helper after the block it is installing, waits for it and frees it. Returns the errno
// that had stopped it, or 0.
int uffd_helper_stop(void *handle)
{
	struct helper *hp = handle;
	__atomic_store_n(&hp->stop, 1, __ATOMIC_RELAXED);
	pthread_join(hp->thread, NULL);
	int err = (int)hp->totals[TOTAL_ERROR];
	free(hp);
	return err;
}
