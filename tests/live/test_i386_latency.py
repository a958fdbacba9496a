"""Latency probes in 32-bit (i386) processes: ``gcc -m32`` targets, PIE and non-PIE, several
threads, recursion, a 64-bit result in edx:eax, a function whose entry window ends with its
``ret`` (one stub for both): exact calls and returns, histograms that sum to the returns, known
durations in their buckets, insertion and removal under load, a killed tracer's probes cleaned
up, and the `djprobe latency` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import djprobe
from djprobe.arch import I386
from djprobe.latency import bucket_bounds, bucket_of
from djprobe.latency_stubs32 import table_index32

from ..conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(240)
FUNCS = ["spin_short", "spin_long", "tiny", "rec", "wide"]


def _build(*flags: str):
    try:
        return compile_c(TARGETS / "latency32.c", "-m32", *flags, name="latency32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def exe32(request):
    return _build(*request.param)


def _expected(n: int, threads: int) -> dict[str, int]:
    return {"spin_short": n * threads, "spin_long": n * threads, "tiny": n * threads, "wide": n * threads,
            "rec": threads * sum(1 + i % 5 for i in range(n))}


def _bounds(path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for line in path.read_text().splitlines():
        k, a, b = line.split()
        if k == kind:
            lo.append(int(a))
            hi.append(int(b))
    return np.array(lo), np.array(hi)


def _hist_of(values, slack: float) -> np.ndarray:
    hist = np.zeros(64, dtype=np.int64)
    for v in values:
        hist[bucket_of(int(v * slack))] += 1
    return hist


def test_exact_calls_returns_and_known_durations(exe32, tmp_path):
    """Every call paired with its return (threads, recursion: the key is esp), the histogram sums
    to the returns, and spin_short/spin_long lie between the durations the target measured inside
    and around each call; the program's output is unchanged."""
    n, threads = 120, 3
    record = tmp_path / "d.txt"
    plain = subprocess.run([str(exe32), str(n), str(threads), str(tmp_path / "plain.txt")], capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 0
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe32), str(n), str(threads), str(record)], stdout=write_fd) as proc:
        os.close(write_fd)
        assert proc.process.arch is I386
        probes = {f: djprobe.Djprobe(f, at="latency") for f in FUNCS}
        assert proc.register_many(list(probes.values())) == []
        assert [p._latency_role for p in probes["tiny"]._parts] == ["both"]  # mov; add; ret: one stub
        for region in proc._regions:
            assert region.end <= 1 << 32
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
    assert (output, status) == (plain.stdout, 0)
    want = _expected(n, threads)
    for f in FUNCS:
        lat = probes[f].latency
        assert lat.calls == want[f], (f, lat)
        assert lat.returns + lat.unpaired == want[f], (f, lat)
        assert lat.unpaired <= lat.collisions, (f, lat)
        assert int(lat.histogram.sum()) == lat.returns
    for f, kind, floor in (("spin_short", "short", 5000), ("spin_long", "long", 40000)):
        lat = probes[f].latency
        if lat.collisions:
            continue  # a lost sample: the bounds below hold for every call, not a subset
        lo, hi = _bounds(record, kind)
        assert len(lo) == n * threads and (lo >= floor).all()
        below = np.cumsum(_hist_of(lo, 0.999))  # calibration error allowed: 0.1%
        above = np.cumsum(_hist_of(hi, 1.001))
        got = np.cumsum(lat.histogram.astype(np.int64))
        assert (got <= below).all() and (got >= above).all(), (f, lat.buckets())
        assert lo.sum() * 0.999 <= lat.total_ns <= hi.sum() * 1.001
        assert lat.histogram[: bucket_of(floor)].sum() == 0
        low, _ = bucket_bounds(bucket_of(floor))
        assert lat.p50 is not None and lat.p50 >= low
    # the short functions take nanoseconds, not microseconds: most samples below 1 us
    for f in ("tiny", "wide", "rec"):
        lat = probes[f].latency
        assert lat.histogram[: bucket_of(1000)].sum() >= lat.returns // 2, (f, lat.buckets())


def test_register_unregister_under_load_32bit(start_target):
    """Four threads call the functions in a loop while latency probes come and go: calls in
    flight at insertion give unpaired exits (never measured), at removal calls without return;
    a probe placed again never pairs with an older one's entries."""
    exe = _build("-fPIE", "-pie")
    t = start_target([exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    funcs = ["tiny", "rec", "wide", "spin_short"]
    with djprobe.attach(t.pid) as proc:
        for cycle in range(6):
            lats = [djprobe.Djprobe(f, at="latency") for f in funcs]
            assert proc.register_many(lats) == []
            deadline = time.monotonic() + 5
            while min(d.latency.returns for d in lats) == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert min(d.latency.returns for d in lats) > 0, cycle
            proc.unregister_many(lats if cycle % 2 else lats[::-1])
            assert not proc.probes
            deadline = time.monotonic() + 10
            while proc._retired and time.monotonic() < deadline:
                time.sleep(0.002)
                with proc.stopped():
                    pass
            assert not proc._retired
            for d in lats:
                lat = d.latency
                in_flight = 4 * (5 if d.site.endswith(":rec") else 1)
                assert lat.unpaired <= in_flight + lat.collisions, (d.site, lat)
                assert 0 <= lat.calls - lat.returns <= in_flight + lat.collisions, (d.site, lat)
                assert int(lat.histogram.sum()) == lat.returns
            frozen = [(d.latency.calls, d.latency.returns) for d in lats]
            time.sleep(0.005)
            assert [(d.latency.calls, d.latency.returns) for d in lats] == frozen
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "djprobe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_cli_latency_on_a_32bit_program(exe32, tmp_path):
    n, threads = 60, 2
    res = _cli("latency", "--json", "spin_*", "tiny", "rec", "--", exe32, n, threads, tmp_path / "d.txt")
    assert res.returncode == 0, res.stderr
    assert f"calls={4 * n * threads}" in res.stdout  # the command's own output
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["exit_status"] == 0 and report["refused"] == []
    funcs = {f["site"].split(":")[-1]: f for f in report["functions"]}
    assert set(funcs) == {"spin_short", "spin_long", "tiny", "rec"}
    want = _expected(n, threads)
    for name, f in funcs.items():
        assert f["calls"] == want[name] and 0 < f["returns"] <= f["calls"]
        assert sum(b["count"] for b in f["hist"]) == f["returns"]
        assert f["address"] < 1 << 32
    for name, floor in (("spin_short", 5000), ("spin_long", 40000)):
        f = funcs[name]
        assert f["hist"][0]["low_ns"] <= floor and f["hist"][0]["count"] > 0
        assert f["total_ns"] >= floor * f["returns"]
    text = _cli("latency", "-u", "spin_long", "--", exe32, 20, 1, tmp_path / "d.txt")
    assert text.returncode == 0, text.stderr
    assert "usecs" in text.stdout and "calls 20" in text.stdout and "|*" in text.stdout


def test_tracer_killed_with_32bit_latency_probes_then_cleanup(start_target):
    """A tracer holding latency probes in a 32-bit process dies by SIGKILL: the target runs on
    through the stubs; `djprobe cleanup` restores every byte and the target ends as it should."""
    exe = _build("-fno-pie", "-no-pie")
    t = start_target([exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    script = (f"import time, djprobe\nproc = djprobe.attach({t.pid})\n"
              "d = proc.register(djprobe.Djprobe('rec', at='latency'))\n"
              "while d.latency.returns == 0: time.sleep(0.01)\n"
              "print('placed', len(d._parts), flush=True)\ntime.sleep(60)\n")
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = tracer.stdout.readline().split()
        assert line[0] == "placed"
        parts = int(line[1])
        tracer.kill()
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)
    status = _cli("status", "-p", t.pid, "--json")
    assert status.returncode == 0, status.stderr
    instances = [i for a in json.loads(status.stdout)["areas"] for i in a["instances"]]
    assert len(instances) == parts
    clean = _cli("cleanup", "-p", t.pid, "--json")
    assert clean.returncode == 0, clean.stderr + clean.stdout
    report = json.loads(clean.stdout)
    assert report["ok"] and len(report["restored"]) == parts and report["left_mapped"] == []
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"


def test_table_index32_spreads_stacks_and_tags():
    """The 32-bit index (what the stubs compute): threads' stacks and the tags of a function and
    the one it tail-calls land on different entries."""
    slots = 16384
    stacks = {table_index32(0xF7000000 - k * 0x801000 + 0xFCC, 3, slots) for k in range(256)}
    assert len(stacks) > 200
    assert table_index32(0xFFD0_1234, 1, slots) != table_index32(0xFFD0_1234, 2, slots)
    assert all(0 <= table_index32(esp, 5, slots) < slots for esp in range(0xFF00_0000, 0xFF00_1000, 4))


def test_multiplier_above_32_bits(tmp_path, monkeypatch):
    """A TSC below 1 GHz makes ``mul`` (ns per tick << 32) wider than 32 bits: the exit stub then
    adds ``ticks * high word``. This TSC is faster, so the calibration the stubs get is scaled by
    a factor that puts ``mul`` near 1.5 * 2**32: the durations recorded must be that factor times
    the real ones (bounded by what the target measured inside and around each call)."""
    import math

    import djprobe.latency as latency_mod
    from djprobe.latency_stubs import LatencyTargets

    exe = _build("-fno-pie", "-no-pie")
    seen = {}

    class Scaled(LatencyTargets):
        @classmethod
        def of(cls, layout, data_address, function, tag, ns_per_tick):
            seen["scale"] = scale = math.ceil(1.5 / ns_per_tick)
            targets = LatencyTargets.of(layout, data_address, function, tag, ns_per_tick * scale)
            seen["mul"] = targets.mul
            return targets

    monkeypatch.setattr(latency_mod, "LatencyTargets", Scaled)
    n, threads = 40, 2
    record = tmp_path / "d.txt"
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(n), str(threads), str(record)], stdout=write_fd) as proc:
        os.close(write_fd)
        lat = proc.register(djprobe.Djprobe("spin_long", at="latency")).latency
        proc.start()
        with os.fdopen(read_fd) as out:
            out.read()
        assert proc.process.popen.wait(timeout=120) == 0
    assert seen["mul"] >> 32 >= 1  # the high word is used
    scale = seen["scale"]
    assert lat.calls == n * threads and lat.returns + lat.unpaired == n * threads
    if lat.collisions == 0:
        lo, hi = _bounds(record, "long")
        assert lo.sum() * scale * 0.999 <= lat.total_ns <= hi.sum() * scale * 1.001, (scale, lat)


REGS_MAIN = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <unistd.h>
int regcheck(int n);
int leaf_keep(int);
static volatile int handled;
static void on_signal(int s) { (void)s; handled += leaf_keep(1) > 0; }
static pthread_t main_thread;
static volatile int done;
static void *signaller(void *p) {
    (void)p;
    while (!done) { pthread_kill(main_thread, SIGUSR1); usleep(20); }
    return NULL;
}
int main(int argc, char **argv) {
    signal(SIGUSR1, on_signal);
    main_thread = pthread_self();
    pthread_t t;
    pthread_create(&t, NULL, signaller, NULL);
    int changed = regcheck(atoi(argv[1]));
    done = 1;
    pthread_join(t, NULL);
    printf("changed=%d handled=%d\n", changed, handled);
    return 0;
}
"""


def test_stubs_keep_every_register_under_signals(tmp_path):
    """A caller keeps values in every register (ebx..ebp, xmm0, xmm1) across calls of functions
    that do not touch them; with latency probes on both (separate entry and exit stubs, and one
    stub for both) nothing may change. A thread signals the caller every 20 us, and its handler
    calls leaf_keep too (nested, lower on the same stack, often inside a stub): every call is
    counted and paired."""
    main = tmp_path / "regs32_main.c"
    main.write_text(REGS_MAIN)
    try:
        exe = compile_c([main, TARGETS / "latency_regs32.S"], "-m32", "-O2", name="latency_regs32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here: {exc}")
    n = 200_000
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(n)], stdout=write_fd) as proc:
        os.close(write_fd)
        probes = {f: djprobe.Djprobe(f, at="latency") for f in ("leaf_keep", "leaf_tiny")}
        assert proc.register_many(list(probes.values())) == []
        assert [p._latency_role for p in probes["leaf_tiny"]._parts] == ["both"]
        assert [p._latency_role for p in probes["leaf_keep"]._parts] == ["entry", "exit"]
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=120) == 0
    changed, handled = (int(kv.split("=")[1]) for kv in output.split())
    assert changed == 0 and handled > 10, output
    for f, calls in (("leaf_keep", n + handled), ("leaf_tiny", n)):
        lat = probes[f].latency
        assert lat.calls == calls and lat.returns + lat.unpaired == calls, (f, lat)
        assert lat.unpaired <= lat.collisions and int(lat.histogram.sum()) == lat.returns
