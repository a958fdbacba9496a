"""Return probes in real processes: exact entry and return counts (threads, recursion, tail calls,
longjmp, C++ exceptions), return values, unchanged output, insertion and removal under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

import djprobe
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)

FUNCS = ["x_three", "x_leaf", "x_tail", "x_itail", "x_self", "x_paths", "x_condtail", "x_chain", "x_wrap", "rec", "jumper"]


@pytest.fixture(scope="module")
def returns_exe():
    return compile_c([TARGETS / "exits.S", TARGETS / "returns_main.c"], "-O2", name="returns")


@pytest.fixture(scope="module")
def eh_exe():
    return compile_c(TARGETS / "returns_eh.cc", "-O2", "-lstdc++", name="returns_eh")


def expected_counts(n: int, threads: int) -> dict[str, tuple[int, int]]:
    """(calls, returns) per function for `returns_main n threads` (n a multiple of 60)."""
    per = {
        "x_three": (n, n),
        "x_leaf": (3 * n + n // 3 * 2, 3 * n + n // 3 * 2),  # tail calls of x_tail, x_itail, x_condtail, x_wrap
        "x_tail": (n, n),
        "x_itail": (n, n),
        "x_self": (n // 4 * 7, n // 4 * 7),  # x_self(0..3): 1+1+2+3 entries, each left by one exit
        "x_paths": (n, n),  # its ret is caught by three path windows
        "x_condtail": (n, n),  # a conditional tail call and a ret
        "x_chain": (n, n),  # a path window copying two blocks
        "x_wrap": (n, n),  # the exit takes the entry window: both probes share one stub
        "rec": (n // 5 * 15, n // 5 * 15),  # rec(0..4): 1+2+3+4+5 calls
        "jumper": (n, n - n // 5),  # i % 5 == 0 leaves by longjmp
    }
    return {f: (c * threads, r * threads) for f, (c, r) in per.items()}


def _spawn_with(argv, entries, exits):
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(a) for a in argv], stdout=write_fd) as proc:
        os.close(write_fd)
        ent = {f: proc.register(djprobe.Djprobe(f)) for f in entries}
        ret = {f: proc.register(djprobe.Djprobe(f, at="return")) for f in exits}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=60)
    return output, status, {f: d.hits for f, d in ent.items()}, {f: d.hits for f, d in ret.items()}, ret


def test_exact_calls_and_returns_four_threads(returns_exe):
    n, threads = 1200, 4
    plain = subprocess.run([str(returns_exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout.startswith("total=")
    out, status, calls, rets, probes = _spawn_with([returns_exe, n, threads], FUNCS, FUNCS)
    assert (out, status) == (plain.stdout, 0)
    want = expected_counts(n, threads)
    assert {f: (calls[f], rets[f]) for f in FUNCS} == want
    assert len(probes["x_three"].exits.exits) == 3
    assert probes["x_tail"].exits.exits[0].kind is djprobe.sites.ExitKind.TAIL_CALL
    assert all(not p.registered for p in probes.values())  # removed at close


def test_return_probes_alone_keep_behaviour(returns_exe):
    n, threads = 600, 2
    plain = subprocess.run([str(returns_exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    out, status, _, rets, _ = _spawn_with([returns_exe, n, threads], [], FUNCS)
    assert (out, status) == (plain.stdout, 0)
    assert rets == {f: r for f, (_, r) in expected_counts(n, threads).items()}


def test_exception_thrown_through_probed_functions(eh_exe):
    n, threads = 800, 3
    plain = subprocess.run([str(eh_exe), str(n), str(threads)], capture_output=True, text=True, timeout=60)
    assert plain.stdout == f"total={sum(2 * i + 1 for i in range(n) if i % 4) * threads} caught={n // 4 * threads}\n"
    funcs = ["_Z7throweri", "_Z6middlei"]
    out, status, calls, rets, _ = _spawn_with([eh_exe, n, threads], funcs, funcs)
    assert (out, status) == (plain.stdout, 0)  # exceptions still caught, cleanups still run
    thrown = n // 4 * threads
    assert calls == {f: n * threads for f in funcs}
    assert rets == {f: n * threads - thrown for f in funcs}


def test_handler_sees_every_return_value(returns_exe):
    n = 120
    seen: Counter = Counter()

    def on_return(djp, regs):
        assert djp.at == "return"
        seen[regs.retval] += 1

    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(returns_exe), str(n), "2"], stdout=write_fd) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("x_three", at="return", handler=on_return))
        proc.start()
        with os.fdopen(read_fd) as out:
            out.read()
        proc.process.popen.wait(timeout=60)
        proc.poll(timeout=0.5)
        assert djp.missed == 0
    # x_three(i % 15): 1 for 0..4, 2 for 5..9, 3 for 10..14, from each of its three exits
    assert seen == {1: n // 3 * 2, 2: n // 3 * 2, 3: n // 3 * 2}
    assert djp.hits == 2 * n


def test_path_windows_see_the_return_value(returns_exe):
    """x_paths's ret sits at a branch target: three path windows run a copy of it from their
    stubs; the value each sees must be the one returned, on all three paths."""
    n = 300
    seen: Counter = Counter()
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(returns_exe), str(n), "1"], stdout=write_fd) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("x_paths", at="return", handler=lambda d, r: seen.update([r.retval])))
        entry = proc.register(djprobe.Djprobe("x_paths"))
        proc.start()
        with os.fdopen(read_fd) as out:
            out.read()
        proc.process.popen.wait(timeout=60)
        proc.poll(timeout=0.5)
    want = Counter()
    for i in range(n):
        a = i % 150 - 20
        want[(-1 if a < 0 else 100 if a >= 100 else 3 * a + 1) & 0xFFFFFFFF] += 1
    assert {k & 0xFFFFFFFF: v for k, v in seen.items()} == want
    assert djp.hits == entry.hits == n



def test_path_window_through_two_blocks_sees_the_return_value(returns_exe):
    n = 200
    seen: Counter = Counter()
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(returns_exe), str(n), "1"], stdout=write_fd) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("x_chain", at="return", handler=lambda d, r: seen.update([r.retval])))
        entry = proc.register(djprobe.Djprobe("x_chain"))
        proc.start()
        with os.fdopen(read_fd) as out:
            out.read()
        proc.process.popen.wait(timeout=60)
        proc.poll(timeout=0.5)
    # x_chain(i % 4 - 1): 0 for -1 and 0 (through the copied blocks), 4 and 7
    assert seen == {0: n // 2, 4: n // 4, 7: n // 4}
    assert djp.hits == entry.hits == n


def _cli(*args, timeout=60):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "djprobe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_trace_shows_return_values_for_every_exit(returns_exe):
    n = 30
    res = _cli("trace", "--json", "x_three%return", "x_leaf%return", "x_tail%return", "--", returns_exe, n, 1)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    events = [e for e in lines if "site" in e and "time_ns" in e]
    three = [e for e in events if e["site"].endswith("x_three%return")]
    assert Counter(e["retval"] for e in three) == {1: n // 3, 2: n // 3, 3: n // 3}
    assert len({e["exit"] for e in three}) == 3  # every exit seen
    leaf = [e for e in events if e["site"].endswith("x_leaf%return")]
    # x_leaf(a) = 3a + 100, called with i + 1 (x_tail) and i (x_itail)
    assert Counter(e["retval"] for e in leaf) == Counter([3 * (i + 1) + 100 for i in range(n)] +
                                                         [3 * i + 100 for i in range(n)] +
                                                         [3 * (i % 3) + 100 for i in range(n) if i % 3] +
                                                         [3 * (i + 2) + 100 for i in range(n)])
    tail = [e for e in events if e["site"].endswith("x_tail%return")]
    assert len(tail) == n and all(e["tail_call"] and e["retval"] is None for e in tail)
    summary = next(e for e in lines if "summary" in e)["summary"]
    assert {s["site"].split(":")[-1]: s["hits"] for s in summary} == {
        "x_three%return": n, "x_leaf%return": 3 * n + n // 3 * 2, "x_tail%return": n}


def test_trace_text_and_count_with_globs(returns_exe):
    res = _cli("trace", "x_three%return", "--", returns_exe, 15, 1)
    assert res.returncode == 0, res.stderr
    vals = [line.split("retval=")[1] for line in res.stdout.splitlines() if "retval=" in line]
    assert Counter(vals) == {"0x1": 5, "0x2": 5, "0x3": 5}
    res = _cli("count", "--json", "x_t*%return", "x_three", "--", returns_exe, 60, 2)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.splitlines()[-1])
    hits = {p["site"].split(":")[-1]: p["hits"] for p in report["probes"]}
    assert hits == {"x_three%return": 120, "x_tail%return": 120, "x_three": 120}
    assert {p["mode"] for p in report["probes"]} == {"jump"}  # a return probe's parts' mode
    refused = {r["site"].split(":")[-1]: r["reason"] for r in report["refused"]}
    assert list(refused) == ["x_tiny%return"] and "only 4 byte(s)" in refused["x_tiny%return"]


def test_refused_as_a_whole(returns_exe):
    with djprobe.spawn([str(returns_exe), "60", "1"], stdout=subprocess.DEVNULL) as proc:
        proc.springboards = False  # with short jumps, x_short's first exit takes a jmp rel8 (below)
        with pytest.raises(djprobe.InvalidSiteError) as info:
            proc.register(djprobe.Djprobe("x_short", at="return"))
        assert "exit 'ret' at" in str(info.value) and "branch target" in str(info.value)
        assert not proc.probes  # no exit of x_short left behind
        proc.springboards = True
        short = proc.register(djprobe.Djprobe("x_short", at="return"))
        assert len(short._parts) == 2 and sum(p._instance.springboard is not None for p in short._parts) == 1
        proc.unregister(short)
        assert not proc.probes
        with pytest.raises(djprobe.InvalidSiteError, match="a return probe takes no size"):
            djprobe.Djprobe("x_three", 5, at="return")
        with pytest.raises(djprobe.InvalidSiteError, match="at must be"):
            djprobe.Djprobe("x_three", at="exit")
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0


def test_register_unregister_under_load(start_target, returns_exe):
    """Four threads call every function in a loop while return and entry probes come and go:
    threads inside the functions (and inside the exit windows) at those moments must be fine."""
    t = start_target([returns_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        for cycle in range(15):
            rets = [djprobe.Djprobe(f, at="return") for f in FUNCS]
            ents = [djprobe.Djprobe(f) for f in ("x_three", "rec", "jumper")]
            assert proc.register_many(rets + ents) == []
            deadline = time.monotonic() + 2
            while min(d.hits for d in rets + ents) == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert min(d.hits for d in rets + ents) > 0, cycle
            proc.unregister_many(rets + ents if cycle % 2 else ents + rets)
            assert not proc.probes
            # A thread caught inside a stub's action finishes its hit by itself; the counts are
            # final once a later stop finds no thread in the retired slots.
            deadline = time.monotonic() + 10
            while proc._retired and time.monotonic() < deadline:
                time.sleep(0.002)
                with proc.stopped():
                    pass
            assert not proc._retired
            frozen = [d.hits for d in rets]
            time.sleep(0.002)
            assert [d.hits for d in rets] == frozen
    out, _ = t.proc.communicate(input="", timeout=30)
    assert t.proc.returncode == 0 and out == "done\n"


WORKLOAD = r"""
import hashlib, json, re, threading, zlib
def job(k):
    s = json.dumps([re.sub("a", "b", str(i) * 3) for i in range(5000)])
    return len(zlib.compress(s.encode())) + len(hashlib.sha256(s.encode()).hexdigest())
ts = [threading.Thread(target=job, args=(k,)) for k in range(3)]
[t.start() for t in ts]; [t.join() for t in ts]
print(job(0))
"""
# functions that never return to their caller (the process or the thread ends in them)
NORETURN = {"exit", "_Exit", "_exit", "__libc_start_main", "__libc_start_call_main", "__run_exit_handlers",
            "start_thread", "pthread_exit", "__pthread_exit", "abort"}


def test_every_libc_function_entry_and_returns_under_python(tmp_path):
    """Entry and return probes on every function of libc that takes both, while CPython runs a
    threaded workload: the output is unchanged and each function returns as often as it is
    called (path windows, conditional tail calls and padding windows of real code included)."""
    script = tmp_path / "work.py"
    script.write_text(WORKLOAD)
    argv = [sys.executable, str(script)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    read_fd, write_fd = os.pipe()
    with djprobe.spawn(argv, stdout=write_fd) as proc:
        os.close(write_fd)
        funcs = {s.address: s for s in proc.symbols.resolve("libc:*")}
        ent = {a: djprobe.Djprobe(a) for a in funcs}
        ret = {a: djprobe.Djprobe(a, at="return") for a in funcs}
        refused = {id(d) for d, _ in proc.register_many(list(ent.values()) + list(ret.values()))}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
    assert (output, status) == (plain.stdout, 0)
    both = [a for a in funcs if id(ent[a]) not in refused and id(ret[a]) not in refused]
    assert len(both) >= 0.95 * len(funcs), (len(both), len(funcs))  # entry and exits share where they overlap
    wrong = {funcs[a].name: (ent[a].hits, ret[a].hits) for a in both
             if ent[a].hits != ret[a].hits and funcs[a].name.split(":")[-1] not in NORETURN}
    assert wrong == {}
    assert sum(ret[a].hits for a in both) > 100000


PYENV_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3.11"  # links libpython3.11.so (see tests/soak)


@pytest.mark.skipif(not os.path.exists(PYENV_PYTHON), reason="no CPython linked with a shared libpython3.11")
def test_every_libpython_function_entry_and_returns(tmp_path):
    """The same over every function of libpython3.11 that takes both probes: the interpreter's
    own code, with its computed gotos, jump tables and cold parts."""
    script = tmp_path / "work.py"
    script.write_text(WORKLOAD)
    argv = [PYENV_PYTHON, str(script)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    read_fd, write_fd = os.pipe()
    with djprobe.spawn(argv, stdout=write_fd) as proc:
        os.close(write_fd)
        funcs = {s.address: s for s in proc.symbols.resolve("libpython3.11:*")}
        ent = {a: djprobe.Djprobe(a) for a in funcs}
        ret = {a: djprobe.Djprobe(a, at="return") for a in funcs}
        refused = {id(d) for d, _ in proc.register_many(list(ent.values()) + list(ret.values()))}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=120)
    assert (output, status) == (plain.stdout, 0)
    both = [a for a in funcs if id(ent[a]) not in refused and id(ret[a]) not in refused]
    assert len(both) >= 0.97 * len(funcs), (len(both), len(funcs))
    wrong = {funcs[a].name: (ent[a].hits, ret[a].hits) for a in both
             if ent[a].hits != ret[a].hits and funcs[a].name.split(":")[-1] not in NORETURN}
    assert wrong == {}
    assert sum(ret[a].hits for a in both) > 1000000
