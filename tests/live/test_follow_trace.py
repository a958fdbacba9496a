"""--follow beyond count: trace and latency take in forked children and exec'd images (events
and figures per process, exact), --name takes in processes started later, and what a vfork or
posix_spawn child calls before its exec is counted apart from its parent's figures (vfork_hits)
and never recorded as the parent's events."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(240)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module")
def forkcount():
    return compile_c(TARGETS / "forkcount.c", name="forkcount")


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=180, **kw)


def trace(tmp_path, options: list, argv: list, **kw) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``djprobe trace OPTIONS -- ARGV`` with the report in a file (the target's own output
    on stdout could otherwise land inside a long line); returns the run and the report."""
    report = tmp_path / "trace.out"
    res = run(DJPROBE + ["trace", "-o", report] + options + ["--"] + argv, **kw)
    return res, report.read_text() if report.exists() else ""


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"time_ns"')]


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_trace_follow_events_per_process(forkcount, exec_child, tmp_path):
    """forkcount 300 3 2000: the parent calls fc_work 2 x 300 times; each child 2 x 2,000 (two
    threads, x = i and i + 1); with "x" the first child execs "forkcount 2000 0" at once (its
    new image: 2 x 2,000 calls of x = 0..1999 in one thread, under the child's PID)."""
    argv = [forkcount, 300, 3, 2000] + (["x"] if exec_child else [])
    res, out = trace(tmp_path, ["--follow", "--json", "fc_work"], argv, input="go\n")
    assert res.returncode == 0, res.stderr
    events = _events(out)
    by_pid: dict[int, list[int]] = defaultdict(list)
    for e in events:
        by_pid[e["pid"]].append(e["args"][0])
    lines = res.stdout.strip().splitlines()
    report = json.loads(out.strip().splitlines()[-1])
    pids = [p["pid"] for p in report["processes"]]
    parent = pids[0]
    assert sorted(by_pid[parent]) == sorted(list(range(300)) * 2)
    threaded = sorted(list(range(2000)) + list(range(1, 2001)))
    kids = [p for p in report["processes"][1:]]
    if exec_child:
        assert "parent 4000 children 0 bad 0" in lines  # the exec'd image's own line
        assert kids[0]["pid"] == kids[1]["pid"]  # the fork, then its exec'd image
        assert [k["probes"][0]["hits"] if k["probes"] else 0 for k in kids] == [0, 4000, 4000, 4000]
        assert sorted(by_pid[kids[0]["pid"]]) == sorted(list(range(2000)) * 2)
        others = kids[2:]
    else:
        assert len(set(pids)) == 4
        others = kids
    for k in others:
        assert sorted(by_pid[k["pid"]]) == threaded
        assert {e["tid"] for e in events if e["pid"] == k["pid"]} - {k["pid"]}  # the child's own threads
    assert set(by_pid) == set(pids)
    assert len(events) == 600 + 3 * 4000
    assert [(s["hits"], s["delivered"], s["dropped"]) for s in report["summary"]] == [(600 + 3 * 4000, 600 + 3 * 4000, 0)]
    per = {p["pid"]: sum(q["hits"] for q in p["probes"]) for p in report["processes"]}
    assert per == {pid: len(xs) for pid, xs in by_pid.items()}


def test_trace_follow_text_marks_processes(forkcount, tmp_path):
    res, out = trace(tmp_path, ["-f", "fc_work"], [forkcount, 5, 2, 10], input="go\n")
    assert res.returncode == 0, res.stderr
    hits = [line for line in out.splitlines() if ":fc_work 0x" in line]
    marked = Counter(int(line[5:].split("]")[0]) for line in hits if line.startswith("[pid "))
    plain = [line for line in hits if not line.startswith("[pid ")]
    parent = min(marked)  # the first PID: the children come later
    assert sorted(n for pid, n in marked.items() if pid != parent) == [20, 20]  # 2 threads x 10 each
    # the parent's 5 calls after the forks are marked (there are 3 processes by then); its 5
    # before may have been written before any child existed, unmarked
    assert marked[parent] in (5, 10) and len(plain) == 10 - marked[parent]
    assert "all 3 processes:" in out
    assert len([line for line in out.splitlines() if line.startswith("process ")]) == 3


def test_trace_without_follow_has_no_pid(forkcount, tmp_path):
    res, out = trace(tmp_path, ["--json", "fc_work"], [forkcount, 5, 1, 10], input="go\n")
    assert res.returncode == 0, res.stderr
    events = _events(out)
    assert len(events) == 10 and all("pid" not in e for e in events)


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_latency_follow_per_process(forkcount, exec_child):
    argv = [forkcount, 300, 3, 2000] + (["x"] if exec_child else [])
    res = run(DJPROBE + ["latency", "--follow", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 600 children 3 bad 0"
    report = json.loads(lines[-1])
    per = [(p["command"].split()[1:], [(f["calls"], f["returns"]) for f in p["probes"]]) for p in report["processes"]]
    mine = [str(a) for a in argv[1:]]
    if exec_child:
        assert per == [(mine, [(600, 600)]), (mine, [(0, 0)]), (["2000", "0"], [(4000, 4000)]),
                       (mine, [(4000, 4000)]), (mine, [(4000, 4000)])]
    else:
        assert per == [(mine, [(600, 600)])] + [(mine, [(4000, 4000)])] * 3
    for p in report["processes"]:
        for f in p["probes"]:
            assert sum(b["count"] for b in f["hist"]) == f["returns"]
    [total] = report["functions"]
    assert (total["calls"], total["returns"]) == (600 + 3 * 4000, 600 + 3 * 4000)
    assert total["total_ns"] == sum(f["total_ns"] for p in report["processes"] for f in p["probes"])
    buckets = Counter()
    for p in report["processes"]:
        for f in p["probes"]:
            for b in f["hist"]:
                buckets[b["low_ns"]] += b["count"]
    assert {b["low_ns"]: b["count"] for b in total["hist"] if b["count"]} == {k: v for k, v in buckets.items() if v}


def test_latency_without_follow_measures_only_the_parent(forkcount):
    res = run(DJPROBE + ["latency", "--json", "fc_work", "--", forkcount, 300, 2, 2000], input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 600 children 2 bad 0"  # the children ran right
    report = json.loads(lines[-1])
    assert "processes" not in report
    assert [(f["calls"], f["returns"]) for f in report["functions"]] == [(600, 600)]


def test_name_with_follow_takes_in_a_process_started_later(start_target, forkcount, tmp_path):
    """--name COMM --follow: a process named COMM started after djprobe gets the probes too
    (found by its scan of /proc); the children of both are followed, never taken twice."""
    import os

    comm = f"nw{os.getpid()}"  # a name of this test's own: other runs on the machine use forkcount
    exe = tmp_path / comm
    exe.write_bytes(forkcount.read_bytes())
    exe.chmod(0o755)
    first = start_target([exe, 100, 1, 3000], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    counter = subprocess.Popen(DJPROBE + ["count", "--json", "--follow", "--name", comm, "fc_work"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert counter.stderr.readline().startswith("Tracing 1 function in 1 process")
        later = start_target([exe, 50, 2, 2000], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = counter.stderr.readline()  # within a scan (0.1 s) and the placing of its probes
        assert line.startswith(f"process {later.pid} (") and "started later: 1 probe placed" in line, line
        for t in (first, later):
            t.proc.stdin.write(b"go\n")
            t.proc.stdin.close()
        assert first.proc.wait(timeout=60) == 0 and later.proc.wait(timeout=60) == 0
        assert first.proc.stdout.read() == b"parent 200 children 1 bad 0\n"
        assert later.proc.stdout.read() == b"parent 100 children 2 bad 0\n"
        out, err = counter.communicate(timeout=60)  # every process it took in ended
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    assert counter.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    per = [(p["pid"], p["probes"][0]["hits"]) for p in report["processes"]]
    # the first, its child; the later one, its two children: each once
    assert [h for _, h in per] == [200, 6000, 100, 4000, 4000]
    assert per[0][0] == first.pid and per[2][0] == later.pid
    assert len({pid for pid, _ in per}) == 5
    assert report["probes"][0]["hits"] == 200 + 6000 + 100 + 2 * 4000


@pytest.fixture(scope="module")
def vforker():
    return compile_c(TARGETS / "vforker.c", name="vforker")


@pytest.mark.parametrize("follow", [False, True], ids=["plain", "follow"])
def test_vfork_child_calls_before_exec_count_apart(vforker, follow):
    """A vfork child runs in its parent's memory (its stubs, its counters) until it execs: its
    1,000 calls before the exec are counted apart (vfork_hits), not as the parent's; with
    --follow the program it execs (3,000 calls) is counted apart, under the child's PID."""
    res = run(DJPROBE + ["count", "--json"] + (["--follow"] if follow else []) + ["fc_work", "--", vforker, 1000],
              input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "parent 1000 child 0"  # the child ran and its exec'd program exited 0
    report = json.loads(lines[-1])
    if not follow:
        assert [(p["hits"], p["vfork_hits"]) for p in report["probes"]] == [(1000, 1000)]
        return
    assert [(p["hits"], p["vfork_hits"]) for p in report["probes"]] == [(4000, 1000)]
    per = [(p["command"].split()[1:], p["probes"][0]["hits"], p["probes"][0]["vfork_hits"]) for p in report["processes"]]
    assert per == [(["1000"], 1000, 1000), (["1000", "exec"], 3000, 0)]


def test_vfork_child_events_are_not_the_parents(vforker, tmp_path):
    res, out = trace(tmp_path, ["--follow", "--json", "fc_work"], [vforker, 200], input="go\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "parent 200 child 0\n"
    events = _events(out)
    report = json.loads(out.strip().splitlines()[-1])
    parent, image = (p["pid"] for p in report["processes"])
    where = Counter((e["pid"], e["tid"], e["args"][0] // 1000) for e in events)
    # x < 1000: the parent's own; 1000..: the vfork child's, counted apart and not recorded;
    # 2000..: the exec'd program's, apart
    assert where == {(parent, parent, 0): 200, (image, image, 2): 600}
    assert image != parent
    assert [(p["hits"], p.get("vfork_hits")) for p in report["processes"][0]["probes"]] == [(200, 200)]


def test_posix_spawn_child_file_actions_count_apart(forkcount, tmp_path):
    """posix_spawn's child runs the file actions (dup2 here) in its parent's memory before its
    exec: they are counted apart (vfork_hits), not as the parent's; the spawned program is
    counted apart from its first instruction."""
    spawner = compile_c(TARGETS / "pspawn_dup.c", name="pspawn_dup")
    exe = tmp_path / "forkcount"
    exe.write_bytes(forkcount.read_bytes())
    exe.chmod(0o755)
    res = run(DJPROBE + ["count", "--follow", "--json", "libc:dup2", "forkcount:fc_work", "--", spawner, exe, 3])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == ["parent 14 children 0 bad 0", "spawned 0"]
    report = json.loads(lines[-1])
    per = [(p["command"], {q["site"].split(":")[1]: (q["hits"], q["vfork_hits"]) for q in p["probes"]})
           for p in report["processes"]]
    assert per == [(f"{spawner} {exe} 3", {"dup2": (0, 3)}), (f"{exe} 7 0", {"fc_work": (14, 0), "dup2": (0, 0)})]


def test_api_child_events_lossless(forkcount):
    """Rings of 64 events: a child's lossless probes wait for the tracer to drain its copies
    (ChildEvents writes the heartbeat there before the child runs; without it the child would
    drop all but the first ring's worth at once). The wait is 5 s here, not 0.5 s, so that a
    loaded machine descheduling the tracer does not make the probes give up."""
    import numpy as np

    from djprobe import spawn
    from djprobe.area import AreaLayout
    from djprobe.child_data import ChildEvents
    from djprobe.follow import follow_forks
    from djprobe.probes import Djprobe

    proc = spawn([str(forkcount), "100", "2", "10000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    readers: list[ChildEvents] = []
    got: dict[int, list] = defaultdict(list)
    try:
        proc.layout = AreaLayout(ring_slots=64)
        proc.wait_timeout = 5.0
        work = proc.register(Djprobe("fc_work", record=True, registers="args", lossless=True))
        children = follow_forks(proc, on_child=lambda child: readers.append(ChildEvents(child)))
        proc.start()
        popen.stdin.write(b"go\n")
        popen.stdin.close()
        while True:
            alive = popen.poll() is None
            children.poll()
            got[proc.pid].append(proc.read_events())
            for r in readers:
                got[r.pid].append(r.read(complete=not alive))
            if not alive:
                break
        assert popen.returncode == 0 and popen.stdout.read() == b"parent 200 children 2 bad 0\n"
        children.close()
        children.guard.close()
        proc.unregister(work)
        got[proc.pid].append(proc.read_events())
        assert (work.hits, work.missed) == (200, 0)
        assert [(s.hits, s.missed) for r in readers for s in r.child.sites()] == [(20000, 0), (20000, 0)]
        for r in readers:
            x = np.concatenate([b.register("rdi") for b in got[r.pid] if len(b)])
            assert sorted(x.tolist()) == sorted(list(range(10000)) + list(range(1, 10001)))
            assert all(b.site(0).endswith(":fc_work") for b in got[r.pid] if len(b))
        assert sum(r.waited_seconds for r in readers) > 0  # the children's probes did wait
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


def test_name_without_follow_keeps_to_the_processes_found(start_target, forkcount, tmp_path):
    import os

    comm = f"nx{os.getpid()}"
    exe = tmp_path / comm
    exe.write_bytes(forkcount.read_bytes())
    exe.chmod(0o755)
    first = start_target([exe, 10, 1, 10], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # waits for a line
    counter = subprocess.Popen(DJPROBE + ["count", "--json", "-d", "1.5", "--name", comm, "fc_work"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert counter.stderr.readline().startswith("Tracing 1 function in 1 process")
        later = start_target([exe, 10, 0], stdout=subprocess.PIPE)  # runs at once: 20 calls
        assert later.proc.wait(timeout=60) == 0
        out, err = counter.communicate(timeout=60)
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert [(p["pid"], p["probes"][0]["hits"]) for p in report["processes"]] == [(first.pid, 0)]
    assert "started later" not in err
