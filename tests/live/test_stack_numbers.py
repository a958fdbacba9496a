"""Numbers on a stack are not return addresses: the stack scan reads the words a thread may resume
at, and a 32-bit process's stack is full of words that read as addresses (its environment's text,
its counts and durations). Each case checks both sides: the number that is not a place to resume
no longer blocks, and the same number where a frame could resume there still does.

- The environment (above the main thread's initial stack pointer) is never read as frames: an
  environment variable that spells an address inside the displaced bytes lets the probe in; the
  same word held in a frame of the main thread still refuses it.
- ``djprobe cleanup`` after the tracer died unmaps an area whose code part holds a number where
  no stub was ever written; a word inside a written stub still keeps the area mapped."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest

import djprobe
from djprobe.errors import SiteBusyError
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)


def _build(bits: int):
    flags = ["-m32"] if bits == 32 else []
    try:
        return compile_c(TARGETS / "holds_number.c", *flags, name=f"holds_number{bits}")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc {' '.join(flags)} cannot build here: {exc}")


def _start(start_target, argv, env=None):
    t = start_target(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert t.proc.stdout.readline() == b"ready\n"
    return t


def _hold(t, number: int) -> None:
    t.proc.stdin.write(b"hold %x\n" % number)
    t.proc.stdin.flush()
    assert t.proc.stdout.readline() == b"held %x\n" % number


def _finish(t) -> int:
    t.proc.stdin.close()
    line = t.proc.stdout.readline()
    assert t.proc.wait(timeout=20) == 0
    assert line.startswith(b"calls "), line
    return int(line.split()[1])


def _inside(pid: int) -> int:
    """hn_work + 4: the boundary between the two instructions of its 32-bit entry window."""
    with Symbols.from_process(pid) as syms:
        return syms.resolve("hn_work")[0].address + 4


def test_environment_text_that_spells_an_address_does_not_block_a_probe(start_target):
    argv = ["setarch", "-R", str(_build(32))]  # no ASLR: the address learnt first holds in the second run
    t = _start(start_target, argv)
    word = _inside(t.pid)
    _finish(t)
    spelt = struct.pack("<I", word)
    if 0 in spelt:
        pytest.skip(f"hn_work+4 = {word:#x} has a zero byte: no environment string can spell it")
    env = {f"DJPROBE_TEST_WORD{i}".encode(): b"x" * i + spelt * 4 for i in range(4)}  # every alignment
    t = _start(start_target, argv, env=env)
    assert _inside(t.pid) == word
    with open(f"/proc/{t.pid}/environ", "rb") as f:
        assert spelt in f.read()
    with djprobe.attach(t.pid) as proc:
        djp = proc.register(djprobe.Djprobe("hn_work"))  # refused before: "holds 0x... on its stack"
        assert djp.mode == "jump"
        proc.unregister(djp)
        _hold(t, word)  # the same word in a frame of the main thread: a return address for all we know
        with pytest.raises(SiteBusyError, match=f"holds {word:#x} on its stack"):
            proc.register(djprobe.Djprobe("hn_work"))
    assert _finish(t) > 0


_TRACER = """
import time, djprobe
proc = djprobe.attach({pid})
djp = proc.register(djprobe.Djprobe("hn_work"))
while djp.hits == 0:
    time.sleep(0.01)
region, stub = djp._instance.region, djp._instance.stub
print(region.code_address, region.layout.code_size, stub.address, stub.end, flush=True)
time.sleep(60)
"""


def _probe_then_kill_tracer(pid: int) -> tuple[int, int, int, int]:
    """A tracer process places a probe at hn_work and dies by SIGKILL; its area's code part and
    the stub's extent."""
    tracer = subprocess.Popen([sys.executable, "-c", _TRACER.format(pid=pid)], stdout=subprocess.PIPE, text=True)
    try:
        code, size, stub, stub_end = map(int, tracer.stdout.readline().split())
    finally:
        tracer.kill()
        tracer.wait(timeout=10)
    return code, size, stub, stub_end


@pytest.mark.parametrize("where", ["unwritten", "stub"])
@pytest.mark.parametrize("bits", [64, 32])
def test_cleanup_tells_a_number_in_the_code_part_from_a_place_in_a_stub(start_target, bits, where):
    t = _start(start_target, [_build(bits)])
    code, size, stub, stub_end = _probe_then_kill_tracer(t.pid)
    assert code <= stub < stub_end < code + size - 64
    number = code + size - 64 if where == "unwritten" else stub + 1
    _hold(t, number)
    clean = subprocess.run([sys.executable, "-m", "djprobe", "cleanup", "-p", str(t.pid), "--json"],
                           capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr + clean.stdout
    report = json.loads(clean.stdout)
    assert report["ok"] and len(report["restored"]) == 1, report
    if where == "unwritten":  # a number where no stub was ever written: nothing can resume there
        assert report["left_mapped"] == [], report
    else:
        assert [a["reason"] for a in report["left_mapped"]] == [
            f"thread {t.pid} holds stub address {number:#x} on its stack (a signal frame or saved pointer)"
        ]
    assert _finish(t) > 0
