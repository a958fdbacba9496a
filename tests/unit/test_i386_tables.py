"""i386 PIC jump tables in site analysis (sites/tables32.py): the cases of ``switch`` tables
addressed through the GOT pointer are read (bounded by their guards), checked against the
assembler's own labels; sites outside the cases take a jump, and no window that takes one ever
holds a case strictly inside."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from djprobe.sites import FunctionAnalysis, Verdict, analyse_site
from djprobe.sites.index import module_index
from djprobe.symbols import Symbols

from ..conftest import TARGETS, compile_c

SWITCHES = r"""
__attribute__((noinline)) int classify(int c, int x) {
    switch (c) {
    case 0: return x + 1;
    case 1: return x * 3;
    case 2: return x - 7;
    case 3: return x ^ 0x55;
    case 4: return x << 2;
    case 5: return x / 3;
    case 7: return -x;
    case 8: return x & 15;
    default: return 0;
    }
}
__attribute__((noinline)) const char *name_of(unsigned k, int *n) {
    switch (k) {
    case 10: *n += 1; return "ten";
    case 11: *n += 2; return "eleven";
    case 12: *n *= 3; return "twelve";
    case 14: *n -= 4; return "fourteen";
    case 15: *n ^= 5; return "fifteen";
    case 16: *n |= 6; return "sixteen";
    default: return "other";
    }
}
int main(int argc, char **argv) { int n = argc; return classify(argc, n) + (name_of(argc, &n)[0] == 'x'); }
"""


def _jumps(ix, start: int, end: int) -> list[int]:
    r = ix.region_at(start)
    return [i.address for i in r.insns if start <= i.address < end and i.text.startswith("jmp e")]


def _starts(ix, lo: int, hi: int) -> list[int]:
    """Every instruction start in [lo, hi), over the decoded regions that cover it."""
    out, at = [], lo
    while at < hi:
        r = ix.region_at(at)
        if r is None:
            at += 1
            continue
        out += [i.address for i in r.insns if at <= i.address < hi]
        at = max(r.end, at + 1)
    return sorted(set(out))


@pytest.fixture(scope="module")
def asm32():
    try:
        main = "int sw_got(int), sw_spill(int), sw_self(int);\nint main(void) { return sw_got(1) + sw_spill(2) + sw_self(2); }\n"
        return compile_c([TARGETS / "tables32.S", _write("tables32_main.c", main)], "-m32", "-fPIE", "-pie",
                         name="tables32")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here: {exc}")


def _write(name: str, text: str) -> Path:
    from ..conftest import _BUILD_DIR

    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    path = _BUILD_DIR / name
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def test_pic_tables_read_exactly(asm32):
    """gcc's form (G from the PC thunk), the PIC register reloaded from the stack, and glibc's
    table-relative form without a guard: the cases are exactly the labels of each table."""
    syms = Symbols.from_file(asm32)
    ix = module_index(syms.modules[0])
    addr = {n: syms.resolve(n)[0].address for n in (
        "sw_got", "sw_got_c0", "sw_got_c1", "sw_got_c2", "sw_got_default", "sw_spill", "sw_spill_c0", "sw_spill_c1",
        "sw_spill_c2", "sw_self", "sw_self_c0", "sw_self_c1", "sw_unguarded_spill")}
    cases = {
        "sw_got": ["sw_got_c0", "sw_got_c1", "sw_got_c2", "sw_got_default"],
        "sw_spill": ["sw_spill_c0", "sw_spill_c1", "sw_spill_c2"],
        "sw_self": ["sw_self_c0", "sw_self_c1"],
    }
    for fn, labels in cases.items():
        (jmp,) = _jumps(ix, addr[fn], addr[labels[0]])
        assert ix.jump_targets(jmp) == (sorted(addr[n] for n in labels), False), fn
    # no guard and the base unknown: unknown targets, the function's sites are refused
    (jmp,) = _jumps(ix, addr["sw_unguarded_spill"], addr["sw_unguarded_spill"] + 40)
    assert ix.jump_targets(jmp) is None
    res = analyse_site(syms, addr["sw_unguarded_spill"])
    assert res.verdict is Verdict.REFUSED and "unknown targets" in res.reason
    assert analyse_site(syms, addr["sw_got"]).verdict is Verdict.JUMP  # refused before: unknown targets


@pytest.mark.parametrize("flags", [("-fPIC", "-shared"), ("-fPIE", "-pie")], ids=["so", "pie"])
def test_compiled_switches_against_the_assembler_labels(flags, tmp_path):
    """gcc -m32 -O2 switches: the tables read equal the ``.long .LN@GOTOFF`` lines of gcc's own
    assembly, resolved by the assembler (``-Wa,-L`` keeps the local labels: an independent
    reading); and over every instruction start of the two functions, no window that takes a jump
    holds a case strictly inside."""
    src = tmp_path / "sw.c"
    src.write_text(SWITCHES)
    asm = tmp_path / "sw.s"
    try:
        subprocess.run(["gcc", "-m32", "-O2", *flags[:1], "-S", str(src), "-o", str(asm)], check=True, timeout=60)
        exe = compile_c(SWITCHES, "-m32", "-O2", *flags, name="switch32")
        labelled = tmp_path / "labelled"
        subprocess.run(["gcc", "-m32", "-O2", *flags, "-Wa,-L", str(src), "-o", str(labelled)], check=True,
                       timeout=60)
    except (subprocess.CalledProcessError, RuntimeError) as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here: {exc}")
    text = asm.read_text()
    tables: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^(\.L\d+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"^\s+\.long\s+(\.L\d+)@GOTOFF", line)
        if m and current:
            tables.setdefault(current, []).append(m.group(1))
    assert len(tables) == 2, text
    nm = subprocess.run(["nm", str(labelled)], capture_output=True, text=True, check=True).stdout
    where = {p[2]: int(p[0], 16) for p in (line.split() for line in nm.splitlines()) if len(p) == 3}
    want = sorted(sorted({where[lab] for lab in labs}) for labs in tables.values())

    # the assembler keeps the .L labels that @GOTOFF relocations name: strip them, so that only
    # the tables mark the cases (as in a stripped library)
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "-w", "-N", ".L*", str(exe), str(stripped)], check=True, timeout=60)
    assert ".L" not in subprocess.run(["nm", str(stripped)], capture_output=True, text=True).stdout
    syms = Symbols.from_file(stripped)
    m = syms.modules[0]
    ix = module_index(m)
    got = []
    table_refusals = 0  # windows over a case (no symbol marks it: only the table does)
    for name in ("classify", "name_of"):
        f = syms.resolve(name)[0]
        (jmp,) = _jumps(ix, f.address, f.address + f.function.size)
        found = ix.jump_targets(jmp)
        assert found is not None, name
        got.append(sorted(found[0]))
        analysis = FunctionAnalysis(m, f.function)
        starts = _starts(ix, f.address, f.address + f.function.size)
        jumped = 0
        for at in starts:
            res = analysis.analyse(at)
            if res.verdict is not Verdict.JUMP:
                table_refusals += "jump table" in res.reason
            else:
                jumped += 1
                inside = [t for t in found[0] if at < t < at + res.size]
                assert not inside, (name, hex(at), res.size, [hex(t) for t in inside])
        assert analyse_site(syms, f.address).verdict is Verdict.JUMP, name  # refused before: unknown targets
        assert jumped > len(starts) // 3, (name, jumped, len(starts))
    assert sorted(got) == want
    assert table_refusals > 0
