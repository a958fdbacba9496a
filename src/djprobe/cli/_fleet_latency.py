"""``latency -p PID,PID...`` and ``latency --name COMM``: call durations in several processes.

Each process of the fleet is opened as ``count`` opens it (_fleet.open_member) with latency
probes, and read through a ``LatencyFamily`` of its own (_follow_latency.py, the reader of
``latency --follow``; with ``--follow`` it takes in the process's children and exec'd images
too). A report gives each function's figures over every process (histograms added bucket by
bucket), then each process's (``"processes": [{"pid", "command", "probes"}]`` in ``--json``);
with ``-i`` every process's figures start again from zero after each report. A process that
exits keeps its figures (its latency blocks stay readable), marked so in the reports.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from ..errors import DjprobeError, ProcessGoneError
from ._children import Placement
from ._fleet import Member, close_member, fleet_banner, open_fleet, process_ended, take_in
from ._follow_latency import LatencyFamily
from ._name_watch import NameWatch
from ._output import notice, print_refusals
from ._target import Interrupted, interrupted


@dataclass
class FleetRefusal:
    """A site one process of the fleet refused."""

    pid: int
    site: str
    reason: str


def run_fleet_latency(args: argparse.Namespace, out: TextIO, placement: Placement, write: Callable[..., None]) -> int:
    """``latency`` over the processes ``-p``/``--name`` give (see the module docstring); ``write``
    is latency's ``write_report``. Raises ProcessGoneError when every process ended before its
    probes went in, and what ``open_fleet`` raises (naming the process)."""
    members = open_fleet(args, placement)
    refused = [FleetRefusal(m.pid, r.site, r.reason) for m in members for r in m.refused]

    def report(interval: int, final: bool) -> None:
        readings = [reading for m in members for reading in m.reader.read()]  # type: ignore[attr-defined]
        processes = [(p.pid, p.command, rows) for p, rows in readings]
        ended = {m.pid for m in members if m.ended}
        write(out, args, LatencyFamily.totals(readings), processes, refused, None, interval=interval, final=final,
              ended=ended)
        if args.interval and not final:
            LatencyFamily.reset(readings)

    interval = 0
    try:
        if not members:
            raise ProcessGoneError("every process asked for ended before its probes went in")
        for m in members:
            _read_with(m)
        notice(fleet_banner(members, args.patterns))
        print_refusals((f"{r.pid}: {r.site}", r.reason) for r in refused)
        newcomers = NameWatch(args.name, [m.pid for m in members]) if args.name and args.follow else None
        for _ in _every_interval(args, members, newcomers, placement):
            interval += 1
            report(interval, final=False)
        for m in members:
            process_ended(m)
    finally:
        for m in members:  # the figures freeze as each one's probes come out
            try:
                close_member(m)
            except DjprobeError as exc:
                notice(f"process {m.pid}: {exc}")
    report(interval + 1, final=True)
    return 0


def _read_with(member: Member) -> None:
    member.reader = LatencyFamily(member.family, member.target, member.sites, member.command)  # type: ignore[arg-type]


def _every_interval(args: argparse.Namespace, members: list[Member], newcomers: NameWatch | None,
                    placement: Placement):
    """Yield every ``-i`` seconds until every process has ended, the duration passes or a signal
    comes; meanwhile serve the loader hooks, take in children and new processes of the name."""
    start = time.monotonic()
    next_report = start + args.interval if args.interval else None
    try:
        while not interrupted():
            now = time.monotonic()
            if args.duration is not None and now - start >= args.duration:
                return
            if newcomers is not None:
                take_in(args, members, newcomers, placement, _read_with)
            if all([process_ended(m) for m in members]):
                return
            if next_report is not None and now >= next_report:
                next_report += args.interval
                yield
            waited = False
            for m in members:
                if m.family is not None:
                    m.family.poll()  # type: ignore[attr-defined]
                if m.follower is not None and not m.ended:
                    m.follower.wait(0.0)  # type: ignore[attr-defined]
                    waited = True
            time.sleep(0.02 if waited else 0.05)
    except (KeyboardInterrupt, Interrupted):
        return
