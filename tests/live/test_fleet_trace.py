"""trace and latency over several processes: a pre-forking localhost server (a parent and 3
workers, each request calling fl_work(x, k) for k = 0..CALLS-1) traced with -p W1,W2,W3 and with
--name: exact events and calls per worker, arguments right, a worker killed mid-run, bad PIDs and
unknown names refused with their names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(240)
DJPROBE = [sys.executable, "-m", "djprobe"]
WORKERS = 3
CALLS = 4
REQUESTS = 40


class Server:
    def __init__(self, target, port: int, workers: list[int]) -> None:
        self.target, self.port, self.workers = target, port, workers
        self.parent = target.pid
        self.comm = Path(f"/proc/{target.pid}/comm").read_text().strip()

    def requests(self, first: int, n: int) -> dict[int, list[int]]:
        """Send requests x = first .. first+n-1, one connection each; the x each worker served."""
        served: dict[int, list[int]] = {}
        for x in range(first, first + n):
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(struct.pack("<q", x))
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(64)
                    assert chunk, "the worker closed without answering"
                    reply += chunk
            pid, total = map(int, reply.split())
            assert total == CALLS * (3 * x + 1) + CALLS * (CALLS - 1) // 2
            served.setdefault(pid, []).append(x)
        return served


def _own_name(exe: Path, tmp_path: Path, stem: str) -> Path:
    """A copy of ``exe`` with a name (a /proc/PID/comm) no other test run shares, for --name."""
    copy = tmp_path / f"{stem}{os.getpid()}"
    shutil.copy2(exe, copy)
    return copy


@pytest.fixture
def server(start_target, tmp_path):
    exe = _own_name(compile_c(TARGETS / "prefork_calls.c", name="prefork_calls"), tmp_path, "pfc")
    t = start_target([exe, WORKERS, CALLS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port = int(t.proc.stdout.readline().split()[1])
    workers = sorted(int(t.proc.stdout.readline().split()[1]) for _ in range(WORKERS))
    srv = Server(t, port, workers)
    yield srv
    if t.proc.poll() is None:
        t.proc.stdin.close()  # the parent ends the workers left with SIGTERM and says how each ended
        assert t.proc.wait(timeout=30) == 0


def _ended(srv: Server) -> dict[int, int]:
    """Close the server: the signal that ended each worker."""
    srv.target.proc.stdin.close()
    out = srv.target.proc.stdout.read().decode()
    assert srv.target.proc.wait(timeout=30) == 0
    return {int(pid): int(sig) for _, pid, sig in (line.split() for line in out.splitlines())}


def _start(argv: list[str], processes: int = WORKERS) -> subprocess.Popen:
    """Start djprobe; return once its banner says the probes are in, in ``processes`` processes."""
    proc = subprocess.Popen(DJPROBE + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stderr.readline()
    if not banner.startswith(f"Tracing 1 function in {processes} process{'es' if processes > 1 else ''} for"):
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"not the banner: {banner}{err}")
    return proc


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out, err


def _kill_and_wait(pid: int) -> None:
    """SIGKILL a worker and wait (bounded) until it is a zombie (its parent reaps it at the end)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    pytest.fail(f"worker {pid} did not die")


def _events(out: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in out.strip().splitlines()]
    return lines[:-1], lines[-1]


def _expected(served: dict[int, list[int]]) -> dict[int, Counter]:
    return {pid: Counter((x, k) for x in xs for k in range(CALLS)) for pid, xs in served.items()}


def _hits(summary: dict) -> dict[int, int]:
    return {p["pid"]: sum(q["hits"] for q in p["probes"]) for p in summary["processes"]}


def test_trace_pids_exact_events_and_arguments_per_worker(server):
    tracer = _start(["trace", "--json", "-p", ",".join(map(str, server.workers)), "fl_work"])
    served = server.requests(0, REQUESTS)
    out, _ = _stop(tracer)
    events, summary = _events(out)
    assert len(events) == REQUESTS * CALLS
    times = [e["time_ns"] for e in events]
    assert times == sorted(times)  # one stream, in time order
    got: dict[int, Counter] = {}
    for e in events:
        assert e["site"].endswith(":fl_work") and e["tid"] == e["pid"]
        got.setdefault(e["pid"], Counter())[(e["args"][0], e["args"][1])] += 1
    assert got == _expected(served)
    assert _hits(summary) == {pid: len(served.get(pid, [])) * CALLS for pid in server.workers}
    assert summary["summary"][0]["hits"] == summary["summary"][0]["delivered"] == REQUESTS * CALLS
    assert not any(p.get("exited") for p in summary["processes"])
    assert set(_ended(server).values()) == {signal.SIGTERM}  # the workers ran on unharmed


def test_trace_name_marks_each_process(server):
    tracer = _start(["trace", "--name", server.comm, "fl_work"], processes=WORKERS + 1)
    served = server.requests(0, REQUESTS)
    out, _ = _stop(tracer)
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "TID", "PROBE", "ARGS"]
    got: dict[int, Counter] = {}
    for line in lines:
        if line.startswith("[pid "):  # [pid N] TIME TID SITE ARG0 ARG1 ...
            words = line.split()
            got.setdefault(int(words[1].rstrip("]")), Counter())[(int(words[5], 16), int(words[6], 16))] += 1
    assert got == _expected(served)
    assert "all 4 processes:" in lines
    assert f"process {server.parent} ({server.target.proc.args[0]} {WORKERS} {CALLS}):" in lines
    totals = lines[lines.index("all 4 processes:") + 2].split()
    assert totals[1:] == [str(REQUESTS * CALLS), str(REQUESTS * CALLS), "0"]


def _latency(summary: dict) -> dict[int, tuple[int, int, int]]:
    """pid -> (calls, returns, histogram total) of fl_work."""
    out = {}
    for p in summary["processes"]:
        (f,) = p["probes"]
        out[p["pid"]] = (f["calls"], f["returns"], sum(b["count"] for b in f["hist"]))
    return out


def test_latency_pids_calls_and_returns_per_worker(server):
    meter = _start(["latency", "--json", "-p", ",".join(map(str, server.workers)), "fl_work"])
    served = server.requests(0, REQUESTS)
    out, _ = _stop(meter)
    report = json.loads(out.strip().splitlines()[-1])
    expected = {pid: (len(served.get(pid, [])) * CALLS,) * 3 for pid in server.workers}
    assert _latency(report) == expected
    (total,) = report["functions"]
    assert total["calls"] == total["returns"] == REQUESTS * CALLS
    per_bucket: Counter = Counter()
    for p in report["processes"]:
        per_bucket.update({b["low_ns"]: b["count"] for b in p["probes"][0]["hist"]})
    assert +per_bucket == +Counter({b["low_ns"]: b["count"] for b in total["hist"]})  # added bucket by bucket


def test_latency_name_intervals_per_process(server):
    meter = _start(["latency", "--json", "-i", "0.3", "--name", server.comm, "fl_work"], processes=WORKERS + 1)
    served = server.requests(0, REQUESTS // 2)
    first = json.loads(meter.stdout.readline())  # an interval report: the second half comes after it
    assert first["final"] is False and first["interval"] == 1
    more = server.requests(REQUESTS // 2, REQUESTS // 2)
    out, _ = _stop(meter)
    reports = [first] + [json.loads(line) for line in out.strip().splitlines()]
    assert reports[-1]["final"] is True
    summed: dict[int, Counter] = {}
    for r in reports:  # each interval starts from zero: the reports add up to the run
        for pid, (calls, returns, in_hist) in _latency(r).items():
            summed.setdefault(pid, Counter()).update(calls=calls, returns=returns, in_hist=in_hist)
        assert r["functions"][0]["calls"] == sum(p["probes"][0]["calls"] for p in r["processes"])
    for pid, xs in more.items():
        served.setdefault(pid, []).extend(xs)
    n = {server.parent: 0, **{pid: len(served.get(pid, [])) * CALLS for pid in server.workers}}
    assert summed == {pid: Counter(calls=k, returns=k, in_hist=k) for pid, k in n.items()}


@pytest.mark.parametrize("command", ["trace", "latency"])
def test_worker_killed_mid_run_keeps_its_figures(server, command):
    tracer = _start([command, "--json", "-p", ",".join(map(str, server.workers)), "fl_work"])
    before = server.requests(0, REQUESTS // 2)
    victim = max(before, key=lambda pid: len(before[pid]))  # a worker that served something
    _kill_and_wait(victim)
    after = server.requests(REQUESTS // 2, REQUESTS // 2)
    assert victim not in after
    out, err = _stop(tracer)
    assert f"process {victim} (" in err and "exited: its figures so far are kept" in err
    last = json.loads(out.strip().splitlines()[-1])
    exited = {p["pid"] for p in last["processes"] if p.get("exited")}
    assert exited == {victim}
    served = {pid: before.get(pid, []) + after.get(pid, []) for pid in server.workers}
    if command == "trace":
        events, summary = _events(out)
        got: dict[int, Counter] = {}
        for e in events:
            got.setdefault(e["pid"], Counter())[(e["args"][0], e["args"][1])] += 1
        assert got == {pid: c for pid, c in _expected(served).items() if c}
        assert _hits(summary) == {pid: len(xs) * CALLS for pid, xs in served.items()}
    else:
        assert _latency(last) == {pid: (len(xs) * CALLS,) * 3 for pid, xs in served.items()}
    ended = _ended(server)
    assert ended[victim] == signal.SIGKILL
    assert all(ended[pid] == signal.SIGTERM for pid in server.workers if pid != victim)


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("command", ["trace", "latency"])
def test_bad_pid_is_named_and_the_others_are_left_unharmed(server, command):
    dead = _gone_pid()
    res = subprocess.run(DJPROBE + [command, "-p", f"{server.workers[0]},{dead}", "fl_work"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and str(dead) in res.stderr and "no such process" in res.stderr, res.stderr
    served = server.requests(0, 9)  # the worker probed first had its probes taken out
    assert sum(len(xs) for xs in served.values()) == 9
    status = subprocess.run(DJPROBE + ["status", "--json", "-p", str(server.workers[0])],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["areas"] == []  # nothing of djprobe's left in it


def test_kernel_thread_is_named():
    if Path("/proc/2/comm").read_text().strip() != "kthreadd":
        pytest.skip("no kthreadd at PID 2 here")
    res = subprocess.run(DJPROBE + ["trace", "--name", "kthreadd", "f"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "process 2" in res.stderr and "kernel thread" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["trace", "latency"])
def test_unknown_name_is_an_error(command):
    res = subprocess.run(DJPROBE + [command, "--name", "no-such-comm-x", "f"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "no running process named 'no-such-comm-x'" in res.stderr, res.stderr


def test_perfetto_takes_one_process():
    res = subprocess.run(DJPROBE + ["trace", "--perfetto", "/tmp/x.pftrace", "-p", "1,2", "f"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "not with several processes" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["trace", "latency"])
def test_several_pids_with_follow_take_in_each_ones_children(start_target, command, tmp_path):
    exe = compile_c(TARGETS / "forkcount.c", name="forkcount")
    targets = [start_target([exe, 100, 2, 3000], stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    report = tmp_path / "report.json"  # a file: 24,400 events would fill a pipe nobody reads yet
    tracer = _start([command, "--json", "-o", str(report), "--follow", "-p", ",".join(str(t.pid) for t in targets),
                     "fc_work"], processes=2)
    try:
        for t in targets:
            t.proc.stdin.write(b"go\n")
            t.proc.stdin.close()
        for t in targets:
            assert t.proc.wait(timeout=60) == 0
            assert t.proc.stdout.read() == b"parent 200 children 2 bad 0\n"
        _, err = tracer.communicate(timeout=90)  # every process asked for ended
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    assert tracer.returncode == 0, err
    lines = [json.loads(line) for line in report.read_text().strip().splitlines()]
    last = lines[-1]
    if command == "trace":
        per_event = Counter(e["pid"] for e in lines[:-1])
        assert sum(per_event.values()) == 2 * 200 + 4 * 6000
        assert _hits(last) == dict(per_event)
        calls = dict(per_event)
    else:
        figures = _latency(last)
        assert all(c == r == h for c, r, h in figures.values())
        calls = {pid: c for pid, (c, _, _) in figures.items()}
        assert last["functions"][0]["calls"] == 2 * 200 + 4 * 6000
    assert len(calls) == 6 and [calls[t.pid] for t in targets] == [200, 200]
    assert sorted(calls.values()) == [200, 200, 6000, 6000, 6000, 6000]


def test_name_with_follow_takes_in_a_process_started_later(start_target, tmp_path):
    exe = _own_name(compile_c(TARGETS / "forkcount.c", name="forkcount"), tmp_path, "fcn")
    first = start_target([exe, 100, 1, 500], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    report = tmp_path / "events.json"
    tracer = _start(["trace", "--json", "-o", str(report), "--follow", "--name", exe.name, "fc_work"], processes=1)
    try:
        later = start_target([exe, 100, 1, 500], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        notice = tracer.stderr.readline()  # the scan found it and its probes are in
        if not (notice.startswith(f"process {later.pid} (") and "started later: 1 probe placed" in notice):
            tracer.kill()
            pytest.fail(notice + tracer.communicate()[1])
        for t in (first, later):
            t.proc.stdin.write(b"go\n")
            t.proc.stdin.close()
            assert t.proc.wait(timeout=60) == 0
            assert t.proc.stdout.read() == b"parent 200 children 1 bad 0\n"
        _, err = tracer.communicate(timeout=90)  # every process of the name ended
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    assert tracer.returncode == 0, err
    lines = [json.loads(line) for line in report.read_text().strip().splitlines()]
    per_event = Counter(e["pid"] for e in lines[:-1])
    assert _hits(lines[-1]) == dict(per_event)
    assert per_event[first.pid] == per_event[later.pid] == 200
    assert sorted(per_event.values()) == [200, 200, 1000, 1000]  # and each one's child
