"""--follow on 32-bit (i386) processes (issues 12 and 16): the i386 fork hook (``forks32.py``)
announces a child, gives it memfd data parts and waits, bounded, for the tracer; the i386 exec
hook (``execs32.py``) holds an exec until the tracer has seized the thread. ``forkcount.c`` built
``-m32`` (PIE and not): the parent calls fc_work 2 x N times, each child 2 x CHILD_CALLS from two
threads; with "x" the first child execs a program at once (itself, or the build of the other
architecture given after it). Without --follow: tests/live/test_i386_children.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from djprobe import spawn
from djprobe.arch import I386
from djprobe.probes import Djprobe

from ..conftest import TARGETS, compile_c
from .test_children import EXEC_KILLER, FOLLOW_KILLER

pytestmark = pytest.mark.timeout(240)
DJPROBE = [sys.executable, "-m", "djprobe"]


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def forkcount32(request):
    try:
        return compile_c(TARGETS / "forkcount.c", "-m32", *request.param, name="forkcount32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.fixture(scope="module")
def forkcount64():
    return compile_c(TARGETS / "forkcount.c", name="forkcount")


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"time_ns"')]


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_count_follow_32bit_children_apart(forkcount32, exec_child):
    argv = [forkcount32, 1000, 3, 50000] + (["x"] if exec_child else [])
    res = run(DJPROBE + ["count", "--follow", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    assert "not followed" not in res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 2000 children 3 bad 0"  # every child exited 0
    report = json.loads(lines[-1])
    command = " ".join(map(str, argv))
    per = [(p["command"], [q["hits"] for q in p["probes"]]) for p in report["processes"]]
    if exec_child:  # the first child execs at once: 0 calls before, then its image's 2 x 50,000
        assert lines[0] == "parent 100000 children 0 bad 0"
        assert per == [(command, [2000]), (command, [0]), (f"{forkcount32} 50000 0", [100000]),
                       (command, [100000]), (command, [100000])]
        pids = [p["pid"] for p in report["processes"]]
        assert pids[1] == pids[2] and len(set(pids)) == 4
    else:
        assert per == [(command, [2000])] + [(command, [100000])] * 3
        assert len({p["pid"] for p in report["processes"]}) == 4
    assert [p["hits"] for p in report["probes"]] == [2000 + 3 * 100000]


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_trace_follow_32bit_events_per_process(forkcount32, exec_child, tmp_path):
    """Every event under its process, with the cdecl argument it was called with, from the
    child's own threads; exact totals."""
    argv = [forkcount32, 300, 3, 2000] + (["x"] if exec_child else [])
    out = tmp_path / "trace.out"
    res = run(DJPROBE + ["trace", "-o", out, "--follow", "--json", "fc_work(long x)", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    events = _events(text)
    report = json.loads(text.strip().splitlines()[-1])
    by_pid: dict[int, list[int]] = defaultdict(list)
    for e in events:
        by_pid[e["pid"]].append(e["args"]["x"])
    pids = [p["pid"] for p in report["processes"]]
    assert sorted(by_pid[pids[0]]) == sorted(list(range(300)) * 2)
    threaded = sorted(list(range(2000)) + list(range(1, 2001)))  # two threads: x = i and i + 1
    kids = report["processes"][1:]
    if exec_child:
        assert kids[0]["pid"] == kids[1]["pid"]
        assert [sum(q["hits"] for q in k["probes"]) for k in kids] == [0, 4000, 4000, 4000]
        assert sorted(by_pid[kids[0]["pid"]]) == sorted(list(range(2000)) * 2)
        others = kids[2:]
    else:
        others = kids
    for k in others:
        assert sorted(by_pid[k["pid"]]) == threaded
        assert len({e["tid"] for e in events if e["pid"] == k["pid"]} - {k["pid"]}) == 2
    assert set(by_pid) == set(pids)
    assert len(events) == 600 + 3 * 4000
    assert [(s["hits"], s["delivered"], s["dropped"]) for s in report["summary"]] == [(12600, 12600, 0)]


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_latency_follow_32bit_per_process(forkcount32, exec_child):
    argv = [forkcount32, 300, 3, 2000] + (["x"] if exec_child else [])
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
    assert (total["calls"], total["returns"]) == (12600, 12600)
    assert total["total_ns"] == sum(f["total_ns"] for p in report["processes"] for f in p["probes"])


@pytest.mark.parametrize("direction", ["64-to-32", "32-to-64"])
def test_follow_exec_changes_architecture(forkcount32, forkcount64, direction, tmp_path):
    """A child execs a program of the other architecture: its new image is probed in its own
    mode (count: hits per process; trace: the argument from rdi or from [esp+4])."""
    first, other = (forkcount64, forkcount32) if direction == "64-to-32" else (forkcount32, forkcount64)
    argv = [first, 100, 2, 3000, "x", other]
    res = run(DJPROBE + ["count", "--follow", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "parent 6000 children 0 bad 0" and lines[-2] == "parent 200 children 2 bad 0"
    report = json.loads(lines[-1])
    command = " ".join(map(str, argv))
    per = [(p["command"], {q["site"]: q["hits"] for q in p["probes"]}) for p in report["processes"]]
    mine, theirs = f"{first.name}:fc_work", f"{other.name}:fc_work"
    assert per == [(command, {mine: 200}), (command, {mine: 0}), (f"{other} 3000 0", {theirs: 6000}),
                   (command, {mine: 6000})]
    assert {p["site"]: p["hits"] for p in report["probes"]} == {mine: 6200, theirs: 6000}

    out = tmp_path / "trace.out"
    res = run(DJPROBE + ["trace", "-o", out, "--follow", "--json", "fc_work(long x)", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    xs = defaultdict(list)
    for e in _events(out.read_text()):
        xs[(e["pid"], e["site"])].append(e["args"]["x"])
    image = [k for k in xs if k[1] == theirs]
    assert len(image) == 1 and sorted(xs[image[0]]) == sorted(list(range(3000)) * 2)
    assert sorted(len(v) for k, v in xs.items() if k[1] == mine) == [200, 6000]


def test_api_follow_forks_on_a_32bit_process(forkcount32):
    from djprobe.follow import follow_forks

    proc = spawn([str(forkcount32), "100", "2", "5000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    seen = []
    try:
        assert proc.process.arch is I386
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
        assert [c.parent for c in seen] == [proc.pid, proc.pid] and not children.missed
        assert [[s.hits for s in c.sites()] for c in seen] == [[10000], [10000]]
        assert children.guard.forks == 2
        children.close()
        children.guard.close()
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


def _wait_for_end(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the target did not go on after the tracer died"
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["fork", "exec"])
def test_tracer_killed_while_a_32bit_child_waits(forkcount32, where, tmp_path):
    """The tracer dies while a 32-bit child waits in the fork hook to be taken in, or in the
    exec hook for its exec to be seized: the child goes on after its bounded wait."""
    script = tmp_path / "killer.py"
    script.write_text(FOLLOW_KILLER if where == "fork" else EXEC_KILLER)
    out = tmp_path / "out"
    tracer = subprocess.Popen([sys.executable, str(script), str(forkcount32), str(out)], stdout=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -signal.SIGKILL
        _wait_for_end(pid, 30)
        if where == "fork":
            assert out.read_text() == "parent 200 children 1 bad 0\n"  # the child ran and exited 0
        else:  # the exec went on (its new image ran), and the parent saw it exit 0
            assert out.read_text().splitlines() == ["parent 10000 children 0 bad 0", "parent 200 children 1 bad 0"]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _build32(name: str, *flags: str) -> Path:
    try:
        return compile_c(TARGETS / f"{name}.c", "-m32", *flags, name=f"{name}32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


def test_follow_32bit_posix_spawn_and_vfork_children_from_their_exec(forkcount32, tmp_path):
    """A 32-bit posix_spawn or vfork child runs in its parent's memory until it execs (its calls
    before are counted apart, in the parent's vfork_hits: djprobe.vforks32); the
    exec hook in i386 code still holds its exec, so the program it runs is probed apart from its
    first instruction."""
    spawner = _build32("pspawn")
    exe = tmp_path / "forkcount"  # a module name the pattern can give before it is loaded
    exe.write_bytes(forkcount32.read_bytes())
    exe.chmod(0o755)
    res = run(DJPROBE + ["count", "--follow", "--json", "forkcount:fc_work", "libc:printf", "--", spawner, exe])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == ["parent 14 children 0 bad 0", "spawned 0"]
    per = [(p["command"], {q["site"].split(":")[1]: q["hits"] for q in p["probes"]})
           for p in json.loads(lines[-1])["processes"]]
    assert per == [(f"{spawner} {exe}", {"printf": 1}), (f"{exe} 7 0", {"fc_work": 14, "printf": 1})]

    vforker = _build32("vforker")
    res = run(DJPROBE + ["count", "--follow", "--json", "fc_work", "--", vforker, 1000], input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "parent 1000 child 0"
    per = [(p["command"].split()[1:], p["probes"][0]["hits"], p["probes"][0]["vfork_hits"])
           for p in json.loads(lines[-1])["processes"]]
    assert per == [(["1000"], 1000, 1000), (["1000", "exec"], 3000, 0)]  # the child's 1,000 before its exec: apart
