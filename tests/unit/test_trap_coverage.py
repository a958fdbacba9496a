"""The coverage report and `djprobe sites` count the trap fallback: refused jump sites where a
kernel uprobe can go, and those where neither can (tests/targets/traps.S, read as a file)."""

from __future__ import annotations

import json
import subprocess
import sys

from djprobe.sites import analyse_site, coverage
from djprobe.sites.coverage import site_trap_refusal
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

DJPROBE = [sys.executable, "-m", "djprobe"]


def _exe():
    return compile_c([TARGETS / "traps.S", TARGETS / "traps_main.c"], name="traps")


def test_coverage_counts_jump_trap_and_neither():
    exe = _exe()
    module = Symbols.from_file(str(exe)).modules[0]
    rep = coverage(module, all_boundaries=True, returns=False)
    refused = {e.site.split(":")[1] for e in rep.refused_entries}
    assert {"t_branch_into", "t_jumptable", "t_call_mid", "t_args", "t_neither"} <= refused
    assert rep.entries_trap == len(refused) - 1
    assert dict(rep.entries_neither) == {"the kernel places no uprobe on an instruction with a lock prefix": 1}
    assert rep.reachable_ratio == (rep.entries - 1) / rep.entries
    assert rep.boundaries_jump + rep.boundaries_trap + sum(rep.boundaries_neither.values()) == rep.boundaries
    data = rep.to_json()
    assert data["entries_trap"] == rep.entries_trap and data["entries_neither"] == 1


def test_site_trap_refusal_reasons():
    exe = _exe()
    symbols = Symbols.from_file(str(exe))
    name = exe.name

    def why(spec):
        res = analyse_site(symbols, symbols.resolve(f"{name}:{spec}")[0])
        assert not res.ok
        return site_trap_refusal(res)

    assert why("t_branch_into") is None
    assert why("t_jumptable") is None
    assert "lock prefix" in why("t_neither")
    assert "not an instruction boundary" in why("t_branch_into+1")


def test_sites_command_says_whether_a_trap_fits():
    exe = _exe()
    res = subprocess.run(DJPROBE + ["sites", "--json", f"{exe}:t_call_mid", f"{exe}:t_neither"],
                         capture_output=True, text=True, timeout=60)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["trap"], bool(r["trap_refusal"])) for r in rows] == [(True, False), (False, True)]
    text = subprocess.run(DJPROBE + ["sites", "--all", str(exe)], capture_output=True, text=True, timeout=60)
    assert "reachable at all (jump or trap)" in text.stdout
    assert "neither: the kernel places no uprobe on an instruction with a lock prefix" in text.stdout
