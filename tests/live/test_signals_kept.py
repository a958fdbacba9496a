"""No queued signal is lost while djprobe stops, injects into and resumes a target (issue 9.2).

A receiver with a small real-time signal queue (RLIMIT_SIGPENDING = 1000) counts the SIGRTMIN
signals and sums their values while another process queues 100,000 of them (retrying on EAGAIN)
and ``djprobe count -p`` runs against the receiver again and again. Before the fix, signals were
taken off the queue while the world was stopped and re-sent later, and a full queue dropped them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import djprobe

from tests.live.test_process import Lines

pytestmark = pytest.mark.timeout(240)

RECEIVER = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
static volatile long count, sum, work;
__attribute__((noinline)) long f_work(long x) { return x * 3 + 1; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    double until = now() + 5e-6;   /* a slow consumer: the queue stays full while the sender runs */
    while (now() < until) {}
    __atomic_add_fetch(&sum, si->si_value.sival_int, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&count, 1, __ATOMIC_SEQ_CST);
}
static void *worker(void *a) { for (long i = 0;; i++) { work += f_work(i); usleep(10); } return a; }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct rlimit rl = {1000, 1000};
    setrlimit(RLIMIT_SIGPENDING, &rl);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t t;
    for (int i = 0; i < 3; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n"); fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;   /* the sender has finished */
    for (int i = 0; i < 5000 && count < n; i++) usleep(1000);
    printf("%s %ld %ld\n", count == n ? "done" : "lost", (long)count, (long)sum); fflush(stdout);
    return 0;
}
"""

SENDER = r"""
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    pid_t pid = atoi(argv[1]);
    long n = atol(argv[2]);
    for (long i = 0; i < n; i++) {
        union sigval v = {.sival_int = (int)i};
        while (sigqueue(pid, SIGRTMIN, v) != 0) {
            if (errno != EAGAIN) { perror("sigqueue"); return 1; }
            sched_yield();
        }
    }
    return 0;
}
"""


def test_no_queued_signal_lost_while_count_runs(build_c, start_target):
    n = 200_000
    receiver = build_c(RECEIVER.replace("#include <unistd.h>", "#include <unistd.h>\n#include <stdlib.h>"), name="sigrecv")
    sender = build_c(SENDER, name="sigsend")
    target = start_target([receiver, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(target.proc.stdout)
    assert out.readline() == "ready"
    stop_runs = threading.Event()
    runs: list[subprocess.CompletedProcess] = []

    def keep_counting() -> None:
        # The command once, then the same through the API in a loop (faster): every round maps
        # a probe area (injected system calls), inserts, counts and removes a probe, unmaps.
        runs.append(
            subprocess.run(
                [sys.executable, "-m", "djprobe", "count", "-p", str(target.pid), "-d", "0.1", "f_work"],
                capture_output=True, text=True, timeout=60,
            )
        )
        while not stop_runs.is_set():
            with djprobe.attach(target.pid) as proc:
                djp = proc.register(djprobe.Djprobe("f_work"))
                time.sleep(0.01)
                proc.unregister(djp)
            runs.append(subprocess.CompletedProcess([], 0))

    counter = threading.Thread(target=keep_counting)
    counter.start()
    try:
        while not runs:  # djprobe is at work before the first signal is sent
            time.sleep(0.05)
        send = subprocess.Popen([str(sender), str(target.pid), str(n)])
        assert send.wait(timeout=180) == 0
    finally:
        stop_runs.set()
        counter.join(timeout=90)
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs if r.returncode]
    assert len(runs) >= 2
    target.proc.stdin.write(b"report\n")
    target.proc.stdin.flush()
    assert out.readline(timeout=30) == f"done {n} {n * (n - 1) // 2}", f"after {len(runs)} djprobe runs"
