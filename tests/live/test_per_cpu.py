"""Per-CPU counting with restartable sequences (issue 15.1): exact under more threads than CPUs,
affinity churn and signals; the ``lock inc`` fallback where rseq is not usable."""

from __future__ import annotations

import os

import numpy as np
import pytest

import djprobe

pytestmark = pytest.mark.timeout(120)

CHURN = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define NT 8
static long n;
static volatile long in_handler, finished, sent, total_calls, bad;
static pthread_t workers[NT];
__attribute__((noinline)) long f_count(long x) { __asm__ volatile(""); return x + 1; }
static void on_usr1(int sig) { (void)sig; f_count(1); __atomic_add_fetch(&in_handler, 1, __ATOMIC_SEQ_CST); }
static void *work(void *a) {
    long sum = 0, i;
    for (i = 0; i < n || sent < 2000; i++) sum += f_count(i);   /* at least 2,000 signals meanwhile */
    __atomic_add_fetch(&total_calls, i, __ATOMIC_SEQ_CST);
    if (sum != i * (i + 1) / 2) __atomic_add_fetch(&bad, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
    while (finished < NT + 1) usleep(100);   /* exist until the churn thread has stopped */
    return a;
}
static void *churn(void *a) {
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    for (unsigned k = 0; finished < NT; k++) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(k % ncpu, &set);
        if (k % 3 == 0) for (int c = 0; c < ncpu; c++) CPU_SET(c, &set);
        pthread_setaffinity_np(workers[k % NT], sizeof set, &set);
        pthread_kill(workers[(k * 7) % NT], SIGUSR1);
        sent++;
        usleep(20);
    }
    __atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
    return a;
}
int main(int argc, char **argv) {
    n = atol(argv[1]);
    signal(SIGUSR1, on_usr1);
    for (int i = 0; i < NT; i++) pthread_create(&workers[i], 0, work, 0);
    pthread_t c;
    pthread_create(&c, 0, churn, 0);
    pthread_join(c, 0);
    for (int i = 0; i < NT; i++) pthread_join(workers[i], 0);
    printf("done calls=%ld handler=%ld bad=%ld\n", total_calls + in_handler, in_handler, bad);
    return 0;
}
"""


def _run(exe, n, *, per_cpu=True, env=None):
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(n)], stdout=write_fd, env=env) as proc:
        os.close(write_fd)
        proc.per_cpu_counters = per_cpu
        djp = proc.register(djprobe.Djprobe("f_count"))
        view, slot = djp._instance.region.view, djp._instance.slot
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0, output
        counters = view._counters[:, slot].copy()
        hits = djp.hits
    fields = dict(kv.split("=") for kv in output.split()[1:])
    assert fields["bad"] == "0", output
    lay = view.layout
    per_cpu, locked = int(counters[: lay.cpu_shards].sum()), int(counters[lay.locked_shard_base :].sum())
    return hits, int(fields["calls"]), per_cpu, locked, int(fields["handler"])


@pytest.fixture(scope="module")
def churn_exe(tmp_path_factory):
    from tests.conftest import compile_c

    return compile_c(CHURN, name="percpu_churn")


def test_per_cpu_counts_exact_under_churn_and_signals(churn_exe):
    hits, calls, per_cpu, locked, handled = _run(churn_exe, 2_000_000)
    assert hits == calls
    assert calls >= 8 * 2_000_000
    assert handled >= 100, "signals were handled inside the loop (and counted)"
    assert per_cpu == calls and locked == 0, "every hit took the rseq path (glibc registered rseq)"


def test_forced_fallback_counts_exact(churn_exe):
    hits, calls, per_cpu, locked, _ = _run(churn_exe, 100_000, per_cpu=False)
    assert hits == calls
    assert per_cpu == 0 and locked == calls


def test_without_glibc_rseq_falls_back(churn_exe):
    env = dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0")
    hits, calls, per_cpu, locked, _ = _run(churn_exe, 100_000, env=env)
    assert hits == calls
    assert per_cpu == 0 and locked == calls


def test_threads_without_rseq_spread_over_the_locked_rings(churn_exe):
    """Without rseq every record takes a locked ring chosen from the thread's stack address: NT
    threads with glibc's 8 MiB stacks (rsp >> 21 four apart) use more than one of the four
    locked rings (stubs.stack_hash; before it, all of them chose the same ring)."""
    from djprobe.area import RING_HEADER_SIZE

    env = dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0")
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(churn_exe), "2000"], stdout=write_fd, env=env) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("f_count", record=True))
        view = djp._instance.region.view
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0, output
        lay = view.layout
        heads = [int(np.frombuffer(view.buffer, np.uint64, 1, lay.rings_offset + r * RING_HEADER_SIZE)[0])
                 for r in range(lay.ring_count)]
        hits = djp.hits
    cpu_rings = lay.ring_count // 2
    assert sum(heads[:cpu_rings]) == 0, heads  # no rseq: no per-CPU ring
    assert sum(heads) > 0 and hits > 0
    assert sum(1 for h in heads[cpu_rings:] if h) >= 2, heads
