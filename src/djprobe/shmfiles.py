"""The names of probe-area data files in ``/dev/shm``, and removing the ones a killed tracer left.

A probe area's data part is a file the tracer creates in ``/dev/shm`` and unlinks as soon as the
target has opened it (see :mod:`djprobe.regions`). Only a tracer killed (SIGKILL) in that window
of one injected syscall leaves the name behind. The name says who made the file and for whom,
``djprobe-TARGET-TRACER-RANDOM``, so that :func:`remove_stale` can remove the files whose
creator is gone: only the creator ever opens a file by its name (the target opens it through a
syscall the tracer injects), so once it is gone the name serves nothing and only keeps the
memory. Files named by earlier versions (``djprobe-TARGET-RANDOM``) are stale when their target
is gone.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
from dataclasses import dataclass

__all__ = ["SHM_DIR", "AREA_PATH_RE", "AreaFile", "Staleness", "new_area_path", "area_files", "remove_stale"]

SHM_DIR = "/dev/shm"

#: A probe area's data file, as named by this version (target, tracer, random) or an earlier one
#: (target, random). /proc/PID/maps shows this path for the data part (without " (deleted)").
AREA_PATH_RE = re.compile(r"^/dev/shm/djprobe-(\d+)-(?:(\d+)-)?([0-9a-f]+)$")

# A process that started this long after the file was written is not the one that wrote it.
_START_SLACK = 2.0


class Staleness(enum.Enum):
    """Why an area file may (or may not) be removed."""

    IN_USE = "creator alive"  # the tracer may still be placing the area: never touched
    CREATOR_GONE = "creator gone"  # tracer gone (target alive or not)
    BOTH_GONE = "creator and target gone"
    TARGET_GONE = "target gone (no creator recorded)"  # a file named by an earlier version


@dataclass(frozen=True)
class AreaFile:
    """A ``/dev/shm/djprobe-*`` file: who it was made for and by, its size, whether it is stale."""

    path: str
    target_pid: int
    tracer_pid: int | None
    size: int
    staleness: Staleness

    @property
    def stale(self) -> bool:
        return self.staleness is not Staleness.IN_USE

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "target_pid": self.target_pid,
            "tracer_pid": self.tracer_pid,
            "size": self.size,
            "state": self.staleness.value,
        }


def new_area_path(target_pid: int, tracer_pid: int | None = None) -> str:
    """A fresh name for the data file of a probe area of ``target_pid`` made by this process."""
    tracer = os.getpid() if tracer_pid is None else tracer_pid
    return os.path.join(SHM_DIR, f"djprobe-{target_pid}-{tracer}-{secrets.token_hex(6)}")


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _started_at(pid: int, boot: float) -> float | None:
    """When process ``pid`` started (Unix seconds), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return 0.0  # exists; assume it is old enough to be the creator
    fields = stat[stat.rfind(")") + 2 :].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int, since: float, boot: float) -> bool:
    """Is ``pid`` a process that existed when a file written at ``since`` was made?"""
    started = _started_at(pid, boot)
    return started is not None and started <= since + _START_SLACK


def area_files(shm_dir: str = SHM_DIR) -> list[AreaFile]:
    """Every probe-area file in ``shm_dir``, with whether its creator and target still live.
    A file that disappears while being looked at is left out."""
    boot = _boot_time()
    found: list[AreaFile] = []
    try:
        names = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(shm_dir, name)
        m = AREA_PATH_RE.match(os.path.join(SHM_DIR, name))
        if m is None:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        target = int(m.group(1))
        tracer = int(m.group(2)) if m.group(2) else None
        since = st.st_mtime
        target_alive = _alive(target, since, boot)
        if tracer is None:
            state = Staleness.IN_USE if target_alive else Staleness.TARGET_GONE
        elif _alive(tracer, since, boot):
            state = Staleness.IN_USE
        else:
            state = Staleness.CREATOR_GONE if target_alive else Staleness.BOTH_GONE
        found.append(AreaFile(path, target, tracer, st.st_size, state))
    return found


def remove_stale(shm_dir: str = SHM_DIR) -> tuple[list[AreaFile], list[tuple[AreaFile, str]]]:
    """Remove the stale probe-area files of ``shm_dir``: returns the removed ones and the ones
    that could not be removed, with the reason. A target that still maps such a file keeps its
    memory until it unmaps it (``djprobe cleanup -p PID``) or exits."""
    removed: list[AreaFile] = []
    failed: list[tuple[AreaFile, str]] = []
    for f in area_files(shm_dir):
        if not f.stale:
            continue
        try:
            os.unlink(f.path)
        except FileNotFoundError:
            continue  # someone else removed it meanwhile
        except OSError as exc:
            failed.append((f, exc.strerror or str(exc)))
            continue
        removed.append(f)
    return removed, failed

