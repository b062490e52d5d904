// libuffd_preread: reads a snapshot file into the page cache ahead of its faults (`uffd resume
// --preread auto`), paced so that the faults' own reads do not queue behind it.
//
// posix_fadvise(WILLNEED) of a whole file submits reads of all of it before it returns: on a
// fresh host the device's queue then holds the whole snapshot, and the first fault's read of one
// chunk waits behind it (measured: a first fault 200-330 ms against 60-90 ms without the
// preread). Here one step is asked for at a time, and the next only once the step before it has
// been read (a read of its last byte returns when the page is in: it waits on the page's I/O),
// so at most two steps are queued ahead of any read a fault makes.
//
// Called once per file on a libuv thread (koffi's .async): the loop runs there, whatever the
// handler's main thread is doing, and stops between steps when *stop is set.
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

// Bytes of [0, size) of `fd` asked into the page cache (all of it unless stopped), or -errno
// (a failed posix_fadvise; a failed read of a step's last byte ends the loop with what was asked).
int64_t uffd_preread_paced(int fd, int64_t size, int64_t step, const volatile int32_t *stop)
{
	if (size < 0 || step <= 0)
		return -EINVAL;
	int64_t asked = 0;
	for (int64_t offset = 0; offset < size; offset += step) {
		if (__atomic_load_n(stop, __ATOMIC_ACQUIRE))
			break;
		int64_t length = size - offset < step ? size - offset : step;
		int error = posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED);
		if (error)
			return -error;
		asked += length;
		// Wait for the step before this one (this one's reads are queued behind it).
		if (offset > 0) {
			char byte;
			if (pread(fd, &byte, 1, offset - 1) < 0 && errno != EINTR)
				break;
		}
	}
	return asked;
}
