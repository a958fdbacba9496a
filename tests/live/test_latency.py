"""Latency probes in real processes: exact calls and returns (threads, recursion, tail calls,
longjmp, C++ exceptions), durations in the right buckets, unchanged output, insertion and
removal under load, and the `djprobe latency` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import djprobe
import djprobe.latency
from djprobe.area import AreaLayout
from djprobe.latency import bucket_bounds, bucket_of
from tests.conftest import TARGETS, compile_c
from tests.live.test_returns import expected_counts

pytestmark = pytest.mark.timeout(240)

# every function of exits.S/returns_main.c (x_wrap: its tail call ends its entry window, one stub
# does both actions)
FUNCS = ["x_three", "x_leaf", "x_tail", "x_itail", "x_self", "x_paths", "x_condtail", "x_chain", "x_wrap", "rec",
         "jumper"]


@pytest.fixture(scope="module")
def returns_exe():
    return compile_c([TARGETS / "exits.S", TARGETS / "returns_main.c"], "-O2", name="returns")


@pytest.fixture(scope="module")
def eh_exe():
    return compile_c(TARGETS / "returns_eh.cc", "-O2", "-lstdc++", name="returns_eh")


@pytest.fixture(scope="module")
def timed_exe():
    return compile_c([TARGETS / "latency_main.c", TARGETS / "latency_short.S"], "-O2", name="latency_main")


def _run_with_latency(argv, funcs, per_cpu=True):
    """Spawn argv with a latency probe on each of funcs; returns (output, status, probes, refused)."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(a) for a in argv], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.per_cpu_counters = per_cpu  # False: the locked histogram shards (and lock inc counts)
        probes = {f: djprobe.Djprobe(f, at="latency") for f in funcs}
        refused = {d.addr: exc for d, exc in proc.register_many(list(probes.values()))}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
    return output, status, probes, refused


def _check_pairing(lat, calls: int, returns: int) -> None:
    """Every exit that ran after its entry was seen is either paired or unpaired: exact. A
    sample is lost only to a collision, which is counted."""
    assert lat.calls == calls
    assert lat.returns + lat.unpaired == returns
    assert lat.unpaired <= lat.collisions
    assert int(lat.histogram.sum()) == lat.returns


@pytest.mark.parametrize("per_cpu", [True, False], ids=["per_cpu", "locked"])
def test_exact_calls_and_returns_threads_recursion_tail_calls_longjmp(returns_exe, per_cpu):
    n, threads = 1200, 3
    plain = subprocess.run([str(returns_exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0
    out, status, probes, refused = _run_with_latency([returns_exe, n, threads], FUNCS, per_cpu)
    assert (out, status) == (plain.stdout, 0)
    assert refused == {}
    want = expected_counts(n, threads)
    for f in FUNCS:
        _check_pairing(probes[f].latency, *want[f])
    assert len(probes["x_three"].exits.exits) == 3
    assert [p._latency_role for p in probes["x_wrap"]._parts] == ["both"]
    # rec(4) measures the four calls under it too: its samples spread over more buckets
    assert probes["rec"].latency.total_ns > 0 and probes["rec"].latency.average_ns > 0


def test_exception_thrown_through_probed_functions(eh_exe):
    n, threads = 800, 3
    plain = subprocess.run([str(eh_exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    funcs = ["_Z7throweri", "_Z6middlei"]
    out, status, probes, refused = _run_with_latency([eh_exe, n, threads], funcs)
    assert refused == {}
    assert (out, status) == (plain.stdout, 0)  # exceptions still caught, cleanups still run
    thrown = n // 4 * threads
    for f in funcs:
        _check_pairing(probes[f].latency, n * threads, n * threads - thrown)


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


def test_known_durations_land_in_their_buckets(timed_exe, tmp_path):
    """spin_short spins >= 5 us, spin_long >= 40 us. For each call the target wrote the time the
    function measured inside itself (a lower bound of what the probe sees) and the time its caller
    measured around the call (an upper bound): the probe's histogram must lie between the two
    histograms (cumulatively), whatever the load did to the durations."""
    n, threads = 150, 3
    record = tmp_path / "durations.txt"
    funcs = ["spin_short", "spin_long", "tiny", "lat_overlap", "lat_noexit"]
    out, status, probes, refused = _run_with_latency([timed_exe, n, threads, record], funcs)
    assert status == 0 and out == f"calls={3 * n * threads} checksum={threads * sum(i + 1 for i in range(n))}\n"
    # lat_noexit's early return takes a short jump (its refusal without them: test_refusals_and_exclusive_sites)
    assert refused == {}, refused
    _check_pairing(probes["lat_noexit"].latency, 2 * n * threads, 2 * n * threads)
    _check_pairing(probes["tiny"].latency, n * threads, n * threads)  # one stub: entry, lea, exit, ret
    _check_pairing(probes["lat_overlap"].latency, 2 * n * threads, 2 * n * threads)  # grown: one stub too
    for f, kind, floor in (("spin_short", "short", 5000), ("spin_long", "long", 40000)):
        lat = probes[f].latency
        _check_pairing(lat, n * threads, n * threads)
        if lat.collisions:
            continue  # a lost sample: the bounds below hold for every call, not for a subset
        lo, hi = _bounds(record, kind)
        assert len(lo) == n * threads and (lo >= floor).all()
        below = np.cumsum(_hist_of(lo, 0.999))  # calibration error allowed: 0.1%
        above = np.cumsum(_hist_of(hi, 1.001))
        got = np.cumsum(lat.histogram.astype(np.int64))
        assert (got <= below).all() and (got >= above).all(), (f, lat.buckets())
        assert lo.sum() * 0.999 <= lat.total_ns <= hi.sum() * 1.001
        assert lat.histogram[: bucket_of(floor)].sum() == 0  # nothing below the spin
        low, high = bucket_bounds(bucket_of(floor))
        assert low <= floor < high
        assert lat.p50 is not None and lat.p50 >= low


def test_register_unregister_under_load(start_target, returns_exe):
    """Four threads call every function in a loop while latency probes come and go: threads
    inside the functions at insertion (no entry seen: their exits are unpaired, never measured)
    and at removal must be fine, and a probe placed again never pairs with an older one's entry."""
    t = start_target([returns_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        for cycle in range(12):
            lats = [djprobe.Djprobe(f, at="latency") for f in FUNCS]
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
                depth = 5 if d.site.endswith(":rec") else 1  # calls of one thread in flight at once
                in_flight = 4 * depth  # four threads
                # exits without their entry: only calls begun before insertion (or collisions)
                assert lat.unpaired <= in_flight + lat.collisions, (d.site, lat)
                if not d.site.endswith(":jumper"):  # left by longjmp: no return
                    # calls still in flight at removal have no return
                    assert 0 <= lat.calls - lat.returns <= in_flight + lat.collisions, (d.site, lat)
                assert int(lat.histogram.sum()) == lat.returns
            frozen = [(d.latency.calls, d.latency.returns) for d in lats]
            time.sleep(0.005)
            assert [(d.latency.calls, d.latency.returns) for d in lats] == frozen
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"


@pytest.mark.parametrize("per_cpu", [True, False], ids=["per_cpu", "locked"])
def test_entry_window_ending_with_the_way_into_an_exit(per_cpu):
    """``test rdi,rdi; je <lone ret>`` (glibc's free): the lone ret's path window is the end of
    the entry window (the je alone, or the whole entry window); and entry windows that end inside
    an exit window, grown to its end (a ret after a jne, a je into a lone block). One stub for
    both, exact under threads, the early return measured as well as the other."""
    exe = compile_c([TARGETS / "latency_wayin_main.c", TARGETS / "latency_wayin.S"], "-O2", name="latency_wayin")
    n, threads = 3000, 3
    plain = subprocess.run([str(exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0
    funcs = ["lat_wayin_far", "lat_wayin_near", "lat_grow_ret", "lat_grow_path"]
    out, status, probes, refused = _run_with_latency([exe, n, threads], funcs, per_cpu)
    assert refused == {}
    assert (out, status) == (plain.stdout, 0)
    for f in funcs:
        both = probes[f]._parts[0]
        assert [p._latency_role for p in probes[f]._parts] == ["both", "exit"]
        assert bool(both._latency_exit.exit_path) == (f != "lat_grow_ret")  # a lone block, reached by a copied je
        # grown (from 7 and 6 bytes): the entry window runs to the end of the exit window it overlapped
        assert both.size == {"lat_wayin_far": 9, "lat_wayin_near": 5, "lat_grow_ret": 10, "lat_grow_path": 8}[f]
        _check_pairing(probes[f].latency, n * threads, n * threads)


def test_refusals_and_exclusive_sites(returns_exe, timed_exe):
    with djprobe.spawn([str(timed_exe), "1", "1", "/dev/null"], stdout=subprocess.DEVNULL) as proc:
        proc.springboards = False  # lat_noexit's early return then has no window: refused
        with pytest.raises(djprobe.InvalidSiteError, match="the way in by"):
            proc.register(djprobe.Djprobe("lat_noexit", at="latency"))
        assert not proc.probes
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
    with djprobe.spawn([str(returns_exe), "60", "1"], stdout=subprocess.DEVNULL) as proc:
        proc.springboards = False  # short jumps would give x_short's first exit a window
        with pytest.raises(djprobe.InvalidSiteError):
            proc.register(djprobe.Djprobe("x_short", at="latency"))  # its return side is refused
        assert not proc.probes
        proc.springboards = True
        short = proc.register(djprobe.Djprobe("x_short", at="latency"))  # its first exit: a jmp rel8
        assert any(p._instance.springboard is not None for p in short._parts)
        proc.unregister(short)
        assert not proc.probes
        with pytest.raises(djprobe.InvalidSiteError, match="no size, handler"):
            djprobe.Djprobe("x_three", handler=lambda d, r: None, at="latency")
        with pytest.raises(djprobe.InvalidSiteError, match="without %return"):
            djprobe.Djprobe("x_three%return", at="latency")
        lat = proc.register(djprobe.Djprobe("x_three", at="latency"))
        with pytest.raises(djprobe.SiteBusyError, match="latency probe"):
            proc.register(djprobe.Djprobe("x_three"))
        with pytest.raises(djprobe.SiteBusyError):
            proc.register(djprobe.Djprobe("x_three", at="return"))
        assert lat.registered and len(proc.probes) == 1 + 3  # its entry and three exits
        entry = proc.register(djprobe.Djprobe("x_leaf"))
        with pytest.raises(djprobe.SiteBusyError, match="latency probe cannot share it"):
            proc.register(djprobe.Djprobe("x_leaf", at="latency"))
        proc.unregister(entry)
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
        assert lat.latency.calls == 60 and lat.latency.returns + lat.latency.unpaired == 60


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "djprobe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_cli_json(timed_exe, tmp_path):
    n, threads = 60, 2
    record = tmp_path / "d.txt"
    res = _cli("latency", "--json", "--no-short", "lat_noexit", "tiny", "--", timed_exe, 5, 1, record)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.splitlines()[-1])
    assert [(r["site"].split(":")[-1], "the way in by" in r["reason"]) for r in report["refused"]] == [
        ("lat_noexit", True)]  # without short jumps, its early return has no window
    res = _cli("latency", "--json", "spin_*", "tiny", "lat_noexit", "--", timed_exe, n, threads, record)
    assert res.returncode == 0, res.stderr
    assert f"calls={3 * n * threads}" in res.stdout  # the command's own output
    report = json.loads(res.stdout.splitlines()[-1])
    assert set(report) == {"functions", "refused", "exit_status"}
    assert report["exit_status"] == 0
    assert report["refused"] == []  # lat_noexit's early return: a short jump
    funcs = {f["site"].split(":")[-1]: f for f in report["functions"]}
    assert set(funcs) == {"spin_short", "spin_long", "tiny", "lat_noexit"}
    assert funcs["tiny"]["calls"] == n * threads
    assert funcs["lat_noexit"]["calls"] == funcs["lat_noexit"]["returns"] == 2 * n * threads
    for name, floor in (("spin_short", 5000), ("spin_long", 40000)):
        f = funcs[name]
        assert set(f) == {"site", "address", "calls", "returns", "total_ns", "hist"}
        assert f["calls"] == n * threads and 0 < f["returns"] <= f["calls"]
        assert sum(b["count"] for b in f["hist"]) == f["returns"]
        for b in f["hist"]:
            assert b["high_ns"] == (2 * b["low_ns"] if b["low_ns"] else 1)
        assert f["hist"][0]["low_ns"] <= floor and f["hist"][0]["count"] > 0
        assert f["total_ns"] >= floor * f["returns"]


def test_cli_text_interval_and_output_file(timed_exe, tmp_path):
    record = tmp_path / "d.txt"
    out = tmp_path / "report.txt"
    res = _cli("latency", "-u", "-o", out, "spin_long", "--", timed_exe, 40, 1, record)
    assert res.returncode == 0, res.stderr
    assert "Tracing 1 function" in res.stderr
    text = out.read_text()
    assert "spin_long" in text and "usecs" in text and "calls 40" in text and "returns" in text
    assert "p50" in text and "p99" in text and "|*" in text
    res = _cli("latency", "-m", "spin_long", "--", timed_exe, 40, 1, record)
    assert res.returncode == 0 and "msecs" in res.stdout


def test_cli_interval_resets(timed_exe, tmp_path):
    """With -i every report covers the time since the one before: the calls and returns of all
    reports add up to the run's (however many reports the load let happen)."""
    n = 2000
    res = _cli("latency", "--json", "-i", "0.05", "spin_short", "--", timed_exe, n, 1, tmp_path / "d.txt")
    assert res.returncode == 0, res.stderr
    reports = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert reports and all(r["final"] is False for r in reports[:-1]) and reports[-1]["final"] is True
    assert [r["interval"] for r in reports] == list(range(1, len(reports) + 1))
    assert reports[-1]["exit_status"] == 0
    calls = returns = 0
    for r in reports:
        (f,) = r["functions"]
        assert sum(b["count"] for b in f["hist"]) == f["returns"]
        calls += f["calls"]
        returns += f["returns"]
    assert calls == n and returns <= n


def test_tracer_killed_with_latency_probes_then_cleanup(start_target, returns_exe):
    """A tracer holding latency probes dies by SIGKILL: the target keeps running through the
    stubs; `djprobe status` lists the entry and exit jumps, `djprobe cleanup` restores every byte
    and unmaps the area (layout with the latency block), and the target ends as it should."""
    t = start_target([returns_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    script = (f"import time, djprobe\nproc = djprobe.attach({t.pid})\n"
              "d = proc.register(djprobe.Djprobe('x_three', at='latency'))\n"
              "while d.latency.returns == 0: time.sleep(0.01)\n"
              "print('placed', flush=True)\ntime.sleep(60)\n")
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "placed"
        tracer.kill()
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)
    status = _cli("status", "-p", t.pid, "--json")
    assert status.returncode == 0, status.stderr
    instances = [i for a in json.loads(status.stdout)["areas"] for i in a["instances"]]
    assert len(instances) == 4  # the entry and three exit windows of x_three
    clean = _cli("cleanup", "-p", t.pid, "--json")
    assert clean.returncode == 0, clean.stderr + clean.stdout
    report = json.loads(clean.stdout)
    assert report["ok"] and len(report["restored"]) == 4 and report["left_mapped"] == []
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"


def test_libc_functions_under_python(tmp_path):
    """Latency probes on libc's string, memory and allocator functions while CPython runs a
    threaded workload: the output is unchanged, and every exit of every function is paired with
    its call or counted unpaired (a sample lost to a counted collision)."""
    from tests.live.test_returns import WORKLOAD

    script = tmp_path / "work.py"
    script.write_text(WORKLOAD)
    argv = [sys.executable, str(script)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    read_fd, write_fd = os.pipe()
    with djprobe.spawn(argv, stdout=write_fd) as proc:
        os.close(write_fd)
        proc.layout = AreaLayout.for_latency()
        names = {s.address: s.name for p in ("libc:str*", "libc:mem*", "libc:*alloc", "libc:free")
                 for s in proc.symbols.resolve(p)}
        probes = {a: djprobe.Djprobe(a, at="latency") for a in names}
        refused = {id(d) for d, _ in proc.register_many(list(probes.values()))}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
    assert (output, status) == (plain.stdout, 0)
    placed = {a: d for a, d in probes.items() if id(d) not in refused}
    assert len(placed) > 0.6 * len(probes)
    wrong = {names[a]: (d.latency.calls, d.latency.returns, d.latency.unpaired, d.latency.collisions)
             for a, d in placed.items()
             if d.latency.returns + d.latency.unpaired != d.latency.calls or d.latency.unpaired > d.latency.collisions}
    assert wrong == {}
    assert sum(d.latency.returns for d in placed.values()) > 20000
    assert any(d.latency.returns > 1000 and d.latency.p50 for d in placed.values())


def test_area_limits_tags_and_blocks(returns_exe):
    """An area serves `latency_functions` probes at once (the next is refused with NoRoomError);
    a block is reused once its probe is out; when the 16-bit tags run out, the table is cleared
    (no probe of the area in place) and tags start again, still pairing exactly."""
    with djprobe.spawn([str(returns_exe), "600", "2"], stdout=subprocess.DEVNULL) as proc:
        proc.layout = AreaLayout(ring_count=1, ring_slots=1, latency_functions=2, latency_slots=64)
        a = proc.register(djprobe.Djprobe("x_three", at="latency"))
        b = proc.register(djprobe.Djprobe("x_leaf", at="latency"))
        with pytest.raises(djprobe.NoRoomError, match="latency probes at most"):
            proc.register(djprobe.Djprobe("x_tail", at="latency"))
        assert not any(p.site and p.site.endswith("x_tail") for p in proc.probes)
        proc.unregister(b)
        state = a.latency.region.latency_state
        state.next_tag = djprobe.latency.MAX_TAG + 1  # as after 65,535 registrations in this area
        with pytest.raises(djprobe.NoRoomError, match="remove the others"):
            proc.register(djprobe.Djprobe("x_tail", at="latency"))  # a's tag may still be in the table
        proc.unregister(a)
        c = proc.register(djprobe.Djprobe("x_tail", at="latency"))
        assert c.latency.tag == 1 and c.latency.function in (0, 1)
        assert (a.latency.calls, b.latency.calls) == (0, 0)  # held before main while they were in
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
        _check_pairing(c.latency, 1200, 1200)


SIGNALED = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) long lat_f(long x) {
    long s = x;
    for (int k = 0; k < (int)(x & 7); k++)
        s = s * 3 + k;
    return s;
}

static volatile long handled, sink;
static volatile int done;
static pid_t tids[2];

static void on_usr1(int sig) {
    (void)sig;
    sink += lat_f(5);  /* a call nested in the interrupted one, on the same stack, lower */
    __atomic_add_fetch(&handled, 1, __ATOMIC_SEQ_CST);
}

static void *worker(void *arg) {
    long n = (long)arg, s = 0;
    tids[n & 1] = syscall(SYS_gettid);
    for (long i = 0; i < 2000000; i++)
        s += lat_f(i);
    sink += s;
    return NULL;
}

static void *sender(void *arg) {
    (void)arg;
    while (!done) {
        for (int k = 0; k < 2; k++)
            if (tids[k]) syscall(SYS_tgkill, getpid(), tids[k], SIGUSR1);
        usleep(20);
    }
    return NULL;
}

int main(void) {
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART};
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t w[2], snd;
    for (long k = 0; k < 2; k++)
        pthread_create(&w[k], NULL, worker, (void *)k);
    pthread_create(&snd, NULL, sender, NULL);
    for (int k = 0; k < 2; k++)
        pthread_join(w[k], NULL);
    done = 1;
    pthread_join(snd, NULL);
    printf("handled=%ld\n", handled);
    return 0;
}
"""


@pytest.mark.parametrize("per_cpu", [True, False], ids=["per_cpu", "locked"])
def test_signals_inside_the_stubs(per_cpu):
    """Two threads call lat_f 2,000,000 times each while a third signals them every 20 us; each
    handler calls lat_f too (nested, lower on the same stack). Signals that land inside an rseq
    critical section of a stub restart it; nothing may be counted twice or lost unaccounted."""
    exe = compile_c(SIGNALED, "-O2", name="lat_signals")
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.per_cpu_counters = per_cpu
        djp = proc.register(djprobe.Djprobe("lat_f", at="latency"))
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=120) == 0
    handled = int(output.split("=")[1])
    assert handled > 100
    _check_pairing(djp.latency, 4_000_000 + handled, 4_000_000 + handled)


REGS_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
long regcheck(long n);
int main(int argc, char **argv) { printf("changed=%ld\n", regcheck(atol(argv[1]))); return 0; }
"""


def test_stubs_keep_every_register(tmp_path):
    """Callers may keep values in call-clobbered registers across a call to a function that does
    not touch them (inter-procedural register allocation): with latency probes on such functions
    (separate entry and exit stubs, and one stub for both), no register the function kept may
    change."""
    main = tmp_path / "regs_main.c"
    main.write_text(REGS_MAIN)
    exe = compile_c([main, TARGETS / "latency_regs.S"], "-O2", name="latency_regs")
    n = 20000
    out, status, probes, refused = _run_with_latency([exe, n], ["leaf_keep", "leaf_tiny"])
    assert refused == {} and status == 0
    assert [p._latency_role for p in probes["leaf_tiny"]._parts] == ["both"]
    assert [p._latency_role for p in probes["leaf_keep"]._parts] == ["entry", "exit"]
    assert out == "changed=0\n"
    for f in ("leaf_keep", "leaf_tiny"):
        _check_pairing(probes[f].latency, n, n)


def test_cli_attached_by_pid(returns_exe, start_target):
    t = start_target([returns_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    res = _cli("latency", "--json", "-d", "1", "-p", t.pid, "x_three", "rec")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["exit_status"] is None and report["refused"] == []
    for f in report["functions"]:
        assert sum(b["count"] for b in f["hist"]) == f["returns"]
        in_flight = 4 * (5 if f["site"].endswith(":rec") else 1)  # calls of the 4 threads at removal
        assert f["returns"] <= f["calls"] + in_flight
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"
