/*
 * Prints, as one JSON object, every kernel/libc ABI value that src/sys/ hand-types: struct sizes
 * and field offsets, ioctl numbers, feature bits, event codes, flags. test/sys-abi.test.ts runs
 * this and compares each value with the TypeScript constant of the same name, so a wrong
 * hand-typed constant (or a struct layout that differs from what the TS code pokes at) fails a
 * test instead of corrupting memory at run time.
 *
 * Keys are the C macro name where there is one, else "sizeof:<struct>" and
 * "offsetof:<struct>.<field path>".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kcmp.h>
#include <linux/mman.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

static int first = 1;

static void emit(const char *key, unsigned long long value)
{
	printf("%s\n  \"%s\": %llu", first ? "{" : ",", key, value);
	first = 0;
}

#define C(name) emit(#name, (unsigned long long)(name))
#define SIZE(type) emit("sizeof:" #type, sizeof(struct type))
#define OFF(type, field) emit("offsetof:" #type "." #field, offsetof(struct type, field))

int main(void)
{
	/* userfaultfd: creation */
	C(__NR_userfaultfd);
	C(UFFD_USER_MODE_ONLY);
	C(USERFAULTFD_IOC_NEW);
	C(O_CLOEXEC);
	C(O_NONBLOCK);

	/* userfaultfd: ioctl requests and their bit numbers in the `ioctls` masks */
	C(UFFD_API);
	C(UFFDIO_API);
	C(UFFDIO_REGISTER);
	C(UFFDIO_UNREGISTER);
	C(UFFDIO_WAKE);
	C(UFFDIO_COPY);
	C(UFFDIO_ZEROPAGE);
	C(_UFFDIO_REGISTER);
	C(_UFFDIO_UNREGISTER);
	C(_UFFDIO_WAKE);
	C(_UFFDIO_COPY);
	C(_UFFDIO_ZEROPAGE);
	C(_UFFDIO_WRITEPROTECT);
	C(_UFFDIO_CONTINUE);
	C(_UFFDIO_API);

	/* userfaultfd: features, modes, events, fault flags */
	C(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
	C(UFFD_FEATURE_EVENT_FORK);
	C(UFFD_FEATURE_EVENT_REMAP);
	C(UFFD_FEATURE_EVENT_REMOVE);
	C(UFFD_FEATURE_MISSING_HUGETLBFS);
	C(UFFD_FEATURE_MISSING_SHMEM);
	C(UFFD_FEATURE_EVENT_UNMAP);
	C(UFFD_FEATURE_SIGBUS);
	C(UFFD_FEATURE_THREAD_ID);
	C(UFFD_FEATURE_MINOR_HUGETLBFS);
	C(UFFD_FEATURE_MINOR_SHMEM);
	C(UFFD_FEATURE_EXACT_ADDRESS);
	C(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
	C(UFFDIO_REGISTER_MODE_MISSING);
	C(UFFDIO_REGISTER_MODE_WP);
	C(UFFDIO_REGISTER_MODE_MINOR);
	C(UFFDIO_COPY_MODE_DONTWAKE);
	C(UFFDIO_COPY_MODE_WP);
	C(UFFDIO_ZEROPAGE_MODE_DONTWAKE);
	C(UFFD_EVENT_PAGEFAULT);
	C(UFFD_EVENT_FORK);
	C(UFFD_EVENT_REMAP);
	C(UFFD_EVENT_REMOVE);
	C(UFFD_EVENT_UNMAP);
	C(UFFD_PAGEFAULT_FLAG_WRITE);
	C(UFFD_PAGEFAULT_FLAG_WP);
	C(UFFD_PAGEFAULT_FLAG_MINOR);

	/* userfaultfd: structs */
	SIZE(uffd_msg);
	OFF(uffd_msg, event);
	OFF(uffd_msg, arg.pagefault.flags);
	OFF(uffd_msg, arg.pagefault.address);
	OFF(uffd_msg, arg.pagefault.feat.ptid);
	OFF(uffd_msg, arg.fork.ufd);
	OFF(uffd_msg, arg.remap.from);
	OFF(uffd_msg, arg.remap.to);
	OFF(uffd_msg, arg.remap.len);
	OFF(uffd_msg, arg.remove.start);
	OFF(uffd_msg, arg.remove.end);
	SIZE(uffdio_api);
	OFF(uffdio_api, api);
	OFF(uffdio_api, features);
	OFF(uffdio_api, ioctls);
	SIZE(uffdio_range);
	OFF(uffdio_range, start);
	OFF(uffdio_range, len);
	SIZE(uffdio_register);
	OFF(uffdio_register, range.start);
	OFF(uffdio_register, range.len);
	OFF(uffdio_register, mode);
	OFF(uffdio_register, ioctls);
	SIZE(uffdio_copy);
	OFF(uffdio_copy, dst);
	OFF(uffdio_copy, src);
	OFF(uffdio_copy, len);
	OFF(uffdio_copy, mode);
	OFF(uffdio_copy, copy);
	SIZE(uffdio_zeropage);
	OFF(uffdio_zeropage, range.start);
	OFF(uffdio_zeropage, range.len);
	OFF(uffdio_zeropage, mode);
	OFF(uffdio_zeropage, zeropage);

	/* poll and eventfd */
	SIZE(pollfd);
	OFF(pollfd, fd);
	OFF(pollfd, events);
	OFF(pollfd, revents);
	C(POLLIN);
	C(POLLOUT);
	C(POLLERR);
	C(POLLHUP);
	C(POLLNVAL);
	C(EFD_CLOEXEC);
	C(EFD_NONBLOCK);

	/* memory */
	C(_SC_PAGESIZE);
	C(PROT_NONE);
	C(PROT_READ);
	C(PROT_WRITE);
	C(MAP_SHARED);
	C(MAP_PRIVATE);
	C(MAP_ANONYMOUS);
	C(MAP_NORESERVE);
	C(MAP_HUGETLB);
	C(MAP_HUGE_2MB);
	C(MADV_WILLNEED);
	C(MADV_DONTNEED);
	C(MADV_REMOVE);
	C(MADV_COLD);
	C(MADV_HUGEPAGE);
	C(MADV_NOHUGEPAGE);
	C(MADV_POPULATE_READ);
	C(MADV_POPULATE_WRITE);

	/* processes */
	C(__NR_pidfd_open);
	C(__NR_process_madvise);
	C(__NR_pidfd_send_signal);
	C(__NR_kcmp);
	C(KCMP_FILE);
	C(SIGKILL);

	/* files */
	C(SEEK_DATA);
	C(SEEK_HOLE);
	C(F_GETFL);
	C(F_SETFL);
	C(F_DUPFD_CLOEXEC);

	/* Unix sockets, SCM_RIGHTS, SO_PEERCRED (SO_PEERPIDFD, Linux 6.5, is newer than these
	 * headers: test/sys-socket.test.ts checks it against the kernel) */
	C(AF_UNIX);
	C(SOCK_STREAM);
	C(SOCK_CLOEXEC);
	C(SOCK_NONBLOCK);
	C(SOL_SOCKET);
	C(SO_PEERCRED);
	C(SCM_RIGHTS);
	C(MSG_CTRUNC);
	C(MSG_DONTWAIT);
	C(MSG_NOSIGNAL);
	C(MSG_CMSG_CLOEXEC);
	SIZE(sockaddr_un);
	OFF(sockaddr_un, sun_family);
	OFF(sockaddr_un, sun_path);
	SIZE(msghdr);
	OFF(msghdr, msg_name);
	OFF(msghdr, msg_namelen);
	OFF(msghdr, msg_iov);
	OFF(msghdr, msg_iovlen);
	OFF(msghdr, msg_control);
	OFF(msghdr, msg_controllen);
	OFF(msghdr, msg_flags);
	SIZE(iovec);
	OFF(iovec, iov_base);
	OFF(iovec, iov_len);
	SIZE(cmsghdr);
	OFF(cmsghdr, cmsg_len);
	OFF(cmsghdr, cmsg_level);
	OFF(cmsghdr, cmsg_type);
	emit("CMSG_LEN(0)", CMSG_LEN(0));
	emit("CMSG_ALIGN(1)", CMSG_ALIGN(1));
	SIZE(ucred);
	OFF(ucred, pid);
	OFF(ucred, uid);
	OFF(ucred, gid);

	printf("\n}\n");
	return 0;
}
