"""Short jumps through springboards (sites/springboards.py) on tests/targets/springboards.S: which
padding is dead, which sites take a jmp rel8 to a springboard, the rel8 reach, the coverage
figures behind ``--springboards``, and the audit of short-jump verdicts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from djprobe.sites import FunctionAnalysis, Verdict, coverage, module_index
from djprobe.sites.springboards import (REL8_MAX, REL8_MIN, SHORT_JUMP_SIZE, dead_runs, short_jump,
                                        springboard_for)
from djprobe.symbols import Symbols
from tests import site_audit
from tests.conftest import TARGETS, compile_c

LONG = os.environ.get("DJPROBE_LONG") == "1"


@pytest.fixture(scope="module")
def exe():
    return compile_c([TARGETS / "springboards.S", TARGETS / "springboards_main.c"], name="springboards")


@pytest.fixture(scope="module")
def mod(exe):
    return Symbols.from_file(str(exe)).modules[0]


def _f(m, name):
    (s,) = m.symbols(name)
    return s


def _shorts(m, name) -> dict[int, int | None]:
    """Offset in the function -> springboard of the short jump there (None: none), for every
    boundary refused a jmp rel32."""
    f = _f(m, name)
    fa = FunctionAnalysis(m, f)
    out = {}
    for a in fa.boundaries():
        if not fa.analyse(a).ok:
            sj = short_jump(fa, a)
            out[a - f.address] = sj.springboard if sj is not None else None
    return out


def test_dead_runs_are_exactly_the_padding_after_ret_and_after_a_noreturn_call(mod):
    runs = {r.after: (r.start, r.end) for r in dead_runs(module_index(mod))}
    near, noret = _f(mod, "sb_near"), _f(mod, "sb_noret")
    assert runs == {"sb_near": (near.end, near.end + 16), "sb_noret": (noret.end, noret.end + 16)}
    assert module_index(mod).never_returns(_f(mod, "sb_die").address)


def test_short_jumps_where_a_branch_target_blocks_the_rel32(mod):
    near = _f(mod, "sb_near")
    fa = FunctionAnalysis(mod, near)
    # +0 test, +4 dec, +6 jmp: a target (+2 or +8) lies inside their 5 bytes
    assert _shorts(mod, "sb_near") == {0: near.end, 4: near.end, 6: near.end}
    for off in (0, 4, 6):
        assert "lands at" in fa.analyse(near.address + off).reason
        sj = short_jump(fa, near.address + off)
        w = sj.window
        assert w.verdict is Verdict.SHORT_JUMP and not w.ok and w.springboard == near.end
        assert w.size == SHORT_JUMP_SIZE and len(w.displaced) == 1
        assert sj.rel8 == near.end - (near.address + off + 2) and REL8_MIN <= sj.rel8 <= REL8_MAX
        assert f"springboard at {near.end:#x} in the padding after sb_near" in w.reason
    # the displaced jmp rel8 relocates (to a jmp rel32 in the stub)
    assert [i.text for i in short_jump(fa, near.address + 6).window.displaced] == [
        fa.analyse(near.address + 6).displaced[0].text]


def test_after_a_noreturn_call(mod):
    f = _f(mod, "sb_noret")
    assert _shorts(mod, "sb_noret") == {0: f.end, 4: f.end, 6: f.end}


@pytest.mark.parametrize("name", ["sb_fall", "sb_inner", "sb_fde", "sb_entered", "sb_label"])
def test_no_springboard_in_padding_that_is_not_dead(mod, name):
    """After a call that returns, nops inside a function, padding in an FDE, padding a branch
    enters, padding cut by a symbol to 3 bytes: none of them holds a springboard."""
    shorts = _shorts(mod, name)
    assert shorts and all(v is None for v in shorts.values()), shorts


def test_rel8_reach_both_ways(mod):
    idx = module_index(mod)
    near = _f(mod, "sb_near")
    run_lo, run_hi = near.end, near.end + 16
    # forward: the springboard at the run's start, 127 bytes after the end of the jmp rel8
    assert springboard_for(idx, run_lo - 2 - REL8_MAX)[0] == run_lo
    assert springboard_for(idx, run_lo - 2 - REL8_MAX - 1) is None
    # backward: the last 5 bytes of the run, 128 bytes before the end of the jmp rel8
    assert springboard_for(idx, run_hi - 5 - 2 - REL8_MIN)[0] == run_hi - 5
    assert springboard_for(idx, run_hi - 5 - 2 - REL8_MIN + 1) is None
    # springboards already in use are skipped: the next 5 free bytes
    assert springboard_for(idx, near.address, taken={run_lo})[0] == run_lo + 1
    assert springboard_for(idx, near.address, taken=set(range(run_lo, run_hi - 4))) is None


def test_coverage_counts_short_jumps_only_when_asked(mod):
    off = coverage(mod, all_boundaries=True, returns=False)
    on = coverage(mod, all_boundaries=True, returns=False, springboards=True)
    assert off.boundaries_short == 0 and not off.springboards and "boundaries_short" not in off.to_json()
    assert (on.boundaries, on.boundaries_jump) == (off.boundaries, off.boundaries_jump)
    # sb_near +0 +4 +6, sb_noret +0 +4 +6; and the last add of sb_wall6 (3 bytes before its ret,
    # sb_noret right after it): too close to the end for a rel32, its padding 12 bytes on
    assert on.boundaries_short == 7
    assert on.boundary_short_by == {"branch target inside": 6, "too close to the end of the function": 1}
    j = on.to_json()
    assert j["boundaries_short"] == 7
    assert j["boundary_short_ratio"] == round((on.boundaries_jump + 7) / on.boundaries, 5)


def _each(exe, *extra):
    out = subprocess.run([sys.executable, "-m", "djprobe", "sites", "--all", str(exe), "--boundaries",
                          "--json", "--each", *extra], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    return lines[:-1], lines[-1]


def test_cli_each_gives_short_jump_verdicts_with_their_springboard(exe, mod):
    sites, summary = _each(exe, "--springboards")
    short = [s for s in sites if s["verdict"] == "short-jump"]
    assert len(short) == summary["boundaries_short"] == 7
    near = _f(mod, "sb_near")
    wall = _f(mod, "sb_wall6")
    assert {(s["function"], s["offset"]) for s in short} == {
        (n, o) for n in ("sb_near", "sb_noret") for o in (0, 4, 6)} | {("sb_wall6", wall.size - 4)}
    assert all(s["springboard"] == f"{near.end:#x}" for s in short if s["function"] == "sb_near")
    plain, _ = _each(exe)
    assert not any(s["verdict"] == "short-jump" or "springboard" in s for s in plain)


def test_cli_one_site_shows_its_short_jump(exe, mod):
    """``djprobe sites`` for one refused site says which short jump a probe would take (text and
    JSON), none with --size or where a jmp rel32 fits."""
    near = _f(mod, "sb_near")
    run = lambda *a: subprocess.run([sys.executable, "-m", "djprobe", "sites", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    text = " ".join(run(f"{exe}:sb_near+4").stdout.split())  # wrapped at 80 columns
    assert "REFUSED" in text and "short jump: displaces 1 instruction(s), 2 bytes" in text
    assert f"springboard at {near.end:#x}" in text and "unless --no-short" in text
    (obj,) = [json.loads(x) for x in run("--json", f"{exe}:sb_near+4").stdout.splitlines()]
    assert obj["short_jump"]["springboard"] == near.end and obj["short_jump"]["size"] == 2
    (obj,) = [json.loads(x) for x in run("--json", "--size", "5", f"{exe}:sb_near+4").stdout.splitlines()]
    assert obj["short_jump"] is None
    assert "short jump" not in run(f"{exe}:sb_wall6").stdout  # a jump fits at its entry


def test_cli_springboards_needs_all(exe, capsys):
    from djprobe.cli import main

    assert main(["sites", "--springboards", f"{exe}:sb_near"]) == 1
    assert "--springboards go with --all MODULE" in capsys.readouterr().err


needs_tools = pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("readelf") is None,
                                 reason="objdump/readelf not installed")


@needs_tools
def test_audit_of_short_jumps(exe):
    res = site_audit.audit(str(exe), springboards=True)
    assert res.short == 7 and res.after_call == 4 and not res.violations, res.violations


@needs_tools
@pytest.mark.parametrize("where", ["inside", "fde", "entered", "far"])
def test_audit_finds_planted_springboards(exe, mod, where):
    """The audit is not blind: a made-up short jump whose springboard is in code, in an FDE's
    padding, in padding a branch enters, or beyond rel8 reach is reported."""
    near = _f(mod, "sb_near")
    site = near.address
    sb = {"inside": _f(mod, "sb_wall1").address + 10, "fde": _f(mod, "sb_fde").end + 2,
          "entered": _f(mod, "sb_entered").end + 4, "far": near.end + 200}[where]
    if where in ("fde", "entered", "far"):
        site = sb - 20 if where != "far" else site
    fake = [{"address": f"{site:#x}", "verdict": "short-jump", "size": 2, "function": "x",
             "springboard": f"{sb:#x}"}]
    res = site_audit.audit(str(exe), fake)
    want = {"inside": "lies in an FDE or a sized symbol", "fde": "lies in an FDE or a sized symbol",
            "entered": "enters the springboard", "far": "beyond the rel8 reach"}[where]
    assert any(want in v for v in res.violations), res.violations


def test_cli_text_gives_the_short_jump_figures(exe):
    out = subprocess.run([sys.executable, "-m", "djprobe", "sites", "--all", str(exe), "--boundaries",
                          "--springboards"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "with short jumps through springboards (placed unless --no-short)" in out  # placed by default
    assert "with short jumps through springboards" in out and "7 of the refused" in out


@needs_tools
@pytest.mark.skipif(not LONG, reason="long form (DJPROBE_LONG=1): several minutes")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("which", ["libc", "libpython"])
def test_audit_of_short_jumps_in_libc_and_libpython(which):
    from tests.unit.test_tables import _lib, _libpython

    path = _lib("libc.so.6") if which == "libc" else _libpython()
    if path is None:
        pytest.skip(f"no {which}")
    res = site_audit.audit(path, springboards=True)
    assert res.short > 5000 and not res.violations, res.violations[:5]
