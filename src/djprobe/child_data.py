"""What a followed child recorded: its events and its latency figures (``trace``/``latency --follow``).

A child taken in by :class:`~djprobe.follow.ChildFollower` writes into copies of its parent's
probe areas (memfd files the tracer maps: ``FollowedChild.views``), at the same slots and with
the same instance table. :class:`ChildEvents` drains the event rings of those copies as
``ProbedProcess.read_events`` drains the parent's (the parent's instances, as they were when
the child was taken in, name the events' probes), and keeps the child's lossless probes
waiting only while the tracer drains (it writes the heartbeat in the copies). :class:`ChildLatency`
reads a latency probe's histogram block and entry counters in the copies. Both stay readable
after the child has exited.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .area import HIST_BUCKETS, MISC_COLLISIONS, MISC_UNPAIRED, AreaView
from .events import EventBatch, RingReader, ThreadMap, decode
from .latency import LatencyFigures

if TYPE_CHECKING:
    from .follow import FollowedChild
    from .probes import Djprobe

__all__ = ["ChildEvents", "ChildLatency", "sum_figures", "site_probes"]


class _Memory:
    """Reads a child's memory (thread pointers to TIDs, when the stubs could not record TIDs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self, address: int, size: int) -> bytes:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size, address)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"short read of process {self.pid} at {address:#x}")
        return data


class ChildEvents:
    """The events of one followed child (see the module docstring).

    Raises ValueError if the child was not taken in by a ``ChildFollower`` (no source)."""

    def __init__(self, child: "FollowedChild") -> None:
        source = child.source
        if source is None:
            raise ValueError(f"child {child.pid}: no source process (not taken in by a ChildFollower)")
        self.child = child
        self.pid = child.pid
        self.clock = source.clock
        self._by_slot = source._by_slot.copy()  # the instances as the child inherited them
        self._threads = ThreadMap()
        self._threads.tid_offset = source._thread_map.tid_offset
        with_rings = {reader.region_index for reader in source._readers}
        self._readers = [
            RingReader(view, k) for k, view in enumerate(child.views) if view is not None and k in with_rings
        ]
        self._memory = _Memory(child.pid)
        self.heartbeat()  # before the child runs (the copied heartbeat is stale: no wait at all)

    def heartbeat(self) -> None:
        """Tell the child's lossless probes that the tracer is draining (else they never wait)."""
        tsc = self.clock.now_tsc()
        for reader in self._readers:
            reader.view.heartbeat(tsc)

    def read(self, complete: bool = False) -> EventBatch:
        """The events recorded since the last call, time-ordered; unless ``complete``, only those
        stamped a little before now (as ``ProbedProcess.read_events``)."""
        from .probes import DRAIN_MARGIN_SECONDS, HOLE_PATIENCE_SECONDS

        if not self._readers:
            return EventBatch.empty()
        self.heartbeat()
        cutoff = patience = None
        if not complete:
            ticks = 1e9 / self.clock.ns_per_tick
            cutoff = self.clock.now_tsc() - int(DRAIN_MARGIN_SECONDS * ticks)
            patience = int(HOLE_PATIENCE_SECONDS * ticks)
        raw = [(r.region_index, part) for r in self._readers for part in r.drain(None, cutoff, patience)]
        if not raw:
            return EventBatch.empty()
        self.clock.refresh()
        alive = os.path.exists(f"/proc/{self.pid}/mem")
        batch = decode(raw, self.clock, self._threads, self._memory if alive else None)  # type: ignore[arg-type]
        keys = batch.events["region"].astype(np.int64) << 32 | batch.events["instance"].astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        owners = np.empty(len(unique), dtype=object)
        owners[:] = [self._by_slot.get((k >> 32, k & 0xFFFFFFFF)) for k in unique.tolist()]
        batch.instances = owners[inverse]
        batch.fetched = {k: v for r in self._readers for k, v in r.take_fetched().items()}
        return batch

    @property
    def waited_seconds(self) -> float:
        """Time the child's lossless probes spent waiting for room in its rings."""
        cycles = sum(reader.view.waited_cycles() for reader in self._readers)
        return cycles * self.clock.ns_per_tick / 1e9


def site_probes(site) -> list["Djprobe"]:
    """The probes behind a reported site: a ``Djprobe``, or each load's of a ``SiteTotal``."""
    probes = getattr(site, "probes", None)
    return probes if isinstance(probes, list) else [site]


class ChildLatency:
    """One latency site's figures in one followed child: the histogram blocks and the entry
    counters of the site's probes live when the child was taken in, read in the child's copies."""

    def __init__(self, child: "FollowedChild", site) -> None:
        source = child.source
        if source is None:
            raise ValueError(f"child {child.pid}: no source process (not taken in by a ChildFollower)")
        self.site = site.site
        self.address = site.address
        self._blocks: list[tuple[AreaView, int]] = []  # (view, latency function block)
        self._entries: list[tuple[AreaView, int]] = []  # (view, slot) of entry parts
        regions = source._regions
        for djp in site_probes(site):
            lat = getattr(djp, "latency", None)
            if lat is None or lat.region is None or lat.function is None or djp._parts is None:
                continue
            k = regions.index(lat.region) if lat.region in regions else None
            if k is None or k >= len(child.views) or child.views[k] is None:
                continue
            self._blocks.append((child.views[k], lat.function))  # type: ignore[arg-type]
            for part in djp._parts:
                instance = part._instance
                if part._latency_role in ("entry", "both") and instance is not None and instance.region in regions:
                    view = child.views[regions.index(instance.region)]
                    if view is not None:
                        self._entries.append((view, instance.slot))

    def read(self) -> LatencyFigures:
        hist = np.zeros(HIST_BUCKETS, dtype=np.uint64)
        total = collisions = unpaired = 0
        for view, function in self._blocks:
            summed = view.histograms[:, function, :].sum(axis=0, dtype=np.uint64).reshape(HIST_BUCKETS, 2)
            hist += summed[:, 0]
            total += int(summed[:, 1].sum(dtype=np.uint64))
            misc = view.latency_misc[function]
            collisions += int(misc[MISC_COLLISIONS])
            unpaired += int(misc[MISC_UNPAIRED])
        calls = sum(view.count(slot) for view, slot in self._entries)
        return LatencyFigures(hist, calls, total, collisions, unpaired)


def sum_figures(figures: list[LatencyFigures]) -> LatencyFigures:
    """The figures of several processes (or loads) of one site together."""
    hist = np.zeros(HIST_BUCKETS, dtype=np.uint64)
    for f in figures:
        hist = hist + f.histogram.astype(np.uint64)
    return LatencyFigures(hist, sum(f.calls for f in figures), sum(f.total_ns for f in figures),
                          sum(f.collisions for f in figures), sum(f.unpaired for f in figures))
