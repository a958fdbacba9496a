"""The trap fallback: where no jump fits, a kernel uprobe counts and records the hits.

Target: tests/targets/traps.S (one function per reason a jump is refused) called by 4 threads
(traps_main.c: 2 started before the probes are in, 2 after). Counts must be exact, the mode
"trap", and nothing of ours may stay registered in the kernel afterwards.

Short jumps (on by default) reach most of these sites with a jmp rel8 to a springboard in the
padding: the tests of the trap path pin them off (``no_short``: ``DJPROBE_SPRINGBOARDS=0``, also
for the commands they run); ``test_short_jumps_by_default_then_traps_where_no_springboard_is_left``
shows what the default does with the same sites.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import djprobe
from djprobe._sys import tracefs
from djprobe.errors import InvalidSiteError
from djprobe.traps import group_name
from tests.conftest import TARGETS, compile_c

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_short")]
DJPROBE = [sys.executable, "-m", "djprobe"]
ROOT = Path(__file__).resolve().parents[2]
TRAPPED = ("t_branch_into", "t_jumptable", "t_call_mid", "t_args")
ITERATIONS = 3000


@pytest.fixture(scope="module")
def traps_exe():
    return compile_c([TARGETS / "traps.S", TARGETS / "traps_main.c"], name="traps")


def _root() -> Path:
    return tracefs.tracefs_root()


def _ours(target_pid: int, tracer_pid: int | None = None) -> list[str]:
    """Our uprobe definitions for ``target_pid`` still in tracefs."""
    return [
        f"{e.group}/{e.name}"
        for e in tracefs.list_uprobes(_root())
        if e.group.startswith("djprobe_") and e.group.endswith(f"_{target_pid}")
        and (tracer_pid is None or e.group == group_name(tracer_pid, target_pid))
    ]


def _file_byte(exe: Path, symbol: str) -> tuple[int, int]:
    """(file offset, byte in the file) of a function's first byte."""
    from elftools.elf.elffile import ELFFile

    with open(exe, "rb") as f:
        elf = ELFFile(f)
        vaddr = next(s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == symbol)["st_value"]
        seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_vaddr"] <= vaddr < s["p_vaddr"] + s["p_filesz"])
        offset = vaddr - seg["p_vaddr"] + seg["p_offset"]
        f.seek(offset)
        return offset, f.read(1)[0]


def _live_byte(pid: int, address: int) -> int:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(1)[0]


def _start(traps_exe, iterations=ITERATIONS):
    target = subprocess.Popen([str(traps_exe), str(iterations), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = target.stdout.readline().split()
    assert line[0] == b"ready"
    return target


def _finish(target) -> str:
    target.stdin.write(b"g")
    target.stdin.flush()
    done = target.stdout.readline().decode()
    return done


def _end(target) -> None:
    if target.poll() is None:
        try:
            target.stdin.write(b"x")
            target.stdin.flush()
            target.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            target.kill()
            target.wait(timeout=10)


def _perf_fds(pid: int | str = "self") -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            pass
    return n


def test_each_refusal_reason_counts_exactly_through_a_trap(traps_exe):
    target = _start(traps_exe)
    fds_before = _perf_fds()
    try:
        with djprobe.attach(target.pid) as proc:
            proc.trap_fallback = True
            probes = [djprobe.Djprobe(name) for name in TRAPPED] + [djprobe.Djprobe("t_leaf")]
            assert proc.register_many(probes) == []
            modes = {d.site.split(":")[1]: d.mode for d in probes}
            assert modes == {**{n: "trap" for n in TRAPPED}, "t_leaf": "jump"}
            reasons = {d.site.split(":")[1]: d.no_jump_reason for d in probes}
            assert "inside the displaced bytes" in reasons["t_branch_into"]
            assert "jump table" in reasons["t_jumptable"]
            assert "not the last displaced instruction" in reasons["t_call_mid"]
            assert "a jump needs 5" in reasons["t_args"]
            assert reasons["t_leaf"] is None
            assert len(_ours(target.pid, os.getpid())) == len(TRAPPED)
            assert all(_live_byte(target.pid, d.address) == 0xCC for d in probes[: len(TRAPPED)])
            done = _finish(target)
            assert done.startswith("done")
            hits = {d.site.split(":")[1]: d.hits for d in probes}
            assert hits == {n: 4 * ITERATIONS for n in (*TRAPPED, "t_leaf")}  # 4 threads, 2 started later
            proc.unregister_many(probes)
            assert [d.hits for d in probes] == [4 * ITERATIONS] * len(probes)
            assert _ours(target.pid) == []
            assert _perf_fds() == fds_before  # every perf event of ours is closed
            for d in probes[: len(TRAPPED)]:
                _offset, byte = _file_byte(traps_exe, d.site.split(":")[1])
                assert _live_byte(target.pid, d.address) == byte  # the kernel took its int3 out
    finally:
        _end(target)


def test_short_jumps_by_default_then_traps_where_no_springboard_is_left(traps_exe, monkeypatch):
    """Short jumps on (the default): the sites of each refusal reason take a jmp rel8 to a
    springboard in the padding after t_branch_into, t_call_mid and t_leaf (4 springboards: 9, 8
    and 10 bytes of padding), placed in the order given; t_args, last, finds none left in reach
    and falls back to a trap, its reason saying both. Exact counts through each, 4 threads; the
    file's bytes back at every site and springboard after removal."""
    monkeypatch.delenv("DJPROBE_SPRINGBOARDS")
    names = ("t_branch_into", "t_jumptable", "t_call_mid", "t_neither", "t_args", "t_leaf")
    target = _start(traps_exe)
    try:
        with djprobe.attach(target.pid) as proc:
            assert proc.springboards is True
            proc.trap_fallback = True
            module = proc.symbols.modules[0]
            span = (module.symbols("t_branch_into")[0].address, module.symbols("t_after")[0].address)
            want = proc.read(span[0], span[1] - span[0])
            probes = [djprobe.Djprobe(name) for name in names]
            assert proc.register_many(probes) == []
            got = {d.site.split(":")[1]: (d.mode, getattr(d._instance, "springboard", None) is not None)
                   for d in probes[:5]}
            assert got == {"t_branch_into": ("jump", True), "t_jumptable": ("jump", True),
                           "t_call_mid": ("jump", True), "t_neither": ("jump", True), "t_args": ("trap", False)}
            assert "a jump needs 5" in probes[4].no_jump_reason
            assert "no short jump either: no free springboard" in probes[4].no_jump_reason
            assert len(_ours(target.pid, os.getpid())) == 1
            # the lock inc of t_neither, relocated into its stub, still counts every call exactly
            assert _finish(target).split() == ["done", str(4 * ITERATIONS)]
            hits = {d.site.split(":")[1]: d.hits for d in probes}
            assert hits == {n: 4 * ITERATIONS for n in names}
            proc.unregister_many(probes)
            assert proc.read(span[0], span[1] - span[0]) == want
            assert _ours(target.pid) == []
    finally:
        _end(target)


def test_trap_off_by_default_in_the_api_and_per_probe(traps_exe):
    target = _start(traps_exe, 10)
    try:
        with djprobe.attach(target.pid) as proc:
            with pytest.raises(InvalidSiteError, match="inside the displaced bytes"):
                proc.register(djprobe.Djprobe("t_branch_into"))
            d = proc.register(djprobe.Djprobe("t_branch_into", trap=True))
            assert d.mode == "trap"
            proc.trap_fallback = True
            with pytest.raises(InvalidSiteError, match="jump table"):
                proc.register(djprobe.Djprobe("t_jumptable", trap=False))
            _finish(target)
            assert d.hits == 40
    finally:
        _end(target)


def test_neither_jump_nor_trap_is_refused_with_both_reasons(traps_exe):
    target = _start(traps_exe, 10)
    try:
        with djprobe.attach(target.pid) as proc:
            proc.trap_fallback = True
            with pytest.raises(InvalidSiteError) as err:
                proc.register(djprobe.Djprobe("t_neither"))
            assert "a jump needs 5" in str(err.value) and "lock prefix" in str(err.value)
            assert _ours(target.pid) == []
    finally:
        _end(target)


def test_trace_arguments_through_a_trap_with_a_handler(traps_exe):
    target = _start(traps_exe, 200)
    seen: list[tuple[int, tuple]] = []
    try:
        with djprobe.attach(target.pid) as proc:
            proc.trap_fallback = True
            rec = proc.register(djprobe.Djprobe("t_args", handler=lambda djp, regs: seen.append((regs.tid, regs.args))))
            counter = proc.register(djprobe.Djprobe("t_args"))  # a second probe joins the trap
            assert rec.mode == counter.mode == "trap"
            _finish(target)
            proc.poll(timeout=0.5)
            proc.unregister_many([rec, counter])
            proc.poll()
        assert rec.hits == counter.hits == 800 and rec.missed == 0
        assert len(seen) == 800
        by_thread: dict[int, list] = {}
        for tid, args in seen:
            by_thread.setdefault(tid, []).append(args)
        assert len(by_thread) == 4
        for rows in by_thread.values():
            ids = {a[0] for a in rows}
            assert len(ids) == 1  # arg0 is the worker's id
            assert [a[1] for a in rows] == list(range(200))  # in order per thread
            assert all(a[2:] == (3, 4, 5, 6) for a in rows)
    finally:
        _end(target)


def test_cli_count_and_trace_report_the_mode(traps_exe):
    res = subprocess.run(
        DJPROBE + ["count", "--json", *TRAPPED, "t_neither", "t_leaf", "--", str(traps_exe), "500"],
        capture_output=True, text=True, timeout=90,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    rows = {p["site"].split(":")[1]: p for p in report["probes"]}
    assert {n: (p["hits"], p["mode"]) for n, p in rows.items()} == {
        **{n: (2000, "trap") for n in TRAPPED}, "t_leaf": (2000, "jump")}
    assert "jump table" in rows["t_jumptable"]["no_jump_reason"]
    assert [r["site"].split(":")[1] for r in report["refused"]] == ["t_neither"]
    assert "traced by a trap" in res.stderr

    text = subprocess.run(DJPROBE + ["count", "t_call_mid", "t_leaf", "--", str(traps_exe), "50"],
                          capture_output=True, text=True, timeout=90)
    table = [line.split() for line in text.stdout.splitlines() if line.startswith(("traps", "FUNC"))]
    assert table[0] == ["FUNC", "MODE", "COUNT"]
    assert sorted(row[1:] for row in table[1:]) == [["jump", "200"], ["trap", "200"]]

    res = subprocess.run(DJPROBE + ["trace", "--json", "t_args", "--", str(traps_exe), "5"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    events = [x for x in lines if "tid" in x]
    assert sorted((e["args"][0], e["args"][1]) for e in events) == sorted((t, i) for t in range(4) for i in range(5))
    assert all(e["args"][2:] == [3, 4, 5, 6] and e["site"].endswith(":t_args") for e in events)
    summary = lines[-1]["summary"]
    assert [(s["hits"], s["delivered"], s["mode"]) for s in summary] == [(20, 20, "trap")]


def test_cli_no_trap_refuses_as_before(traps_exe):
    res = subprocess.run(
        DJPROBE + ["count", "--json", "--no-trap", "t_branch_into", "t_leaf", "--", str(traps_exe), "10"],
        capture_output=True, text=True, timeout=90,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(p["site"].split(":")[1], p["mode"]) for p in report["probes"]] == [("t_leaf", "jump")]
    assert [r["site"].split(":")[1] for r in report["refused"]] == ["t_branch_into"]
    assert "inside the displaced bytes" in report["refused"][0]["reason"]


def test_cli_no_short_flag(traps_exe, monkeypatch):
    """Default: count --no-trap takes a short jump at t_branch_into (mode jump, exact count);
    --no-short refuses it as before (the site's reason); DJPROBE_SPRINGBOARDS unset for both."""
    monkeypatch.delenv("DJPROBE_SPRINGBOARDS")
    for flags, want in ((["--no-trap"], [("t_branch_into", "jump", 40), ("t_leaf", "jump", 40)]),
                        (["--no-trap", "--no-short"], [("t_leaf", "jump", 40)])):
        res = subprocess.run(DJPROBE + ["count", "--json", *flags, "t_branch_into", "t_leaf", "--", str(traps_exe), "10"],
                             capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert sorted((p["site"].split(":")[1], p["mode"], p["hits"]) for p in report["probes"]) == want, flags
        if "--no-short" in flags:
            assert [r["site"].split(":")[1] for r in report["refused"]] == ["t_branch_into"]
            assert "inside the displaced bytes" in report["refused"][0]["reason"]
        else:
            assert report["refused"] == []


TRACER = textwrap.dedent(
    """
    import sys, djprobe
    proc = djprobe.attach(int(sys.argv[1]))
    proc.trap_fallback = True
    probes = [djprobe.Djprobe(n) for n in ("t_branch_into", "t_jumptable")]
    probes.append(djprobe.Djprobe("t_args", record=True, registers="args"))
    assert proc.register_many(probes) == []
    print("placed", flush=True)
    sys.stdin.read()
    """
)


def test_tracer_killed_leaves_no_breakpoint_and_cleanup_deletes_the_definitions(traps_exe):
    target = _start(traps_exe, 1000)
    tracer = None
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(target.pid)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env)
        assert tracer.stdout.readline() == b"placed\n"
        syms = djprobe.symbols.Symbols.from_process(target.pid)
        addresses = {n: syms.resolve(f"{traps_exe.name}:{n}")[0].address for n in ("t_branch_into", "t_jumptable", "t_args")}
        assert all(_live_byte(target.pid, a) == 0xCC for a in addresses.values())
        assert len(_ours(target.pid, tracer.pid)) == 3
        perf_fds = [fd for fd in os.listdir(f"/proc/{tracer.pid}/fd")
                    if os.readlink(f"/proc/{tracer.pid}/fd/{fd}") == "anon_inode:[perf_event]"]
        assert len(perf_fds) >= 3
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=10)
        for name, address in addresses.items():
            assert _live_byte(target.pid, address) == _file_byte(traps_exe, name)[1], name  # int3 gone with the fds
        assert len(_ours(target.pid, tracer.pid)) == 3  # only the (unused) definitions stay
        assert _finish(target).startswith("done")  # the target runs on, unharmed
        st = subprocess.run(DJPROBE + ["status", "--json", "-p", str(target.pid)], capture_output=True, text=True,
                            timeout=60, env=env)
        traps = json.loads(st.stdout)["traps"]
        assert sorted(t["address"] for t in traps) == sorted(addresses.values())
        assert not any(t["tracer_alive"] for t in traps)
        res = subprocess.run(DJPROBE + ["cleanup", "--stale"], capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "deleted trap uprobe" in res.stdout
        assert _ours(target.pid) == []
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)
        _end(target)


def test_probes_placed_while_target_is_held_before_main(traps_exe):
    """Spawn mode: the trap goes in before main (one thread), all 4 later threads are counted."""
    proc = djprobe.spawn([str(traps_exe), "100"], stdout=subprocess.PIPE)
    try:
        proc.trap_fallback = True
        d = proc.register(djprobe.Djprobe("t_jumptable"))
        assert d.mode == "trap"
        proc.start()
        proc.process.popen.wait(timeout=60)
        proc.unregister(d)
        assert d.hits == 400
    finally:
        proc.close()


def test_kernel_refuses_exactly_what_the_rules_say():
    """x86/uprobe_rules.py against the running kernel: a uprobe on each instruction of
    uprobe_insns.S, placed in a live process, is refused (ENOTSUPP) exactly where the rules say."""
    from elftools.elf.elffile import ELFFile

    from djprobe._sys import perf
    from djprobe.x86.uprobe_rules import uprobe_refusal

    exe = compile_c([TARGETS / "uprobe_insns.S"], name="uprobe_insns")
    data = exe.read_bytes()
    with open(exe, "rb") as f:
        syms = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()
                if s.name.startswith("i_")}
    assert len(syms) == 16
    target = subprocess.Popen([str(exe)])  # returns once exec succeeded: its code is mapped
    root = _root()
    group = f"djprobe_{os.getpid()}_{target.pid}"
    verdicts = {}
    try:
        for name, offset in syms.items():  # PIE from gcc: file offset = vaddr for .text
            event = tracefs.add_uprobe(root, group, name, str(exe), offset)
            try:
                os.close(perf.perf_event_open(perf.Attr(type=perf.PERF_TYPE_TRACEPOINT, config=event), target.pid, -1))
                kernel = True
            except OSError as exc:
                assert exc.errno == 524, (name, exc)  # ENOTSUPP
                kernel = False
            finally:
                tracefs.delete_uprobe(root, group, name)
            verdicts[name] = (kernel, uprobe_refusal(data[offset : offset + 15]) is None)
    finally:
        target.kill()
        target.wait(timeout=10)
    assert all(k == r for k, r in verdicts.values()), verdicts
    accepted = sorted(n for n, (k, _) in verdicts.items() if k)
    assert accepted == ["i_fs", "i_nop66", "i_plain", "i_rep", "i_syscall", "i_ud2", "i_vex"]


def test_trap_only_where_a_jump_fits_and_never_inside_an_instruction(traps_exe):
    target = _start(traps_exe, 100)
    try:
        with djprobe.attach(target.pid) as proc:
            forced = proc.register(djprobe.Djprobe("t_leaf", trap="only"))
            assert forced.mode == "trap" and "trap='only'" in forced.no_jump_reason
            jump = proc.register(djprobe.Djprobe("t_after"))  # never called: a jump fits
            assert jump.mode == "jump"
            with pytest.raises(InvalidSiteError, match="not an instruction boundary"):
                proc.register(djprobe.Djprobe("t_branch_into+1", trap=True))
            with pytest.raises(InvalidSiteError, match="trap must be"):
                djprobe.Djprobe("t_leaf", trap="yes")
            _finish(target)
            assert forced.hits == 400 and jump.hits == 0
            proc.unregister_many([forced, jump])
        assert _ours(target.pid) == []
    finally:
        _end(target)


def test_cli_ctrl_c_leaves_nothing_in_the_kernel(traps_exe):
    target = _start(traps_exe, 100)
    try:
        cli = subprocess.Popen(DJPROBE + ["count", "--json", "-p", str(target.pid), "t_branch_into", "t_args"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        banner = cli.stderr.readline()  # written once the probes are in
        assert banner.startswith("Tracing 2 functions"), banner
        assert len(_ours(target.pid, cli.pid)) == 2
        assert _finish(target).startswith("done")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert sorted((p["hits"], p["mode"]) for p in report["probes"]) == [(400, "trap"), (400, "trap")]
        assert _ours(target.pid) == []
        for name in ("t_branch_into", "t_args"):
            address = djprobe.symbols.Symbols.from_process(target.pid).resolve(f"{traps_exe.name}:{name}")[0].address
            assert _live_byte(target.pid, address) == _file_byte(traps_exe, name)[1]
    finally:
        _end(target)
