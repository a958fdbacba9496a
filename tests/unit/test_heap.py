"""_sys/heap: a shared mapping's pages dropped keep their bytes; the mmap threshold fixed once."""

from __future__ import annotations

import mmap
import os

from djprobe._sys import heap


def _resident_kib(address: int) -> int:
    """Rss of the mapping that starts at ``address`` in /proc/self/smaps."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                found = int(head.split("-")[0], 16) == address
            elif found and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_release_shared_pages_keeps_the_bytes():
    fd = os.memfd_create("djprobe-heap-test")
    try:
        os.ftruncate(fd, 64 * 4096)
        m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        data = os.urandom(64 * 4096)
        m[:] = data
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert _resident_kib(address) >= 64 * 4
        assert heap.release_shared_pages(m)
        assert _resident_kib(address) == 0
        assert m[:] == data  # read back from the file
        assert os.pread(fd, len(data), 0) == data
        m.close()
        assert not heap.release_shared_pages(m)  # closed: refused, no exception
    finally:
        os.close(fd)


def test_mmap_threshold_fixed_once():
    first = heap.fix_mmap_threshold()
    assert heap.fix_mmap_threshold() is False  # already fixed (or not glibc, or set by the user)
    assert isinstance(first, bool)
