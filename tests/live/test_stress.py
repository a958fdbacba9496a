"""Stress: 8 threads hammer probed functions (entry and mid-function sites) while the tracer
inserts and removes probes over and over. Zero crashes, zero wrong results, every original byte
restored (compared with the file), hit counts consistent (exact in a spawned run).

Short form: 100 cycles. Long form (DJPROBE_LONG=1): 500 cycles."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

import djprobe
from djprobe.sites import Verdict, analyse_function
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

LONG = os.environ.get("DJPROBE_LONG") == "1"
CYCLES = 500 if LONG else 100
THREADS = 8
FUNCS = {"s_line": 2, "s_flags": 2, "s_red": 1, "s_call": 1}  # calls per iteration per thread

pytestmark = pytest.mark.timeout(900 if LONG else 180)


@pytest.fixture(scope="module")
def stress_exe():
    return compile_c(TARGETS / "stress.c", name="stress")


def jump_sites(symbols: Symbols, memory=None) -> dict[int, tuple[str, int]]:
    """Non-overlapping sites (entry and mid-function) that take a jump: {address: (func, size)}."""
    mod = symbols.modules[0]
    out: dict[int, tuple[str, int]] = {}
    for name in FUNCS:
        sym = mod.symbols(name)[0]
        fa = analyse_function(mod, sym, memory)
        end = 0
        for a in fa.boundaries():
            if a < end:
                continue
            res = fa.analyse(a)
            if res.verdict is Verdict.JUMP:
                out[a] = (name, res.size)
                end = a + res.size
    return out


def _file_code(exe, sites: dict[int, tuple[str, int]], bias: int) -> dict[int, bytes]:
    mod = Symbols.from_file(str(exe)).modules[0]
    return {a: mod.read_file(a - bias, 32) for a in sites}


def test_sites_cover_entries_and_middles(stress_exe):
    sites = jump_sites(Symbols.from_file(str(stress_exe)))
    mod = Symbols.from_file(str(stress_exe)).modules[0]
    entries = {mod.symbols(f)[0].address for f in FUNCS}
    assert entries <= set(sites), "every function entry takes a jump"
    assert len(set(sites) - entries) >= 6, "several mid-function sites"


def test_exact_hits_spawned(stress_exe):
    n = 20000
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(stress_exe), "run", str(n)], stdout=write_fd) as proc:
        os.close(write_fd)
        sites = jump_sites(proc.symbols, proc.process.memory)
        probes = {a: djprobe.Djprobe(a) for a in sites}
        assert proc.register_many(list(probes.values())) == []
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
        hits = {a: p.hits for a, p in probes.items()}
    assert status == 0 and output.strip() == f"done iters={THREADS * n} bad=0", output
    want = {a: FUNCS[f] * THREADS * n for a, (f, _) in sites.items()}
    assert hits == want


def test_register_unregister_cycles_under_load(start_target, stress_exe):
    t = start_target([stress_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    rng = random.Random(1234)
    total: dict[int, int] = {}
    t0 = time.monotonic()
    with djprobe.attach(t.pid) as proc:
        sites = jump_sites(proc.symbols, proc.process.memory)
        bias = proc.symbols.modules[0].bias
        want = _file_code(stress_exe, sites, bias)
        addrs = sorted(sites)
        assert {a: proc.read(a, 32) for a in addrs} == want
        for cycle in range(CYCLES):
            chosen = addrs if cycle % 3 == 0 else rng.sample(addrs, rng.randint(1, len(addrs)))
            probes = [djprobe.Djprobe(a) for a in chosen]
            assert proc.register_many(probes) == [], cycle
            time.sleep(rng.choice((0, 0.0005, 0.002, 0.01)))
            if rng.random() < 0.5:
                proc.unregister_many(probes)
            else:  # one by one, in random order
                for p in rng.sample(probes, len(probes)):
                    proc.unregister(p)
            for p in probes:
                assert not p.registered and p.hits >= 0
                total[p.address] = total.get(p.address, 0) + p.hits
            if cycle % 25 == 0:
                assert t.proc.poll() is None, f"target died in cycle {cycle}"
                assert {a: proc.read(a, 32) for a in addrs} == want, cycle
        assert {a: proc.read(a, 32) for a in addrs} == want
    elapsed = time.monotonic() - t0
    assert t.proc.poll() is None
    assert set(total) == set(addrs) and all(v > 0 for v in total.values()), total
    t.proc.stdin.close()
    line = t.proc.stdout.readline().split()
    assert t.proc.wait(timeout=20) == 0
    assert line[0] == "iters" and int(line[1]) > 0 and line[-1] == "0", line
    print(f"{CYCLES} cycles, {len(addrs)} sites, {elapsed:.1f} s, {sum(total.values())} hits")


def test_probes_stay_while_threads_hammer_then_exact_vs_target(start_target, stress_exe):
    """Probes in for a while under load: the hits of an entry probe match the calls made."""
    t = start_target([stress_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        sites = jump_sites(proc.symbols, proc.process.memory)
        probes = {a: djprobe.Djprobe(a) for a in sites}
        assert proc.register_many(list(probes.values())) == []
        with proc.stopped():  # insertion goes in several short stops: count from when all are in
            base = {a: p.hits for a, p in probes.items()}
        time.sleep(1.0)
        with proc.stopped():
            counts = {a: p.hits - base[a] for a, p in probes.items()}
            proc.unregister_many(list(probes.values()))
    # within one function every straight-line site fires once per call: equal up to the threads
    # caught between two sites of the same call
    by_func: dict[str, list[int]] = {}
    for a, (f, _) in sites.items():
        by_func.setdefault(f, []).append(counts[a] // FUNCS[f])
    for f, vals in by_func.items():
        assert min(vals) > 0 and max(vals) - min(vals) <= 2 * THREADS, (f, vals)
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"
