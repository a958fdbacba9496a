"""A signal handler that hits a record probe while its own thread is in the middle of that
probe's record (between the reservation of a slot and its commit), with the ring full: the
handler's record must not wait for the interrupted one (it can only be committed after the
handler returns), and nothing may be lost (lossless mode, ``trace``'s default).

The interruption is made exact: before some calls the worker write-protects the page of the
area's ring records, so the record stub faults on its first store into the slot it just
reserved; the SIGSEGV handler gives the page back and calls the probed function itself. Rings
of one slot make the ring full whenever the handler records. Before the fix the locked cases
and the string records lost every nested event (50 of 50, each after a 0.5 s wait); the per-CPU
cases passed (they escaped to a locked ring with room) and now check a record aborted and
restarted inside its critical section."""

from __future__ import annotations

import os

import numpy as np
import pytest

import djprobe
from djprobe.area import REGISTER_NAMES, AreaLayout

pytestmark = pytest.mark.timeout(120)

NESTED = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define HANDLER 1000
static char *page;
static long pages = 1;
static int strings;
static volatile long nested, protected_calls;
__attribute__((noinline)) long f_rec(long w, long i, long a, long b, long c, long d) {
    __asm__ volatile("");
    return w + i + a + b + c + d;
}
__attribute__((noinline)) long f_str(const char *s, long w, long i) {
    __asm__ volatile("");
    return s[0] + w + i;
}
static void call(long w, long i) {
    char text[32];
    if (strings) {
        snprintf(text, sizeof text, "%s-%ld", w ? "handler" : "worker", i);
        f_str(text, w, i);
    } else {
        f_rec(w, i, 2 * i, 3 * i, 4 * i, 5 * i);
    }
}
static void on_segv(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)ctx;
    if ((char *)info->si_addr < page || (char *)info->si_addr >= page + 4096 * pages) abort();
    mprotect(page, 4096 * pages, PROT_READ | PROT_WRITE);
    call(HANDLER, nested++);  /* inside the interrupted record */
}
int main(int argc, char **argv) {
    long n = atol(argv[1]), every = atol(argv[2]), offset = strtol(argv[3], 0, 0);
    pages = atol(argv[4]);
    strings = atoi(argv[5]);
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (fgets(line, sizeof line, maps)) {  /* the probe area's data part: a deleted /dev/shm file */
        unsigned long lo;
        if (strstr(line, "/dev/shm/djprobe-") && sscanf(line, "%lx-", &lo) == 1) page = (char *)lo + offset;
    }
    fclose(maps);
    if (!page) { printf("no probe area\n"); return 2; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, 0);
    for (long i = 0; i < n; i++) {
        if (i % every == 0) { mprotect(page, 4096 * pages, PROT_READ); protected_calls++; }
        call(0, i);
    }
    printf("done nested=%ld protected=%ld\n", nested, protected_calls);
    return 0;
}
"""
HANDLER = 1000
ARGS = [REGISTER_NAMES.index(r) for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9")]
N, EVERY = 400, 8


@pytest.fixture(scope="module")
def nested_exe():
    from tests.conftest import compile_c

    return compile_c(NESTED, name="nested_records")


@pytest.mark.parametrize("registers", ["args", "all"])
@pytest.mark.parametrize("per_cpu", [True, False], ids=["rseq", "locked"])
def test_handler_inside_own_record_loses_nothing(nested_exe, per_cpu, registers):
    layout = AreaLayout(ring_slots=1)  # every record fills its ring until the consumer drains it
    assert layout.records_offset % 4096 == 0 and layout.string_rings_offset - layout.records_offset == 4096
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(nested_exe), str(N), str(EVERY), str(layout.records_offset), "1", "0"],
                       stdout=write_fd) as proc:
        os.close(write_fd)
        proc.per_cpu_counters = per_cpu
        proc.layout = layout
        djp = proc.register(djprobe.Djprobe("f_rec", record=True, registers=registers, lossless=True))
        proc.start()
        batches = list(proc.events(timeout=90, interval=0.001))
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=30) == 0, output
        batches.append(proc.read_events())
        hits, missed = djp.hits, djp.missed
    fields = dict(kv.split("=") for kv in output.split()[1:])
    nested = int(fields["nested"])
    assert int(fields["protected"]) == N // EVERY
    assert nested == N // EVERY  # each protected call's record faulted once, inside its own record
    assert hits == N + nested
    assert missed == 0, f"{missed} events dropped"
    events = np.concatenate([b.events for b in batches if len(b)])
    assert len(events) == hits
    args = events["regs"][:, ARGS].astype(np.int64)
    worker = args[args[:, 0] == 0]
    assert (worker[:, 1] == np.arange(N)).all(), "worker events out of order or missing"
    handler = args[args[:, 0] == HANDLER]
    assert np.array_equal(np.sort(handler[:, 1]), np.arange(nested))
    for rows in (worker, handler):
        assert all((rows[:, k] == k * rows[:, 1]).all() for k in range(2, 6))


@pytest.mark.parametrize("per_cpu", [True, False], ids=["rseq", "locked"])
def test_handler_inside_own_string_record_loses_nothing(nested_exe, per_cpu):
    # The string record's stub reserves with a lock and copies the strings with a system call
    # before it commits: the same interruption, in the rings of string records.
    layout = AreaLayout(ring_slots=1, string_ring_slots=1)
    pages = layout.ring_count * layout.string_ring_stride // 4096
    assert layout.string_records_offset % 4096 == 0 and pages >= 1
    read_fd, write_fd = os.pipe()
    argv = [str(nested_exe), str(N), str(EVERY), str(layout.string_records_offset), str(pages), "1"]
    with djprobe.spawn(argv, stdout=write_fd) as proc:
        os.close(write_fd)
        proc.per_cpu_counters = per_cpu
        proc.layout = layout
        djp = proc.register(djprobe.Djprobe("f_str", record=True, prototype="const char *s, long w, long i",
                                            lossless=True))
        proc.start()
        batches = list(proc.events(timeout=90, interval=0.001))
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=30) == 0, output
        batches.append(proc.read_events())
        hits, missed = djp.hits, djp.missed
        got = []  # (w, i, s) of each event, while its probe is there to type it
        for batch in batches:
            for k in range(len(batch)):
                values = batch.values(k)
                got.append((values["w"], values["i"], str(values["s"])))
    fields = dict(kv.split("=") for kv in output.split()[1:])
    nested = int(fields["nested"])
    assert nested == N // EVERY
    assert hits == N + nested
    assert missed == 0, f"{missed} events dropped"
    assert len(got) == hits
    worker = [g for g in got if g[0] == 0]
    assert [g[1] for g in worker] == list(range(N)), "worker events out of order or missing"
    assert all(g[2] == f"worker-{g[1]}" for g in worker)
    handler = sorted(g for g in got if g[0] == HANDLER)
    assert [g[1] for g in handler] == list(range(nested))
    assert all(g[2] == f"handler-{g[1]}" for g in handler)
