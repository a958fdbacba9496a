"""The tracer's own C heap: give the free pages inside it back to the system (glibc ``malloc_trim``).

Placing 20,000 probes frees a few MiB of large temporary objects (cache files read, symbol
sections, site plans) that glibc keeps inside its heap, resident, between blocks still in use;
``malloc_trim(0)`` returns those pages (``MADV_DONTNEED``), 5 MiB in the whole-process bench.

The tracer's views of the probe areas (shared mappings of memfds) become resident where it wrote
stubs and table entries (about 100 KiB per area, 2 MiB for 20,000 probes): ``MADV_DONTNEED`` on a
shared mapping drops only the tracer's page table entries, the bytes stay in the file (and in the
target); the tracer faults them in again when it next reads them (:func:`release_shared_pages`).
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["fix_mmap_threshold", "release_free_heap", "release_shared_pages"]

_trim = None
_mallopt = None
_M_MMAP_THRESHOLD = -3
_threshold_fixed = False


def _own_libc() -> ctypes.CDLL:
    """The C library this interpreter runs on, by its already-loaded symbols (not
    ``ctypes.util.find_library``, which runs ``ldconfig -p`` as a child process: a tracer that
    holds a command must have no other child)."""
    return ctypes.CDLL(None, use_errno=True)


def fix_mmap_threshold(size: int = 128 * 1024) -> bool:
    """Have glibc serve every allocation of ``size`` bytes or more with its own mapping, from now
    on in this process (``mallopt(M_MMAP_THRESHOLD)``). By default the threshold starts there but
    rises to the size of each such block freed (up to 32 MiB), after which large temporaries (a
    cache file's text, numpy columns, a resized dict or list) are carved from the heap and leave
    holes in it when freed: 3 MiB of a whole-process batch's RSS. Not done if the user set
    ``MALLOC_MMAP_THRESHOLD_``; False where the C library has no ``mallopt`` (not glibc)."""
    global _mallopt, _threshold_fixed
    if _threshold_fixed or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    if _mallopt is None:
        try:
            libc = _own_libc()
            _mallopt = libc.mallopt
            _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _mallopt.restype = ctypes.c_int
        except (OSError, AttributeError):
            _mallopt = False
    if not _mallopt:
        return False
    _threshold_fixed = bool(_mallopt(_M_MMAP_THRESHOLD, size))
    return _threshold_fixed


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system; False where the C library has no
    ``malloc_trim`` (not glibc) or nothing could be returned."""
    global _trim
    if _trim is None:
        try:
            libc = _own_libc()
            _trim = libc.malloc_trim
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    if not _trim:
        return False
    return bool(_trim(0))


def release_shared_pages(mapping: mmap.mmap) -> bool:
    """Drop the tracer's resident pages of a *shared* mapping (their contents stay in the file it
    maps: read again on the next access); False if the kernel refused."""
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # ValueError: already closed
        return False
    return True
