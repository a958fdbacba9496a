"""One counting window for the probes of one ``register_many`` or ``unregister_many`` call.

A running target is stopped for at most about ``ProbedProcess.max_stop_seconds`` at a time, and
the first step of a stop is always done: on a loaded machine, where stopping the threads alone
takes longer than that budget, every probe of a batch gets a stop of its own, and the target runs
between them. The probes of one call were then counting over different windows (measured on the
4-thread ``springboards_main loop`` target, 2 shared cores: ``sb_near+4`` placed first counted
1.0% more than ``sb_near+6`` over a 1 s ``count -p PID -d 1``, though the program runs them equally
often; a slower stop makes it more).

So that the counts of one call compare exactly, when a call took more than one stop:

- :class:`InsertWindow`: the counts of the probes it placed start at its last stop (every jump of
  the call is in then; hits counted earlier in the call are dropped);
- :class:`RemoveWindow`: the counts of the probes it removed end at its first stop (none is out
  yet; hits counted later in the call, until each one's jump is out, are dropped).

Both read the counters with the world stopped: a consistent snapshot, off by at most the threads
that are between two probes at that instant. A call done in one stop (or while the spawned target
is held before it starts) is left as it was. Only counting probes are windowed (return probes'
parts too): not record probes (their count stays the number of their events), not latency parts
(their count is the ``calls`` paired with the histogram's returns), not trap probes (kernel
uprobes, placed in a stop after the jumps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .probes import Djprobe, ProbedProcess

__all__ = ["InsertWindow", "RemoveWindow"]


def _served(proc: "ProbedProcess", djp: "Djprobe"):
    """The jump instance counting for ``djp`` (placed, or draining after removal), or None; None
    too for a probe whose count goes with other figures that are not windowed (its events, a
    latency part's histogram, a hook of djprobe's own): only counting probes are windowed."""
    from .probes import Instance

    if djp.record or djp._latency_role is not None or getattr(djp, "build_stub", None) is not None:
        return None
    source = djp._instance or djp._draining
    return source if isinstance(source, Instance) else None


class InsertWindow:
    """The stops of one ``register_many``: call :meth:`stopped` in each, :meth:`close` in the
    last one (world still stopped) with the probes of the call."""

    def __init__(self, proc: "ProbedProcess") -> None:
        self._proc = proc
        self._generations: set[int] = set()

    def stopped(self) -> None:
        """Inside a stop of the call."""
        self._generations.add(self._proc._stop_generation)

    def close(self, djps: Iterable["Djprobe"]) -> None:
        """World stopped, every jump of the call in: the counts of ``djps`` start now, if the
        call took more than one stop."""
        if len(self._generations) < 2:
            return
        for djp in djps:
            inst = _served(self._proc, djp)
            if inst is not None and djp._instance is inst:
                djp._baseline = inst.count()
                djp._drop_baseline = inst.drops()


class RemoveWindow:
    """The stops of one ``unregister_many``: call :meth:`stopped` in each (the first one takes
    the snapshot, before anything is removed), :meth:`close` after the last one."""

    def __init__(self, proc: "ProbedProcess", djps: Iterable["Djprobe"]) -> None:
        self._proc = proc
        self._djps = list(djps)
        self._generations: set[int] = set()
        self._snapshot: dict[int, tuple[int, int]] = {}

    def stopped(self) -> None:
        """Inside a stop of the call; the first one snapshots every probe's count."""
        if not self._generations:
            for djp in self._djps:
                inst = _served(self._proc, djp)
                if inst is not None:
                    self._snapshot[id(djp)] = (inst.count(), inst.drops())
        self._generations.add(self._proc._stop_generation)

    def close(self) -> None:
        """Every probe of the call out: what each counted after the first stop is dropped, if
        the call took more than one stop."""
        if len(self._generations) < 2:
            return
        for djp in self._djps:
            snap = self._snapshot.get(id(djp))
            inst = _served(self._proc, djp) if snap is not None else None
            if snap is None:
                continue
            if inst is not None:  # still draining: its final count is taken later from the live one
                extra_hits, extra_drops = inst.count() - snap[0], inst.drops() - snap[1]
            elif djp._final_hits is not None:
                extra_hits = djp._final_hits - (snap[0] - djp._baseline)
                extra_drops = (djp._final_missed or 0) - (snap[1] - djp._drop_baseline)
            else:
                continue
            djp._baseline += extra_hits
            djp._drop_baseline += extra_drops
            if djp._final_hits is not None:
                djp._final_hits -= extra_hits
                djp._final_missed = (djp._final_missed or 0) - extra_drops
