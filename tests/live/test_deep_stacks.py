"""Issue 9, item 3: a thread's resume point deep in its stack (or on another stack) is seen.

The target (targets/deepstack.c) has a spinner thread looping through an asm site of short
instructions. On command its SIGUSR1 handler rewrites the interrupted rip saved in its signal
frame (to an instruction boundary strictly inside the site's displaced bytes, or to an address
inside a stub), pushes its frame far from rsp (``alloca`` of 128 KiB, touched) and blocks. The
frame is then beyond the 64 KiB that used to be scanned: a probe inserted there would put a
jump under the thread's resume point, and a stub freed there would be unmapped under it.

Variants: the handler on the thread's own stack; on an alternate signal stack (1 MiB, mmap'd);
and nested, where the handler that rewrote rip runs on the thread's stack and a second signal's
handler blocks on the alternate stack, so that no register of the thread points into the stack
that holds the resume point (only the second signal frame's saved rsp does).
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import djprobe
from djprobe.recovery import cleanup
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)

DEEP = 128 * 1024
SHALLOW = 16 * 1024


@pytest.fixture(scope="module")
def deep_exe():
    return compile_c(TARGETS / "deepstack.c", name="deepstack")


class Deep:
    """The deepstack target: commands on stdin, answers on stdout."""

    def __init__(self, start_target, exe) -> None:
        self.t = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        words = self.t.proc.stdout.readline().split()
        assert words and words[0] == "ready", words
        self.pid = self.t.pid
        self.spinner = int(words[2])
        self.site = int(words[4], 16)
        self.resume_at = int(words[5], 16)

    def ask(self, line: str) -> str:
        self.t.proc.stdin.write(line + "\n")
        self.t.proc.stdin.flush()
        return self.t.proc.stdout.readline().strip()

    def set_resume(self, address: int) -> None:
        """Where the handler makes the spinner resume (written from outside: on no stack)."""
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(self.resume_at)
            mem.write(address.to_bytes(8, "little"))

    def block(self, mode: str, depth: int) -> None:
        assert self.ask(f"go {mode} {depth}") == "blocked"

    def release_and_finish(self) -> None:
        """The handler returns where it was told; the spinner must go on and finish right."""
        answer = self.ask("release")
        assert answer.startswith("released "), f"target died: {answer!r}, status {self.t.proc.poll()}"
        answer = self.ask("finish")
        assert answer.startswith("done "), f"target died: {answer!r}, status {self.t.proc.poll()}"
        assert self.t.proc.wait(timeout=10) == 0

    def code_mapped(self, address: int) -> bool:
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                span, perms = line.split()[:2]
                start, end = (int(x, 16) for x in span.split("-"))
                if start <= address < end:
                    return perms.startswith("r-x")
        return False


CASES = [("normal", DEEP), ("alt", DEEP), ("nested", SHALLOW), ("normal", SHALLOW)]
IDS = ["128KiB", "altstack-128KiB", "nested-altstack", "16KiB"]


@pytest.mark.parametrize("mode,depth", CASES, ids=IDS)
def test_insertion_refused_while_a_signal_frame_resumes_inside(start_target, deep_exe, mode, depth):
    t = Deep(start_target, deep_exe)
    with djprobe.attach(t.pid) as proc:
        analysis = proc.analyse(djprobe.Djprobe(t.site))
        assert analysis.ok and analysis.size == 8, analysis
        inside = analysis.displaced[1].address
        assert t.site < inside < t.site + analysis.size
        t.set_resume(inside)
        t.block(mode, depth)
        with pytest.raises(djprobe.SiteBusyError) as info:
            proc.register(djprobe.Djprobe(t.site))
        assert info.value.errno == errno.EBUSY
        assert f"thread {t.spinner} holds {inside:#x}" in str(info.value)
        assert proc.read(t.site, analysis.size) == analysis.original
    t.release_and_finish()


def test_insertion_goes_in_once_the_handler_returned(start_target, deep_exe):
    """Refused is "try again later": after the handler returned, the same probe goes in."""
    t = Deep(start_target, deep_exe)
    with djprobe.attach(t.pid) as proc:
        analysis = proc.analyse(djprobe.Djprobe(t.site))
        t.set_resume(analysis.displaced[1].address)
        t.block("normal", DEEP)
        with pytest.raises(djprobe.SiteBusyError):
            proc.register(djprobe.Djprobe(t.site))
        assert t.ask("release").startswith("released ")
        djp = proc.register(djprobe.Djprobe(t.site))
        deadline = time.monotonic() + 10
        while djp.hits < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert djp.hits >= 1000
    answer = t.ask("finish")
    assert answer.startswith("done "), answer
    assert t.t.proc.wait(timeout=10) == 0


REMOVAL = [("normal", DEEP), ("alt", DEEP), ("nested", SHALLOW)]
REMOVAL_IDS = ["128KiB", "altstack-128KiB", "nested-altstack"]


@pytest.mark.parametrize("mode,depth", REMOVAL, ids=REMOVAL_IDS)
def test_removal_keeps_a_stub_a_signal_frame_resumes_into(start_target, deep_exe, mode, depth):
    t = Deep(start_target, deep_exe)
    proc = djprobe.attach(t.pid)
    try:
        djp = proc.register(djprobe.Djprobe(t.site))
        original = djp._instance.original
        stub = djp._instance.stub
        into = stub.address + stub.action_size  # the relocated displaced instructions
        deadline = time.monotonic() + 10
        while djp.hits == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert djp.hits > 0
        t.set_resume(into)
        t.block(mode, depth)
        proc.unregister(djp)
        assert proc.read(t.site, len(original)) == original
    finally:
        proc.close()
    assert t.code_mapped(into), "the stub's area was unmapped under a thread that returns into it"
    t.release_and_finish()


def test_cleanup_keeps_a_stub_a_signal_frame_resumes_into(start_target, deep_exe):
    """``djprobe cleanup`` after the tracer died: jumps removed, the area stays while a signal
    frame deep on the alternate stack resumes into a stub."""
    t = Deep(start_target, deep_exe)
    script = textwrap.dedent(
        f"""
        import time, djprobe
        proc = djprobe.attach({t.pid})
        djp = proc.register(djprobe.Djprobe({t.site}))
        while djp.hits == 0:
            time.sleep(0.01)
        stub = djp._instance.stub
        print(stub.address + stub.action_size, flush=True)
        time.sleep(60)
        """
    )
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        into = int(tracer.stdout.readline())
        t.set_resume(into)
        t.block("alt", DEEP)
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    report = cleanup(t.pid)
    assert len(report.restored) == 1 and not report.unmapped
    assert [why for _, why in report.left_mapped] == [
        f"thread {t.spinner} holds stub address {into:#x} on its stack (a signal frame or saved pointer)"
    ]
    assert t.code_mapped(into)
    t.release_and_finish()
