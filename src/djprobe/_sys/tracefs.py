"""tracefs ``uprobe_events``: define, list and delete uprobe trace events. No policy.

A uprobe defined here only *names* a probe point (file + offset); it is not placed in any process
until a perf event opened on its id (``events/GROUP/NAME/id``) is enabled for a task, and every
breakpoint goes with the last such perf event. A definition outlives its creator, so callers name
theirs so that they can be found and removed later.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def tracefs_root(mount: bool = True) -> Path:
    """The tracefs directory that has ``uprobe_events``; mounts tracefs at /sys/kernel/tracing if
    no tracefs is mounted and ``mount`` (root only). Raises OSError(ENOENT) if there is none."""
    for root in CANDIDATES:
        if (root / "uprobe_events").exists():
            return root
    if mount and os.geteuid() == 0 and CANDIDATES[0].is_dir():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"nodev", str(CANDIDATES[0]).encode(), b"tracefs", 0, None) == 0:
            if (CANDIDATES[0] / "uprobe_events").exists():
                return CANDIDATES[0]
    raise OSError(_errno.ENOENT, "no tracefs with uprobe_events (mount tracefs at /sys/kernel/tracing)")


@dataclass(frozen=True)
class UprobeEvent:
    """One line of ``uprobe_events``: ``p:GROUP/NAME PATH:0xOFFSET``."""

    group: str
    name: str
    path: str
    offset: int
    retprobe: bool = False


def _write(root: Path, line: str) -> None:
    fd = os.open(root / "uprobe_events", os.O_WRONLY | os.O_APPEND)  # never O_TRUNC: that deletes all
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def add_uprobe(root: Path, group: str, name: str, path: str, offset: int) -> int:
    """Define ``GROUP/NAME`` at ``PATH:offset``; returns its trace event id (for perf)."""
    for part in (group, name):
        if not _NAME.match(part):
            raise ValueError(f"not a valid trace event name: {part!r}")
    if ":" in path or " " in path:
        raise ValueError(f"a uprobe path may not hold ':' or spaces: {path!r}")
    _write(root, f"p:{group}/{name} {path}:{offset:#x}")
    return event_id(root, group, name)


def event_id(root: Path, group: str, name: str) -> int:
    return int((root / "events" / group / name / "id").read_text())


def delete_uprobe(root: Path, group: str, name: str) -> None:
    """Delete ``GROUP/NAME``. Raises OSError(EBUSY) while a perf event still uses it, ENOENT if gone."""
    _write(root, f"-:{group}/{name}")


def list_uprobes(root: Path) -> list[UprobeEvent]:
    out = []
    for line in (root / "uprobe_events").read_text().splitlines():
        m = re.match(r"^([pr]):([^/\s]+)/(\S+)\s+(\S+):(0x[0-9a-fA-F]+)", line)
        if m:
            out.append(UprobeEvent(m.group(2), m.group(3), m.group(4), int(m.group(5), 16), m.group(1) == "r"))
    return out
