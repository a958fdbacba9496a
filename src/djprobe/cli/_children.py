"""The commands' side of children: without --follow, a child never counts as its parent."""

from __future__ import annotations

from ..errors import DjprobeError
from ..forks import ForkGuard
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
