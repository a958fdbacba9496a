"""Decoding: lengths, flow kinds, direct and RIP-relative targets."""

from __future__ import annotations

import pytest

from djprobe.x86 import Flow, Insn, decode, decode_one, iter_decode

A = 0x7F00_1234_5000


def one(hexbytes: str, address: int = A) -> Insn:
    code = bytes.fromhex(hexbytes)
    insn = decode_one(code, address)
    assert insn.raw == code[: insn.length]
    return insn


@pytest.mark.parametrize(
    "hexbytes, length, flow, target, mem_target, text",
    [
        ("48 8d 05 10 00 00 00", 7, Flow.NEXT, None, A + 7 + 0x10, "lea rax,[0x7f0012345017]"),
        ("48 8b 05 f0 ff ff ff", 7, Flow.NEXT, None, A + 7 - 0x10, None),
        ("48 83 3d 00 01 00 00 05", 8, Flow.NEXT, None, A + 8 + 0x100, None),  # cmp qword [rip+x], imm8
        ("c7 05 08 00 00 00 01 00 00 00", 10, Flow.NEXT, None, A + 10 + 8, None),  # imm after disp
        ("eb 05", 2, Flow.JUMP, A + 7, None, None),
        ("eb fe", 2, Flow.JUMP, A, None, None),
        ("e9 00 00 00 80", 5, Flow.JUMP, A + 5 - 0x8000_0000, None, None),
        ("74 10", 2, Flow.COND_JUMP, A + 0x12, None, "je short 0x7f0012345012"),
        ("0f 85 f0 ff ff ff", 6, Flow.COND_JUMP, A + 6 - 0x10, None, None),
        ("e2 fe", 2, Flow.COND_JUMP, A, None, None),  # loop
        ("e3 02", 2, Flow.COND_JUMP, A + 4, None, None),  # jrcxz
        ("67 e3 02", 3, Flow.COND_JUMP, A + 5, None, None),  # jecxz
        ("c7 f8 00 01 00 00", 6, Flow.COND_JUMP, A + 6 + 0x100, None, None),  # xbegin
        ("e8 fb ff ff ff", 5, Flow.CALL, A, None, None),
        ("ff 15 02 00 00 00", 6, Flow.INDIRECT_CALL, None, A + 8, None),
        ("ff d0", 2, Flow.INDIRECT_CALL, None, None, "call rax"),
        ("41 ff 54 24 08", 5, Flow.INDIRECT_CALL, None, None, None),
        ("ff 25 00 10 00 00", 6, Flow.INDIRECT_JUMP, None, A + 6 + 0x1000, None),
        ("3e ff e0", 3, Flow.INDIRECT_JUMP, None, None, "notrack jmp rax"),
        ("ff e0", 2, Flow.INDIRECT_JUMP, None, None, "jmp rax"),
        ("c3", 1, Flow.RETURN, None, None, "ret"),
        ("c2 08 00", 3, Flow.RETURN, None, None, None),
        ("cb", 1, Flow.RETURN, None, None, None),
        ("48 cf", 2, Flow.RETURN, None, None, "iretq"),
        ("0f 05", 2, Flow.SYSCALL, None, None, "syscall"),
        ("0f 34", 2, Flow.SYSCALL, None, None, None),
        ("cd 80", 2, Flow.SYSCALL, None, None, None),
        ("cc", 1, Flow.INTERRUPT, None, None, "int3"),
        ("cd 03", 2, Flow.INTERRUPT, None, None, None),
        ("f1", 1, Flow.INTERRUPT, None, None, None),
        ("0f 0b", 2, Flow.INTERRUPT, None, None, "ud2"),
        ("0f b9 c0", 3, Flow.INTERRUPT, None, None, None),
        ("f4", 1, Flow.INTERRUPT, None, None, "hlt"),
        ("fa", 1, Flow.INTERRUPT, None, None, None),  # cli: privileged
        ("f3 0f 1e fa", 4, Flow.NEXT, None, None, "endbr64"),
        ("55", 1, Flow.NEXT, None, None, "push rbp"),
        ("48 89 e5", 3, Flow.NEXT, None, None, "mov rbp,rsp"),
        ("66 2e 0f 1f 84 00 00 00 00 00", 10, Flow.NEXT, None, None, None),
        ("48 b8 88 77 66 55 44 33 22 11", 10, Flow.NEXT, None, None, "mov rax,0x1122334455667788"),
        ("c5 fd 6f 05 00 01 00 00", 8, Flow.NEXT, None, A + 8 + 0x100, None),  # vmovdqa ymm0,[rip+x]
        ("64 48 8b 04 25 28 00 00 00", 9, Flow.NEXT, None, None, None),  # mov rax,fs:[0x28]
    ],
)
def test_known_instructions(hexbytes, length, flow, target, mem_target, text):
    insn = one(hexbytes)
    assert insn.address == A
    assert insn.length == length
    assert insn.end == A + length
    assert insn.flow is flow
    assert insn.target == target
    assert insn.mem_target == mem_target
    assert insn.rip_relative == (mem_target is not None)
    assert insn.instruction.len == length
    if text is not None:
        assert insn.text == text


@pytest.mark.parametrize("hexbytes", ["06", "0e", "27", "ce", "d6", "c4", "48", "0f", "ff ff"])
def test_invalid_bytes(hexbytes):
    insn = one(hexbytes)
    assert insn.flow is Flow.INVALID
    assert insn.length == 1
    assert insn.target is None and insn.mem_target is None and not insn.rip_relative
    assert insn.text == "(bad)"


def test_sweep_continues_after_invalid_byte():
    # push rbp ; (bad 0x06) ; (bad 0x27) ; mov rbp,rsp ; truncated "48 8b"
    code = bytes.fromhex("55 06 27 48 89 e5 48 8b")
    insns = decode(code, 0x1000)
    assert [(i.address, i.length, i.flow) for i in insns] == [
        (0x1000, 1, Flow.NEXT),
        (0x1001, 1, Flow.INVALID),
        (0x1002, 1, Flow.INVALID),
        (0x1003, 3, Flow.NEXT),
        (0x1006, 1, Flow.INVALID),
        (0x1007, 1, Flow.INVALID),
    ]
    assert b"".join(i.raw for i in insns) == code
    assert insns[3].text == "mov rbp,rsp"


def test_iter_decode_is_lazy_and_matches_decode():
    code = bytes.fromhex("55 48 89 e5 48 8d 05 00 00 00 00 e8 00 00 00 00 c9 c3") * 50
    it = iter_decode(code, 0x4000)
    first = next(it)
    assert first.text == "push rbp"
    rest = list(it)
    full = decode(code, 0x4000)
    assert [first, *rest] == full
    assert sum(i.length for i in full) == len(code)
    assert all(a.end == b.address for a, b in zip(full, full[1:]))


def test_empty_and_memoryview():
    assert decode(b"", 0) == []
    assert decode(memoryview(b"\x90\xc3"), 0x10)[1].flow is Flow.RETURN
    with pytest.raises(ValueError):
        decode_one(b"", 0)


def test_equality_hash_and_repr():
    a = decode_one(b"\x90", 0x10)
    b = decode(b"\xc3\x90", 0xF)[1]
    assert a == b and hash(a) == hash(b)
    assert a != decode_one(b"\x90", 0x11)
    assert "nop" in repr(a) and "0x10" in repr(a)


def test_decode_one_ignores_following_bytes():
    insn = decode_one(bytes.fromhex("74 05 cc cc cc"), 0x2000)
    assert insn.raw == b"\x74\x05" and insn.target == 0x2007
