"""Raw ``perf_event_open`` through ctypes, for tracepoint events (tracefs uprobes). No policy.

What is here: the attribute structure (``perf_event_attr``, packed by hand: ctypes bitfields of
64-bit words are not portable), opening an event, the ioctls used, reading a counter, and a
reader of an mmap'ed perf ring that yields raw records. Which events to open, on which threads
and CPUs, is the caller's business (``traps.py``).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterator

SYS_PERF_EVENT_OPEN = 298  # x86-64
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_DUMMY = 9

# sample_type bits
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_REGS_USER = 1 << 12
PERF_SAMPLE_STACK_USER = 1 << 13
PERF_SAMPLE_IDENTIFIER = 1 << 16

# attr flag bits (the 64-bit word after read_format)
FLAG_DISABLED = 1 << 0
FLAG_INHERIT = 1 << 1
FLAG_EXCLUDE_KERNEL = 1 << 5
FLAG_EXCLUDE_HV = 1 << 6
FLAG_WATERMARK = 1 << 14
FLAG_USE_CLOCKID = 1 << 25
FLAG_INHERIT_THREAD = 1 << 35
FLAG_REMOVE_ON_EXEC = 1 << 36

# ioctls: _IO('$', n) and _IOW('$', 5, __u64)
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_ID = 0x80082407
PERF_EVENT_IOC_SET_OUTPUT = 0x2405

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9

CLOCK_MONOTONIC = 1
ATTR_SIZE = 136  # PERF_ATTR_SIZE_VER8

#: perf's x86 register numbers (``PERF_REG_X86_*``), the order of a REGS_USER sample.
PERF_REGS = {
    "rax": 0, "rbx": 1, "rcx": 2, "rdx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7, "rip": 8,
    "rflags": 9, "r8": 16, "r9": 17, "r10": 18, "r11": 19, "r12": 20, "r13": 21, "r14": 22, "r15": 23,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

@dataclass
class Attr:
    """The fields of ``perf_event_attr`` this project sets."""

    type: int
    config: int = 0
    sample_period: int = 0
    sample_type: int = 0
    flags: int = 0
    wakeup: int = 0
    config1: int = 0
    config2: int = 0
    sample_regs_user: int = 0
    sample_stack_user: int = 0  # bytes of the user stack from the stack pointer (PERF_SAMPLE_STACK_USER)
    clockid: int = 0

    def pack(self) -> bytes:
        head = struct.pack(
            "<IIQQQQQIIQQQQIi",
            self.type, ATTR_SIZE, self.config, self.sample_period, self.sample_type, 0, self.flags,
            self.wakeup, 0, self.config1, self.config2, 0, self.sample_regs_user, self.sample_stack_user, self.clockid,
        )
        return head + bytes(ATTR_SIZE - len(head))


def ring_owner_attr() -> Attr:
    """A dummy software event that only owns a CPU's ring (others write into it through
    ``set_output``), with the clock the sampling events use."""
    return Attr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_DUMMY, flags=FLAG_USE_CLOCKID, clockid=CLOCK_MONOTONIC)


def online_cpus() -> list[int]:
    """The online CPUs (``/sys/devices/system/cpu/online``: ``0-3,6``)."""
    try:
        text = open("/sys/devices/system/cpu/online").read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


def perf_event_open(attr: Attr, pid: int, cpu: int, group_fd: int = -1, flags: int = PERF_FLAG_FD_CLOEXEC) -> int:
    """Open an event; returns its fd. Raises OSError with the kernel's errno."""
    buf = ctypes.create_string_buffer(attr.pack(), ATTR_SIZE)
    fd = _libc.syscall(SYS_PERF_EVENT_OPEN, buf, ctypes.c_int(pid), ctypes.c_int(cpu), ctypes.c_int(group_fd), ctypes.c_ulong(flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open: {os.strerror(err) if err != 524 else 'operation not supported (ENOTSUPP)'}")
    return int(fd)


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    result = _libc.ioctl(fd, request, ctypes.c_void_p(arg))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def event_id(fd: int) -> int:
    """The kernel's id of the event (as a sample's IDENTIFIER field carries it)."""
    out = ctypes.c_uint64()
    ioctl(fd, PERF_EVENT_IOC_ID, ctypes.addressof(out))
    return out.value


def set_output(fd: int, output_fd: int) -> None:
    """Send the samples of ``fd`` to the ring of ``output_fd`` (same CPU)."""
    ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, output_fd)


def read_count(fd: int) -> int:
    """The counter of an event (with ``inherit``: its inherited children's counts added)."""
    data = os.read(fd, 8)
    if len(data) != 8:
        raise OSError(_errno.EIO, f"perf counter read returned {len(data)} bytes")
    return struct.unpack("<Q", data)[0]


# struct perf_event_mmap_page: data_head at 1024, data_tail at 1032, data_offset, data_size.
_DATA_HEAD = 1024
_DATA_TAIL = 1032


class Ring:
    """An mmap'ed perf ring of one event: ``records()`` yields (type, misc, body) and frees them."""

    def __init__(self, fd: int, data_pages: int) -> None:
        if data_pages <= 0 or data_pages & (data_pages - 1):
            raise ValueError(f"ring data pages must be a power of two, not {data_pages}")
        self.page = mmap.PAGESIZE
        self.size = data_pages * self.page
        self.map = mmap.mmap(fd, self.page + self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self.map)

    def records(self) -> Iterator[tuple[int, int, bytes]]:
        head = struct.unpack_from("<Q", self.map, _DATA_HEAD)[0]
        tail = struct.unpack_from("<Q", self.map, _DATA_TAIL)[0]
        base, size = self.page, self.size
        while tail < head:
            off = tail % size
            header = self._read(base, size, off, 8)
            rtype, misc, rsize = struct.unpack("<IHH", header)
            if rsize < 8:
                break  # torn: never expected; stop rather than loop
            body = self._read(base, size, (off + 8) % size, rsize - 8)
            tail += rsize
            yield rtype, misc, body
        struct.pack_into("<Q", self.map, _DATA_TAIL, tail)

    def _read(self, base: int, size: int, off: int, n: int) -> bytes:
        end = off + n
        if end <= size:
            return bytes(self._view[base + off : base + end])
        return bytes(self._view[base + off : base + size]) + bytes(self._view[base : base + end - size])

    def close(self) -> None:
        self._view.release()
        self.map.close()
