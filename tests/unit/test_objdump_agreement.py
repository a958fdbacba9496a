"""Instruction boundaries agree with GNU objdump for every function of the machine's libc."""

from __future__ import annotations

import bisect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from djprobe.x86 import decode

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
_LINE = re.compile(rb"^\s+([0-9a-f]+):\t", re.M)

pytestmark = [
    pytest.mark.skipif(not LIBC.exists(), reason="no x86-64 glibc at the usual path"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed"),
]


def objdump_starts(path: Path) -> list[int]:
    out = subprocess.run(
        ["objdump", "-d", "-z", "--no-show-raw-insn", "-j", ".text", str(path)],
        check=True, capture_output=True,
    ).stdout
    return sorted({int(m.group(1), 16) for m in _LINE.finditer(out)})


def functions(path: Path):
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        lo, data = text["sh_addr"], text.data()
        hi = lo + len(data)
        seen = set()
        for name in (".symtab", ".dynsym"):
            tab = elf.get_section_by_name(name)
            if tab is None:
                continue
            for sym in tab.iter_symbols():
                v, n = sym["st_value"], sym["st_size"]
                if sym["st_info"]["type"] != "STT_FUNC" or n == 0 or (v, n) in seen:
                    continue
                if not (lo <= v and v + n <= hi):
                    continue
                seen.add((v, n))
                yield sym.name, v, data[v - lo : v - lo + n]


def test_libc_boundaries_agree_with_objdump():
    ref = objdump_starts(LIBC)
    checked = total = 0
    for name, addr, code in functions(LIBC):
        ours = [i.address for i in decode(code, addr)]
        a = bisect.bisect_left(ref, addr)
        b = bisect.bisect_left(ref, addr + len(code))
        theirs = ref[a:b]
        if ours != theirs:
            for k, (x, y) in enumerate(zip(ours, theirs)):
                if x != y:
                    break
            else:
                k = min(len(ours), len(theirs))
            at = min(ours[k] if k < len(ours) else 1 << 64, theirs[k] if k < len(theirs) else 1 << 64)
            ctx = decode(code, addr)[max(0, k - 2) : k + 2]
            pytest.fail(
                f"{name} at {addr:#x}: first disagreement at {at:#x} "
                f"(ours {[hex(x) for x in ours[k:k+3]]}, objdump {[hex(x) for x in theirs[k:k+3]]}); around: {ctx!r}"
            )
        checked += 1
        total += len(ours)
    assert checked > 1000 and total > 100_000, (checked, total)


def test_libc_whole_text_sweep_agrees_with_objdump():
    """A linear sweep over all of .text (padding and local functions included) agrees too."""
    from elftools.elf.elffile import ELFFile

    with LIBC.open("rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        lo, data = text["sh_addr"], text.data()
    ours = [i.address for i in decode(data, lo)]
    ref = objdump_starts(LIBC)
    if ours != ref:
        k = next(k for k, (x, y) in enumerate(zip(ours + [-1], ref + [-1])) if x != y)
        pytest.fail(
            f"first disagreement at index {k}: ours {[hex(x) for x in ours[k:k+3]]}, "
            f"objdump {[hex(x) for x in ref[k:k+3]]}"
        )
