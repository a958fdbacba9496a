"""Shared pieces of the commands that probe a live target: -p PID / -- COMMAND, patterns, signals."""

from __future__ import annotations

import argparse
import errno as _errno
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import os
import subprocess

from ..errors import DjprobeError, InvalidSiteError, SymbolNotFoundError
from ..module_globs import resolve_pattern
from ..probes import Djprobe, ProbedProcess, attach, spawn
from ..pending import is_missing_module
from ..debuginfo import prototype_at
from ..prototypes import split_prototype
from ..sites import RETURN_SUFFIX, split_return_spec


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def add_target_arguments(parser: argparse.ArgumentParser, *, patterns_optional: bool = False) -> None:
    parser.add_argument("-p", "--pid", type=_pid_list, metavar="PID[,PID...]",
                        help="probe this running process, or each of several (PID,PID,...)")
    parser.add_argument(
        "--pending",
        action="store_true",
        help="with -p: a pattern naming a library not loaded yet waits for it (always so for a command after --)",
    )
    parser.add_argument("--name", metavar="COMM",
                        help="probe every running process with this name (/proc/PID/comm); with -f also those started later")
    parser.add_argument("-d", "--duration", type=positive_seconds, help="stop after this many seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--no-trap",
        action="store_true",
        help="never fall back to a kernel uprobe (a trap, ~1 us per hit) where no jump fits: refuse the site",
    )
    parser.add_argument(
        "patterns",
        nargs="*" if patterns_optional else "+",
        metavar="PATTERN",
        help="[MODULE:]FUNCTION[+OFF], globs allowed (libc:str*, '*:*' for every function of every "
        "module), FUNCTION%%return for its returns; no module means the main executable",
    )


def _pid_list(text: str) -> list[int]:
    from ._fleet import pid_list

    return pid_list(text)


def open_target(args: argparse.Namespace) -> ProbedProcess:
    """Attach to -p PID, or spawn the command given after `--` (held before main)."""
    if args.pid is not None and args.command_argv:
        raise InvalidSiteError("give either -p PID or -- COMMAND, not both")
    if getattr(args, "name", None) or (args.pid is not None and len(args.pid) > 1):
        raise InvalidSiteError(f"{args.command} takes one process (-p PID or -- COMMAND), not several")
    if args.pid is not None:
        (pid,) = args.pid
        target = attach(pid)
    elif args.command_argv:
        target = spawn(args.command_argv)
    else:
        raise InvalidSiteError("no target: give -p PID or -- COMMAND [ARG...]")
    target.trap_fallback = not getattr(args, "no_trap", False)
    return target


@dataclass
class Refusal:
    site: str
    reason: str


class NotStartedError(DjprobeError):
    """The command given after ``--`` was killed before its ``main``: djprobe would not trace it
    (a pattern matched nothing, every site was refused, or djprobe was told to end)."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


def _held_command(target: ProbedProcess) -> subprocess.Popen | None:
    """The command djprobe spawned, while it is still held before ``main``; else None."""
    popen = getattr(target.process, "popen", None)
    # (no popen.poll() here: a wait on a traced child could consume one of its ptrace stops)
    if popen is None or not target.process.stopped or not target.process.is_alive():
        return None
    return popen


def _not_started(target: ProbedProcess, popen: subprocess.Popen, reason: str, code: int) -> NotStartedError:
    """Kill the held command (it has run nothing of its own: only the loader), reap it and
    return the error that says so."""
    try:
        popen.kill()  # SIGKILL also ends a ptrace-stopped process
        popen.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pass
    target.close()  # the process is gone: nothing to undo, only the tracer's side to drop
    name = os.path.basename(str(popen.args[0] if isinstance(popen.args, (list, tuple)) else popen.args))
    return NotStartedError(f"{name}: not started: {reason}", errno=code)


def make_probes(
    target: ProbedProcess,
    patterns: list[str],
    *,
    record: bool = False,
    registers: str = "all",
    lossless: bool = False,
    at: str | None = None,
    pending: list[str] | None = None,
    debuginfo: bool = False,
) -> tuple[list[Djprobe], list[Refusal]]:
    """One probe per distinct address matched by the patterns; refusals with their reasons.

    A command spawned by djprobe (still held before ``main``) that will not be traced is killed
    before it runs: a pattern matches nothing or cannot be resolved, no site takes a probe, or a
    signal asked djprobe to end meanwhile. Raises NotStartedError then (with the reason).
    With ``pending`` (a list), a pattern whose module is not loaded is appended to it instead
    of being an error (it is applied when the library is loaded: see ``pending.py``).
    """
    held = _held_command(target)
    try:
        probes, refused = _make_probes(target, patterns, record=record, registers=registers, lossless=lossless, at=at,
                                       pending=pending, debuginfo=debuginfo)
    except BaseException as exc:
        if held is not None and target.process.is_alive():
            reason = str(exc) if isinstance(exc, DjprobeError) else f"interrupted ({type(exc).__name__})"
            code = getattr(exc, "errno", 0) or _errno.EINTR
            raise _not_started(target, held, reason, code) from exc
        raise
    if held is not None and target.process.is_alive():
        if not probes and not pending:
            shown = "; ".join(f"{r.site}: {r.reason}" for r in refused[:3])
            more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
            raise _not_started(target, held, f"no site took a probe: {shown}{more}", _errno.EINVAL)
        if interrupted():
            raise _not_started(target, held, f"djprobe got {interrupted()} before it started", _errno.EINTR)
    return probes, refused


def _make_probes(
    target: ProbedProcess,
    patterns: list[str],
    *,
    record: bool = False,
    registers: str = "all",
    lossless: bool = False,
    at: str | None = None,
    pending: list[str] | None = None,
    debuginfo: bool = False,
) -> tuple[list[Djprobe], list[Refusal]]:
    """One probe per distinct address matched by the patterns (``PATTERN%return``: a return probe
    per function; ``at="latency"``: a latency probe per function; ``PATTERN(char *s, long n)``:
    with that prototype); refusals with their reasons. With ``debuginfo``, a recording entry probe
    without a written prototype takes the one DWARF gives its function (``djprobe.debuginfo``)."""
    symbols = target.symbols
    main = symbols.modules[0].name if symbols.modules else None
    probes: dict[tuple[int, bool], Djprobe] = {}
    refused: list[Refusal] = []
    for pattern in patterns:
        spec, prototype = split_prototype(pattern)
        spec, at_return = split_return_spec(spec)
        if ":" not in spec and not spec.startswith("0x") and main is not None:
            spec = f"{main}:{spec}"
        try:
            sites = resolve_pattern(symbols, spec)
        except SymbolNotFoundError as exc:
            if pending is not None and is_missing_module(exc):
                pending.append(pattern)
                continue
            hint = " (--pending waits for a library loaded later)" if is_missing_module(exc) else ""
            raise SymbolNotFoundError(f"pattern {pattern!r} matches nothing: {exc}{hint}") from exc
        for site in sites:
            key = (site.address, at_return)
            if key in probes:
                continue
            if at == "latency" and at_return:
                raise InvalidSiteError(f"pattern {pattern!r}: a latency probe names the function, without %return")
            typed = prototype
            if typed is None and debuginfo and record and not at_return and site.function is not None \
                    and site.offset == 0 and site.module is not None:
                typed = prototype_at(site.module, site.address)
            djp = Djprobe(
                site.address, record=record, registers=registers, lossless=lossless,
                at=at or ("return" if at_return else "entry"),
                prototype=typed if record else None,
            )
            djp.site = site.name + (RETURN_SUFFIX if at_return else "")
            probes[key] = djp
    placed = list(probes.values())
    errors = target.register_many(placed)
    bad = {id(d) for d, _ in errors}
    for djp, exc in errors:
        refused.append(Refusal(djp.site or hex(djp.address or 0), getattr(exc, "reason", None) or str(exc)))
    return [d for d in placed if id(d) not in bad], refused


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C/SIGTERM/SIGHUP arrived while djprobe was busy: end now."""


_pending: list[str] = []


def interrupted() -> str | None:
    """The name of the signal that asked the command to end, if one arrived."""
    return _pending[0] if _pending else None


def install_signal_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the command cleanly. The first one only sets a flag that
    the waiting loops check (:func:`interrupted`): an exception raised in the middle of placing
    or removing a probe (or swallowed by code that catches Exception) could leave a jump in the
    target or be lost. A second signal raises Interrupted at once."""

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if _pending:
            raise Interrupted(name)
        _pending.append(name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def run_until_done(
    target: ProbedProcess, duration: float | None, interval: float | None = None, idle: "Callable[[float], None] | None" = None
) -> Iterator[None]:
    """Yield every `interval` seconds (or every 0.1 s) until the duration passes, the target
    ends, or Ctrl-C/SIGTERM. Between checks, ``idle(seconds)`` is called instead of sleeping
    (it may return early: the loader hook's wait)."""
    start = time.monotonic()
    next_report = start + interval if interval else None
    try:
        while True:
            now = time.monotonic()
            if interrupted():
                return
            if duration is not None and now - start >= duration:
                return
            if not target.process.is_alive():
                return
            if next_report is not None and now >= next_report:
                next_report += interval  # type: ignore[operator]
                yield
            if idle is not None:
                idle(0.05)
            else:
                time.sleep(0.05)
    except (KeyboardInterrupt, Interrupted):
        return


def exit_status(target: ProbedProcess) -> int:
    """The spawned command's exit status (128+N for a signal), or 0 when attached by PID.

    Call it once the probes are out. If SIGTERM, SIGINT or SIGHUP asked djprobe to end, the
    command gets that signal now, as a shell or ``timeout`` would pass it on, and so does every
    such signal that arrives while djprobe waits for it. SIGINT is not sent again when it came
    from the terminal, which sends it to the whole foreground group (the command included).
    """
    popen = getattr(target.process, "popen", None)
    if popen is None:
        return 0

    def forward(signum: int, frame: object) -> None:
        _forward(popen, signum)

    for sig in _END_SIGNALS:
        signal.signal(sig, forward)
    name = interrupted()
    if name is not None:
        _forward(popen, signal.Signals[name])
    code = popen.wait()
    return 128 - code if code < 0 else code


_END_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _forward(popen: subprocess.Popen, signum: int) -> None:
    if popen.returncode is not None:
        return
    if signum == signal.SIGINT and _terminal_sent_to_group(popen.pid):
        return
    try:
        os.kill(popen.pid, signum)
    except ProcessLookupError:
        pass


def _terminal_sent_to_group(pid: int) -> bool:
    """Whether a terminal's Ctrl-C reached ``pid`` as well: djprobe and the command are in the
    foreground process group of djprobe's controlling terminal."""
    try:
        group = os.getpgrp()
        if os.getpgid(pid) != group:
            return False
        for stream in (sys.stdin, sys.stderr, sys.stdout):
            try:
                if stream is not None and os.isatty(stream.fileno()):
                    return os.tcgetpgrp(stream.fileno()) == group
            except (OSError, ValueError):
                continue
    except OSError:
        return False
    return False


def pending_list(args: argparse.Namespace) -> list[str] | None:
    """Where patterns naming a library not loaded yet go: a list for a command djprobe starts
    (it loads its libraries later) or with ``--pending``; None (an error, as gdb's default) for
    a process attached to."""
    return [] if args.command_argv or getattr(args, "pending", False) else None

