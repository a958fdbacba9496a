"""Stopping the world never holds the other threads for a thread that cannot stop (issue 9.5).

A parent waiting in ``vfork`` for a child that sleeps before ``_exit`` is in uninterruptible
sleep: ptrace cannot stop it until the child is done. The other threads must keep running
meanwhile (a monitor thread measures the longest gap between its own ticks), and the stop either
succeeds once the vfork is over or fails cleanly, leaving no thread traced.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from djprobe.errors import TargetTimeoutError
from djprobe.process import Process
from tests.live.test_process import Lines, tasks, tracer_pid, wait_until

pytestmark = pytest.mark.timeout(120)

VFORK_HOLD = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static volatile long ticks;
static volatile double max_gap;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void *monitor(void *a) {
    double last = now();
    for (;;) {
        usleep(1000);
        double t = now();
        if (t - last > max_gap) max_gap = t - last;
        last = t;
        ticks++;
    }
    return a;
}
static void *holder(void *a) {
    unsigned sleep_us = (unsigned)(long)a;
    pid_t child = vfork();
    if (child == 0) { usleep(sleep_us); _exit(0); }   /* the parent waits in D state meanwhile */
    return 0;
}
int main(int argc, char **argv) {
    pthread_t m, h;
    pthread_create(&m, 0, monitor, 0);
    printf("ready\n"); fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "vfork", 5) == 0) {
            pthread_create(&h, 0, holder, (void *)(long)atoi(line + 6));
            usleep(100000);
            printf("held\n"); fflush(stdout);
        } else if (strncmp(line, "join", 4) == 0) {
            pthread_join(h, 0);
            printf("joined\n"); fflush(stdout);
        } else if (strncmp(line, "gap", 3) == 0) {
            printf("gap %.3f ticks %ld\n", max_gap, ticks); fflush(stdout);
            max_gap = 0;
        }
    }
    return 0;
}
"""


@pytest.fixture
def vfork_target(build_c, start_target):
    exe = build_c(VFORK_HOLD, name="vfork_hold")
    target = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(target.proc.stdout)
    assert out.readline() == "ready"

    def say(line: str) -> str:
        target.proc.stdin.write(line.encode() + b"\n")
        target.proc.stdin.flush()
        return out.readline(timeout=30)

    return target, say


def _gap(say) -> float:
    return float(say("gap").split()[1])


def test_stop_waits_for_vfork_without_freezing_others(vfork_target):
    target, say = vfork_target
    _gap(say)  # reset
    assert say("vfork 3000000") == "held"  # the child sleeps 3 s
    proc = Process(target.pid)
    try:
        started = time.monotonic()
        threads = proc.stop(timeout=20)
        waited = time.monotonic() - started
        assert set(threads) == tasks(target.pid)
        proc.resume()
    finally:
        proc.close()
    assert waited > 1.0, "the stop could only succeed once the vfork was over"
    assert say("join") == "joined"
    gap = _gap(say)
    # Before the fix the monitor stood still for the whole vfork (about 3 s).
    assert gap < 1.5, f"the monitor thread was frozen for {gap:.3f} s"


def test_stop_gives_up_cleanly_while_vfork_lasts(vfork_target):
    target, say = vfork_target
    assert say("vfork 4000000") == "held"
    proc = Process(target.pid)
    try:
        with pytest.raises(TargetTimeoutError, match="uninterruptible sleep"):
            proc.stop(timeout=1.0)
        assert not proc.stopped
        # nothing is left traced, now or once the vfork is over
        assert all(tracer_pid(target.pid, t) == 0 for t in tasks(target.pid))
        assert say("join") == "joined"
        wait_until(lambda: all(tracer_pid(target.pid, t) == 0 for t in tasks(target.pid)), what="untraced")
        assert _gap(say) < 1.5
    finally:
        proc.close()
