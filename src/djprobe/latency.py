"""Latency probes: how long each call of a function takes, as a log2 histogram kept in the target.

``Djprobe("libc:malloc", at="latency")`` pairs the entry and every exit of one function (the exits
of :mod:`djprobe.sites.exits`). Its *parts* are placed as internal probes, all under one stop of
the world (like a return probe's): an entry part whose stub counts the call and stores {key, TSC}
in a table of calls in flight in the probe area, and one exit part per exit window, whose stub
finds its call's entry, frees it and adds the elapsed nanoseconds into a histogram of the area
(64 log2 buckets and the total, sharded by ``rsp``). No event per call, no consumer, nothing
dropped; see :mod:`djprobe.latency_stubs` for the stub code and the pairing key, and
:mod:`djprobe.latency_stubs32` for the same stubs in 32-bit (i386) processes (the process's
:class:`~djprobe.arch.Arch` picks the set: ``_STUBS``).

After registration, ``djp.latency`` is a :class:`Latency`: ``calls`` (entries), ``returns``
(exits paired with their entry: the histogram's sum), ``histogram`` (numpy, counts per bucket),
``total_ns``, ``average_ns``, ``percentile(q)``/``p50``/``p99``, ``collisions`` (calls that lost
their table entry to another call: their sample is lost, never mismeasured) and ``unpaired``
(exits with no entry: the call began before the probe went in, or lost its entry). A call left
by ``longjmp``, an exception or a thread's end has no return; its entry is overwritten by the
next call of the function at the same stack pointer, or counted as a collision by another.

A function whose entry window ends with one of its exits (straight-line code before it: tiny
functions, tail-call wrappers) has one *both* part: a stub with the entry action, the relocated
instructions, the exit action and the exit. Refused (``InvalidSiteError`` with the reason): a
function whose return probe would be refused; one whose entry window overlaps an exit window
otherwise; a CPU without AVX (16-byte accesses are atomic only there).
A latency probe's addresses cannot be shared with another probe (``SiteBusyError``).

:class:`~djprobe.probes.ProbedProcess` calls the hooks here: :func:`expand` (the parts),
:func:`build_stub` (from ``_prepare``), :func:`join_conflict`, :func:`before_close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import latency_stubs32
from .arch import I386, X86_64, Arch
from .area import HIST_BUCKETS, MISC_COLLISIONS, MISC_UNPAIRED
from .errors import DjprobeError, InvalidSiteError, NoRoomError, SiteBusyError
from .latency_stubs import (LatencyTargets, build_latency_both_stub, build_latency_entry_stub, build_latency_exit_stub,
                            latency_supported)
from . import short_exits
from .sites import analyse_exits, analyse_site

if TYPE_CHECKING:
    from .probes import Djprobe, Instance, ProbedProcess
    from .regions import Region
    from .sites import SiteAnalysis
    from .stubs import Stub

__all__ = ["Latency", "LatencyFigures", "bucket_bounds", "bucket_of", "percentile", "expand", "build_stub", "join_conflict",
           "before_close", "MAX_TAG"]

MAX_TAG = 0xFFFF


# -- bucket math (pure) ------------------------------------------------------------------------
def bucket_of(ns: int) -> int:
    """The bucket of a duration, as the exit stub computes it: ``bsr(2 * ns + 1)``."""
    if ns < 0:
        ns = 0
    return min(HIST_BUCKETS - 1, (2 * ns + 1).bit_length() - 1)


def bucket_bounds(b: int) -> tuple[int, int]:
    """[low, high) of bucket ``b`` in nanoseconds: [0, 1) for 0, [2**(b-1), 2**b) after."""
    if not 0 <= b < HIST_BUCKETS:
        raise ValueError(f"no bucket {b}")
    return (0, 1) if b == 0 else (1 << (b - 1), 1 << b)


def percentile(hist: np.ndarray | Sequence[int], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of the durations counted in ``hist`` (per bucket), by
    linear interpolation inside the bucket that holds it; None if ``hist`` is empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    counts = np.asarray(hist, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    rank = q / 100.0 * total  # how many samples lie below the answer
    cumulative = np.cumsum(counts)
    if rank <= 0:
        b = int(np.flatnonzero(counts)[0])  # the first non-empty bucket
    else:
        b = min(int(np.searchsorted(cumulative, rank, side="left")), len(counts) - 1)
    low, high = bucket_bounds(b)
    before = cumulative[b] - counts[b]
    frac = (rank - before) / counts[b]
    return low + (high - low) * min(1.0, max(0.0, frac))


# -- results -----------------------------------------------------------------------------------
@dataclass
class _Reading:
    hist: np.ndarray
    total_ns: int
    collisions: int
    unpaired: int
    calls: int


class Latency:
    """The latency of one registered function (``djp.latency``), read live from the target's
    probe area (frozen once the probe is out and no thread can be in its stubs any more)."""

    def __init__(self, djp: "Djprobe") -> None:
        self.djp = djp
        self.region: Region | None = None
        self.function: int | None = None  # its block in the area's latency block
        self.tag = 0
        self.targets: LatencyTargets | None = None
        self._frozen: _Reading | None = None
        self._base = _Reading(np.zeros(HIST_BUCKETS, dtype=np.uint64), 0, 0, 0, 0)

    @property
    def site(self) -> str | None:
        return self.djp.site

    @property
    def address(self) -> int | None:
        return self.djp.address

    def _read(self) -> _Reading:
        if self._frozen is not None:
            return self._frozen
        if self.region is None or self.function is None:
            return _Reading(np.zeros(HIST_BUCKETS, dtype=np.uint64), 0, 0, 0, self.djp.hits)
        view = self.region.view
        blocks = view.histograms[:, self.function, :]
        summed = blocks.sum(axis=0, dtype=np.uint64).reshape(HIST_BUCKETS, 2)  # {count, sum of ns}
        misc = view.latency_misc[self.function]
        return _Reading(summed[:, 0].copy(), int(summed[:, 1].sum(dtype=np.uint64)), int(misc[MISC_COLLISIONS]),
                        int(misc[MISC_UNPAIRED]), self.djp.hits)

    def read(self) -> "LatencyFigures":
        """Every figure at one moment (the properties below each read the area anew)."""
        now, base = self._read(), self._base
        return LatencyFigures(now.hist - base.hist, now.calls - base.calls, now.total_ns - base.total_ns,
                              now.collisions - base.collisions, now.unpaired - base.unpaired)

    def reset(self, reported: "LatencyFigures | None" = None) -> None:
        """Start counting from zero: as of now, or just after ``reported`` (figures read earlier
        with :meth:`read`: what ``latency -i`` does after each report, so that nothing that
        happened between the report and the reset is lost)."""
        if reported is None:
            self._base = self._read()
            return
        b = self._base
        self._base = _Reading(b.hist + reported.histogram, b.total_ns + reported.total_ns,
                              b.collisions + reported.collisions, b.unpaired + reported.unpaired,
                              b.calls + reported.calls)

    @property
    def histogram(self) -> np.ndarray:
        """Paired calls per bucket (``bucket_bounds(b)`` gives bucket ``b``'s nanoseconds)."""
        return self.read().histogram

    @property
    def calls(self) -> int:
        """Entries of the function while the probe was in."""
        return self.read().calls

    @property
    def returns(self) -> int:
        """Exits paired with their entry: the sum of the histogram."""
        return self.read().returns

    @property
    def total_ns(self) -> int:
        return self.read().total_ns

    @property
    def collisions(self) -> int:
        """Calls whose table entry another call took (their sample is lost, counted here)."""
        return self.read().collisions

    @property
    def unpaired(self) -> int:
        """Exits that found no entry of theirs (begun before the probe, or after a collision)."""
        return self.read().unpaired

    @property
    def average_ns(self) -> float | None:
        return self.read().average_ns

    def percentile(self, q: float) -> float | None:
        return self.read().percentile(q)

    @property
    def p50(self) -> float | None:
        return self.percentile(50)

    @property
    def p99(self) -> float | None:
        return self.percentile(99)

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low_ns, high_ns, count) from the first to the last non-empty bucket."""
        return self.read().buckets()

    def freeze(self) -> None:
        """Keep the figures as they are now (the area block is about to be reused or unmapped)."""
        if self._frozen is None:
            self._frozen = self._read()

    def settled(self) -> bool:
        """No part is placed and no thread can still be in one of its stubs."""
        parts = self.djp._parts
        if parts is None:
            return True  # refused as a whole: its placed parts were removed again
        # a part prepared but not inserted yet has no final count: still in use
        return all(p._instance is None and p._draining is None and p._final_hits is not None for p in parts)

    def __repr__(self) -> str:
        return (f"<Latency {self.site} calls={self.calls} returns={self.returns} total_ns={self.total_ns} "
                f"collisions={self.collisions} unpaired={self.unpaired}>")


@dataclass(frozen=True)
class LatencyFigures:
    """The figures of a latency probe at one moment (:meth:`Latency.read`)."""

    histogram: np.ndarray  # paired calls per bucket
    calls: int
    total_ns: int
    collisions: int
    unpaired: int

    @property
    def returns(self) -> int:
        return int(self.histogram.sum())

    @property
    def average_ns(self) -> float | None:
        n = self.returns
        return self.total_ns / n if n else None

    def percentile(self, q: float) -> float | None:
        return percentile(self.histogram, q)

    @property
    def p50(self) -> float | None:
        return self.percentile(50)

    @property
    def p99(self) -> float | None:
        return self.percentile(99)

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low_ns, high_ns, count) from the first to the last non-empty bucket."""
        nz = np.nonzero(self.histogram)[0]
        if not len(nz):
            return []
        return [(*bucket_bounds(b), int(self.histogram[b])) for b in range(int(nz[0]), int(nz[-1]) + 1)]


# -- the latency block of an area ----------------------------------------------------------------
@dataclass
class _AreaLatency:
    """Which latency probe holds each function block of one area, and the next tag."""

    owners: list["Latency | None"]
    next_tag: int = 1
    busy: set = field(default_factory=set)


def _state(region: "Region") -> _AreaLatency:
    state = getattr(region, "latency_state", None)
    if state is None:
        state = _AreaLatency([None] * region.layout.latency_functions)
        region.latency_state = state  # type: ignore[attr-defined]
    return state


def _allocate(proc: "ProbedProcess", region: "Region", lat: Latency) -> None:
    """Give ``lat`` a function block and a fresh tag in ``region`` (NoRoomError if none)."""
    state = _state(region)
    free = None
    for i, owner in enumerate(state.owners):
        if owner is None or (owner is not lat and owner.settled()):
            free = i
            break
    if free is None:
        raise NoRoomError(f"{lat.djp.site}: the probe area serves {len(state.owners)} latency probes at most")
    if state.next_tag > MAX_TAG:
        if any(o is not None and not o.settled() for o in state.owners):
            raise NoRoomError(f"{lat.djp.site}: {MAX_TAG} latency probes were placed in this area; remove the "
                              "others before placing more")
        region.view.latency_table[:] = 0  # no stub can read or write it now: entries of old tags go
        state.next_tag = 1
    old = state.owners[free]
    if old is not None:
        old.freeze()
    view = region.view
    view.histograms[:, free, :] = 0
    view.latency_misc[free, :] = 0
    state.owners[free] = lat
    lat.region, lat.function, lat.tag = region, free, state.next_tag
    state.next_tag += 1
    lat.targets = LatencyTargets.of(region.layout, region.data_address, free, lat.tag, proc.clock.ns_per_tick)


def build_stub(proc: "ProbedProcess", part: "Djprobe", analysis: "SiteAnalysis", region: "Region", slot: int) -> "Stub":
    """The stub of a latency part in ``slot`` of ``region`` (``ProbedProcess._prepare``). The
    entry part is prepared first: it takes the function's block in its own area."""
    parent = part._parent
    lat = parent.latency if parent is not None else None
    if lat is None:
        raise InvalidSiteError(f"{analysis.site}: not a part of a latency probe")
    if part._latency_role in ("entry", "both"):
        if lat.targets is None:
            proc.clock.refresh()
            _allocate(proc, region, lat)
        assert lat.targets is not None
    elif lat.targets is None:
        raise SiteBusyError(f"{analysis.site}: the entry of this latency probe could not be prepared")
    stubs = _STUBS[_arch(proc)]
    return stubs.build(part._latency_role, analysis, region.layout, region.slot_address(slot),
                       region.counter_address(slot), lat.targets, proc, part._latency_exit)


def _arch(proc: "ProbedProcess") -> "Arch":
    return getattr(proc.process, "arch", X86_64)


@dataclass(frozen=True)
class _StubSet:
    """The latency stub builders of one :class:`~djprobe.arch.Arch` (entry, exit, both), and
    whether they take glibc's rseq area (per-CPU shards)."""

    entry: Callable
    exit: Callable
    both: Callable
    rseq: bool
    paths: bool  # the "both" stub takes an exit window that is a path window (see entry_plan)

    def build(self, role: str, analysis: "SiteAnalysis", layout, slot_address: int, counter: int,
              targets: LatencyTargets, proc: "ProbedProcess", exit_window: "SiteAnalysis | None" = None) -> "Stub":
        extra = (proc._rseq_offset(),) if self.rseq else ()
        if role == "exit":
            return self.exit(analysis, layout, slot_address, targets, *extra)
        if role == "both" and self.paths:
            return self.both(analysis, layout, slot_address, counter, targets, *extra, exit_window=exit_window)
        return (self.both if role == "both" else self.entry)(analysis, layout, slot_address, counter, targets, *extra)


#: latency stubs per architecture: x86-64 (per-CPU shards with rseq), i386 (locked shards)
_STUBS = {
    X86_64: _StubSet(build_latency_entry_stub, build_latency_exit_stub, build_latency_both_stub, rseq=True, paths=True),
    I386: _StubSet(latency_stubs32.build_latency_entry_stub, latency_stubs32.build_latency_exit_stub,
                   latency_stubs32.build_latency_both_stub, rseq=True, paths=False),  # rseq: vfork children apart
}


# -- registration hooks ----------------------------------------------------------------------------
def _part(parent: "Djprobe", window: "SiteAnalysis", role: str) -> "Djprobe":
    from .probes import Djprobe

    part = Djprobe(window.address)
    part.size = window.size
    part._parent = parent
    part._preset = window
    part._latency_role = role
    return part


def _overlapping(entry: "SiteAnalysis", windows: list["SiteAnalysis"]) -> list["SiteAnalysis"]:
    lo, hi = entry.address, entry.address + entry.size
    return [w for w in windows if w.address < hi and lo < w.address + w.size]


def _way_in_ends_entry(entry: "SiteAnalysis", window: "SiteAnalysis") -> bool:
    """Whether ``window`` is a path window (see ``SiteAnalysis.exit_path``) whose instructions are
    the last ones of the entry window (``test rdi,rdi; je <ret>`` at ``free``'s entry): one stub
    can run the entry action, the relocated entry window with its branches into the exit block
    aimed at a copy of the block, the exit action and the exit."""
    n = len(window.displaced)
    return (bool(window.exit_path) and 0 < n <= len(entry.displaced) and not entry.padding
            and tuple(entry.displaced[-n:]) == tuple(window.displaced))


def _ends_at_exit(entry: "SiteAnalysis", window: "SiteAnalysis") -> bool:
    """Whether the entry window ends with the exit instruction of ``window`` (not a path window),
    reached by straight-line code (``lea eax,[rdi+1]; ret``, ``xor esi,esi; jmp f``), or by
    branches that leave the window, none going back into it (to the function's first byte: the
    entry action would run again for the same call): the exit action can follow the entry
    action and the relocated instructions in one stub."""
    from .x86 import Flow

    if not entry.displaced or window.exit is None or window.exit_path:
        return False
    if entry.displaced[-1].address != window.exit.address:
        return False
    prefix = entry.displaced[:-1]
    if all(i.flow is Flow.NEXT for i in prefix):
        return True
    return not entry.padding and not _branches_back(entry, prefix)


def _branches_back(window: "SiteAnalysis", insns: Sequence) -> bool:
    """Whether one of ``insns`` branches into ``window``."""
    lo, hi = window.address, window.address + window.size
    return any(i.target is not None and lo <= i.target < hi for i in insns)


def entry_plan(
    entry: "SiteAnalysis", windows: Sequence["SiteAnalysis"], widen: "Callable[[int], SiteAnalysis] | None" = None
) -> tuple["SiteAnalysis", "SiteAnalysis | None", str | None]:
    """How the entry of a latency probe goes with its exit windows: (the entry window to use, the
    exit window that the entry's stub takes in or None, why the function cannot take a latency
    probe or None). The entry window may overlap one exit window only, which it must end with:
    the exit reached by straight-line code or branches that leave the window, or the way into an
    exit block. ``widen(size)`` analyses a larger window at the entry: an entry window that ends
    inside an exit window is grown to that window's end when the grown one can take a jump
    (``mov r9,rsi; test rcx,rcx`` then ``je <mov rax,r9; ret>``)."""
    clash = _overlapping(entry, list(windows))
    if not clash:
        return entry, None, None
    if len(clash) == 1:
        w = clash[0]
        if _ends_at_exit(entry, w) or _way_in_ends_entry(entry, w):
            return entry, w, None
        end = w.displaced[-1].end if w.displaced else 0
        if widen is not None and not w.padding and end > entry.address + entry.size and w.address >= entry.address:
            grown = widen(end - entry.address)
            if grown.ok and (_ends_at_exit(grown, w) or (_way_in_ends_entry(grown, w)
                                                          and not _branches_back(grown, grown.displaced))):
                return grown, w, None
    return entry, None, (f"too short for latency: its entry window {entry.address:#x}+{entry.size} overlaps the "
                         f"window of the exit '{clash[0].exit.text if clash[0].exit else '?'}' at {clash[0].address:#x}")


def expand(proc: "ProbedProcess", djps: Sequence["Djprobe"], refused: list) -> list["Djprobe"]:
    """``djps`` with every latency probe replaced by its parts: the entry, then one per exit
    window. A latency probe that cannot be placed goes to ``refused`` with the error."""
    out: list[Djprobe] = []
    for djp in djps:
        if djp.at != "latency":
            out.append(djp)
            continue
        if djp.registered:
            refused.append((djp, InvalidSiteError(f"{djp!r} is already registered")))
            continue
        try:
            why = latency_supported()
            if why is not None:
                raise InvalidSiteError(f"{djp.addr}: latency probes need 16-byte atomic SSE accesses: {why}")
            site = proc.resolve_site(djp.addr)
            exits = analyse_exits(proc.symbols, site, proc.process.memory)  # type: ignore[arg-type]
            exits = short_exits.with_short_windows(proc, exits, proc.process.memory.read)  # springboards on
            taken = [proc._overlapping(exits.address, 1)] + [proc._overlapping(e.window.address, e.window.size or 1)
                                                               for e in exits.exits]
            other = next((t for t in taken if t is not None), None)
            if other is not None:
                raise SiteBusyError(f"{exits.site.rsplit('%', 1)[0]}: a probe at {other.address:#x} is at its entry "
                                    "or an exit; a latency probe cannot share it", address=other.address)
            if not exits.ok:
                raise exits.error()
            name = exits.site.rsplit("%", 1)[0]
            entry = analyse_site(proc.symbols, exits.address, None, proc.process.memory)
            windows = exits.windows
            if not entry.ok:
                entry = short_exits.short_entry(proc, entry) or entry  # a jmp rel8 (springboards on)
                if not entry.ok:
                    raise entry.error()
                if _overlapping(entry, list(windows)):
                    raise InvalidSiteError(f"{name}: its entry takes a short jump whose window overlaps an exit "
                                           "window; one stub for both is not built for short jumps",
                                           address=entry.address)

            def widen(size: int) -> "SiteAnalysis":
                return analyse_site(proc.symbols, exits.address, size, proc.process.memory)

            entry, both, why = entry_plan(entry, windows, widen if entry.springboard is None else None)
            if why is not None:
                raise InvalidSiteError(f"{name}: {why}", address=entry.address)
            if both is not None and both.springboard is not None:
                raise InvalidSiteError(f"{name}: its entry window would end with an exit that takes a short jump; "
                                       "one stub for both is not built for short jumps", address=entry.address)
            if both is not None and both.exit_path and not _STUBS[_arch(proc)].paths:
                raise InvalidSiteError(f"{name}: its entry window ends with the way into an exit block; one stub for "
                                       f"both is not built for {_arch(proc).name} processes", address=entry.address)
        except DjprobeError as exc:
            refused.append((djp, proc._site_error(exc)))
            continue
        djp.exits = exits
        djp.address = exits.address
        djp.site = name
        djp.latency = Latency(djp)
        if both is not None:  # one stub for the entry and the exit its window ends with
            first = _part(djp, entry, "both")
            first._latency_exit = both
            djp._parts = [first] + [_part(djp, w, "exit") for w in windows if w is not both]
        else:
            djp._parts = [_part(djp, entry, "entry")] + [_part(djp, w, "exit") for w in windows]
        out.extend(djp._parts)
    return out


def join_conflict(existing: "Instance", djp: "Djprobe") -> str | None:
    """Why ``djp`` cannot share the instance ``existing``: a latency stub serves one latency
    probe and nothing else."""
    if djp._latency_role is not None:
        return "another probe is at this address; a latency probe cannot share it"
    if existing.action == "latency":
        return "a latency probe is at this address; another probe cannot share it"
    return None


def before_close(regions: Sequence["Region"]) -> None:
    """Freeze every latency result of these areas before the tracer's view of them goes."""
    for region in regions:
        state = getattr(region, "latency_state", None)
        if state is None:
            continue
        for owner in state.owners:
            if owner is not None:
                owner.freeze()
