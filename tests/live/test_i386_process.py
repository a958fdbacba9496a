"""32-bit (i386) processes under the 64-bit tracer's process layer: spawn to the entry point
(8-byte auxv entries), attach, and system calls injected with the 32-bit trampoline (``int 0x80``,
i386 numbers, mmap2 below 4 GiB), including the tracer killed at each of their steps.

Probing them is not done yet (no 32-bit stubs): ``djprobe.attach`` still refuses them
(tests/live/test_target_life.py); the process layer takes them with ``arches=PROCESS_ARCHES``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from djprobe.arch import I386, PROCESS_ARCHES
from djprobe.process import Process

from ..conftest import TARGETS, compile_c

EXPECTED = None


def _build(*flags: str):
    try:
        return compile_c(TARGETS / "i386.c", "-m32", *flags, name="i386")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def target32(request):
    return _build(*request.param)


def _reference(exe, threads: int, n: int) -> str:
    return subprocess.run([exe, "run", str(threads), str(n)], capture_output=True, text=True, timeout=60, check=True).stdout


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    return ""


def _wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_spawn_and_inject_in_a_32bit_process(target32):
    want = _reference(target32, 3, 2000)
    p = Process.spawn([str(target32), "run", "3", "2000"], stdout=subprocess.PIPE, arches=PROCESS_ARCHES)
    try:
        assert p.arch is I386
        p.stop()
        assert p.syscall(I386.syscalls["getpid"]) == p.pid
        addr = p.mmap(0, 8192, 3, 0x22)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        assert 0 < addr < 1 << 32 and addr % 4096 == 0
        assert any(m.start == addr for m in p.maps())
        p.write(addr, b"i386!")
        assert p.read(addr, 5) == b"i386!"
        p.munmap(addr, 8192)
        assert not any(m.start <= addr < m.end for m in p.maps())
        fd = p.open_file("/proc/self/status", os.O_RDONLY)
        assert os.readlink(f"/proc/{p.pid}/fd/{fd}") == f"/proc/{p.pid}/status"
        p.close_fd(fd)
        p.resume()
        out, _ = p.popen.communicate(timeout=60)
        assert out.decode() == want and p.popen.returncode == 0
    finally:
        p.close()
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait(10)


def test_attach_inject_while_blocked_in_read(target32, start_target):
    """The main thread is inside an interrupted read (restartable): after the injected calls it
    restarts the read as the kernel would, and the program's output is unchanged."""
    want = _reference(target32, 2, 1000)
    t = start_target([target32, "wait", "2", "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == f"ready {t.pid}\n".encode()
    _wait_until(lambda: _status_field(t.pid, "State") == "S", "the read")
    blocked = _status_field(t.pid, "SigBlk")
    p = Process(t.pid, arches=PROCESS_ARCHES)
    try:
        p.stop()
        for _ in range(3):
            addr = p.mmap(0, 4096, 3, 0x22)
            assert addr < 1 << 32
            p.munmap(addr, 4096)
        p.resume()
    finally:
        p.close()
    assert _status_field(t.pid, "TracerPid") == "0" and _status_field(t.pid, "SigBlk") == blocked
    t.proc.stdin.write(b"go\n")
    t.proc.stdin.flush()
    out, _ = t.proc.communicate(timeout=60)
    assert out.decode() == want + "done\n" and t.proc.returncode == 0


_KILL_DURING_INJECTION = r"""
import os, signal, sys
from djprobe._sys import ptrace as pt
from djprobe.arch import PROCESS_ARCHES
from djprobe.process import Process
pid, kill_at = int(sys.argv[1]), int(sys.argv[2])
p = Process(pid, arches=PROCESS_ARCHES)
p.stop()
real, count = pt.ptrace, [0]
def counting(*args):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
pt.ptrace = counting
print(p.mmap(0, 4096, 3, 0x22), flush=True)
print("ops", count[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_tracer_killed_at_every_step_of_a_32bit_injected_call(target32, start_target):
    """The tracer dies before each ptrace request of an injected mmap2 (and after the last): the
    32-bit thread, blocked in read, restores itself from the frame with the 32-bit trampoline
    (registers, flags, mask) and restarts its read; the program ends with its normal output."""
    want = _reference(target32, 2, 1000)
    t = start_target([target32, "wait", "2", "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == f"ready {t.pid}\n".encode()
    _wait_until(lambda: _status_field(t.pid, "State") == "S", "the read")
    blocked = _status_field(t.pid, "SigBlk")
    completed = 0
    for kill_at in range(1, 40):
        res = subprocess.run([sys.executable, "-c", _KILL_DURING_INJECTION, str(t.pid), str(kill_at)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == -signal.SIGKILL, res.stderr
        if "ops" in res.stdout:
            completed += 1
        _wait_until(lambda: _status_field(t.pid, "TracerPid") == "0", "detach")
        _wait_until(lambda: _status_field(t.pid, "State") == "S", "the read again")
        assert _status_field(t.pid, "SigBlk") == blocked
        if completed == 2:
            break
    assert completed == 2 and kill_at >= 8, kill_at
    t.proc.stdin.write(b"go\n")
    t.proc.stdin.flush()
    out, _ = t.proc.communicate(timeout=60)
    assert out.decode() == want + "done\n" and t.proc.returncode == 0
