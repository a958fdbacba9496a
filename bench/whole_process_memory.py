"""Where the tracer's memory goes when it probes a whole process (issue 15, item 3).

The warm case of :mod:`bench.whole_process` (the site cache filled by a first, untraced run),
with ``tracemalloc`` on: the tracer's resident size and the traced Python allocations after each
phase (attach, symbol tables and patterns resolved, probes placed, counts read), and the
allocations of the "placed" phase grouped by file and by line. ``tracemalloc`` slows the run
and adds its own memory (not counted in the traced sizes, counted in the RSS): read the RSS
column of :mod:`bench.whole_process` for the figure of the goal, this one for the breakdown.

``python3 -m bench.whole_process_memory [N_PROBES] [TOP]``
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

from .insertion import rss_kib
from .whole_process import N_PROBES, _TARGET, whole_process_probes


def _mib(n: float) -> str:
    return f"{n / 2**20:7.1f} MiB"


def _measure(n: int, top: int) -> None:
    from djprobe.area import AreaLayout
    from djprobe.probes import attach

    target = subprocess.Popen([sys.executable, "-c", _TARGET], stdout=subprocess.PIPE, text=True)
    try:
        if target.stdout.readline().strip() != "ready":
            raise RuntimeError("whole-process target did not start")
        phases: list[tuple[str, int, int, tracemalloc.Snapshot]] = []
        tracemalloc.start(1)

        def mark(name: str) -> None:
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0]
            phases.append((name, rss_kib() * 1024, traced, tracemalloc.take_snapshot()))

        mark("before attach")
        with attach(target.pid) as proc:
            proc.layout = AreaLayout.for_counting()
            probes = whole_process_probes(proc, n)
            mark("symbols + patterns resolved")
            t = time.monotonic()
            refused = proc.register_many(probes)
            took = time.monotonic() - t
            mark("probes placed")
            placed = [d for d in probes if d.registered]
            sum(d.hits for d in placed)
            mark("every count read")
            proc.unregister_many(placed)
        print(f"{len(placed)} placed, {len(refused)} refused, register_many {took:.2f} s (traced)")
        print(f"{'phase':<30} {'RSS':>12} {'traced':>12}")
        for name, rss, traced, _ in phases:
            print(f"{name:<30} {_mib(rss)} {_mib(traced)}")
        for (a, _, _, before), (b, _, _, after) in zip(phases, phases[1:]):
            for key in ("filename", "lineno"):
                stats = after.compare_to(before, key)
                print(f"\n-- {a} -> {b}: top {top} by {key}")
                for s in stats[:top]:
                    frame = s.traceback[0]
                    where = frame.filename.split("/src/", 1)[-1].split("/site-packages/", 1)[-1]
                    if key == "lineno":
                        where += f":{frame.lineno}"
                    print(f"  {_mib(s.size_diff)} {s.count_diff:+9d} blocks  {where}")
    finally:
        target.kill()
        target.wait()


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else N_PROBES
    top = int(argv[1]) if len(argv) > 1 else 25
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="djprobe-bench-cache-") as cache:
        env = dict(os.environ, DJPROBE_CACHE_DIR=cache)
        for code in (f"import bench.whole_process as w; w._one('cold', {n})",
                     f"import bench.whole_process_memory as m; m._measure({n}, {top})"):
            done = subprocess.run([sys.executable, "-c", code], env=env, text=True, timeout=900, cwd=root,
                                  capture_output="_one" in code)
            if done.returncode != 0:
                raise RuntimeError(f"whole-process memory run failed: {(done.stderr or '')[-2000:]}")


if __name__ == "__main__":
    main(sys.argv[1:])
