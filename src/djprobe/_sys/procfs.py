"""/proc/PID/maps parsing and /proc/PID/mem access. No policy: callers decide what to do."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import faults
from ..errors import ProcessGoneError, TargetFaultError, TracePermissionError


@dataclass(frozen=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "r-xp"
    offset: int
    dev: str
    inode: int
    path: str  # "" for anonymous; "[stack]", "[vdso]", ... for special mappings

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def is_file(self) -> bool:
        return self.path.startswith("/")

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.start <= address < self.end


def parse_maps(text: str) -> list[MapEntry]:
    """Parse the text of a /proc/PID/maps file."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(None, 5)
        addr, perms, offset, dev, inode = parts[:5]
        path = parts[5].strip() if len(parts) > 5 else ""
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        start, end = (int(x, 16) for x in addr.split("-"))
        entries.append(MapEntry(start, end, perms, int(offset, 16), dev, int(inode), path))
    return entries


def _proc_error(pid: int, exc: OSError, what: str) -> Exception:
    if exc.errno == errno.ENOENT or exc.errno == errno.ESRCH:
        return ProcessGoneError(f"no such process: {pid}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return TracePermissionError(f"not permitted to {what} of process {pid}: {exc.strerror}")
    return exc


def _task_state(path: str) -> str:
    """The state letter in ``path``/stat ('R', 'S', 'Z', ...), or '' if it cannot be read."""
    try:
        with open(f"{path}/stat") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.rfind(")") + 2 :][:1]


def start_stack(pid: int) -> int:
    """The main thread's initial stack pointer (``startstack``, field 28 of ``/proc/PID/stat``):
    the address of ``argc``, above which the stack holds only ``argv``, the environment, the
    auxiliary vector and their strings, never a frame. 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[28 - 3])  # fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return 0


def proc_dir(pid: int) -> str:
    """The /proc directory that shows the address space of process ``pid``: ``/proc/PID``, or
    ``/proc/PID/task/TID`` of a live thread once the thread-group leader has exited while other
    threads run (a zombie leader's maps, mem, auxv and exe are empty or absent)."""
    base = f"/proc/{pid}"
    if _task_state(base) not in ("Z", "X"):
        return base
    try:
        tids = sorted(int(name) for name in os.listdir(f"{base}/task"))
    except OSError:
        return base
    for tid in tids:
        path = f"{base}/task/{tid}"
        if _task_state(path) not in ("", "Z", "X"):
            return path
    return base


def read_maps(pid: int) -> list[MapEntry]:
    """Read and parse /proc/PID/maps (through a live thread if the leader has exited).

    Raises ProcessGoneError, TracePermissionError."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
        if not text:  # a zombie leader (or a kernel thread): look through a live thread
            base = proc_dir(pid)
            if base != f"/proc/{pid}":
                with open(f"{base}/maps") as f:
                    text = f.read()
        return parse_maps(text)
    except OSError as exc:
        raise _proc_error(pid, exc, "read the memory map") from exc


def find_mapping(maps: list[MapEntry], address: int) -> MapEntry | None:
    """The mapping that contains ``address``, or None."""
    for entry in maps:
        if entry.start <= address < entry.end:
            return entry
    return None


class ProcessMemory:
    """Read and write a process's memory through /proc/PID/mem.

    Writing works on read-only (e.g. code) pages too, as the kernel does for a debugger
    (FOLL_FORCE). The caller is responsible for writing only where it is safe. Opened through a
    live thread when the leader has exited (:func:`proc_dir`); an open descriptor keeps working
    whichever thread exits later.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"{proc_dir(pid)}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _proc_error(pid, exc, "open the memory") from exc

    def read(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes at ``address``. Raises TargetFaultError if not all is readable."""
        if faults.enabled: faults.tick("mem-read", address, size)  # fmt: skip
        try:
            data = os.pread(self._fd, size, address)
        except OSError as exc:
            raise TargetFaultError(
                f"cannot read {size} bytes at {address:#x} in process {self.pid}: {exc.strerror}",
                address=address,
            ) from exc
        if len(data) != size:
            raise TargetFaultError(
                f"short read at {address:#x} in process {self.pid}: {len(data)} of {size} bytes",
                address=address,
            )
        return data

    def read_into(self, address: int, buffer: memoryview) -> int:
        """Read into ``buffer`` (writable, bytes) from ``address``; returns how many bytes were
        read: fewer than asked when an unreadable page stops the read, 0 when the first one is
        unreadable. No allocation: for reading much memory in chunks."""
        if faults.enabled: faults.tick("mem-read", address, len(buffer))  # fmt: skip
        try:
            return os.preadv(self._fd, [buffer], address)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT):
                return 0
            raise TargetFaultError(
                f"cannot read at {address:#x} in process {self.pid}: {exc.strerror}", address=address
            ) from exc

    def write(self, address: int, data: bytes) -> None:
        """Write ``data`` at ``address``. Raises TargetFaultError if not all was written."""
        if faults.enabled: faults.tick("mem-write", address, len(data))  # fmt: skip
        try:
            done = os.pwrite(self._fd, data, address)
        except OSError as exc:
            raise TargetFaultError(
                f"cannot write {len(data)} bytes at {address:#x} in process {self.pid}: {exc.strerror}",
                address=address,
            ) from exc
        if done != len(data):
            raise TargetFaultError(
                f"short write at {address:#x} in process {self.pid}: {done} of {len(data)} bytes",
                address=address,
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
