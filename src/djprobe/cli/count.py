"""`djprobe count`: count calls of functions (or hits of any site) in a live process."""

from __future__ import annotations

import argparse
import json
import time
from typing import TextIO

from ..area import AreaLayout
from ..errors import InvalidSiteError
from ..module_globs import ALL_FUNCTIONS
from ..probes import Djprobe
from ._output import add_output_argument, banner, notice, print_refusals, print_traps, refusal_reason, report_stream
from ._target import Refusal, positive_seconds, add_target_arguments, exit_status, install_signal_handlers, make_probes, open_target, run_until_done, pending_list
from ._children import add_follow_argument, follow_children, guard_children, idle_with, report_family
from ._fleet import run_fleet, wants_fleet
from ._pending import follow_libraries
from ._wrapper import ExecWatch, no_match_in_script, script_note

EXAMPLES = """examples:
  djprobe count 'libc:*alloc' 'libc:free' -- ls -l /   # count allocator calls of one ls run
  djprobe count -p 1234 -d 5 'libc:str*'               # libc string functions of PID 1234, 5 s
  djprobe count -p 1234 -i 1 'main_loop+0x1c'          # a mid-function site, counts every second
  djprobe count --json -o counts.json 'libc:malloc' -- sqlite3 db .dump   # report in a file
  djprobe count -p 1234 -d 10 '*:*'                     # every function of every module (--all-modules)

The banner and refusals go to stderr, the report to stdout (or -o FILE). With -i the counts
(cumulative since the start) are reported every INTERVAL seconds, the last report marked final;
with --json each report is one JSON line with "time" (Unix seconds), "interval" and "final".
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "count",
        help="count hits of probed functions",
        description="Place a jump probe at every function matching the patterns and count hits.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="djprobe count [--json] [-o FILE] [-d SECONDS] [-i INTERVAL] (-p PID[,PID...] | --name COMM | -- COMMAND [ARG...]) "
        "(PATTERN... | --all-modules)",
    )
    add_target_arguments(parser, patterns_optional=True)
    add_output_argument(parser)
    parser.add_argument("-i", "--interval", type=positive_seconds, help="print counts every INTERVAL seconds")
    add_follow_argument(parser, "count")
    parser.add_argument(
        "--all-modules", action="store_true",
        help=f"every function of every module of the process (the pattern '{ALL_FUNCTIONS}')",
    )
    parser.set_defaults(run=run)


def _new_probe(address: int, at_return: bool) -> Djprobe:
    return Djprobe(address, at="return" if at_return else "entry")


def _table(probes: list[Djprobe]) -> str:
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    width = max([len("FUNC")] + [len(d.site or "") for d in rows])
    lines = [f"{'FUNC':<{width}}  MODE  {'COUNT':>12}"]
    lines += [f"{d.site:<{width}}  {d.mode or '':<4}  {d.hits:>12}" for d in rows]
    return "\n".join(lines)


def probe_json(d: Djprobe) -> dict:
    """A probe's site, address, hits, mode ("jump" or "trap") and, for a trap, why no jump."""
    row = {"site": d.site, "address": d.address, "hits": d.hits, "mode": d.mode}
    if d.mode == "trap":
        row["no_jump_reason"] = d.no_jump_reason
    return row


def _report_json(
    target_pid: int,
    probes: list[Djprobe],
    refused: list[Refusal],
    status: int | None,
    *,
    interval: int,
    final: bool,
) -> str:
    """One JSON line: the counts at this moment (``final`` for the last report of the run)."""
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    return json.dumps(
        {
            "pid": target_pid,
            "time": round(time.time(), 6),
            "interval": interval,
            "final": final,
            "probes": [probe_json(d) for d in rows],
            "refused": [{"site": r.site, "reason": r.reason} for r in refused],
            "exit_status": status,
        }
    )


def _text_header(interval: int, final: bool) -> str:
    stamp = time.strftime("%H:%M:%S")
    return f"[{stamp}] interval {interval}" + (" (final)" if final else "")


def _report(out: TextIO, args: argparse.Namespace, target_pid: int, probes: list[Djprobe], refused: list[Refusal],
            status: int | None, interval: int, final: bool, children=None) -> None:
    if children is not None and children.children:
        report_family(out, args, target_pid, probes, refused, children, interval, final, status)
    elif args.json:
        out.write(_report_json(target_pid, probes, refused, status, interval=interval, final=final) + "\n")
    elif args.interval:
        out.write(_text_header(interval, final) + "\n" + _table(probes) + ("\n" if final else "\n\n"))
    else:
        out.write(_table(probes) + "\n")
    out.flush()


def run(args: argparse.Namespace) -> int:
    if args.all_modules:
        args.patterns = [*args.patterns, ALL_FUNCTIONS]
    if not args.patterns:
        raise InvalidSiteError("no pattern: give PATTERN... or --all-modules")
    install_signal_handlers()
    note = script_note(args.command_argv)
    if note is not None:
        notice(f"note: {note}", wrap=True)
    with report_stream(args) as out:
        if wants_fleet(args):
            return run_fleet(args, out)
        target = open_target(args)
        with target:
            target.layout = AreaLayout.for_counting()  # no event rings: 1.3 MiB of data, not 14 MiB
            watch = ExecWatch(target.pid) if args.command_argv else None
            pending = pending_list(args)
            with no_match_in_script(args.command_argv, note):
                probes, refused = make_probes(target, args.patterns, pending=pending)
            refused = [Refusal(r.site, refusal_reason(r.site, r.reason)) for r in refused]
            follower = follow_libraries(target, args.patterns, probes, pending or [], _new_probe)
            guard = guard_children(target)
            shown = (lambda: follower.sites) if follower is not None else (lambda: probes)
            children = follow_children(args, target, guard, shown) if args.follow else None
            # the banner once every hook is in: a script that starts working when it sees it
            # must not fork before the fork hook is there
            notice(banner(len(probes), args.patterns))
            print_refusals((r.site, r.reason) for r in refused)
            print_traps(probes)
            target.start()
            interval = 0
            idle = idle_with(follower, children)
            for _ in run_until_done(target, args.duration, args.interval, idle):
                interval += 1
                _report(out, args, target.pid, shown(), refused, None, interval, final=False, children=children)
            if follower is not None:
                follower.close()
            target.unregister_many(probes)
            if children is not None:
                children.poll()
                children.close()
            if guard is not None:
                guard.close()
        exec_note = watch.note() if watch is not None else None  # before the command is reaped
        if exec_note is not None:
            notice(f"note: {exec_note}", wrap=True)
        status = exit_status(target) if args.command_argv else None
        _report(out, args, target.pid, shown(), refused, status, interval + 1, final=True, children=children)
    return status or 0
