"""Typed arguments and strings in 32-bit (i386) processes (issues 11 and 16): cdecl arguments from
the stack, ILP32 types, ``char *`` copied at the hit by the 32-bit fetch stub (``int 0x80``
``process_vm_readv``). The target is tests/targets/strings.c built with ``gcc -m32``: threads
overwrite their buffer right after each call, then NULL, (char *)1, an unmapped page, a page edge
and a 1,000-byte string; a forked child; a ``long long`` parameter (two stack words)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

import djprobe
from djprobe.arch import I386
from djprobe.area import AreaLayout
from djprobe.fetched import FetchedString

from ..conftest import TARGETS, compile_c
from .test_strings import PROTO, _check_specials, _spawn, _unprobed

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]
THREADS, CALLS = 4, 3000


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def strings32(request):
    try:
        return compile_c(TARGETS / "strings.c", "-m32", *request.param, name="strings32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


def test_strings_at_the_hit_every_thread_every_call_32bit(strings32):
    """Only a copy taken at the hit shows ``t<thread>-<i>`` (the buffer is overwritten after each
    call); every event, per-thread order, ``long`` as 32 bits (n = -1 is -1); bad pointers are
    error values and the target's output is unchanged."""
    expected_out = _unprobed(strings32, THREADS, CALLS)
    proc, djp, batch, out = _spawn(
        [strings32, THREADS, CALLS], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO, lossless=True))
    )
    with proc:
        assert proc.process.arch is I386
        assert out == expected_out
        assert djp.prototype.slots == ((0, 1), (1, 1)) and djp.strings == 1
        code = djp._instance.stub.code  # system calls through __kernel_vsyscall, not int 0x80
        assert b"\xcd\x80" not in code
        assert djp.hits == THREADS * CALLS + 6 and djp.missed == 0 and len(batch) == djp.hits
        per_thread: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for tid, text, value in zip(batch.events["tid"].tolist(), batch.column("s"), batch.column("n")):
            per_thread[tid].append((text, value))
        workers = [calls for calls in per_thread.values() if len(calls) == CALLS]
        assert len(workers) == THREADS
        seen = set()
        for calls in workers:
            t = calls[0][0].split("-")[0]
            assert calls == [(f"{t}-{i}", i) for i in range(CALLS)]
            assert all(isinstance(text, FetchedString) and not text.truncated for text, _ in calls)
            seen.add(t)
        assert seen == {f"t{t}" for t in range(THREADS)}
        (main,) = [calls for calls in per_thread.values() if len(calls) == 6]
        by_n = {value: text for text, value in main}
        _check_specials(by_n, AreaLayout.string_size)
        assert by_n[-3].address < 1 << 32


def test_handler_named_arguments_larger_strings_and_a_long_long_32bit(strings32):
    """``regs.args`` by name; a 256-byte string size truncates the 1,000-byte string at 256; a
    ``long long`` takes two stack words and the ``char *`` after it is fetched from the third."""
    seen, wide = [], []

    def handler(djp, regs):
        seen.append((regs.args.n, regs.args.s, regs.args[1]))

    def wide_handler(djp, regs):
        wide.append(regs.args.named())

    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(strings32), "1", "50", "wide"], stdout=write_fd)
    os.close(write_fd)
    with proc:
        proc.layout = AreaLayout(string_size=256)
        proc.register(djprobe.Djprobe("ev_str", handler=handler, prototype=PROTO))
        w = proc.register(djprobe.Djprobe("ev_wide", handler=wide_handler, prototype="long long v, char *s, int k"))
        assert w.prototype.slots == ((0, 2), (2, 1), (3, 1)) and w.strings == 0b100
        proc.start()
        while proc.process.is_alive():
            proc.poll(0.2)
        proc.poll(0.0)
        with os.fdopen(read_fd) as out:
            assert out.read() == _unprobed(strings32, 1, 50, "wide")
        assert proc.process.popen.wait(timeout=30) == 0
    assert len(seen) == 56
    assert [(n, str(s)) for n, s, _ in seen[:50]] == [(i, f"t0-{i}") for i in range(50)]
    assert all(raw == n % 2**32 for n, _, raw in seen)  # the raw stack word next to the typed value
    _check_specials({n: s for n, s, _ in seen[50:]}, 256)
    assert wide == [{"v": -0x123456789ABCDEF, "s": "wide", "k": -7}]


def test_forked_32bit_child_reads_its_own_memory(strings32):
    """The TID the stub names the process by comes from ``gs:[tid_offset]``, which glibc updates
    in a forked child: the child's call shows the child's buffer."""
    proc, djp, batch, out = _spawn(
        [strings32, 1, 1, "fork"], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO))
    )
    with proc:
        assert out == _unprobed(strings32, 1, 1, "fork")
        by_n = {int(n): (s, tid) for n, s, tid in zip(batch.column("n"), batch.column("s"), batch.events["tid"].tolist())}
        assert by_n[100][0] == "child-side" and by_n[200][0] == "parent-side"
        assert by_n[100][1] != by_n[200][1]
        assert djp.hits == len(batch) == 9


def test_trace_text_and_json_32bit(strings32, tmp_path):
    expected_out = _unprobed(strings32, 2, 20)
    report = tmp_path / "report.txt"
    res = subprocess.run([*DJPROBE, "trace", "-o", str(report), f"ev_str({PROTO})", "--", str(strings32), "2", "20"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected_out
    hits = [line for line in report.read_text().splitlines() if ":ev_str s=" in line]
    assert len(hits) == 46
    assert sum(line.endswith(f' s="t1-{i}" n={i}') for line in hits for i in range(20)) == 20
    assert any(line.endswith(" s=0x1<EFAULT> n=-2") for line in hits)
    assert any(line.endswith(" s=0x0<EFAULT> n=-1") for line in hits)
    assert any(line.endswith(' s="' + "b" * 64 + '"... n=-6') for line in hits)
    res = subprocess.run([*DJPROBE, "trace", "--json", "ev_wide(long long v, const char *s, int k)", "--",
                          str(strings32), "1", "1", "wide"], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert [e["args"] for e in events] == [{"v": -0x123456789ABCDEF, "s": "wide", "k": -7}]



def test_trace_takes_the_32bit_prototype_from_dwarf():
    """Without a written prototype, `trace` reads ev_wide's from the -m32 file's DWARF: the
    ``long long`` joined from two stack words, the string fetched from the third."""
    exe = compile_c(TARGETS / "strings.c", "-m32", "-g", name="strings32g")
    res = subprocess.run([*DJPROBE, "trace", "ev_wide", "ev_str", "--", str(exe), "1", "2", "wide"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sum(line.endswith(':ev_wide v=-81985529216486895 s="wide" k=-7') for line in lines) == 1
    assert sum(line.endswith(' s="t0-1" n=1') for line in lines) == 1


def test_trap_in_a_32bit_process_records_the_cdecl_arguments(strings32):
    """A recording uprobe (trap='only') in a 32-bit process samples the user stack: the typed
    arguments come from [esp+4].. as at a jump; strings are not copied at a trap (None), the raw
    pointer is there; esp/eip-side registers are the i386 ones."""
    seen = []

    def handler(djp, regs):
        seen.append((regs.args.n, regs.args.s, regs.arg0, regs.esp))

    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(strings32), "2", "30"], stdout=write_fd)
    os.close(write_fd)
    with proc:
        d = proc.register(djprobe.Djprobe("ev_str", handler=handler, prototype=PROTO, trap="only"))
        assert d.mode == "trap"
        proc.start()
        while proc.process.is_alive():
            proc.poll(0.2)
        proc.poll(0.0)
        with os.fdopen(read_fd) as out:
            assert out.read() == _unprobed(strings32, 2, 30)
        assert proc.process.popen.wait(timeout=30) == 0
    assert d.hits == len(seen) == 66
    assert sorted(n for n, *_ in seen) == sorted(list(range(30)) * 2 + [-1, -2, -3, -4, -5, -6])
    assert all(s is None for _, s, _, _ in seen)
    by_n = {n: (raw, esp) for n, _, raw, esp in seen}
    assert by_n[-1][0] == 0 and by_n[-2][0] == 1
    assert all(0 < esp < 1 << 32 and esp % 4 == 0 for _, esp in by_n.values())


def test_32bit_string_rings_lossless_wait_and_drops(strings32):
    """Rings of 4 string records: lossless, the 32-bit fetch stub waits for the consumer (every
    event arrives, in order); without it, hits stay exact and what did not fit is counted missed."""
    small = AreaLayout(string_ring_slots=4)
    proc, djp, batch, out = _spawn(
        [strings32, 2, 2000], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO, lossless=True)), small
    )
    with proc:
        assert out == _unprobed(strings32, 2, 2000)
        assert djp.hits == 4006 and djp.missed == 0 and len(batch) == 4006
        assert proc.waited_seconds > 0  # the stub did wait for room
        per_thread: dict[int, list[int]] = defaultdict(list)
        for tid, value in zip(batch.events["tid"].tolist(), batch.column("n")):
            per_thread[tid].append(value)
        assert sorted(len(v) for v in per_thread.values()) == [6, 2000, 2000]
        assert all(v == list(range(2000)) for v in per_thread.values() if len(v) == 2000)
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(strings32), "2", "2000"], stdout=write_fd)
    os.close(write_fd)
    with proc:
        proc.layout = small
        d = proc.register(djprobe.Djprobe("ev_str", prototype=PROTO))
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0  # nobody drains meanwhile
        with os.fdopen(read_fd) as out:
            assert out.read() == _unprobed(strings32, 2, 2000)
        batch = proc.read_events()
        assert d.hits == 4006 and len(batch) + d.missed == 4006 and d.missed > 0


def test_32bit_fetch_stub_with_int80_when_no_vsyscall_is_known(strings32, monkeypatch):
    """Without an AT_SYSINFO the stub issues ``int 0x80``: the same events."""
    import djprobe.probes as probes_module

    monkeypatch.setattr(probes_module, "kernel_vsyscall", lambda pid: None)
    proc, djp, batch, out = _spawn(
        [strings32, 2, 200], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO, lossless=True))
    )
    with proc:
        assert b"\xcd\x80" in djp._instance.stub.code
        assert out == _unprobed(strings32, 2, 200)
        assert djp.hits == len(batch) == 406 and djp.missed == 0
        texts = sorted(str(s) for s, n in zip(batch.column("s"), batch.column("n")) if n >= 0)
        assert texts == sorted(f"t{t}-{i}" for t in range(2) for i in range(200))
        (main,) = [tid for tid in set(batch.events["tid"].tolist()) if (batch.events["tid"] == tid).sum() == 6]
        by_n = {n: s for s, n, tid in zip(batch.column("s"), batch.column("n"), batch.events["tid"].tolist())
                if tid == main}
        _check_specials(by_n, AreaLayout.string_size)
