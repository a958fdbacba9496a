"""Children of 32-bit (i386) processes count apart (issues 12 and 16): the fork hook of the 32-bit
libc (``forks32.py``) gives a forked child fresh data parts, so its hits never add to its
parent's figures and it runs correctly (``forkcount.c`` built ``-m32``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from djprobe import spawn
from djprobe.arch import I386
from djprobe.forks import ForkGuard
from djprobe.probes import Djprobe

from ..conftest import TARGETS, compile_c
from .test_children import run

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def forkcount32(request):
    try:
        return compile_c(TARGETS / "forkcount.c", "-m32", *request.param, name="forkcount32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.mark.parametrize("exec_child", [False, True], ids=["fork", "fork-and-exec"])
def test_count_only_the_32bit_parent(forkcount32, exec_child):
    argv = [forkcount32, 1000, 3, 50000] + (["x"] if exec_child else [])
    res = run(DJPROBE + ["count", "--json", "fc_work", "--"] + argv, input="go\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "parent 2000 children 3 bad 0"  # every child exited 0: no wrong result
    if exec_child:
        assert lines[0] == "parent 100000 children 0 bad 0"
    assert "children forked" not in res.stderr  # the hook went in: no notice that they would add
    hits = {p["site"].split(":")[1]: p["hits"] for p in json.loads(lines[-1])["probes"]}
    assert hits == {"fc_work": 2000}  # the children's 2 x 2 x 50,000 calls are theirs


def test_trace_records_only_the_32bit_parent(forkcount32):
    res = run(DJPROBE + ["trace", "--json", "fc_work(long x)", "--", forkcount32, 300, 2, 20000], input="go\n")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert sorted(e["args"]["x"] for e in events) == sorted(list(range(300)) * 2)
    summary = json.loads(res.stdout.strip().splitlines()[-1])["summary"]
    assert [(s["hits"], s["dropped"]) for s in summary] == [(600, 0)]


def test_api_32bit_guard_counts_forks_and_covers_areas_added_later(forkcount32):
    proc = spawn([str(forkcount32), "500", "2", "30000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    popen = proc.process.popen
    try:
        assert proc.process.arch is I386
        # two slots an area: the guard's and fc_work's share one, pthread_create takes a new one
        # (a 32-bit jump reaches every address: one area would otherwise serve them all)
        proc.layout = dataclasses.replace(proc.layout.for_counting(), max_instances=2)
        guard = ForkGuard(proc)
        guard.install()
        assert guard.hook.mode == "jump" and b"\xcd\x80" in guard.hook._instance.stub.code
        before = len(proc._regions)
        work = proc.register(Djprobe("fc_work"))
        lib = proc.register(Djprobe("libc:pthread_create"))
        assert len(proc._regions) > before  # pthread_create's area came after the guard's
        assert lib._instance.region is not guard.hook._instance.region
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
