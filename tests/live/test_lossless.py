"""Lossless recording (issue 11.1): a full ring makes the probe wait for the consumer, bounded
by a timeout, so that nothing is lost while the tracer consumes and nothing hangs when it does
not (stopped or killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import djprobe
from djprobe.area import AreaLayout
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)
N = 20_000


@pytest.fixture(scope="module")
def args_exe():
    return compile_c(TARGETS / "args.c", name="args")


def test_every_event_delivered_with_tiny_rings(args_exe):
    """3 threads x 20,000 calls through rings of 64 slots: all 60,000 events, in order per thread,
    with their exact arguments; the probes waited, nothing was dropped."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(args_exe), str(N)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.layout = AreaLayout(ring_slots=64)
        djp = proc.register(djprobe.Djprobe("f", registers="args", lossless=True))
        proc.start()
        batches = list(proc.events(timeout=120, interval=0.001))
        with os.fdopen(read_fd) as out:
            out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        batches.append(proc.read_events())
        waited = proc.waited_seconds
    events = np.concatenate([b.events for b in batches if len(b)])
    assert djp.hits == 3 * N and djp.missed == 0
    assert len(events) == 3 * N
    args = events["regs"][:, [djprobe.area.REGISTER_NAMES.index(r) for r in ("rdi", "rsi", "rdx")]]
    for t in range(3):
        mine = args[(args[:, 0] // 1_000_000) == t]
        assert len(mine) == N
        i = mine[:, 0] - t * 1_000_000
        assert (i == np.arange(N)).all(), "per-thread order"
        assert (mine[:, 1] == 2 * i).all() and (mine[:, 2] == 3 * i).all()
    assert waited > 0


def test_probes_wait_for_the_first_drain_after_a_slow_registration(args_exe):
    """More than ``wait_timeout`` between registration and ``start()``, then rings full before
    the consumer's first drain: ``start()`` tells the probes that the consumer is alive, so they
    wait for that drain instead of dropping every event after the first rings (the heartbeat of
    registration made the tracer look dead: seen in CI as one ring delivered, the rest dropped)."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(args_exe), str(N)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.layout, proc.wait_timeout = AreaLayout(ring_slots=64), 1.0
        djp = proc.register(djprobe.Djprobe("f", registers="args", lossless=True))
        time.sleep(1.5)  # longer than wait_timeout since registration
        proc.start()
        time.sleep(0.3)  # the rings fill; the probes wait (less than wait_timeout)
        batches = list(proc.events(timeout=120, interval=0.001))
        with os.fdopen(read_fd) as out:
            out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        batches.append(proc.read_events())
    assert djp.missed == 0 and djp.hits == 3 * N
    assert sum(len(b) for b in batches) == 3 * N


SLOW_CONSUMER = textwrap.dedent(
    """
    import os, signal, sys, time
    import djprobe
    from djprobe.area import AreaLayout
    pid = int(sys.argv[1])
    proc = djprobe.attach(pid)
    proc.layout = AreaLayout(ring_slots=64)
    proc.wait_timeout = 0.2
    djp = proc.register(djprobe.Djprobe("f", registers="args", lossless=True))
    print("in", flush=True)
    if sys.argv[2] == "kill":
        time.sleep(1.0)               # the rings fill; the probes wait for us
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(3):                # a consumer that stops (SIGSTOP from the test) meanwhile
        time.sleep(0.5)
        proc.read_events()
    proc.close()
    print("hits", djp.hits, "missed", djp.missed, flush=True)
    """
)

GATED = r"""
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) long f(long a, long b, long c, long d, long e, long g) { sink += a + b; return a; }
static void *worker(void *arg) { for (long i = 0; i < 300000; i++) { f(i, 2 * i, 3, 4, 5, 6); if (i % 1000 == 0) usleep(100); } return arg; }
int main(void) {
    char line[8];
    printf("ready\n"); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_t th[3];
    for (int t = 0; t < 3; t++) pthread_create(&th[t], 0, worker, 0);
    for (int t = 0; t < 3; t++) pthread_join(th[t], 0);
    printf("done %ld\n", sink); fflush(stdout);
    return 0;
}
"""


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_target_goes_on_when_the_consumer_stops_or_dies(start_target, how):
    exe = compile_c(GATED, name="lossless_gated")
    target = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert target.proc.stdout.readline().strip() == "ready"
    tracer = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONSUMER, str(target.pid), how], stdout=subprocess.PIPE, text=True
    )
    try:
        assert tracer.stdout.readline().strip() == "in"
        if how == "stop":
            os.kill(tracer.pid, signal.SIGSTOP)  # longer than the wait timeout
        started = time.monotonic()
        target.proc.stdin.write("go\n")
        target.proc.stdin.flush()
        line = target.proc.stdout.readline().strip()
        took = time.monotonic() - started
        assert line.startswith("done"), line  # the target finished despite a silent consumer
        if how == "stop":
            os.kill(tracer.pid, signal.SIGCONT)
            out = tracer.communicate(timeout=60)[0].split()
            hits, missed = int(out[1]), int(out[3])
            assert hits == 3 * 300000 and missed > 0  # exact hits; the drops are counted
        else:
            assert tracer.wait(timeout=30) == -signal.SIGKILL
        assert took < 60
    finally:
        if tracer.poll() is None:
            os.kill(tracer.pid, signal.SIGCONT)
            tracer.kill()
            tracer.wait()


def test_trace_command_delivers_every_event_by_default(args_exe):
    """`djprobe trace --json f -- args 20000`: 60,000 event lines, none dropped, exact args."""
    res = subprocess.run(
        [sys.executable, "-m", "djprobe", "trace", "--json", "--buffer-size", "256", "f", "--", str(args_exe), str(N)],
        capture_output=True, text=True, timeout=150,
    )
    assert res.returncode == 0, res.stderr
    import json

    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    events = [x for x in lines if "args" in x]
    summary = [x for x in lines if "summary" in x][0]
    assert len(events) == 3 * N
    assert summary["summary"][0]["hits"] == 3 * N and summary["summary"][0]["dropped"] == 0
    assert summary["summary"][0]["delivered"] == 3 * N
    assert sorted(e["args"][0] % 1_000_000 for e in events if e["args"][0] // 1_000_000 == 1) == list(range(N))
    drop = subprocess.run(
        [sys.executable, "-m", "djprobe", "trace", "--json", "--drop", "--buffer-size", "64", "f", "--", str(args_exe), str(N)],
        capture_output=True, text=True, timeout=150,
    )
    assert drop.returncode == 0, drop.stderr
    last = json.loads(drop.stdout.splitlines()[-1])
    assert last["summary"][0]["hits"] == 3 * N and last["waited_s"] == 0
