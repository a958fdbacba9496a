"""Events and handlers: records with registers, rings, the Python consumer."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

import djprobe
from djprobe.area import AreaLayout
from djprobe.events import EventBatch
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def args_exe():
    return compile_c(TARGETS / "args.c", name="args")


def _spawn_with(argv, probes_factory, layout=None, status=0):
    """Spawn argv, register the probes, run to the end; return (proc, probes, batches, stdout)."""
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(a) for a in argv], stdout=write_fd)
    os.close(write_fd)
    if layout is not None:
        proc.layout = layout
    probes = probes_factory(proc)
    proc.start()
    batches = list(proc.events(timeout=60))
    with os.fdopen(read_fd) as out:
        output = out.read()
    assert proc.process.popen.wait(timeout=30) == status
    batches.append(proc.read_events())
    return proc, probes, batches, output


def test_every_event_with_right_arguments_order_and_tids(args_exe):
    n = 5000
    big = AreaLayout(ring_count=1, ring_slots=32768)  # all of a burst fits: nothing dropped
    proc, (djp,), batches, out = _spawn_with(
        [args_exe, n], lambda p: [p.register(djprobe.Djprobe("f", record=True))], layout=big
    )
    with proc:
        ev = np.concatenate([b.events for b in batches])
        assert djp.hits == 3 * n and djp.missed == 0
        assert len(ev) == 3 * n
        args = ev["regs"][:, [8, 9, 12, 13, 7, 6]]  # rdi rsi rdx rcx r8 r9
        i = args[:, 0].astype(np.int64) % 1000000
        thread = args[:, 0].astype(np.int64) // 1000000
        for k, mult in enumerate([2, 3, 4, 5, 6], start=1):
            assert np.array_equal(args[:, k].astype(np.int64), mult * i)
        tids = {int(line.split()[1]) for line in out.splitlines() if line.startswith("tid")}
        assert set(np.unique(ev["tid"]).tolist()) == tids
        for t in range(3):
            mine = ev[thread == t]
            assert np.array_equal(np.sort(i[thread == t]), np.arange(n))
            assert np.array_equal(i[thread == t], np.arange(n)), "per-thread order"
            assert np.all(np.diff(mine["time_ns"]) >= 0), "monotonic timestamps"
            assert len(np.unique(mine["tid"])) == 1


def test_handler_sees_seed_regs(args_exe):
    seen = []

    def handler(djp, regs):
        seen.append((djp.address, regs.arg0, regs.arg1, regs.arg5, regs.rdi, regs.tid, regs.time_ns))

    proc, (djp,), batches, out = _spawn_with(
        [args_exe, 200], lambda p: [p.register(djprobe.Djprobe("f", handler=handler))]
    )
    with proc:
        proc.poll(0)
        # events() above consumed the batches without dispatch: dispatch them now
        for b in batches:
            proc._dispatch(b)
        assert len(seen) == 600
        for address, a0, a1, a5, rdi, tid, t in seen:
            assert address == djp.address
            assert a0 == rdi and a1 == 2 * (a0 % 1000000) and a5 == 6 * (a0 % 1000000)
            assert tid > 0 and t > 0


def test_raising_handler_is_reported_and_tracing_goes_on(args_exe):
    calls = []

    def handler(djp, regs):
        calls.append(regs.arg0)
        if len(calls) % 2:
            raise ValueError("boom")

    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(args_exe), "100"], stdout=write_fd) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("f", handler=handler))
        proc.start()
        os.read(read_fd, 4096)
        assert proc.process.popen.wait(timeout=30) == 0
        proc.poll(0.1)
        assert len(calls) == 300 and djp.hits == 300
        assert len(proc.handler_errors) == 150
        assert "ValueError: boom" in proc.handler_errors[0][2]
    os.close(read_fd)


def test_full_ring_drops_are_counted_hits_exact(args_exe):
    n = 20000
    small = AreaLayout(ring_count=1, ring_slots=64)
    proc, (djp,), batches, out = _spawn_with(
        [args_exe, n], lambda p: [p.register(djprobe.Djprobe("f", record=True))], layout=small
    )
    with proc:
        got = sum(len(b) for b in batches)
        assert djp.hits == 3 * n
        assert djp.missed > 0
        assert got + djp.missed == 3 * n


def test_count_probe_upgraded_to_record_keeps_counts(args_exe):
    def factory(p):
        a = p.register(djprobe.Djprobe("f"))
        b = p.register(djprobe.Djprobe("f", record=True))
        return [a, b]

    proc, (a, b), batches, out = _spawn_with([args_exe, 1000], factory)
    with proc:
        assert a.hits == b.hits == 3000
        assert sum(len(x) for x in batches) == 3000


def test_record_probe_cycles_under_load(start_target):
    """Removal steps threads out of the record action (pushfq/popfq included): the target
    must never see the trap flag, crash or compute a wrong result."""
    import time

    exe = compile_c(TARGETS / "counts.c", name="counts")
    t = start_target([exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        for _ in range(40):
            djps = [djprobe.Djprobe("work_a", record=True), djprobe.Djprobe("work_b", record=True, registers="args")]
            assert proc.register_many(djps) == []
            time.sleep(0.005)
            proc.read_events()
            proc.unregister_many(djps)
            assert t.proc.poll() is None
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"


def test_record_probes_keep_behaviour_and_see_flags():
    """Record stubs at sites with live flags, live red zone, RIP-relative operands, short
    branches and a last call: same output; the recorded flags are the ones the jl reads."""
    behave = compile_c([TARGETS / "behave.S", TARGETS / "behave_main.c"], name="behave")
    plain = subprocess.run([str(behave), "3000"], capture_output=True, text=True, timeout=60)
    sites = ["flags_live+3", "redzone_live+10", "riprel+7", "shortbranch", "lastcall+1"]
    big = AreaLayout(ring_count=1, ring_slots=1 << 16)

    def factory(p):
        return [p.register(djprobe.Djprobe(s, record=True)) for s in sites]

    proc, probes, batches, out = _spawn_with([behave, "3000"], factory, layout=big, status=7)
    with proc:
        assert out == plain.stdout
        assert all(d.hits == 4 * 3000 and d.missed == 0 for d in probes)
        ev = EventBatch.concat(batches)
        flags_site = probes[0]._instance
        mine = np.array([inst is flags_site for inst in ev.instances], dtype=bool)
        rflags = ev.register("rflags")[mine].astype(np.int64)
        rdi = ev.register("rdi")[mine].astype(np.int64)
        rsi = ev.register("rsi")[mine].astype(np.int64)
        sf, of = (rflags >> 7) & 1, (rflags >> 11) & 1
        assert len(rflags) == 4 * 3000
        assert np.array_equal(sf != of, rdi < rsi), "jl's condition from the recorded flags"
