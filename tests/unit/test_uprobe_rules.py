"""x86/uprobe_rules.py: which instructions the kernel refuses a uprobe on (pure byte rules; the
live agreement with the kernel is tests/live/test_traps.py::test_kernel_refuses_exactly_what_the_rules_say)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from djprobe.x86.uprobe_rules import uprobe_refusal


@pytest.mark.parametrize(
    "code, refused",
    [
        ("f30f1efa", None),  # endbr64
        ("55", None),  # push rbp
        ("4883ec08", None),  # sub rsp, 8
        ("0f05", None),  # syscall: 0f is a good first byte, the second-byte table is never read
        ("0f0b", None),  # ud2: likewise
        ("c5f877", None),  # vzeroupper (VEX)
        ("64488b042528000000", None),  # mov rax, fs:[0x28]
        ("6690", None),  # xchg ax, ax: a nop, not a branch
        ("f3a4", None),  # rep movsb
        ("f0ff07", "lock"),
        ("662e0f1f840000000000", "cs"),  # cs nopw padding
        ("3effe0", "ds"),  # notrack jmp rax
        ("26ff07", "es"),
        ("36ff07", "ss"),
        ("cc", "opcode cc"),
        ("f4", "opcode f4"),
        ("cd80", "opcode cd"),
        ("8ed0", "mov ss"),
        ("66e90000", "operand-size"),
        ("660f840000", "operand-size"),
        ("", "cannot be decoded"),
        ("66", "cannot be decoded"),
    ],
)
def test_rules(code, refused):
    why = uprobe_refusal(bytes.fromhex(code))
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


@given(st.sampled_from([0x26, 0x2E, 0x36, 0x3E, 0xF0]), st.lists(st.sampled_from([0x66, 0x67, 0xF2, 0xF3, 0x64, 0x65]), max_size=3),
       st.binary(min_size=1, max_size=12))
def test_a_bad_prefix_anywhere_among_the_prefixes_is_refused(bad, others, rest):
    k = len(others) // 2
    code = bytes(others[:k]) + bytes([bad]) + bytes(others[k:]) + rest
    assert uprobe_refusal(code) is not None


@given(st.binary(min_size=0, max_size=20))
def test_never_raises(code):
    why = uprobe_refusal(code)
    assert why is None or isinstance(why, str)
