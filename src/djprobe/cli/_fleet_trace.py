"""``trace -p PID,PID...`` and ``trace --name COMM``: the events of several processes, in time order.

Each process of the fleet is opened as ``count`` opens it (_fleet.open_member: its own
``ProbedProcess``, probes, loader hook and fork hook, and with ``--follow`` its own ``Family``)
with trace's record probes, and read through a ``TraceFamily`` of its own (_follow_trace.py,
the reader of ``trace --follow``): one merger, ``TimeOrderedWriter``, puts every process's events in
time order, text lines marked ``[pid N]`` once there is more than one process, JSON lines with
``"pid"``. A process that exits while traced keeps its events and figures; the notice and the
summary say it exited. The summary gives the totals per site, then each process's figures.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, TextIO

from ..errors import ProcessGoneError
from ..events import EventBatch
from ._children import Placement
from ._fleet import Member, close_member, fleet_banner, open_fleet, process_ended, take_in
from ._follow_trace import TimeOrderedWriter, TraceFamily, summary
from ._name_watch import NameWatch
from ._output import notice, print_refusals, print_traps
from ._target import Interrupted, interrupted
from ._writer import dropped_lines, write_kept

TextLines = Callable[[EventBatch, str], list[str]]
JsonLines = Callable[[EventBatch, int], list[str]]


def run_fleet_trace(args: argparse.Namespace, out: TextIO, placement: Placement, text: TextLines,
                    as_json: JsonLines) -> int:
    """``trace`` over the processes ``-p``/``--name`` give (see the module docstring); ``text`` and
    ``as_json`` write one batch's lines. Raises ProcessGoneError when every process ended before
    its probes went in, and what ``open_fleet`` raises (naming the process)."""
    members = open_fleet(args, placement)
    waited: dict[int, float] = {}
    last: list[tuple[int, EventBatch]] = []  # the processes' last events, written together

    def several() -> bool:
        return len(members) > 1 or any(m.reader.several for m in members)  # type: ignore[attr-defined]

    merger = TimeOrderedWriter(out, text, as_json, args.json)

    def write(got: list[tuple[int, EventBatch]], final: bool = False) -> None:
        merger.write(got, several(), final)

    def last_events(member: Member) -> None:  # its probes are out, its areas still mapped
        reader: TraceFamily = member.reader  # type: ignore[assignment]
        last.extend(reader.read(complete=True))
        waited[member.pid] = reader.waited_seconds()

    try:
        if not members:
            raise ProcessGoneError("every process asked for ended before its probes went in")
        for m in members:
            _read_with(m)
        notice(fleet_banner(members, args.patterns))
        print_refusals((f"{m.pid}: {r.site}", r.reason) for m in members for r in m.refused)
        print_traps({d.site: d for m in members for d in m.probes}.values())
        if not args.json:
            print(f"{'TIME':<15} {'TID':<7} PROBE ARGS", file=out, flush=True)
        newcomers = NameWatch(args.name, [m.pid for m in members]) if args.name and args.follow else None
        _loop(args, members, newcomers, placement, write)
        for m in members:
            process_ended(m)
    finally:
        for m in members:
            try:
                close_member(m, last_events)
            except Exception as exc:  # noqa: BLE001 - the other processes' probes must come out too
                notice(f"process {m.pid}: {exc}")
    write(last, final=True)
    rows = [row for m in members for row in m.reader.members(m.pid, m.command, m.sites())]  # type: ignore[attr-defined]
    ended = {m.pid for m in members if m.ended}
    text = summary(rows, args.json, sum(waited.values()), ended, output_dropped=dropped_lines(out))
    write_kept(out, text + "\n")
    return 0


def _read_with(member: Member) -> None:
    member.reader = TraceFamily(member.family, member.target)  # type: ignore[arg-type]


def _loop(args: argparse.Namespace, members: list[Member], newcomers: NameWatch | None, placement: Placement,
          write: Callable[[list[tuple[int, EventBatch]]], None]) -> None:
    """Drain every process until all have ended, the duration passes or a signal comes."""
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not interrupted():
            if newcomers is not None:
                take_in(args, members, newcomers, placement, _read_with)
            got: list[tuple[int, EventBatch]] = []
            for m in members:
                if m.follower is not None and not m.ended and m.target.process.is_alive():
                    m.follower.wait(0.0)  # type: ignore[attr-defined]
                reader: TraceFamily = m.reader  # type: ignore[assignment]
                reader.poll()
                got += reader.read()
            write(got)
            if deadline is not None and time.monotonic() >= deadline:
                break
            running = [not process_ended(m) for m in members]  # each exit said when seen
            if not got:
                if not any(running):
                    break
                time.sleep(0.01)
    except (KeyboardInterrupt, Interrupted):
        pass
