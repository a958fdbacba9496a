"""Pending probes in 32-bit (i386) processes (issues 12 and 16): a ``gcc -m32`` host dlopen()s a
``-m32`` shared library after start-up from two threads, dlclose()s it and loads it again; the
32-bit loader hook (``loader32.py``) holds the loading thread until the probes are placed, so the
library's constructor is counted too. Exact counts; the tracer killed while a thread waits in the
hook leaves the target going on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from djprobe import spawn
from djprobe.arch import I386
from djprobe.pending import LibraryFollower
from djprobe.probes import Djprobe

from ..conftest import TARGETS, compile_c
from .test_pending import CALLS, KILLER, _state, run

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def plugin_host32(request, tmp_path_factory):
    """(32-bit host executable, 32-bit plug-in named libdjplug.so)."""
    try:
        lib = compile_c(TARGETS / "dlplug.c", "-m32", "-shared", "-fPIC", name="dlplug32")
        host = compile_c(TARGETS / "dlhost.c", "-m32", *request.param, name="dlhost32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")
    where = tmp_path_factory.mktemp("plug32")
    plugin = where / "libdjplug.so"
    shutil.copy(lib, plugin)
    return host, plugin


def test_count_follows_dlopen_dlclose_and_reload_32bit(plugin_host32):
    host, plugin = plugin_host32
    rounds = 3
    res = run(
        DJPROBE + ["count", "--json", "libdjplug:plug_work", "libdjplug:plug_ctor_helper", "--", host, plugin],
        input="l\n" * rounds,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == f"rounds {rounds} calls {rounds * 2 * CALLS} bad 0 ctor {rounds}", res.stdout
    assert "pending (2 patterns" in res.stderr
    report = json.loads(lines[-1])
    hits = {p["site"]: (p["hits"], p["mode"]) for p in report["probes"]}
    # one entry per site across the loads; the constructor's call of each load is counted
    assert hits == {"libdjplug.so:plug_work": (rounds * 2 * CALLS, "jump"), "libdjplug.so:plug_ctor_helper": (rounds, "jump")}
    assert report["refused"] == []


def test_api_loader_hook_is_a_32bit_jump_and_unloads_forget_probes(plugin_host32):
    host, plugin = plugin_host32
    proc = spawn([str(host), str(plugin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    try:
        assert proc.process.arch is I386
        follower = LibraryFollower(
            proc, ["libdjplug:plug_work", "libdjplug:plug_ctor_helper"], [], lambda a, r: Djprobe(a)
        )
        follower.install()
        hook = follower.watch.hook
        assert hook.mode == "jump" and hook.address < 1 << 32
        # the 32-bit _dl_debug_state is a lone ret: the jump covers the filler after it
        assert hook.analysis.padding and hook._instance.stub.code.count(b"\xcd\x80") == 2  # wake, wait
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
                follower.wait(0.05)
                assert time.monotonic() < deadline
                if follower.loads >= n and follower.unloads >= n:
                    line = popen.stdout.readline().decode()
            assert line == f"stage {n}\n"
            follower.wait(0.01)
            sites = {s.site: s for s in follower.sites}
            assert sites["libdjplug.so:plug_work"].hits == n * 2 * CALLS
            assert sites["libdjplug.so:plug_ctor_helper"].hits == n
            assert set(proc._instances) == base
            assert not any(d.registered for s in sites.values() for d in s.probes)
        # every dlopen/dlclose reaches _dl_debug_state twice (RT_ADD/RT_DELETE, RT_CONSISTENT)
        assert hook.hits >= 8
        follower.close()
        popen.stdin.close()
        assert popen.wait(timeout=30) == 0
        assert popen.stdout.read().decode() == f"rounds 2 calls {4 * CALLS} bad 0 ctor 2\n"
    finally:
        if popen.poll() is None:
            popen.kill()
        proc.close()
        popen.wait(timeout=10)


def test_tracer_killed_while_32bit_loading_thread_waits(plugin_host32, tmp_path):
    """The tracer dies while a thread of the 32-bit target waits in the hook: the stub sees the
    heartbeat go stale and lets the thread go on; the target finishes its rounds."""
    host, plugin = plugin_host32
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "host.out"
    tracer = subprocess.Popen([sys.executable, str(script), str(host), str(plugin), str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ})
    pid = int(tracer.stdout.readline())
    try:
        assert tracer.wait(timeout=60) == -signal.SIGKILL
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


def test_trace_records_constructor_calls_of_each_load_32bit(plugin_host32):
    host, plugin = plugin_host32
    res = run(DJPROBE + ["trace", "--json", "libdjplug:plug_ctor_helper(long x)", "--", host, plugin], input="l\nl\n")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert [(e["site"], e["args"]) for e in events] == [("libdjplug.so:plug_ctor_helper", {"x": 41})] * 2
