"""`djprobe count`: count calls of functions (or hits of any site) in a live process."""

from __future__ import annotations

import argparse
import json
import sys

from ..probes import Djprobe
from ._target import Refusal, positive_seconds, add_target_arguments, exit_status, install_signal_handlers, make_probes, open_target, run_until_done

EXAMPLES = """examples:
  djprobe count 'libc:*alloc' 'libc:free' -- ls -l /   # count allocator calls of one ls run
  djprobe count -p 1234 -d 5 'libc:str*'               # libc string functions of PID 1234, 5 s
  djprobe count -p 1234 -i 1 'main_loop+0x1c'          # a mid-function site, counts every second
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "count",
        help="count hits of probed functions",
        description="Place a jump probe at every function matching the patterns and count hits.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="djprobe count [--json] [-d SECONDS] [-i INTERVAL] (-p PID | -- COMMAND [ARG...]) PATTERN...",
    )
    add_target_arguments(parser)
    parser.add_argument("-i", "--interval", type=positive_seconds, help="print counts every INTERVAL seconds")
    parser.set_defaults(run=run)


def _table(probes: list[Djprobe]) -> str:
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    width = max([len("FUNC")] + [len(d.site or "") for d in rows])
    lines = [f"{'FUNC':<{width}}  {'COUNT':>12}"]
    lines += [f"{d.site:<{width}}  {d.hits:>12}" for d in rows]
    return "\n".join(lines)


def _report_json(target_pid: int, probes: list[Djprobe], refused: list[Refusal], status: int | None) -> str:
    rows = sorted(probes, key=lambda d: (-d.hits, d.site or ""))
    return json.dumps(
        {
            "pid": target_pid,
            "probes": [{"site": d.site, "address": d.address, "hits": d.hits} for d in rows],
            "refused": [{"site": r.site, "reason": r.reason} for r in refused],
            "exit_status": status,
        }
    )


def run(args: argparse.Namespace) -> int:
    install_signal_handlers()
    target = open_target(args)
    with target:
        probes, refused = make_probes(target, args.patterns)
        banner = sys.stderr if args.json else sys.stdout
        quoted = " ".join(args.patterns)
        print(f'Tracing {len(probes)} functions for "{quoted}"... Hit Ctrl-C to end.', file=banner, flush=True)
        if refused and not args.json:
            print(f"{len(refused)} sites refused:", file=sys.stderr)
            for r in refused:
                print(f"  {r.site}: {r.reason}", file=sys.stderr)
        target.start()
        for _ in run_until_done(target, args.duration, args.interval):
            if not args.json:
                print(_table(probes) + "\n", flush=True)
        target.unregister_many(probes)
    status = exit_status(target) if args.command_argv else None
    if args.json:
        print(_report_json(target.pid, probes, refused, status))
    else:
        print(_table(probes))
    return status or 0
