"""Insertion and removal of many probes in a running process, and what the probes cost in memory.

The target (targets/many.c) has N distinct small functions, a worker thread calling them all in
rounds, and a monitor thread that spins on CLOCK_MONOTONIC and keeps the largest gap between two
readings: the longest time its threads were held stopped, seen from inside. The tracer side
times each stop of the world too (``Process.stop`` to the end of ``Process.resume``).

With ``deep_threads`` (``run_deep``), more threads each recurse to about ``deep_kib`` KiB of used
stack and sleep there: every stop scans every thread's whole used stack for return addresses and
signal frames (djprobe.stacks), and this measures what that adds to a stop and to insertion.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass, field

from . import build


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    """VmRSS (or another field: VmHWM, the peak) of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class InsertionResult:
    probes: int
    refused: int
    insert_s: float
    insert_max_gap_ms: float  # seen by the target's monitor thread
    insert_max_stop_ms: float  # stop() .. resume() as timed in the tracer
    insert_stops: int
    remove_s: float
    remove_max_gap_ms: float
    remove_max_stop_ms: float
    remove_stops: int
    idle_max_gap_ms: float  # the monitor's largest gap with no tracer at work (scheduling noise)
    counts_exact: bool
    restored: bool
    target_rss_before_kib: int
    target_rss_probed_kib: int
    target_rss_after_kib: int
    tracer_rss_before_kib: int
    tracer_rss_probed_kib: int
    tracer_maxrss_kib: int
    deep_threads: int = 0  # extra threads parked with deep_kib KiB of used stack each
    deep_kib: int = 0
    stack_scans: int = 0  # scans of every thread's used stack (one per stop)
    stack_scan_ms: float = 0.0  # median time of one scan: what it adds to a stop
    stack_scan_max_ms: float = 0.0
    stack_scan_kib: float = 0.0  # median KiB read per scan
    notes: list[str] = field(default_factory=list)


class _Target:
    def __init__(self, n_functions: int, deep_threads: int = 0, deep_kib: int = 0) -> None:
        exe = build.many_target(n_functions)
        self.exe = exe
        argv = [str(exe)] + ([str(deep_threads), str(deep_kib)] if deep_threads else [])
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"insertion target did not start: {line!r}")
        self.pid = self.p.pid

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def gap_ms(self) -> float:
        return int(self.cmd("gap").split()[1]) / 1e6

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.cmd("quit")
                self.p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.p.kill()
                self.p.wait()


class _StopTimer:
    """Times every stop of the world: from the call of Process.stop to the return of resume."""

    def __init__(self, process) -> None:
        self.process = process
        self.spans: list[float] = []
        self._t0: float | None = None
        self._stop, self._resume = process.stop, process.resume
        process.stop = self._timed_stop
        process.resume = self._timed_resume

    def _timed_stop(self, *a, **k):
        if self._t0 is None and not self.process.threads:
            self._t0 = time.perf_counter()
        return self._stop(*a, **k)

    def _timed_resume(self, *a, **k):
        try:
            return self._resume(*a, **k)
        finally:
            if self._t0 is not None:
                self.spans.append(time.perf_counter() - self._t0)
                self._t0 = None

    def take(self) -> list[float]:
        spans, self.spans = self.spans, []
        return spans


def _text_of(pid: int, start: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(start)
        return f.read(size)


def _count_scans(proc) -> list:
    """Every stack scan the probed process makes from now on (djprobe.stacks.StackWords)."""
    scans: list = []
    snapshot = proc._stack_snapshot

    def counted():
        before = proc._stacks
        got = snapshot()
        if got is not before:
            scans.append(got)
        return got

    proc._stack_snapshot = counted
    return scans


def run(n_probes: int = 1000, n_functions: int = 1200, deep_threads: int = 0, deep_kib: int = 0) -> InsertionResult:
    """Insert and remove ``n_probes`` count probes; with ``deep_threads`` more threads parked at
    ``deep_kib`` KiB of used stack each (what scanning every thread's whole stack costs)."""
    import djprobe

    target = _Target(n_functions, deep_threads, deep_kib)
    try:
        time.sleep(0.2)
        target.gap_ms()
        time.sleep(0.5)
        idle_gap = target.gap_ms()
        tracer_before = rss_kib()
        rss_before = rss_kib(target.pid)
        proc = djprobe.attach(target.pid)
        try:
            timer = _StopTimer(proc.process)
            scans = _count_scans(proc)
            djps = [djprobe.Djprobe(f"f{i:05d}") for i in range(n_probes)]
            target.gap_ms()
            t0 = time.perf_counter()
            refused = proc.register_many(djps)
            insert_s = time.perf_counter() - t0
            insert_gap = target.gap_ms()
            insert_spans = timer.take()
            rss_probed = rss_kib(target.pid)
            tracer_probed = rss_kib()
            # Exact counts: the worker pauses, the main thread calls every function K times.
            placed = [d for d in djps if d.registered]
            if target.cmd("worker 0") != "ok":
                raise RuntimeError("worker did not pause")
            before = [d.hits for d in placed]
            k = 3
            target.cmd(f"run {k}")
            exact = all(d.hits - b == k for d, b in zip(placed, before))
            target.cmd("worker 1")
            time.sleep(0.05)
            sites = [(d.address, d.analysis.size) for d in placed]
            target.gap_ms()
            t0 = time.perf_counter()
            proc.unregister_many(placed)
            remove_s = time.perf_counter() - t0
            remove_gap = target.gap_ms()
            remove_spans = timer.take()
        finally:
            proc.close()
        rss_after = rss_kib(target.pid)
        full = scans
        # Every original byte is back: compare the patched sites with the file.
        restored = _restored(target, sites)
        return InsertionResult(
            probes=n_probes,
            refused=len(refused),
            insert_s=insert_s,
            insert_max_gap_ms=insert_gap,
            insert_max_stop_ms=1e3 * max(insert_spans, default=0.0),
            insert_stops=len(insert_spans),
            remove_s=remove_s,
            remove_max_gap_ms=remove_gap,
            remove_max_stop_ms=1e3 * max(remove_spans, default=0.0),
            remove_stops=len(remove_spans),
            idle_max_gap_ms=idle_gap,
            counts_exact=exact,
            restored=restored,
            target_rss_before_kib=rss_before,
            target_rss_probed_kib=rss_probed,
            target_rss_after_kib=rss_after,
            tracer_rss_before_kib=tracer_before,
            tracer_rss_probed_kib=tracer_probed,
            tracer_maxrss_kib=max(rss_kib("self", "VmHWM"), tracer_probed),  # VmHWM lags
            deep_threads=deep_threads,
            deep_kib=deep_kib,
            stack_scans=len(full),
            stack_scan_ms=1e3 * statistics.median(s.seconds for s in full) if full else 0.0,
            stack_scan_max_ms=1e3 * max((s.seconds for s in full), default=0.0),
            stack_scan_kib=statistics.median(s.bytes_scanned for s in full) / 1024 if full else 0.0,
            notes=[f"{len(refused)} refused: {refused[0][1]}"] if refused else [],
        )
    finally:
        target.close()


def _restored(target: _Target, sites: list[tuple[int, int]]) -> bool:
    from elftools.elf.elffile import ELFFile

    with open(f"/proc/{target.pid}/maps") as f:
        base = int(f.readline().split("-")[0], 16)
    data = target.exe.read_bytes()
    with open(target.exe, "rb") as f:
        segs = [s.header for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
    for address, size in sites:
        vaddr = address - base
        seg = next(s for s in segs if s.p_vaddr <= vaddr < s.p_vaddr + s.p_filesz)
        off = vaddr - seg.p_vaddr + seg.p_offset
        if _text_of(target.pid, address, size) != data[off : off + size]:
            return False
    return True


DEEP_THREADS = 16
DEEP_KIB = 1024


def run_deep(n_probes: int = 1000, n_functions: int = 1200) -> InsertionResult:
    """:func:`run` with 16 more threads holding about 1 MiB of used stack each."""
    return run(n_probes, n_functions, DEEP_THREADS, DEEP_KIB)
