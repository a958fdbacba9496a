"""The string-copying record stub in 32-bit (i386) code: :mod:`djprobe.fetch_stubs` for a 32-bit
process.

It writes the same string record (``area.string_record_dtype``: one consumer for both modes): the
instance, the TID, the thread pointer (``gs:[0]``), the TSC, the six cdecl argument words
``[esp+4]`` ... ``[esp+24]`` (``esp`` at the probe) in the argument slots and ``eax`` in the rax
slot. For each argument word in ``string_mask`` it copies ``layout.string_size`` bytes from the
address that word holds into the record's slot of that word, with the i386 ``process_vm_readv``
(347) on its own process, issued by a call of the vDSO's ``__kernel_vsyscall`` (``AT_SYSINFO``
of the process: ``sysenter``/``syscall``), or ``int 0x80`` where there is none: the kernel
copies through the page tables and answers ``-EFAULT`` for NULL, wild or unmapped addresses instead of faulting, so the
target is never harmed; the result (bytes copied, or ``-errno``) goes next to the bytes. The remote
range is two 32-bit iovecs split at the page boundary when it crosses one (a string ending just
before an unmapped page is still copied up to it). The process is named by the TID in the thread
control block (``gs:[tid_offset]``: a forked child reads its own memory), or by ``getpid`` (20)
at each hit where that offset is unknown.

Measured here (2 vCPUs of an AMD EPYC VM, kernel 6.18): ``int 0x80`` costs 8-10 us a call from a
32-bit process (``getpid``: 9.8 us; ``process_vm_readv`` of 64 bytes: 8.3 us), the same call
through ``__kernel_vsyscall`` 1.3 us; the stub took 10.1 us a hit with ``int 0x80``.
Both take their arguments in ``ebx ecx edx esi edi ebp`` and clobber only ``eax``: the
strings are fetched one after the other by unrolled code (the mask is known when the stub is
built), with the record's address and the ring position kept in the stub's frame. The frame:
``pushfd; pushad`` (36 bytes), then 48 bytes of locals (three iovecs, the record, the position,
the TID); the stack below ``esp`` is nobody's at a probe site, as for the other 32-bit stubs.
As on x86-64, a program whose seccomp filter forbids ``process_vm_readv`` gets the filter's
answer: do not give string prototypes for such programs.
"""

from __future__ import annotations

import dataclasses

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .area import ARG_REGISTERS, ARGS_RECORD_SIZE, RING_HEARTBEAT, RING_TAIL, RING_WAITED, STRING_MASK_OFFSET, STRING_SLOT_HEADER, AreaLayout
from .fetch_stubs import PAGE, StringRings
from .process import _auxv
from .stubs import RecordTargets, Relocatable, Stub, _Asm
from .stubs32 import _abs, _add64, _aimed32, _at, _esp, _wait_for_room32, apart_add32, assemble32, count_and_reserve32

__all__ = ["fetch_action32", "build_fetch_stub32", "kernel_vsyscall", "SYS_PROCESS_VM_READV32", "SYS_GETPID32"]

SYS_PROCESS_VM_READV32 = 347
SYS_GETPID32 = 20
AT_SYSINFO = 32  # auxv: the vDSO's __kernel_vsyscall in a 32-bit process

# Locals at esp (after the pushes): local iovec, two remote iovecs (8 bytes each: base, length),
# then the record's address, the ring position (low, high) and the TID.
_LOCAL_IOV, _REMOTE_IOV = 0, 8
_RECORD, _POS_LO, _POS_HI, _TID = 24, 28, 32, 36
_LOCALS = 48
# pushad's frame above the locals (edi first), then the flags; esp at the probe above them
_PUSHAD = {"edi": 0, "esi": 4, "ebp": 8, "ebx": 16, "edx": 20, "ecx": 24, "eax": 28}
_PROBE_ESP = _LOCALS + 36


def fetch_action32(layout: AreaLayout, where: RecordTargets, rings: StringRings, string_mask: int,
                   vsyscall: int | None = None) -> list[Instruction]:
    """Instructions that count the hit, write a string record and copy the strings whose
    addresses are in the cdecl argument words of ``string_mask`` (bit i: ``[esp+4+4*i]``);
    system calls by ``call vsyscall`` (the process's ``__kernel_vsyscall``), else ``int 0x80``.

    Raises ValueError for a mask selecting none or more than six words."""
    if not 0 < string_mask < 1 << len(ARG_REGISTERS):
        raise ValueError(f"string_mask must select some of the {len(ARG_REGISTERS)} argument words, not {string_mask:#x}")
    R = Register
    a = _Asm()
    add = a.add
    S = layout.string_size
    slot_size = STRING_SLOT_HEADER + S
    record_size = layout.string_record_size

    def system_call() -> None:
        if vsyscall is None:
            add(Instruction.create_u32(Code.INT_IMM8, 0x80))
        else:
            add(Instruction.create_branch(Code.CALL_REL32_32, vsyscall))

    add(Instruction.create(Code.PUSHFD))
    add(Instruction.create(Code.PUSHAD))
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESP, _esp(-_LOCALS)))
    # count in a locked shard chosen by esp (as the other 32-bit stubs), reserve in string ring
    # shard % ring_count: esi = its header, edi = its records, edx:eax = the position
    count_and_reserve32(a, layout, where.counter, rings.headers, rings.records, layout.string_ring_stride,
                        layout.string_ring_slots, where.rseq_offset)  # a vfork child: to "apart"
    # the position in the frame; edi = the record
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_POS_LO), R.EAX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_POS_HI), R.EDX))
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.string_ring_slots - 1))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, record_size.bit_length() - 1))
    add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EDI, R.EAX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_RECORD), R.EDI))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, 8), where.instance))
    gs0 = MemoryOperand(R.NONE, R.NONE, 1, 0, 4, False, R.GS)
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, gs0))  # the thread pointer
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 16), R.ECX))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, 20), 0))
    if where.tid_offset is not None:  # the TID names this process for process_vm_readv
        tid = MemoryOperand(R.NONE, R.NONE, 1, where.tid_offset, 4, False, R.GS)
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, tid))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 12), R.EAX))
    else:
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_GETPID32))
        system_call()
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_TID), R.EAX))
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 24), R.EAX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 28), R.EDX))

    def store(slot_offset: int, source: MemoryOperand) -> None:
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, source))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, slot_offset), R.ECX))
        add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, slot_offset + 4), 0))

    for j in range(len(ARG_REGISTERS)):  # the cdecl argument words, then eax in the rax slot
        store(32 + 8 * j, _esp(_PROBE_ESP + 4 * (j + 1)))
    store(32 + 8 * len(ARG_REGISTERS), _esp(_LOCALS + _PUSHAD["eax"]))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, STRING_MASK_OFFSET), string_mask))
    for i in range(len(ARG_REGISTERS)):  # unrolled: one copy per selected word
        if not string_mask >> i & 1:
            continue
        slot = ARGS_RECORD_SIZE + i * slot_size
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDI, _esp(_RECORD)))
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _at(R.EDI, 32 + 8 * i)))  # the address
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, slot), R.EAX))
        add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, slot + 4), 0))
        # edx = bytes to the end of its page, at most S: the first remote iovec; the rest follows
        add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EAX))
        add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, PAGE - 1))
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PAGE))
        add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.EDX, R.ECX))
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, S))
        add(Instruction.create_reg_reg(Code.CMP_R32_RM32, R.EDX, R.ECX))
        add(Instruction.create_reg_reg(Code.CMOVA_R32_RM32, R.EDX, R.ECX))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_REMOTE_IOV), R.EAX))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_REMOTE_IOV + 4), R.EDX))
        add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EAX, R.EDX))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_REMOTE_IOV + 8), R.EAX))
        add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.ECX, R.EDX))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_REMOTE_IOV + 12), R.ECX))
        add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ECX, _at(R.EDI, slot + STRING_SLOT_HEADER)))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _esp(_LOCAL_IOV), R.ECX))
        add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _esp(_LOCAL_IOV + 4), S))
        # two remote iovecs only when the range crosses a page: edi = 1 + (second length != 0)
        add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))
        add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _esp(_REMOTE_IOV + 12), 0))
        add(Instruction.create_reg(Code.SETNE_RM8, R.DL))
        add(Instruction.create_reg_mem(Code.LEA_R32_M, R.EDI, _at(R.EDX, 1)))
        # process_vm_readv(tid, &local, 1, &remote, count, 0)
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBX, _esp(_TID)))
        add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ECX, _esp(_LOCAL_IOV)))
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
        add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESI, _esp(_REMOTE_IOV)))
        add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBP, R.EBP))
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_PROCESS_VM_READV32))
        system_call()
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDI, _esp(_RECORD)))
        add(Instruction.create(Code.CDQ))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, slot + 8), R.EAX))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, slot + 12), R.EDX))
    # commit: seq = pos + 1, its low word written last
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDI, _esp(_RECORD)))
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _esp(_POS_LO)))
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _esp(_POS_HI)))
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.EAX, 1))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM8, R.EDX, 0))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 4), R.EDX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 0), R.EAX))
    a.branch(Code.JMP_REL32_32, "done")
    if where.rseq_offset is not None:
        a.label("apart")  # a vfork/posix_spawn child before its exec: counted apart, no record, no copy
        apart_add32(a, layout, where.counter, "counted_apart")
        a.branch(Code.JMP_REL32_32, "done")
    a.label("full")
    if where.wait_cycles:  # the string rings have their own number of slots
        _wait_for_room32(a, dataclasses.replace(layout, ring_slots=layout.string_ring_slots), where.wait_cycles,
                         RING_HEARTBEAT, RING_TAIL, RING_WAITED)
    a.label("drop")
    _add64(a, _abs(where.drops), _abs(where.drops + 4), "dropped")
    a.label("done")
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESP, _esp(_LOCALS)))
    add(Instruction.create(Code.POPAD))
    add(Instruction.create(Code.POPFD))
    return _aimed32(a)


def kernel_vsyscall(pid: int) -> int | None:
    """``__kernel_vsyscall`` of 32-bit process ``pid`` (its ``AT_SYSINFO``), None without one."""
    try:
        return _auxv(pid, 8).get(AT_SYSINFO) or None
    except OSError:
        return None


def build_fetch_stub32(site: Relocatable, layout: AreaLayout, slot_address: int, where: RecordTargets,
                       rings: StringRings, string_mask: int, vsyscall: int | None = None) -> Stub:
    """The record stub of an entry site in 32-bit code whose probe fetches the strings in
    ``string_mask`` (the arguments of :func:`djprobe.fetch_stubs.build_fetch_stub`, and the
    process's ``__kernel_vsyscall``: :func:`kernel_vsyscall`; None: ``int 0x80``).

    Raises ValueError (a bad mask, or a stub that does not fit a slot), RelocationError."""
    action = assemble32(fetch_action32(layout, where, rings, string_mask, vsyscall), slot_address)
    relocated = site.relocate_to(slot_address + len(action), site.address + site.size)
    code = action + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action), relocated=relocated)
