"""`djprobe cleanup`: remove the probes a dead (or given-up) tracer left in a process."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from ..errors import InvalidSiteError
from ..recovery import CleanupReport, cleanup
from ..shmfiles import AreaFile, area_files, remove_stale
from ..traps import remove_stale_uprobes
from ._output import add_output_argument, report_stream

EXAMPLES = """examples:
  djprobe cleanup -p 1234          restore every byte patched by djprobe in 1234, unmap its areas
  djprobe cleanup -p 1234 --force  even if the tracer that placed them still runs
  djprobe cleanup --stale          remove /dev/shm/djprobe-* files and trap uprobe definitions
                                   (tracefs uprobe_events djprobe_TRACER_TARGET/*) whose tracer is gone
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cleanup",
        help="remove probes left in a process by a dead tracer",
        description="Restore the original bytes of every probe djprobe placed in a process (checked "
        "against the ELF file on disk) and unmap its probe areas where no thread can still use them. "
        "With --stale, remove the probe-area files in /dev/shm that a tracer killed while creating "
        "an area left behind.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--pid", type=int, help="the process to clean up")
    parser.add_argument(
        "--stale",
        action="store_true",
        help="remove the /dev/shm/djprobe-* files left by tracers killed while creating a probe area "
        "(those whose creator is gone)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="also clean areas whose tracer is alive, and restore sites whose bytes changed since",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_output_argument(parser)
    parser.set_defaults(run=run)


def format_report(r: CleanupReport) -> str:
    if not r.areas:
        return f"process {r.pid}: no djprobe probe areas, nothing to clean up"
    lines = []
    for i in r.restored:
        lines.append(f"restored {i.address:#x} {i.site or i.name} ({i.size} bytes)")
    for o in r.orphans:
        lines.append(f"restored {o.address:#x} {o.site} (a jump with no table entry, e.g. inherited through fork)")
    for i in r.untouched:
        lines.append(f"already original {i.address:#x} {i.site or i.name}")
    for i, why in r.skipped:
        lines.append(f"SKIPPED {i.address:#x} {i.site or i.name}: {why}")
    for a, why in r.refused_areas:
        lines.append(f"REFUSED area {a.data_address:#x} {a.path}: {why}")
    for a in r.unmapped:
        lines.append(f"unmapped area {a.code_address:#x} (code) {a.data_address:#x} (data)")
    for a, why in r.left_mapped:
        lines.append(f"left area {a.data_address:#x} mapped (every jump to it removed): {why}")
    if r.waited_out:
        lines.append(f"{r.waited_out} thread(s) left the stubs by themselves")
    if r.closed_fds:
        lines.append(f"closed {len(r.closed_fds)} probe-area file descriptor(s) a killed tracer left open")
    lines.append(
        f"process {r.pid}: {len(r.restored) + len(r.orphans)} restored, {len(r.skipped)} skipped, "
        f"{len(r.unmapped)} area(s) unmapped, {len(r.left_mapped)} kept, {len(r.refused_areas)} refused"
    )
    return "\n".join(lines)


def format_stale(removed: list[AreaFile], failed: list[tuple[AreaFile, str]], kept: list[AreaFile]) -> str:
    lines = [f"removed {f.path} ({f.staleness.value}, {f.size} bytes)" for f in removed]
    lines += [f"FAILED to remove {f.path}: {why}" for f, why in failed]
    lines += [f"kept {f.path} (tracer {f.tracer_pid} still runs)" for f in kept]
    lines.append(f"{len(removed)} stale file(s) removed, {len(failed)} failed, {len(kept)} in use")
    return "\n".join(lines)


def format_uprobes(deleted: list[str], failed: list[tuple[str, str]]) -> str:
    lines = [f"deleted trap uprobe {name} (its tracer is gone)" for name in deleted]
    lines += [f"FAILED to delete trap uprobe {name}: {why}" for name, why in failed]
    return "\n".join(lines)


def _run_stale(args: argparse.Namespace, out: TextIO) -> int:
    removed, failed = remove_stale()
    kept = [f for f in area_files() if not f.stale]
    deleted, not_deleted = remove_stale_uprobes()
    if args.json:
        print(json.dumps({
            "removed": [f.to_json() for f in removed],
            "failed": [dict(f.to_json(), error=why) for f, why in failed],
            "in_use": [f.to_json() for f in kept],
            "uprobes_deleted": deleted,
            "uprobes_failed": [{"uprobe": n, "error": why} for n, why in not_deleted],
        }), file=out)
    else:
        print(format_stale(removed, failed, kept), file=out)
        if deleted or not_deleted:
            print(format_uprobes(deleted, not_deleted), file=out)
    return 1 if failed or not_deleted else 0


def run(args: argparse.Namespace) -> int:
    if args.pid is None and not args.stale:
        raise InvalidSiteError("give -p PID (a process to clean up) or --stale (left-over /dev/shm files)")
    if args.pid is not None and args.pid <= 0:
        raise InvalidSiteError(f"invalid PID {args.pid}")
    with report_stream(args) as out:
        if args.pid is None:
            return _run_stale(args, out)
        status = _run_pid(args, out)
        if args.stale:
            status = max(status, _run_stale(args, out))
        return status


def _run_pid(args: argparse.Namespace, out: TextIO) -> int:
    report = cleanup(args.pid, force=args.force)
    deleted, not_deleted = remove_stale_uprobes(args.pid)  # a killed tracer's trap definitions
    if args.json:
        print(json.dumps(dict(report.to_json(), uprobes_deleted=deleted,
                              uprobes_failed=[{"uprobe": n, "error": why} for n, why in not_deleted])), file=out)
    else:
        # A failed clean-up is shown on stderr too, unless the report has a file of its own.
        stream = sys.stderr if not report.ok and out is sys.stdout else out
        print(format_report(report), file=stream)
        if deleted or not_deleted:
            print(format_uprobes(deleted, not_deleted), file=out)
    return 0 if report.ok and not not_deleted else 1
