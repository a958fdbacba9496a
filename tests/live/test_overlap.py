"""Overlapping probes share one stub (issue 14 item 1): entry and mid-window probes in one
function, 4 threads, exact counts for each, added and removed in every order under load; a
record probe inside a window sees the registers as they are at its own instruction."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

import djprobe
from tests.conftest import TARGETS, compile_c

THREADS = 4
SITES = ("ov_f", "ov_f+1", "ov_f+3")  # push rbx | mov ebx,edi | inc ebx: one 5-byte window
FLAG_SITES = ("ov_flags", "ov_flags+3")  # cmp edi,10 | mov eax,1 (the flags are live across it)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module")
def overlap_exe():
    return compile_c([TARGETS / "overlap.S", TARGETS / "overlap_main.c"], name="overlap")


class Driver:
    """The target in its phase mode: ``go(n)`` makes each thread call every function n times."""

    def __init__(self, start_target, exe) -> None:
        self.t = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.t.proc.stdout.readline().startswith("ready")

    def say(self, line: str) -> str:
        self.t.proc.stdin.write(line + "\n")
        self.t.proc.stdin.flush()
        return self.t.proc.stdout.readline().strip()

    def go(self, n: int) -> None:
        assert self.say(f"go {n}") == "done 0"

    def finish(self) -> None:
        self.t.proc.stdin.close()
        assert self.t.proc.wait(timeout=30) == 0



def _file_bytes(proc, names):
    out = {}
    for name in names:
        addr = proc.symbols.resolve(name)[0].address
        out[addr] = proc.read(addr, 16)
    return out


def test_counts_exact_in_one_window(overlap_exe):
    """count via the CLI: the entry and two instructions inside its displaced bytes, and a site
    whose flags are live inside the window: each exact, the program's results unchanged."""
    n = 20000
    res = subprocess.run(DJPROBE + ["count", "--json", *SITES, *FLAG_SITES, "--", overlap_exe, "run", str(n)],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "done 0"
    report = json.loads(lines[-1])
    assert report["refused"] == []
    hits = {p["site"].split(":")[1]: p["hits"] for p in report["probes"]}
    assert hits == {s.replace("+", "+0x"): THREADS * n for s in SITES + FLAG_SITES}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_added_and_removed_in_every_order_under_load(start_target, overlap_exe, order):
    """Insert the three overlapping probes in ``order`` and remove them in the reverse of the
    next permutation, each change made while the 4 threads spin through the function; between
    changes a phase of exact calls gives every present probe exactly THREADS * n hits."""
    d = Driver(start_target, overlap_exe)
    removal = list(itertools.permutations(range(3)))[(list(itertools.permutations(range(3))).index(order) + 1) % 6]
    with djprobe.attach(d.t.pid) as proc:
        original = _file_bytes(proc, ("ov_f", "ov_flags"))
        probes = [djprobe.Djprobe(SITES[i]) for i in range(3)]
        placed = []

        def phase():
            before = [p.hits for p in placed]
            d.go(300)
            assert [p.hits - b for p, b in zip(placed, before)] == [THREADS * 300] * len(placed)

        for i in order:
            assert d.say("spin") == "spinning"
            proc.register(probes[i])
            assert d.say("stop") == "stopped 0"
            placed.append(probes[i])
            phase()
        for i in removal:
            assert d.say("spin") == "spinning"
            proc.unregister(probes[i])
            assert d.say("stop") == "stopped 0"
            placed.remove(probes[i])
            frozen = probes[i].hits
            phase()
            assert probes[i].hits == frozen  # removed: no more hits
        assert _file_bytes(proc, ("ov_f", "ov_flags")) == original
    d.finish()


def test_flags_live_inside_window_and_many_changes(start_target, overlap_exe):
    """Probes at ov_flags and ov_flags+3 (the flags of the cmp are live across the mov) are
    added and removed repeatedly while the threads spin: results stay right (the program counts
    wrong results), counts exact in every phase."""
    d = Driver(start_target, overlap_exe)
    with djprobe.attach(d.t.pid) as proc:
        for k in range(6):
            first, second = (FLAG_SITES if k % 2 else FLAG_SITES[::-1])
            a, b = djprobe.Djprobe(first), djprobe.Djprobe(second)
            assert d.say("spin") == "spinning"
            proc.register(a)
            proc.register(b)
            assert d.say("stop") == "stopped 0"
            before = (a.hits, b.hits)
            d.go(200)
            assert (a.hits - before[0], b.hits - before[1]) == (THREADS * 200, THREADS * 200)
            assert d.say("spin") == "spinning"
            proc.unregister_many([a, b] if k % 3 else [b, a])
            assert d.say("stop") == "stopped 0"
    d.finish()


def test_record_inside_window_sees_its_own_registers(start_target, overlap_exe):
    """A record probe in the window sees the registers of its own instruction: at ov_f (the
    entry) rsp is 8 mod 16 (a return address was pushed), at ov_f+1 and ov_f+3 (after
    ``push rbx``) 0 mod 16, and at ov_f+3 (after ``mov ebx, edi``) rbx == the argument. The other
    probes of the window count; events exact in number. A second recording probe joins the window
    (or, where the stub would not fit a slot, is refused with ENOMEM and the reason, the others
    untouched)."""
    d = Driver(start_target, overlap_exe)
    seen: list[tuple[int, int, int]] = []

    def handler(djp, regs):
        seen.append((regs.rdi & 0xFFFFFFFF, regs.rbx & 0xFFFFFFFF, regs.rsp))

    with djprobe.attach(d.t.pid) as proc:
        for site in SITES:
            counting = [proc.register(djprobe.Djprobe(s)) for s in SITES]
            recorder = proc.register(djprobe.Djprobe(site, handler=handler))
            seen.clear()
            base = [c.hits for c in counting]
            d.go(250)
            proc.poll(0.2)
            while proc.poll(0.05):
                pass
            assert [c.hits - b for c, b in zip(counting, base)] == [THREADS * 250] * 3
            assert recorder.hits == len(seen) == THREADS * 250
            assert {rsp % 16 for _, _, rsp in seen} == {8 if site == "ov_f" else 0}, site
            if site == "ov_f+3":
                assert all(rdi == rbx for rdi, rbx, _ in seen)
            another = next(s for s in SITES if s != site)
            second = djprobe.Djprobe(another, registers="args", handler=lambda djp, regs: None)
            try:  # a second recorder fits a 2 KiB slot; where it does not, it is refused (ENOMEM)
                proc.register(second)
            except djprobe.NoRoomError as exc:
                assert "shared stub" in str(exc)
            base = [c.hits for c in counting]
            d.go(10)
            assert [c.hits - b for c, b in zip(counting, base)] == [THREADS * 10] * 3
            if second.registered:
                assert second.hits == THREADS * 10
            proc.unregister_many([p for p in (second, recorder, *counting) if p.registered])
    d.finish()


def test_status_and_cleanup_after_tracer_death(start_target, overlap_exe):
    """A tracer SIGKILLed with a shared stub in place: `cleanup` restores the whole window (one
    entry holds it) and the program's results stay right."""
    d = Driver(start_target, overlap_exe)
    code = (
        "import djprobe, os, signal, sys\n"
        f"proc = djprobe.attach({d.t.pid})\n"
        "proc.register_many([djprobe.Djprobe(s) for s in ('ov_f+3', 'ov_f', 'ov_f+1')])\n"
        "print('placed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "placed" in res.stdout, res.stderr
    d.go(100)
    res = subprocess.run(DJPROBE + ["cleanup", "-p", str(d.t.pid), "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr + res.stdout
    d.go(100)
    with djprobe.attach(d.t.pid) as proc:
        for name in ("ov_f", "ov_flags"):
            addr = proc.symbols.resolve(name)[0].address
            module = proc.symbols.module_at(addr)
            assert proc.read(addr, 10) == module.read_file(addr, 10)
    d.finish()


@pytest.mark.parametrize("func", ["ov_short", "ov_two", "ov_tail", "ov_path"])
def test_entry_and_exit_windows_share_a_stub(start_target, overlap_exe, func):
    """A short function whose exit window overlaps its entry window: the entry probe and the
    return probe share one window (entry action, ..., exit action, ret), placed and removed in
    every order while the threads spin; calls and returns exact per phase. ov_tail's exit is a
    conditional tail call in the entry window, ov_path's a branch in the entry window into a
    one-instruction exit block (path windows: the shared stub aims the branch at a copy of the
    block with the exit's action)."""
    d = Driver(start_target, overlap_exe)
    with djprobe.attach(d.t.pid) as proc:
        address = proc.symbols.resolve(func)[0].address
        module = proc.symbols.module_at(address)
        for first_return, remove_return_first in itertools.product((False, True), repeat=2):
            entry, ret = djprobe.Djprobe(func), djprobe.Djprobe(f"{func}%return")
            order = [ret, entry] if first_return else [entry, ret]
            assert d.say("spin") == "spinning"
            for p in order:
                proc.register(p)
            assert d.say("stop") == "stopped 0"
            before = (entry.hits, ret.hits)
            d.go(300)
            assert (entry.hits - before[0], ret.hits - before[1]) == (THREADS * 300, THREADS * 300)
            assert d.say("spin") == "spinning"
            first, second = (ret, entry) if remove_return_first else (entry, ret)
            proc.unregister(first)
            assert d.say("stop") == "stopped 0"
            before = second.hits
            d.go(100)
            assert second.hits - before == THREADS * 100
            proc.unregister(second)
            assert proc.read(address, 12) == module.read_file(address, 12)
    d.finish()


def test_trace_entry_and_return_in_one_window(overlap_exe):
    """`trace f f%return` on a function whose windows overlap: every call has its entry event and
    its return event with the value returned (x + 1)."""
    res = subprocess.run(DJPROBE + ["trace", "--json", "ov_short", "ov_short%return", "--", overlap_exe, "run", "50"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    events = [e for e in map(json.loads, (l for l in res.stdout.splitlines() if l.startswith("{"))) if "site" in e]
    entries = [e for e in events if e["site"].endswith("ov_short")]
    returns = [e for e in events if e["site"].endswith("ov_short%return")]
    assert len(entries) == len(returns) == THREADS * 50
    assert all(e["retval"] == (e["args"][0] + 1) & 0xFFFFFFFF for e in returns)
