"""Issue 13 item 7: no /dev/shm/djprobe-* file outlives its tracer, and `cleanup --stale` removes
the ones a killed tracer could leave (named after their creator and target)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from djprobe import recovery, shmfiles
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(420)
DJPROBE = [sys.executable, "-m", "djprobe"]


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    return p.pid


def _ours(pids: set[int]) -> list[str]:
    return [f.path for f in shmfiles.area_files() if f.tracer_pid in pids]


def test_names_carry_target_and_tracer():
    path = shmfiles.new_area_path(1234)
    m = shmfiles.AREA_PATH_RE.match(path)
    assert m and int(m.group(1)) == 1234 and int(m.group(2)) == os.getpid()
    assert shmfiles.AREA_PATH_RE.match("/dev/shm/djprobe-1234-0a1b2c3d4e5f")  # earlier versions' names
    assert not shmfiles.AREA_PATH_RE.match("/dev/shm/djprobe-1234-forged")


def test_cleanup_stale_removes_only_files_whose_creator_is_gone():
    dead = _dead_pid()
    target = subprocess.Popen(["sleep", "60"])
    made = {
        "both_gone": shmfiles.new_area_path(_dead_pid(), tracer_pid=dead),
        "creator_gone": shmfiles.new_area_path(target.pid, tracer_pid=dead),
        "creator_alive": shmfiles.new_area_path(target.pid),  # this test process is the creator
        "old_target_gone": f"{shmfiles.SHM_DIR}/djprobe-{_dead_pid()}-00112233aabb",
        "old_target_alive": f"{shmfiles.SHM_DIR}/djprobe-{target.pid}-00112233aabc",
    }
    try:
        for path in made.values():
            with open(path, "xb") as f:
                f.truncate(4096)
        res = subprocess.run(DJPROBE + ["cleanup", "--stale", "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        removed = {r["path"]: r["state"] for r in report["removed"]}
        assert removed[made["both_gone"]] == "creator and target gone"
        assert removed[made["creator_gone"]] == "creator gone"
        assert removed[made["old_target_gone"]] == "target gone (no creator recorded)"
        left = {k for k, p in made.items() if os.path.exists(p)}
        assert left == {"creator_alive", "old_target_alive"}
        assert {r["path"] for r in report["in_use"]} >= {made["creator_alive"], made["old_target_alive"]}
    finally:
        target.kill()
        target.wait()
        for path in made.values():
            if os.path.exists(path):
                os.unlink(path)


def test_cleanup_without_pid_or_stale_is_an_error():
    res = subprocess.run(DJPROBE + ["cleanup"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--stale" in res.stderr and "Traceback" not in res.stderr


def test_tracer_sigkilled_at_random_moments_leaves_no_file():
    """25 `djprobe count -p` runs SIGKILLed at random moments of their start-up (attach, area
    creation, insertion): no area file of theirs survives `cleanup --stale`. Files left before it
    are only reported: a kill within the one injected `open` during which the name exists can
    leave one, which is what `--stale` is for."""
    exe = compile_c(TARGETS / "counts.c", name="counts")
    target = subprocess.Popen([str(exe), "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tracers: set[int] = set()
    before_stale: list[str] = []
    try:
        assert target.stdout.readline().startswith("ready")
        # How long a tracer takes to have its probes in (the banner), to spread the kills over.
        t0 = time.monotonic()
        cli = subprocess.Popen(DJPROBE + ["count", "-p", str(target.pid), "work_a"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cli.stderr.readline().startswith("Tracing")
        startup = time.monotonic() - t0
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
        rng = random.Random(7)
        deadline = time.monotonic() + 330
        for _ in range(25):
            assert time.monotonic() < deadline, "25 tries took too long"
            cli = subprocess.Popen(DJPROBE + ["count", "-p", str(target.pid), "work_a", "work_b"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tracers.add(cli.pid)
            time.sleep(rng.uniform(0.3, 1.2) * startup)
            cli.kill()
            cli.wait(timeout=30)
            # the target goes on; whatever the killed tracer left is undone (cleanup -p, in process)
            recovery.cleanup(target.pid, force=True)
            assert target.poll() is None
        before_stale = _ours(tracers)
        res = subprocess.run(DJPROBE + ["cleanup", "--stale"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert _ours(tracers) == []
        target.stdin.close()
        assert target.stdout.readline().split()[-1] == "0"  # bad results: none
        assert target.wait(timeout=20) == 0
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    # Reported, not required: files that existed before `cleanup --stale` ran.
    print(f"area files left before cleanup --stale: {len(before_stale)}")
