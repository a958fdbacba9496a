"""Jump probes in real processes: exact counts, unchanged behaviour, safe insertion and removal."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import djprobe
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


@pytest.fixture(scope="module")
def behave_exe():
    return compile_c([TARGETS / "behave.S", TARGETS / "behave_main.c"], name="behave")


def _run_spawned(argv, sites):
    """Spawn argv with probes at sites; return (stdout, exit status, {site: hits})."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(a) for a in argv], stdout=write_fd) as proc:
        os.close(write_fd)
        probes = [proc.register(djprobe.Djprobe(s)) for s in sites]
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=60)
    return output, status, {s: p.hits for s, p in zip(sites, probes)}


def test_exact_counts_spawned_four_threads(counts_exe):
    n = 50000
    out, status, hits = _run_spawned([counts_exe, "run", n], ["work_a", "work_b"])
    assert status == 0, out
    assert out.strip() == f"done calls_a={4 * n} bad=0"
    assert hits == {"work_a": 4 * n, "work_b": 4 * (n // 4)}


def test_behaviour_unchanged_with_probes(behave_exe):
    plain = subprocess.run([str(behave_exe), "100000"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 7
    sites = ["flags_live+3", "redzone_live+10", "riprel", "riprel+7", "shortbranch", "lastcall+1", "helper"]
    out, status, hits = _run_spawned([behave_exe, "100000"], sites)
    assert (out, status) == (plain.stdout, plain.returncode)
    expected = 4 * 100000
    assert hits == {s: expected for s in sites}  # helper is called once per lastcall


def test_each_site_alone_keeps_behaviour(behave_exe):
    """Every probe kind alone: a wrong flag, red zone or relocation shows in the checksums."""
    plain = subprocess.run([str(behave_exe), "20000"], capture_output=True, text=True, timeout=60).stdout
    for site in ["flags_live+3", "flags_live+6", "redzone_live+10", "riprel+7", "shortbranch", "lastcall+1"]:
        out, status, hits = _run_spawned([behave_exe, "20000"], [site])
        assert (out, status) == (plain, 7), site
        assert hits[site] == 4 * 20000, site


def _start_loop(start_target, counts_exe):
    t = start_target([counts_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = t.proc.stdout.readline()
    assert line.startswith("ready"), line
    return t


def _calls_a(proc: djprobe.ProbedProcess) -> int:
    sym = proc.symbols.modules[0].symbols("calls_a")[0]
    return int.from_bytes(proc.read(sym.address, 8), "little")


def test_counts_attached_mid_run_match_target_counter(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        djp = djprobe.Djprobe("work_a")
        with proc.stopped():
            proc.register(djp)
            before = _calls_a(proc)
        time.sleep(0.3)
        with proc.stopped():
            proc.unregister(djp)
            after = _calls_a(proc)
    # A thread caught between the probe and the target's own increment shifts the two by one.
    assert abs(djp.hits - (after - before)) <= 4
    assert djp.hits > 1000
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"  # no wrong result in the target


def test_thread_inside_displaced_bytes_is_moved(start_target, counts_exe):
    """Make a thread stop inside the displaced bytes on purpose, then insert the probe."""
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        analysis = proc.analyse(djprobe.Djprobe("work_b"))
        start, end = analysis.address, analysis.address + analysis.size
        assert len(analysis.displaced) >= 2, "need a site of several instructions"
        with proc.stopped() as threads:
            inside = None
            workers = [th for th in threads.values() if th.tid != t.pid]  # main blocks in read()
            for _ in range(200000):
                for th in workers:
                    if start < th.regs().rip < end:
                        inside = th
                        break
                    th.step()
                if inside:
                    break
            assert inside is not None, "no thread could be stepped into the displaced bytes"
            djp = proc.register(djprobe.Djprobe("work_b"))
            assert not (start <= inside.regs().rip < end)
        time.sleep(0.2)
        assert djp.hits > 0
        proc.unregister(djp)
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"
    assert t.proc.poll() is None or t.proc.wait(timeout=10) == 0


def test_thread_inside_stub_action_at_removal_runs_out_by_itself(start_target, counts_exe):
    """A thread stands at the first instruction of the stub's action when the probe is removed:
    it is not stepped; the slot is retired, the probe's count stays live, the thread counts its
    hit and leaves by itself, and the slot is reclaimed at the next stop. Exact."""
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        djp = proc.register(djprobe.Djprobe("work_a"))
        stub = djp._instance.stub
        with proc.stopped() as threads:
            workers = [th for th in threads.values() if th.tid != t.pid]
            parked = None
            for _ in range(200000):
                for th in workers:
                    if th.regs().rip == djp.address:
                        th.step()  # through our jmp: now at the start of the action
                        parked = th
                        break
                    th.step()
                if parked:
                    break
            assert parked is not None and parked.regs().rip == stub.address
            for th in workers:  # the others were stepped too: walk any of them out of the stub
                for _ in range(1000):
                    if th is parked or not stub.address <= th.regs().rip < stub.end:
                        break
                    th.step()
            # A step's trap aborts an rseq critical section: a thread stepped inside the per-CPU
            # count cannot pass its commit, so one still in the stub has not counted yet.
            parked_before_commit = 1 + sum(
                1 for th in workers if th is not parked and stub.address <= th.regs().rip < stub.end
            )
            proc.unregister(djp)
            assert not djp.registered and proc._retired, "the slot is retired, not given back"
            at_removal = djp.hits
        deadline = time.monotonic() + 10
        while proc._retired and time.monotonic() < deadline:
            time.sleep(0.01)
            with proc.stopped():
                pass  # a stop reclaims idle retired slots
        assert not proc._retired
        assert djp.hits == at_removal + parked_before_commit  # each counted once, then frozen
        time.sleep(0.05)
        assert djp.hits == at_removal + parked_before_commit
    with open(f"/proc/{t.pid}/maps") as f:
        assert "/dev/shm/djprobe-" not in f.read()  # the area went at close: nothing is left in it
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"  # no wrong result in the target
    assert t.proc.wait(timeout=10) == 0


def test_insert_remove_cycles_restore_original_bytes(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    file_symbols = Symbols.from_file(str(counts_exe))
    with djprobe.attach(t.pid) as proc:
        mod = proc.symbols.modules[0]
        sites = ["work_a", "work_b"]
        addresses = [mod.symbols(s)[0].address for s in sites]
        original = [proc.read(a, 16) for a in addresses]
        for i in range(100):
            djps = [djprobe.Djprobe(s) for s in sites]
            assert proc.register_many(djps) == []
            proc.unregister_many(djps)
        after = [proc.read(a, 16) for a in addresses]
    assert after == original
    with open(f"/proc/{t.pid}/maps") as f:
        assert "/dev/shm/djprobe-" not in f.read(), "probe areas are unmapped at close"
    for site, data in zip(sites, after):
        sym = file_symbols.modules[0].symbols(site)[0]
        assert data == file_symbols.modules[0].read_file(sym.address, 16)
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"


def test_several_probes_share_one_address(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        first = proc.register(djprobe.Djprobe("work_b"))
        time.sleep(0.1)
        with proc.stopped():
            second = proc.register(djprobe.Djprobe("work_b"))
            base = first.hits
        time.sleep(0.1)
        with proc.stopped():
            assert first.hits - base == second.hits > 0
            proc.unregister(first)
            assert proc.read(first.address, 1) == b"\xe9"  # still patched for the second probe
        proc.unregister(second)
        assert proc.read(second.address, 1) != b"\xe9"


def test_tracer_killed_target_keeps_running(start_target, counts_exe, tmp_path):
    t = _start_loop(start_target, counts_exe)
    script = textwrap.dedent(
        f"""
        import sys, time, djprobe
        proc = djprobe.attach({t.pid})
        proc.register(djprobe.Djprobe("work_a"))
        proc.register(djprobe.Djprobe("work_b"))
        print("placed", flush=True)
        time.sleep(60)
        """
    )
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "placed"
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=10)
        time.sleep(0.3)
        assert t.proc.poll() is None
        with open(f"/proc/{t.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()
    finally:
        if tracer.poll() is None:
            tracer.kill()
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"


def test_ebusy_on_breakpoint(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        addr = proc.symbols.modules[0].symbols("work_b")[0].address
        with proc.stopped():
            orig = proc.read(addr, 1)
            proc.process.write(addr, b"\xcc")
            try:
                with pytest.raises(djprobe.SiteBusyError) as info:
                    proc.register(djprobe.Djprobe("work_b"))
                assert info.value.errno == errno.EBUSY
            finally:
                proc.process.write(addr, orig)


def _uprobe_file_offset(path: str, vaddr: int) -> int:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError("address not in a PT_LOAD segment")


def _tracefs_append(path: str, line: str) -> None:
    # Python's append mode seeks to the end, which tracefs refuses: write through os.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def test_ebusy_on_kernel_uprobe(start_target, counts_exe):
    tracing = "/sys/kernel/tracing"
    if not os.path.exists(f"{tracing}/uprobe_events"):
        pytest.skip("tracefs with uprobe_events is not available")
    vaddr = Symbols.from_file(str(counts_exe)).modules[0].symbols("work_b")[0].address
    offset = _uprobe_file_offset(str(counts_exe), vaddr)
    t = _start_loop(start_target, counts_exe)
    name = f"djtest_{os.getpid()}"
    _tracefs_append(f"{tracing}/uprobe_events", f"p:djtest/{name} {counts_exe}:{offset:#x}\n")
    enable = f"{tracing}/events/djtest/{name}/enable"
    try:
        with open(enable, "w") as f:
            f.write("1")
        with djprobe.attach(t.pid) as proc:
            with pytest.raises(djprobe.SiteBusyError):
                proc.register(djprobe.Djprobe("work_b"))
    finally:
        with open(enable, "w") as f:
            f.write("0")
        _tracefs_append(f"{tracing}/uprobe_events", f"-:djtest/{name}\n")


def test_einval_mid_instruction_and_not_executable(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        work_a = proc.analyse(djprobe.Djprobe("work_a"))
        first = work_a.displaced[0]
        assert first.length > 1
        with pytest.raises(djprobe.InvalidSiteError) as info:
            proc.register(djprobe.Djprobe(first.address + 1))
        assert info.value.errno == errno.EINVAL
        data = proc.symbols.modules[0].symbols("calls_a")[0].address
        with pytest.raises(djprobe.InvalidSiteError):
            proc.register(djprobe.Djprobe(data))
        with pytest.raises(djprobe.InvalidSiteError):
            proc.register(djprobe.Djprobe("work_a", size=3))
