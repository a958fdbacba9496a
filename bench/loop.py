"""The per-hit rows: one small function called in a tight loop, probed by each tool in turn.

Every runner returns a :class:`Sample`: the target's own loop time (CLOCK_MONOTONIC around the
loop, so tool start-up and attach time are excluded), the calls it made, and the count the tool
reports. A row whose count differs from the calls is WRONG.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import build

TRACEFS = Path("/sys/kernel/tracing")


class Skip(Exception):
    """The tool is not available here: the row is skipped, with the reason."""


@dataclass
class Sample:
    ns_per_call: float  # per call, per thread (the longest thread's loop time / calls per thread)
    calls: int  # all threads together, as the target counted them
    hits: int | None  # what the tool counted (None: nothing to count)
    expected_hits: int | None = None  # what the count must be (default: calls)
    extra: dict = field(default_factory=dict)  # row-specific figures (events/s, drops, ...)

    @property
    def ok(self) -> bool:
        want = self.calls if self.expected_hits is None else self.expected_hits
        return self.hits is None or self.hits == want


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    run: Callable[[int, int], Sample]  # (threads, calls per thread) -> Sample
    iters: tuple[int, int]  # calls per thread: (quick, full)


def _parse_result(text: str) -> dict[str, int]:
    fields = dict(kv.split("=", 1) for kv in text.split())
    return {k: int(v) for k, v in fields.items()}


def _loop_argv(func: str, iters: int, threads: int, out: Path, *extra: str) -> list[str]:
    return [str(build.loop_target()), func, str(iters), str(threads), str(out), *extra]


def _sample(result: dict[str, int], iters: int, hits: int | None, **extra) -> Sample:
    return Sample(result["elapsed_ns"] / iters, result["calls"], hits, extra=extra)


class _Out:
    """A temporary result file for the target."""

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="djbench-", suffix=".out")
        os.close(fd)
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _run_plain(func: str, threads: int, iters: int) -> dict[str, int]:
    with _Out() as out:
        subprocess.run(_loop_argv(func, iters, threads, out), check=True, timeout=600)
        return _parse_result(out.read_text())


# -- no tool ---------------------------------------------------------------------------------
def run_none(threads: int, iters: int) -> Sample:
    r = _run_plain("work", threads, iters)
    return _sample(r, iters, None)


def run_atomic(threads: int, iters: int) -> Sample:
    r = _run_plain("atomic", threads, iters)
    return _sample(r, iters, r["atomic"])


def run_tsc_hist(threads: int, iters: int) -> Sample:
    r = _run_plain("tsc", threads, iters)
    return _sample(r, iters, None)


def run_plain_counter(threads: int, iters: int) -> Sample:
    r = _run_plain("plain", threads, iters)
    return _sample(r, iters, r["plain"])


# -- djprobe ---------------------------------------------------------------------------------
def _djprobe():
    import djprobe

    return djprobe


def _spawned(
    threads: int, iters: int, probe_args: dict, consume: Callable | None = None, extra: tuple = (), per_cpu: bool = True
):
    """Spawn the loop target held before main, place one probe, run it; returns
    (result, hits, missed, consumer's figures)."""
    djprobe = _djprobe()
    with _Out() as out:
        with djprobe.spawn(_loop_argv("work", iters, threads, out, *extra)) as proc:
            if hasattr(proc, "per_cpu_counters"):
                proc.per_cpu_counters = per_cpu
            djp = proc.register(djprobe.Djprobe(**probe_args))
            if consume is not None:
                proc.read_events()  # consumer warm-up (TSC clock calibration) before the target runs
            proc.start()
            figures = consume(proc, djp) if consume is not None else {}
            if proc.process.popen.wait(timeout=600) != 0:
                raise RuntimeError("target failed")
            if consume is not None:
                figures = _merge(figures, consume(proc, djp))  # what is left in the rings
            hits, missed = djp.hits, djp.missed
        result = _parse_result(out.read_text())
    return result, hits, missed, figures


def _merge(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def run_djprobe_entry(threads: int, iters: int) -> Sample:
    r, hits, _, _ = _spawned(threads, iters, {"addr": "work"})
    return _sample(r, iters, hits)


def run_djprobe_entry_locked(threads: int, iters: int) -> Sample:
    r, hits, _, _ = _spawned(threads, iters, {"addr": "work"}, per_cpu=False)
    return _sample(r, iters, hits)


def run_djprobe_trap(threads: int, iters: int) -> Sample:
    """The trap fallback (a kernel uprobe through perf events) at the entry, forced with
    ``trap="only"``: what a site that takes no jump costs."""
    djprobe = _djprobe()
    if "trap" not in inspect.signature(djprobe.Djprobe).parameters:
        raise Skip("this djprobe has no trap fallback yet")
    r, hits, _, _ = _spawned(threads, iters, {"addr": "work", "trap": "only"})
    return _sample(r, iters, hits)


def run_djprobe_mid(threads: int, iters: int) -> Sample:
    r, hits, _, _ = _spawned(threads, iters, {"addr": "work+3"})
    return _sample(r, iters, hits)


def record_supported() -> bool:
    import inspect

    try:
        djprobe = _djprobe()
    except ImportError:
        return False
    params = inspect.signature(djprobe.Djprobe).parameters
    return "record" in params and hasattr(djprobe.ProbedProcess, "read_events")


def _need_record() -> None:
    if not record_supported():
        raise Skip("this djprobe has no Djprobe(record=) / read_events() yet")


def _batch_consumer(proc, djp) -> dict:
    """Drain the rings with read_events() until the target exits: events and time spent."""
    events = 0
    busy = 0.0
    calls = 0
    popen = proc.process.popen
    while True:
        alive = popen.poll() is None
        t0 = time.perf_counter()
        batch = proc.read_events()
        busy += time.perf_counter() - t0
        n = len(batch.events)
        events += n
        calls += 1
        if not alive:
            break
        if n == 0:
            time.sleep(0.0005)
    return {"events": events, "busy_s": busy, "reads": calls}


ROUNDS = ("round=1024", "pause=10000")  # 1,024 calls per thread, then 10 ms for the consumer


def run_djprobe_record(threads: int, iters: int, **probe: object) -> Sample:
    """Record probe (all registers, TSC), every event delivered: the target calls in rounds of
    1,024 with pauses in which the batch consumer drains the rings, so no record is dropped and
    the ring's pages are warm. Overhead is against a no-probe run in the same rounds."""
    _need_record()
    with _Out() as out:
        subprocess.run(_loop_argv("work", iters, threads, out, *ROUNDS), check=True, timeout=600)
        base = _parse_result(out.read_text())
    r, hits, missed, fig = _spawned(threads, iters, {"addr": "work", "record": True, **probe}, _batch_consumer, ROUNDS)
    s = _sample(r, iters, hits, events=fig["events"], missed=missed, base_ns=base["elapsed_ns"] / iters)
    if fig["events"] + missed != hits:
        s.expected_hits = fig["events"] + missed  # events lost without being counted as dropped
        s.extra["lost"] = hits - fig["events"] - missed
    return s


def run_djprobe_record_args(threads: int, iters: int) -> Sample:
    """As the record row, with the six argument registers only (two-cache-line records)."""
    return run_djprobe_record(threads, iters, registers="args")


def run_djprobe_lossless(threads: int, iters: int) -> Sample:
    """Argument records, hit continuously, lossless: the probes wait for the batch consumer
    instead of dropping; every event must arrive (the per-call figure is the consumer's pace)."""
    _need_record()
    r, hits, missed, fig = _spawned(
        threads, iters, {"addr": "work", "registers": "args", "lossless": True}, _batch_consumer
    )
    s = _sample(r, iters, hits, events=fig["events"], missed=missed, busy_s=fig["busy_s"])
    s.expected_hits = fig["events"]  # every hit delivered, none dropped
    return s


def run_djprobe_flood(threads: int, iters: int) -> Sample:
    """Record probe hit continuously while the batch consumer drains with read_events(): the
    consumer's decode rate (events / time inside read_events()); most hits find the ring full
    and take the drop path (counted; hits stay exact)."""
    _need_record()
    r, hits, missed, fig = _spawned(threads, iters, {"addr": "work", "record": True}, _batch_consumer)
    s = _sample(r, iters, hits, events=fig["events"], missed=missed, busy_s=fig["busy_s"])
    if fig["events"] + missed != hits:
        s.expected_hits = fig["events"] + missed
        s.extra["lost"] = hits - fig["events"] - missed
    return s


def run_djprobe_handler(threads: int, iters: int) -> Sample:
    """A trivial Python handler through proc.poll(): handler calls / time inside poll()."""
    _need_record()
    handled = [0]

    def handler(djp, regs):
        handled[0] += 1

    def consume(proc, djp) -> dict:
        busy = 0.0
        popen = proc.process.popen
        while True:
            alive = popen.poll() is None
            t0 = time.perf_counter()
            proc.poll(0.0)
            busy += time.perf_counter() - t0
            if not alive:
                break
            time.sleep(0.0002)
        return {"busy_s": busy}

    r, hits, missed, fig = _spawned(threads, iters, {"addr": "work", "handler": handler}, consume)
    s = _sample(r, iters, hits, events=handled[0], missed=missed, busy_s=fig["busy_s"])
    if handled[0] + missed != hits:
        s.expected_hits = handled[0] + missed
        s.extra["lost"] = hits - handled[0] - missed
    return s


def run_djprobe_latency(threads: int, iters: int) -> Sample:
    """Latency probe on ``work``: its entry and both exits, the elapsed time of every call added
    into the histogram in the probe area. The count checked: calls seen at the entry equal the
    calls made, and every exit is paired or counted unpaired (a lost sample is a counted
    collision)."""
    djprobe = _djprobe()
    if not hasattr(djprobe, "Latency"):
        raise Skip("this djprobe has no latency probes yet")
    with _Out() as out:
        with djprobe.spawn(_loop_argv("work", iters, threads, out)) as proc:
            djp = proc.register(djprobe.Djprobe("work", at="latency"))
            proc.start()
            if proc.process.popen.wait(timeout=600) != 0:
                raise RuntimeError("target failed")
            lat = djp.latency
            calls, returns, unpaired, collisions = lat.calls, lat.returns, lat.unpaired, lat.collisions
            p50, p99, average = lat.p50, lat.p99, lat.average_ns
        result = _parse_result(out.read_text())
    s = _sample(result, iters, calls, returns=returns, collisions=collisions, unpaired=unpaired,
                p50_ns=p50 or 0, p99_ns=p99 or 0, average_ns=average or 0)
    if returns + unpaired != result["calls"] or unpaired > collisions:
        s.expected_hits = -1  # an exit neither paired nor counted: WRONG
    return s


# -- kernel uprobe through tracefs ------------------------------------------------------------
def run_uprobe(threads: int, iters: int) -> Sample:
    if os.geteuid() != 0:
        raise Skip("not root")
    if not (TRACEFS / "uprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        if not (TRACEFS / "uprobe_events").exists():
            raise Skip("no tracefs with uprobe_events")
    exe = build.loop_target()
    _, offset = build.symbol(exe, "work")
    group, event = f"djbench{os.getpid()}", "work"
    events = TRACEFS / "uprobe_events"
    _tracefs_append(events, f"p:{group}/{event} {exe}:{offset:#x}")
    try:
        (TRACEFS / "events" / group / event / "enable").write_text("1")
        try:
            r = _run_plain("work", threads, iters)
            hits = None
            for line in (TRACEFS / "uprobe_profile").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] in (event, f"{group}/{event}") and parts[0] == str(exe):
                    hits = int(parts[2])
        finally:
            (TRACEFS / "events" / group / event / "enable").write_text("0")
    finally:
        _tracefs_append(events, f"-:{group}/{event}")
    return _sample(r, iters, hits)


def run_uprobe_pair(threads: int, iters: int) -> Sample:
    """A kernel uprobe at ``work`` and a uretprobe on its returns (the pair a latency measurement
    with uprobes needs: bpftrace's uprobe + uretprobe + hist()), through tracefs; both counts
    must equal the calls."""
    if os.geteuid() != 0:
        raise Skip("not root")
    if not (TRACEFS / "uprobe_events").exists():
        raise Skip("no tracefs with uprobe_events")
    exe = build.loop_target()
    _, offset = build.symbol(exe, "work")
    group = f"djbenchpair{os.getpid()}"
    events = TRACEFS / "uprobe_events"
    _tracefs_append(events, f"p:{group}/enter {exe}:{offset:#x}")
    try:
        _tracefs_append(events, f"r:{group}/leave {exe}:{offset:#x}")
        try:
            for e in ("enter", "leave"):
                (TRACEFS / "events" / group / e / "enable").write_text("1")
            try:
                r = _run_plain("work", threads, iters)
                hits: dict[str, int] = {}
                for line in (TRACEFS / "uprobe_profile").read_text().splitlines():
                    parts = line.split()
                    for e in ("enter", "leave"):
                        if len(parts) >= 3 and parts[1] in (e, f"{group}/{e}") and parts[0] == str(exe):
                            hits[e] = int(parts[2])
            finally:
                for e in ("enter", "leave"):
                    (TRACEFS / "events" / group / e / "enable").write_text("0")
        finally:
            _tracefs_append(events, f"-:{group}/leave")
    finally:
        _tracefs_append(events, f"-:{group}/enter")
    s = _sample(r, iters, hits.get("enter"), returns=hits.get("leave", -1))
    if hits.get("leave") != r["calls"]:
        s.expected_hits = -1
    return s


def _tracefs_append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# -- bpftrace ----------------------------------------------------------------------------------
def run_bpftrace(threads: int, iters: int) -> Sample:
    tool = shutil.which("bpftrace")
    if tool is None:
        raise Skip("bpftrace not installed")
    if os.geteuid() != 0:
        raise Skip("not root")
    exe = build.loop_target()
    with _Out() as out:
        cmd = " ".join(_loop_argv("work", iters, threads, out))
        res = subprocess.run(
            [tool, "-e", f"uprobe:{exe}:work {{ @c = count(); }}", "-c", cmd],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        text = out.read_text()
        if not text:
            raise RuntimeError(f"bpftrace run failed: {res.stderr.strip()[-300:]}")
        r = _parse_result(text)
    hits = None
    for line in res.stdout.splitlines():
        if line.startswith("@c:"):
            hits = int(line.split(":")[1])
    return _sample(r, iters, hits if hits is not None else -1)


# -- ptrace breakpoint -------------------------------------------------------------------------
def run_ptrace(threads: int, iters: int) -> Sample:
    exe = build.loop_target()
    vaddr, _ = build.symbol(exe, "work")
    length = build.first_insn_length(exe, "work")
    with _Out() as out, _Out() as hits_file:
        subprocess.run(
            [str(build.ptrace_tracer()), hex(vaddr), str(length), str(hits_file), "--",
             *_loop_argv("work", iters, threads, out)],
            check=True, timeout=900,
        )  # fmt: skip
        r = _parse_result(out.read_text())
        hits = int(hits_file.read_text())
    return _sample(r, iters, hits)


# -- Frida (bench/frida_rows.py) -----------------------------------------------------------------
from .frida_rows import run_frida, run_frida_latency, run_frida_string  # noqa: E402

ROWS: list[RowSpec] = [
    RowSpec("none", "no probe", run_none, (20_000_000, 100_000_000)),
    RowSpec("plain", "plain per-thread counter compiled in", run_plain_counter, (20_000_000, 100_000_000)),
    RowSpec("atomic", "atomic counter compiled in", run_atomic, (20_000_000, 100_000_000)),
    RowSpec("djp_entry", "djprobe count, entry (rseq per-CPU)", run_djprobe_entry, (20_000_000, 100_000_000)),
    RowSpec("djp_entry_locked", "djprobe count, entry, lock inc forced", run_djprobe_entry_locked, (20_000_000, 100_000_000)),
    RowSpec("djp_mid", "djprobe count, mid (live flags)", run_djprobe_mid, (20_000_000, 100_000_000)),
    RowSpec("djp_record", "djprobe record (all regs), no drops", run_djprobe_record, (100_000, 500_000)),
    RowSpec("djp_record_args", "djprobe record args (2 lines), no drops", run_djprobe_record_args, (100_000, 500_000)),
    RowSpec("djp_lossless", "djprobe record args, lossless flood", run_djprobe_lossless, (1_000_000, 5_000_000)),
    RowSpec("djp_flood", "djprobe record, flood + batch read", run_djprobe_flood, (5_000_000, 20_000_000)),
    RowSpec("djp_handler", "djprobe record, flood + Py handler", run_djprobe_handler, (1_000_000, 5_000_000)),
    RowSpec("tsc_hist", "TSC pair + per-thread hist compiled in", run_tsc_hist, (5_000_000, 20_000_000)),
    RowSpec("djp_latency", "djprobe latency (entry + exits, hist)", run_djprobe_latency, (5_000_000, 20_000_000)),
    RowSpec("djp_trap", "djprobe count, trap mode", run_djprobe_trap, (50_000, 200_000)),
    RowSpec("uprobe", "kernel uprobe (tracefs)", run_uprobe, (50_000, 200_000)),
    RowSpec("uprobe_pair", "kernel uprobe + uretprobe (tracefs)", run_uprobe_pair, (20_000, 100_000)),
    RowSpec("bpftrace", "bpftrace count()", run_bpftrace, (50_000, 200_000)),
    RowSpec("frida", "Frida Interceptor + CModule", run_frida, (500_000, 2_000_000)),
    RowSpec("frida_latency", "Frida onEnter/onLeave latency (CModule)", run_frida_latency, (500_000, 2_000_000)),
    RowSpec("ptrace", "ptrace breakpoint (C tracer)", run_ptrace, (5_000, 20_000)),
]

# Rows that read a string argument at each hit (bench/string_rows.py).
from .string_rows import run_bpftrace_string, run_djprobe_record_string  # noqa: E402

ROWS += [
    RowSpec("djp_record_string", "djprobe record + string (64 B), no drops", run_djprobe_record_string, (50_000, 200_000)),
    RowSpec("frida_string", "Frida onEnter readUtf8String (JS)", run_frida_string, (50_000, 200_000)),
    RowSpec("bpftrace_string", "bpftrace str(arg0)", run_bpftrace_string, (50_000, 200_000)),
]

# Rows of the 32-bit (i386) loop target (bench/i386_rows.py), each over its own 32-bit baseline.
from .i386_rows import run_djprobe_entry_i386, run_djprobe_record_string_i386, run_uprobe_i386  # noqa: E402

ROWS += [
    RowSpec("djp_entry_i386", "djprobe count, entry, i386 process", run_djprobe_entry_i386, (20_000_000, 100_000_000)),
    RowSpec("uprobe_i386", "kernel uprobe (tracefs), i386 process", run_uprobe_i386, (50_000, 200_000)),
    RowSpec("djp_record_string_i386", "djprobe record + string (64 B), i386 process", run_djprobe_record_string_i386,
            (50_000, 200_000)),
]
