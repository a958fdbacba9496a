"""`djprobe status`: the probe areas and probes found in a process (left by any djprobe)."""

from __future__ import annotations

import argparse
import json

from ..errors import InvalidSiteError
from ..recovery import FoundArea, status
from ..traps import trap_uprobes
from ._output import add_output_argument, report_stream

EXAMPLES = """examples:
  djprobe status -p 1234          probes in process 1234, their hits, and whether their tracer lives
  djprobe status -p 1234 --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status",
        help="list the probe areas and probes in a process",
        description="Find the probe areas that djprobe mapped in a process (by this or any earlier, "
        "possibly dead, tracer) and list their probes: site, size, state, hits, tracer.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--pid", type=int, required=True, help="the process to inspect")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_output_argument(parser)
    parser.set_defaults(run=run)


def _tracer(a: FoundArea) -> str:
    return f"tracer {a.tracer_pid} ({'alive' if a.tracer_alive else 'gone'})"


def format_areas(pid: int, areas: list[FoundArea]) -> str:
    if not areas:
        return f"process {pid}: no djprobe probe areas"
    n = sum(len(a.instances) for a in areas)
    lines = [f"process {pid}: {len(areas)} probe area(s), {n} probe instance(s)"]
    for a in areas:
        if not a.valid:
            lines.append(f"area {a.data_address:#x} {a.path}: INVALID: {a.problem}")
            continue
        code = "" if a.code_mapped else " (code part missing)"
        if a.target_pid and a.target_pid != pid:
            code += f" (inherited from process {a.target_pid}: forked while probed)"
        lines.append(
            f"area code {a.code_address:#x}+{a.code_size:#x} data {a.data_address:#x}+{a.data_size:#x}{code}, "
            f"{_tracer(a)}, {len(a.instances)} instance(s)"
        )
        for o in a.orphans:
            lines.append(f"  orphan jump at {o.address:#x} {o.site} -> {o.target:#x} (no table entry; cleanup restores it)")
        if not a.instances:
            continue
        width = max([len("SITE")] + [len(i.site or i.name) for i in a.instances])
        lines.append(f"  {'ADDRESS':<18}  {'SITE':<{width}}  SIZE  {'STATE':<8}  {'CODE':<10}  {'HITS':>12}")
        for i in a.instances:
            lines.append(
                f"  {i.address:#018x}  {i.site or i.name:<{width}}  {i.size:>4}  {i.state:<8}  {i.code:<10}  {i.hits:>12}"
            )
            if not i.valid:
                lines.append(f"    INVALID: {i.problem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.pid <= 0:
        raise InvalidSiteError(f"invalid PID {args.pid}")
    with report_stream(args) as out:
        areas = status(args.pid)
        traps = trap_uprobes(args.pid)
        if args.json:
            print(json.dumps({"pid": args.pid, "areas": [a.to_json() for a in areas], "traps": traps}), file=out)
        else:
            print(format_areas(args.pid, areas), file=out)
            for t in traps:
                where = f"{t['address']:#x}" if t["address"] is not None else "?"
                state = "alive" if t["tracer_alive"] else "gone: unused, cleanup --stale deletes it"
                print(f"trap uprobe {t['uprobe']} at {where}, tracer {t['tracer']} ({state})", file=out)
    return 0
