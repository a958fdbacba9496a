"""``trace --follow``: the events of the process, of the children it forks (and theirs) and of
the images any of them exec, as ``count --follow`` takes them in (see _children.Family).

A forked child records into its own copies of the probe areas (child_data.ChildEvents drains
them); an exec'd image has probes and rings of its own. Each turn, every process's events are
drained and written in time order; text lines are marked ``[pid N]`` once there is more than
one process, JSON lines carry ``"pid"``. The summary gives the totals per site, then each
process's own figures. ``trace -p A,B`` and ``--name`` (_fleet_trace.py) read each process of the
fleet through a ``TraceFamily`` of its own (without a ``Family`` when not ``--follow``) and
write them all through one ``TimeOrderedWriter``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from ..child_data import ChildEvents
from ..events import EventBatch
from ..follow import FollowedChild
from ..probes import ProbedProcess
from ._children import Family, Placement, follow_children
from ._fleet import process_heading
from ._output import plural, vfork_lines
from ._target import Interrupted, interrupted
from ._writer import output_note


@dataclass
class _Row:
    """A site's figures in the summary (one process's, or the totals)."""

    site: str
    address: int | None
    mode: str | None
    hits: int
    missed: int
    vfork_hits: int = 0  # vfork/posix_spawn children before their exec: not in hits, not recorded


def _rows(sites: list) -> list[_Row]:
    return [_Row(s.site, s.address, getattr(s, "mode", None), s.hits, s.missed, getattr(s, "vfork_hits", 0))
            for s in sites]


class TraceFamily:
    """The processes ``trace --follow`` reads events from (see the module docstring): ``target``
    and, when ``family`` is given, everyone it took in."""

    def __init__(self, family: Family | None, target: ProbedProcess) -> None:
        self.family = family
        self.target = target
        self.children: list[ChildEvents] = []
        self.images: list = []  # _Image, while its areas are mapped
        self.held: list[tuple[int, EventBatch]] = []  # last events of closed images
        self.waited = 0.0  # seconds the lossless probes of closed images waited
        if family is not None:
            family.on_process.append(self._add)
            family.before_image_close.append(self._image_closing)

    def _add(self, process: object) -> None:
        if isinstance(process, FollowedChild):
            self.children.append(ChildEvents(process))
        else:
            self.images.append(process)

    def _image_closing(self, image) -> None:
        batch = image.target.read_events()
        if len(batch):
            self.held.append((image.pid, batch))
        self.waited += image.target.waited_seconds
        if image in self.images:
            self.images.remove(image)

    @property
    def several(self) -> bool:
        return self.family is not None and bool(self.family.children)

    def poll(self) -> None:
        if self.family is not None:
            self.family.poll()

    def read(self, complete: bool = False) -> list[tuple[int, EventBatch]]:
        """The events of every process since the last call, with their PID."""
        got = [(self.target.pid, self.target.read_events())]
        got += [(image.pid, image.target.read_events()) for image in self.images]
        got += [(child.pid, child.read(complete)) for child in self.children]
        got += self.held
        self.held = []
        return [(pid, batch) for pid, batch in got if len(batch)]

    def waited_seconds(self) -> float:
        return (self.target.waited_seconds + self.waited + sum(c.waited_seconds for c in self.children)
                + sum(i.target.waited_seconds for i in self.images))

    def members(self, pid: int, command: str, sites: list) -> list[tuple[int, str, list[_Row]]]:
        """(pid, command, rows) of the process and of everyone taken in."""
        out = [(pid, command, _rows(sites))]
        for child in self.family.children if self.family is not None else []:
            out.append((child.pid, child.command, _rows(child.sites())))
        return out


def start_family(args: argparse.Namespace, target: ProbedProcess, guard, sites: Callable[[], list],
                 placement: Placement) -> TraceFamily | None:
    """``trace --follow``: take in children and exec'd images (None without the fork hook)."""
    family = follow_children(args, target, guard, sites, placement)
    return TraceFamily(family, target) if family is not None else None


#: How long the newest events are held back before they are written (ns): a record whose
#: timestamp was taken before a read may be committed, and read, only at the next one (its
#: thread preempted between the two: 139 µs seen on a loaded machine), so events younger than
#: this wait for the next reads to be placed among theirs in time order.
HOLD_NS = 200_000_000


class TimeOrderedWriter:
    """Writes the events of several processes in time order across reads: each read's events
    are merged with those held back, and written once older than :data:`HOLD_NS` (all of them
    at the last read)."""

    def __init__(self, out: TextIO, text: Callable[[EventBatch, str], list[str]],
                 as_json: Callable[[EventBatch, int], list[str]], json_mode: bool, hold_ns: int = HOLD_NS) -> None:
        self._out, self._text, self._as_json, self._json_mode = out, text, as_json, json_mode
        self._hold_ns = hold_ns
        self._held: list[tuple[int, int, str]] = []  # (time_ns, order of arrival, line)
        self._arrived = 0

    def write(self, got: list[tuple[int, EventBatch]], several: bool, final: bool = False) -> None:
        """Add ``got`` ((pid, events) per process) and write what is old enough (``final``: all)."""
        for pid, batch in got:
            lines = self._as_json(batch, pid) if self._json_mode else self._text(batch, f"[pid {pid}] " if several else "")
            times = batch.events["time_ns"].tolist()
            self._held += [(t, self._arrived + k, line) for k, (t, line) in enumerate(zip(times, lines))]
            self._arrived += len(lines)
        if not self._held:
            return
        self._held.sort()
        if final:
            ready, self._held = self._held, []
        else:
            cutoff = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self._hold_ns
            n = next((i for i, e in enumerate(self._held) if e[0] > cutoff), len(self._held))
            if n == 0:
                return
            ready, self._held = self._held[:n], self._held[n:]
        self._out.write("\n".join(e[2] for e in ready) + "\n")
        self._out.flush()


def follow_loop(args: argparse.Namespace, out: TextIO, family: TraceFamily, follower, write: Callable[[list, bool], None]) -> None:
    """Drain every process until the traced one ends, the duration passes or a signal comes."""
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not interrupted():
            if follower is not None:
                follower.wait(0.0)
            family.poll()
            got = family.read()
            write(got, family.several)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not got:
                if not family.target.process.is_alive():
                    break
                time.sleep(0.01)
    except (KeyboardInterrupt, Interrupted):
        pass


def summary(members: list[tuple[int, str, list[_Row]]], as_json: bool, waited: float,
            ended: frozenset[int] | set[int] = frozenset(), output_dropped: int = 0) -> str:
    """Totals per site over every process, then each process's figures (``ended``: the PIDs of
    processes that exited while traced, said so; ``output_dropped``: event lines the output queue
    dropped, see _writer.py)."""
    totals: dict[str, _Row] = {}
    for _, _, rows in members:
        for r in rows:
            t = totals.setdefault(r.site, _Row(r.site, r.address, r.mode, 0, 0))
            if t.address != r.address:  # the site at different addresses (ASLR): no one address
                t.address = None
            t.hits += r.hits
            t.missed += r.missed
            t.vfork_hits += r.vfork_hits

    def ordered(rows) -> list[_Row]:
        return sorted(rows, key=lambda r: (-r.hits, r.site or ""))

    def row_json(r: _Row) -> dict:
        return {"site": r.site, "address": r.address, "mode": r.mode, "hits": r.hits,
                "delivered": r.hits - r.missed, "dropped": r.missed, "vfork_hits": r.vfork_hits}

    if as_json:
        return json.dumps({
            "summary": [row_json(r) for r in ordered(totals.values())],
            "processes": [{"pid": pid, "command": command, "probes": [row_json(r) for r in ordered(rows)],
                           **({"exited": True} if pid in ended else {})}
                          for pid, command, rows in members],
            "waited_s": round(waited, 6),
            "output_dropped": output_dropped,
        })

    def table(rows: list[_Row]) -> list[str]:
        width = max([len("PROBE")] + [len(r.site or "") for r in rows])
        lines = [f"{'PROBE':<{width}}  {'HITS':>10}  {'DELIVERED':>10}  {'DROPPED':>8}"]
        return lines + [f"{r.site:<{width}}  {r.hits:>10}  {r.hits - r.missed:>10}  {r.missed:>8}" for r in rows]

    lines = [f"all {plural(len(members), 'process', 'processes')}:"] + table(ordered(totals.values()))
    lines += vfork_lines([(r.site or "", r.vfork_hits) for r in ordered(totals.values())])
    for pid, command, rows in members:
        lines += ["", process_heading(pid, command, pid in ended)] + table(ordered(rows))
    lines.append(f"probes waited {waited:.6f} s in all for the rings to drain")
    note = output_note(output_dropped)
    if note is not None:
        lines.append(note)
    return "\n".join(lines)


def refuse_with_follow(args: argparse.Namespace) -> None:
    """What ``trace --follow`` does not take (raises SystemExit naming it)."""
    if args.perfetto is not None:
        raise SystemExit("djprobe trace: error: --perfetto writes one process's trace: not with --follow")

