"""`djprobe trace`: one line per probe hit, with the argument registers."""

from __future__ import annotations

import argparse
import json
import time
from typing import TextIO

from ..area import ARG_REGISTERS, MAX_STRING_SIZE, REGISTER_NAMES, AreaLayout
from ..events import EventBatch
from ..fetched import FetchedString, format_value, json_value
from ..probes import Djprobe
from ._output import add_output_argument, banner, notice, print_refusals, print_traps, refusal_reason, vfork_lines
from .count import probe_json
from ._target import Interrupted, add_target_arguments, interrupted, exit_status, install_signal_handlers, make_probes, open_target, pending_list
from ._children import Placement, add_follow_argument, guard_children
from ._follow_trace import TimeOrderedWriter, follow_loop, refuse_with_follow, start_family, summary
from ._fleet import wants_fleet
from ._pending import follow_libraries
from ._wrapper import ExecWatch, no_match_in_script, script_note
from ._writer import add_queue_argument, dropped_lines, output_note, queued_report, write_kept

EXAMPLES = """examples:
  djprobe trace 'libc:malloc' -- ls /           # every malloc call of one ls run, with arguments
  djprobe trace -p 1234 -d 2 --json 'libc:open*' # JSON lines for 2 s
  djprobe trace -p 1234 'work' | head -5          # the first 5 hits; probes are removed on exit
  djprobe trace 'libc:malloc%return' -- ls /      # what malloc returned, at each return
  djprobe trace -o hits.txt 'libc:open*' -- ls    # the hits in a file, ls's output on stdout
  djprobe trace 'ev_str(char *s, long n)' -- ./prog  # typed arguments, s copied at each hit
  djprobe trace 'libc:open*' -- cat /etc/hostname    # names and types from libc's debug info
  djprobe trace --perfetto t.pftrace 'f' 'f%return' -- ./prog  # calls as slices for ui.perfetto.dev
  djprobe trace -f 'handle_*' -- ./server          # its children and what they exec too ([pid N])
  djprobe trace -p 101,102 'handle_*'              # two workers, events in time order ([pid N])
  djprobe trace --name nginx -f 'libc:write'       # every nginx process, and those started later

A pattern may carry a C prototype: SITE(TYPE NAME, ...): integers, bool, pointers, char * (a string,
copied in the program at the hit, up to --string-size bytes, "..."-marked when longer; a bad pointer
shows as ADDRESS<ERROR>) and '...'. Without one, DWARF debug info (the module's or its separate debug
file's) names and types the arguments; without either, the six argument registers are shown.

With several processes (-p PID,PID... or --name COMM) the events of all are written in time order,
text lines marked [pid N], JSON lines with "pid"; the summary gives the totals per site, then each
process's figures (one that exited while traced keeps its figures, marked so).

The banner and refusals go to stderr, the hits and the summary to stdout (or -o FILE).
djprobe never waits for that output: lines not read yet are kept in memory (--output-queue), those
beyond are dropped and counted ("output_dropped" in the summary, a note on stderr at exit).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trace",
        help="print one line per probe hit",
        description="Place a recording jump probe at every site matching the patterns and print each hit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="djprobe trace [--json] [-o FILE] [-T] [-d SECONDS] [--drop] [--buffer-size N] [--string-size N] "
        "[--no-debuginfo] [--perfetto FILE] [--output-queue BYTES] [-f] (-p PID[,PID...] | --name COMM | -- COMMAND [ARG...]) PATTERN...",
    )
    add_target_arguments(parser)
    add_output_argument(parser)
    parser.add_argument("-T", "--timestamp", action="store_true", help="print wall-clock time of day")
    parser.add_argument(
        "--buffer-size",
        "--ring-slots",
        dest="ring_slots",
        type=int,
        default=AreaLayout.ring_slots,
        metavar="N",
        help="events each of the 8 rings holds (a power of two; default %(default)s)",
    )
    parser.add_argument(
        "--drop",
        action="store_true",
        help="never make the program wait: drop events when a ring is full (by default a probe "
        "waits for room while djprobe is consuming, up to 0.5 s)",
    )
    parser.add_argument("--all-registers", action="store_true", help="record every register, not only arguments")
    parser.add_argument(
        "--string-size",
        type=int,
        default=AreaLayout.string_size,
        metavar="N",
        help="bytes of each char * argument copied at the hit (default %(default)s; rounded up to 8)",
    )
    parser.add_argument(
        "--no-debuginfo", action="store_true", help="do not read DWARF for argument names and types"
    )
    parser.add_argument("--perfetto", metavar="FILE", help="also write a Perfetto trace (https://ui.perfetto.dev) to FILE")
    add_follow_argument(parser, "trace")
    add_queue_argument(parser)
    parser.set_defaults(run=run)


def _format_lines(batch: EventBatch, start_ns: int, wall_offset_ns: int, wall: bool, mark: str = "") -> list[str]:
    """One text line per event (``mark``: put before each, e.g. ``[pid N] ``)."""
    ev = batch.events
    args = batch.args().tolist()
    retvals = batch.retval().tolist()
    lines = []
    for k, (t, tid) in enumerate(zip(ev["time_ns"].tolist(), ev["tid"].tolist())):
        if wall:
            secs = (t + wall_offset_ns) / 1e9
            stamp = time.strftime("%H:%M:%S", time.localtime(secs)) + f".{int(secs * 1e6) % 1000000:06d}"
        else:
            stamp = f"{(t - start_ns) / 1e9:.6f}"
        if batch.is_return(k):
            a = "retval=? (tail call)" if batch.is_tail_call(k) else f"retval={retvals[k]:#x}"
        else:
            prototype = batch.prototype(k)
            if prototype is None:
                a = " ".join(f"{x:#x}" for x in args[k])
            else:
                values = batch.values(k, prototype) or {}
                a = " ".join(f"{p.name}={format_value(p.type.kind, values[p.name])}" for p in prototype.register_params)
        lines.append(f"{mark}{stamp:<15} {tid:<7} {batch.site(k)} {a}")
    return lines


def _json_lines(batch: EventBatch, pid: int | None = None) -> list[str]:
    """One JSON line per event (with ``"pid"`` when given: --follow)."""
    ev = batch.events
    args = batch.args().tolist()
    retvals = batch.retval().tolist()
    out = []
    for k, (t, tid) in enumerate(zip(ev["time_ns"].tolist(), ev["tid"].tolist())):
        instance = batch.instances[k]
        event = {
            "time_ns": t,
            **({"pid": pid} if pid is not None else {}),
            "tid": tid,
            "site": batch.site(k),
            "address": instance.address if instance is not None else None,
            "args": args[k],
        }
        prototype = None if batch.is_return(k) else batch.prototype(k)
        if prototype is not None:  # names known: {"name": value}, strings as JSON strings
            values = batch.values(k, prototype) or {}
            event["args"] = {name: json_value(v) for name, v in values.items()}
            truncated = [n for n, v in values.items() if isinstance(v, FetchedString) and v.truncated]
            if truncated:
                event["truncated"] = truncated
        if batch.is_return(k):  # a return site: the value returned, and the exit it left by
            tail = batch.is_tail_call(k)
            event["retval"] = None if tail else retvals[k]  # a tail call's callee sets rax later
            event["exit"] = instance.analysis.exit.address
            event["tail_call"] = tail
        out.append(json.dumps(event))
    return out


def _annotations(batch: EventBatch, k: int) -> dict:
    """What a Perfetto event carries: the typed arguments (pointers in hex) or the registers, and
    the return value at a return probe."""
    if batch.is_return(k):
        return {} if batch.is_tail_call(k) else {"retval": int(batch.retval()[k])}
    prototype = batch.prototype(k)
    if prototype is None:
        row = batch.events["regs"][k]
        return {f"arg{i}": f"{int(row[REGISTER_NAMES.index(r)]):#x}" for i, r in enumerate(ARG_REGISTERS)}
    values = batch.values(k, prototype) or {}
    kinds = {p.name: p.type.kind for p in prototype.register_params}
    return {n: (f"{v:#x}" if kinds[n] == "pointer" else v) for n, v in values.items()}


def _open_perfetto(path: str, pid: int, probes: list[Djprobe]):
    from ._perfetto import PerfettoWriter

    file = open(path, "wb")
    writer = PerfettoWriter(file, pid, probes)
    writer.file = file  # type: ignore[attr-defined]
    return writer


def _run_followed(args, out: TextIO, target, probes, follower, guard, family, watch, start_ns: int, wall_offset: int,
                  shown) -> int:
    """``trace --follow`` from the start of the target to the summary (see _follow_trace.py)."""

    def text(batch: EventBatch, mark: str) -> list[str]:
        return _format_lines(batch, start_ns, wall_offset, args.timestamp, mark)

    write = TimeOrderedWriter(out, text, _json_lines, args.json).write
    follow_loop(args, out, family, follower, write)
    if follower is not None:
        follower.close()
    target.unregister_many(probes)
    family.family.close()  # children's jumps out; images' last events kept
    if guard is not None:
        guard.close()
    write(family.read(complete=True), family.several, final=True)
    waited = family.waited_seconds()
    target.close()
    exec_note = watch.note() if watch is not None else None
    if exec_note is not None:
        notice(f"note: {exec_note}", wrap=True)
    status = exit_status(target) if args.command_argv else None
    members = family.members(target.pid, family.family.command, shown())
    write_kept(out, summary(members, args.json, waited, output_dropped=dropped_lines(out)) + "\n")
    return status or 0


def _summary(probes: list[Djprobe], as_json: bool, waited: float, output_dropped: int = 0) -> str:
    """The summary of one process's trace (``output_dropped``: event lines the output queue
    dropped, see _writer.py)."""
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    if as_json:
        return json.dumps(
            {
                "summary": [
                    dict(probe_json(d), delivered=d.hits - d.missed, dropped=d.missed)
                    for d in rows
                ],
                "waited_s": round(waited, 6),
                "output_dropped": output_dropped,
            }
        )
    width = max([len("PROBE")] + [len(d.site or "") for d in rows])
    lines = [f"{'PROBE':<{width}}  MODE  {'HITS':>10}  {'DELIVERED':>10}  {'DROPPED':>8}"]
    lines += [f"{d.site:<{width}}  {d.mode or '':<4}  {d.hits:>10}  {d.hits - d.missed:>10}  {d.missed:>8}" for d in rows]
    lines += vfork_lines([(d.site or "", d.vfork_hits) for d in rows])
    lines.append(f"probes waited {waited:.6f} s in all for the rings to drain")
    note = output_note(output_dropped)
    if note is not None:
        lines.append(note)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    install_signal_handlers()
    if args.ring_slots <= 0 or args.ring_slots & (args.ring_slots - 1):
        raise SystemExit(f"djprobe trace: error: --ring-slots must be a power of two, not {args.ring_slots}")
    if not 1 <= args.string_size <= MAX_STRING_SIZE:
        raise SystemExit(f"djprobe trace: error: --string-size must be from 1 to {MAX_STRING_SIZE} bytes, not {args.string_size}")
    if wants_fleet(args) and args.perfetto is not None:
        raise SystemExit("djprobe trace: error: --perfetto writes one process's trace: not with several processes")
    if args.perfetto is not None:
        from ._perfetto import missing_package_message

        why = missing_package_message()
        if why is not None:
            raise SystemExit(f"djprobe trace: error: {why}")
    if args.follow:
        refuse_with_follow(args)
    with queued_report(args, interrupted) as out:
        if wants_fleet(args):
            return _run_fleet(args, out)
        return _run(args, out)


def _layout(args: argparse.Namespace) -> AreaLayout:
    return AreaLayout(
        ring_slots=args.ring_slots,
        string_size=(args.string_size + 7) // 8 * 8,
        string_ring_slots=max(1, args.ring_slots // 8),
    )


def _placement(args: argparse.Namespace, layout: AreaLayout) -> Placement:
    """Trace's record probes, as placed in every process it takes (an exec'd image, a fleet's)."""
    registers = "all" if args.all_registers else "args"

    def place(image, patterns: list[str], pending: list[str] | None):
        return make_probes(image, patterns, record=True, registers=registers, lossless=not args.drop,
                           pending=pending, debuginfo=not args.no_debuginfo)

    def new_probe(address: int, at_return: bool) -> Djprobe:
        at = "return" if at_return else "entry"
        return Djprobe(address, record=True, registers=registers, lossless=not args.drop, at=at)

    return Placement(lambda: layout, place, new_probe)


def _run_fleet(args: argparse.Namespace, out: TextIO) -> int:
    """Several processes (-p PID,PID... or --name COMM): see _fleet_trace.py."""
    from ._fleet_trace import run_fleet_trace

    start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    wall_offset = time.time_ns() - start_ns

    def text(batch: EventBatch, mark: str) -> list[str]:
        return _format_lines(batch, start_ns, wall_offset, args.timestamp, mark)

    return run_fleet_trace(args, out, _placement(args, _layout(args)), text, _json_lines)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    note = script_note(args.command_argv)
    if note is not None:
        notice(f"note: {note}", wrap=True)
    target = open_target(args)
    with target:
        target.layout = _layout(args)
        placement = _placement(args, target.layout)
        start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        watch = ExecWatch(target.pid) if args.command_argv else None
        pending = pending_list(args)
        with no_match_in_script(args.command_argv, note):
            probes, refused = placement.place(target, args.patterns, pending)  # type: ignore[arg-type]
        follower = follow_libraries(target, args.patterns, probes, pending or [], placement.new_probe)
        guard = guard_children(target)
        shown = (lambda: follower.sites) if follower is not None else (lambda: probes)
        family = None
        if args.follow:
            family = start_family(args, target, guard, shown, placement)
        notice(banner(len(probes), args.patterns))  # once every hook is in (see count.run)
        print_refusals((r.site, refusal_reason(r.site, r.reason)) for r in refused)
        print_traps(probes)
        poll = 0.05 if follower is not None else 0.2
        if not args.json:
            print(f"{'TIME':<15} {'TID':<7} PROBE ARGS", file=out)
        wall_offset = time.time_ns() - start_ns
        perfetto = _open_perfetto(args.perfetto, target.pid, probes) if args.perfetto else None
        target.start()
        if family is not None:
            return _run_followed(args, out, target, probes, follower, guard, family, watch, start_ns, wall_offset, shown)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        try:
            while not interrupted():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                got = False
                if follower is not None:
                    follower.wait(0.0)
                for batch in target.events(timeout=min(poll, remaining) if remaining is not None else poll):
                    got = True
                    lines = _json_lines(batch) if args.json else _format_lines(batch, start_ns, wall_offset, args.timestamp)
                    out.write("\n".join(lines) + "\n")
                    out.flush()
                    if perfetto is not None:
                        perfetto.add(batch, _annotations)
                    if interrupted():
                        break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not got and not target.process.is_alive():
                    break
        except (KeyboardInterrupt, Interrupted):
            pass
        if follower is not None:
            follower.close()
        target.unregister_many(probes)
        if guard is not None:
            guard.close()
        waited = target.waited_seconds
        leftover = target.read_events()
        if len(leftover):
            lines = _json_lines(leftover) if args.json else _format_lines(leftover, start_ns, wall_offset, args.timestamp)
            out.write("\n".join(lines) + "\n")
            if perfetto is not None:
                perfetto.add(leftover, _annotations)
        if perfetto is not None:
            perfetto.file.close()
            notice(f"perfetto trace written to {args.perfetto}: {perfetto.slices} call slice(s), {perfetto.instants} instant(s)")
    exec_note = watch.note() if watch is not None else None  # before the command is reaped
    if exec_note is not None:
        notice(f"note: {exec_note}", wrap=True)
    status = exit_status(target) if args.command_argv else None
    sites = follower.sites if follower is not None else probes
    write_kept(out, _summary(sites, args.json, waited, dropped_lines(out)) + "\n")  # type: ignore[arg-type]
    return status or 0
