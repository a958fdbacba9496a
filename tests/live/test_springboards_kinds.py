"""Short jumps (springboards.py, a jmp rel8 to a springboard in dead padding) for probes other
than plain count and record ones: string-fetching probes, 4 threads, every event exact."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict

import pytest

import djprobe
from djprobe.events import EventBatch
from djprobe.fetched import FetchedString
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
THREADS, ROUNDS = 4, 3000


@pytest.fixture(scope="module")
def str_exe():
    return compile_c([TARGETS / "springboards_str.S", TARGETS / "springboards_str_main.c"], name="springboards_str")


def test_string_fetch_probe_through_a_short_jump(str_exe):
    """sb_str's entry takes no jmp rel32 (a branch lands 3 bytes in): with springboards, the
    probe copying ``s`` at the hit is a jmp rel8 to a springboard. Every call of each of the 4
    threads is one event, in order, whose string is the one passed (``t<thread>-k<n>``, the
    buffer rewritten before the next call) and whose ``n`` matches it."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd)
    os.close(write_fd)
    with proc:
        proc.wait_timeout = 5.0
        proc.springboards = True
        djp = proc.register(djprobe.Djprobe("sb_str", prototype="const char *s, long n", lossless=True))
        assert djp.mode == "jump" and proc.read(djp.address, 1) == b"\xeb"
        assert djp._instance.springboard is not None and djp._instance.strings
        proc.start()
        batches = list(proc.events(timeout=60))
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=30) == 0
        batches.append(proc.read_events())
        batch = EventBatch.concat([b for b in batches if len(b)] or [batches[-1]])
        assert output == plain and output.startswith("done")
        assert djp.hits == THREADS * ROUNDS and djp.missed == 0 and len(batch) == djp.hits
        per_thread: dict[int, list] = defaultdict(list)
        for tid, text, n in zip(batch.events["tid"].tolist(), batch.column("s"), batch.column("n")):
            per_thread[tid].append((text, n))
        assert len(per_thread) == THREADS
        seen = set()
        for calls in per_thread.values():
            t = calls[0][0].split("-")[0]
            assert calls == [(f"{t}-k{k % 5}", k % 5) for k in range(ROUNDS)]
            assert all(isinstance(text, FetchedString) and not text.truncated for text, _ in calls)
            seen.add(t)
        assert seen == {f"t{t}" for t in range(THREADS)}


SHORT = ("sb_near", "sb_near+4", "sb_near+6")


@pytest.fixture(scope="module")
def sb_exe():
    return compile_c([TARGETS / "springboards.S", TARGETS / "springboards_main.c"], name="springboards")


def _count_short(exe) -> tuple[dict[str, int], list[int]]:
    """sb_near's 3 short-jump sites counted over a whole run of 4 threads; the counts and the
    springboards' offsets from the module's base."""
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        probes = {s: proc.register(djprobe.Djprobe(s)) for s in SHORT}
        assert all(p.mode == "jump" and proc.read(p.address, 1) == b"\xeb" for p in probes.values())
        bias = proc.symbols.modules[0].bias
        boards = sorted(p._instance.springboard - bias for p in probes.values())
        proc.start()
        with os.fdopen(read_fd) as out:
            assert out.read().startswith("done")
        assert proc.process.popen.wait(timeout=60) == 0
        return {s: p.hits for s, p in probes.items()}, boards


def test_short_jump_verdicts_come_from_the_sites_cache(sb_exe, tmp_path, monkeypatch):
    """The first run finds the short jumps (the module's index, its dead runs) and keeps them in
    the sites cache (``s<vaddr>`` entries: the window and the dead runs in reach); a second run
    places the same short jumps from the cache alone (finding them afresh would fail here) and
    counts exactly as the first."""
    from djprobe import springboard_cache

    monkeypatch.setenv("DJPROBE_CACHE_DIR", str(tmp_path))
    first, boards = _count_short(sb_exe)
    want = {"sb_near": 4 * ROUNDS, "sb_near+4": 8 * ROUNDS, "sb_near+6": 8 * ROUNDS}
    assert first == want
    (path,) = tmp_path.glob("*.json")
    import json

    sites = json.loads(path.read_text())["sites"]
    short = {k: v for k, v in sites.items() if k.startswith("s") and v[0] == "s"}
    assert len(short) == 3 and all(v[5] for v in short.values())  # each with its dead runs

    def no_analysis(*args, **kwargs):
        raise AssertionError("a short jump was looked for afresh")

    monkeypatch.setattr(springboard_cache, "short_jump", no_analysis)
    monkeypatch.setattr(springboard_cache, "module_index", no_analysis)
    second, boards_again = _count_short(sb_exe)
    assert second == want and boards_again == boards


def test_return_probe_through_a_short_exit_window(str_exe):
    """sb_exit's first exit, ``xor eax, eax; ret`` (not its last instruction), begins at a branch
    target 3 bytes before the end of the ret, and its only path window would be 4 bytes: a return
    probe is refused, unless springboards are on. Then that exit window is a jmp rel8 to a
    springboard (short_exits.py) while the last exit's window takes the padding after the
    function (the springboard keeps out of it): 4 threads, each of ROUNDS calls counted once at
    its return (2 of 3 through the short window), output unchanged."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert plain.endswith("bad 0\n")
    with djprobe.spawn([str(str_exe), "1"]) as proc:
        proc.springboards = False  # whatever DJPROBE_SPRINGBOARDS says
        with pytest.raises(djprobe.DjprobeError, match="branch target"):
            proc.register(djprobe.Djprobe("sb_exit", at="return"))
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        ret = proc.register(djprobe.Djprobe("sb_exit", at="return"))
        short, last = sorted(ret._parts, key=lambda p: p.address)
        assert short._instance.springboard is not None and proc.read(short.address, 1) == b"\xeb"
        assert last._instance.springboard is None and last.size == 5  # ret + 4 bytes of padding
        sb = short._instance.springboard
        assert not (last.address <= sb + 4 and sb < last.address + last.size)
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        assert output == plain
        assert ret.hits == 4 * ROUNDS and short.hits == 4 * (ROUNDS - ROUNDS // 3)


def test_latency_probe_through_a_short_exit_window(str_exe):
    """A latency probe of sb_exit (refused without springboards: its first exit takes no jmp
    rel32): its entry is a jmp rel32, that exit a jmp rel8 to a springboard. 4 threads: every
    call paired with its return, none unpaired, output unchanged."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        lat = proc.register(djprobe.Djprobe("sb_exit", at="latency"))
        boards = [p for p in lat._parts if p._instance.springboard is not None]
        assert len(boards) == 1 and proc.read(boards[0].address, 1) == b"\xeb"
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        assert output == plain
        figures = lat.latency.read()
        assert figures.calls == 4 * ROUNDS and int(figures.histogram.sum()) == 4 * ROUNDS, figures
        assert lat.latency.unpaired == 0 and lat.latency.collisions == 0


def test_latency_probe_with_a_short_entry_window(str_exe):
    """sb_str's entry takes no jmp rel32 (the loop's jle at +3 is a branch target): a latency
    probe is refused without springboards; with them its entry is a jmp rel8 to a springboard
    (the latency entry stub behind it), its exit (the last ret) a jmp rel32 over the padding
    after it, which the springboard keeps out of. 4 threads: every call paired with its return,
    none unpaired, output unchanged; then placed and removed 5 times in a running copy, the
    file's bytes back each time and no call of the program wrong."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    with djprobe.spawn([str(str_exe), "1"]) as proc:
        proc.springboards = False
        with pytest.raises(djprobe.InvalidSiteError, match="lands at"):
            proc.register(djprobe.Djprobe("sb_str", at="latency"))
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        module = proc.symbols.modules[0]
        (func,) = module.symbols("sb_str")
        want = module.read_file(func.address, func.size + 16)
        lat = proc.register(djprobe.Djprobe("sb_str", at="latency"))
        roles = sorted((p._latency_role, p.address - func.address, p._instance.springboard is not None)
                       for p in lat._parts)
        assert roles == [("entry", 0, True), ("exit", 12, False)]
        assert proc.read(func.address, 1) == b"\xeb" and proc.read(func.address + 12, 1) == b"\xe9"
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        assert output == plain
        figures = lat.latency.read()
        assert figures.calls == 4 * ROUNDS and int(figures.histogram.sum()) == 4 * ROUNDS, figures
        assert lat.latency.unpaired == 0 and lat.latency.collisions == 0
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(str_exe), "2000000000"], stdout=write_fd) as proc:  # until SIGUSR1
        os.close(write_fd)
        proc.springboards = True
        (func,) = proc.symbols.modules[0].symbols("sb_str")  # this process's address
        proc.start()
        for _ in range(5):
            lat = proc.register(djprobe.Djprobe("sb_str", at="latency"))
            deadline = time.monotonic() + 30
            while lat.latency.read().calls == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            proc.unregister(lat)
            assert lat.latency.calls > 0
            assert proc.read(func.address, func.size + 16) == want
        os.kill(proc.pid, signal.SIGUSR1)
        with os.fdopen(read_fd) as out:
            assert out.read() == "stopped bad 0\n"
        assert proc.process.popen.wait(timeout=60) == 0


@pytest.mark.parametrize("together", [False, True])
def test_probe_inside_a_short_window_shares_its_stub(str_exe, together):
    """sb_share+0 is a short jump whose window is 2 instructions; a probe at +1 joins its stub
    (overlaps.py, a shared stub; the springboard is repointed at each rebuild, the rel8 stays),
    added after it or in the same call, removed first; the loop body (+7) counted too. 4 threads:
    +0 and +1 once per call, +7 k % 4 times, exact; output unchanged."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        proc.springboards = True
        sites = ["sb_share", "sb_share+1", "sb_share+7"]
        if together:
            probes = [djprobe.Djprobe(s) for s in sites]
            assert proc.register_many(probes) == []
        else:
            probes = [proc.register(djprobe.Djprobe(s)) for s in sites]
        host, guest, loop = probes
        assert host._instance.springboard is not None and proc.read(host.address, 1) == b"\xeb"
        assert guest._instance.host is host._instance
        board = host._instance.springboard
        # a probe joining and leaving again: the stub is rebuilt twice, the springboard follows it
        extra = proc.register(djprobe.Djprobe("sb_share+1"))
        proc.unregister(extra)
        assert proc.read(board, 1) == b"\xe9" and proc.read(host.address, 1) == b"\xeb"
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=60) == 0
        assert output == plain
        per_thread_loops = sum(k % 4 for k in range(ROUNDS))
        assert (host.hits, guest.hits, loop.hits) == (4 * ROUNDS, 4 * ROUNDS, 4 * per_thread_loops)


def test_short_host_and_guest_removed_in_both_orders_under_load(str_exe):
    """Placed and removed while the 4 threads run: host then guest, guest then host; each round
    removes them only once both have counted calls (a loaded machine may not run the target at
    all between two calls of ours: the last round's counts were 0 in 7 of 107 rounds with 4 busy
    loops on 2 cores), so threads are inside or around the shared stub when it goes. Every byte
    of sb_share and the padding after it is the file's after each round, and no call of the
    program returned a wrong value (the program runs until told to stop)."""
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(str_exe), "2000000000"], stdout=write_fd)  # until SIGUSR1
    os.close(write_fd)
    with proc:
        proc.springboards = True
        module = proc.symbols.modules[0]
        (func,) = module.symbols("sb_share")
        want = module.read_file(func.address, func.size + 16)
        proc.start()
        for order in ("host-first", "guest-first") * 5:
            host = proc.register(djprobe.Djprobe("sb_share"))
            guest = proc.register(djprobe.Djprobe("sb_share+1"))
            assert guest._instance.host is host._instance
            deadline = time.monotonic() + 30
            while (host.hits == 0 or guest.hits == 0) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert host.hits > 0 and guest.hits > 0, order
            proc.unregister_many([host, guest] if order == "host-first" else [guest, host])
            assert host.hits >= guest.hits > 0  # the host went in first, both end in one stop
            assert proc.read(func.address, func.size + 16) == want, order
        assert proc.process.popen.poll() is None
        os.kill(proc.pid, signal.SIGUSR1)
        with os.fdopen(read_fd) as out:
            assert out.read() == "stopped bad 0\n"
        assert proc.process.popen.wait(timeout=90) == 0
