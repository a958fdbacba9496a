"""The record stub that also copies strings at the hit (``char *`` arguments of a prototype).

It records what an argument record holds (instance, thread, TID, TSC, the six argument registers
and ``rax``) into a *string record* of the area's string rings (``area.string_record_dtype``), and
for each argument register in ``string_mask`` copies ``layout.string_size`` bytes from the
address it holds into the record's slot of that register, with ``process_vm_readv`` on its own
process, issued by a ``syscall`` in the stub. The kernel copies through the page tables and
returns ``-EFAULT`` for a NULL, wild or unmapped address instead of faulting, so the target is
never harmed; the result (bytes copied, or ``-errno``) is stored next to the bytes. The remote
range is given as two iovecs split at the page boundary when it crosses one, so a string that ends
just before an unmapped page is still copied up to it (a partial copy).

The process is named by the TID read from the thread control block (``fs:[tid_offset]``): a
thread ID names its process for ``process_vm_readv``, glibc updates that field in a forked child
(so a child reads its own memory, where an immediate PID would read its parent's), and it costs
no system call. Where the offset is unknown, the stub asks ``getpid`` at each hit.

``syscall`` clobbers ``rcx`` and ``r11`` (and ``rax``): every general-purpose register is saved in
the frame first, as the record stub does. A program whose seccomp filter forbids
``process_vm_readv`` gets the filter's answer (an error marker, or worse for a killing filter):
do not give string prototypes for such programs.
"""

from __future__ import annotations

import dataclasses

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .area import (
    ARG_REGISTERS, ARGS_RECORD_SIZE, REGISTER_NAMES, RING_HEADER_SIZE, RING_HEARTBEAT, RING_TAIL, RING_WAITED,
    STRING_CLAIM_OFFSET, STRING_MASK_OFFSET, STRING_SLOT_HEADER,
    AreaLayout,
)  # fmt: skip
from .rseq import CPU_ID, VFORK_CPU
from .stubs import (
    RED_ZONE,
    RecordTargets,
    Relocatable,
    Stub,
    _Asm,
    _finish,
    _fs,
    _mem,
    _rdtsc,
    _rsp_slot,
    apart_inc,
    stack_hash,
)

# The full frame of this stub (every general-purpose register pushed, then the flags slot) and
# its bounded wait for room with the ring header in rsi: the record stub of stubs.py now keeps a
# smaller frame of its own.
_PUSH_ORDER = (
    Register.RAX, Register.RCX, Register.RDX, Register.RBX, Register.RBP, Register.RSI, Register.RDI,
    Register.R8, Register.R9, Register.R10, Register.R11, Register.R12, Register.R13, Register.R14, Register.R15,
)  # fmt: skip
# After the pushes, the frame at rsp holds REGISTER_NAMES[0..14] (r15 first), then the flags slot.
_FRAME_SIZE = 8 * (len(_PUSH_ORDER) + 1)
_FLAGS_SLOT = 8 * len(_PUSH_ORDER)


def _wait_for_room_rsi(a: _Asm, layout: AreaLayout, wait_cycles: int, record_size: int) -> None:
    """The ring at rsi (records at rdi) is full: if its consumer drained it within the last
    ``wait_cycles`` TSC cycles, spin (``pause``) until there is room (then reserve again) or
    until ``wait_cycles`` pass without the consumer draining it (each drain seen starts the
    timeout again; then drop). If the slot at the ring's tail is uncommitted and claimed by this
    thread, this is that thread's signal handler, which would wait for itself: it goes to
    ``own`` (the next ring). The cycles waited are added to the ring's RING_WAITED. A stopped or
    dead consumer stops draining: after one timeout, full rings drop at once."""
    R = Register
    fs0 = MemoryOperand(R.NONE, R.NONE, 1, 0, 8, False, R.FS)
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RAX))  # when the wait began
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RCX, _mem(R.RSI, RING_HEARTBEAT)))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R9, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R9))
    a.branch(Code.JG_REL32_64, "drop")  # no drain for longer than the timeout (signed: see stubs._wait_for_room)
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R9, R.R8))  # the deadline
    a.label("progress")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.R11, _mem(R.RSI, RING_TAIL)))
    a.label("wait")
    a.add(Instruction.create(Code.PAUSE))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI)))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.RSI, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
    a.branch(Code.JB_REL32_64, "room")
    if wait_cycles:  # own uncommitted slot at the tail?
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI, RING_TAIL)))
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDX, R.EAX))
        a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EDX, layout.ring_slots - 1))
        a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RDX, record_size.bit_length() - 1))
        a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.RDI))
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RAX, 1)))
        a.add(Instruction.create_mem_reg(Code.CMP_RM64_R64, _mem(R.RDX), R.RAX))
        a.branch(Code.JAE_REL32_64, "not_mine")  # committed (or read as a later lap's)
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI)))
        a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.RSI, RING_TAIL)))
        a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
        a.branch(Code.JB_REL32_64, "room")
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RDX, STRING_CLAIM_OFFSET)))
        a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RAX, fs0))
        a.branch(Code.JNE_REL32_64, "not_mine")
        _waited(a)
        a.branch(Code.JMP_REL32_64, "own")
    a.label("not_mine")
    _rdtsc(a)
    a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.R11, _mem(R.RSI, RING_TAIL)))
    a.branch(Code.JE_REL32_64, "no_progress")
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R9, wait_cycles))  # drained: the timeout starts again
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R9, R.RAX))
    a.branch(Code.JMP_REL32_64, "progress")
    a.label("no_progress")
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.R9))
    a.branch(Code.JB_REL32_64, "wait")
    _waited(a)
    a.branch(Code.JMP_REL32_64, "drop")  # timed out
    a.label("room")
    _waited(a)
    a.branch(Code.JMP_REL32_64, "retry")


def _waited(a: _Asm) -> None:
    """Add the TSC cycles since the wait began (r8) to the ring's RING_WAITED (rax, rdx clobbered)."""
    R = Register
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.R8))
    added = Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem(R.RSI, RING_WAITED), R.RAX)
    added.has_lock_prefix = True
    a.add(added)


SYS_GETPID = 39
SYS_PROCESS_VM_READV = 310
PAGE = 4096
_IOV = 8 * 16  # the iovecs (one local, two remote: 48 bytes) sit above the frame, below the red zone
_IOV_BYTES = 48


@dataclasses.dataclass(frozen=True)
class StringRings:
    """Target addresses of the area's string rings: ring 0's header and first record."""

    headers: int
    records: int


def string_rings(layout: AreaLayout, data_address: int) -> StringRings:
    """Where the string rings of an area whose data part is at ``data_address`` are."""
    return StringRings(data_address + layout.string_rings_offset, data_address + layout.string_records_offset)


def fetch_action(layout: AreaLayout, where: RecordTargets, rings: StringRings, string_mask: int) -> list[Instruction]:
    """Instructions that count the hit, write a string record and copy the strings of the
    argument registers in ``string_mask`` (bit i: ``ARG_REGISTERS[i]``) into it."""
    if not 0 < string_mask < 1 << len(ARG_REGISTERS):
        raise ValueError(f"string_mask must select some of the {len(ARG_REGISTERS)} argument registers, not {string_mask:#x}")
    a = _Asm()
    R = Register
    S = layout.string_size
    slot_size = STRING_SLOT_HEADER + S
    record_size = layout.string_record_size
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(-RED_ZONE - 8 - _IOV_BYTES)))
    for reg in _PUSH_ORDER:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    a.add(Instruction.create(Code.LAHF))
    a.add(Instruction.create_reg(Code.SETO_RM8, R.AL))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_FLAGS_SLOT), R.RAX))
    if where.rseq_offset is not None:  # a vfork/posix_spawn child (djprobe.vforks): counted apart, no record
        a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _fs(where.rseq_offset + CPU_ID), VFORK_CPU))
        a.branch(Code.JE_REL32_64, "apart")
    # Count the hit in a locked shard chosen by rsp (as the record stub does); rbx = the shard.
    stride_shift = layout.shard_stride.bit_length() - 1
    stack_hash(a, R.RAX, R.EAX, layout.shard_shift)
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBX, R.RAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, MemoryOperand(R.RIP, displ=where.counter)))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1))
    inc.has_lock_prefix = True
    a.add(inc)
    # Ring = (shard + rings escaped) % ring_count: rsi = its header, rdi = its records. r13 = the
    # shard, r15 = the rings escaped (lossless: see _own_slot_check_rsi), both free until the strings.
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R13, R.RBX))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R15D, R.R15D))
    a.label("pick")
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.R13D))
    a.add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EBX, R.R15D))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EBX, layout.ring_count - 1))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RBX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, RING_HEADER_SIZE.bit_length() - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSI, MemoryOperand(R.RIP, displ=rings.headers)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RSI, R.RAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RBX, layout.string_ring_stride.bit_length() - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, MemoryOperand(R.RIP, displ=rings.records)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RBX))
    # Reserve: while head - tail < slots: cmpxchg head -> head + 1 (lossless: claim the slot first,
    # as the record stub does; the claim is at STRING_CLAIM_OFFSET, free in a string record).
    a.label("retry")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI)))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RCX, _mem(R.RSI, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RCX, layout.string_ring_slots))
    a.branch(Code.JAE_REL32_64, "full")
    fs0 = MemoryOperand(R.NONE, R.NONE, 1, 0, 8, False, R.FS)
    if where.wait_cycles:
        a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R12, R.RAX))
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R10D, R.EAX))
        a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.R10D, layout.string_ring_slots - 1))
        a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.R10, record_size.bit_length() - 1))
        a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R10, R.RDI))
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, fs0))
        a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))
        claim = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.R10, STRING_CLAIM_OFFSET), R.RCX)
        claim.has_lock_prefix = True
        a.add(claim)
        a.branch(Code.JNE_REL32_64, "claim_held")
        a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.R12))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.RAX, 1)))
    cas = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.RSI), R.RCX)
    cas.has_lock_prefix = True
    a.add(cas)
    if where.wait_cycles:
        a.branch(Code.JE_REL32_64, "reserved")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _mem(R.R10, STRING_CLAIM_OFFSET), 0))
        a.branch(Code.JMP_REL32_64, "retry")
        a.label("claim_held")  # rax = the claim's holder
        a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RAX, fs0))
        a.branch(Code.JE_REL32_64, "own")  # this thread's record, interrupted: we are its signal handler
        a.add(Instruction.create(Code.PAUSE))
        a.branch(Code.JMP_REL32_64, "retry")
        a.label("own")
        a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.R15D, layout.ring_count - 1))
        a.branch(Code.JAE_REL32_64, "drop")
        a.add(Instruction.create_reg(Code.INC_RM32, R.R15D))
        a.branch(Code.JMP_REL32_64, "pick")
        a.label("reserved")
    else:
        a.branch(Code.JNE_REL32_64, "retry")
    # rbp = pos; r12 = the record.
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBP, R.RAX))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.string_ring_slots - 1))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, record_size.bit_length() - 1))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RAX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R12, R.RDI))
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _mem(R.R12, 8), where.instance))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, fs0))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R12, 16), R.RCX))
    if where.tid_offset is not None:  # r14 = the TID: it names this process for process_vm_readv
        tid = MemoryOperand(R.NONE, R.NONE, 1, where.tid_offset, 8, False, R.FS)
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.R14D, tid))
        a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _mem(R.R12, 12), R.R14D))
    else:
        a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_GETPID))
        a.add(Instruction.create(Code.SYSCALL))
        a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R14, R.RAX))
    _rdtsc(a)
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R12, 24), R.RAX))
    for j, name in enumerate(ARG_REGISTERS + ("rax",)):
        i = REGISTER_NAMES.index(name)
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(8 * i)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R12, 32 + 8 * j), R.RCX))
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _mem(R.R12, STRING_MASK_OFFSET), string_mask))
    # The strings: r15 = registers left to fetch (bit 0 = the current one), rbx = its index,
    # r13 = its slot in the record.
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.R15D, string_mask))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBX, R.EBX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.R13, _mem(R.R12, ARGS_RECORD_SIZE)))
    iov = _FLAGS_SLOT + 8  # above the flags slot: [local iov][remote iov 1][remote iov 2]
    a.label("next_string")
    a.add(Instruction.create_reg_u32(Code.TEST_RM32_IMM32, R.R15D, 1))
    a.branch(Code.JE_REL32_64, "skip_string")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R12, 32, R.RBX, 8)))  # the address
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R13), R.RAX))
    # rdx = bytes to the end of its page, at most S: the first remote iovec; the rest follows.
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EAX))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, PAGE - 1))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PAGE))
    a.add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.EDX, R.ECX))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, S))
    a.add(Instruction.create_reg_reg(Code.CMP_R32_RM32, R.EDX, R.ECX))
    a.add(Instruction.create_reg_reg(Code.CMOVA_R32_RM32, R.EDX, R.ECX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(iov + 16), R.RAX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(iov + 24), R.RDX))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RAX, R.RDX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(iov + 32), R.RAX))
    a.add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.ECX, R.EDX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(iov + 40), R.RCX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.R13, STRING_SLOT_HEADER)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(iov), R.RCX))
    a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _rsp_slot(iov + 8), S))
    # process_vm_readv(tid, &local, 1, &remote, 2, 0)
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_PROCESS_VM_READV))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.R14))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSI, _rsp_slot(iov)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.R10, _rsp_slot(iov + 16)))
    # two remote iovecs only when the range crosses a page (pinning a second page costs ~1 us here)
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R8D, R.R8D))
    a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, _rsp_slot(iov + 40), 0))
    a.add(Instruction.create_reg(Code.SETNE_RM8, R.R8L))
    a.add(Instruction.create_reg(Code.INC_RM32, R.R8D))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D))
    a.add(Instruction.create(Code.SYSCALL))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R13, 8), R.RAX))
    a.label("skip_string")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.R13, _mem(R.R13, slot_size)))
    a.add(Instruction.create_reg(Code.INC_RM32, R.EBX))
    a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.R15D, 1))
    a.branch(Code.JNE_REL32_64, "next_string")
    # Commit: seq = pos + 1, written last.
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.RBP, 1)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R12), R.RCX))
    a.branch(Code.JMP_REL32_64, "done")
    if where.rseq_offset is not None:
        a.label("apart")
        apart_inc(a, layout, where.counter)
        a.branch(Code.JMP_REL32_64, "done")
    a.label("full")
    if where.wait_cycles:  # the string rings have their own number of slots
        _wait_for_room_rsi(a, dataclasses.replace(layout, ring_slots=layout.string_ring_slots), where.wait_cycles,
                           record_size)
    a.label("drop")
    drop = Instruction.create_mem(Code.INC_RM64, MemoryOperand(R.RIP, displ=where.drops))
    drop.has_lock_prefix = True
    a.add(drop)
    a.label("done")
    for reg in reversed(_PUSH_ORDER[1:]):
        a.add(Instruction.create_reg(Code.POP_R64, reg))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(8)))
    a.add(Instruction.create_reg_u32(Code.ADD_RM8_IMM8, R.AL, 0x7F))
    a.add(Instruction.create(Code.SAHF))
    a.add(Instruction.create_reg(Code.POP_R64, R.RAX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(RED_ZONE + 8 + _IOV_BYTES)))
    return a.instructions()


def build_fetch_stub(
    site: Relocatable, layout: AreaLayout, slot_address: int, where: RecordTargets, rings: StringRings, string_mask: int
) -> Stub:
    """The record stub of an entry site whose probe fetches the strings in ``string_mask``."""
    return _finish(site, layout, slot_address, fetch_action(layout, where, rings, string_mask))
