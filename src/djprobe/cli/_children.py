"""The commands' side of children: without --follow, a child never counts as its parent."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import DjprobeError
from ..follow import ChildFollower
from ..forks import ForkGuard
from ..pending import LibraryFollower
from ..probes import ProbedProcess
from ._output import notice


def guard_children(target: ProbedProcess) -> ForkGuard | None:
    """Place the fork hook (see forks.py); a process where it cannot go is told on stderr."""
    guard = ForkGuard(target)
    try:
        guard.install()
    except DjprobeError as exc:
        notice(f"note: children forked by process {target.pid} would add to its counts: {exc}", wrap=True)
        return None
    return guard


def follow_children(target: ProbedProcess, guard: ForkGuard | None, sites: Callable[[], list]) -> ChildFollower | None:
    """``--follow``: take in forked children (see follow.py); None where the fork hook is not."""
    if guard is None:
        notice("note: --follow: children cannot be followed without the fork hook")
        return None
    children = ChildFollower(target, guard, sites)
    children.enable()
    return children


def idle_with(follower: LibraryFollower | None, children: ChildFollower | None) -> Callable[[float], None] | None:
    """The polling loop's wait: the loader hook's, and taking in children every turn."""
    if follower is None and children is None:
        return None

    def idle(seconds: float) -> None:
        if follower is not None:
            follower.wait(0.01 if children is not None else seconds)
        else:
            time.sleep(0.01)
        if children is not None:
            children.poll()

    return idle


@dataclass
class _Parent:
    pid: int
    command: str
    probes: list
    refused: list

    def sites(self) -> list:
        return self.probes


def report_family(out, args, pid: int, probes: list, refused: list, children: ChildFollower, interval: int,
                  final: bool, status: int | None) -> None:
    """The report of a process and its followed children: totals, then each process."""
    from ._fleet import report

    members = [_Parent(pid, children.command, probes, refused)] + list(children.children)
    report(out, args, members, interval, final, status)
