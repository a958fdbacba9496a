"""Short-jump probes (springboards.py, ``ProbedProcess.springboards``, on by default): a jmp
rel8 to a springboard in dead padding where no jmp rel32 fits (tests/targets/springboards.S),
in 4 threads: exact counts, output unchanged, every byte back after removal; added and removed
under load; and ``djprobe cleanup`` after a killed tracer restores sites and springboards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import djprobe
from djprobe import recovery
from djprobe._sys.procfs import read_maps
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)

ROUNDS = 20000
SHORT = ("sb_near", "sb_near+4", "sb_near+6")


@pytest.fixture(scope="module")
def exe():
    return compile_c([TARGETS / "springboards.S", TARGETS / "springboards_main.c"], name="springboards")


@pytest.fixture(scope="module")
def layout(exe):
    """sb_near's address and size, and its file bytes with the padding after it."""
    m = Symbols.from_file(str(exe)).modules[0]
    (f,) = m.symbols("sb_near")
    return f.address, f.size, m.read_file(f.address, f.size + 16)


def _live(pid: int, layout) -> bytes:
    addr, size, _ = layout
    with Symbols.from_process(pid) as syms:
        base = syms.modules[0].bias
        return syms._mem().read(base + addr, size + 16)


def test_springboards_are_on_by_default(exe, monkeypatch):
    """No option: sb_near+4 takes a short jump and counts exactly; DJPROBE_SPRINGBOARDS=0 or
    ``springboards = False`` gives the refusal of old (the site's way in); a bad value is refused
    before anything is started."""
    monkeypatch.delenv("DJPROBE_SPRINGBOARDS", raising=False)
    with djprobe.spawn([str(exe), str(ROUNDS)]) as proc:
        assert proc.springboards is True
        p = proc.register(djprobe.Djprobe("sb_near+4"))
        assert p.mode == "jump" and "short jump" in p.analysis.reason and proc.read(p.address, 1) == b"\xeb"
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
        assert p.hits == 8 * ROUNDS  # as in test_short_jumps_count_exactly
    for off in ("env", "attribute"):
        if off == "env":
            monkeypatch.setenv("DJPROBE_SPRINGBOARDS", "0")
        with djprobe.spawn([str(exe), "1"]) as proc:
            if off == "attribute":
                proc.springboards = False
            assert proc.springboards is False
            with pytest.raises(djprobe.InvalidSiteError, match="lands at"):
                proc.register(djprobe.Djprobe("sb_near+4"))
            proc.start()
            assert proc.process.popen.wait(timeout=60) == 0
    monkeypatch.setenv("DJPROBE_SPRINGBOARDS", "maybe")
    with pytest.raises(djprobe.InvalidSiteError, match="DJPROBE_SPRINGBOARDS='maybe'"):
        djprobe.spawn([str(exe), "1"])


def test_short_jumps_count_exactly(exe, layout):
    plain = subprocess.run([str(exe), str(ROUNDS)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout.startswith("done")
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        probes = {s: proc.register(djprobe.Djprobe(s)) for s in SHORT}
        addr, size, file_bytes = layout
        bias = proc.symbols.modules[0].bias
        boards = sorted(p._instance.springboard for p in probes.values())
        # three springboards in the 16 bytes after sb_near, each a jmp rel32, each site a jmp rel8
        assert [b - bias - addr - size for b in boards] == [0, 5, 10]
        for p in probes.values():
            assert p.mode == "jump" and proc.read(p.address, 1) == b"\xeb"
            assert proc.read(p._instance.springboard, 1) == b"\xe9"
            assert "short jump" in p.analysis.reason
        # a jmp rel32 window over one of them is refused, the short jumps stay
        with pytest.raises(djprobe.SiteBusyError):
            proc.register(djprobe.Djprobe("sb_near+2"))
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        hits = {s: p.hits for s, p in probes.items()}
    assert output == plain.stdout
    # +0 once per call; +4 and +6 once per turn of the loop: sum of k % 5 over ROUNDS calls
    assert hits == {"sb_near": 4 * ROUNDS, "sb_near+4": 8 * ROUNDS, "sb_near+6": 8 * ROUNDS}


def _start_loop(start_target, exe):
    t = start_target([exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = t.proc.stdout.readline()
    assert line.startswith("ready"), line
    return t


def _finish(t) -> str:
    t.proc.stdin.close()
    line = t.proc.stdout.readline()
    assert t.proc.wait(timeout=20) == 0
    return line


@pytest.mark.parametrize("order", ["same", "reverse"])
def test_added_and_removed_under_load(start_target, exe, layout, order):
    """Placed and removed 20 times while 4 threads run through them; the program sees nothing,
    each probe counts while it is in, and every byte (sites and padding) is the file's after."""
    t = _start_loop(start_target, exe)
    proc = djprobe.attach(t.pid)
    try:
        proc.springboards = True
        for _ in range(20):
            probes = [proc.register(djprobe.Djprobe(s)) for s in SHORT]
            time.sleep(0.005)
            counts = [p.hits for p in probes]
            proc.unregister_many(probes if order == "same" else probes[::-1])
            assert all(p.hits >= c for p, c in zip(probes, counts))
            assert _live(t.pid, layout) == layout[2]
        assert probes[0].hits > 0
    finally:
        proc.close()
    assert _live(t.pid, layout) == layout[2]
    calls, n, bad, m = _finish(t).split()
    assert (calls, bad, m) == ("calls", "bad", "0") and int(n) > 0


@pytest.mark.parametrize("stop_seconds", [0.0, None])
def test_probes_of_one_call_count_over_one_window(start_target, exe, stop_seconds):
    """Placed in a running target one stop each (``max_stop_seconds`` 0: the case of a loaded
    machine, where stopping the threads alone overruns the budget) and removed the same way, the
    probes of one call count over one window (batch_window.py): sb_near+4 and +6 run equally
    often (off by at most the 4 threads between them at each end), sb_near+0 half as often
    (per thread, sb_near(k % 5) runs the loop body k % 5 times). Before, +4 (placed first)
    counted every hit of the stops and runs between the insertions: 1% more in a 1 s window."""
    t = _start_loop(start_target, exe)
    proc = djprobe.attach(t.pid)
    try:
        proc.springboards = True
        if stop_seconds is not None:
            proc.max_stop_seconds = stop_seconds
        probes = [djprobe.Djprobe(s) for s in SHORT]
        generations = proc._stop_generation
        assert proc.register_many(probes) == []
        placed_in = proc._stop_generation - generations
        time.sleep(0.2)
        proc.unregister_many(probes)
    finally:
        proc.close()
    near, four, six = (p.hits for p in probes)
    if stop_seconds is not None:
        assert placed_in >= 3  # one stop each: the case being tested
    assert four > 1000 and abs(four - six) <= 8, (near, four, six)
    assert abs(2 * near - four) <= 4 * 2 * 10, (near, four, six)
    calls, n, bad, m = _finish(t).split()
    assert m == "0" and int(n) > 0


def _kill_tracer_with_short_jumps(pid: int) -> None:
    script = textwrap.dedent(
        f"""
        import time, djprobe
        proc = djprobe.attach({pid})
        proc.springboards = True
        for s in {list(SHORT)!r}:
            proc.register(djprobe.Djprobe(s))
        print("placed", flush=True)
        time.sleep(60)
        """
    )
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "placed"
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)


def test_cleanup_after_a_killed_tracer_restores_sites_and_springboards(start_target, exe, layout):
    t = _start_loop(start_target, exe)
    _kill_tracer_with_short_jumps(t.pid)
    time.sleep(0.2)
    assert t.proc.poll() is None
    live = _live(t.pid, layout)
    assert live != layout[2] and live[0] == 0xEB
    res = subprocess.run([sys.executable, "-m", "djprobe", "status", "-p", str(t.pid), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    instances = [i for a in json.loads(res.stdout)["areas"] for i in a["instances"]]
    assert len(instances) == 3 and all(i["valid"] and i["code"] == "patched" and i["hits"] > 0 for i in instances)
    assert all("springboard" in i for i in instances)
    report = recovery.cleanup(t.pid)
    assert report.ok and len(report.restored) == 3 and not report.left_mapped and not report.orphans
    assert _live(t.pid, layout) == layout[2]
    assert not [m for m in read_maps(t.pid) if recovery.AREA_PATH_RE.match(m.path)]
    time.sleep(0.1)
    calls, n, bad, m = _finish(t).split()
    assert m == "0" and int(n) > 0


@pytest.mark.parametrize("wiped", [(0,), (0, 1, 2)])
def test_cleanup_restores_short_jumps_without_a_table_entry(start_target, exe, layout, wiped):
    """Short jumps whose table entries are gone (as a child forked while probed sees them: its
    data part is fresh, the parent's jumps are in its code) are found by comparing the code with
    the file, and ``cleanup`` puts back each rel8, then its springboard (orphan_short.py): sb_near
    and the padding after it as in the file, no area left, the 4 threads go on with no wrong
    result. Before, the rel8s and springboards stayed and the area stayed mapped."""
    from djprobe._sys.procfs import ProcessMemory
    from djprobe.area import ENTRY_SIZE

    t = _start_loop(start_target, exe)
    _kill_tracer_with_short_jumps(t.pid)
    (area,) = recovery.find_areas(t.pid)
    assert len(area.instances) == 3
    gone = [area.instances[i] for i in wiped]
    with ProcessMemory(t.pid) as mem:
        for inst in gone:
            mem.write(area.data_address + area.layout.table_offset + inst.index * ENTRY_SIZE, bytes(ENTRY_SIZE))
    (area,) = recovery.status(t.pid)
    assert len(area.instances) == 3 - len(wiped)
    report = recovery.cleanup(t.pid)
    assert report.ok and not report.left_mapped, report.to_json()
    assert len(report.restored) == 3 - len(wiped)
    rel8s = sorted(o.address for o in report.orphans if o.target not in {i.stub_address for i in gone})
    assert rel8s == sorted(i.address for i in gone)
    boards = [o for o in report.orphans if o.target in {i.stub_address for i in gone}]
    assert sorted(o.address for o in boards) == sorted(i.springboard for i in gone)
    assert _live(t.pid, layout) == layout[2]
    assert not [m for m in read_maps(t.pid) if recovery.AREA_PATH_RE.match(m.path)]
    time.sleep(0.1)
    calls, n, bad, m = _finish(t).split()
    assert m == "0" and int(n) > 0


SWEEP_SCRIPT = textwrap.dedent(
    """
    import sys, djprobe
    with djprobe.attach(int(sys.argv[1])) as proc:
        proc.springboards = True
        probes = [djprobe.Djprobe(s) for s in sys.argv[2:]]
        refused = proc.register_many(probes)
        proc.poll(timeout=0.1)
        proc.unregister_many(probes)
        print("placed", len(probes) - len(refused), flush=True)
    """
)


def _status(t) -> tuple[int, int]:
    t.proc.stdin.write("s\n")
    t.proc.stdin.flush()
    _, calls, bad = t.proc.stdout.readline().split()
    return int(calls), int(bad)


@pytest.mark.timeout(900)  # about 35 tracer runs and cleanups: 1.5 to 2 minutes on a loaded machine
def test_kill_tracer_before_every_write_of_a_short_jump_cycle(start_target, exe, layout, tmp_path):
    """The tracer placing and removing the 3 short jumps is killed before each of its writes to
    the target's memory (stubs, springboards, jmp rel8s, original bytes back); after each kill
    ``djprobe cleanup`` leaves sb_near and the padding after it as in the file, no area mapped,
    and the 4 threads calling sb_near go on with no wrong result."""
    from djprobe._sys import faults

    def run(pid: int, **env: str) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k not in (faults.KILL_VAR, faults.COUNT_VAR, faults.KIND_VAR)}
        e.update(env)
        return subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, str(pid), *SHORT], env=e,
                              capture_output=True, text=True, timeout=60)

    t = _start_loop(start_target, exe)
    log = tmp_path / "ops"
    res = run(t.pid, **{faults.COUNT_VAR: str(log), faults.KIND_VAR: "mem-write"})
    assert res.returncode == 0 and res.stdout.split() == ["placed", "3"], res.stderr
    total, whats = faults.read_log(str(log))
    assert total >= 9  # 3 stubs, 3 springboards, 3 rel8s, then as many restores
    assert _live(t.pid, layout) == layout[2]
    killed = 0
    last = _status(t)[0]
    for n in range(1, total + 1):
        res = run(t.pid, **{faults.KILL_VAR: str(n), faults.KIND_VAR: "mem-write"})
        killed += res.returncode == -signal.SIGKILL
        report = recovery.cleanup(t.pid)
        assert report.ok, (n, whats[n - 1], report.skipped)
        assert _live(t.pid, layout) == layout[2], (n, whats[n - 1])
        assert not [m for m in read_maps(t.pid) if recovery.AREA_PATH_RE.match(m.path)], n
        assert t.proc.poll() is None, (n, whats[n - 1])
        deadline = time.monotonic() + 10
        while True:
            calls, bad = _status(t)
            assert bad == 0, (n, whats[n - 1])
            if calls > last or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert calls > last, n
        last = calls
    assert killed == total
    calls, n_calls, bad, m = _finish(t).split()
    assert m == "0"


def test_a_record_probe_joining_repoints_the_springboard(exe, layout):
    """A probe that wants records joins a count-only short site: a new stub, the springboard
    now leads there, the rel8 is unchanged; both count every hit, the events are all there."""
    rounds = 500
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(rounds)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        counted = proc.register(djprobe.Djprobe("sb_near+4"))
        inst = counted._instance
        board, rel8, old_stub = inst.springboard, proc.read(inst.address, 2), inst.stub.address
        events = []
        recorded = proc.register(djprobe.Djprobe("sb_near+4", handler=lambda probe, regs: events.append(regs.rdi & 0xFFFFFFFF)))
        assert recorded._instance is inst and inst.stub.address != old_stub
        assert proc.read(inst.address, 2) == rel8
        target = board + 5 + int.from_bytes(proc.read(board + 1, 4), "little", signed=True)
        assert target == inst.stub.address
        proc.start()
        with os.fdopen(read_fd) as out:
            assert out.read().startswith("done")
        assert proc.process.popen.wait(timeout=60) == 0
        proc.poll(timeout=0.5)
        hits = (counted.hits, recorded.hits)
    assert hits == (8 * rounds, 8 * rounds)
    assert len(events) == 8 * rounds
    # at sb_near+4 (dec edi) edi counts down from k % 5: values 1..4, 2 * rounds of 1, ...
    assert sorted(set(events)) == [1, 2, 3, 4] and events.count(1) == 4 * rounds * 4 // 5


LIBC_SHORT = ("libc:sem_trywait", "libc:pthread_rwlock_tryrdlock")


def test_short_jumps_at_libc_entries_count_exactly():
    """glibc's sem_trywait and pthread_rwlock_tryrdlock take no jmp rel32 at their entry (a
    branch lands inside the first 5 bytes); with springboards on, a short jump there counts
    every call of 4 threads, and the program sees the same results."""
    exe = compile_c(TARGETS / "springboards_libc.c", name="springboards_libc")
    with djprobe.spawn([str(exe), "1"]) as proc:
        for site in LIBC_SHORT:
            res = proc.analyse(djprobe.Djprobe(site))
            if res.ok or "lands at" not in res.reason:
                pytest.skip(f"{site} takes a jmp rel32 or is refused otherwise in this libc: {res.reason}")
        proc.start()
        proc.process.popen.wait(timeout=60)
    plain = subprocess.run([str(exe), str(ROUNDS)], capture_output=True, text=True, timeout=60)
    assert plain.stdout == f"done rounds={ROUNDS} ok={7 * ROUNDS}\n"
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        probes = {s: proc.register(djprobe.Djprobe(s)) for s in LIBC_SHORT}
        for p in probes.values():
            assert proc.read(p.address, 1) == b"\xeb" and p._instance.springboard is not None
        boards = {p._instance.springboard: proc.read(p._instance.springboard, 5) for p in probes.values()}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        hits = {s: p.hits for s, p in probes.items()}
    assert output == plain.stdout
    assert hits == {s: 4 * ROUNDS for s in LIBC_SHORT}
    assert all(b[0] == 0xE9 for b in boards.values())


def test_a_loop_back_to_the_site_counts_every_turn(exe):
    """sb_near+2 (jle, the loop's head) takes a jmp rel32 whose window holds the loop's jmp back
    to it: each turn goes through the site's jump again, so the count is every execution (it
    used to be once per call: the relocated jmp went into the copy, past the action)."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        head = proc.register(djprobe.Djprobe("sb_near+2"))
        tail = proc.register(djprobe.Djprobe("sb_near+8"))
        assert [i.text.split()[0] for i in head.analysis.displaced] == ["jle", "dec", "jmp"]
        proc.start()
        with os.fdopen(read_fd) as out:
            assert out.read().startswith("done")
        assert proc.process.popen.wait(timeout=60) == 0
        hits = (head.hits, tail.hits)
    # per call k % 5 turns and the last test: 3 per call on average; +8 once per call
    assert hits == (12 * ROUNDS, 4 * ROUNDS)
