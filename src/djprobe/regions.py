"""Stub memory near probe sites: place probe areas in the target and hand out their slots.

A region is one probe area (see :mod:`djprobe.area`) mapped in the target at an address within
rel32 reach (±2 GiB) of the sites it serves: an anonymous read+execute code part and a shared
read-write data part that the tracer maps too. The data part is a file created by the tracer
(``O_EXCL``, mode 0600, owned by the target's user), opened by the target through an injected
syscall and unlinked at once, before anything is mapped; its name (:mod:`djprobe.shmfiles`) names
the tracer and the target, so that a file left by a tracer killed within that window is found
and removed by ``djprobe cleanup --stale``.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .area import RING_HEADER_SIZE, AreaHeader, AreaLayout, AreaView, InstanceEntry
from .errors import DjprobeError, NoRoomError, RemoteSyscallError
from .shmfiles import SHM_DIR, new_area_path
from .stubs import RecordTargets

if TYPE_CHECKING:
    from ._sys.procfs import MapEntry
    from .process import Process

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x01, 0x02, 0x20, 0x100000
O_RDWR, O_CLOEXEC = 0o2, 0o2000000

RARE_WORDS = 0xA000_0000  # a 32-bit place whose address reads as a rare number (see find_gap_near)
REACH = (1 << 31) - (1 << 24)  # rel32 reach, with a 16 MiB margin for the region's own size
MIN_ADDRESS = 0x10000
MAX_ADDRESS = 0x7FFFFFFFF000
ALIGN = 0x10000
__all__ = ["Region", "create_region", "unmap_region", "find_gap_near", "SHM_DIR"]


def _user_of(pid: int) -> tuple[int, int]:
    uid = gid = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def find_gap_near(
    maps: list["MapEntry"], site: int, size: int, max_address: int = MAX_ADDRESS, reach: int | None = REACH
) -> list[int]:
    """Candidate start addresses for ``size`` bytes of free address space below ``max_address``,
    closest to ``site`` first, every byte of which lies within rel32 reach of ``site`` (``reach``;
    None: any address, as in a 32-bit process)."""
    spans = sorted((m.start, m.end) for m in maps)
    gaps = []
    prev_end = MIN_ADDRESS
    for start, end in spans:
        if start >= max_address:
            break
        if start > prev_end:
            gaps.append((prev_end, start))
        prev_end = max(prev_end, end)
    if prev_end < max_address:
        gaps.append((prev_end, max_address))
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
        if reach is None:
            # Anywhere goes (a 32-bit process): also the gap's ends, and places whose addresses
            # do not read as text come first (below).
            band = min(max(RARE_WORDS, lo_aligned), hi_aligned) & ~(ALIGN - 1)  # see below
            candidates.extend({start, lo_aligned, hi_aligned, max(band, lo_aligned)})
        elif abs(start - site) <= reach and abs(start + size - site) <= reach:
            candidates.append(start)
    if reach is None:
        # A 4-byte stack word is often text (environment strings are on the main stack) or a small
        # number (a count, a length, a small negative one): an area at 0x56xxxxxx ("V...", where a
        # PIE executable is loaded) or at 0x000xxxxx would look referenced by them and could not
        # be unmapped. Prefer places whose top byte is neither printable ASCII nor 0x00/0xff, and
        # among those the band 0x80..0xbe: as a signed number below -1 billion, as a float a
        # negative one smaller than 0.5 in magnitude; numbers a program rarely holds (at
        # 0x06xxxxxx, a duration of 0.1 s in nanoseconds kept an area mapped).
        candidates.sort(key=lambda a: (_word_like(a) or _word_like(a + size - 1), not (_rare_word(a) and _rare_word(a + size - 1)),
                                       abs(a + size // 2 - site)))
        return candidates
    candidates.sort(key=lambda a: abs(a + size // 2 - site))
    return candidates


def _text_like(address: int) -> bool:
    """Is the top byte of a 32-bit address a printable ASCII character?"""
    return 0x20 <= (address >> 24) & 0xFF <= 0x7E


def _rare_word(address: int) -> bool:
    """Is a 32-bit address, read as a number, one that programs rarely hold (top byte 0x80..0xbe)?"""
    return 0x80 <= (address >> 24) & 0xFF <= 0xBE


def _word_like(address: int) -> bool:
    """Does a 32-bit address read like a common non-pointer stack word: text, or a small number
    (top byte 0x00, or 0xff for a small negative one)?"""
    return _text_like(address) or (address >> 24) & 0xFF in (0x00, 0xFF)


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
    reach: int | None = REACH  # of the jumps to it (None: a 32-bit process, everywhere)

    def __post_init__(self) -> None:
        self._end = self.data_address + self.layout.data_size  # asked for every site placed: computed once

    @property
    def start(self) -> int:
        return self.code_address

    @property
    def end(self) -> int:
        return self._end

    def reaches(self, site: int) -> bool:
        if self.reach is None:
            return True
        return abs(self.code_address - site) <= self.reach and abs(self._end - site) <= self.reach

    def slot_address(self, index: int) -> int:
        return self.layout.slot_address(self.code_address, index)

    def counter_address(self, index: int) -> int:
        return self.layout.counter_address(self.data_address, index)

    def record_targets(self, index: int, tid_offset: int | None = None, wait_cycles: int = 0) -> RecordTargets:
        """Where the record stub of slot ``index`` writes."""
        lay = self.layout
        return RecordTargets(
            counter=self.counter_address(index),
            drops=self.data_address + lay.drops_offset + 8 * index,
            ring_headers=self.data_address + lay.rings_offset,
            records=self.data_address + lay.records_offset,
            args_ring_headers=self.data_address + lay.rings_offset + lay.ring_count * RING_HEADER_SIZE,
            args_records=self.data_address + lay.args_records_offset,
            instance=index,
            tid_offset=tid_offset,
            wait_cycles=wait_cycles,
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


def area_candidates(process: "Process", site: int, layout: AreaLayout | None = None) -> list[int]:
    """Where an area for ``site`` could go, closest first (from the target's current maps: about
    1 ms for a python3; read before the stop, the stop only maps)."""
    layout = layout or AreaLayout()
    arch = getattr(process, "arch", None)
    limits = {} if arch is None else {"max_address": arch.address_limit, "reach": arch.jump_reach}
    return find_gap_near(process.maps(), site, layout.total_size, **limits)


def create_region(
    process: "Process", site: int, layout: AreaLayout | None = None, between: Callable[[], None] | None = None,
    candidates: list[int] | None = None,
) -> Region:
    """Map a new probe area in the (stopped) target within reach of ``site``.

    The file gets its header before the target maps it, and the target maps the data part before
    the code part: whatever instant the tracer dies at, what is mapped in the target is either
    nothing or an area that ``djprobe cleanup`` recognises. On any failure, what was mapped is
    unmapped again.

    ``between`` is called between two injected system calls (the caller may let the target run
    for a moment there, so that no single stop lasts four system calls). ``candidates`` (from
    :func:`area_candidates`, read before the stop) are tried first; if the target mapped them in
    the meantime, candidates from its maps of now are.

    Raises NoRoomError if no free address range within ±2 GiB of the site can take it,
    RemoteSyscallError if the target cannot open the file (naming it).
    """
    between = between or (lambda: None)
    layout = layout or AreaLayout()
    arch = getattr(process, "arch", None)
    limits = {} if arch is None else {"max_address": arch.address_limit, "reach": arch.jump_reach}
    early = candidates is not None
    if not candidates:
        candidates, early = area_candidates(process, site, layout), False
    if not candidates:
        raise NoRoomError(f"no free address space within ±2 GiB of {site:#x} for stubs", address=site)
    path = new_area_path(process.pid)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    tracer_map: mmap.mmap | None = None
    view: AreaView | None = None
    try:
        try:
            os.ftruncate(fd, layout.data_size)
            uid, gid = _user_of(process.pid)
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, uid, gid)
            tracer_map = mmap.mmap(fd, layout.data_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            view = AreaView(memoryview(tracer_map), layout)
            target_fd = _open_in_target(process, path)
        finally:
            # Both sides hold the file now (or never will): the name goes before anything else.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            between()
            try:
                code_address = _map_in_target(process, candidates, layout, target_fd, view, between)
            except NoRoomError:
                if not early:
                    raise
                code_address = _map_in_target(process, area_candidates(process, site, layout), layout, target_fd,
                                              view, between)
            between()
        finally:
            process.close_fd(target_fd)
    except BaseException:
        if view is not None:
            view.release()
        if tracer_map is not None:
            tracer_map.close()
        raise
    finally:
        os.close(fd)
    region = Region(layout, code_address, code_address + layout.code_size, view, tracer_map, **({"reach": limits["reach"]} if limits else {}))
    region.free_slots = list(range(layout.max_instances - 1, -1, -1))
    return region


def _open_in_target(process: "Process", path: str) -> int:
    try:
        return process.open_file(path, O_RDWR | O_CLOEXEC)
    except RemoteSyscallError as exc:
        hint = " (is it in another mount namespace, e.g. a container?)" if exc.errno == errno.ENOENT else ""
        raise RemoteSyscallError(
            f"process {process.pid} cannot open the probe area file {path}: {os.strerror(exc.errno)}{hint}",
            errno=exc.errno,
        ) from exc


def _map_in_target(
    process: "Process", candidates: list[int], layout: AreaLayout, target_fd: int, view: AreaView,
    between: Callable[[], None] = lambda: None,
) -> int:
    """At the first free candidate: write the header for that place, map the data part (the
    shared file open as ``target_fd`` in the target, rw-), then the code part (anonymous r-x)."""
    last_error: Exception | None = None
    for start in candidates[:8]:
        data_at = start + layout.code_size
        view.write_header(
            AreaHeader(layout=layout, tracer_pid=os.getpid(), target_pid=process.pid, code_address=start, data_address=data_at)
        )
        try:
            data = process.mmap(data_at, layout.data_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, target_fd, 0)
        except DjprobeError as exc:
            last_error = exc
            continue
        if data != data_at:
            _unmap_quietly(process, data, layout.data_size)
            continue
        try:
            between()
        except BaseException:
            _unmap_quietly(process, data_at, layout.data_size)
            raise
        try:
            code = process.mmap(start, layout.code_size, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
        except DjprobeError as exc:
            last_error = exc
            _unmap_quietly(process, data_at, layout.data_size)
            continue
        except BaseException:
            _unmap_quietly(process, data_at, layout.data_size)
            raise
        if code != start:
            _unmap_quietly(process, code, layout.code_size)
            _unmap_quietly(process, data_at, layout.data_size)
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
