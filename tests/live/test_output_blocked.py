"""``trace --follow`` whose standard output nobody reads (a full pipe): the tracer's loop goes on
(cli/_writer.py), so every child forked meanwhile is still taken in and the rings drained; the
lines the output queue could not hold are dropped and counted exactly; the target and its
children exit normally; SIGINT ends the tracer promptly while its output is still blocked."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(240)
DJPROBE = [sys.executable, "-m", "djprobe"]
NOTE = re.compile(r"djprobe: (\d+) of (\d+) output lines? not written")


@pytest.fixture(scope="module")
def forkpace():
    return compile_c(TARGETS / "forkpace.c", name="forkpace")


class _Lines:
    """A stream's lines, read by a thread (so the process writing them never waits for us)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, limit: float = 60.0) -> str:
        end = time.monotonic() + limit
        with self._cond:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                left = end - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} in {self.lines[-20:]}"
                self._cond.wait(left)

    def text(self) -> str:
        self._thread.join(30)
        return "\n".join(self.lines)


def _full(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return not p.poll(0)


def _wait_full(fd: int, limit: float = 60.0) -> None:
    """Until the pipe (our copy of its write end) has no room: the tracer's output is blocked."""
    end = time.monotonic() + limit
    while not _full(fd):
        assert time.monotonic() < end, "the tracer's output pipe never filled"
        time.sleep(0.01)


def _read_to_eof(fd: int, got: list[bytes]) -> None:
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return
        got.append(data)


def _kill(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)


M, N, K, GAP_MS = 3000, 6, 2000, 400


def test_children_taken_in_while_the_output_is_not_read(forkpace):
    """forkpace 3000 6 2000 400: the parent's 3,000 calls fill the pipe and the output queue
    (64 KiB) before it forks; its 6 children are forked 0.4 s apart (2.4 s in all, beyond a
    child's 2 s wait for the tracer) while nobody reads; the pipe is read once the target is done.
    Every child is taken in with its 2,000 calls, and the event lines read plus the lines
    dropped are exactly the events."""
    r, w = os.pipe()
    tracer = None
    try:
        tracer = subprocess.Popen(
            DJPROBE + ["trace", "-f", "--json", "--output-queue", "64K", "fp_work", "--",
                       str(forkpace), str(M), str(N), str(K), str(GAP_MS)],
            stdin=subprocess.PIPE, stdout=w, stderr=subprocess.PIPE, text=True)
        err = _Lines(tracer.stderr)
        _wait_full(w)  # the parent's calls, before it forks: the output is blocked now
        tracer.stdin.write("go\n")
        tracer.stdin.flush()
        assert err.wait_for(r"^done bad") == "done bad 0"  # the children ran while blocked
        assert _full(w)  # still nobody read
        os.close(w)
        w = -1
        got: list[bytes] = []
        reader = threading.Thread(target=_read_to_eof, args=(r, got))
        reader.start()  # now the pipe is read: the tracer writes what it kept, then ends
        assert tracer.wait(60) == 0, err.text()
        reader.join(30)
    finally:
        _kill(tracer)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    lines = b"".join(got).decode().splitlines()
    report = json.loads(lines[-1])
    events = [json.loads(x) for x in lines[:-1]]
    assert all("time_ns" in e for e in events)
    processes = report["processes"]
    assert len(processes) == 1 + N  # every child taken in
    assert [p["probes"][0]["hits"] for p in processes] == [M] + [K] * N
    assert len({p["pid"] for p in processes}) == 1 + N
    total = M + N * K
    assert report["summary"][0]["hits"] == total and report["summary"][0]["dropped"] == 0  # rings drained
    dropped = report["output_dropped"]
    assert dropped > 0 and len(events) + dropped == total  # exact: each event written or counted
    assert {e["pid"] for e in events} <= {p["pid"] for p in processes}
    m = NOTE.search(err.text())
    assert m is not None, err.text()
    assert (int(m.group(1)), int(m.group(2))) == (dropped, total + 1)  # + the summary line
    assert "Traceback" not in err.text()


@pytest.mark.parametrize("targets", [1, 2], ids=["one-process", "fleet"])
def test_sigint_ends_the_tracer_while_its_output_is_blocked(forkpace, targets):
    """``trace -f -p PID[,PID]`` with a pipe nobody reads: once it is full and children are
    being forked, SIGINT ends the tracer within its grace of writing (1 s) plus the removal of
    its probes; its targets and their children go on and exit normally; the lines read from the
    pipe afterwards are exactly the lines it did not report as not written."""
    r, w = os.pipe()
    procs: list[subprocess.Popen] = []
    tracer = None
    try:
        for _ in range(targets):
            procs.append(subprocess.Popen([str(forkpace), "10", "12", str(K), "250"], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs = [_Lines(p.stderr) for p in procs]
        tracer = subprocess.Popen(
            DJPROBE + ["trace", "-f", "-p", ",".join(str(p.pid) for p in procs), "fp_work"],
            stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE, text=True)
        err = _Lines(tracer.stderr)
        err.wait_for(r"^Tracing ")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for o in outs:
            o.wait_for(r"^forked 3$")
        _wait_full(w)
        assert tracer.poll() is None
        tracer.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = tracer.wait(30)
        took = time.monotonic() - started
        assert code == 0, err.text()
        assert took < 10, f"the tracer took {took:.1f} s to end after SIGINT"
        os.close(w)
        w = -1
        got: list[bytes] = []
        _read_to_eof(r, got)
        for p, o in zip(procs, outs):
            assert p.wait(60) == 0
            assert o.wait_for(r"^done bad") == "done bad 0"  # every child exited 0, results right
    finally:
        _kill(tracer, *procs)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    text = b"".join(got).decode()
    assert text.endswith("\n")  # whole lines only
    m = NOTE.search(err.text())
    assert m is not None, err.text()
    lost, given = int(m.group(1)), int(m.group(2))
    assert 0 < lost < given
    assert len(text.splitlines()) == given - lost
    assert "Traceback" not in err.text()


def test_count_interval_reports_with_the_output_not_read(forkpace):
    """``count -f -i 0.1 --json`` into a one-page pipe nobody reads while forkpace forks its 6
    children: the loop that takes them in never waits for the output, so each is counted apart
    with its 2,000 calls; interval reports that did not fit the queue (1 KiB) are dropped whole
    and counted: the reports read plus those dropped are every interval, and the final report
    (never dropped) says how many lines were."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    tracer = None
    try:
        tracer = subprocess.Popen(
            DJPROBE + ["count", "-f", "-i", "0.1", "--json", "--output-queue", "1K", "fp_work", "--",
                       str(forkpace), str(M), str(N), str(K), str(GAP_MS)],
            stdin=subprocess.PIPE, stdout=w, stderr=subprocess.PIPE, text=True)
        err = _Lines(tracer.stderr)
        _wait_full(w)
        tracer.stdin.write("go\n")
        tracer.stdin.flush()
        assert err.wait_for(r"^done bad") == "done bad 0"
        assert _full(w)
        os.close(w)
        w = -1
        got: list[bytes] = []
        reader = threading.Thread(target=_read_to_eof, args=(r, got))
        reader.start()
        assert tracer.wait(60) == 0, err.text()
        reader.join(30)
    finally:
        _kill(tracer)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    reports = [json.loads(x) for x in b"".join(got).decode().splitlines()]
    final = reports[-1]
    assert final["final"] and all(not x["final"] for x in reports[:-1])
    assert [p["probes"][0]["hits"] for p in final["processes"]] == [M] + [K] * N  # every child apart
    assert final["probes"][0]["hits"] == M + N * K
    dropped = final["output_dropped"]
    assert dropped > 0 and len(reports) - 1 + dropped == final["interval"] - 1
    assert [x["interval"] for x in reports[:-1]] == sorted({x["interval"] for x in reports[:-1]})
    m = NOTE.search(err.text())
    assert m is not None, err.text()
    assert (int(m.group(1)), int(m.group(2))) == (dropped, final["interval"])


def _fill(fd: int) -> int:
    """Fill a pipe through our write end before anyone else has it (O_NONBLOCK is set on the
    shared description only meanwhile); returns the bytes written."""
    os.set_blocking(fd, False)
    n = 0
    try:
        while True:
            n += os.write(fd, b"filler\n")
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    return n


def test_notices_never_block_the_loop(forkpace, tmp_path):
    """``trace -f -p A,B`` with its stderr a full pipe nobody reads (the report in a file):
    the banner and the notice that A exited are queued, not written, so the loop goes on and B's
    6 children, forked 0.4 s apart after A exited, are each taken in with their 2,000 calls. Once
    stderr is read, every notice is there."""
    r, w = os.pipe()
    filled = _fill(w)
    report = tmp_path / "trace.txt"
    procs: list[subprocess.Popen] = []
    tracer = None
    try:
        for n, gap in ((2, 50), (N, GAP_MS)):
            procs.append(subprocess.Popen([str(forkpace), "0", str(n), str(K), str(gap)], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs = [_Lines(p.stderr) for p in procs]
        a, b = procs
        tracer = subprocess.Popen(
            DJPROBE + ["trace", "-f", "-o", str(report), "-p", f"{a.pid},{b.pid}", "fp_work"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w)
        end = time.monotonic() + 60
        while not (report.exists() and report.read_text().startswith("TIME")):  # after the banner
            assert time.monotonic() < end and tracer.poll() is None, "the tracer never started its report"
            time.sleep(0.01)
        a.stdin.write("go\n")
        a.stdin.flush()
        assert a.wait(60) == 0 and outs[0].wait_for(r"^done bad") == "done bad 0"
        b.stdin.write("go\n")
        b.stdin.flush()
        assert outs[1].wait_for(r"^done bad") == "done bad 0"
        assert b.wait(60) == 0
        assert _full(w)  # nobody read stderr all along
        os.close(w)
        w = -1
        got: list[bytes] = []
        reader = threading.Thread(target=_read_to_eof, args=(r, got))
        reader.start()
        assert tracer.wait(60) == 0
        reader.join(30)
    finally:
        _kill(tracer, *procs)
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    err = b"".join(got).decode()
    assert err.startswith("filler\n" * (filled // 7))
    assert "Tracing 1 function in 2 processes" in err
    assert f"process {a.pid} (" in err and "exited" in err
    text = report.read_text()
    assert f"all {2 + 2 + N} processes:" in text  # both, and every child of both taken in
    per_pid = Counter(m.group(1) for m in re.finditer(r"^\[pid (\d+)\] ", text, re.M))
    assert sorted(per_pid.values()) == [K] * (2 + N)  # each child's calls, and nothing lost
    assert str(a.pid) not in per_pid and str(b.pid) not in per_pid
    assert "output lines dropped" not in text
