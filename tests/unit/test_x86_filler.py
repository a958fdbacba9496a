"""x86/filler.py: the alignment filler gas emits between i386 functions, and what is not filler."""

from __future__ import annotations

import pytest

from djprobe.x86.decode import decode
from djprobe.x86.filler import is_filler


@pytest.mark.parametrize("raw", ["90", "cc", "6690", "0f1f4000", "8d7600", "8d742600", "8db42600000000",
                                 "8db600000000", "8dbc2700000000", "89f6", "89ff"])
def test_filler_32(raw):
    (insn,) = decode(bytes.fromhex(raw), 0x1000, 32)
    assert is_filler(insn), insn.text


@pytest.mark.parametrize("raw", ["8d760c", "8d442600", "8d7e00", "89c0", "2e8db42600000000", "c3", "5d"])
def test_not_filler_32(raw):
    (insn,) = decode(bytes.fromhex(raw), 0x1000, 32)
    assert not is_filler(insn), insn.text


def test_64bit_only_nops_and_int3():
    assert is_filler(decode(bytes.fromhex("0f1f440000"), 0x1000, 64)[0])
    assert not is_filler(decode(bytes.fromhex("89f6"), 0x1000, 64)[0])  # zero-extends rsi
    assert not is_filler(decode(bytes.fromhex("488d7600"), 0x1000, 64)[0])
