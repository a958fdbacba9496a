"""The exec hook's action in 32-bit (i386) code: :func:`djprobe.execs.exec_action` for a 32-bit
libc, picked by :class:`djprobe.execs.ExecHook` through the process's Arch.

Same protocol, same words of the area's data part (``FORK_FOLLOW``, ``EXEC_SEQ``, ``EXEC_TIDS``,
``EXEC_ACK``, the loader's request word for the wake), same bound: at the entry of ``execve``
(``push ebx; mov edx, [esp+0x10]``: the arguments are read by the relocated instructions, after
the action has given every register back) the stub counts the call; with ``FORK_FOLLOW`` set it
publishes the thread's TID (``gettid`` 224 by ``int 0x80``, ``lock xadd`` on ``EXEC_SEQ``), wakes
the tracer (``futex`` 240) and waits until ``EXEC_ACK`` holds its TID: 10 ms futex waits with a
32-bit timespec, the TSC deadline compared in register pairs, at most ``wait_cycles``.
``pushfd; pushad`` keep everything for the caller; ``int 0x80`` clobbers only ``eax``, so the
TID stays in ``edi`` and the ACK value seen in ``ebp``.
"""

from __future__ import annotations

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .area import EXEC_ACK, EXEC_SEQ, EXEC_TIDS, EXEC_TIDS_MAX, FORK_FOLLOW, LOADER_REQUEST
from .loader32 import _FUTEX_WAIT, SYS_FUTEX32, wake_then_push_deadline
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _at

__all__ = ["exec_action32", "SYS_GETTID32", "SYS_FUTEX32"]

SYS_GETTID32 = 224
_POLL_NS = 10_000_000


def exec_action32(counter: int, words: int, wait_cycles: int) -> list[Instruction]:
    """The hook's action in 32-bit code: count (``counter``: the 64-bit hit counter); if
    following (``FORK_FOLLOW`` in the data part at ``words``), publish the TID, wake the tracer,
    wait for ``EXEC_ACK == TID`` (``wait_cycles`` TSC cycles at most)."""
    R = Register
    a = _Asm()
    add = a.add
    add(Instruction.create(Code.PUSHFD))
    add(Instruction.create(Code.PUSHAD))
    _add64(a, _abs(counter), _abs(counter + 4), "counted")
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(words + FORK_FOLLOW), 0))
    a.branch(Code.JE_REL32_32, "done")
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_GETTID32))
    add(Instruction.create_u32(Code.INT_IMM8, 0x80))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.EAX))  # edi = TID
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _abs(words + EXEC_SEQ), R.ECX)
    xadd.has_lock_prefix = True
    add(xadd)
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, EXEC_TIDS_MAX - 1))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, MemoryOperand(R.NONE, R.ECX, 4, words + EXEC_TIDS, 4), R.EDI))
    wake_then_push_deadline(a, words + LOADER_REQUEST, wait_cycles, _POLL_NS)  # the tracer waits on the request word
    a.label("wait")
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBP, _abs(words + EXEC_ACK)))  # the value waited on
    add(Instruction.create_reg_reg(Code.CMP_RM32_R32, R.EBP, R.EDI))
    a.branch(Code.JE_REL32_32, "waited")
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EDX, _at(R.ESP, 12)))  # now >= deadline: go on
    a.branch(Code.JA_REL32_32, "waited")
    a.branch(Code.JB_REL32_32, "in_time")
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EAX, _at(R.ESP, 8)))
    a.branch(Code.JAE_REL32_32, "waited")
    a.label("in_time")
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, words + EXEC_ACK))  # futex(ACK, WAIT, seen, {0, 10 ms})
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _FUTEX_WAIT))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDX, R.EBP))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ESI, R.ESP))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_FUTEX32))
    add(Instruction.create_u32(Code.INT_IMM8, 0x80))
    a.branch(Code.JMP_REL32_32, "wait")
    a.label("waited")
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESP, _at(R.ESP, 16)))
    a.label("done")
    add(Instruction.create(Code.POPAD))
    add(Instruction.create(Code.POPFD))
    return _aimed32(a)
