"""Commands that are not the program the user means: ``#!`` scripts and wrappers that ``exec``
the real program (pyenv's ``python3`` shim is a shell script that execs the interpreter).

djprobe probes the process it starts as it is before ``main``; a script runs its interpreter
there, and probes do not follow ``exec`` (``--follow`` is not supported yet). These helpers
detect both cases so that the commands can say so instead of counting nothing in silence.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from ..errors import DjprobeError, SymbolNotFoundError

__all__ = ["script_interpreter", "script_note", "no_match_in_script", "ExecWatch"]

FOLLOW_HINT = (
    "djprobe does not follow exec yet (--follow is not supported): "
    "give the real program after -- to probe it"
)


def _command_path(argv: list[str]) -> str | None:
    if not argv:
        return None
    name = argv[0]
    if "/" in name:
        return name if os.path.isfile(name) else None
    return shutil.which(name)


def script_interpreter(argv: list[str]) -> str | None:
    """The ``#!`` line's interpreter (with its argument) if ``argv[0]`` is a script, else None."""
    path = _command_path(argv)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip().decode("utf-8", "replace")
    return line or None


def script_note(argv: list[str]) -> str | None:
    """What to tell the user about a command that is a script, or None for a binary."""
    interpreter = script_interpreter(argv)
    if interpreter is None:
        return None
    name = os.path.basename(argv[0])
    program = interpreter.split()[0]
    kind = "shell script" if os.path.basename(program) in ("sh", "bash", "dash", "zsh", "ksh") else "script"
    if os.path.basename(program) == "env" and len(interpreter.split()) > 1:
        program = interpreter.split()[-1]
    return (
        f"{name} is a {kind} run by {interpreter}; patterns apply to {program} (patterns without a "
        f"module to {program} itself), not to a program the script starts or execs; {FOLLOW_HINT}"
    )


@contextlib.contextmanager
def no_match_in_script(argv: list[str], note: str | None) -> Iterator[None]:
    """Around the resolution of patterns: a pattern that matches nothing in a script's
    interpreter says so (the note explaining it was printed before)."""
    try:
        yield
    except DjprobeError as exc:
        # also when the held command was killed for it (the error then says "not started")
        if note is None or not isinstance(exc if isinstance(exc, SymbolNotFoundError) else exc.__cause__, SymbolNotFoundError):
            raise
        exc.message = f"{exc} ({argv[0]} is a script: see the note above)"
        raise


def _comm(pid: int) -> str | None:
    # /proc/PID/comm stays readable for a zombie, until its parent (djprobe) reaps it
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


class ExecWatch:
    """Notices that a process replaced its program (``exec``): its ``comm`` changes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = _comm(pid)

    def note(self) -> str | None:
        """A message if the program changed since the watch began (call before reaping)."""
        after = _comm(self.pid)
        if self.before is None or after is None or after == self.before:
            return None
        return (
            f"process {self.pid} replaced its program by exec ({self.before} -> {after}); probes "
            f"end at the exec, so the counts are those of {self.before} only; {FOLLOW_HINT}"
        )
