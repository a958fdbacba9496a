"""Stub memory near probe sites: place probe areas in the target and hand out their slots.

A region is one probe area (see :mod:`djprobe.area`) mapped in the target at an address within
rel32 reach (±2 GiB) of the sites it serves: an anonymous read+execute code part and a shared
read-write data part that the tracer maps too. The data part is a file created by the tracer
(``O_EXCL``, mode 0600, owned by the target's user), opened and mapped by the target through
injected syscalls, and unlinked as soon as both sides have it mapped.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .area import AreaHeader, AreaLayout, AreaView, InstanceEntry
from .errors import DjprobeError, NoRoomError, RemoteSyscallError
from .stubs import RecordTargets

if TYPE_CHECKING:
    from ._sys.procfs import MapEntry
    from .process import Process

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x01, 0x02, 0x20, 0x100000
O_RDWR, O_CLOEXEC = 0o2, 0o2000000

REACH = (1 << 31) - (1 << 24)  # rel32 reach, with a 16 MiB margin for the region's own size
MIN_ADDRESS = 0x10000
MAX_ADDRESS = 0x7FFFFFFFF000
ALIGN = 0x10000
SHM_DIR = "/dev/shm"


def _user_of(pid: int) -> tuple[int, int]:
    uid = gid = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def find_gap_near(maps: list["MapEntry"], site: int, size: int) -> list[int]:
    """Candidate start addresses for ``size`` bytes of free address space, closest to ``site``
    first, every byte of which lies within rel32 reach of ``site``."""
    spans = sorted((m.start, m.end) for m in maps)
    gaps = []
    prev_end = MIN_ADDRESS
    for start, end in spans:
        if start > prev_end:
            gaps.append((prev_end, start))
        prev_end = max(prev_end, end)
    if prev_end < MAX_ADDRESS:
        gaps.append((prev_end, MAX_ADDRESS))
    candidates = []
    for lo, hi in gaps:
        lo_aligned = (lo + ALIGN - 1) & ~(ALIGN - 1)
        hi_aligned = (hi - size) & ~(ALIGN - 1)
        if hi_aligned < lo_aligned:
            continue
        # The place in [lo_aligned, hi_aligned] closest to the site.
        if site < lo_aligned:
            start = lo_aligned
        elif site > hi_aligned:
            start = hi_aligned
        else:
            start = site & ~(ALIGN - 1)
            start = max(lo_aligned, min(start, hi_aligned))
        if abs(start - site) <= REACH and abs(start + size - site) <= REACH:
            candidates.append(start)
    candidates.sort(key=lambda a: abs(a + size // 2 - site))
    return candidates


@dataclass
class Region:
    """One probe area mapped in the target."""

    layout: AreaLayout
    code_address: int
    data_address: int
    view: AreaView
    _mmap: mmap.mmap
    free_slots: list[int] = field(default_factory=list)
    mapped_in_target: bool = True
    rings_populated: bool = False

    @property
    def start(self) -> int:
        return self.code_address

    @property
    def end(self) -> int:
        return self.data_address + self.layout.data_size

    def reaches(self, site: int) -> bool:
        return abs(self.start - site) <= REACH and abs(self.end - site) <= REACH

    def slot_address(self, index: int) -> int:
        return self.layout.slot_address(self.code_address, index)

    def counter_address(self, index: int) -> int:
        return self.layout.counter_address(self.data_address, index)

    def record_targets(self, index: int, tid_offset: int | None = None) -> RecordTargets:
        """Where the record stub of slot ``index`` writes."""
        lay = self.layout
        return RecordTargets(
            counter=self.counter_address(index),
            drops=self.data_address + lay.drops_offset + 8 * index,
            ring_headers=self.data_address + lay.rings_offset,
            records=self.data_address + lay.records_offset,
            instance=index,
            tid_offset=tid_offset,
        )

    def contains_code(self, address: int) -> bool:
        return self.code_address <= address < self.code_address + self.layout.code_size

    def take_slot(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def give_back(self, index: int) -> None:
        self.view.set_entry(index, InstanceEntry())
        self.view.reset_count(index)
        self.free_slots.append(index)

    def close_tracer_side(self) -> None:
        """Drop the tracer's mapping of the data part (the target keeps its own)."""
        try:
            self.view.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass


def create_region(process: "Process", site: int, layout: AreaLayout | None = None) -> Region:
    """Map a new probe area in the (stopped) target within reach of ``site``.

    Raises NoRoomError if no free address range within ±2 GiB of the site can take it.
    """
    layout = layout or AreaLayout()
    candidates = find_gap_near(process.maps(), site, layout.total_size)
    if not candidates:
        raise NoRoomError(f"no free address space within ±2 GiB of {site:#x} for stubs", address=site)
    path = os.path.join(SHM_DIR, f"djprobe-{process.pid}-{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    code_address: int | None = None
    try:
        os.ftruncate(fd, layout.data_size)
        uid, gid = _user_of(process.pid)
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, uid, gid)
        code_address = _map_in_target(process, candidates, layout, path)
        data_address = code_address + layout.code_size
        tracer_map = mmap.mmap(fd, layout.data_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = AreaView(memoryview(tracer_map), layout)
        view.write_header(
            AreaHeader(
                layout=layout,
                tracer_pid=os.getpid(),
                target_pid=process.pid,
                code_address=code_address,
                data_address=data_address,
            )
        )
    except BaseException:
        if code_address is not None:  # mapped in the target, but no Region will own it: unmap
            _unmap_quietly(process, code_address, layout.code_size)
            _unmap_quietly(process, code_address + layout.code_size, layout.data_size)
        raise
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    region = Region(layout, code_address, data_address, view, tracer_map)
    region.free_slots = list(range(layout.max_instances - 1, -1, -1))
    return region


def _map_in_target(process: "Process", candidates: list[int], layout: AreaLayout, path: str) -> int:
    """Map code (anonymous r-x) then data (the shared file, rw-) at the first candidate that is free."""
    last_error: Exception | None = None
    for start in candidates[:8]:
        try:
            code = process.mmap(
                start, layout.code_size, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
            )
        except DjprobeError as exc:
            last_error = exc
            continue
        if code != start:
            process.munmap(code, layout.code_size)
            continue
        try:
            # The target cannot open the file (another mount namespace, no /dev/shm): no other
            # place helps; the code part just mapped goes (nothing may stay without a Region).
            target_fd = process.open_file(path, O_RDWR | O_CLOEXEC)
        except RemoteSyscallError as exc:
            _unmap_quietly(process, code, layout.code_size)
            hint = " (is it in another mount namespace, e.g. a container?)" if exc.errno == errno.ENOENT else ""
            raise RemoteSyscallError(
                f"process {process.pid} cannot open the probe area file {path}: {os.strerror(exc.errno)}{hint}",
                errno=exc.errno,
            ) from exc
        except BaseException:
            _unmap_quietly(process, code, layout.code_size)
            raise
        try:
            data = process.mmap(
                start + layout.code_size,
                layout.data_size,
                PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_FIXED_NOREPLACE,
                target_fd,
                0,
            )
        except DjprobeError as exc:
            last_error = exc
            _unmap_quietly(process, code, layout.code_size)
            continue
        except BaseException:
            _unmap_quietly(process, code, layout.code_size)
            raise
        finally:
            try:
                process.close_fd(target_fd)
            except DjprobeError:
                pass  # an fd left open in the target is harmless; the mappings matter
        if data != start + layout.code_size:
            process.munmap(data, layout.data_size)
            process.munmap(code, layout.code_size)
            continue
        return start
    raise NoRoomError(f"could not map a probe area near the site: {last_error}")


def _unmap_quietly(process: "Process", address: int, size: int) -> None:
    """munmap in the target on a failure path: the first error stays the one reported."""
    try:
        process.munmap(address, size)
    except DjprobeError:
        pass


def unmap_region(process: "Process", region: Region) -> None:
    """Remove a region from the (stopped) target; only when no stub of it can still be in use."""
    process.munmap(region.code_address, region.layout.code_size)
    process.munmap(region.data_address, region.layout.data_size)
    region.mapped_in_target = False
