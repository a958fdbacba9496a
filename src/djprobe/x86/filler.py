"""Alignment filler: instructions assemblers put between functions that do nothing.

x86-64 toolchains pad with ``nop`` forms (``nopw 0x0(%rax,%rax,1)``...) and ``int3``; i386 gas
pads with the older no-op forms too: ``lea esi,[esi+eiz*1+0x0]`` (``8d b4 26 00 00 00 00``),
``lea esi,[esi+0x0]``, ``lea edi,[edi+eiz*1+0x0]``, ``mov esi,esi`` (``_dl_debug_state`` of the
32-bit ld.so is one ``ret`` followed by such bytes). :func:`is_filler` says whether a decoded
instruction is one of these; the site analysis lets a jump overwrite filler only where nothing
else shows it is reached (no symbol, FDE or known entry covers it).
"""

from __future__ import annotations

from iced_x86 import Code, Mnemonic, OpKind, Register

from .decode import Insn

__all__ = ["is_filler"]

_LEA = {Code.LEA_R32_M}
_MOV = {Code.MOV_R32_RM32, Code.MOV_RM32_R32}


def is_filler(insn: Insn) -> bool:
    """True for ``nop``, ``int3``, and in 32-bit code the no-op ``lea r,[r+0]`` /
    ``lea r,[r+eiz*1+0]`` and ``mov esi,esi`` / ``mov edi,edi`` forms of alignment padding."""
    i = insn.instruction
    if i.mnemonic in (Mnemonic.NOP, Mnemonic.INT3):
        return True
    if insn.bits != 32:  # x86-64 toolchains pad with nop forms (a 32-bit mov there zero-extends)
        return False
    if i.code in _LEA:
        return (i.op1_kind == OpKind.MEMORY and i.memory_base == i.op0_register
                and i.memory_index == Register.NONE and i.memory_displacement == 0 and i.segment_prefix == Register.NONE)
    if i.code in _MOV:
        return i.op0_kind == OpKind.REGISTER and i.op1_kind == OpKind.REGISTER and i.op0_register == i.op1_register \
            and i.op0_register in (Register.ESI, Register.EDI)
    return False
