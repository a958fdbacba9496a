"""Following forked children (``--follow``): their counts, apart from their parent's.

With following on (``FORK_FOLLOW`` set in the probe areas), the fork hook (:mod:`.forks`) makes a
child publish its PID in the parent's area (``FORK_PIDS``, ``FORK_SEQ``), give itself a data part
of its own for every probe area (a ``memfd`` file with the header and the instance table copied,
counters zero, mapped ``MAP_SHARED`` where the parent's was) and wait, at most
``forks.FOLLOW_WAIT`` seconds, for ``FORK_ACK`` in its copy. :class:`ChildFollower` sees the PID,
opens the child's data parts through ``/proc/PID/map_files`` and maps them, calls ``on_child``
(the child still waiting), then writes the ACK and wakes the child. The child's counters are then read like the parent's, at the same slots, and
stay readable after the child has exited (the tracer's mapping keeps the file). Children of
followed children are taken in the same way (their areas' ``FORK_SEQ``). At the end, the jumps
of children still alive are removed as ``djprobe cleanup`` does (from their instance tables).

The image an ``exec`` puts in place is followed by :mod:`.execs`; the child's events and latency
figures are read by :mod:`.child_data`. ``vfork``/``posix_spawn`` children are not taken in:
they share their parent's memory until they ``exec`` (what they call before is the parent's).
The same code serves 32-bit (i386) processes: only the hooks' stubs differ (:mod:`.forks32`,
:mod:`.execs32`), and an image whose architecture changed at ``exec`` is probed in its own mode.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .area import FORK_ACK, FORK_FOLLOW, FORK_PIDS, FORK_PIDS_MAX, FORK_SEQ, AreaView
from .errors import DjprobeError
from .loader import FUTEX_WAKE, _futex

if TYPE_CHECKING:
    from .forks import ForkGuard
    from .probes import Djprobe, ProbedProcess

log = logging.getLogger(__name__)

MAP_WAIT = 1.0  # seconds to wait for a child's data parts to become its own files


@dataclass
class ChildSite:
    """A site's figures in one followed child."""

    site: str
    address: int | None
    slots: list[tuple[AreaView, int]]

    @property
    def hits(self) -> int:
        return sum(view.count(slot) for view, slot in self.slots)

    @property
    def missed(self) -> int:
        """Events of the site's record probes the child dropped (a ring was full)."""
        return sum(view.drops(slot) for view, slot in self.slots)


@dataclass
class FollowedChild:
    """A child taken in: its PID, command and per-site figures."""

    pid: int
    command: str
    parent: int
    views: list[AreaView | None]
    maps: list[mmap.mmap | None]
    site_list: list[ChildSite] = field(default_factory=list)
    seen_seq: int = 0
    refused: list = field(default_factory=list)
    #: The process whose probe areas the child copied (its parent, or the image it was forked
    #: from): its instances name the child's slots.
    source: "ProbedProcess | None" = None

    def sites(self) -> list[ChildSite]:
        return self.site_list


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return " ".join(w.decode(errors="replace") for w in f.read().split(b"\0") if w) or "?"
    except OSError:
        return "?"


class ChildFollower:
    """Take in the children forked by ``target`` (and theirs); see the module docstring.

    ``sites()`` gives the parent's reported sites (``Djprobe`` or ``SiteTotal`` objects, whose
    live probes name the slots); ``on_child(child)`` is called for each child taken in."""

    def __init__(
        self,
        target: "ProbedProcess",
        guard: "ForkGuard",
        sites: Callable[[], list],
        on_child: Callable[[FollowedChild], None] | None = None,
    ) -> None:
        self.target = target
        self.guard = guard
        self.sites = sites
        self.on_child = on_child
        self.children: list[FollowedChild] = []
        self.command = _command(target.pid)  # the parent's, while it is there to read
        self._seen = 0
        self.missed: list[int] = []  # children seen too late to be taken in

    def enable(self) -> None:
        """Ask children to wait to be taken in (every area, and the ones created later)."""
        for region in self.target._regions:
            region.view.buffer[FORK_FOLLOW : FORK_FOLLOW + 4] = struct.pack("<I", 1)
        self.target.region_hooks.append(self._enable_in)
        self._seen = self._seq(self._hook_view())

    def _enable_in(self, region) -> None:
        region.view.buffer[FORK_FOLLOW : FORK_FOLLOW + 4] = struct.pack("<I", 1)

    def _hook_view(self) -> AreaView:
        instance = self.guard.hook._instance  # type: ignore[union-attr]
        return instance.region.view

    def _hook_index(self) -> int:
        instance = self.guard.hook._instance  # type: ignore[union-attr]
        return self.target._regions.index(instance.region)

    @staticmethod
    def _seq(view: AreaView) -> int:
        return struct.unpack_from("<I", view.buffer, FORK_SEQ)[0]

    def poll(self) -> None:
        """Take in the children that announced themselves since the last call."""
        if self.guard.hook is None or self.guard.hook._instance is None:
            return
        self._seen = self._take(self._hook_view(), self._seen, self.target.pid)
        index = self._hook_index()
        for child in list(self.children):
            view = child.views[index] if index < len(child.views) else None
            if view is not None:
                child.seen_seq = self._take(view, child.seen_seq, child.pid)

    def _take(self, view: AreaView, seen: int, parent: int) -> int:
        now = self._seq(view)
        while seen != now:
            pid = struct.unpack_from("<I", view.buffer, FORK_PIDS + 4 * (seen % FORK_PIDS_MAX))[0]
            seen = (seen + 1) & 0xFFFFFFFF
            try:
                self._adopt(pid, parent)
            except (OSError, DjprobeError) as exc:
                log.info("child %d not taken in: %s", pid, exc)
                self.missed.append(pid)
        return seen

    def _adopt(self, pid: int, parent: int) -> None:
        regions = self.target._regions
        views: list[AreaView | None] = [None] * len(regions)
        maps: list[mmap.mmap | None] = [None] * len(regions)
        deadline = time.monotonic() + MAP_WAIT
        for i, region in enumerate(regions):
            if not region.mapped_in_target:
                continue
            path = f"/proc/{pid}/map_files/{region.data_address:x}-{region.data_address + region.layout.data_size:x}"
            while True:
                try:
                    if "memfd:djprobe" in os.readlink(path):
                        break
                except OSError:
                    pass
                if time.monotonic() >= deadline or not os.path.exists(f"/proc/{pid}"):
                    raise DjprobeError(f"child {pid}: its probe area at {region.data_address:#x} is not its own file")
                time.sleep(0.001)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                maps[i] = mmap.mmap(fd, region.layout.data_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            views[i] = AreaView(memoryview(maps[i]), region.layout)  # type: ignore[arg-type]
        child = FollowedChild(pid, _command(pid), parent, views, maps, source=self.target)
        index = self._hook_index()
        hook_view = views[index]
        if hook_view is not None:
            child.seen_seq = self._seq(hook_view)
        for site in self.sites():
            slots = []
            for djp in self._live(site):
                instance = djp._instance
                if instance is None:
                    continue
                k = regions.index(instance.region)
                if views[k] is not None:
                    slots.append((views[k], instance.slot))
            child.site_list.append(ChildSite(site.site, site.address, slots))
        self.children.append(child)
        try:
            if self.on_child is not None:  # while the child waits: what the caller sets up
                self.on_child(child)       # (its exec watch, its lossless heartbeat) is in time
        finally:
            if hook_view is not None:  # let the child go on
                hook_view.buffer[FORK_ACK : FORK_ACK + 4] = struct.pack("<I", 1)
                _futex(mapping_address(maps[index]) + FORK_ACK, FUTEX_WAKE, 1)  # type: ignore[arg-type]

    @staticmethod
    def _live(site) -> list["Djprobe"]:
        probes = getattr(site, "probes", None)
        probes = probes if isinstance(probes, list) else [site]
        parts = []
        for djp in probes:
            parts += djp._parts if djp._parts is not None else [djp]
        return parts

    def close(self) -> None:
        """Remove the jumps of the children still alive (as ``djprobe cleanup`` does); their
        counts stay readable here."""
        if self._enable_in in self.target.region_hooks:
            self.target.region_hooks.remove(self._enable_in)
        from .recovery import cleanup

        for child in self.children:
            if os.path.exists(f"/proc/{child.pid}") and _state(child.pid) not in ("Z", "X"):
                try:
                    cleanup(child.pid, force=True)
                except DjprobeError as exc:
                    log.info("child %d: removing its probes: %s", child.pid, exc)


def mapping_address(mapping: mmap.mmap) -> int:
    """The tracer's address of the first byte of ``mapping`` (for futex calls on its words)."""
    holder = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def follow_forks(target: "ProbedProcess", on_child: Callable[[FollowedChild], None] | None = None,
                 sites: Callable[[], list] | None = None) -> ChildFollower:
    """Place the fork hook in ``target`` and take in its children from now on: call
    :meth:`ChildFollower.poll` in your loop (``on_child(child)`` is called for each child taken
    in; ``child.sites()`` are its figures for the probes registered in ``target`` at its fork),
    and :meth:`ChildFollower.close` then ``guard.close()`` at the end. ``sites()`` lists what is
    counted (default: ``target.probes``). Raises SymbolNotFoundError without libc's ``_Fork``."""
    from .forks import ForkGuard

    guard = ForkGuard(target)
    guard.install()
    def probes() -> list:  # djprobe's own hooks left out
        return [p for p in target.probes if getattr(p, "build_stub", None) is None]

    children = ChildFollower(target, guard, sites or probes, on_child)
    children.enable()
    return children
