"""The loader hook's action in 32-bit (i386) code: :func:`djprobe.loader.loader_action` for a
32-bit process, picked by :class:`djprobe.loader.LoaderHook` through the process's Arch.

Same protocol, same words of the area's data part (``LOADER_ARMED``, ``LOADER_REQUEST``,
``LOADER_ACK``, ``LOADER_HEARTBEAT``), same bounds: at the entry of ``_dl_debug_state`` the stub
counts the call (``lock add`` of the low word, ``lock inc`` of the high one on a carry); if the
tracer armed it and ``_r_debug.r_state`` (offset 12 in the i386 ``struct r_debug``) is
``RT_CONSISTENT``, it adds one to REQUEST with ``lock xadd``, wakes the tracer with the i386
``futex`` (240) through ``int 0x80``, and waits on ACK with ``FUTEX_WAIT`` and a 10 ms
``struct timespec`` of two 32-bit words (the i386 ``futex`` takes the old 32-bit timespec) until
ACK reaches its request, the tracer disarms, its heartbeat is older than the staleness bound, or
the total bound passes. The 64-bit TSC comparisons are done in register pairs. ``int 0x80``
clobbers only ``eax``: the request number stays in ``edi``, the ACK value seen in ``ebp``;
``pushfd; pushad`` keep everything for the caller.
"""

from __future__ import annotations

from iced_x86 import Code, Instruction, Register

from .area import LOADER_ACK, LOADER_ARMED, LOADER_HEARTBEAT, LOADER_REQUEST
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _at

__all__ = ["loader_action32", "wake_then_push_deadline", "SYS_FUTEX32"]

SYS_FUTEX32 = 240
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_RT_CONSISTENT = 0


def loader_action32(counter: int, words: int, r_state: int, stale_cycles: int, max_cycles: int,
                    poll_ns: int) -> list[Instruction]:
    """The hook's action in 32-bit code (see :func:`djprobe.loader.loader_action`): ``counter``
    is the 64-bit hit counter, ``words`` the data part holding the loader words, ``r_state`` the
    address of ``_r_debug.r_state``; the futex wait is re-checked every ``poll_ns``."""
    R = Register
    a = _Asm()
    add = a.add
    armed, request, ack, beat = (words + off for off in (LOADER_ARMED, LOADER_REQUEST, LOADER_ACK, LOADER_HEARTBEAT))
    add(Instruction.create(Code.PUSHFD))
    add(Instruction.create(Code.PUSHAD))
    _add64(a, _abs(counter), _abs(counter + 4), "counted")
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(armed), 0))
    a.branch(Code.JE_REL32_32, "done")
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(r_state), _RT_CONSISTENT))
    a.branch(Code.JNE_REL32_32, "done")
    # edi = this request's number
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDI, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _abs(request), R.EDI)
    xadd.has_lock_prefix = True
    add(xadd)
    add(Instruction.create_reg(Code.INC_RM32, R.EDI))
    wake_then_push_deadline(a, request, max_cycles, poll_ns)  # the tracer may be waiting on it
    a.label("wait")
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBP, _abs(ack)))  # the value waited on
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EBP))
    add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.EAX, R.EDI))
    a.branch(Code.JNS_REL32_32, "waited")  # ACK has reached this request
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(armed), 0))
    a.branch(Code.JE_REL32_32, "waited")  # disarmed: the tracer is leaving
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EDX, _at(R.ESP, 12)))  # now >= deadline: done
    a.branch(Code.JA_REL32_32, "waited")
    a.branch(Code.JB_REL32_32, "in_time")
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EAX, _at(R.ESP, 8)))
    a.branch(Code.JAE_REL32_32, "waited")
    a.label("in_time")
    # now - heartbeat > stale_cycles (signed): the tracer is gone
    add(Instruction.create_reg_mem(Code.SUB_R32_RM32, R.EAX, _abs(beat)))
    add(Instruction.create_reg_mem(Code.SBB_R32_RM32, R.EDX, _abs(beat + 4)))
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EDX, stale_cycles >> 32))
    a.branch(Code.JG_REL32_32, "waited")
    a.branch(Code.JL_REL32_32, "fresh")
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, stale_cycles & 0xFFFFFFFF))
    a.branch(Code.JA_REL32_32, "waited")
    a.label("fresh")
    # futex(ACK, FUTEX_WAIT, ack seen, {0, poll_ns})
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, ack))
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


def wake_then_push_deadline(a: _Asm, word: int, cycles: int, poll_ns: int) -> None:
    """``futex(word, FUTEX_WAKE, 1)`` by ``int 0x80`` (the tracer waits on ``word``), then the
    deadline of a bounded wait pushed: TSC + ``cycles`` at [esp+8] (low) and [esp+12] (high), the
    ``timespec`` {0, ``poll_ns``} of each futex wait at [esp]. Clobbers eax, ebx, ecx, edx."""
    R, add = Register, a.add
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, word))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _FUTEX_WAKE))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_FUTEX32))
    add(Instruction.create_u32(Code.INT_IMM8, 0x80))
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, cycles & 0xFFFFFFFF))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM32, R.EDX, cycles >> 32))
    add(Instruction.create_reg(Code.PUSH_R32, R.EDX))
    add(Instruction.create_reg(Code.PUSH_R32, R.EAX))
    add(Instruction.create_i32(Code.PUSHD_IMM32, poll_ns))
    add(Instruction.create_i32(Code.PUSHD_IMM8, 0))
