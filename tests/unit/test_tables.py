"""Jump tables and indirect jumps (tests/targets/tables.S): each shape's table read exactly,
verdicts at the sites it used to block, a computed jump still refused; and the independent
audit of every jump verdict (tests/site_audit.py) on small libraries (libc and libpython with
DJPROBE_LONG=1)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest

from djprobe.sites import FunctionAnalysis, Verdict, coverage, module_index
from djprobe.symbols import Symbols
from tests import site_audit
from tests.conftest import TARGETS, compile_c

LONG = os.environ.get("DJPROBE_LONG") == "1"


@pytest.fixture(scope="module")
def tables_exe():
    return compile_c([TARGETS / "tables.S", TARGETS / "tables_main.c"], name="tables")


@pytest.fixture(scope="module")
def mod(tables_exe):
    return Symbols.from_file(str(tables_exe)).modules[0]


def _sym(m, name):
    (s,) = m.symbols(name)
    return s


def _table(m, name: str, n: int) -> list[int]:
    """The n cases of the relative table ``name``, read from the file here."""
    t = _sym(m, name).address
    return [t + e for (e,) in struct.iter_unpack("<i", m.read_file(t, 4 * n))]


def _tables_of(m, func) -> dict[int, list[int]]:
    idx = module_index(m)
    idx._analyse_tables()
    out = {}
    for r in idx._regions.values():
        for jmp, _table_addr, targets in r.tables:
            if func.address <= jmp < func.address + func.size:
                out[jmp] = targets
    return out


def _unknown(m, func) -> list[int]:
    idx = module_index(m)
    idx._analyse_tables()
    return [j for j in idx._unknown_jumps.values() if func.address <= j < func.address + func.size]


def _verdicts(m, name):
    f = _sym(m, name)
    fa = FunctionAnalysis(m, f)
    return f, fa, {a: fa.analyse(a) for a in fa.boundaries()}


def test_tables_back_to_back_bounded_by_their_guards(mod):
    f, fa, verdicts = _verdicts(mod, "t_two")
    a_cases = _table(mod, "tab_a", 4)
    b_cases = _table(mod, "tab_b", 3)
    tables = _tables_of(mod, f)
    assert sorted(tables.values()) == sorted([sorted(a_cases), sorted(b_cases)])
    assert not _unknown(mod, f)
    # tab_b's first entry read as a fifth entry of tab_a lands inside an instruction: not a case,
    # and the site whose bytes hold it takes a jump
    tab_a = _sym(mod, "tab_a").address
    (e,) = struct.unpack("<i", mod.read_file(_sym(mod, "tab_b").address, 4))
    fake = tab_a + e
    assert fake not in fa.boundaries() and f.address < fake < f.address + f.size
    holder = max(a for a in fa.boundaries() if a < fake)
    assert verdicts[holder].verdict is Verdict.JUMP, verdicts[holder].reason
    # every real case is protected: a window holding one strictly inside is refused for it
    for case in a_cases + b_cases:
        for a, res in verdicts.items():
            if a < case < a + max(res.size, 5) and res.ok:
                pytest.fail(f"{a:#x} takes a jump over the case at {case:#x}")


def test_table_base_set_before_the_loop(mod):
    f, fa, verdicts = _verdicts(mod, "t_loop")
    assert list(_tables_of(mod, f).values()) == [sorted(_table(mod, "tab_c", 3))]
    assert not _unknown(mod, f)
    assert verdicts[f.address].ok, verdicts[f.address].reason
    assert not any("unknown targets" in r.reason for r in verdicts.values())


def test_die_never_returns(mod):
    idx = module_index(mod)
    assert idx.never_returns(_sym(mod, "t_die").address)
    assert not idx.never_returns(_sym(mod, "t_one").address)
    assert not idx.never_returns(_sym(mod, "t_loop").address)


def test_one_entry_table(mod):
    f, fa, verdicts = _verdicts(mod, "t_one")
    assert list(_tables_of(mod, f).values()) == [_table(mod, "tab_one", 1)]
    assert verdicts[f.address].ok
    case = _table(mod, "tab_one", 1)[0]
    assert any(not r.ok and "jump table" in r.reason and a < case for a, r in verdicts.items())


def test_guard_on_the_element_through_another_register(mod):
    f, fa, verdicts = _verdicts(mod, "t_memidx")
    assert list(_tables_of(mod, f).values()) == [sorted(_table(mod, "tab_d", 3))]
    assert not _unknown(mod, f)
    assert verdicts[f.address].ok
    # read as far as the guard allows, not found by reading on
    assert _guard_bound(mod, f) == 3


def _guard_bound(m, func, nth: int = 0) -> int | None:
    """The bound the guard puts on the index of func's nth table load (movsxd reg, [base + idx*4])."""
    from iced_x86 import Mnemonic

    from djprobe.sites.slices import _Slicer, _full

    idx = module_index(m)
    r = idx.region_at(func.address)
    k = [k for k, i in enumerate(r.insns) if func.address <= i.address < func.address + func.size
         and i.instruction.mnemonic == Mnemonic.MOVSXD][nth]
    return _Slicer(idx).bound(_full(r.insns[k].instruction.memory_index), r, k)


def test_guards_bound_every_table(mod):
    two = _sym(mod, "t_two")
    assert (_guard_bound(mod, two, 0), _guard_bound(mod, two, 1)) == (4, 3)  # on memory; on the register
    assert _guard_bound(mod, _sym(mod, "t_loop")) == 3


def test_tail_call_through_pointer_argument(mod):
    f, fa, verdicts = _verdicts(mod, "t_tail")
    assert not _unknown(mod, f)
    assert verdicts[f.address].ok
    assert not any("unknown targets" in r.reason for r in verdicts.values())


def test_exits_of_table_and_pointer_jumps(mod):
    """A table jump stays in its function; a jump through a pointer is a tail-call exit."""
    from djprobe.sites import ExitKind, function_exits

    loop = function_exits(mod, _sym(mod, "t_loop"))
    assert loop.ok and all(e.kind is ExitKind.RETURN for e in loop.exits), loop.reason
    tail = function_exits(mod, _sym(mod, "t_tail"))
    assert tail.ok, tail.reason
    assert sorted(e.kind.value for e in tail.exits) == ["indirect_tail_call", "return"]


def test_computed_jump_stays_refused(mod):
    f, fa, verdicts = _verdicts(mod, "t_computed")
    assert _unknown(mod, f)
    assert not verdicts[f.address].ok and "unknown targets" in verdicts[f.address].reason
    blocks = [a for a in fa.boundaries() if a > f.address + 14]
    assert blocks and all(not verdicts[a].ok for a in blocks)


def test_unknown_jump_does_not_spread_past_its_function(mod):
    """t_computed's unknown jump blocks t_computed, not the functions next to it."""
    for name in ("t_tail0", "t_tail"):
        f = _sym(mod, name)
        assert FunctionAnalysis(mod, f).analyse(f.address).ok


def test_each_lists_every_site(tables_exe):
    import json

    out = subprocess.run([sys.executable, "-m", "djprobe", "sites", "--all", str(tables_exe), "--boundaries",
                          "--json", "--each"], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    sites, summary = lines[:-1], lines[-1]
    assert len(sites) == summary["boundaries"]
    assert sum(s["verdict"] == "jump" for s in sites) == summary["boundaries_jump"]
    for s in sites:
        assert set(s) >= {"address", "verdict", "reason", "size", "class", "function"}
        assert (s["class"] is None) == (s["verdict"] == "jump")


def test_each_needs_all_and_json(tables_exe, capsys):
    from djprobe.cli import main

    assert main(["sites", "--all", str(tables_exe), "--each"]) == 1
    assert "--each goes with --all MODULE --json" in capsys.readouterr().err
    assert main(["sites", "--each", f"{tables_exe}:t_one"]) == 1
    assert "--each" in capsys.readouterr().err


# --- the audit ----------------------------------------------------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("readelf") is None,
                                 reason="objdump/readelf not installed")


@needs_tools
def test_audit_finds_a_planted_violation(tables_exe, mod):
    """The audit is not blind: a made-up jump verdict over a branch target is reported."""
    f, fa, verdicts = _verdicts(mod, "t_loop")
    bad = next(a for a, r in verdicts.items() if not r.ok and "lands at" in r.reason)
    fake = [{"address": f"{bad:#x}", "verdict": "jump", "size": verdicts[bad].size, "function": "t_loop"}]
    res = site_audit.audit(str(tables_exe), fake)
    assert len(res.violations) == 1 and "objdump" in res.violations[0]


@needs_tools
def test_audit_tables_target(tables_exe):
    res = site_audit.audit(str(tables_exe))
    assert res.jumps > 50 and not res.violations, res.violations[:5]


def _lib(name: str) -> str | None:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def _libpython() -> str | None:
    import sysconfig

    p = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")
    return os.path.realpath(p) if os.path.isfile(p) else None


@needs_tools
@pytest.mark.parametrize("name", ["liblzma.so.5", "libz.so.1"])
def test_audit_small_libraries(name):
    path = _lib(name)
    if path is None:
        pytest.skip(f"no {name}")
    res = site_audit.audit(path)
    assert res.jumps > 10000 and not res.violations, res.violations[:5]


@needs_tools
@pytest.mark.skipif(not LONG, reason="long form (DJPROBE_LONG=1): several minutes")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("which", ["libc", "libpython"])
def test_audit_libc_and_libpython(which):
    path = _lib("libc.so.6") if which == "libc" else _libpython()
    if path is None:
        pytest.skip(f"no {which}")
    res = site_audit.audit(path)
    assert res.jumps > 100000 and not res.violations, res.violations[:5]


def test_liblzma_table_at_0x21008_has_six_cases():
    """liblzma 5.4.1's lzma_code: guard cmpl $5, 0x50(%rdx); ja, index loaded from there."""
    path = _lib("liblzma.so.5")
    if path is None or not path.endswith("5.4.1"):
        pytest.skip("not liblzma 5.4.1")
    m = Symbols.from_file(path).modules[0]
    idx = module_index(m)
    idx._analyse_tables()
    found = [t for r in idx._regions.values() for t in r.tables if t[1] - m.bias == 0x21008]
    assert len(found) == 1 and len(found[0][2]) == 6


def test_coverage_of_the_target_has_no_unknown_jump_but_the_computed_one(mod):
    rep = coverage(mod, all_boundaries=True)
    f = _sym(mod, "t_computed")
    fa = FunctionAnalysis(mod, f)
    assert rep.boundary_refused["indirect jump with unknown targets"] == len(
        [a for a in fa.boundaries() if "unknown targets" in fa.analyse(a).reason])
