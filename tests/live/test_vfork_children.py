"""vfork and posix_spawn children count apart (djprobe.vforks): what such a child calls through
probed functions before its exec is neither the parent's hits, nor its events, nor its latency
calls, but the probe's ``vfork_hits``; the parent's figures stay exact while its other threads
run on every CPU (the child's counts never race with theirs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import djprobe
from djprobe.area import AreaLayout
from djprobe.forks import ForkGuard
from djprobe.vforks import find_vfork_site
from djprobe.vforks32 import find_clone3_site32
from tests.conftest import compile_c

pytestmark = pytest.mark.timeout(240)
DJPROBE = [sys.executable, "-m", "djprobe"]

# vfchildren T N V S K: T threads call vf_work(i) and dup2 at least N times each, until the main
# thread is done; meanwhile the main thread makes V vfork children (each calls vf_work(1000000 +
# i) and dup2 K times, then execs /bin/true or _exits) and S posix_spawn children of /bin/true
# with K dup2 file actions, and calls vf_work once after each child. vf_name(s, i): each vfork child
# calls it K times with "child", the main thread once after each child with "parent". It prints the parent's
# calls of vf_work and dup2 in all.
TARGET = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
extern char **environ;
/* VF_NO_CLONE3 set: clone3 fails with ENOSYS (as under container runtimes' seccomp filters), so
   glibc's __clone_internal falls back to __clone for threads and posix_spawn children. */
static void no_clone3(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 435, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 38),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {4, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) exit(3);
}
static long n, v, s, k;
static volatile long main_done, calls, dups, bad;
__attribute__((noinline)) long vf_work(long x) { __asm__ volatile(""); return x + 1; }
__attribute__((noinline)) long vf_name(const char *s, long x) { __asm__ volatile(""); return s[0] + x; }
static void *work(void *a) {
    long t = (long)a, i, d = 0;
    unsigned long long sum = 0;  /* 64 bits in a -m32 build too */
    for (i = 0; i < n || !main_done; i++) {
        sum += (unsigned long)vf_work(i);
        if (dup2(2, 300 + (int)t) == 300 + (int)t) d++;
    }
    if (sum != (unsigned long long)i * (i + 1) / 2) __atomic_add_fetch(&bad, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&calls, i, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&dups, d, __ATOMIC_SEQ_CST);
    return a;
}
int main(int argc, char **argv) {
    if (argc < 6) return 2;
    if (getenv("VF_NO_CLONE3")) no_clone3();
    int nt = atoi(argv[1]);
    n = atol(argv[2]); v = atol(argv[3]); s = atol(argv[4]); k = atol(argv[5]);
    pthread_t th[16];
    for (long t = 0; t < nt; t++) pthread_create(&th[t], 0, work, (void *)t);
    long mine = 0, failed = 0;
    for (long j = 0; j < v; j++) {
        pid_t pid = vfork();
        if (pid == 0) {
            volatile long cs = 0;
            for (long i = 0; i < k; i++) { cs += vf_work(1000000 + i); dup2(2, 200); cs += vf_name("child", i); }
            if (j % 2) execl("/bin/true", "true", (char *)NULL);
            _exit(0);
        }
        int st = 0;
        if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) failed++;
        vf_work(-1); mine++;   /* the parent's own call after each vfork */
        vf_name("parent", j);
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    for (long i = 0; i < k; i++) posix_spawn_file_actions_adddup2(&fa, 2, 10 + (int)(i % 50));
    char *args[] = {"true", NULL};
    for (long j = 0; j < s; j++) {
        pid_t pid;
        int st = 0;
        if (posix_spawn(&pid, "/bin/true", &fa, NULL, args, environ) || waitpid(pid, &st, 0) != pid || WEXITSTATUS(st)) failed++;
        vf_work(-2); mine++;
        vf_name("parent", v + j);
    }
    main_done = 1;
    for (long t = 0; t < nt; t++) pthread_join(th[t], 0);
    printf("done calls=%ld dups=%ld failed=%ld bad=%ld\n", calls + mine, dups, failed, bad);
    return 0;
}
"""

T, N, V, S, K = 3, 20000, 40, 40, 25


@pytest.fixture(scope="module")
def vfchildren():
    return compile_c(TARGET, name="vfchildren")


def _fields(output: str) -> dict[str, int]:
    assert output.startswith("done "), output
    fields = {key: int(value) for key, value in (kv.split("=") for kv in output.split()[1:])}
    assert fields["failed"] == 0 and fields["bad"] == 0, output
    return fields


def _run(exe, probes, *, layout: AreaLayout | None = None, guard: bool = True, inspect=None, probes_first=False,
         hooks: int = 2, notes: int = 0, env: dict[str, str] | None = None):
    """Spawn vfchildren with the fork guard (and its vfork hooks) and ``probes``; run it to its
    end. Returns (fields, [(hits, vfork_hits) per probe], the hooks' (hits, vfork_hits), the event batches, and
    what ``inspect(batches)`` returns, called while the process is still open); ``probes_first``:
    the probes are placed before the hooks (as the CLI does); ``hooks``: how many hooks go in,
    with ``notes`` notes."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(T), str(N), str(V), str(S), str(K)], stdout=write_fd, env=env) as proc:
        os.close(write_fd)
        if layout is not None:
            proc.layout = layout
        proc.wait_timeout = 10.0  # lossless: a consumer slowed down by a loaded machine loses nothing
        marks = None
        for djp in probes if probes_first else ():
            proc.register(djp)
        if guard:
            fork_guard = ForkGuard(proc)
            fork_guard.install()
            marks = fork_guard.vforks
            assert marks is not None and len(marks.notes) == notes, marks and marks.notes
            assert [h.mode for h in marks.hooks] == ["jump"] * hooks
        for djp in () if probes_first else probes:
            proc.register(djp)
        proc.start()
        batches = []
        if any(d.record for d in probes):
            batches = list(proc.events(timeout=120))
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0, output
        if batches:
            batches.append(proc.read_events())
        hooks = [(h.hits, h.vfork_hits) for h in marks.hooks] if marks is not None else []
        figures = [(d.hits, d.vfork_hits) for d in probes]
        inspected = inspect(batches) if inspect is not None else None
    return _fields(output), figures, hooks, batches, inspected


def test_count_children_apart_parent_exact(vfchildren):
    work, dup2 = djprobe.Djprobe("vf_work"), djprobe.Djprobe("libc:dup2")
    fields, figures, hooks, _, _ = _run(vfchildren, [work, dup2])
    # after vfork's syscall: the parent's returns, the children marked; posix_spawn children marked
    assert hooks == [(V, V), (0, S)]
    assert fields["calls"] >= T * N
    assert figures == [(fields["calls"], V * K), (fields["dups"], V * K + S * K)]


@pytest.mark.parametrize("probes_first", [True, False], ids=["probes-then-hooks", "hooks-then-probes"])
def test_user_probes_at_the_hooks_sites(vfchildren, probes_first):
    """Counting probes at the hooks' own sites (``'*:*'`` places one at ``vfork`` and at
    ``__spawni_child``) share the hooks' stubs, whichever came first: the hooks are in (no note)
    and every figure is exact. ``vfork`` runs in the parent only; the instruction after its
    syscall (``vfork+0x8``, the hook's address) in the parent and, marked, in each child;
    ``__spawni_child`` in posix_spawn children only."""
    entry, after, spawn = (djprobe.Djprobe(s) for s in ("libc:vfork", "libc:vfork+0x8", "libc:__spawni_child"))
    dup2 = djprobe.Djprobe("libc:dup2")
    fields, figures, hooks, _, _ = _run(vfchildren, [entry, after, spawn, dup2], probes_first=probes_first)
    assert [d.mode for d in (entry, after, spawn)] == ["jump"] * 3
    assert hooks == [(V, V), (0, S)]
    assert figures == [(V, 0), (V, V), (0, S), (fields["dups"], V * K + S * K)]


def test_hook_site_refuses_what_it_cannot_serve(vfchildren):
    """A probe that records (or a latency probe) at a hook's address is refused with the reason
    while the hook is in; placed first, it keeps its site and the hook says it is not in."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(vfchildren), "1", "10", "1", "1", "1"], stdout=write_fd) as proc:
        os.close(write_fd)
        guard = ForkGuard(proc)
        guard.install()
        refusals = {"vfork hook .* shares an address only with counting probes": {"record": True},
                    "a latency probe cannot share it": {"at": "latency"}}
        for reason, spec in refusals.items():
            with pytest.raises(djprobe.DjprobeError, match=reason):
                proc.register(djprobe.Djprobe("libc:__spawni_child", **spec))
        guard.close()
    os.close(read_fd)
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(vfchildren), "1", "10", "1", "1", "1"], stdout=write_fd) as proc:
        os.close(write_fd)
        traced = proc.register(djprobe.Djprobe("libc:__spawni_child", record=True))
        guard = ForkGuard(proc)
        guard.install()
        assert [h.address for h in guard.vforks.hooks] == [find_vfork_site(proc)]
        assert len(guard.notes) == 1 and "only with counting probes" in guard.notes[0], guard.notes
        assert traced.mode == "jump" and traced.registered
        proc.start()
        with os.fdopen(read_fd) as out:
            _fields(out.read())
        assert proc.process.popen.wait(timeout=60) == 0
        guard.close()


def test_without_the_hooks_children_count_as_the_parent(vfchildren):
    """The reference: without the vfork hooks, the children's calls before their exec are the
    parent's (and a per-CPU count may even be lost to a race with a parent thread)."""
    dup2 = djprobe.Djprobe("libc:dup2")
    fields, figures, _, _, _ = _run(vfchildren, [dup2], guard=False)
    assert figures[0][1] == 0
    assert fields["dups"] < figures[0][0] <= fields["dups"] + V * K + S * K


def test_record_no_child_event_as_the_parent(vfchildren):
    work = djprobe.Djprobe("vf_work", record=True, lossless=True)
    layout = AreaLayout(ring_count=8, ring_slots=1 << 16)
    fields, figures, _, batches, _ = _run(vfchildren, [work], layout=layout)
    hits, apart = figures[0]
    assert (hits, apart) == (fields["calls"], V * K)
    x = np.concatenate([b.register("rdi") for b in batches]).astype(np.int64)
    assert (len(x), work.missed) == (hits, 0)
    assert not (x >= 1_000_000).any(), "a vfork child's event is in the parent's rings"
    assert int((x == -1).sum()) == V and int((x == -2).sum()) == S  # the main thread's own calls after each child


def test_latency_parent_calls_equal_returns(vfchildren):
    work = djprobe.Djprobe("vf_work", at="latency")
    fields, figures, _, _, _ = _run(vfchildren, [work])
    lat = work.latency
    assert lat.calls == fields["calls"]
    assert lat.returns + lat.unpaired == fields["calls"]
    assert lat.unpaired <= lat.collisions
    assert figures[0][1] == V * K


def test_count_command_reports_children_apart(vfchildren):
    """`djprobe count --json` without --follow: the parent's figures exact, the children's
    pre-exec hits in each probe's vfork_hits; in text, a table of their own."""
    argv = [str(vfchildren), str(T), "2000", str(V), str(S), str(K)]
    res = subprocess.run(DJPROBE + ["count", "--json", "vf_work", "libc:dup2", "--"] + argv,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    fields = _fields(lines[0])
    report = json.loads(lines[-1])
    got = {p["site"].split(":")[1]: (p["hits"], p["vfork_hits"]) for p in report["probes"]}
    assert got == {"vf_work": (fields["calls"], V * K), "dup2": (fields["dups"], V * K + S * K)}
    res = subprocess.run(DJPROBE + ["count", "libc:dup2", "--"] + argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout.splitlines()
    at = text.index("vfork/posix_spawn children, before their exec (not counted above):")
    assert text[at + 2].split() == ["libc.so.6:dup2", str(V * K + S * K)]
    assert text[2].split() == ["libc.so.6:dup2", "jump", str(_fields(text[0])["dups"])]


def test_string_fetch_no_child_record(vfchildren):
    """A probe that copies a string argument (djprobe.fetch_stubs, always locked): the children's
    calls are counted apart and never recorded."""
    from djprobe.events import EventBatch

    work = djprobe.Djprobe("vf_name", prototype="const char *s, long x", lossless=True)

    def strings(batches):
        batch = EventBatch.concat([b for b in batches if len(b)])
        return sorted(zip(batch.column("s"), batch.column("x")))

    fields, figures, _, _, seen = _run(vfchildren, [work], inspect=strings)
    assert figures == [(V + S, V * K)]
    assert seen == sorted(("parent", j) for j in range(V + S))


KILLER = """
import os, signal, sys
import djprobe
from djprobe.forks import ForkGuard
out = open(sys.argv[2], "w")
proc = djprobe.spawn(sys.argv[1:2] + sys.argv[3:], stdout=out.fileno())
guard = ForkGuard(proc)
guard.install()
assert [h.mode for h in guard.vforks.hooks] == ["jump", "jump"], guard.notes
proc.register(djprobe.Djprobe("vf_work"))
proc.register(djprobe.Djprobe("libc:dup2"))
proc.start()
print(proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the tracer dies at once: the children come after
"""


def test_tracer_dead_children_still_run(vfchildren, tmp_path):
    """The hooks are plain code: with the tracer killed before the first child, every vfork and
    posix_spawn child still runs and execs, and the parent is unharmed."""
    import signal
    import time
    from pathlib import Path

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    tracer = subprocess.Popen([sys.executable, str(script), str(vfchildren), str(out), str(T), "2000", str(V), str(S),
                               str(K)], stdout=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the target did not go on after the tracer died"
            time.sleep(0.05)
        _fields(out.read_text())  # done, no child failed, the threads' sums right
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- 32-bit (i386) processes: the same target built -m32 ------------------------------------------


@pytest.fixture(scope="module")
def vfchildren32():
    try:
        return compile_c(TARGET, "-m32", name="vfchildren32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


# The 32-bit hooks: after vfork's int 0x80; after __clone3's (the main thread's T pthread_create
# and S posix_spawn clones, the parent's returns, and the T new threads' first pass as hits; the
# S posix_spawn children, CLONE_VM|CLONE_VFORK, marked, apart); after __clone's (glibc's fallback
# where clone3 fails with ENOSYS: not run here unless VF_NO_CLONE3 makes it so, same figures).
HOOKS32 = 3
CLONE3_HOOK = (2 * T + S, S)


def test_i386_count_children_apart_parent_exact(vfchildren32):
    """The 32-bit hooks go in: every vfork and posix_spawn child's call before its exec is in
    vfork_hits; the parent's figures exact with three threads, created while probed, running
    meanwhile."""
    work, dup2 = djprobe.Djprobe("vf_work"), djprobe.Djprobe("libc:dup2")
    fields, figures, got_hooks, _, _ = _run(vfchildren32, [work, dup2], hooks=HOOKS32)
    assert got_hooks == [(V, V), CLONE3_HOOK, (0, 0)]
    assert fields["calls"] >= T * N
    assert figures == [(fields["calls"], V * K), (fields["dups"], V * K + S * K)]


def test_i386_without_clone3_the_clone_hook_marks(vfchildren32):
    """clone3 refused with ENOSYS by a seccomp filter (VF_NO_CLONE3): glibc falls back to
    ``__clone`` for the threads and the posix_spawn children, and the hook after its ``int 0x80``
    (flags in ``ebx``) marks the children and not the threads; every figure exact."""
    env = dict(os.environ, VF_NO_CLONE3="1")
    work, dup2 = djprobe.Djprobe("vf_work"), djprobe.Djprobe("libc:dup2")
    fields, figures, got_hooks, _, _ = _run(vfchildren32, [work, dup2], hooks=HOOKS32, env=env)
    assert got_hooks == [(V, V), (T + S, 0), CLONE3_HOOK]  # each clone3 refused: its parent's return only
    assert figures == [(fields["calls"], V * K), (fields["dups"], V * K + S * K)]


@pytest.mark.parametrize("probes_first", [True, False], ids=["probes-then-hooks", "hooks-then-probes"])
def test_i386_threads_count_as_the_parent_with_the_clone_hook(vfchildren32, probes_first):
    """pthread_create goes through the same ``__clone3`` as posix_spawn: the T threads, created
    while the hook is in, are not marked (their argument is their own struct pthread,
    CLONE_SETTLS, no CLONE_VFORK): every call of theirs is the parent's, exact, nothing apart. A
    user's counting probe at the hook's address shares its stub when the hook is in first; placed
    before it, it is refused (no symbol of the stripped libc covers the address) and the hook
    still goes in."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(vfchildren32), str(T), str(N), "0", "0", "0"], stdout=write_fd) as proc:
        os.close(write_fd)
        site = find_clone3_site32(proc)
        work, dup2, at_hook = djprobe.Djprobe("vf_work"), djprobe.Djprobe("libc:dup2"), djprobe.Djprobe(site)
        probes = [work, dup2]
        if probes_first:
            with pytest.raises(djprobe.DjprobeError, match="no symbol covers"):
                proc.register(at_hook)
        guard = ForkGuard(proc)
        guard.install()
        assert guard.vforks.notes == [] and guard.vforks.hooks[1].address == site
        if not probes_first:
            probes.append(proc.register(at_hook))
            assert at_hook.mode == "jump" and at_hook.address == site
        for djp in probes[:2]:
            proc.register(djp)
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0, output
        fields = _fields(output)
        assert [(h.hits, h.vfork_hits) for h in guard.vforks.hooks] == [(0, 0), (2 * T, 0), (0, 0)]
        expected = [(fields["calls"], 0), (fields["dups"], 0)] + ([] if probes_first else [(2 * T, 0)])
        assert [(d.hits, d.vfork_hits) for d in probes] == expected
        assert fields["calls"] >= T * N


def test_i386_without_the_hooks_children_count_as_the_parent(vfchildren32):
    """The reference: without the hooks, every child's call before its exec is the parent's
    (exactly: the 32-bit count is locked)."""
    dup2 = djprobe.Djprobe("libc:dup2")
    fields, figures, _, _, _ = _run(vfchildren32, [dup2], guard=False)
    assert figures == [(fields["dups"] + V * K + S * K, 0)]


def test_i386_record_no_child_event_as_the_parent(vfchildren32):
    work = djprobe.Djprobe("vf_work", record=True, lossless=True)
    layout = AreaLayout(ring_count=8, ring_slots=1 << 16)
    fields, figures, _, batches, _ = _run(vfchildren32, [work], layout=layout, hooks=HOOKS32)
    hits, apart = figures[0]
    assert (hits, apart) == (fields["calls"], V * K)
    x = np.concatenate([b.register("rdi") for b in batches]).astype(np.uint32).astype(np.int32)  # cdecl arg 0
    assert (len(x), work.missed) == (hits, 0)
    assert not (x >= 1_000_000).any(), "a vfork child's event is in the parent's rings"
    assert int((x == -1).sum()) == V and int((x == -2).sum()) == S


def test_i386_latency_parent_calls_equal_returns(vfchildren32):
    work = djprobe.Djprobe("vf_work", at="latency")
    fields, figures, _, _, _ = _run(vfchildren32, [work], hooks=HOOKS32)
    lat = work.latency
    assert lat.calls == fields["calls"]
    assert lat.returns + lat.unpaired == fields["calls"]
    assert lat.unpaired <= lat.collisions
    assert figures[0][1] == V * K


def test_i386_string_fetch_no_child_record(vfchildren32):
    from djprobe.events import EventBatch

    work = djprobe.Djprobe("vf_name", prototype="const char *s, long x", lossless=True)

    def strings(batches):
        batch = EventBatch.concat([b for b in batches if len(b)])
        return sorted(zip(batch.column("s"), batch.column("x")))

    fields, figures, _, _, seen = _run(vfchildren32, [work], inspect=strings, hooks=HOOKS32)
    assert figures == [(V + S, V * K)]
    assert seen == sorted(("parent", j) for j in range(V + S))


def test_i386_glibc_without_rseq_children_count_as_the_parent(vfchildren32):
    """glibc.pthread.rseq=0: no rseq area to mark, so no hook goes in (a note says why), the
    stubs have no marker check, and the children's calls count (and record) as the parent's,
    exactly, as before."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0")
    work, dup2 = djprobe.Djprobe("vf_work", record=True, lossless=True), djprobe.Djprobe("libc:dup2")
    layout = AreaLayout(ring_count=8, ring_slots=1 << 16)
    fields, figures, hooks, batches, _ = _run(vfchildren32, [work, dup2], layout=layout, hooks=0, notes=1, env=env)
    assert hooks == []
    assert figures == [(fields["calls"] + V * K, 0), (fields["dups"] + V * K + S * K, 0)]
    x = np.concatenate([b.register("rdi") for b in batches]).astype(np.uint32).astype(np.int32)
    assert int((x >= 1_000_000).sum()) == V * K  # the children's events, as the parent's


def test_i386_count_command_reports_children_apart(vfchildren32):
    """`djprobe count --json` on the 32-bit target: the parent's figures exact, the vfork and
    posix_spawn children's pre-exec hits in vfork_hits, no note (both hooks in)."""
    argv = [str(vfchildren32), str(T), "2000", str(V), str(S), str(K)]
    res = subprocess.run(DJPROBE + ["count", "--json", "vf_work", "libc:dup2", "--"] + argv,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "count as the parent" not in res.stderr, res.stderr
    lines = res.stdout.strip().splitlines()
    fields = _fields(lines[0])
    report = json.loads(lines[-1])
    got = {p["site"].split(":")[1]: (p["hits"], p["vfork_hits"]) for p in report["probes"]}
    assert got == {"vf_work": (fields["calls"], V * K), "dup2": (fields["dups"], V * K + S * K)}
