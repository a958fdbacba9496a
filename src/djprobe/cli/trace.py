"""`djprobe trace`: one line per probe hit, with the argument registers."""

from __future__ import annotations

import argparse
import json
import time
from typing import TextIO

from ..area import AreaLayout
from ..events import EventBatch
from ..probes import Djprobe
from ._output import add_output_argument, banner, notice, print_refusals, refusal_reason, report_stream
from ._target import Interrupted, add_target_arguments, interrupted, exit_status, install_signal_handlers, make_probes, open_target, pending_list
from ._children import guard_children
from ._pending import follow_libraries
from ._wrapper import ExecWatch, no_match_in_script, script_note

EXAMPLES = """examples:
  djprobe trace 'libc:malloc' -- ls /           # every malloc call of one ls run, with arguments
  djprobe trace -p 1234 -d 2 --json 'libc:open*' # JSON lines for 2 s
  djprobe trace -p 1234 'work' | head -5          # the first 5 hits; probes are removed on exit
  djprobe trace 'libc:malloc%return' -- ls /      # what malloc returned, at each return
  djprobe trace -o hits.txt 'libc:open*' -- ls    # the hits in a file, ls's output on stdout

The banner and refusals go to stderr, the hits and the summary to stdout (or -o FILE).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trace",
        help="print one line per probe hit",
        description="Place a recording jump probe at every site matching the patterns and print each hit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="djprobe trace [--json] [-o FILE] [-T] [-d SECONDS] [--drop] [--buffer-size N] (-p PID | -- COMMAND [ARG...]) PATTERN...",
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
    parser.set_defaults(run=run)


def _format_lines(batch: EventBatch, start_ns: int, wall_offset_ns: int, wall: bool) -> list[str]:
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
            a = " ".join(f"{x:#x}" for x in args[k])
        lines.append(f"{stamp:<15} {tid:<7} {batch.site(k)} {a}")
    return lines


def _json_lines(batch: EventBatch) -> list[str]:
    ev = batch.events
    args = batch.args().tolist()
    retvals = batch.retval().tolist()
    out = []
    for k, (t, tid) in enumerate(zip(ev["time_ns"].tolist(), ev["tid"].tolist())):
        instance = batch.instances[k]
        event = {
            "time_ns": t,
            "tid": tid,
            "site": batch.site(k),
            "address": instance.address if instance is not None else None,
            "args": args[k],
        }
        if batch.is_return(k):  # a return site: the value returned, and the exit it left by
            tail = batch.is_tail_call(k)
            event["retval"] = None if tail else retvals[k]  # a tail call's callee sets rax later
            event["exit"] = instance.analysis.exit.address
            event["tail_call"] = tail
        out.append(json.dumps(event))
    return out


def _summary(probes: list[Djprobe], as_json: bool, waited: float) -> str:
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    if as_json:
        return json.dumps(
            {
                "summary": [
                    {"site": d.site, "address": d.address, "hits": d.hits, "delivered": d.hits - d.missed, "dropped": d.missed}
                    for d in rows
                ],
                "waited_s": round(waited, 6),
            }
        )
    width = max([len("PROBE")] + [len(d.site or "") for d in rows])
    lines = [f"{'PROBE':<{width}}  {'HITS':>10}  {'DELIVERED':>10}  {'DROPPED':>8}"]
    lines += [f"{d.site:<{width}}  {d.hits:>10}  {d.hits - d.missed:>10}  {d.missed:>8}" for d in rows]
    lines.append(f"probes waited {waited:.6f} s in all for the rings to drain")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    install_signal_handlers()
    if args.ring_slots <= 0 or args.ring_slots & (args.ring_slots - 1):
        raise SystemExit(f"djprobe trace: error: --ring-slots must be a power of two, not {args.ring_slots}")
    with report_stream(args) as out:
        return _run(args, out)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    note = script_note(args.command_argv)
    if note is not None:
        notice(f"note: {note}", wrap=True)
    target = open_target(args)
    with target:
        target.layout = AreaLayout(ring_slots=args.ring_slots)
        registers = "all" if args.all_registers else "args"
        start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        watch = ExecWatch(target.pid) if args.command_argv else None
        pending = pending_list(args)
        with no_match_in_script(args.command_argv, note):
            probes, refused = make_probes(
                target, args.patterns, record=True, registers=registers, lossless=not args.drop, pending=pending
            )
        notice(banner(len(probes), args.patterns))
        print_refusals((r.site, refusal_reason(r.site, r.reason)) for r in refused)

        def new_probe(address: int, at_return: bool) -> Djprobe:
            at = "return" if at_return else "entry"
            return Djprobe(address, record=True, registers=registers, lossless=not args.drop, at=at)

        follower = follow_libraries(target, args.patterns, probes, pending or [], new_probe)
        guard = guard_children(target)
        poll = 0.05 if follower is not None else 0.2
        if not args.json:
            print(f"{'TIME':<15} {'TID':<7} PROBE ARGS", file=out)
        wall_offset = time.time_ns() - start_ns
        target.start()
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
    exec_note = watch.note() if watch is not None else None  # before the command is reaped
    if exec_note is not None:
        notice(f"note: {exec_note}", wrap=True)
    status = exit_status(target) if args.command_argv else None
    print(_summary(follower.sites if follower is not None else probes, args.json, waited), file=out, flush=True)  # type: ignore[arg-type]
    return status or 0
