"""djprobe.sites: displaced instructions, verdicts and reasons, jump tables, busy sites, coverage."""

from __future__ import annotations

import glob
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from djprobe._sys.procfs import ProcessMemory
from djprobe.sites import (
    JUMP_SIZE,
    FunctionAnalysis,
    Verdict,
    analyse_site,
    coverage,
    module_index,
)
from djprobe.symbols import Symbols
from djprobe.x86 import Flow, RelocationError, decode

TARGETS = Path(__file__).parent.parent / "targets"

SWITCH_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) int sw(int x, int y) {
    switch (x) {
    case 0: return y + 1;
    case 1: return y * 3;
    case 2: return y - 7;
    case 3: return y ^ 0x55;
    case 4: return y << 2;
    case 5: return y / 3;
    case 6: return y % 5;
    case 7: return -y;
    case 8: return y * y;
    default: return 0;
    }
}
__attribute__((noinline)) const char *name(unsigned char c) {
    switch (c) {
    case 'a': return "alpha"; case 'b': return "bravo"; case 'c': return "charlie";
    case 'd': return "delta"; case 'e': return "echo"; case 'f': return "foxtrot";
    case 'g': return "golf"; case 'h': return "hotel"; default: return "?";
    }
}
int main(int argc, char **argv) {
    int s = 0;
    for (int i = 0; i < 10; i++) s += sw(i, argc);
    printf("%d %s\n", s, name(argc > 1 ? argv[1][0] : 'a'));
    return 0;
}
"""


@pytest.fixture(scope="module")
def sites_bin():
    from tests.conftest import compile_c

    return compile_c(TARGETS / "sites.S")


@pytest.fixture(scope="module")
def syms(sites_bin):
    return Symbols.from_file(sites_bin)


def site(syms, spec, size=None):
    (resolved,) = syms.resolve(f"{syms.modules[0].path}:{spec}")
    return analyse_site(syms, resolved, size)


# --- verdicts on hand-written functions ---------------------------------------------------


@pytest.mark.parametrize(
    "spec, size, ninsns",
    [
        ("f_rip", 7, 1),  # RIP-relative mov at entry
        ("f_lea", 7, 1),  # RIP-relative lea at entry
        ("f_jcc", 9, 3),  # short jcc inside, target outside
        ("f_call_last", 5, 1),  # call rel32 as the last displaced instruction
        ("f_table_out", 5, 2),  # jump-table cases stay out of the entry
        ("f_tailptr", 7, 2),  # tail call through a loaded pointer: no unknown targets
    ],
)
def test_jump_sites(syms, spec, size, ninsns):
    res = site(syms, spec)
    assert res.verdict is Verdict.JUMP, res.reason
    assert res.size == size
    assert len(res.displaced) == ninsns
    assert res.at_entry and res.flags_dead
    assert not res.busy
    assert sum(i.length for i in res.displaced) == size
    assert res.reason.startswith("jump")


@pytest.mark.parametrize(
    "spec, size, needle",
    [
        ("f_icall", None, "'call rdi' at"),
        ("f_syscall+5", None, "'syscall' at"),
        ("f_loop", None, "lands at"),
        ("f_int3", None, "int3"),
        ("f_tiny", None, "only 3 byte(s)"),
        ("f_table_in", None, "jump table of the jmp"),
        ("f_unknown", None, "with unknown targets"),
        ("f_rip+1", None, "not an instruction boundary"),
        ("f_rip", 4, "less than the 5 bytes"),
        ("f_jcc", 6, "ends inside"),
        ("f_rip", 16, "cross the end"),
        ("f_call_last", 8, "'call 0x"),  # call not last with an explicit size
    ],
)
def test_refused_sites(syms, spec, size, needle):
    res = site(syms, spec, size)
    assert res.verdict is Verdict.REFUSED
    assert needle in res.reason, res.reason
    assert not res.busy
    assert res.to_json()["verdict"] == "refused"


def test_call_not_last_reason_names_return(syms):
    res = site(syms, "f_icall")
    assert "return from the call into the displaced bytes" in res.reason
    res = site(syms, "f_syscall+5")
    assert "return from the syscall" in res.reason


def test_loop_target_is_byte_2(syms):
    res = site(syms, "f_loop")
    f = syms.modules[0].symbols("f_loop")[0]
    assert f"lands at {f.address + 2:#x}" in res.reason


def test_table_in_names_case(syms):
    res = site(syms, "f_table_in")
    f = syms.modules[0].symbols("f_table_in")[0]
    assert f"has a case at {f.address + 2:#x}" in res.reason


def test_tiny_padded_overwrites_padding_only(syms):
    res = site(syms, "f_tiny_padded")
    assert res.verdict is Verdict.JUMP, res.reason
    assert [i.text for i in res.displaced] == ["ret"]
    assert res.padding and all(i.instruction.mnemonic != 0 for i in res.padding)
    assert res.size >= JUMP_SIZE
    assert res.size == 1 + sum(i.length for i in res.padding)
    assert "padding" in res.reason


def test_explicit_size_whole_instructions(syms):
    res = site(syms, "f_jcc", 4 + 5)
    assert res.verdict is Verdict.JUMP
    assert res.size == 9


def test_raw_address_without_function_is_refused(syms):
    m = syms.modules[0]
    (orphan,) = [s for s in m.all_symbols() if s.name == "orphan_label"]
    res = analyse_site(syms, orphan.address + 2)
    assert res.verdict is Verdict.REFUSED
    assert f"no symbol covers {orphan.address + 2:#x}; cannot check branch targets" == res.reason


def test_mid_function_sites(syms):
    """Every boundary of f_table_out: the case labels are entries, so sites covering one are refused."""
    m = syms.modules[0]
    f = m.symbols("f_table_out")[0]
    fa = FunctionAnalysis(m, f)
    idx = module_index(m)
    (table,) = [t for r in idx._regions.values() for t in r.tables if f.address <= t[0] < f.end]
    targets = table[2]
    assert len(targets) == 4
    for a in fa.boundaries():
        res = fa.analyse(a)
        if res.verdict is Verdict.JUMP:
            assert not any(a < t < a + res.size for t in targets)
            assert res.displaced[0].address == a
        elif any(a < t < a + 5 for t in targets):
            assert "jump table" in res.reason or "lands at" in res.reason or "follows" in res.reason


# --- relocation ---------------------------------------------------------------------------


def test_relocate_rip_relative_to_stub(syms):
    res = site(syms, "f_rip")
    stub = res.address + 0x10000
    rel = res.relocate_to(stub)
    insns = decode(rel.code, stub)
    assert insns[0].mem_target == syms.modules[0].symbols("gvar")[0].address
    assert insns[-1].flow is Flow.JUMP and insns[-1].target == res.address + res.size


def test_relocate_short_jcc_and_call(syms):
    res = site(syms, "f_jcc")
    stub = res.address + 0x100000
    rel = res.relocate_to(stub)
    jcc = [i for i in decode(rel.code, stub) if i.flow is Flow.COND_JUMP]
    assert jcc and jcc[0].target == res.displaced[1].target
    res = site(syms, "f_call_last")
    rel = res.relocate_to(stub)
    # a displaced call returns to the original code after it: push that address, jmp the callee
    out = decode(rel.code, stub)
    branches = [i for i in out if i.flow in (Flow.CALL, Flow.JUMP)]
    assert branches[0].target == res.displaced[0].target
    assert rel.address_map.get(res.address + 5, res.address + 5) == res.address + 5


def test_relocate_out_of_reach(syms):
    res = site(syms, "f_rip")
    with pytest.raises(RelocationError) as ei:
        res.relocate_to(res.address + (3 << 31))
    assert ei.value.out_of_reach


def test_relocate_refused_raises(syms):
    res = site(syms, "f_loop")
    with pytest.raises(ValueError):
        res.relocate_to(res.address + 0x1000)
    assert res.error().errno == 22


def test_to_json_keys(syms):
    j = site(syms, "f_jcc").to_json()
    for key in ("site", "address", "size", "verdict", "reason", "instructions"):
        assert key in j
    assert j["verdict"] == "jump"
    assert j["instructions"][0] == {"address": j["address"], "bytes": "85ff", "text": "test edi,edi"}


# --- busy: someone else's patch in a live process ---------------------------------------------


@pytest.fixture
def live_sites(sites_bin, start_target):
    t = start_target([sites_bin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == b"ready\n"
    yield t
    t.proc.stdin.close()


@pytest.mark.parametrize("patch, offset", [(b"\xcc", 0), (b"\xcc", 3), (b"\xe9\x00\x00\x00\x00", 0)])
def test_busy_when_patched_live(live_sites, patch, offset):
    with Symbols.from_process(live_sites.pid) as syms, ProcessMemory(live_sites.pid) as mem:
        (resolved,) = syms.resolve(f"{os.path.basename(syms.modules[0].path)}:f_rip")
        before = analyse_site(syms, resolved, memory=mem)
        assert before.verdict is Verdict.JUMP, before.reason
        orig = mem.read(resolved.address + offset, len(patch))
        mem.write(resolved.address + offset, patch)
        try:
            res = analyse_site(syms, resolved, memory=mem)
        finally:
            mem.write(resolved.address + offset, orig)
        assert res.verdict is Verdict.REFUSED and res.busy
        assert "already patched" in res.reason
        assert res.error().errno == 16  # EBUSY
        assert ("int3" if patch == b"\xcc" else "jmp rel32") in res.reason


# --- real jump tables from gcc ----------------------------------------------------------------


@pytest.mark.parametrize("flags", [("-O2", "-fPIE", "-pie"), ("-O2", "-fno-pie", "-no-pie"), ("-O2", "-fPIC", "-shared")])
def test_gcc_switch_tables(build_c, flags):
    path = build_c(SWITCH_SRC, *flags, name="switch")
    syms = Symbols.from_file(path)
    m = syms.modules[0]
    idx = module_index(m)
    rep = coverage(m, all_boundaries=True)
    sw = m.symbols("sw")[0]
    fa = FunctionAnalysis(m, sw)
    assert fa.analyse(sw.address).verdict is Verdict.JUMP
    # no indirect jump of the program is left with unknown targets
    idx._analyse_tables()
    assert not idx._unknown_jumps
    tables = [t for r in idx._regions.values() for t in r.tables if sw.address <= t[0] < sw.end]
    if "-no-pie" not in flags:
        # PIC: relative int32 tables; the bound (cmp 8; ja) gives 9 cases
        assert len(tables) == 1
        assert len(tables[0][2]) >= 8
        assert all(sw.address < t < sw.end for t in tables[0][2])
    # every boundary that takes a jump has no case label strictly inside
    cases = {t for tb in tables for t in tb[2]} | set(idx._static_entries()[0])
    for a in fa.boundaries():
        res = fa.analyse(a)
        if res.verdict is Verdict.JUMP:
            assert not any(a < c < a + res.size for c in cases)
    assert rep.entries_jump == rep.entries or rep.entry_ratio > 0.9


# --- coverage of the machine's libraries --------------------------------------------------------


def _libpython() -> str | None:
    cands = [
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
        os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "-"),
    ] + sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libpython3*.so.1.0"))
    return next((c for c in cands if os.path.isfile(c)), None)


LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.mark.slow
@pytest.mark.parametrize("path", [LIBC, "libpython"])
def test_entry_coverage(path):
    if path == "libpython":
        path = _libpython()
    if path is None or not os.path.isfile(path):
        pytest.skip("library not present")
    m = Symbols.from_file(path).modules[0]
    rep = coverage(m)
    print(f"\n{path}: {rep.entries_jump}/{rep.entries} entries take a jump "
          f"({100 * rep.entry_ratio:.2f}%) in {rep.seconds:.1f} s; refused: {dict(rep.refused)}")
    assert rep.entry_ratio >= 0.99
    assert rep.seconds < 60


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_all_boundaries_coverage_libc():
    if not os.path.isfile(LIBC):
        pytest.skip("no libc")
    m = Symbols.from_file(LIBC).modules[0]
    rep = coverage(m, all_boundaries=True)
    print(f"\n{LIBC}: {rep.boundaries_jump}/{rep.boundaries} boundaries take a jump "
          f"({100 * rep.boundary_ratio:.2f}%) in {rep.seconds:.1f} s; refused: {dict(rep.boundary_refused)}")
    assert rep.boundary_ratio >= 0.90


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_libc_jump_sites_never_cover_a_direct_target():
    """Differential check against objdump: no jump verdict displaces bytes that an objdump-decoded
    direct branch anywhere in libc lands strictly inside."""
    if not os.path.isfile(LIBC):
        pytest.skip("no libc")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", LIBC], capture_output=True, text=True).stdout
    targets = set()
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith(("j", "call", "loop", "xbegin")):
            op = parts[2].split()[0] if parts[2].split() else ""
            try:
                targets.add(int(op, 16))
            except ValueError:
                pass
    m = Symbols.from_file(LIBC).modules[0]
    import bisect

    tl = sorted(targets)
    bad = []
    for f in m.functions()[::7]:
        fa = FunctionAnalysis(m, f)
        for a in fa.boundaries():
            res = fa.analyse(a, site=hex(a))
            if res.verdict is Verdict.JUMP:
                i = bisect.bisect_right(tl, a)
                if i < len(tl) and tl[i] < a + len(res.original.rstrip(b"")) and tl[i] < res.displaced[-1].end:
                    bad.append((hex(a), hex(tl[i])))
    assert not bad[:10]
