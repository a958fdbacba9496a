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
takes all six argument registers).

With ``--follow`` (``words`` given and ``FORK_FOLLOW`` set there) the child does what the x86-64
hook does (:func:`djprobe.forks.fork_action`), in i386 system calls: it publishes its PID
(``getpid`` 20, ``lock xadd`` on ``FORK_SEQ``, ``FORK_PIDS``, ``futex`` 240 wake on the loader's
request word), gives each data part a ``memfd_create`` (356) file of its own (``ftruncate`` 93,
header and instance table copied through a temporary ``mmap2``, then ``MAP_SHARED | MAP_FIXED``
over the parent's; fresh private memory if a call fails), and waits for ``FORK_ACK`` in its copy:
10 ms futex waits with a 32-bit timespec, a TSC deadline compared in register pairs, at most
``wait_cycles``. Its working values live in a stack frame (``int 0x80`` takes ``ebx`` ...
``ebp`` as arguments).
"""

from __future__ import annotations

from iced_x86 import Code, Decoder, Instruction, MemoryOperand, Mnemonic, OpKind, Register

from .area import FORK_ACK, FORK_FOLLOW, FORK_NAME, FORK_PIDS, FORK_PIDS_MAX, FORK_SEQ, FORK_TABLE, FORK_TABLE_ENTRIES
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _at

__all__ = ["fork_action32", "find_clone_return32", "SYS_CLONE32", "SYS_MMAP2"]

SYS_CLONE32, SYS_MMAP2 = 120, 192
SYS_GETPID32, SYS_FUTEX32, SYS_MEMFD_CREATE32, SYS_FTRUNCATE32, SYS_MUNMAP32, SYS_CLOSE32 = 20, 240, 356, 93, 91, 6
_FUTEX_WAIT, _FUTEX_WAKE, _MFD_CLOEXEC = 0, 1, 1
_MAP_SHARED, _MAP_FIXED = 0x01, 0x10
_COUNTERS_OFFSET_FIELD = 80  # of the area header: where the instance table ends (low dword)
_POLL_NS = 10_000_000
# the child's frame (esp-relative): entries left, following?, the entry's address and size, the
# memfd, a scratch word, the futex timespec {0, 10 ms} and the TSC deadline (low, high)
_F_INDEX, _F_FOLLOW, _F_ADDR, _F_SIZE, _F_FD, _F_TMP, _F_TS, _F_DEADLINE, _FRAME = 0, 4, 8, 12, 16, 20, 24, 32, 40
_CLONE_VM = 0x100
_PROT_READ_WRITE = 3
_MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10


def _int80(a: _Asm, nr: int) -> None:
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, nr))
    a.add(Instruction.create_u32(Code.INT_IMM8, 0x80))


def _mov_frame(a: _Asm, reg: Register, slot: int) -> None:
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, reg, _at(Register.ESP, slot)))


def _notify32(a: _Asm, words: int, request: int) -> None:
    """--follow, in the child: publish its PID in the parent's area, wake the tracer."""
    R, add = Register, a.add
    _int80(a, SYS_GETPID32)
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDX, R.EAX))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _abs(words + FORK_SEQ), R.ECX)
    xadd.has_lock_prefix = True
    add(xadd)
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, FORK_PIDS_MAX - 1))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, MemoryOperand(R.NONE, R.ECX, 4, words + FORK_PIDS, 4), R.EDX))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, request))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _FUTEX_WAKE))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    _int80(a, SYS_FUTEX32)


def _mmap2(a: _Asm, flags: int, fd_slot: int | None) -> None:
    """mmap2(ebx, ecx, rw, flags, fd, 0): ebx and ecx set by the caller; fd from the frame or -1."""
    R, add = Register, a.add
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, _PROT_READ_WRITE))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, flags))
    if fd_slot is None:
        add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDI, 0xFFFFFFFF))
    else:
        _mov_frame(a, R.EDI, fd_slot)
    add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBP, R.EBP))
    _int80(a, SYS_MMAP2)


def _memfd_copy32(a: _Asm, name: int) -> None:
    """--follow, in the child: the data part at [F_ADDR] ([F_SIZE] bytes) becomes a memfd file
    of its own (header and instance table copied, counters zero) mapped MAP_SHARED where it was;
    jumps to "next" when done, to "anon" (fresh private memory) if a call fails."""
    R, add = Register, a.add
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, name))
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _MFD_CLOEXEC))
    _int80(a, SYS_MEMFD_CREATE32)
    add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.branch(Code.JS_REL32_32, "anon")
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_FD), R.EAX))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EAX))
    _mov_frame(a, R.ECX, _F_SIZE)
    _int80(a, SYS_FTRUNCATE32)
    add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.branch(Code.JNE_REL32_32, "close_anon")
    add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBX, R.EBX))  # tmp = mmap2(0, size, rw, MAP_SHARED, fd, 0)
    _mov_frame(a, R.ECX, _F_SIZE)
    _mmap2(a, _MAP_SHARED, _F_FD)
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, 0xFFFFF000))
    a.branch(Code.JA_REL32_32, "close_anon")
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_TMP), R.EAX))
    # copy the header page and the instance table (up to the header's counters_offset)
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.EAX))
    _mov_frame(a, R.ESI, _F_ADDR)
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, _at(R.ESI, _COUNTERS_OFFSET_FIELD)))
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.ECX, _at(R.ESP, _F_SIZE)))
    a.branch(Code.JBE_REL32_32, "copy")
    _mov_frame(a, R.ECX, _F_SIZE)
    a.label("copy")
    add(Instruction.create(Code.CLD))
    add(Instruction.create_rep_movsb(32))
    _mov_frame(a, R.EBX, _F_TMP)
    _mov_frame(a, R.ECX, _F_SIZE)
    _int80(a, SYS_MUNMAP32)
    _mov_frame(a, R.EBX, _F_ADDR)  # mmap2(address, size, rw, MAP_SHARED | MAP_FIXED, fd, 0)
    _mov_frame(a, R.ECX, _F_SIZE)
    _mmap2(a, _MAP_SHARED | _MAP_FIXED, _F_FD)
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_TMP), R.EAX))
    _mov_frame(a, R.EBX, _F_FD)
    _int80(a, SYS_CLOSE32)
    _mov_frame(a, R.EAX, _F_TMP)
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EAX, _at(R.ESP, _F_ADDR)))
    a.branch(Code.JE_REL32_32, "next")
    a.branch(Code.JMP_REL32_32, "anon")
    a.label("close_anon")
    _mov_frame(a, R.EBX, _F_FD)
    _int80(a, SYS_CLOSE32)


def _wait_ack32(a: _Asm, words: int, wait_cycles: int) -> None:
    """--follow, in the child, its data parts replaced: wait until the tracer writes FORK_ACK in
    this area's copy (10 ms futex waits; at most ``wait_cycles`` TSC cycles)."""
    R, add = Register, a.add
    # FORK_FOLLOW as this area's copy has it: 0 where the copy failed (fresh private memory,
    # which the tracer cannot see: no wait), as on x86-64
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(words + FORK_FOLLOW), 0))
    a.branch(Code.JE_REL32_32, "acked")
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, wait_cycles & 0xFFFFFFFF))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM32, R.EDX, wait_cycles >> 32))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_DEADLINE), R.EAX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_DEADLINE + 4), R.EDX))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.ESP, _F_TS), 0))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.ESP, _F_TS + 4), _POLL_NS))
    a.label("ack_wait")
    add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _abs(words + FORK_ACK), 0))
    a.branch(Code.JNE_REL32_32, "acked")
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EDX, _at(R.ESP, _F_DEADLINE + 4)))
    a.branch(Code.JA_REL32_32, "acked")
    a.branch(Code.JB_REL32_32, "in_time")
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EAX, _at(R.ESP, _F_DEADLINE)))
    a.branch(Code.JAE_REL32_32, "acked")
    a.label("in_time")
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, words + FORK_ACK))  # futex(ACK, WAIT, 0, {0, 10 ms})
    add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _FUTEX_WAIT))
    add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESI, _at(R.ESP, _F_TS)))
    _int80(a, SYS_FUTEX32)
    a.branch(Code.JMP_REL32_32, "ack_wait")
    a.label("acked")


def fork_action32(counter: int, table: int, words: int | None = None, request: int = 0,
                  wait_cycles: int = 0) -> list[Instruction]:
    """The hook's action in 32-bit code: count in the parent; in the child (``eax == 0``) map
    fresh private memory over each data part of the table at ``table``, last entry first. With
    ``words`` (the area's data part) the child checks ``FORK_FOLLOW`` there: if set, it tells
    the tracer (``FORK_PIDS``, a wake on ``request``), gives itself memfd data parts instead and
    waits for ``FORK_ACK``, at most ``wait_cycles`` TSC cycles."""
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
    add(Instruction.create_reg_i32(Code.SUB_RM32_IMM32, R.ESP, _FRAME))
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _abs(table)))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_INDEX), R.EAX))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.ESP, _F_FOLLOW), 0))
    if words is not None:
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _abs(words + FORK_FOLLOW)))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_FOLLOW), R.EAX))
        add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
        a.branch(Code.JE_REL32_32, "next")
        _notify32(a, words, request)
    a.label("next")
    add(Instruction.create_mem(Code.DEC_RM32, _at(R.ESP, _F_INDEX)))
    a.branch(Code.JS_REL32_32, "mapped")
    _mov_frame(a, R.EAX, _F_INDEX)
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, 4))
    entries = table + (FORK_TABLE_ENTRIES - FORK_TABLE)
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBX, _abs(entries, R.EAX)))  # address
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, _abs(entries + 8, R.EAX)))  # size
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_ADDR), R.EBX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.ESP, _F_SIZE), R.ECX))
    if words is not None:
        add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _at(R.ESP, _F_FOLLOW), 0))
        a.branch(Code.JE_REL32_32, "anon")
        _memfd_copy32(a, words + FORK_NAME)
    a.label("anon")
    _mov_frame(a, R.EBX, _F_ADDR)
    _mov_frame(a, R.ECX, _F_SIZE)
    _mmap2(a, _MAP_PRIVATE_ANONYMOUS_FIXED, None)
    a.branch(Code.JMP_REL32_32, "next")
    a.label("mapped")
    if words is not None:
        _wait_ack32(a, words, wait_cycles)
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESP, _at(R.ESP, _FRAME)))
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
