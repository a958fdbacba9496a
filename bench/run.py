"""The djprobe benchmark: one run, one table (see bench/README.md).

    python3 -m bench.run [--quick] [--reps N] [--json FILE] [--only KEY,...] [--no-insertion]
                         [--no-deep-stacks] [--insertion-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import insertion, loop  # noqa: E402

WIDTH = 98


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_at_start": os.getloadavg()[0],
    }


def run_rows(quick: bool, reps: int, only: set[str] | None, threads_list=(1, 2)) -> list[dict]:
    specs = [s for s in loop.ROWS if only is None or s.key in only]
    samples: dict[tuple[str, int], list] = {(s.key, t): [] for s in specs for t in threads_list}
    skipped: dict[str, str] = {}
    errors: dict[tuple[str, int], str] = {}
    for rep in range(reps):  # rows interleaved within each repetition: drift hits all alike
        for spec in specs:
            if spec.key in skipped:
                continue
            for threads in threads_list:
                iters = spec.iters[0 if quick else 1]
                try:
                    samples[spec.key, threads].append(spec.run(threads, iters))
                except loop.Skip as exc:
                    skipped[spec.key] = str(exc)
                    break
                except Exception as exc:  # noqa: BLE001 - one broken tool must not stop the run
                    errors[spec.key, threads] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc(file=sys.stderr)
        print(f"  repetition {rep + 1}/{reps} done", file=sys.stderr)
    rows = []
    for spec in specs:
        for threads in threads_list:
            got = samples[spec.key, threads]
            row = {"key": spec.key, "label": spec.label, "threads": threads, "iters": spec.iters[0 if quick else 1]}
            if spec.key in skipped:
                row.update(status="skip", note=skipped[spec.key])
            elif not got:
                row.update(status="error", note=errors.get((spec.key, threads), "no sample"))
            else:
                ns = [s.ns_per_call for s in got]
                row.update(
                    status="ok" if all(s.ok for s in got) else "WRONG",
                    ns_per_call=statistics.median(ns),
                    ns_samples=ns,
                    calls=got[0].calls,
                    hits=[s.hits for s in got],
                    expected=[s.calls if s.expected_hits is None else s.expected_hits for s in got],
                    extra=_median_extra([s.extra for s in got]),
                )
                if (spec.key, threads) in errors:
                    row["note"] = "some repetitions failed: " + errors[spec.key, threads]
            rows.append(row)
    _derive(rows)
    return rows


def _median_extra(extras: list[dict]) -> dict:
    keys = set().union(*extras) if extras else set()
    return {k: statistics.median(e[k] for e in extras if k in e) for k in keys}


def _derive(rows: list[dict]) -> None:
    by = {(r["key"], r["threads"]): r for r in rows}
    for r in rows:
        if "ns_per_call" not in r:
            continue
        base = by.get(("none", r["threads"]))
        base_ns = r.get("extra", {}).get("base_ns")  # a row with its own baseline (other loop shape)
        if base_ns is None and base and "ns_per_call" in base:
            base_ns = base["ns_per_call"]
        if base_ns:
            r["overhead_ns"] = r["ns_per_call"] - base_ns
            r["x_base"] = r["ns_per_call"] / base_ns
        djp = by.get(("djp_entry", r["threads"]))
        if djp and "overhead_ns" in djp and "overhead_ns" in r and r["key"] != "none":
            r["x_djp"] = r["overhead_ns"] / djp["overhead_ns"] if djp["overhead_ns"] > 0 else None
        ex = r.get("extra", {})
        if ex.get("busy_s"):
            r["events_per_s"] = ex.get("events", 0) / ex["busy_s"]


def _fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _num(v, width: int) -> str:
    """A number in ``width`` columns: 2 decimals below 100, 1 below 1000, none above."""
    if v is None:
        return f"{'-':>{width}}"
    digits = 2 if abs(v) < 100 else 1 if abs(v) < 1000 else 0
    return f"{v:>{width}.{digits}f}"


def format_table(rows: list[dict]) -> str:
    head = f"{'row':<36}{'thr':>3}{'calls/thr':>11}{'ns/call':>10}{'ovh ns/hit':>12}{'x base':>8}{'x djp':>9}  count"
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        if r["status"] in ("skip", "error"):
            lines.append(f"{r['label']:<36}{r['threads']:>3}{'':>11}{'':>10}{'':>12}{'':>8}{'':>9}  {r['status']}")
            if r["threads"] == 1 or r["status"] == "error":
                notes.append(f"{r['label']}: {r['status']}: {r.get('note', '')}")
            continue
        ovh = r.get("overhead_ns") if r["key"] != "none" else None
        lines.append(
            f"{r['label']:<36}{r['threads']:>3}{r['iters']:>11}{_num(r['ns_per_call'], 10)}"
            f"{_num(ovh, 12)}{_num(r.get('x_base'), 8)}{_num(r.get('x_djp'), 9)}  {r['status']}"
        )
        ex = r.get("extra", {})
        if "returns" in ex and r["key"] == "djp_latency":
            notes.append(f"{r['label']} ({r['threads']} thr): {ex['returns']:.0f} returns paired, "
                         f"{ex.get('collisions', 0):.0f} collisions, {ex.get('unpaired', 0):.0f} unpaired; "
                         f"p50 {ex.get('p50_ns', 0):.1f} ns, p99 {ex.get('p99_ns', 0):.1f} ns, "
                         f"average {ex.get('average_ns', 0):.1f} ns per call of work")
        if "events" in ex or "missed" in ex:
            parts = []
            if "events" in ex:
                parts.append(f"{ex['events']:.0f} events delivered")
            if "missed" in ex:
                parts.append(f"{ex['missed']:.0f} dropped (ring full)")
            if r.get("events_per_s"):
                parts.append(f"consumer {r['events_per_s'] / 1e6:.2f} M events/s")
            notes.append(f"{r['label']} ({r['threads']} thr): " + ", ".join(parts))
        if r.get("note"):
            notes.append(f"{r['label']} ({r['threads']} thr): {r['note']}")
    lines.append("")
    lines.append("ns/call: median over repetitions of the target's own loop time per call per thread;")
    lines.append("ovh = ns/call - no-probe ns/call (same threads); x base = ns/call / no-probe;")
    lines.append("x djp = ovh / djprobe-count-entry ovh; count: ok = the tool's count equals the calls.")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str) -> str:
    if len(line) <= WIDTH:
        return line
    import textwrap

    return "\n".join(textwrap.wrap(line, WIDTH, subsequent_indent="    "))


def format_insertion(ins: dict) -> str:
    deep = ins.get("deep_threads")
    where = (
        f"a running process with {deep} more threads at {ins['deep_kib']} KiB of used stack each"
        if deep
        else "a running process"
    )
    lines = [
        f"Insertion{' with deep stacks' if deep else ''}: {ins['probes']} count probes into {where} "
        f"({ins['refused']} refused; counts exact: {ins['counts_exact']}; bytes restored: {ins['restored']})",
        f"  register_many   {ins['insert_s'] * 1e3:8.1f} ms in all, {ins['insert_stops']} stops; longest stop "
        f"{ins['insert_max_stop_ms']:.1f} ms (tracer), {ins['insert_max_gap_ms']:.1f} ms (seen in target)",
        f"  unregister_many {ins['remove_s'] * 1e3:8.1f} ms in all, {ins['remove_stops']} stops; longest stop "
        f"{ins['remove_max_stop_ms']:.1f} ms (tracer), {ins['remove_max_gap_ms']:.1f} ms (seen in target)",
        f"  (largest gap the target's monitor saw with no tracer at work: {ins['idle_max_gap_ms']:.1f} ms)",
        f"  stack scan (every thread's whole used stack, once per stop): {ins.get('stack_scan_ms', 0):.2f} ms "
        f"median, {ins.get('stack_scan_max_ms', 0):.2f} ms max, {ins.get('stack_scan_kib', 0):.0f} KiB read; "
        f"{ins.get('stack_scans', 0)} scans",
        f"Memory: target RSS {ins['target_rss_before_kib']} KiB -> {ins['target_rss_probed_kib']} KiB with probes "
        f"(+{ins['target_rss_probed_kib'] - ins['target_rss_before_kib']} KiB) -> {ins['target_rss_after_kib']} KiB "
        "after removal",
        f"        tracer RSS {ins['tracer_rss_before_kib']} KiB before attach -> {ins['tracer_rss_probed_kib']} KiB "
        f"with {ins['probes']} probes (peak {ins['tracer_maxrss_kib']} KiB)",
    ]
    if deep:
        lines = lines[:5]  # memory: as without the deep threads
    lines.extend(f"  note: {n}" for n in ins.get("notes", []))
    return "\n".join(_wrap(line) for line in lines)


def run_insertion(reps: int, run=insertion.run) -> dict:
    results = [dataclasses.asdict(run()) for _ in range(reps)]
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for k, v in results[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in results)
        elif isinstance(v, bool):
            out[k] = all(r[k] for r in results)
        elif isinstance(v, int) and k != "probes":
            out[k] = int(statistics.median(r[k] for r in results))
    out["notes"] = sorted({n for r in results for n in r["notes"]})
    out["repetitions"] = len(results)
    return out


def goals(rows: list[dict], ins: dict | None) -> list[tuple[str, str, bool | None]]:
    by = {(r["key"], r["threads"]): r for r in rows}

    def ovh(key, t=1):
        r = by.get((key, t))
        return r.get("overhead_ns") if r and r.get("status") == "ok" else None

    out: list[tuple[str, str, bool | None]] = []

    def add(text, value, met):
        out.append((text, value, met))

    e1 = ovh("djp_entry")
    add("count probe at entry <= 2 ns/hit", _fmt(e1, ".2f", "n/a") + " ns", None if e1 is None else e1 <= 2)
    for key, name, factor in (("uprobe", "kernel uprobe", 400), ("frida", "Frida CModule", 60)):
        o = ovh(key)
        ratio = o / e1 if o is not None and e1 and e1 > 0 else None
        add(f"count at entry >= {factor}x cheaper than {name}", _fmt(ratio, ".0f", "n/a") + "x",
            None if ratio is None else ratio >= factor)  # fmt: skip
    m = ovh("djp_mid")
    add("count mid-function, live flags <= 8 ns/hit", _fmt(m, ".2f", "n/a") + " ns", None if m is None else m <= 8)
    r1, r2 = ovh("djp_record", 1), ovh("djp_record", 2)
    add("record <= 20 ns/hit (no drops)", _fmt(r1, ".2f", "n/a") + " ns", None if r1 is None else r1 <= 20)
    add("record, 2 threads per-hit <= 2x 1 thread", _fmt(r2 / r1 if r1 and r2 else None, ".2f", "n/a") + "x",
        None if not (r1 and r2) else r2 <= 2 * r1)  # fmt: skip
    b = by.get(("djp_flood", 1), {}).get("events_per_s")
    add("batch consumer >= 5 M events/s", _fmt(b / 1e6 if b else None, ".2f", "n/a") + " M/s", None if not b else b >= 5e6)
    h = by.get(("djp_handler", 1), {}).get("events_per_s")
    add("trivial Python handler >= 500 k events/s", _fmt(h / 1e3 if h else None, ".0f", "n/a") + " k/s",
        None if not h else h >= 5e5)  # fmt: skip
    lat = ovh("djp_latency")
    add("latency probe (entry + exits) <= 40 ns/call", _fmt(lat, ".2f", "n/a") + " ns", None if lat is None else lat <= 40)
    pair = ovh("uprobe_pair")
    ratio = pair / lat if pair is not None and lat and lat > 0 else None
    add("latency >= 100x cheaper than uprobe + uretprobe", _fmt(ratio, ".0f", "n/a") + "x",
        None if ratio is None else ratio >= 100)  # fmt: skip
    if ins:
        add("1,000 probes inserted <= 1 s", f"{ins['insert_s']:.2f} s", ins["insert_s"] <= 1.0)
        add("target stopped <= 50 ms at a time (insertion)", f"{ins['insert_max_gap_ms']:.1f} ms",
            ins["insert_max_gap_ms"] <= 50)  # fmt: skip
        add("target stopped <= 50 ms at a time (removal)", f"{ins['remove_max_gap_ms']:.1f} ms",
            ins["remove_max_gap_ms"] <= 50)  # fmt: skip
    return out


def format_goals(gl) -> str:
    lines = ["Goals (issue 5), 1-thread figures:"]
    for text, value, met in gl:
        mark = "n/a" if met is None else ("met" if met else "MISSED")
        lines.append(f"  {text:<52}{value:>14}  {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls, one repetition (under 2 minutes)")
    ap.add_argument("--reps", type=int, help="repetitions (default: 1 quick, 5 full); medians are reported")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON ('-' for stdout)")
    ap.add_argument("--only", metavar="KEYS", help="comma-separated row keys: " + ",".join(s.key for s in loop.ROWS))
    ap.add_argument("--no-insertion", action="store_true", help="skip the insertion and memory measurement")
    ap.add_argument("--no-deep-stacks", action="store_true", help="skip the insertion with 16 threads x 1 MiB stacks")
    ap.add_argument("--insertion-only", action="store_true", help="only the insertion measurements (no rows)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    only = set(args.only.split(",")) if args.only else None
    info = machine()
    t0 = time.monotonic()
    ins = deep = None
    if not args.no_insertion:  # first: the tracer's RSS is measured before frida & co. are loaded
        print("insertion...", file=sys.stderr)
        ins = run_insertion(1 if args.quick else min(reps, 3))
        if not args.no_deep_stacks:
            print("insertion with deep stacks...", file=sys.stderr)
            deep = run_insertion(1 if args.quick else min(reps, 3), insertion.run_deep)
    rows = []
    if not args.insertion_only:
        print("rows...", file=sys.stderr)
        rows = run_rows(args.quick, reps, only)
    gl = goals(rows, ins)
    if args.insertion_only:
        gl = [g for g in gl if g[2] is not None]  # the rows' goals were not measured
    info["seconds"] = round(time.monotonic() - t0, 1)
    info["mode"] = "quick" if args.quick else "full"
    info["repetitions"] = reps
    out = [
        f"djprobe benchmark, {info['mode']} mode, {reps} repetition(s), {info['date']}",
        f"{info['cpu']}, {info['cpus']} CPUs, Linux {info['kernel']}, Python {info['python']}, "
        f"load average at start {info['load_avg_at_start']:.2f}",
    ]
    if rows:
        out += ["", format_table(rows)]
    if ins:
        out += ["", format_insertion(ins)]
    if deep:
        out += ["", format_insertion(deep)]
    out += ["", format_goals(gl), "", f"({info['seconds']} s)"]
    text = "\n".join(out)
    if args.json != "-":
        print(text)
    if args.json:
        doc = {"machine": info, "rows": rows, "insertion": ins, "insertion_deep_stacks": deep,
               "goals": [{"goal": g, "value": v, "met": m} for g, v, m in gl]}  # fmt: skip
        data = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data + "\n")
    wrong = any(r["status"] == "WRONG" for r in rows)
    wrong |= any(x and not (x["counts_exact"] and x["restored"]) for x in (ins, deep))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
