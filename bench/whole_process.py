"""Probing a whole process: 20,000 count probes into a running python3 (issue 15, item 3).

The target is python3 with enough extension modules imported (ssl, sqlite3, ctypes, decimal, ...)
to have more than 20,000 functions in its modules; it runs a small loop (json, math, sleeps).
The probes are the first 20,000 sites of ``*:*`` (modules in name order, functions in address
order), placed with one ``register_many`` in areas of the counting layout, as ``djprobe count -p
PID '*:*'`` does.

Measured twice with the same, initially empty, site cache directory: *cold* (every site
analysed, verdicts written to the cache) and *warm* (verdicts read from it). Reported: the time
to resolve the patterns and to place the probes, the number of stops and the longest one (timed
in the tracer, from the request to stop to the end of the resume), and the tracer's resident
size before attaching, with the probes in, at its peak, and once every probe's count was read
(which maps the counter pages of the areas, shared with the target, into the tracer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .insertion import rss_kib

if TYPE_CHECKING:  # pragma: no cover
    from djprobe.probes import Djprobe, ProbedProcess

N_PROBES = 20_000
_TARGET = """
import ctypes, decimal, hashlib, json, math, select, socket, sqlite3, ssl, sys, time
print("ready", flush=True)
while True:
    json.dumps({"a": [math.sqrt(i) for i in range(100)]})
    time.sleep(0.001)
"""


@dataclass
class WholeProcessResult:
    phase: str  # cold or warm (site cache)
    probes: int
    refused: int
    resolve_s: float
    insert_s: float
    stops: int
    longest_stop_ms: float
    remove_s: float
    counting: int  # probes with hits after a short while (the loop runs)
    cache_hits: int
    cache_misses: int
    tracer_rss_before_kib: int
    tracer_rss_probed_kib: int
    tracer_maxrss_kib: int
    tracer_rss_counted_kib: int = 0  # after reading every probe's count (maps the counter pages)
    # RssAnon (no file-backed pages): the RSS growth also counts library code pages touched again
    # when the page cache dropped them since the baseline (seen: a baseline 5 MiB lower)
    tracer_anon_before_kib: int = 0
    tracer_anon_probed_kib: int = 0

    @property
    def total_s(self) -> float:
        return self.resolve_s + self.insert_s


def whole_process_probes(proc: ProbedProcess, n: int) -> list[Djprobe]:
    """Count probes at the first ``n`` function entries of the process's modules, by name."""
    from djprobe.module_globs import matching_modules
    from djprobe.probes import Djprobe

    symbols = proc.symbols
    probes: list[Djprobe] = []
    for module in sorted(matching_modules(symbols, "*"), key=lambda m: m.name):
        try:
            sites = symbols.resolve(f"{module.path}:*")
        except Exception:  # noqa: BLE001 (a module without functions)
            continue
        probes += [Djprobe(s.address) for s in sites]
        if len(probes) >= n:
            break
    return probes[:n]


def _one(phase: str, n: int) -> WholeProcessResult:
    from djprobe.area import AreaLayout
    from djprobe.probes import attach

    target = subprocess.Popen([sys.executable, "-c", _TARGET], stdout=subprocess.PIPE, text=True)
    try:
        if target.stdout.readline().strip() != "ready":
            raise RuntimeError("whole-process target did not start")
        rss_before, anon_before = rss_kib(), rss_kib(field="RssAnon")
        t0 = time.monotonic()
        with attach(target.pid) as proc:
            proc.layout = AreaLayout.for_counting()  # as `djprobe count` does
            probes = whole_process_probes(proc, n)
            t1 = time.monotonic()
            stops: list[float] = []
            stop, resume = proc.process.stop, proc.process.resume

            def timed_stop(*a, **k):
                stops.append(time.monotonic())
                return stop(*a, **k)

            def timed_resume(*a, **k):
                result = resume(*a, **k)
                stops[-1] = time.monotonic() - stops[-1]
                return result

            proc.process.stop, proc.process.resume = timed_stop, timed_resume
            refused = proc.register_many(probes)
            t2 = time.monotonic()
            rss_probed, anon_probed = rss_kib(), rss_kib(field="RssAnon")
            placed = [d for d in probes if d.registered]
            time.sleep(0.5)
            counting = sum(1 for d in placed if d.hits)
            rss_counted = rss_kib()
            hits, misses = proc.site_cache.hits, proc.site_cache.misses
            t3 = time.monotonic()
            proc.unregister_many(placed)
            remove_s = time.monotonic() - t3
            proc.process.stop, proc.process.resume = stop, resume
        return WholeProcessResult(
            phase=phase, probes=len(placed), refused=len(refused), resolve_s=t1 - t0, insert_s=t2 - t1,
            stops=len(stops), longest_stop_ms=max(stops) * 1000 if stops else 0.0, remove_s=remove_s,
            counting=counting, cache_hits=hits, cache_misses=misses, tracer_rss_before_kib=rss_before,
            tracer_rss_probed_kib=rss_probed, tracer_maxrss_kib=rss_kib(field="VmHWM"), tracer_rss_counted_kib=rss_counted,
            tracer_anon_before_kib=anon_before, tracer_anon_probed_kib=anon_probed,
        )
    finally:
        target.kill()
        target.wait()


def run(n: int = N_PROBES, phases: tuple[str, ...] = ("cold", "warm")) -> list[dict]:
    """Cold then warm, each in a fresh tracer process (so that resident sizes are its own)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="djprobe-bench-cache-") as cache:
        env = dict(os.environ, DJPROBE_CACHE_DIR=cache)
        for phase in phases:
            code = f"import json, bench.whole_process as w; r = w._one({phase!r}, {n}); print(json.dumps(dict(w.asdict(r), total_s=r.total_s)))"
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if done.returncode != 0:
                raise RuntimeError(f"whole-process {phase} run failed: {done.stderr[-2000:]}")
            import json

            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def format_result(results: list[dict]) -> str:
    lines = [f"Whole process: {N_PROBES:,} count probes into a running python3 ('*:*'), site cache cold then warm"]
    for r in results:
        lines.append(
            f"  {r['phase']:<5} {r['probes']} placed ({r['refused']} refused) in {r['total_s']:.2f} s "
            f"(resolve {r['resolve_s']:.2f} s, register_many {r['insert_s']:.2f} s; cache {r['cache_hits']} hits, "
            f"{r['cache_misses']} misses); {r['stops']} stops, longest {r['longest_stop_ms']:.1f} ms (tracer); "
            f"removal {r['remove_s']:.2f} s; {r['counting']} probes counted hits in 0.5 s"
        )
        lines.append(
            f"        tracer RSS {r['tracer_rss_before_kib'] // 1024} MiB before attach -> "
            f"{r['tracer_rss_probed_kib'] // 1024} MiB with the probes "
            f"(+{(r['tracer_rss_probed_kib'] - r['tracer_rss_before_kib']) / 1024:.1f} MiB; anonymous "
            f"+{(r.get('tracer_anon_probed_kib', 0) - r.get('tracer_anon_before_kib', 0)) / 1024:.1f} MiB), "
            f"peak {r['tracer_maxrss_kib'] // 1024} MiB; {r.get('tracer_rss_counted_kib', 0) // 1024} MiB "
            "once every count was read"
        )
    return "\n".join(lines)


def goals(results: list[dict]) -> list[tuple[str, str, bool | None]]:
    """Issue 15.3's goals, on the warm run (the cold one analyses every site once)."""
    warm = next((r for r in results if r["phase"] == "warm"), None)
    if warm is None:
        return []
    growth = (warm["tracer_rss_probed_kib"] - warm["tracer_rss_before_kib"]) / 1024
    return [
        ("20,000 probes inserted <= 3 s (warm cache)", f"{warm['total_s']:.2f} s", warm["total_s"] <= 3),
        ("target stopped <= 10 ms at a time (tracer)", f"{warm['longest_stop_ms']:.1f} ms", warm["longest_stop_ms"] <= 10),
        ("tracer RSS growth <= 50 MB", f"{growth:.0f} MiB", growth <= 50),
    ]


if __name__ == "__main__":
    print(format_result(run()))
