"""Several processes at once: a pre-forking localhost server traced with --name and -p PID,PID:
exact counts per worker, the workers unharmed."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]
WORKERS = 3
REQUESTS = 60


@pytest.fixture
def server(start_target):
    exe = compile_c(TARGETS / "prefork.c", name="prefork")
    t = start_target([exe, WORKERS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port = int(t.proc.stdout.readline().split()[1])
    workers = sorted(int(t.proc.stdout.readline().split()[1]) for _ in range(WORKERS))
    yield t, port, workers
    t.proc.stdin.close()  # the parent ends its workers with SIGTERM and exits 0 if they ended so
    assert t.proc.wait(timeout=30) == 0


def _requests(port: int, n: int) -> Counter:
    served: Counter = Counter()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<q", i))
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(64)
                assert chunk, "the worker closed without answering"
                reply += chunk
        pid, result = map(int, reply.split())
        assert result == i * 11 + 5
        served[pid] += 1
    return served


def _count(argv: list[str], port: int) -> tuple[dict, Counter, str]:
    counter = subprocess.Popen(DJPROBE + ["count", "--json"] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = counter.stderr.readline()
        assert banner.startswith("Tracing 1 function in"), banner + counter.stderr.read()
        served = _requests(port, REQUESTS)
        counter.send_signal(signal.SIGINT)
        out, err = counter.communicate(timeout=60)
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    assert counter.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), served, banner


def test_name_counts_every_worker(server):
    t, port, workers = server
    comm = Path(f"/proc/{t.pid}/comm").read_text().strip()
    report, served, banner = _count(["--name", comm, "handle_request"], port)
    assert "in 4 processes" in banner
    per = {p["pid"]: {q["site"].split(":")[1]: q["hits"] for q in p["probes"]} for p in report["processes"]}
    assert sorted(per) == sorted([t.pid] + workers)
    assert per[t.pid] == {"handle_request": 0}
    for pid in workers:
        assert per[pid] == {"handle_request": served[pid]}, (pid, served)
    assert [p["hits"] for p in report["probes"]] == [REQUESTS]
    assert {p["command"] for p in report["processes"]} == {f"{Path(t.proc.args[0])} {WORKERS}"}


def test_pid_list_counts_only_those_given(server):
    t, port, workers = server
    chosen = workers[:2]
    report, served, _ = _count(["-p", ",".join(map(str, chosen)), "handle_request"], port)
    per = {p["pid"]: p["probes"][0]["hits"] for p in report["processes"]}
    assert per == {pid: served[pid] for pid in chosen}
    assert report["probes"][0]["hits"] == sum(served[pid] for pid in chosen)


def test_text_report_marks_each_process(server):
    t, port, workers = server
    res = subprocess.run(
        DJPROBE + ["count", "-d", "0.5", "-p", f"{workers[0]},{workers[1]}", "handle_request"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "all 2 processes:"
    assert f"process {workers[0]} (" in res.stdout and f"process {workers[1]} (" in res.stdout


def test_bad_pid_list():
    res = subprocess.run(DJPROBE + ["count", "-p", "12,x", "f"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a PID: 'x'" in res.stderr


def test_several_pids_with_follow(start_target):
    exe = compile_c(TARGETS / "forkcount.c", name="forkcount")
    targets = [start_target([exe, 100, 2, 3000], stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    counter = subprocess.Popen(
        DJPROBE + ["count", "--json", "--follow", "-p", ",".join(str(t.pid) for t in targets), "fc_work"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert counter.stderr.readline().startswith("Tracing 1 function in 2 processes")
        for t in targets:
            t.proc.stdin.write(b"go\n")
            t.proc.stdin.close()
        for t in targets:
            assert t.proc.wait(timeout=60) == 0
            assert t.proc.stdout.read() == b"parent 200 children 2 bad 0\n"
        out, err = counter.communicate(timeout=60)  # every process asked for ended
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    report = json.loads(out.strip().splitlines()[-1])
    per = {p["pid"]: p["probes"][0]["hits"] for p in report["processes"]}
    assert len(per) == 6
    assert [per[t.pid] for t in targets] == [200, 200]
    assert sorted(per.values()) == [200, 200, 6000, 6000, 6000, 6000]
    assert report["probes"][0]["hits"] == 2 * 200 + 4 * 6000
