"""Children count apart: without --follow, a forked child never adds to its parent's figures
(the fork hook gives it fresh data parts) and runs correctly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from djprobe import spawn
from djprobe.forks import ForkGuard
from djprobe.probes import Djprobe
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module")
def forkcount():
    return compile_c(TARGETS / "forkcount.c", name="forkcount")


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_count_only_the_parent(forkcount, exec_child):
    argv = [forkcount, 1000, 3, 50000] + (["x"] if exec_child else [])
    res = run(DJPROBE + ["count", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 2000 children 3 bad 0"  # every child exited 0: no wrong result
    if exec_child:  # the exec'd child's own line (its image has no probes)
        assert lines[0] == "parent 100000 children 0 bad 0"
    hits = {p["site"].split(":")[1]: p["hits"] for p in json.loads(lines[-1])["probes"]}
    assert hits == {"fc_work": 2000}  # the children's 2 x 2 x 50,000 calls are theirs


def test_trace_records_only_the_parent(forkcount):
    res = run(DJPROBE + ["trace", "--json", "fc_work", "--", forkcount, 300, 2, 20000], input="go\n")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert len(events) == 600
    assert sorted(e["args"][0] for e in events) == sorted(list(range(300)) * 2)
    summary = json.loads(res.stdout.strip().splitlines()[-1])["summary"]
    assert [(s["hits"], s["dropped"]) for s in summary] == [(600, 0)]


def test_api_guard_counts_forks_and_areas_added_later_are_covered(forkcount):
    """The guard goes in first; the probe's area is created after it: the table of every area
    is kept, so the child still leaves the parent's counters alone."""
    proc = spawn([str(forkcount), "500", "2", "30000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    try:
        proc.layout = proc.layout.for_counting()
        guard = ForkGuard(proc)
        guard.install()
        before = len(proc._regions)
        work = proc.register(Djprobe("fc_work"))
        lib = proc.register(Djprobe("libc:pthread_create"))
        assert len(proc._regions) > before  # the probes' areas came after the guard's
        proc.start()
        popen.stdin.write(b"go\n")
        popen.stdin.close()
        assert popen.wait(timeout=60) == 0
        assert popen.stdout.read() == b"parent 1000 children 2 bad 0\n"
        assert work.hits == 1000
        assert lib.hits == 0  # only children create threads
        assert guard.forks == 2
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_follow_counts_each_child_apart(forkcount, exec_child):
    argv = [forkcount, 1000, 3, 50000] + (["x"] if exec_child else [])
    res = run(DJPROBE + ["count", "--follow", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 2000 children 3 bad 0"
    report = json.loads(lines[-1])
    processes = report["processes"]
    parent = processes[0]
    assert parent["command"] == " ".join(map(str, argv))
    assert [p["hits"] for p in parent["probes"]] == [2000]
    kids = processes[1:]
    per_child = [(k["command"], k["probes"][0]["hits"]) for k in kids]
    command = " ".join(map(str, argv))
    # each child: 2 threads x 50,000 calls. A child that exec's itself at once has called nothing
    # before; its new image ("forkcount 50000 0": 2 x 50,000 calls of its own) is probed from its
    # first instruction, under the same PID
    if exec_child:
        expected = [(command, 0), (f"{forkcount} 50000 0", 100000), (command, 100000), (command, 100000)]
        assert lines[0] == "parent 100000 children 0 bad 0"
        assert kids[0]["pid"] == kids[1]["pid"]
    else:
        expected = [(command, 100000)] * 3
        assert len({k["pid"] for k in kids}) == 3
    assert per_child == expected
    assert [p["hits"] for p in report["probes"]] == [2000 + sum(h for _, h in expected)]


def test_follow_text_marks_each_process(forkcount):
    res = run(DJPROBE + ["count", "-f", "fc_work", "--", forkcount, 10, 2, 1000], input="go\n")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "all 3 processes:" in out
    headers = [line for line in out.splitlines() if line.startswith("process ")]
    assert len(headers) == 3 and all(line.endswith(" 10 2 1000):") for line in headers)


def test_api_follow_forks_callback_and_child_figures(forkcount):
    from djprobe.follow import follow_forks

    proc = spawn([str(forkcount), "100", "2", "5000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    seen = []
    try:
        work = proc.register(Djprobe("fc_work"))
        children = follow_forks(proc, on_child=seen.append)
        proc.start()
        popen.stdin.write(b"go\n")
        popen.stdin.close()
        while popen.poll() is None:
            children.poll()
        children.poll()
        assert popen.returncode == 0 and popen.stdout.read() == b"parent 200 children 2 bad 0\n"
        assert work.hits == 200
        assert [c.parent for c in seen] == [proc.pid, proc.pid]
        assert [[s.hits for s in c.sites()] for c in seen] == [[10000], [10000]]
        children.close()
        children.guard.close()
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


FOLLOW_KILLER = """
import os, signal, subprocess, sys
from djprobe import spawn
from djprobe.follow import follow_forks
from djprobe.probes import Djprobe
exe, out = sys.argv[1:3]
proc = spawn([exe, "100", "1", "5000"], stdin=subprocess.PIPE, stdout=open(out, "w"))
proc.register(Djprobe("fc_work"))
children = follow_forks(proc)
view = children._hook_view()
proc.start()
print(proc.pid, flush=True)
proc.process.popen.stdin.write(b"go\\n")
proc.process.popen.stdin.close()
while children._seq(view) == 0:  # the child has announced itself: it waits for us now
    pass
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_tracer_killed_while_child_waits(forkcount, tmp_path):
    import os
    import signal as sig
    import time
    from pathlib import Path

    script = tmp_path / "killer.py"
    script.write_text(FOLLOW_KILLER)
    out = tmp_path / "out"
    tracer = subprocess.Popen([sys.executable, str(script), str(forkcount), str(out)], stdout=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -sig.SIGKILL
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the target did not go on after the tracer died"
            time.sleep(0.05)
        assert out.read_text() == "parent 200 children 1 bad 0\n"  # the child ran and exited 0
    finally:
        try:
            os.kill(pid, sig.SIGKILL)
        except ProcessLookupError:
            pass


def test_follow_posix_spawn_child_from_its_first_instruction(forkcount, tmp_path):
    spawner = compile_c(TARGETS / "pspawn.c", name="pspawn")
    exe = tmp_path / "forkcount"  # a module name the pattern can give before it is loaded
    exe.write_bytes(forkcount.read_bytes())
    exe.chmod(0o755)
    res = run(DJPROBE + ["count", "--follow", "--json", "forkcount:fc_work", "libc:printf", "--", spawner, exe])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == ["parent 14 children 0 bad 0", "spawned 0"]
    report = json.loads(lines[-1])
    per = [(p["command"], {q["site"].split(":")[1]: q["hits"] for q in p["probes"]}) for p in report["processes"]]
    assert per == [(f"{spawner} {exe}", {"printf": 1}), (f"{exe} 7 0", {"fc_work": 14, "printf": 1})]


EXEC_KILLER = """
import os, signal, struct, subprocess, sys, time
from djprobe import spawn
from djprobe.area import EXEC_SEQ
from djprobe.execs import ExecFollower
from djprobe.follow import follow_forks, mapping_address
from djprobe.probes import Djprobe
exe, out = sys.argv[1:3]
proc = spawn([exe, "100", "1", "5000", "x"], stdin=subprocess.PIPE, stdout=open(out, "w"))
proc.register(Djprobe("fc_work"))
execs = ExecFollower(lambda target: None)
watched = []

def on_child(child):
    index = execs.region_index(proc)
    execs.watch(child.views[index], mapping_address(child.maps[index]))
    watched.append(child.views[index])

children = follow_forks(proc, on_child=on_child)
execs.install(proc)
proc.start()
print(proc.pid, flush=True)
proc.process.popen.stdin.write(b"go\\n")
proc.process.popen.stdin.close()
while not any(struct.unpack_from("<I", v.buffer, EXEC_SEQ)[0] for v in watched):
    children.poll()  # take the child in; then it announces its exec and waits for us
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_tracer_killed_while_exec_waits(forkcount, tmp_path):
    import os
    import signal as sig
    import time
    from pathlib import Path

    script = tmp_path / "killer.py"
    script.write_text(EXEC_KILLER)
    out = tmp_path / "out"
    tracer = subprocess.Popen([sys.executable, str(script), str(forkcount), str(out)], stdout=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -sig.SIGKILL
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the target did not go on after the tracer died"
            time.sleep(0.05)
        # the child's exec went on (its new image ran), and the parent saw it exit 0
        assert out.read_text().splitlines() == ["parent 10000 children 0 bad 0", "parent 200 children 1 bad 0"]
    finally:
        try:
            os.kill(pid, sig.SIGKILL)
        except ProcessLookupError:
            pass
