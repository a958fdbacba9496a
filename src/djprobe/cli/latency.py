"""`djprobe latency`: how long calls of functions take, as log2 histograms kept in the target
(in the manner of BCC's funclatency and bpftrace's hist())."""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, TextIO

from ..area import AreaLayout
from ..latency import LatencyFigures
from ..probes import Djprobe
from ._output import add_output_argument, banner, notice, print_refusals, refusal_reason, report_stream
from ._target import (Refusal, add_target_arguments, exit_status, install_signal_handlers, make_probes, open_target,
                      pending_list, positive_seconds, run_until_done)
from ._pending import follow_libraries
from ._wrapper import ExecWatch, no_match_in_script, script_note
from ._children import Placement, add_follow_argument, follow_children, guard_children, idle_with
from ._follow_latency import LatencyFamily, SiteFigures, growing
from ._fleet import process_heading, wants_fleet

EXAMPLES = """examples:
  djprobe latency 'libc:malloc' -- ls -l /          # malloc's latency over one ls run, in ns
  djprobe latency -u -p 1234 -d 10 'handle_*'       # functions of PID 1234 for 10 s, in us
  djprobe latency -m -i 5 -p 1234 'query'           # in ms, a report every 5 s (then reset)
  djprobe latency --json -o lat.json 'libz:deflate' -- gzip -k big.file
  djprobe latency -f 'libc:malloc' -- make -j4      # make and every program it runs: totals, each
  djprobe latency -p 101,102,103 'handle_*'          # three workers: totals, then each
  djprobe latency --name nginx -i 10 'libc:write'    # every nginx process, every 10 s (then reset)

Per function: calls (entries), returns (exits paired with their entry), the average, p50 and
p99 (interpolated inside the log2 buckets) and the histogram. The time of a call is from its
entry to its exit (a tail call ends it: the called function is measured on its own). A call
left by longjmp or an exception has no return; calls already running when the probes went in
are not measured. A pattern naming a library not loaded yet waits for it (always so for a
command after --; with -p, --pending): each load of the library adds to the same function.
With several processes (-p PID,PID... or --name COMM) each function's figures over all of them
(histograms added bucket by bucket) come first, then each process's ("processes" in --json); a
process that exits while measured keeps its figures, marked so.
"""

UNITS = {"nsecs": 1, "usecs": 1000, "msecs": 1_000_000}
BAR_WIDTH = 40


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "latency",
        help="histograms of how long calls of functions take",
        description="Pair a jump at the entry of every function matching the patterns with one at each of its "
        "exits, and histogram the time between them inside the target.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="djprobe latency [--json] [-u|-m] [-o FILE] [-d SECONDS] [-i INTERVAL] [-f] "
        "(-p PID[,PID...] | --name COMM | -- COMMAND [ARG...]) "
        "PATTERN...",
    )
    add_target_arguments(parser)
    add_output_argument(parser)
    units = parser.add_mutually_exclusive_group()
    units.add_argument("-u", "--microseconds", action="store_const", const="usecs", dest="unit",
                       help="show times in microseconds")
    units.add_argument("-m", "--milliseconds", action="store_const", const="msecs", dest="unit",
                       help="show times in milliseconds")
    parser.add_argument("-i", "--interval", type=positive_seconds,
                        help="print the histograms every INTERVAL seconds, then start them again from zero")
    add_follow_argument(parser, "measure")
    parser.set_defaults(run=run, unit="nsecs")


def function_json(djp: Djprobe, lat: LatencyFigures) -> dict:
    """One function of the JSON report (the issue's format)."""
    return {
        "site": djp.site,
        "address": djp.address,
        "calls": lat.calls,
        "returns": lat.returns,
        "total_ns": lat.total_ns,
        "hist": [{"low_ns": lo, "high_ns": hi, "count": c} for lo, hi, c in lat.buckets()],
    }


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    v = value / UNITS[unit]
    return f"{v:.0f}" if v >= 100 or v == int(v) else f"{v:.3g}"


def _bound(ns: int, unit: str) -> str:
    if unit == "nsecs":
        return str(ns)
    v = ns / UNITS[unit]
    return f"{v:.0f}" if v >= 1000 else f"{v:.4g}"


def text_report(djp: Djprobe, lat: LatencyFigures, unit: str) -> str:
    """BCC funclatency's histogram, with calls, returns, average and percentiles above it."""
    avg = lat.average_ns
    lines = [
        f"Function = {djp.site}",
        f"  calls {lat.calls}  returns {lat.returns}  average {_num(avg, unit)} {unit}  "
        f"p50 {_num(lat.p50, unit)} {unit}  p99 {_num(lat.p99, unit)} {unit}"
        + (f"  (lost to collisions {lat.collisions}, exits of earlier calls {lat.unpaired})"
           if lat.collisions or lat.unpaired else ""),
    ]
    buckets = lat.buckets()
    if not buckets:
        lines.append("  (no call returned)")
        return "\n".join(lines)
    rows = [(f"{_bound(lo, unit)} -> {_bound(hi, unit)}", c) for lo, hi, c in buckets]
    width = max(19, max(len(r) for r, _ in rows))
    top = max(c for _, c in rows)
    lines.append(f"{unit:>{width + 5}} : count     distribution")
    for label, count in rows:
        stars = round(count * BAR_WIDTH / top) if top else 0
        if count and not stars:
            stars = 1
        lines.append(f"{label:>{width + 5}} : {count:<9} |{'*' * stars:<{BAR_WIDTH}}|")
    return "\n".join(lines)


def _report(out: TextIO, args: argparse.Namespace, sites: Callable[[], list[SiteFigures]], refused: list[Refusal],
            status: int | None, *, interval: int, final: bool) -> list[tuple[SiteFigures, LatencyFigures]]:
    """Write one report; returns each function's figures as reported."""
    rows = [(s, s.read()) for s in sorted(sites(), key=lambda s: s.site or "")]
    write_report(out, args, rows, None, refused, status, interval=interval, final=final)
    return rows


def _new_probe(address: int, at_return: bool) -> Djprobe:
    return Djprobe(address, at="latency")


def _place(image: object, patterns: list[str], pending: list[str] | None) -> tuple:
    return make_probes(image, patterns, at="latency", pending=pending)  # type: ignore[arg-type]


def write_report(out: TextIO, args: argparse.Namespace, rows: list, processes: list | None, refused: list,
                 status: int | None, *, interval: int, final: bool, ended: frozenset[int] | set[int] = frozenset()) -> None:
    """One report: ``rows`` (site, figures) of each function; ``processes`` (several processes):
    (pid, command, rows) of each, after the totals (``ended``: PIDs that exited while measured);
    ``refused``: objects with ``site``, ``reason`` (and ``pid`` when several processes)."""
    if args.json:
        doc: dict = {"functions": [function_json(d, f) for d, f in rows]}
        if processes is not None:
            doc["processes"] = [{"pid": pid, "command": command, "probes": [function_json(d, f) for d, f in prows],
                                 **({"exited": True} if pid in ended else {})}
                                for pid, command, prows in processes]
        doc.update(refused=[{**({"pid": r.pid} if hasattr(r, "pid") else {}), "site": r.site, "reason": r.reason}
                            for r in refused], exit_status=status)
        if args.interval:
            doc.update(time=round(time.time(), 6), interval=interval, final=final)
        out.write(json.dumps(doc) + "\n")
    else:
        if args.interval:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"[{stamp}] interval {interval}" + (" (final)" if final else "") + "\n")
        if processes is None:
            out.write("\n\n".join(text_report(d, f, args.unit) for d, f in rows) + "\n")
        else:
            parts = [f"all {len(processes)} processes:\n" + "\n\n".join(text_report(d, f, args.unit) for d, f in rows)]
            parts += [process_heading(pid, command, pid in ended) + "\n"
                      + "\n\n".join(text_report(d, f, args.unit) for d, f in prows) for pid, command, prows in processes]
            out.write("\n\n".join(parts) + "\n")
        if args.interval and not final:
            out.write("\n")
    out.flush()


def _report_family(out: TextIO, args: argparse.Namespace, family: LatencyFamily, refused: list[Refusal],
                   status: int | None, *, interval: int, final: bool) -> None:
    """--follow: the totals, then each process (only the totals while there is one process)."""
    readings = family.read()
    processes = [(m.pid, m.command, rows) for m, rows in readings] if family.several else None
    write_report(out, args, family.totals(readings), processes, refused, status, interval=interval, final=final)
    if args.interval and not final:
        family.reset(readings)


def run(args: argparse.Namespace) -> int:
    install_signal_handlers()
    note = script_note(args.command_argv)
    if note is not None:
        notice(f"note: {note}", wrap=True)
    with report_stream(args) as out:
        if wants_fleet(args):
            from ._fleet_latency import run_fleet_latency

            placement = Placement(AreaLayout.for_latency, _place, _new_probe)
            return run_fleet_latency(args, out, placement, write_report)
        target = open_target(args)
        with target:
            target.layout = AreaLayout.for_latency()
            watch = ExecWatch(target.pid) if args.command_argv else None
            pending = pending_list(args)
            with no_match_in_script(args.command_argv, note):
                probes, refused = make_probes(target, args.patterns, at="latency", pending=pending)
            refused = [Refusal(r.site, refusal_reason(r.site, r.reason)) for r in refused]
            follower = follow_libraries(target, args.patterns, probes, pending or [], _new_probe)
            shown = (lambda: follower.sites) if follower is not None else (lambda: probes)
            sites = growing(shown)  # each function's figures, over every load of its library
            guard = guard_children(target)  # a forked child measures apart
            children = followed = None
            if args.follow:
                placement = Placement(AreaLayout.for_latency, _place, _new_probe)
                children = follow_children(args, target, guard, shown, placement)
                followed = LatencyFamily(children, target, shown) if children is not None else None
            notice(banner(len(probes), args.patterns))  # once every hook is in (see count.run)
            print_refusals((r.site, r.reason) for r in refused)
            target.start()
            interval = 0
            for _ in run_until_done(target, args.duration, args.interval, idle_with(follower, children)):
                interval += 1
                if followed is not None:
                    _report_family(out, args, followed, refused, None, interval=interval, final=False)
                    continue
                for s, figures in _report(out, args, sites, refused, None, interval=interval, final=False):
                    s.reset(figures)
            if follower is not None:
                follower.close()
            target.unregister_many(probes)
            if children is not None:
                children.poll()
                children.close()
            if guard is not None:
                guard.close()
        # closed now: threads left in a stub's action ran out of it first, then the figures froze
        exec_note = watch.note() if watch is not None else None
        if exec_note is not None:
            notice(f"note: {exec_note}", wrap=True)
        status = exit_status(target) if args.command_argv else None
        if followed is not None:
            _report_family(out, args, followed, refused, status, interval=interval + 1, final=True)
        else:
            _report(out, args, sites, refused, status, interval=interval + 1, final=True)
    return status or 0

