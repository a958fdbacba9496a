"""The fault-injection hook (djprobe._sys.faults): counting, the operation log, the kill before
the Nth operation, and the hooks in the system layer. Each case runs in a child Python process
(the module reads its environment once, at import)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from djprobe._sys import faults

pytestmark = pytest.mark.timeout(60)


def run_child(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with ``env`` added (and both fault variables removed
    unless given)."""
    full = {k: v for k, v in os.environ.items() if k not in (faults.KILL_VAR, faults.COUNT_VAR, faults.KIND_VAR)}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


TICKS = """
    from djprobe._sys import faults
    print("enabled", faults.enabled, flush=True)
    for i in range(1, 6):
        faults.tick("ptrace", 12, 1000 + i)
        print("done", i, flush=True)
"""


def test_disabled_without_variables(tmp_path):
    res = run_child(TICKS.replace('faults.tick("ptrace", 12, 1000 + i)', "pass"), {}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "enabled False"


def test_count_writes_log_at_exit(tmp_path):
    log = tmp_path / "ops"
    res = run_child(TICKS, {faults.COUNT_VAR: str(log)}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["enabled True"] + [f"done {i}" for i in range(1, 6)]
    count, whats = faults.read_log(str(log))
    assert count == 5
    assert whats == [f"ptrace GETREGS {1000 + i}" for i in range(1, 6)]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_kill_before_nth_operation(tmp_path, n):
    log = tmp_path / "ops"
    res = run_child(TICKS, {faults.KILL_VAR: str(n), faults.COUNT_VAR: str(log)}, tmp_path)
    assert res.returncode == -signal.SIGKILL
    # operations 1..n-1 were made, the nth was not
    assert res.stdout.splitlines() == ["enabled True"] + [f"done {i}" for i in range(1, n)]
    count, whats = faults.read_log(str(log))
    assert count == n and len(whats) == n and whats[-1] == f"ptrace GETREGS {1000 + n}"


MIXED = """
    from djprobe._sys import faults
    for i in range(1, 5):
        faults.tick("mem-read", 0x1000 * i, 8)
        faults.tick("mem-write", 0x1000 * i, 5)
        print("done", i, flush=True)
"""


def test_only_one_kind_counts(tmp_path):
    """With DJPROBE_KILL_KIND, the other operations neither count nor are logged: the 3rd write
    is killed, after the 3rd read."""
    log = tmp_path / "ops"
    env = {faults.KILL_VAR: "3", faults.COUNT_VAR: str(log), faults.KIND_VAR: "mem-write"}
    res = run_child(MIXED, env, tmp_path)
    assert res.returncode == -signal.SIGKILL
    assert res.stdout.splitlines() == ["done 1", "done 2"]
    count, whats = faults.read_log(str(log))
    assert count == 3 and whats == ["mem-write 0x1000+5", "mem-write 0x2000+5", "mem-write 0x3000+5"]


def test_kill_point_beyond_the_run(tmp_path):
    res = run_child(TICKS, {faults.KILL_VAR: "6"}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "done 5"


def test_bad_kill_value_is_refused(tmp_path):
    res = run_child(TICKS, {faults.KILL_VAR: "three"}, tmp_path)
    assert res.returncode == 1 and "DJPROBE_KILL_AT_OP must be an integer" in res.stderr


def test_forked_child_neither_counts_nor_dies(tmp_path):
    log = tmp_path / "ops"
    code = """
        import os
        from djprobe._sys import faults
        faults.tick("ptrace", 16, 1)
        pid = os.fork()
        if pid == 0:
            faults.tick("ptrace", 0, 0)  # would be op 2: the kill point, were it counted
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
    """
    res = run_child(code, {faults.KILL_VAR: "2", faults.COUNT_VAR: str(log)}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["child", "7"]
    assert faults.read_log(str(log)) == (1, ["ptrace ATTACH 1"])


def test_system_layer_operations_are_hooked(tmp_path):
    """A real ptrace request, signal and /proc/PID/mem read and write each tick once, before the
    operation (a kill at the write leaves the byte unwritten)."""
    log = tmp_path / "ops"
    code = """
        import ctypes, os, signal, threading
        from djprobe._sys import ptrace as pt
        from djprobe._sys.procfs import ProcessMemory
        buf = ctypes.create_string_buffer(b"abcd")
        addr = ctypes.addressof(buf)
        try:
            pt.ptrace(pt.PTRACE_PEEKDATA, 1, 0, 0)    # not our tracee: fails, still counted
        except OSError:
            pass
        pt.tgkill(os.getpid(), threading.get_native_id(), 0)
        with ProcessMemory(os.getpid()) as mem:
            assert mem.read(addr, 4) == b"abcd"
            print("read", flush=True)
            mem.write(addr, b"W")
            print("wrote", buf.raw[:4], flush=True)
    """
    res = run_child(code, {faults.COUNT_VAR: str(log)}, tmp_path)
    assert res.returncode == 0, res.stderr
    count, whats = faults.read_log(str(log))
    assert count == 4
    assert whats[0] == "ptrace PEEKDATA 1"
    assert whats[1].startswith("tgkill ") and whats[1].endswith(" 0")
    assert whats[2].startswith("mem-read 0x") and whats[2].endswith("+4")
    assert whats[3].startswith("mem-write 0x") and whats[3].endswith("+1")
    res = run_child(code, {faults.KILL_VAR: "4"}, tmp_path)
    assert res.returncode == -signal.SIGKILL
    assert res.stdout.splitlines() == ["read"]


def test_configure_in_process():
    """configure() resets the counter; describe() names ptrace requests and memory ranges."""
    saved = (faults.kill_at, faults.count_path, faults.count, list(faults.log), faults.enabled)
    try:
        faults.configure(0, "/nonexistent/never-written")
        faults.tick("ptrace", 0x4206, 42)
        faults.tick("mem-write", 0x1000, 5)
        assert faults.count == 2 and faults.log == ["ptrace SEIZE 42", "mem-write 0x1000+5"]
        faults.configure(0, None)
        assert not faults.enabled and faults.count == 0 and faults.log == []
        with pytest.raises(ValueError):
            faults.configure(-1)
    finally:
        faults.kill_at, faults.count_path, faults.count, faults.enabled = saved[0], saved[1], saved[2], saved[4]
        faults.log[:] = saved[3]


def test_kill_happens_even_if_the_log_cannot_be_written(tmp_path):
    res = run_child(TICKS, {faults.KILL_VAR: "2", faults.COUNT_VAR: str(tmp_path / "gone" / "ops")}, tmp_path)
    assert res.returncode == -signal.SIGKILL
    assert res.stdout.splitlines() == ["enabled True", "done 1"]
