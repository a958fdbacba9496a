"""Are the arithmetic flags dead at a point?"""

from __future__ import annotations

import pytest

from djprobe.x86 import decode, flags_dead_after
from djprobe.x86.flags import STATUS_FLAGS, flags_effect

H = bytes.fromhex


def dead(hexbytes: str, index: int = 0, address: int = 0x1000) -> bool:
    return flags_dead_after(decode(H(hexbytes), address), index)


@pytest.mark.parametrize(
    "code, index, expected",
    [
        ("48 83 ec 08 c3", 0, True),  # sub rsp,8 writes all six
        ("c3", 0, True),  # ret: flags not preserved across calls
        ("e8 00 00 00 00", 0, True),  # call
        ("ff d0", 0, True),  # call rax
        ("48 89 e5 c3", 0, True),  # mov (no flags) ; ret
        ("48 39 f7 74 05", 0, True),  # cmp writes all, then je reads
        ("48 39 f7 74 05", 1, False),  # at je: read
        ("74 05", 0, False),
        ("ff c0 72 00", 0, False),  # inc eax (CF untouched) ; jc reads CF
        ("ff c0 01 c0 72 00", 0, True),  # inc ; add eax,eax writes all ; jc
        ("48 11 c0 c3", 0, False),  # adc reads CF
        ("0f 94 c0 c3", 0, False),  # sete
        ("48 0f 44 c1 c3", 0, False),  # cmove
        ("9c c3", 0, False),  # pushf
        ("9f c3", 0, False),  # lahf
        ("9d 74 00", 0, True),  # popf writes all
        ("9e 70 00", 0, False),  # sahf leaves OF ; jo
        ("9e 48 85 c0 70 00", 0, True),  # sahf ; test writes all
        ("85 c0 74 00", 0, True),  # test: AF undefined counts as written
        ("0f bc c1 72 00", 0, True),  # bsf: ZF written, rest undefined
        ("d3 e0 74 00", 0, False),  # shl eax,cl: cl may be 0 -> flags unchanged
        ("d3 e0 c3", 0, True),  # ... but then ret
        ("c1 e0 20 74 00", 0, False),  # shl eax,32: masked to 0 for 32-bit
        ("48 c1 e0 20 74 00", 0, True),  # shl rax,32 writes
        ("d1 e0 74 00", 0, True),  # shl eax,1
        ("48 0f a5 c2 74 00", 0, False),  # shld rdx,rax,cl
        ("f3 a6 74 00", 0, False),  # repe cmpsb with rcx=0 leaves flags
        ("a6 74 00", 0, True),  # cmpsb writes all
        ("fc 48 39 c0 74 00", 0, True),  # cld (DF only) ; cmp
        ("c4 e2 f9 f7 c1 74 00", 0, False),  # shlx: no flags ; je reads
        ("0f 05 c3", 0, False),  # syscall copies rflags to r11
        ("cc c3", 0, False),  # int3
        ("06 c3", 0, False),  # invalid
        ("48 89 c7", 0, False),  # end of instructions: unknown
        ("ff e0", 0, False),  # jmp rax: unknown target
        ("eb 02 74 00 31 c0", 0, True),  # jmp over je to xor (writes all)
        ("eb 02 31 c0 74 00", 0, False),  # jmp to je
        ("eb fe", 0, False),  # jmp $: a loop
        ("eb 01 31 c0", 0, False),  # jmp into the middle of an instruction: not followed
        ("e9 00 01 00 00", 0, False),  # jmp outside the instructions
        ("48 89 c7 eb fb", 0, False),  # mov ; jmp back to mov: loop without a write
    ],
)
def test_flags_dead(code, index, expected):
    assert dead(code, index) is expected


def test_index_out_of_range():
    insns = decode(H("48 83 ec 08"), 0)
    assert flags_dead_after(insns, 1) is False
    assert flags_dead_after(insns, -1) is False
    assert flags_dead_after([], 0) is False


def test_gap_is_not_straight_line():
    a = decode(H("48 89 c7"), 0x1000)
    b = decode(H("48 83 ec 08"), 0x2000)
    assert flags_dead_after(a + b, 0) is False
    assert flags_dead_after(decode(H("48 89 c7 48 83 ec 08"), 0x1000), 0) is True


def test_flags_effect():
    (sub,) = decode(H("48 83 ec 08"), 0)
    assert flags_effect(sub) == (0, STATUS_FLAGS)
    (adc,) = decode(H("48 11 c0"), 0)
    read, written = flags_effect(adc)
    assert read and written == STATUS_FLAGS
