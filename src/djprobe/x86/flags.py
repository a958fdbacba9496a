"""Are the arithmetic status flags dead at a point (written before read)?

A stub that may clobber CF PF AF ZF SF OF without saving them is cheaper; this answers whether
that is safe at the start of an instruction, looking only at straight-line code (following
unconditional direct jumps that stay inside the instructions given). Any doubt answers False.
"""

from __future__ import annotations

from collections.abc import Sequence

from iced_x86 import Instruction, MemorySize, Mnemonic, OpKind, RegisterExt, RflagsBits

from .decode import Flow, Insn

__all__ = ["STATUS_FLAGS", "flags_dead_after", "flags_effect"]

#: CF PF AF ZF SF OF as an iced RflagsBits mask. DF is not included: it is always treated as live.
STATUS_FLAGS = RflagsBits.CF | RflagsBits.PF | RflagsBits.AF | RflagsBits.ZF | RflagsBits.SF | RflagsBits.OF

# Shifts and rotates leave every flag unchanged when the (masked) count is 0, so a count in CL
# or an immediate that masks to 0 does not certainly write anything.
_SHIFTS = frozenset(
    {
        Mnemonic.SHL, Mnemonic.SAL, Mnemonic.SHR, Mnemonic.SAR, Mnemonic.ROL, Mnemonic.ROR,
        Mnemonic.RCL, Mnemonic.RCR, Mnemonic.SHLD, Mnemonic.SHRD,
    }
)
_IMM_KINDS = frozenset({OpKind.IMMEDIATE8, OpKind.IMMEDIATE8_2ND})


def _certainly_written(insn: Insn) -> int:
    instr = insn.instruction
    written = instr.rflags_modified  # written | cleared | set | undefined
    if not written & STATUS_FLAGS:
        return 0
    mn = instr.mnemonic
    if mn in _SHIFTS:
        count_op = instr.op_count - 1
        kind = instr.op_kind(count_op)
        if kind in _IMM_KINDS:
            # 64-bit operands mask the count to 6 bits, others to 5
            mask = 0x3F if _is_64bit_operand(instr) else 0x1F
            if instr.immediate8 & mask == 0:
                return 0
        elif kind == OpKind.REGISTER:  # count in cl: may be 0
            return 0
        # implicit count of 1 (d1 /x): always writes
    # rep-prefixed cmps/scas with rcx == 0 do not touch the flags
    if instr.is_string_instruction and (instr.has_rep_prefix or instr.has_repne_prefix):
        return 0
    return written


def _is_64bit_operand(instr: Instruction) -> bool:
    if instr.op0_kind == OpKind.REGISTER:
        return RegisterExt.size(instr.op0_register) == 8
    return instr.memory_size in (MemorySize.UINT64, MemorySize.INT64)


def flags_effect(insn: Insn) -> tuple[int, int]:
    """(flags read, flags certainly written) for ``insn``, as RflagsBits masks of STATUS_FLAGS."""
    return insn.instruction.rflags_read & STATUS_FLAGS, _certainly_written(insn) & STATUS_FLAGS


def flags_dead_after(insns: Sequence[Insn], index: int) -> bool:
    """True if CF PF AF ZF SF OF are certainly dead at the start of ``insns[index]``.

    Walks forward from ``insns[index]``: a read of a flag not yet overwritten -> False; once all
    six have been overwritten -> True; a call or return -> True (the SysV ABI does not preserve
    flags across calls); an unconditional direct jump is followed if its target starts an
    instruction of ``insns``; anything else (conditional or indirect branch, syscall, trap,
    invalid bytes, end of ``insns``, a loop) -> False.
    """
    if not 0 <= index < len(insns):
        return False
    by_address: dict[int, int] | None = None
    live = STATUS_FLAGS  # flags whose fate is still unknown
    seen: set[int] = set()
    i = index
    while 0 <= i < len(insns):
        if i in seen:
            return False
        seen.add(i)
        insn = insns[i]
        flow = insn.flow
        if flow is Flow.INVALID or flow is Flow.INTERRUPT or flow is Flow.SYSCALL:
            # syscall copies RFLAGS to r11: a read
            return False
        read, written = flags_effect(insn)
        if read & live:
            return False
        live &= ~written
        if not live:
            return True
        if flow is Flow.CALL or flow is Flow.INDIRECT_CALL or flow is Flow.RETURN:
            return True
        if flow is Flow.NEXT:
            if i + 1 < len(insns) and insns[i + 1].address != insn.end:
                return False  # a gap: not straight-line code
            i += 1
            continue
        if flow is Flow.JUMP:
            if by_address is None:
                by_address = {x.address: k for k, x in enumerate(insns)}
            j = by_address.get(insn.target)
            if j is None:
                return False
            i = j
            continue
        return False  # COND_JUMP, INDIRECT_JUMP
    return False
