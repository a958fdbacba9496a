"""fde.py against pyelftools (which decodes .eh_frame in full), and the sub_<vaddr> functions
that symbols.py makes of FDEs no symbol covers, on a stripped copy of a library built here."""

from __future__ import annotations

import subprocess

import pytest
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile

from djprobe.fde import fde_ranges
from djprobe.symbols import Symbols
from tests.conftest import compile_c

LIB_C = r"""
static __attribute__((noinline, noclone)) long hidden_a(long x) { return x * 3 + 1; }
static __attribute__((noinline, noclone)) long hidden_b(long x) { return (x ^ 0x55) + hidden_a(x); }
long exported(long n) { long acc = 0; for (long i = 0; i < n; i++) acc += hidden_b(i); return acc; }
"""


def _reference(path) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return sorted(
            (e.header["initial_location"], e.header["initial_location"] + e.header["address_range"])
            for e in elf.get_dwarf_info().EH_CFI_entries()
            if isinstance(e, FDE) and e.header["address_range"] > 0
        )


def _ours(path) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".eh_frame")
        return [(r.start, r.end) for r in fde_ranges(sec.data(), sec["sh_addr"])]


@pytest.fixture(scope="module")
def lib():
    return compile_c(LIB_C, "-shared", "-fPIC", name="libfde")


@pytest.fixture(scope="module")
def stripped(lib, tmp_path_factory):
    out = tmp_path_factory.mktemp("fde") / "libfde-stripped.so"
    subprocess.run(["strip", "-o", str(out), str(lib)], check=True, timeout=60)
    return out


def _nm(path) -> dict[str, tuple[int, int]]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tT":
            syms[parts[3]] = (int(parts[0], 16), int(parts[0], 16) + int(parts[1], 16))
    return syms


def test_agrees_with_pyelftools(lib):
    ours = _ours(lib)
    assert ours == _reference(lib)
    assert len(ours) >= 3


def test_agrees_with_pyelftools_on_libc():
    libc = Symbols.from_process(__import__("os").getpid()).module("libc").path
    ours = _ours(libc)
    assert len(ours) > 1000 and ours == _reference(libc)


def test_signal_trampoline_is_not_a_function():
    """glibc's __restore_rt has a signal-frame FDE (CIE augmentation 'S') starting one byte
    early: it is marked, and symbols.py makes no sub_ function of it."""
    import os

    libc = Symbols.from_process(os.getpid()).module("libc")
    with open(libc.path, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".eh_frame")
        signal = [r for r in fde_ranges(sec.data(), sec["sh_addr"]) if r.signal_frame]
        refs = [e for e in elf.get_dwarf_info().EH_CFI_entries() if isinstance(e, FDE) and b"S" in e.cie.header["augmentation"]]
    assert len(signal) == len(refs) >= 1
    fresh = Symbols.from_file(libc.path).modules[0]
    starts = {f.address for f in fresh.functions()}
    assert not any(r.start in starts and fresh.function_at(r.start).from_eh_frame for r in signal)


def test_garbage_gives_what_came_before():
    assert fde_ranges(b"", 0x1000) == []
    assert fde_ranges(b"\xff" * 64, 0x1000) == []
    assert fde_ranges(b"\x00\x00\x00\x00", 0x1000) == []


def test_stripped_library_functions_from_fdes(lib, stripped):
    truth = _nm(lib)
    m = Symbols.from_file(stripped).modules[0]
    assert "hidden_a" not in _nm(stripped)
    for name in ("hidden_a", "hidden_b"):
        start, end = truth[name]
        f = m.function_at(start + 2)
        assert f is not None and f.from_eh_frame
        assert (f.name, f.address, f.end) == (f"sub_{start:x}", start, end)
        (site,) = Symbols.from_file(stripped).resolve(f"{stripped}:sub_{start:x}+0x1")
        assert site.address == start + 1 and site.function.name == f"sub_{start:x}"
    # a function with a symbol keeps it; an FDE never shadows a symbol
    exported = m.function_at(truth["exported"][0])
    assert exported.name == "exported" and not exported.from_eh_frame
    unstripped = Symbols.from_file(lib).modules[0]
    assert [f.name for f in unstripped.functions() if f.from_eh_frame] == []  # symbols cover every FDE
    assert m.describe(truth["hidden_a"][0] + 1) == f"{stripped.name}:sub_{truth['hidden_a'][0]:x}+0x1"
