"""The fork hook in 32-bit (i386) processes: :mod:`djprobe.forks` for a 32-bit libc.

The 32-bit ``_Fork`` makes its ``clone`` (120) through the vDSO: ``mov ebx, flags; ... mov eax,
0x78; call gs:[0x10]`` (``__kernel_vsyscall``; ``int 0x80`` in other builds). The hook goes on the
instruction after that call, where ``eax`` is the result: :func:`find_clone_return32` finds it,
with the flags in ``ebx`` known not to hold ``CLONE_VM``. Its action (:func:`fork_action32`):
``pushfd; pushad``; in the parent (``eax != 0``) it counts (``lock add``/``lock inc`` of the
64-bit counter); in the child it walks the area's table of data parts (``area.FORK_TABLE``: a
count, then 16-byte entries whose low dwords are the address and size, 32-bit addresses) from
the last entry to the first, and maps fresh private anonymous memory over each with ``mmap2``
(192, ``MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED``) by ``int 0x80``: the child's hits go to memory
of its own, its loader hook is disarmed there. The loop index is kept on the stack (``int 0x80``
takes all six argument registers). ``--follow`` (memfd data parts handed to the tracer) is not
done for 32-bit children: they count apart, unseen.
"""

from __future__ import annotations

from iced_x86 import Code, Decoder, Instruction, Mnemonic, OpKind, Register

from .area import FORK_TABLE, FORK_TABLE_ENTRIES
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _at

__all__ = ["fork_action32", "find_clone_return32", "SYS_CLONE32", "SYS_MMAP2"]

SYS_CLONE32, SYS_MMAP2 = 120, 192
_CLONE_VM = 0x100
_PROT_READ_WRITE = 3
_MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10


def fork_action32(counter: int, table: int) -> list[Instruction]:
    """The hook's action in 32-bit code: count in the parent; in the child (``eax == 0``) map
    fresh private memory over each data part of the table at ``table``, last entry first."""
    R = Register
    a = _Asm()
    add = a.add
    add(Instruction.create(Code.PUSHFD))
    add(Instruction.create(Code.PUSHAD))
    add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.branch(Code.JE_REL32_32, "child")
    _add64(a, _abs(counter), _abs(counter + 4), "counted")
    a.branch(Code.JMP_REL32_32, "done")
    a.label("child")
    add(Instruction.create_mem(Code.PUSH_RM32, _abs(table)))  # [esp] = entries left
    a.label("next")
    add(Instruction.create_mem(Code.DEC_RM32, _at(R.ESP, 0)))
    a.branch(Code.JS_REL32_32, "mapped")
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _at(R.ESP, 0)))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, 4))
    entries = table + (FORK_TABLE_ENTRIES - FORK_TABLE)
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBX, _abs(entries, R.EAX)))  # address
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, _abs(entries + 8, R.EAX)))  # size
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, _PROT_READ_WRITE))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, _MAP_PRIVATE_ANONYMOUS_FIXED))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDI, 0xFFFFFFFF))
    add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBP, R.EBP))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_MMAP2))
    add(Instruction.create_u32(Code.INT_IMM8, 0x80))
    a.branch(Code.JMP_REL32_32, "next")
    a.label("mapped")
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESP, _at(R.ESP, 4)))
    a.label("done")
    add(Instruction.create(Code.POPAD))
    add(Instruction.create(Code.POPFD))
    return _aimed32(a)


def _is_system_call32(insn) -> bool:
    """``int 0x80``, or ``call gs:[0x10]`` (glibc's call of ``__kernel_vsyscall``)."""
    if insn.code == Code.INT_IMM8 and insn.immediate(0) == 0x80:
        return True
    return (insn.mnemonic == Mnemonic.CALL and insn.op0_kind == OpKind.MEMORY and insn.segment_prefix == Register.GS
            and insn.memory_base == Register.NONE and insn.memory_index == Register.NONE
            and insn.memory_displacement == 0x10)


def find_clone_return32(code: bytes, address: int) -> tuple[int | None, str]:
    """The address after the ``clone`` system call of a 32-bit ``_Fork`` at ``address`` whose
    flags (``ebx``) are known and lack ``CLONE_VM``; else (None, why)."""
    known: dict[int, int | None] = {}  # eax, ebx: the system call number, clone's flags
    for insn in Decoder(32, code, ip=address):
        if insn.mnemonic == Mnemonic.MOV and insn.op0_kind == OpKind.REGISTER and insn.op0_register in (Register.EAX, Register.EBX):
            known[insn.op0_register] = insn.immediate(1) if insn.op1_kind == OpKind.IMMEDIATE32 else None
        elif insn.op0_kind == OpKind.REGISTER and insn.op0_register in (Register.EAX, Register.EBX) \
                and insn.mnemonic not in (Mnemonic.PUSH, Mnemonic.CMP, Mnemonic.TEST):
            known[insn.op0_register] = None  # written by something else
        if _is_system_call32(insn) and known.get(Register.EAX) == SYS_CLONE32:
            flags = known.get(Register.EBX)
            if flags is None or flags & _CLONE_VM:
                return None, "its clone's flags are not known to lack CLONE_VM"
            return insn.next_ip, ""
        if _is_system_call32(insn) or insn.mnemonic == Mnemonic.CALL:
            known[Register.EAX] = None  # a call returns in eax
    return None, "no clone system call (mov eax, 120; call gs:[0x10] or int 0x80) found"
