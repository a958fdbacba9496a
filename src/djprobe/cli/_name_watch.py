"""``--name COMM`` with ``--follow``: processes of that name started after djprobe.

Every ``NEW_PROCESS_SCAN`` seconds ``/proc`` is read for processes named COMM that djprobe has
not seen; those that descend from a process djprobe already follows are left alone (their
parent's fork hook and exec hook take them in, or keep them apart), the others are attached
and probed like the ones found at the start. The scan is a poll: calls a new process makes
before it is found (within about ``NEW_PROCESS_SCAN`` seconds of its start, plus the time
to place the probes) are not counted, and a process that ends sooner is not seen at all. A
process caught inside its ``execve`` (its new name set, its arguments not yet: an empty
``/proc/PID/cmdline``, its mappings still being made) is left for the next scan.
"""

from __future__ import annotations

import os
import time
from typing import Iterable


NEW_PROCESS_SCAN = 0.1  # seconds between two reads of /proc
_MAX_DEPTH = 64


def processes_named(comm: str) -> list[int]:
    """Every running process whose name (``/proc/PID/comm``, 15 characters at most) is ``comm``,
    djprobe itself excepted, by PID."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().rstrip("\n")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if name == comm[:15] and state not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, known: set[int]) -> bool:
    """Whether ``pid`` or one of its ancestors is in ``known``."""
    for _ in range(_MAX_DEPTH):
        if pid in known:
            return True
        if pid <= 1:
            return False
        pid = _parent(pid)
    return False


def _in_exec(pid: int) -> bool:
    """Whether ``pid`` looks midway through ``execve``: no arguments yet (a kernel thread has
    none either: it is never taken)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return not f.read(1)
    except OSError:
        return True


def known_pids(processes: Iterable[object]) -> set[int]:
    """The PIDs of objects with a ``pid``."""
    return {p.pid for p in processes}  # type: ignore[attr-defined]


class NameWatch:
    """Finds processes named ``comm`` started since it was made (see the module docstring)."""

    def __init__(self, comm: str, present: Iterable[int], every: float = NEW_PROCESS_SCAN) -> None:
        """``present``: the processes taken at the start (every other one found is new: one
        started while those were being attached is found by the first scan)."""
        self.comm = comm
        self.every = every
        self.seen = set(present)
        self._next = time.monotonic()

    def new(self, known: set[int]) -> list[int]:
        """PIDs named ``comm`` not seen before and not descending from ``known`` (at most one
        read of /proc per ``every`` seconds: [] in between)."""
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.every
        found = []
        for pid in processes_named(self.comm):
            if pid in self.seen or _in_exec(pid):
                continue
            self.seen.add(pid)
            if not descends_from(pid, known):
                found.append(pid)
        return found
