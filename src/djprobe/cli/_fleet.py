"""Several processes at once: ``-p PID,PID...`` and ``--name COMM`` for ``count`` (and the
opening and closing of each process for ``trace`` and ``latency``: _fleet_trace.py,
_fleet_latency.py).

Each process gets its own probes (one ``ProbedProcess`` each, attached one after the other), its
own fork hook and, for patterns naming libraries it has not loaded, its own loader hook. The
report gives the totals per site over every process and, per process, its own figures: in text,
one table per process (marked ``PID COMMAND``) after the totals; in ``--json``, ``"processes":
[{"pid", "command", "probes": [...]}]``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from ..errors import DjprobeError, InvalidSiteError, ProcessGoneError
from ..probes import Djprobe, ProbedProcess, attach
from ._children import Placement, follow_children, guard_children
from ._name_watch import NameWatch, known_pids, processes_named
from ._output import notice, plural, print_refusals, refusal_reason, short_list
from ._pending import follow_libraries
from ._target import Refusal, interrupted, pending_list


def pid_list(text: str) -> list[int]:
    """``-p`` argument: ``PID`` or ``PID,PID,...`` (argparse type)."""
    pids = []
    for part in text.split(","):
        try:
            pid = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a PID: {part!r} (give PID or PID,PID,...)") from None
        if pid <= 0:
            raise argparse.ArgumentTypeError(f"invalid PID {pid}")
        if pid not in pids:
            pids.append(pid)
    return pids


def wants_fleet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "name", None)) or len(getattr(args, "pid", None) or []) > 1


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
        return " ".join(w.decode(errors="replace") for w in words if w) or "?"
    except OSError:
        return "?"


@dataclass
class Member:
    """One process of the fleet: its probes and hooks."""

    target: ProbedProcess
    command: str
    probes: list[Djprobe]
    follower: object | None = None
    guard: object | None = None
    refused: list[Refusal] = field(default_factory=list)
    family: object | None = None  # --follow: its children and the images they exec
    reader: object | None = None  # trace/latency: what reads its figures (and its family's)
    ended: bool = False  # it exited while traced (its figures so far are kept)

    @property
    def pid(self) -> int:
        return self.target.pid

    def sites(self) -> list:
        return self.follower.sites if self.follower is not None else self.probes  # type: ignore[attr-defined]


def fleet_pids(args: argparse.Namespace) -> list[int]:
    """The PIDs asked for: ``-p`` in order, then those ``--name`` finds. Raises InvalidSiteError
    with a command after ``--``, ProcessGoneError when ``--name`` matches no running process."""
    if args.command_argv:
        raise InvalidSiteError("give -p PID,... or --name COMM, or -- COMMAND, not both")
    pids = list(args.pid or [])
    if args.name:
        named = processes_named(args.name)
        if not named:
            raise ProcessGoneError(f"no running process named {args.name!r} (/proc/PID/comm, 15 characters at most)")
        pids += [p for p in named if p not in pids]
    return pids


def open_fleet(args: argparse.Namespace, placement: Placement | None = None) -> list[Member]:
    """Attach to every process asked for and place the probes in each (``placement``: how, for
    trace and latency; default counting). An error names the process it came from."""
    members: list[Member] = []
    try:
        for pid in fleet_pids(args):
            member = open_member(args, pid, placement)
            if member is not None:
                members.append(member)
    except BaseException:
        for member in members:
            close_member(member)
        raise
    return members


def open_member(args: argparse.Namespace, pid: int, placement: Placement | None = None) -> Member | None:
    """Attach to ``pid`` and place the probes and hooks (None if it ended meanwhile). Raises the
    DjprobeError met, its message starting with ``process PID``."""
    placement = placement or Placement()
    command = _command(pid)
    try:
        target = attach(pid)
    except DjprobeError as exc:
        raise _naming(exc, pid, command) from None
    try:
        target.trap_fallback = not getattr(args, "no_trap", False)
        target.layout = placement.layout()
        pending = pending_list(args)
        try:
            probes, refused = placement.place(target, args.patterns, pending)  # type: ignore[arg-type]
        except ProcessGoneError:
            target.close()
            notice(f"process {pid} ended before its probes went in")
            return None
        except DjprobeError as exc:
            raise _naming(exc, pid, command) from None
        member = Member(target, command, probes, refused=[Refusal(r.site, refusal_reason(r.site, r.reason)) for r in refused])
        member.follower = follow_libraries(target, args.patterns, probes, pending or [], placement.new_probe)
        member.guard = guard_children(target)
        if getattr(args, "follow", False):
            member.family = follow_children(args, target, member.guard, member.sites, placement)  # type: ignore[arg-type]
    except BaseException:
        target.close()
        raise
    return member


def _naming(exc: DjprobeError, pid: int, command: str) -> DjprobeError:
    """``exc`` with its message starting ``process PID (COMMAND):`` (unless it names the PID)."""
    if str(pid) not in exc.message:
        name = "" if command == "?" else f" ({short_list(command.split(), 3, 40)})"
        exc.message = f"process {pid}{name}: {exc.message}"
    return exc


def close_member(member: Member, before_close: Callable[[Member], None] | None = None) -> None:
    """Remove the probes and hooks of ``member``; ``before_close(member)`` runs once they are out,
    before its areas go (trace: the last events)."""
    try:
        try:
            if member.follower is not None:
                member.follower.close()  # type: ignore[attr-defined]
            member.target.unregister_many(member.probes)
            if member.family is not None:
                member.family.close()  # type: ignore[attr-defined]
            if member.guard is not None:
                member.guard.close()  # type: ignore[attr-defined]
        except ProcessGoneError:
            pass
        finally:
            if before_close is not None:
                before_close(member)
    finally:
        member.target.close()


def process_heading(pid: int, command: str, ended: bool = False) -> str:
    """``process PID (COMMAND):`` above a process's figures (``, exited while traced`` if so)."""
    return f"process {pid} ({command})" + (", exited while traced:" if ended else ":")


def process_ended(member: Member) -> bool:
    """Whether ``member``'s process has exited (first time: says so on stderr; its figures so far
    are kept)."""
    if member.ended:
        return True
    if member.target.process.is_alive():
        return False
    member.ended = True
    notice(f"process {member.pid} ({member.command}) exited: its figures so far are kept")
    return True


def _rows(sites: list) -> list[dict]:
    rows = sorted(sites, key=lambda d: (-d.hits, d.site or ""))
    return [{"site": d.site, "address": d.address, "hits": d.hits} for d in rows]


def _totals(members: list[Member]) -> list[dict]:
    totals: dict[str, int] = {}
    for member in members:
        for d in member.sites():
            totals[d.site] = totals.get(d.site, 0) + d.hits
    return [{"site": s, "hits": h} for s, h in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]


def _table(rows: list[dict]) -> list[str]:
    width = max([len("FUNC")] + [len(r["site"] or "") for r in rows])
    return [f"{'FUNC':<{width}}  {'COUNT':>12}"] + [f"{r['site']:<{width}}  {r['hits']:>12}" for r in rows]


def report(
    out: TextIO, args: argparse.Namespace, members: list, interval: int, final: bool, status: int | None = None
) -> None:
    """Totals per site, then each process's figures (``members``: objects with ``pid``,
    ``command``, ``sites()`` and ``refused``)."""
    if args.json:
        out.write(
            json.dumps(
                {
                    "pid": None,
                    "time": round(time.time(), 6),
                    "interval": interval,
                    "final": final,
                    "probes": _totals(members),
                    "processes": [{"pid": m.pid, "command": m.command, "probes": _rows(m.sites()),
                                   **({"exited": True} if getattr(m, "ended", False) else {})} for m in members],
                    "refused": [{"pid": m.pid, "site": r.site, "reason": r.reason} for m in members for r in m.refused],
                    "exit_status": status,
                }
            )
            + "\n"
        )
    else:
        lines = []
        if args.interval:
            lines.append(f"[{time.strftime('%H:%M:%S')}] interval {interval}" + (" (final)" if final else ""))
        lines.append(f"all {plural(len(members), 'process', 'processes')}:")
        lines += _table(_totals(members))
        for m in members:
            lines.append("")
            lines.append(process_heading(m.pid, m.command, getattr(m, "ended", False)))
            lines += _table(_rows(m.sites()))
        out.write("\n".join(lines) + ("\n\n" if args.interval and not final else "\n"))
    out.flush()


def run_fleet(args: argparse.Namespace, out: TextIO) -> int:
    """``count`` over several processes (see the module docstring)."""
    members = open_fleet(args)
    try:
        if not members:
            raise ProcessGoneError("every process asked for ended before its probes went in")
        notice(fleet_banner(members, args.patterns))
        print_refusals((f"{m.target.pid}: {r.site}", r.reason) for m in members for r in m.refused)
        interval = 0
        start = time.monotonic()
        next_report = start + args.interval if args.interval else None
        newcomers = NameWatch(args.name, [m.pid for m in members]) if args.name and args.follow else None
        while not interrupted():
            now = time.monotonic()
            if args.duration is not None and now - start >= args.duration:
                break
            if newcomers is not None:
                take_in(args, members, newcomers)
            if all([process_ended(m) for m in members]):
                break
            if next_report is not None and now >= next_report:
                next_report += args.interval
                interval += 1
                report(out, args, everyone(members), interval, final=False)
            waited = False
            for m in members:
                if m.family is not None:
                    m.family.poll()  # type: ignore[attr-defined]
                if m.follower is not None and m.target.process.is_alive():
                    m.follower.wait(0.0)  # type: ignore[attr-defined]
                    waited = True
            time.sleep(0.02 if waited else 0.05)
    except KeyboardInterrupt:
        pass
    finally:
        for member in members:
            try:
                close_member(member)
            except DjprobeError as exc:
                notice(f"process {member.target.pid}: {exc}")
    report(out, args, everyone(members), interval + 1, final=True)
    return 0


def take_in(args: argparse.Namespace, members: list[Member], newcomers: NameWatch, placement: Placement | None = None,
            setup: Callable[[Member], None] | None = None) -> None:
    """--name with --follow: place the probes in processes of that name started since
    (``setup(member)`` for each one taken in: trace and latency's readers)."""
    for pid in newcomers.new(known_pids(everyone(members))):
        try:
            member = open_member(args, pid, placement)
        except DjprobeError as exc:
            notice(f"process {pid} ({args.name}), started later: not probed: {exc}", wrap=True)
            continue
        if member is not None:
            if setup is not None:
                setup(member)
            members.append(member)
            notice(f"process {pid} ({member.command}), started later: {plural(len(member.probes), 'probe')} placed")


def fleet_banner(members: list[Member], patterns: list[str]) -> str:
    """``Tracing N functions in M processes for "..."... Hit Ctrl-C to end.``"""
    n_probes = len({d.site for m in members for d in m.probes})
    return (f'Tracing {plural(n_probes, "function")} in {plural(len(members), "process", "processes")} '
            f'for "{short_list(patterns)}"... Hit Ctrl-C to end.')


def everyone(members: list[Member]) -> list:
    """The members and, under --follow, the processes that came from each."""
    out: list = []
    for m in members:
        out.append(m)
        if m.family is not None:
            out += m.family.children  # type: ignore[attr-defined]
    return out
