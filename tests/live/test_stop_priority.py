"""The tracer is not preempted while the target is stopped (djprobe.stop_priority): SCHED_FIFO
from the stop to the resume, its own policy before and after; nothing changes when turned off."""

from __future__ import annotations

import os
import time

import pytest

import djprobe
from djprobe.stop_priority import StopPriority
from tests.conftest import TARGETS, compile_c
from tests.live.test_probes import _start_loop

pytestmark = pytest.mark.timeout(120)


def _policy() -> int:
    return os.sched_getscheduler(0)


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


def test_raise_and_restore():
    before = _policy()
    assert before not in (os.SCHED_FIFO, os.SCHED_RR)
    p = StopPriority(enabled=True)
    if not p.raise_():
        pytest.skip("no right to SCHED_FIFO here")
    assert _policy() == os.SCHED_FIFO and os.sched_getparam(0).sched_priority == 1 and p.raised
    assert not p.raise_()  # once
    p.restore()
    assert _policy() == before and not p.raised
    p.restore()  # twice: nothing
    assert _policy() == before


def test_disabled_does_nothing():
    p = StopPriority(enabled=False)
    assert not p.raise_() and _policy() != os.SCHED_FIFO


def test_fifo_only_while_the_target_is_stopped(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    before = _policy()
    with djprobe.attach(t.pid) as proc:
        probe = StopPriority(enabled=True)
        if not probe.raise_():
            pytest.skip("no right to SCHED_FIFO here")
        probe.restore()
        with proc.stopped():
            assert _policy() == os.SCHED_FIFO
            with proc.stopped():  # nested: still stopped, still raised
                assert _policy() == os.SCHED_FIFO
            assert _policy() == os.SCHED_FIFO
        assert _policy() == before
        djp = proc.register(djprobe.Djprobe("work_a"))  # stops of its own: back after each
        assert _policy() == before
        time.sleep(0.2)
        assert djp.hits > 0
        proc.stop_priority.enabled = False
        with proc.stopped():
            assert _policy() == before
        proc.unregister(djp)
    assert _policy() == before
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"
