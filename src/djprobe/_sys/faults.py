"""Fault injection for tests: kill the tracer before its Nth operation on a target.

Every ptrace request, every signal sent to a target thread and every ``/proc/PID/mem`` read or
write in the system layer calls :func:`tick` first, behind one attribute check::

    if faults.enabled: faults.tick("ptrace", request, pid)

Two environment variables, read once at import, switch it on:

``DJPROBE_KILL_AT_OP=N``
    the Nth tick (1-based) kills this process with SIGKILL *before* the operation is made, so
    that every prefix of the operation sequence can be a tracer's last act.
``DJPROBE_COUNT_OPS=PATH``
    the number of ticks and one ``N WHAT`` line per tick are written to PATH when the process
    exits (``atexit``), and also just before a kill requested by ``DJPROBE_KILL_AT_OP`` (then
    the last line is the operation that was not made).

``DJPROBE_KILL_KIND=PREFIX``
    only operations whose description (see :func:`describe`) starts with PREFIX count, e.g.
    ``mem-write``: a sweep can then kill before every write and nothing else.

With neither of the first two set, ``enabled`` is False and a hook costs one attribute check. A forked child
(e.g. spawn's child before ``exec``) does not count or kill.
"""

from __future__ import annotations

import atexit
import os
import signal

KILL_VAR = "DJPROBE_KILL_AT_OP"
COUNT_VAR = "DJPROBE_COUNT_OPS"
KIND_VAR = "DJPROBE_KILL_KIND"

_PTRACE_NAMES = {
    0: "TRACEME", 1: "PEEKTEXT", 2: "PEEKDATA", 3: "PEEKUSER", 4: "POKETEXT", 5: "POKEDATA",
    6: "POKEUSER", 7: "CONT", 8: "KILL", 9: "SINGLESTEP", 12: "GETREGS", 13: "SETREGS",
    14: "GETFPREGS", 15: "SETFPREGS", 16: "ATTACH", 17: "DETACH", 24: "SYSCALL",
    0x4200: "SETOPTIONS", 0x4201: "GETEVENTMSG", 0x4202: "GETSIGINFO", 0x4203: "SETSIGINFO",
    0x4204: "GETREGSET", 0x4205: "SETREGSET", 0x4206: "SEIZE", 0x4207: "INTERRUPT",
    0x4208: "LISTEN", 0x4209: "PEEKSIGINFO", 0x420A: "GETSIGMASK", 0x420B: "SETSIGMASK",
}  # fmt: skip

enabled: bool = False
"""True when either variable is set: the hooks call :func:`tick`."""

kill_at: int = 0
"""The operation number (1-based) before which the tracer kills itself; 0 for never."""

count_path: str | None = None
"""Where the operation log goes at exit; None for nowhere."""

count: int = 0
"""Ticks so far (in this process)."""

only_kind: str = ""
"""When set, only operations whose description starts with it are counted."""

log: list[str] = []
"""One description per tick, kept only when ``count_path`` is set."""


def describe(kind: str, *args: int) -> str:
    """A short text for an operation: ``ptrace GETREGS 1234``, ``mem-read 0x401000+16``."""
    if kind == "ptrace" and args:
        name = _PTRACE_NAMES.get(args[0], hex(args[0]))
        return f"ptrace {name} {' '.join(str(a) for a in args[1:])}".rstrip()
    if kind in ("mem-read", "mem-write") and len(args) == 2:
        return f"{kind} {args[0]:#x}+{args[1]}"
    return " ".join([kind, *(str(a) for a in args)])


def configure(kill: int = 0, path: str | None = None, kind: str = "") -> None:
    """Set the kill point, the log path and the kind of operations counted (what import does
    from the environment); resets the count and the log. Raises ValueError for a negative
    ``kill``."""
    global enabled, kill_at, count_path, count, only_kind
    if kill < 0:
        raise ValueError(f"{KILL_VAR} must be >= 0, not {kill}")
    kill_at, count_path, count, only_kind = kill, path, 0, kind
    log.clear()
    enabled = bool(kill or path)


def tick(kind: str, *args: int) -> None:
    """Count one operation about to be made; kill this process first if it is the chosen one."""
    global count
    what = describe(kind, *args) if (count_path is not None or only_kind) else ""
    if only_kind and not what.startswith(only_kind):
        return
    count += 1
    if count_path is not None:
        log.append(what)
    if count == kill_at:
        if count_path is not None:
            try:
                write_log()
            except OSError:
                pass  # the kill matters more than the log
        os.kill(os.getpid(), signal.SIGKILL)


def write_log(path: str | None = None) -> None:
    """Write ``count N`` and the ``N WHAT`` lines to ``path`` (default ``count_path``)."""
    path = path or count_path
    if path is None:
        return
    lines = [f"count {count}"] + [f"{i} {what}" for i, what in enumerate(log, 1)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def read_log(path: str) -> tuple[int, list[str]]:
    """Read a file written by :func:`write_log`: (count, descriptions in order)."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].startswith("count "):
        raise ValueError(f"{path}: not an operation log")
    whats = [line.split(" ", 1)[1] for line in lines[1:]]
    return int(lines[0].split()[1]), whats


def _disable() -> None:
    """In a forked child: neither count nor kill nor write the parent's log."""
    global enabled, kill_at, count_path
    enabled, kill_at, count_path = False, 0, None


def _at_exit() -> None:
    if enabled and count_path is not None:
        write_log()


def _from_environment() -> None:
    raw = os.environ.get(KILL_VAR, "")
    try:
        kill = int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"{KILL_VAR} must be an integer, not {raw!r}") from None
    configure(kill, os.environ.get(COUNT_VAR) or None, os.environ.get(KIND_VAR, ""))


_from_environment()
atexit.register(_at_exit)
os.register_at_fork(after_in_child=_disable)
