"""Pending probes: patterns naming a library that is loaded later (dlopen), unloaded (dlclose)
and loaded again; CPython extension modules; the tracer killed while a loading thread waits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from djprobe import spawn
from djprobe.pending import LibraryFollower
from djprobe.probes import Djprobe
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]
CALLS = 50000  # dlhost.c: per thread and round


@pytest.fixture(scope="module")
def plugin_host(tmp_path_factory):
    """(host executable, plug-in path named libdjplug.so as a user's library would be)."""
    lib = compile_c(TARGETS / "dlplug.c", "-shared", "-fPIC", name="dlplug")
    host = compile_c(TARGETS / "dlhost.c", name="dlhost")
    where = tmp_path_factory.mktemp("plug")
    plugin = where / "libdjplug.so"
    shutil.copy(lib, plugin)
    return host, plugin


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


def test_count_follows_dlopen_dlclose_and_reload(plugin_host):
    host, plugin = plugin_host
    rounds = 3
    res = run(
        DJPROBE + ["count", "--json", "libdjplug:plug_work", "libdjplug:plug_ctor_helper", "--", host, plugin],
        input="l\n" * rounds,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == f"rounds {rounds} calls {rounds * 2 * CALLS} bad 0 ctor {rounds}", res.stdout
    assert "pending (2 patterns" in res.stderr
    hits = {p["site"]: p["hits"] for p in json.loads(lines[-1])["probes"]}
    # one entry per site across the three loads; the constructor's call of each load is counted
    assert hits == {"libdjplug.so:plug_work": rounds * 2 * CALLS, "libdjplug.so:plug_ctor_helper": rounds}


def test_latency_follows_dlopen_dlclose_and_reload(plugin_host):
    """`latency` with a pattern naming a library loaded later: every load's calls add up under
    one function, each paired with its return."""
    host, plugin = plugin_host
    rounds = 3
    res = run(DJPROBE + ["latency", "--json", "libdjplug:plug_work", "--", host, plugin], input="l\n" * rounds)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == f"rounds {rounds} calls {rounds * 2 * CALLS} bad 0 ctor {rounds}", res.stdout
    assert "pending (1 pattern" in res.stderr
    report = json.loads(lines[-1])
    (f,) = report["functions"]
    assert f["site"] == "libdjplug.so:plug_work" and f["calls"] == rounds * 2 * CALLS
    assert f["returns"] <= f["calls"] and sum(b["count"] for b in f["hist"]) == f["returns"]
    assert f["returns"] >= f["calls"] * 0.99  # only collisions (counted) can lose a sample


def test_api_unload_forgets_probes_and_frees_stubs(plugin_host):
    host, plugin = plugin_host
    proc = spawn([str(host), str(plugin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    try:
        follower = LibraryFollower(
            proc, ["libdjplug:plug_work", "libdjplug:plug_ctor_helper"], [], lambda a, r: Djprobe(a)
        )
        assert follower.pending_patterns() == ["libdjplug:plug_work", "libdjplug:plug_ctor_helper"]
        follower.install()
        proc.start()
        assert popen.stdout.readline().startswith(b"ready")
        base = set(proc._instances)  # the loader hook only
        assert len(base) == 1
        for n in range(1, 3):
            popen.stdin.write(b"l\ns\n")
            popen.stdin.flush()
            deadline = time.monotonic() + 60
            line = ""
            while not line.startswith("stage"):
                follower.wait(0.05)  # the loads and unloads are handled while the host waits
                assert time.monotonic() < deadline
                if follower.loads >= n and follower.unloads >= n:
                    line = popen.stdout.readline().decode()
            assert line == f"stage {n}\n"
            follower.wait(0.01)
            sites = {s.site: s for s in follower.sites}
            assert sites["libdjplug.so:plug_work"].hits == n * 2 * CALLS
            assert sites["libdjplug.so:plug_ctor_helper"].hits == n
            assert sites["libdjplug.so:plug_work"].loads == n
            # the unloaded library's probes are gone from the target's registry
            assert set(proc._instances) == base
            assert not any(d.registered for s in sites.values() for d in s.probes)
        assert follower.pending_patterns() == ["libdjplug:plug_work", "libdjplug:plug_ctor_helper"]
        follower.close()
        popen.stdin.close()
        assert popen.wait(timeout=30) == 0
        assert popen.stdout.read().decode() == f"rounds 2 calls {4 * CALLS} bad 0 ctor 2\n"
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


def test_python_extension_modules_counted():
    script = textwrap.dedent(
        """
        import json, sqlite3
        c = sqlite3.connect(":memory:", isolation_level=None)
        c.execute("create table t(x)")
        for i in range(40):
            c.execute("insert into t values (?)", (i,))
        rows = c.execute("select x from t").fetchall()
        print(len(rows), json.loads(json.dumps([1, 2]))[1])
        """
    )
    res = run(
        DJPROBE + ["count", "--json", "libsqlite3:sqlite3_step", "_json:PyInit__json", "_json:scanner_call",
                   "--", sys.executable, "-c", script]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "40 2"
    hits = {p["site"].split(":")[1]: p["hits"] for p in json.loads(lines[-1])["probes"]}
    # sqlite runs statements of its own (the schema) through sqlite3_step too: gdb counts them
    assert hits == {"sqlite3_step": _gdb_count(script, "sqlite3_step"), "PyInit__json": 1, "scanner_call": 1}


def _gdb_count(script: str, function: str) -> int:
    """How often ``function`` is called while ``python -c script`` runs, by a gdb breakpoint."""
    if shutil.which("gdb") is None:
        pytest.skip("gdb is needed as the reference count")
    with tempfile.NamedTemporaryFile("w", suffix=".gdb") as commands:
        commands.write(f"set breakpoint pending on\nbreak {function}\ncommands 1\nsilent\ncontinue\nend\nrun\n"
                       "info breakpoints\n")  # fmt: skip
        commands.flush()
        argv = ["gdb", "-batch", "-nx", "-x", commands.name, "--args", sys.executable, "-c", script]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    hit = [line for line in res.stdout.splitlines() if "already hit" in line]
    assert hit, res.stdout + res.stderr
    return int(hit[0].split()[3])


KILLER = """
import os, signal, subprocess, sys
from djprobe import spawn
from djprobe.pending import LibraryFollower
from djprobe.probes import Djprobe
host, plugin, out = sys.argv[1:4]
proc = spawn([host, plugin], stdin=subprocess.PIPE, stdout=open(out, "w"))
follower = LibraryFollower(proc, ["libdjplug:plug_work"], [], lambda a, r: Djprobe(a))
follower.install()
proc.start()
popen = proc.process.popen
print(popen.pid, flush=True)
popen.stdin.write(b"l\\nl\\n")
popen.stdin.close()
while not follower.watch.wait(1.0):
    pass
os.kill(os.getpid(), signal.SIGKILL)  # a thread of the target waits in the loader hook now
"""


def test_tracer_killed_while_loading_thread_waits(plugin_host, tmp_path):
    host, plugin = plugin_host
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "host.out"
    tracer = subprocess.Popen([sys.executable, str(script), str(host), str(plugin), str(out)], stdout=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -signal.SIGKILL
        # the target is an orphan now: its output went to a pipe the tracer held; watch it end
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            assert time.monotonic() < deadline, "the target did not go on after the tracer died"
            assert "TracerPid:\t0" in Path(f"/proc/{pid}/status").read_text()
            time.sleep(0.05)
        lines = out.read_text().splitlines()
        assert lines[-1] == f"rounds 2 calls {4 * CALLS} bad 0 ctor 2", lines
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_trace_records_constructor_calls_of_each_load(plugin_host):
    host, plugin = plugin_host
    res = run(DJPROBE + ["trace", "--json", "libdjplug:plug_ctor_helper", "--", host, plugin], input="l\nl\n")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert [(e["site"], e["args"][0]) for e in events] == [("libdjplug.so:plug_ctor_helper", 41)] * 2
    summary = json.loads(res.stdout.strip().splitlines()[-1])["summary"]
    assert [(s["site"], s["hits"], s["dropped"]) for s in summary] == [("libdjplug.so:plug_ctor_helper", 2, 0)]


def test_attached_process_waits_for_a_library_with_pending_only(plugin_host, start_target):
    host, plugin = plugin_host
    t = start_target([host, plugin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline().startswith(b"ready")
    refused = run(DJPROBE + ["count", "-p", t.pid, "libdjplug:plug_work"])
    assert refused.returncode == 1 and "--pending waits for a library loaded later" in refused.stderr
    counter = subprocess.Popen(
        [str(a) for a in DJPROBE + ["count", "--json", "--pending", "-p", t.pid, "libdjplug:plug_work"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not counter.stderr.readline().startswith("pending"):
            assert counter.poll() is None, counter.stderr.read()
        t.proc.stdin.write(b"l\nl\n")
        t.proc.stdin.close()
        assert t.proc.wait(timeout=60) == 0
        out, err = counter.communicate(timeout=60)  # the process ended: the report is final
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    assert t.proc.stdout.read() == f"rounds 2 calls {4 * CALLS} bad 0 ctor 2\n".encode()
    hits = {p["site"]: p["hits"] for p in json.loads(out.strip().splitlines()[-1])["probes"]}
    assert hits == {"libdjplug.so:plug_work": 4 * CALLS}


def test_pending_pattern_keeps_its_prototype(plugin_host):
    """``lib:f(long x)`` naming a library loaded later: its probes are typed when it is loaded."""
    host, plugin = plugin_host
    res = run(DJPROBE + ["trace", "--json", "libdjplug:plug_ctor_helper(long x)", "--", host, plugin], input="l\nl\n")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert [(e["site"], e["args"]) for e in events] == [("libdjplug.so:plug_ctor_helper", {"x": 41})] * 2
