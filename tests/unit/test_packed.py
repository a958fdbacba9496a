"""Packed instructions (djprobe.x86.packed): kept as bytes, the same instructions when decoded."""

from __future__ import annotations

import pytest

from djprobe.x86 import decode
from djprobe.x86.packed import PackedInsns

# push rbp; mov rbp,rsp; sub rsp,0x10; lea rax,[rip+0x100]; jmp +2
CODE = bytes.fromhex("55" "4889e5" "4883ec10" "488d0500010000" "eb02")


def test_packed_instructions_are_the_decoded_tuple():
    insns = tuple(decode(CODE, 0x401000))
    packed = PackedInsns.of(insns)
    assert isinstance(packed, PackedInsns)
    assert len(packed) == len(insns) == 5 and bool(packed)
    assert packed == insns and tuple(packed) == insns and list(packed) == list(insns)
    assert hash(packed) == hash(insns)
    assert packed[0] == insns[0] and packed[-1].target == insns[-1].target == 0x401013
    assert packed[1:3] == insns[1:3] and isinstance(packed[1:3], tuple)
    assert packed + () == insns and () + packed == insns
    assert packed[3].mem_target == 0x40100F + 0x100
    assert packed.raw == CODE and packed == PackedInsns(CODE, 0x401000)
    assert packed != PackedInsns(CODE, 0x401001)
    assert packed[0] is not packed[0]  # nothing decoded is kept


def test_32_bit_code_stays_32_bit():
    code = bytes.fromhex("55" "89e5" "e800000000")  # push ebp; mov ebp,esp; call next
    packed = PackedInsns.of(decode(code, 0x8048000, 32))
    assert isinstance(packed, PackedInsns) and packed.bits == 32
    assert [i.bits for i in packed] == [32, 32, 32] and packed[2].target == 0x8048008


def test_only_contiguous_instructions_are_packed():
    insns = decode(CODE, 0x401000)
    gap = (insns[0], insns[2])
    assert PackedInsns.of(gap) == gap and isinstance(PackedInsns.of(gap), tuple)
    assert PackedInsns.of(()) == ()


def test_an_index_out_of_range_raises():
    with pytest.raises(IndexError):
        PackedInsns(CODE, 0)[9]
