/*
 * kvm_vmm: a minimal KVM VMM that exercises userfaultfd page-fault handlers the
 * way Firecracker does, with a guest that does real, checkable work over its RAM.
 *
 *   kvm_vmm run --mem-mib N --snapshot-dir DIR [--pause-at K] [--timeout-ms T]
 *   kvm_vmm restore --snapshot-dir DIR --uffd-socket PATH [--fc-version 1.12]
 *                   [--regions 1|2] [--timeout-ms T]
 *   kvm_vmm restore --snapshot-dir DIR --eager [--regions 1|2] [--timeout-ms T]
 *
 * The guest is 64-bit user-mode (CPL3) code only. On this platform /dev/kvm is PVM
 * (software virtualization, shadow paging): CPL3 guest code runs natively on the
 * CPU, while real/protected/kernel-mode guest code is emulated instruction by
 * instruction. So the vCPU starts directly in long mode at CPL3 and never leaves
 * it; it talks to the VMM only through MMIO writes (port I/O from CPL3 does not
 * work under PVM), i.e. stores to a guest-physical address that no memslot
 * covers, which KVM turns into KVM_EXIT_MMIO.
 *
 * Guest program:
 *   phase 1  fills the working area with an xorshift64 sequence, leaving a hole
 *            (never written, so zero pages in the image) at the end of every
 *            fill stride, then reports PHASE1_DONE;
 *   phase 2  reads every 8-byte word of the working area in order and folds it
 *            into a 64-bit FNV-1a hash; when it reaches the pause point (the
 *            start of phase 2 plus --pause-at MiB) it reports SNAPSHOT; at the
 *            end it reports CHECKSUM.
 * `run` snapshots at the SNAPSHOT report (vCPU state to DIR/vcpu.bin, RAM to
 * DIR/mem.raw), lets the guest finish, and checks the guest's checksum against
 * one the VMM computes itself. `restore` resumes a fresh VM from the snapshot,
 * so the guest finishes phase 2 there; every page it touches must come from
 * the uffd handler (or from mem.raw with --eager). The checksums must agree.
 *
 * Guest-physical memory layout (all identity-mapped with 2 MiB pages):
 *   0x1000          GDT (and the TSS right after it)
 *   0x2000          PML4          0x3000  PDPT
 *   0x4000..        page directories, one per GiB mapped
 *   0x20000         guest code (one page)
 *   2 MiB ..        working area, up to 1 MiB before the end of RAM
 *   end-1MiB..end   never touched (trailing zero pages)
 *   mem_size        MMIO window: one 2 MiB page right after RAM, in no memslot
 *
 * DIR/mem.raw is raw guest-physical memory [0, mem_size), zero pages included,
 * like a Firecracker full-snapshot memory file.
 *
 * DIR/vcpu.bin (native little-endian x86-64 layout):
 *   header (struct vcpu_file_header, 80 bytes): magic "UFFDVCPU", version 1,
 *     section count, mem_size, the working-area layout, the pause offset and
 *     the checksum the completed guest must report;
 *   then sections, each { u32 tag; u32 size; u8 payload[size] }, in the order
 *   restore must apply them: CPUID (struct kvm_cpuid2 + entries), SREGS, MSRS
 *   (struct kvm_msrs + entries), REGS, XCRS (if KVM_CAP_XCRS), then XSAVE (if
 *   KVM_CAP_XSAVE) or else FPU. Payloads are the KVM ioctl structs verbatim.
 *
 * Output: one JSON line on stdout. Both commands print the layout fields
 * work_offset, work_size, fill_stride, fill_len (bytes written at the start of
 * each stride), mmio_gpa and pause_offset, plus mem_mib and:
 *   run:     checksum; guest_ns (guest time from the snapshot point to the
 *            checksum, the span a restore re-runs); phase1_ns; to_pause_ns;
 *            snapshot_ns (writing vcpu.bin + mem.raw); snapshot_dir.
 *   restore: mode ("uffd" or "eager"); checksum; guest_ns (resume to checksum,
 *            including every wait for the handler); setup_ns (VM creation,
 *            handshake or eager read, vCPU state); faults_hint (uffd mode:
 *            pages the handler installed, see resident_pages(); 0 when eager);
 *            resident_pages; regions.
 * Errors: a message on stderr, a JSON line {"ok":false,"error":...} on stdout,
 * exit 1 (2 for usage errors, 3 with "timeout":true when --timeout-ms expires).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/kvm.h>
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
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define KIB 1024ULL
#define MIB (1024ULL * KIB)
#define PAGE_SIZE 4096ULL
#define LARGE_PAGE (2 * MIB)

/* ---- guest-physical layout (see the header comment) ---- */
#define GDT_GPA 0x1000ULL
#define TSS_GPA 0x1080ULL
#define PML4_GPA 0x2000ULL
#define PDPT_GPA 0x3000ULL
#define PD_GPA 0x4000ULL
#define CODE_GPA 0x20000ULL
#define MAX_PDS ((CODE_GPA - PD_GPA) / PAGE_SIZE)
#define WORK_GPA (2 * MIB)
#define TAIL_UNTOUCHED (1 * MIB)
#define FILL_STRIDE (1 * MIB)
#define FILL_HOLE (128 * KIB) /* last 128 KiB of every stride stays zero */
#define MIN_MEM_MIB 16
#define MAX_MEM_MIB 16384
_Static_assert((MAX_MEM_MIB * MIB / LARGE_PAGE + 1 + 511) / 512 <= MAX_PDS,
	       "the page directories for the largest guest would overlap the guest code");

/* MMIO "registers" at offsets from the MMIO window (guest writes 8 bytes). */
#define MMIO_PHASE1_DONE 0
#define MMIO_SNAPSHOT 8
#define MMIO_CHECKSUM 16

#define XORSHIFT_SEED 0x9E3779B97F4A7C15ULL
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

/*
 * The guest program, assembled by hand. Register contract, set by `run`:
 *   rax = xorshift state (seed)        rbx = MMIO window GPA
 *   r11 = pause point (GPA in the working area where phase 2 reports SNAPSHOT)
 *   r12 = working area start           r13 = working area end
 *   r14 = fill stride                  r15 = bytes filled per stride
 * All addresses are guest-virtual = guest-physical (identity map). The program
 * uses no stack and takes no exceptions (there is nothing to deliver them to).
 */
static const uint8_t guest_code[] = {
	/* ---- phase 1: fill ---- */
	0x4c, 0x89, 0xe7,             /*  0: mov rdi, r12       ; rdi = start of current stride  */
	0x4a, 0x8d, 0x34, 0x3f,       /*  3: lea rsi, [rdi+r15] ; rsi = end of its filled part    */
	0x48, 0x89, 0xc2,             /*  7: mov rdx, rax       ; xorshift64 step:                */
	0x48, 0xc1, 0xe2, 0x0d,       /* 10: shl rdx, 13        ;   x ^= x << 13                  */
	0x48, 0x31, 0xd0,             /* 14: xor rax, rdx                                         */
	0x48, 0x89, 0xc2,             /* 17: mov rdx, rax                                         */
	0x48, 0xc1, 0xea, 0x07,       /* 20: shr rdx, 7         ;   x ^= x >> 7                   */
	0x48, 0x31, 0xd0,             /* 24: xor rax, rdx                                         */
	0x48, 0x89, 0xc2,             /* 27: mov rdx, rax                                         */
	0x48, 0xc1, 0xe2, 0x11,       /* 30: shl rdx, 17        ;   x ^= x << 17                  */
	0x48, 0x31, 0xd0,             /* 34: xor rax, rdx                                         */
	0x48, 0x89, 0x07,             /* 37: mov [rdi], rax     ; store the word                  */
	0x48, 0x83, 0xc7, 0x08,       /* 40: add rdi, 8                                           */
	0x48, 0x39, 0xf7,             /* 44: cmp rdi, rsi                                         */
	0x72, 0xd6,                   /* 47: jb 7               ; until the filled part is done   */
	0x4c, 0x29, 0xff,             /* 49: sub rdi, r15       ; back to the stride start...     */
	0x4c, 0x01, 0xf7,             /* 52: add rdi, r14       ; ...and skip to the next stride  */
	0x4c, 0x39, 0xef,             /* 55: cmp rdi, r13                                         */
	0x72, 0xc7,                   /* 58: jb 3               ; until the working area is done  */
	0x48, 0x89, 0x3b,             /* 60: mov [rbx], rdi     ; MMIO PHASE1_DONE (value = end)  */
	/* ---- phase 2: checksum ---- */
	0x4c, 0x89, 0xe7,             /* 63: mov rdi, r12       ; rdi = read cursor               */
	0x48, 0xb8,                   /* 66: movabs rax, FNV_OFFSET ; rax = hash                  */
	0x25, 0x23, 0x22, 0x84, 0xe4, 0x9c, 0xf2, 0xcb,
	0x48, 0xb9,                   /* 76: movabs rcx, FNV_PRIME                                */
	0xb3, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
	0x4c, 0x39, 0xdf,             /* 86: cmp rdi, r11       ; at the pause point?             */
	0x75, 0x04,                   /* 89: jne 95                                               */
	0x48, 0x89, 0x7b, 0x08,       /* 91: mov [rbx+8], rdi   ; MMIO SNAPSHOT (value = cursor)  */
	0x48, 0x33, 0x07,             /* 95: xor rax, [rdi]     ; FNV-1a over 64-bit words:       */
	0x48, 0x0f, 0xaf, 0xc1,       /* 98: imul rax, rcx      ;   h = (h ^ w) * prime           */
	0x48, 0x83, 0xc7, 0x08,       /* 102: add rdi, 8                                          */
	0x4c, 0x39, 0xef,             /* 106: cmp rdi, r13                                        */
	0x72, 0xe7,                   /* 109: jb 86             ; until the working area is done  */
	0x48, 0x89, 0x43, 0x10,       /* 111: mov [rbx+16], rax ; MMIO CHECKSUM (value = hash)    */
	0xeb, 0xfe,                   /* 115: jmp 115           ; done; the VMM never resumes us  */
};

/* ---- snapshot file ---- */
#define VCPU_MAGIC "UFFDVCPU"
#define VCPU_VERSION 1

struct vcpu_file_header {
	char magic[8];
	uint32_t version;
	uint32_t nsections;
	uint64_t mem_size;          /* bytes of guest RAM = size of mem.raw */
	uint64_t work_offset;       /* working area, as guest-physical offset and size */
	uint64_t work_size;
	uint64_t fill_stride;       /* phase 1 writes fill_len bytes of every fill_stride */
	uint64_t fill_len;
	uint64_t mmio_gpa;
	uint64_t pause_offset;      /* bytes of the working area hashed before the snapshot */
	uint64_t expected_checksum; /* what phase 2 must report */
};
_Static_assert(sizeof(struct vcpu_file_header) == 80, "vcpu.bin header layout");

struct section_header {
	uint32_t tag;
	uint32_t size;
};

enum section_tag {
	SEC_CPUID = 1,
	SEC_SREGS = 2,
	SEC_MSRS = 3,
	SEC_REGS = 4,
	SEC_XCRS = 5,
	SEC_XSAVE = 6,
	SEC_FPU = 7,
};

/*
 * MSRs that belong to the vCPU's architectural state, saved when KVM reports
 * them in KVM_GET_MSR_INDEX_LIST. A CPL3-only guest does not depend on most of
 * them, but a snapshot of "the vCPU" should carry them all.
 */
static const uint32_t snapshot_msrs[] = {
	0x00000010, /* IA32_TSC: the guest's TSC continues from the snapshot value */
	0x00000277, /* IA32_PAT: memory types selected by page-table PAT/PCD/PWT bits */
	0x00000174, /* IA32_SYSENTER_CS  \                                          */
	0x00000175, /* IA32_SYSENTER_ESP  > SYSENTER entry point                    */
	0x00000176, /* IA32_SYSENTER_EIP /                                          */
	0xc0000081, /* STAR: SYSCALL/SYSRET segment selectors                       */
	0xc0000082, /* LSTAR: 64-bit SYSCALL entry point                            */
	0xc0000083, /* CSTAR: compat-mode SYSCALL entry point                       */
	0xc0000084, /* SFMASK: RFLAGS bits SYSCALL clears                           */
	0xc0000102, /* KERNEL_GS_BASE: the GS base SWAPGS swaps in                  */
	0xc0000103, /* TSC_AUX: the value RDTSCP/RDPID return                       */
};
#define NSNAPSHOT_MSRS (sizeof(snapshot_msrs) / sizeof(snapshot_msrs[0]))

/* ---- errors, output ---- */

static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static void fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void fail(int code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "kvm_vmm: %s\n", msg);
	fputs("{\"ok\":false,\"error\":", stdout);
	json_string(stdout, msg);
	fputs(code == 3 ? ",\"timeout\":true}\n" : "}\n", stdout);
	fflush(stdout);
	_exit(code);
}

#define die(...) fail(1, __VA_ARGS__)
#define usage_error(...) fail(2, __VA_ARGS__)
/* `what` names the ioctl or syscall that failed. */
#define die_errno(what) die("%s failed: %s", (what), strerror(errno))

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- watchdog: a stuck guest (e.g. a handler that never serves) must not hang us ---- */

/* What the main thread is doing, for the timeout message. */
static _Atomic(const char *) g_stage = "starting";
static uint64_t g_timeout_ms;

static void *watchdog(void *arg)
{
	struct timespec ts = {
		.tv_sec = (time_t)(g_timeout_ms / 1000),
		.tv_nsec = (long)(g_timeout_ms % 1000) * 1000000L,
	};

	(void)arg;
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
	/*
	 * _exit() from this thread ends the whole process, including a vCPU thread
	 * blocked in the kernel on a missing page (handle_userfault sleeps killably).
	 */
	fail(3, "timed out after %llu ms while %s", (unsigned long long)g_timeout_ms, atomic_load(&g_stage));
}

static void start_watchdog(void)
{
	pthread_t t;
	int err;

	if (!g_timeout_ms)
		return;
	err = pthread_create(&t, NULL, watchdog, NULL);
	if (err)
		die("pthread_create (watchdog) failed: %s", strerror(err));
	pthread_detach(t);
}

/* ---- small file helpers ---- */

static void write_all(int fd, const void *buf, size_t len, const char *path)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write %s: %s", path, strerror(errno));
		}
		p += n;
		len -= (size_t)n;
	}
}

static void pread_all(int fd, void *buf, size_t len, uint64_t off, const char *path)
{
	char *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("read %s: %s", path, strerror(errno));
		}
		if (n == 0)
			die("read %s: unexpected end of file at offset %llu", path, (unsigned long long)off);
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
}

static int open_in_dir(const char *dir, const char *name, int flags, char *path, size_t pathlen)
{
	int fd;

	if ((size_t)snprintf(path, pathlen, "%s/%s", dir, name) >= pathlen)
		die("path too long: %s/%s", dir, name);
	fd = open(path, flags | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	return fd;
}

/* ---- KVM plumbing ---- */

struct vm {
	int kvm, vm, vcpu;
	struct kvm_run *run;
};

static void kvm_ioctl(int fd, unsigned long req, void *arg, const char *name)
{
	if (ioctl(fd, req, arg) < 0)
		die_errno(name);
}

static void vm_create(struct vm *v)
{
	int version, mmap_size;

	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0) {
		if (errno == ENOENT)
			die("no /dev/kvm: KVM is not available on this machine");
		die("open /dev/kvm: %s%s", strerror(errno),
		    errno == EACCES ? " (needs root or membership of the kvm group)" : "");
	}
	version = ioctl(v->kvm, KVM_GET_API_VERSION, 0);
	if (version != KVM_API_VERSION)
		die("KVM_GET_API_VERSION returned %d, expected %d", version, KVM_API_VERSION);
	/* Needed to complete a pending MMIO exit before reading state (see snapshot). */
	if (ioctl(v->kvm, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) <= 0)
		die("KVM lacks KVM_CAP_IMMEDIATE_EXIT");

	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		die_errno("KVM_CREATE_VM");
	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die_errno("KVM_CREATE_VCPU");
	mmap_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(struct kvm_run))
		die_errno("KVM_GET_VCPU_MMAP_SIZE");
	v->run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap of the vCPU's kvm_run area failed: %s", strerror(errno));
}

static void vm_add_memslot(struct vm *v, uint32_t slot, uint64_t gpa, uint64_t size, void *host)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uint64_t)(uintptr_t)host,
	};

	kvm_ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
}

static struct kvm_cpuid2 *supported_cpuid(struct vm *v, uint32_t *size)
{
	for (uint32_t n = 64;; n *= 2) {
		*size = (uint32_t)(sizeof(struct kvm_cpuid2) + n * sizeof(struct kvm_cpuid_entry2));
		struct kvm_cpuid2 *c = calloc(1, *size);
		if (!c)
			die("out of memory");
		c->nent = n;
		if (ioctl(v->kvm, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			*size = (uint32_t)(sizeof(struct kvm_cpuid2) + c->nent * sizeof(struct kvm_cpuid_entry2));
			return c;
		}
		free(c);
		if (errno != E2BIG || n >= 4096)
			die_errno("KVM_GET_SUPPORTED_CPUID");
	}
}

static const char *exit_reason_name(uint32_t r)
{
	switch (r) {
	case KVM_EXIT_UNKNOWN: return "UNKNOWN";
	case KVM_EXIT_EXCEPTION: return "EXCEPTION";
	case KVM_EXIT_IO: return "IO (port I/O; use MMIO, CPL3 port I/O does not work under PVM)";
	case KVM_EXIT_HLT: return "HLT";
	case KVM_EXIT_MMIO: return "MMIO";
	case KVM_EXIT_SHUTDOWN: return "SHUTDOWN (triple fault: the guest took an exception it cannot handle)";
	case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
	default: return "other";
	}
}

static void die_unexpected_exit(struct vm *v)
{
	struct kvm_run *r = v->run;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	char detail[256] = "";

	if (ioctl(v->vcpu, KVM_GET_REGS, &regs) < 0 || ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("unexpected guest exit %u (%s); reading registers failed: %s",
		    r->exit_reason, exit_reason_name(r->exit_reason), strerror(errno));
	switch (r->exit_reason) {
	case KVM_EXIT_MMIO:
		snprintf(detail, sizeof(detail), " %s of %u bytes at GPA 0x%llx", r->mmio.is_write ? "write" : "read",
			 r->mmio.len, (unsigned long long)r->mmio.phys_addr);
		break;
	case KVM_EXIT_EXCEPTION:
		snprintf(detail, sizeof(detail), " vector %u error code 0x%x", r->ex.exception, r->ex.error_code);
		break;
	case KVM_EXIT_FAIL_ENTRY:
		snprintf(detail, sizeof(detail), " hardware reason 0x%llx",
			 (unsigned long long)r->fail_entry.hardware_entry_failure_reason);
		break;
	case KVM_EXIT_INTERNAL_ERROR:
		snprintf(detail, sizeof(detail), " suberror %u", r->internal.suberror);
		break;
	}
	die("unexpected guest exit %u (%s)%s at RIP 0x%llx (CR2 0x%llx)", r->exit_reason,
	    exit_reason_name(r->exit_reason), detail, (unsigned long long)regs.rip, (unsigned long long)sregs.cr2);
}

/*
 * Run the vCPU until the guest writes one of our MMIO registers; return the
 * register's offset in the MMIO window and the value written.
 */
static uint64_t run_until_mmio(struct vm *v, uint64_t mmio_gpa, uint64_t *value)
{
	struct kvm_run *r = v->run;

	for (;;) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die_errno("KVM_RUN");
		}
		if (r->exit_reason == KVM_EXIT_MMIO && r->mmio.is_write && r->mmio.len == 8 &&
		    r->mmio.phys_addr >= mmio_gpa && r->mmio.phys_addr <= mmio_gpa + MMIO_CHECKSUM) {
			memcpy(value, r->mmio.data, 8);
			return r->mmio.phys_addr - mmio_gpa;
		}
		die_unexpected_exit(v);
	}
}

static void expect_mmio(struct vm *v, uint64_t mmio_gpa, uint64_t reg, uint64_t *value, const char *what)
{
	uint64_t got = run_until_mmio(v, mmio_gpa, value);

	if (got != reg)
		die("guest reported MMIO register +%llu while %s (expected +%llu)", (unsigned long long)got, what,
		    (unsigned long long)reg);
}

/* ---- guest setup for `run` ---- */

struct layout {
	uint64_t mem_size, work_offset, work_size, fill_stride, fill_len, mmio_gpa, pause_offset;
};

static struct layout make_layout(uint64_t mem_mib, uint64_t pause_mib)
{
	struct layout l = {
		.mem_size = mem_mib * MIB,
		.work_offset = WORK_GPA,
		.fill_stride = FILL_STRIDE,
		.fill_len = FILL_STRIDE - FILL_HOLE,
		.mmio_gpa = mem_mib * MIB,
		.pause_offset = pause_mib * MIB,
	};

	l.work_size = l.mem_size - WORK_GPA - TAIL_UNTOUCHED;
	if (l.pause_offset >= l.work_size)
		usage_error("--pause-at %llu MiB is not inside the %llu MiB working area", (unsigned long long)pause_mib,
			    (unsigned long long)(l.work_size / MIB));
	return l;
}

/*
 * Identity-map [0, mem_size + 2 MiB) (RAM plus the MMIO window) with 2 MiB
 * pages. Every level has U/S=1: the guest runs at CPL3, and a user-mode access
 * needs U/S set in all four levels of the walk. A/D are preset so the MMU never
 * has to write them back (under shadow paging that write is KVM's work).
 */
static void build_page_tables(uint8_t *mem, uint64_t mem_size)
{
	const uint64_t P = 1, RW = 2, US = 4, A = 0x20, D = 0x40, PS = 0x80;
	uint64_t *pml4 = (uint64_t *)(mem + PML4_GPA);
	uint64_t *pdpt = (uint64_t *)(mem + PDPT_GPA);
	uint64_t *pd = (uint64_t *)(mem + PD_GPA); /* the directories are contiguous */
	uint64_t large_pages = mem_size / LARGE_PAGE + 1;
	uint64_t npds = (large_pages + 511) / 512;

	pml4[0] = PDPT_GPA | P | RW | US | A;
	for (uint64_t i = 0; i < npds; i++)
		pdpt[i] = (PD_GPA + i * PAGE_SIZE) | P | RW | US | A;
	for (uint64_t i = 0; i < large_pages; i++)
		pd[i] = (i * LARGE_PAGE) | P | RW | US | A | D | PS;
}

/*
 * A GDT whose descriptors match the hidden segment state we load through
 * KVM_SET_SREGS. The CPU only reads the GDT when a selector is loaded (our
 * guest never does), but hardware-assisted KVM checks the state for
 * consistency and the emulator may consult it, so keep it truthful.
 * Selectors follow Linux's x86-64 layout: PVM runs guest user mode on the
 * host's own __USER_CS/__USER_DS, which are 0x33 (index 6, 64-bit code) and
 * 0x2b (index 5, data); the TSS is at 0x40.
 */
static void build_gdt(uint8_t *mem)
{
	uint64_t *gdt = (uint64_t *)(mem + GDT_GPA);
	uint8_t *tss = mem + TSS_GPA;

	gdt[5] = 0x00cff3000000ffffULL; /* data: P, DPL3, S, type 3 (RW, accessed), G, D/B, limit 4 GiB */
	gdt[6] = 0x00affb000000ffffULL; /* code: P, DPL3, S, type 0xb (exec/read, accessed), G, L (64-bit) */
	/* 64-bit TSS descriptor (16 bytes): limit 0x67, base TSS_GPA, P, type 0xb (busy). */
	gdt[8] = 0x67 | ((TSS_GPA & 0xffffff) << 16) | (0x8bULL << 40) | (((TSS_GPA >> 24) & 0xff) << 56);
	gdt[9] = TSS_GPA >> 32;
	/* The TSS itself stays zero except the I/O map base, which points past the
	 * limit: no I/O permission bitmap. Its RSP0 is never used (no ring change). */
	tss[102] = 104;
}

#define GDT_LIMIT (10 * 8 - 1)

static void set_initial_sregs(struct vm *v)
{
	struct kvm_sregs s;
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x33,
		.type = 0xb, /* execute/read, accessed */
		.present = 1, .dpl = 3, .db = 0 /* must be 0 when L=1 */, .s = 1, .l = 1 /* 64-bit */, .g = 1,
	};
	struct kvm_segment data = {
		.base = 0, .limit = 0xffffffff, .selector = 0x2b,
		.type = 0x3, /* read/write, accessed */
		.present = 1, .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1,
	};

	kvm_ioctl(v->vcpu, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
	/* CPL is CS.DPL = 3. Under PVM, the first CS load of a new vCPU also switches
	 * it from its initial supervisor mode to user mode. */
	s.cs = code;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.tr = (struct kvm_segment){ .base = TSS_GPA, .limit = 0x67, .selector = 0x40,
				     .type = 0xb /* 64-bit TSS, busy */, .present = 1 };
	s.ldt = (struct kvm_segment){ .selector = 0, .type = 0x2, .unusable = 1 }; /* PVM has no LDT */
	s.gdt.base = GDT_GPA;
	s.gdt.limit = GDT_LIMIT;
	s.idt.base = 0;
	/* No IDT (nor, under PVM, an event entry MSR): any guest exception ends in
	 * a triple fault, KVM_EXIT_SHUTDOWN, which run_until_mmio reports with RIP. */
	s.idt.limit = 0;

	/*
	 * Long mode needs protected mode (CR0.PE), paging (CR0.PG), PAE page
	 * tables (CR4.PAE) and EFER.LME; EFER.LMA reports it active and KVM
	 * requires it to be consistent with the rest. CR0.NE selects native x87
	 * error reporting and CR0.ET is hardwired on modern CPUs; CR0.MP with
	 * CR4.OSFXSR/OSXMMEXCPT is the usual setup that lets SSE instructions run
	 * and report SIMD exceptions natively. CR0.WP makes read-only pages read-only
	 * for supervisor code too (irrelevant at CPL3, standard for any OS).
	 */
	s.cr0 = (1ULL << 0) /* PE */ | (1ULL << 1) /* MP */ | (1ULL << 4) /* ET */ | (1ULL << 5) /* NE */ |
		(1ULL << 16) /* WP */ | (1ULL << 31) /* PG */;
	s.cr3 = PML4_GPA;
	s.cr4 = (1ULL << 5) /* PAE */ | (1ULL << 9) /* OSFXSR */ | (1ULL << 10) /* OSXMMEXCPT */;
	s.efer = (1ULL << 8) /* LME */ | (1ULL << 10) /* LMA */;
	kvm_ioctl(v->vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS");
}

static void set_initial_regs(struct vm *v, const struct layout *l)
{
	struct kvm_regs r = {
		.rip = CODE_GPA,
		/* Bit 1 is reserved and always 1. IF=1 as for any user-mode code (PVM
		 * treats user mode as interruptible anyway); we inject no interrupts. */
		.rflags = 0x202,
		.rax = XORSHIFT_SEED,
		.rbx = l->mmio_gpa,
		.r11 = l->work_offset + l->pause_offset,
		.r12 = l->work_offset,
		.r13 = l->work_offset + l->work_size,
		.r14 = l->fill_stride,
		.r15 = l->fill_len,
	};

	kvm_ioctl(v->vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS");
}

/* The same hash phase 2 computes, over the VMM's view of guest RAM. */
static uint64_t checksum_working_area(const uint8_t *mem, const struct layout *l)
{
	const uint64_t *w = (const uint64_t *)(mem + l->work_offset);
	uint64_t h = FNV_OFFSET;

	for (uint64_t i = 0; i < l->work_size / 8; i++)
		h = (h ^ w[i]) * FNV_PRIME;
	return h;
}

/* ---- vcpu.bin ---- */

struct buf {
	uint8_t *data;
	size_t len, cap;
};

static void buf_append(struct buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		b->cap = (b->len + n) * 2;
		b->data = realloc(b->data, b->cap);
		if (!b->data)
			die("out of memory");
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static void add_section(struct buf *b, uint32_t *nsections, uint32_t tag, const void *p, size_t n)
{
	struct section_header h = { .tag = tag, .size = (uint32_t)n };

	buf_append(b, &h, sizeof(h));
	buf_append(b, p, n);
	(*nsections)++;
}

static size_t msrs_size(uint32_t n)
{
	return sizeof(struct kvm_msrs) + n * sizeof(struct kvm_msr_entry);
}

/* The subset of snapshot_msrs KVM supports here, with their current values. */
static struct kvm_msrs *read_msrs(struct vm *v)
{
	struct kvm_msr_list *list;
	struct kvm_msrs *m = calloc(1, msrs_size(NSNAPSHOT_MSRS));
	struct kvm_msr_list probe = { .nmsrs = 0 };
	int got;

	/* First call learns the count (fails with E2BIG), second fetches the list. */
	if (ioctl(v->kvm, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
		die_errno("KVM_GET_MSR_INDEX_LIST");
	list = calloc(1, sizeof(*list) + probe.nmsrs * sizeof(uint32_t));
	if (!list || !m)
		die("out of memory");
	list->nmsrs = probe.nmsrs;
	kvm_ioctl(v->kvm, KVM_GET_MSR_INDEX_LIST, list, "KVM_GET_MSR_INDEX_LIST");
	for (size_t i = 0; i < NSNAPSHOT_MSRS; i++)
		for (uint32_t j = 0; j < list->nmsrs; j++)
			if (list->indices[j] == snapshot_msrs[i])
				m->entries[m->nmsrs++].index = snapshot_msrs[i];
	free(list);

	got = ioctl(v->vcpu, KVM_GET_MSRS, m);
	if (got < 0)
		die_errno("KVM_GET_MSRS");
	if ((uint32_t)got != m->nmsrs)
		die("KVM_GET_MSRS read %d of %u MSRs; MSR 0x%x failed", got, m->nmsrs, m->entries[got].index);
	return m;
}

/*
 * An MMIO write exit is not complete until the vCPU re-enters KVM_RUN: KVM may
 * hold state for it that KVM_GET_* does not expose. Re-entering with
 * immediate_exit set completes it and returns -EINTR without running any
 * guest instruction, so the state read afterwards is consistent (the same
 * thing QEMU does before migrating a vCPU).
 */
static void complete_pending_exit(struct vm *v)
{
	v->run->immediate_exit = 1;
	if (ioctl(v->vcpu, KVM_RUN, 0) == 0 || errno != EINTR)
		die("KVM_RUN with immediate_exit did not return EINTR: %s", strerror(errno));
	v->run->immediate_exit = 0;
}

static void save_snapshot(struct vm *v, const char *dir, const uint8_t *mem, const struct layout *l,
			  const struct kvm_cpuid2 *cpuid, uint32_t cpuid_size, uint64_t expected)
{
	struct vcpu_file_header h = {
		.magic = VCPU_MAGIC,
		.version = VCPU_VERSION,
		.mem_size = l->mem_size,
		.work_offset = l->work_offset,
		.work_size = l->work_size,
		.fill_stride = l->fill_stride,
		.fill_len = l->fill_len,
		.mmio_gpa = l->mmio_gpa,
		.pause_offset = l->pause_offset,
		.expected_checksum = expected,
	};
	struct buf body = { 0 };
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_msrs *msrs;
	char path[4096];
	int fd;

	complete_pending_exit(v);

	add_section(&body, &h.nsections, SEC_CPUID, cpuid, cpuid_size);
	kvm_ioctl(v->vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	add_section(&body, &h.nsections, SEC_SREGS, &sregs, sizeof(sregs));
	msrs = read_msrs(v);
	add_section(&body, &h.nsections, SEC_MSRS, msrs, msrs_size(msrs->nmsrs));
	free(msrs);
	kvm_ioctl(v->vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
	add_section(&body, &h.nsections, SEC_REGS, &regs, sizeof(regs));
	if (ioctl(v->kvm, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0) {
		struct kvm_xcrs xcrs;
		kvm_ioctl(v->vcpu, KVM_GET_XCRS, &xcrs, "KVM_GET_XCRS");
		add_section(&body, &h.nsections, SEC_XCRS, &xcrs, sizeof(xcrs));
	}
	/* XSAVE covers x87, SSE and every extended state the CPU has; legacy FPU
	 * state (x87 + SSE only) is the fallback where KVM lacks XSAVE support. */
	if (ioctl(v->kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0) {
		struct kvm_xsave xsave;
		kvm_ioctl(v->vcpu, KVM_GET_XSAVE, &xsave, "KVM_GET_XSAVE");
		add_section(&body, &h.nsections, SEC_XSAVE, &xsave, sizeof(xsave));
	} else {
		struct kvm_fpu fpu;
		kvm_ioctl(v->vcpu, KVM_GET_FPU, &fpu, "KVM_GET_FPU");
		add_section(&body, &h.nsections, SEC_FPU, &fpu, sizeof(fpu));
	}

	fd = open_in_dir(dir, "vcpu.bin", O_WRONLY | O_CREAT | O_TRUNC, path, sizeof(path));
	write_all(fd, &h, sizeof(h), path);
	write_all(fd, body.data, body.len, path);
	if (close(fd) < 0)
		die("close %s: %s", path, strerror(errno));
	free(body.data);

	fd = open_in_dir(dir, "mem.raw", O_WRONLY | O_CREAT | O_TRUNC, path, sizeof(path));
	write_all(fd, mem, l->mem_size, path);
	if (close(fd) < 0)
		die("close %s: %s", path, strerror(errno));
}

struct vcpu_file {
	struct vcpu_file_header h;
	uint8_t *body; /* the sections */
	size_t body_len;
};

/* Read vcpu.bin and validate its header; sections are checked as they are applied. */
static struct vcpu_file load_vcpu_file(const char *dir)
{
	struct vcpu_file f;
	struct vcpu_file_header *h = &f.h;
	char path[4096];
	struct stat st;
	int fd = open_in_dir(dir, "vcpu.bin", O_RDONLY, path, sizeof(path));

	if (fstat(fd, &st) < 0)
		die("stat %s: %s", path, strerror(errno));
	if ((uint64_t)st.st_size < sizeof(*h) || st.st_size > (off_t)(16 * MIB))
		die("%s: implausible size %lld", path, (long long)st.st_size);
	pread_all(fd, h, sizeof(*h), 0, path);
	if (memcmp(h->magic, VCPU_MAGIC, 8) != 0 || h->version != VCPU_VERSION)
		die("%s: not a version %d vcpu.bin (bad magic or version)", path, VCPU_VERSION);
	if (h->mem_size % LARGE_PAGE || h->mem_size < MIN_MEM_MIB * MIB || h->mem_size > MAX_MEM_MIB * MIB ||
	    h->work_offset % 8 || h->work_size % 8 || h->work_offset + h->work_size > h->mem_size ||
	    h->pause_offset >= h->work_size || h->mmio_gpa != h->mem_size)
		die("%s: inconsistent memory layout in header", path);
	f.body_len = (size_t)st.st_size - sizeof(*h);
	f.body = malloc(f.body_len);
	if (!f.body)
		die("out of memory");
	pread_all(fd, f.body, f.body_len, sizeof(*h), path);
	close(fd);
	return f;
}

/* Apply the sections to the vCPU in file order, which is the order KVM needs. */
static void apply_vcpu_sections(struct vm *v, const struct vcpu_file *f)
{
	const char *path = "vcpu.bin";
	size_t off = 0;

	for (uint32_t i = 0; i < f->h.nsections; i++) {
		struct section_header sh;
		void *p;

		if (sizeof(sh) > f->body_len - off)
			die("%s: truncated section header %u", path, i);
		memcpy(&sh, f->body + off, sizeof(sh));
		off += sizeof(sh);
		if (sh.size > f->body_len - off)
			die("%s: section %u (tag %u) runs past the end of the file", path, i, sh.tag);
		p = f->body + off;
		off += sh.size;

		switch (sh.tag) {
		case SEC_CPUID: {
			struct kvm_cpuid2 *c = p;
			if (sh.size < sizeof(*c) ||
			    sh.size != sizeof(*c) + (uint64_t)c->nent * sizeof(struct kvm_cpuid_entry2))
				die("%s: bad CPUID section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_CPUID2, c, "KVM_SET_CPUID2");
			break;
		}
		case SEC_SREGS:
			if (sh.size != sizeof(struct kvm_sregs))
				die("%s: bad SREGS section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_SREGS, p, "KVM_SET_SREGS");
			break;
		case SEC_MSRS: {
			struct kvm_msrs *m = p;
			int set;
			if (sh.size < sizeof(*m) || sh.size != msrs_size(m->nmsrs))
				die("%s: bad MSRS section size", path);
			set = ioctl(v->vcpu, KVM_SET_MSRS, m);
			if (set < 0)
				die_errno("KVM_SET_MSRS");
			if ((uint32_t)set != m->nmsrs)
				die("KVM_SET_MSRS wrote %d of %u MSRs; MSR 0x%x failed", set, m->nmsrs,
				    m->entries[set].index);
			break;
		}
		case SEC_REGS:
			if (sh.size != sizeof(struct kvm_regs))
				die("%s: bad REGS section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_REGS, p, "KVM_SET_REGS");
			break;
		case SEC_XCRS:
			if (sh.size != sizeof(struct kvm_xcrs))
				die("%s: bad XCRS section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_XCRS, p, "KVM_SET_XCRS");
			break;
		case SEC_XSAVE:
			if (sh.size != sizeof(struct kvm_xsave))
				die("%s: bad XSAVE section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_XSAVE, p, "KVM_SET_XSAVE");
			break;
		case SEC_FPU:
			if (sh.size != sizeof(struct kvm_fpu))
				die("%s: bad FPU section size", path);
			kvm_ioctl(v->vcpu, KVM_SET_FPU, p, "KVM_SET_FPU");
			break;
		default:
			die("%s: unknown section tag %u", path, sh.tag);
		}
	}
}

/* ---- memory ---- */

static void *map_ram(uint64_t size)
{
	/*
	 * Private anonymous memory, not populated: pages appear on first touch
	 * (or, once registered with a uffd, when the handler installs them).
	 * MAP_NORESERVE: guest RAM is sparse until used, don't charge it up front.
	 */
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		die("mmap of %llu MiB guest RAM failed: %s", (unsigned long long)(size / MIB), strerror(errno));
	return p;
}

struct region {
	uint8_t *host;
	uint64_t gpa, size; /* gpa doubles as the offset in mem.raw: the file is contiguous */
};

/*
 * Pages of guest RAM present in the VMM's mappings. After a uffd restore these
 * are exactly the pages the handler installed (the VMM itself never touches
 * guest RAM), so it equals the number of faults for a handler that copies one
 * 4 KiB page per fault and bounds it from above otherwise. (Per-thread fault
 * counters do not see KVM's get_user_pages faults, so they cannot be used.)
 */
static uint64_t resident_pages(const struct region *r, int n)
{
	uint64_t count = 0;

	for (int i = 0; i < n; i++) {
		size_t pages = (size_t)(r[i].size / PAGE_SIZE);
		unsigned char *vec = malloc(pages);
		if (!vec)
			die("out of memory");
		if (mincore(r[i].host, r[i].size, vec) < 0)
			die_errno("mincore");
		for (size_t j = 0; j < pages; j++)
			count += vec[j] & 1;
		free(vec);
	}
	return count;
}

/* ---- userfaultfd and the Firecracker handshake ---- */

/*
 * Create the uffd the way Firecracker does: non-blocking and close-on-exec,
 * *without* UFFD_USER_MODE_ONLY, because KVM touches guest memory from kernel
 * mode (walking guest page tables, get_user_pages for shadow PTEs) and those
 * faults must reach the handler too. UFFD_FEATURE_EVENT_REMOVE is what
 * Firecracker requests (the handler learns about madvise(DONTNEED)).
 */
static int create_uffd(const struct region *r, int n)
{
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE };
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (uffd < 0)
		die("userfaultfd syscall failed: %s%s", strerror(errno),
		    errno == EPERM ? " (kernel-mode faults need root/CAP_SYS_PTRACE)" : "");
	kvm_ioctl(uffd, UFFDIO_API, &api, "UFFDIO_API");
	for (int i = 0; i < n; i++) {
		struct uffdio_register reg = {
			.range = { .start = (uint64_t)(uintptr_t)r[i].host, .len = r[i].size },
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		kvm_ioctl(uffd, UFFDIO_REGISTER, &reg, "UFFDIO_REGISTER");
	}
	return uffd;
}

struct fc_version {
	unsigned major, minor;
};

static bool fc_at_least(struct fc_version v, unsigned major, unsigned minor)
{
	return v.major > major || (v.major == major && v.minor >= minor);
}

/*
 * One sendmsg: the JSON region array as payload, the uffd as SCM_RIGHTS.
 * Field set by Firecracker version: page_size_kib (in bytes, despite the name)
 * since 1.7, page_size since 1.12. Returns the connected socket.
 */
static int send_handshake(const char *sock_path, const struct region *r, int n, int uffd, struct fc_version v)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	char json[1024];
	size_t len = 0;
	int sock;

	len += (size_t)snprintf(json + len, sizeof(json) - len, "[");
	for (int i = 0; i < n; i++) {
		len += (size_t)snprintf(json + len, sizeof(json) - len,
					"%s{\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":%llu", i ? "," : "",
					(unsigned long long)(uintptr_t)r[i].host, (unsigned long long)r[i].size,
					(unsigned long long)r[i].gpa);
		if (fc_at_least(v, 1, 12))
			len += (size_t)snprintf(json + len, sizeof(json) - len, ",\"page_size\":%llu", PAGE_SIZE);
		if (fc_at_least(v, 1, 7))
			len += (size_t)snprintf(json + len, sizeof(json) - len, ",\"page_size_kib\":%llu", PAGE_SIZE);
		len += (size_t)snprintf(json + len, sizeof(json) - len, "}");
	}
	len += (size_t)snprintf(json + len, sizeof(json) - len, "]");

	if (strlen(sock_path) >= sizeof(addr.sun_path))
		die("uffd socket path too long (max %zu bytes): %s", sizeof(addr.sun_path) - 1, sock_path);
	strcpy(addr.sun_path, sock_path);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die_errno("socket(AF_UNIX)");
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("connect to uffd socket %s: %s (is the handler listening?)", sock_path, strerror(errno));

	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctrl = { 0 };
	struct iovec iov = { .iov_base = json, .iov_len = len };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl.buf, .msg_controllen = sizeof(ctrl.buf),
	};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
	ssize_t sent;
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent < 0)
		die("sendmsg of the handshake to %s: %s", sock_path, strerror(errno));
	if ((size_t)sent != len)
		die("sendmsg of the handshake sent %zd of %zu bytes", sent, len);
	return sock;
}

/* ---- commands ---- */

struct options {
	const char *cmd;
	const char *snapshot_dir;
	const char *uffd_socket;
	uint64_t mem_mib;
	uint64_t pause_mib;
	struct fc_version fc;
	int regions;
	bool eager;
};

static void print_layout(const struct layout *l)
{
	printf("\"work_offset\":%llu,\"work_size\":%llu,\"fill_stride\":%llu,\"fill_len\":%llu,"
	       "\"mmio_gpa\":%llu,\"pause_offset\":%llu",
	       (unsigned long long)l->work_offset, (unsigned long long)l->work_size,
	       (unsigned long long)l->fill_stride, (unsigned long long)l->fill_len,
	       (unsigned long long)l->mmio_gpa, (unsigned long long)l->pause_offset);
}

static int cmd_run(const struct options *o)
{
	struct layout l = make_layout(o->mem_mib, o->pause_mib);
	struct vm v;
	struct kvm_cpuid2 *cpuid;
	uint32_t cpuid_size;
	uint64_t value, expected, t0, t1, t2, t3, t4;
	uint8_t *mem;

	if (mkdir(o->snapshot_dir, 0755) < 0 && errno != EEXIST)
		die("mkdir %s: %s", o->snapshot_dir, strerror(errno));

	g_stage = "setting up the VM";
	vm_create(&v);
	mem = map_ram(l.mem_size);
	build_gdt(mem);
	build_page_tables(mem, l.mem_size);
	memcpy(mem + CODE_GPA, guest_code, sizeof(guest_code));
	vm_add_memslot(&v, 0, 0, l.mem_size, mem);
	/* Give the vCPU the host's supported CPUID (the same set travels in vcpu.bin). */
	cpuid = supported_cpuid(&v, &cpuid_size);
	kvm_ioctl(v.vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	set_initial_sregs(&v);
	set_initial_regs(&v, &l);

	g_stage = "running guest phase 1 (fill)";
	t0 = now_ns();
	expect_mmio(&v, l.mmio_gpa, MMIO_PHASE1_DONE, &value, "filling memory (phase 1)");
	t1 = now_ns();
	if (value != l.work_offset + l.work_size)
		die("guest phase 1 stopped at 0x%llx, expected 0x%llx", (unsigned long long)value,
		    (unsigned long long)(l.work_offset + l.work_size));
	g_stage = "running guest phase 2 up to the pause point";
	expect_mmio(&v, l.mmio_gpa, MMIO_SNAPSHOT, &value, "hashing memory up to the pause point");
	t2 = now_ns();

	g_stage = "writing the snapshot";
	expected = checksum_working_area(mem, &l);
	save_snapshot(&v, o->snapshot_dir, mem, &l, cpuid, cpuid_size, expected);
	t3 = now_ns();

	g_stage = "running guest phase 2 (checksum)";
	expect_mmio(&v, l.mmio_gpa, MMIO_CHECKSUM, &value, "hashing memory (phase 2)");
	t4 = now_ns();
	if (value != expected)
		die("guest checksum 0x%016llx differs from the VMM's 0x%016llx", (unsigned long long)value,
		    (unsigned long long)expected);

	printf("{\"ok\":true,\"phase\":\"run\",\"checksum\":\"0x%016llx\",\"guest_ns\":%llu,\"phase1_ns\":%llu,"
	       "\"to_pause_ns\":%llu,\"snapshot_ns\":%llu,\"mem_mib\":%llu,",
	       (unsigned long long)value, (unsigned long long)(t4 - t3), (unsigned long long)(t1 - t0),
	       (unsigned long long)(t2 - t1), (unsigned long long)(t3 - t2), (unsigned long long)o->mem_mib);
	print_layout(&l);
	printf(",\"snapshot_dir\":");
	json_string(stdout, o->snapshot_dir);
	printf("}\n");
	return 0;
}

static int cmd_restore(const struct options *o)
{
	struct vm v;
	struct region r[2];
	struct vcpu_file f;
	struct layout l;
	struct stat st;
	char path[4096];
	uint64_t t0 = now_ns(), t1, t2, value, resident;
	int nreg = o->regions, mem_fd, sock = -1;

	g_stage = "setting up the VM";
	f = load_vcpu_file(o->snapshot_dir);
	l = (struct layout){ .mem_size = f.h.mem_size, .work_offset = f.h.work_offset, .work_size = f.h.work_size,
			     .fill_stride = f.h.fill_stride, .fill_len = f.h.fill_len, .mmio_gpa = f.h.mmio_gpa,
			     .pause_offset = f.h.pause_offset };
	mem_fd = open_in_dir(o->snapshot_dir, "mem.raw", O_RDONLY, path, sizeof(path));
	if (fstat(mem_fd, &st) < 0)
		die("stat %s: %s", path, strerror(errno));
	if ((uint64_t)st.st_size != l.mem_size)
		die("%s is %lld bytes, vcpu.bin says guest RAM is %llu", path, (long long)st.st_size,
		    (unsigned long long)l.mem_size);
	vm_create(&v);

	/*
	 * One region, or two separately mapped halves (split on a 2 MiB boundary so
	 * no guest large page straddles them) registered as two memslots, so the
	 * handshake carries two entries whose host addresses are not contiguous.
	 */
	r[0].gpa = 0;
	r[0].size = nreg == 2 ? (l.mem_size / 2) & ~(LARGE_PAGE - 1) : l.mem_size;
	r[1].gpa = r[0].size;
	r[1].size = l.mem_size - r[0].size;
	for (int i = 0; i < nreg; i++) {
		r[i].host = map_ram(r[i].size);
		vm_add_memslot(&v, (uint32_t)i, r[i].gpa, r[i].size, r[i].host);
	}

	if (o->eager) {
		g_stage = "reading mem.raw";
		for (int i = 0; i < nreg; i++)
			pread_all(mem_fd, r[i].host, r[i].size, r[i].gpa, path);
	} else {
		g_stage = "handing the uffd to the handler";
		int uffd = create_uffd(r, nreg);
		sock = send_handshake(o->uffd_socket, r, nreg, uffd, o->fc);
		/* Firecracker before 1.12 dropped its end after the send; later versions keep it. */
		if (!fc_at_least(o->fc, 1, 12)) {
			close(sock);
			sock = -1;
		}
	}
	close(mem_fd);

	/* Restoring registers touches no guest memory, so doing it after the handshake
	 * (as Firecracker does) cannot block on the handler. */
	g_stage = "restoring vCPU state";
	apply_vcpu_sections(&v, &f);
	free(f.body);

	g_stage = o->eager ? "running the restored guest"
			   : "running the restored guest (its page faults wait for the uffd handler)";
	t1 = now_ns();
	expect_mmio(&v, l.mmio_gpa, MMIO_CHECKSUM, &value, "finishing phase 2 after restore");
	t2 = now_ns();
	if (value != f.h.expected_checksum)
		die("checksum mismatch after restore: guest computed 0x%016llx, snapshot expects 0x%016llx "
		    "(guest memory or vCPU state restored wrongly)",
		    (unsigned long long)value, (unsigned long long)f.h.expected_checksum);

	resident = resident_pages(r, nreg);
	printf("{\"ok\":true,\"phase\":\"restore\",\"mode\":\"%s\",\"checksum\":\"0x%016llx\",\"guest_ns\":%llu,"
	       "\"setup_ns\":%llu,\"faults_hint\":%llu,\"resident_pages\":%llu,\"regions\":%d,\"mem_mib\":%llu,",
	       o->eager ? "eager" : "uffd", (unsigned long long)value, (unsigned long long)(t2 - t1),
	       (unsigned long long)(t1 - t0), (unsigned long long)(o->eager ? 0 : resident),
	       (unsigned long long)resident, nreg, (unsigned long long)(l.mem_size / MIB));
	print_layout(&l);
	printf("}\n");
	if (sock >= 0)
		close(sock);
	return 0;
}

/* ---- argument parsing ---- */

static const char usage_text[] =
	"usage:\n"
	"  kvm_vmm run --mem-mib N --snapshot-dir DIR [--pause-at K] [--timeout-ms T]\n"
	"  kvm_vmm restore --snapshot-dir DIR --uffd-socket PATH [--fc-version X.Y] [--regions 1|2] [--timeout-ms T]\n"
	"  kvm_vmm restore --snapshot-dir DIR --eager [--regions 1|2] [--timeout-ms T]\n"
	"run: boot a CPL3 guest with N MiB RAM, snapshot it K MiB into its checksum pass\n"
	"     (default 0) to DIR/vcpu.bin + DIR/mem.raw, let it finish, print its checksum.\n"
	"restore: resume the snapshot in a fresh VM, RAM served by the Firecracker-style\n"
	"     uffd handler listening on PATH (or read from mem.raw with --eager).\n";

static uint64_t parse_u64(const char *flag, const char *s, uint64_t min, uint64_t max)
{
	char *end;
	unsigned long long n;

	errno = 0;
	n = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || n < min || n > max)
		usage_error("%s must be an integer in [%llu, %llu], got \"%s\"", flag, (unsigned long long)min,
			    (unsigned long long)max, s);
	return n;
}

static struct options parse_args(int argc, char **argv)
{
	enum { O_MEM = 1, O_DIR, O_PAUSE, O_SOCK, O_FC, O_REGIONS, O_EAGER, O_TIMEOUT, O_HELP };
	static const struct option longopts[] = {
		{ "mem-mib", required_argument, NULL, O_MEM },
		{ "snapshot-dir", required_argument, NULL, O_DIR },
		{ "pause-at", required_argument, NULL, O_PAUSE },
		{ "uffd-socket", required_argument, NULL, O_SOCK },
		{ "fc-version", required_argument, NULL, O_FC },
		{ "regions", required_argument, NULL, O_REGIONS },
		{ "eager", no_argument, NULL, O_EAGER },
		{ "timeout-ms", required_argument, NULL, O_TIMEOUT },
		{ "help", no_argument, NULL, O_HELP },
		{ 0 },
	};
	struct options o = { .fc = { 1, 12 }, .regions = 1 };
	bool run, restore;
	int c;

	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		fputs(usage_text, argc < 2 ? stderr : stdout);
		exit(argc < 2 ? 2 : 0);
	}
	o.cmd = argv[1];
	run = !strcmp(o.cmd, "run");
	restore = !strcmp(o.cmd, "restore");
	if (!run && !restore)
		usage_error("unknown command \"%s\" (expected run or restore)", o.cmd);

	opterr = 0;
	optind = 2;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case O_MEM:
			o.mem_mib = parse_u64("--mem-mib", optarg, MIN_MEM_MIB, MAX_MEM_MIB);
			if (o.mem_mib % 2)
				usage_error("--mem-mib must be even (guest RAM is mapped with 2 MiB pages)");
			break;
		case O_DIR: o.snapshot_dir = optarg; break;
		case O_PAUSE: o.pause_mib = parse_u64("--pause-at", optarg, 0, MAX_MEM_MIB); break;
		case O_SOCK: o.uffd_socket = optarg; break;
		case O_FC: {
			int end = 0;
			if (sscanf(optarg, "%u.%u%n", &o.fc.major, &o.fc.minor, &end) != 2 || optarg[end] ||
			    o.fc.major < 1)
				usage_error("--fc-version must look like 1.12, got \"%s\"", optarg);
			break;
		}
		case O_REGIONS: o.regions = (int)parse_u64("--regions", optarg, 1, 2); break;
		case O_EAGER: o.eager = true; break;
		case O_TIMEOUT: g_timeout_ms = parse_u64("--timeout-ms", optarg, 1, 24ULL * 3600 * 1000); break;
		case O_HELP: fputs(usage_text, stdout); exit(0);
		default: usage_error("unknown or incomplete option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind < argc)
		usage_error("unexpected argument \"%s\"", argv[optind]);
	if (!o.snapshot_dir)
		usage_error("%s needs --snapshot-dir", o.cmd);
	if (run && !o.mem_mib)
		usage_error("run needs --mem-mib");
	if (run && (o.uffd_socket || o.eager || o.regions != 1))
		usage_error("--uffd-socket, --eager and --regions belong to restore");
	if (restore && (o.mem_mib || o.pause_mib))
		usage_error("--mem-mib and --pause-at belong to run (restore reads them from the snapshot)");
	if (restore && !o.eager == !o.uffd_socket)
		usage_error("restore needs exactly one of --uffd-socket PATH or --eager");
	return o;
}

int main(int argc, char **argv)
{
	struct options o = parse_args(argc, argv);

	start_watchdog();
	return !strcmp(o.cmd, "run") ? cmd_run(&o) : cmd_restore(&o);
}
