"""Probes at sites that jump tables and indirect jumps used to block (tests/targets/tables.S),
in 4 threads: exact counts, the program's output unchanged."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

import djprobe
from djprobe.sites import FunctionAnalysis
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)

ROUNDS = 20000


@pytest.fixture(scope="module")
def tables_exe():
    return compile_c([TARGETS / "tables.S", TARGETS / "tables_main.c"], name="tables")


def _sites(exe) -> dict[str, int]:
    """Sites (as FUNC+OFF) that were refused before tables were bounded and followed, with the
    hits each must count in a run of ROUNDS rounds per thread."""
    m = Symbols.from_file(str(exe)).modules[0]

    def sym(name):
        (s,) = m.symbols(name)
        return s

    two = sym("t_two")
    (e,) = struct.unpack("<i", m.read_file(sym("tab_b").address, 4))
    fake = sym("tab_a").address + e  # tab_b's first entry read as tab_a's fifth
    holder = max(a for a in FunctionAnalysis(m, two).boundaries() if a < fake)
    loop = sym("t_loop")
    fa = FunctionAnalysis(m, loop)
    step = next(a for a in fa.boundaries() if fa.analyse(a).displaced[0].text == "add rcx,1")
    calls = 4 * ROUNDS
    return {
        f"t_two+{holder - two.address:#x}": calls,  # every call passes .Lsecond
        "t_loop": calls,
        f"t_loop+{step - loop.address:#x}": 8 * calls,  # once per element
        "t_one": calls,
        "t_tail": 2 * calls,  # through the pointer and from t_tail0
        "t_memidx": calls,
    }


def test_probes_at_newly_allowed_sites_count_exactly(tables_exe):
    plain = subprocess.run([str(tables_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout.startswith("done")
    expected = _sites(tables_exe)
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(tables_exe), str(ROUNDS)], stdout=write_fd) as proc:
        os.close(write_fd)
        probes = {s: proc.register(djprobe.Djprobe(s)) for s in expected}
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=60)
        hits = {s: p.hits for s, p in probes.items()}
    assert (output, status) == (plain.stdout, 0)
    assert hits == expected


def test_computed_jump_site_is_refused(tables_exe):
    with djprobe.spawn([str(tables_exe), "1"]) as proc:
        with pytest.raises(djprobe.InvalidSiteError, match="unknown targets"):
            proc.register(djprobe.Djprobe("t_computed"))
        proc.start()
        assert proc.process.popen.wait(timeout=60) == 0
