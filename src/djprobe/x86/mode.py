"""The iced-x86 forms that differ between 64-bit and 32-bit (i386) code, as one table per mode.

The decoder, relocator and stub builders look up the instruction forms of the mode they work in
here (``MODES[bits]``, with ``bits`` from :class:`djprobe.arch.Arch` or from a decoded
instruction) instead of branching on the mode themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Code, Register

__all__ = ["Mode", "MODE64", "MODE32", "MODES"]


@dataclass(frozen=True)
class Mode:
    """Instruction forms of one x86 mode."""

    bits: int
    word: int  #: bytes pushed by a call
    jmp_rel8: int
    jmp_rel32: int
    call_rel32: int
    call_rm: int  #: call r/m (the indirect call form the relocator handles)
    jmp_rm: int
    #: jmp forms the relocator may re-encode as ``jmp rel32``
    jmp_codes: frozenset
    #: loop/jrcxz/jecxz forms (no near form: relocated through a jmp rel32)
    loop_codes: frozenset
    #: the stack pointer and its parts
    stack_regs: frozenset
    #: the relocated call pushes its return address with ``push qword [rip+L]`` (6 bytes, the
    #: value kept after the jump) on x86-64, with ``push imm32`` (5 bytes) on i386
    push_return_size: int
    return_literal_size: int
    #: can a rel32 reach every address (32-bit: the 4 GiB wrap), or only ±2 GiB?
    rel32_reaches_all: bool

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


MODE64 = Mode(
    bits=64,
    word=8,
    jmp_rel8=Code.JMP_REL8_64,
    jmp_rel32=Code.JMP_REL32_64,
    call_rel32=Code.CALL_REL32_64,
    call_rm=Code.CALL_RM64,
    jmp_rm=Code.JMP_RM64,
    jmp_codes=frozenset({Code.JMP_REL8_64, Code.JMP_REL32_64}),
    loop_codes=frozenset({
        Code.LOOP_REL8_64_RCX, Code.LOOP_REL8_64_ECX, Code.LOOPE_REL8_64_RCX, Code.LOOPE_REL8_64_ECX,
        Code.LOOPNE_REL8_64_RCX, Code.LOOPNE_REL8_64_ECX, Code.JRCXZ_REL8_64, Code.JECXZ_REL8_64,
    }),
    stack_regs=frozenset({Register.RSP, Register.ESP, Register.SP, Register.SPL}),
    push_return_size=6,
    return_literal_size=8,
    rel32_reaches_all=False,
)

MODE32 = Mode(
    bits=32,
    word=4,
    jmp_rel8=Code.JMP_REL8_32,
    jmp_rel32=Code.JMP_REL32_32,
    call_rel32=Code.CALL_REL32_32,
    call_rm=Code.CALL_RM32,
    jmp_rm=Code.JMP_RM32,
    jmp_codes=frozenset({Code.JMP_REL8_32, Code.JMP_REL32_32}),
    loop_codes=frozenset({
        Code.LOOP_REL8_32_ECX, Code.LOOPE_REL8_32_ECX, Code.LOOPNE_REL8_32_ECX, Code.JECXZ_REL8_32,
    }),
    stack_regs=frozenset({Register.ESP, Register.SP}),
    push_return_size=5,
    return_literal_size=0,
    rel32_reaches_all=True,
)

MODES = {64: MODE64, 32: MODE32}
