"""Children count apart: the fork hook.

A child made by ``fork`` inherits its parent's jumps, stubs and probe areas; the data part of an
area is a ``MAP_SHARED`` file mapping, so without this a child's hits would add to its parent's
counters (and its record stubs would write into the parent's rings). The fork hook is a jump
probe of its own kind right after the ``clone`` system call of libc's ``_Fork`` (what ``fork``
calls in glibc 2.34 and later), where ``rax`` is the call's result. In the parent it only counts.
In the child (``rax == 0``, one thread, nothing of the program run yet) it replaces the data part
of every probe area with fresh private anonymous memory at the same address (``mmap`` with
``MAP_FIXED``): the stubs stay as they are and the child's hits go into memory of its own that
nobody reads, its loader hook is disarmed (the armed word is 0 there) and its lossless record
stubs never wait (no heartbeat). No tracer is involved, so this holds even after the tracer died.

Each area's header page holds the table of every area's data part (``area.FORK_TABLE``), its
own first; the child walks it from the last entry to the first, so its own area, whose table it
is reading, is replaced last. A new area is added to every table while the world is stopped,
before any jump leads into it (``ProbedProcess.region_hooks``).

In a 32-bit process the hook is i386 code (:mod:`djprobe.forks32`: after ``call gs:[0x10]`` of
``clone``), ``--follow`` included.

Not covered: ``vfork`` and ``posix_spawn`` children share the parent's memory until they
``exec`` (what they run before, through probed functions, is counted as the parent's), and a raw
``clone`` without ``CLONE_VM`` that does not go through ``_Fork``.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from iced_x86 import Code, Decoder, Instruction, MemoryOperand, Mnemonic, OpKind, Register

from .area import (
    LOADER_REQUEST, FORK_ACK, FORK_FOLLOW, FORK_NAME, FORK_PIDS, FORK_PIDS_MAX, FORK_SEQ, FORK_TABLE, FORK_TABLE_ENTRIES, FORK_TABLE_MAX,
)  # fmt: skip
from .arch import I386, X86_64
from .errors import DjprobeError, SymbolNotFoundError
from .forks32 import find_clone_return32, fork_action32
from .probes import Djprobe
from .stubs import RED_ZONE, Stub, _Asm, _finish, _rdtsc
from .stubs32 import finish32

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .regions import Region
    from .sites import SiteAnalysis

log = logging.getLogger(__name__)

SYS_MMAP, SYS_CLONE, SYS_GETPID, SYS_FUTEX = 9, 56, 39, 202
SYS_MUNMAP, SYS_CLOSE, SYS_FTRUNCATE, SYS_MEMFD_CREATE = 11, 3, 77, 319
MAP_SHARED, MAP_FIXED = 0x01, 0x10
FOLLOW_WAIT = 2.0  # seconds a child waits at most for the tracer to take it in (--follow)
COUNTERS_OFFSET_FIELD = 80  # of the area header (area._HEADER): where the instance table ends
CLONE_VM = 0x100
PROT_READ_WRITE = 3
MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10


def _rip(address: int) -> MemoryOperand:
    return MemoryOperand(Register.RIP, displ=address)


def _syscall(a: _Asm, nr: int) -> None:
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, nr))
    a.add(Instruction.create(Code.SYSCALL))


def _follow_notify(a: _Asm, words: int, request: int) -> None:
    """--follow, in the child, before its data parts are replaced: publish its PID in the
    parent's area and wake the tracer (clobbers rax, rcx, rdx, rsi, rdi, r11, r8)."""
    R = Register
    _syscall(a, SYS_GETPID)
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R8D, R.EAX))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _rip(words + FORK_SEQ), R.ECX)
    xadd.has_lock_prefix = True
    a.add(xadd)
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, FORK_PIDS_MAX - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDX, _rip(words + FORK_PIDS)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, MemoryOperand(R.RDX, R.RCX, 4, 0, 0), R.R8D))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(request)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, 1))  # FUTEX_WAKE
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    _syscall(a, SYS_FUTEX)


def _memfd_copy(a: _Asm, name: int) -> None:
    """--follow, in the child: the data part at rdi (rsi bytes) becomes a memfd file of its own
    (header and instance table copied, counters zero) mapped MAP_SHARED at the same place, so
    that the tracer can map it too. Falls through to "anon" (fresh private memory, as without
    --follow) if a call fails. Uses rbx (fd), r14 (address), r15 (size)."""
    R = Register
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R14, R.RDI))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R15, R.RSI))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(name)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, 1))  # MFD_CLOEXEC
    _syscall(a, SYS_MEMFD_CREATE)
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JS_REL32_64, "anon_restore")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBX, R.RAX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.RBX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R15))
    _syscall(a, SYS_FTRUNCATE)
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JNE_REL32_64, "close_anon")
    # tmp = mmap(0, size, rw, MAP_SHARED, fd, 0)
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDI, R.EDI))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R15))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PROT_READ_WRITE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.R10D, MAP_SHARED))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RBX))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D))
    _syscall(a, SYS_MMAP)
    a.add(Instruction.create_reg_i32(Code.CMP_RM64_IMM32, R.RAX, -4096))
    a.branch(Code.JA_REL32_64, "close_anon")
    # copy the header page and the instance table (up to the header's counters_offset)
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.RAX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.RAX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R14))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, MemoryOperand(R.R14, R.NONE, 1, COUNTERS_OFFSET_FIELD, 1)))
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R15))
    a.branch(Code.JBE_REL32_64, "copy")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.R15))
    a.label("copy")
    a.add(Instruction.create(Code.CLD))
    a.add(Instruction.create_rep_movsb(64))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.RDX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R15))
    _syscall(a, SYS_MUNMAP)
    # mmap(address, size, rw, MAP_SHARED | MAP_FIXED, fd, 0): replaces the parent's data part
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.R14))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R15))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PROT_READ_WRITE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.R10D, MAP_SHARED | MAP_FIXED))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RBX))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D))
    _syscall(a, SYS_MMAP)
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R12, R.RAX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.RBX))
    _syscall(a, SYS_CLOSE)
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.R12, R.R14))
    a.branch(Code.JE_REL32_64, "entry_done")
    a.branch(Code.JMP_REL32_64, "anon_restore")
    a.label("close_anon")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.RBX))
    _syscall(a, SYS_CLOSE)
    a.label("anon_restore")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.R14))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R15))


def _follow_wait(a: _Asm, words: int, wait_cycles: int) -> None:
    """--follow, in the child, its data parts replaced: wait until the tracer writes FORK_ACK in
    this area's copy (futex waits of 10 ms; at most ``wait_cycles`` TSC cycles)."""
    R = Register
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _rip(words + FORK_FOLLOW)))
    a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.branch(Code.JE_REL32_64, "done")
    _rdtsc(a)
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R12, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R12, R.RAX))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM32, 10_000_000))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM8, 0))
    a.label("ack_wait")
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _rip(words + FORK_ACK)))
    a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
    a.branch(Code.JNE_REL32_64, "acked")
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.R12))
    a.branch(Code.JAE_REL32_64, "acked")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(words + FORK_ACK)))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ESI, R.ESI))  # FUTEX_WAIT
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R10, R.RSP))
    _syscall(a, SYS_FUTEX)
    a.branch(Code.JMP_REL32_64, "ack_wait")
    a.label("acked")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, 16, 1)))


def fork_action(counter: int, table: int, words: int | None = None, request: int = 0, wait_cycles: int = 0) -> list[Instruction]:
    """The hook's action: count in the parent; in the child (rax == 0) map fresh private memory
    over each data part of the table at ``table``, last entry first. Saves what it clobbers
    (a mid-function site: the red zone is stepped over, the flags kept). With ``words`` (the
    area's data part) the child checks FORK_FOLLOW there: if set, it tells the tracer (FORK_PIDS,
    a wake on ``request``), gives itself memfd data parts instead and waits for FORK_ACK."""
    R = Register
    a = _Asm()
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, -RED_ZONE, 1)))
    a.add(Instruction.create(Code.PUSHFQ))
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11, R.RBX, R.R12, R.R13, R.R14, R.R15, R.RBP)
    for reg in saved:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JE_REL32_64, "child")
    inc = Instruction.create_mem(Code.INC_RM64, _rip(counter))
    inc.has_lock_prefix = True
    a.add(inc)
    a.branch(Code.JMP_REL32_64, "done")
    a.label("child")
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EBP, R.EBP))  # ebp: following
    if words is not None:
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EBP, _rip(words + FORK_FOLLOW)))
        a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EBP, R.EBP))
        a.branch(Code.JE_REL32_64, "table")
        _follow_notify(a, words, request)
    a.label("table")
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.R13D, _rip(table)))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RBX, _rip(table + (FORK_TABLE_ENTRIES - FORK_TABLE))))
    a.label("next")
    a.add(Instruction.create_reg(Code.DEC_RM32, R.R13D))
    a.branch(Code.JS_REL32_64, "mapped")
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R12D, R.R13D))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.R12, 4))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDI, MemoryOperand(R.RBX, R.R12, 1, 0, 0)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RSI, MemoryOperand(R.RBX, R.R12, 1, 8, 1)))
    if words is not None:
        a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EBP, R.EBP))
        a.branch(Code.JE_REL32_64, "anon")
        a.add(Instruction.create_reg(Code.PUSH_R64, R.RBX))
        _memfd_copy(a, words + FORK_NAME)
        a.add(Instruction.create_reg(Code.POP_R64, R.RBX))
        a.branch(Code.JMP_REL32_64, "anon")
        a.label("entry_done")
        a.add(Instruction.create_reg(Code.POP_R64, R.RBX))
        a.branch(Code.JMP_REL32_64, "next")
    a.label("anon")
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PROT_READ_WRITE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.R10D, MAP_PRIVATE_ANONYMOUS_FIXED))
    a.add(Instruction.create_reg_i32(Code.MOV_RM64_IMM32, R.R8, -1))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_MMAP))
    a.add(Instruction.create(Code.SYSCALL))
    a.branch(Code.JMP_REL32_64, "next")
    a.label("mapped")
    if words is not None:
        _follow_wait(a, words, wait_cycles)
    a.label("done")
    for reg in reversed(saved):
        a.add(Instruction.create_reg(Code.POP_R64, reg))
    a.add(Instruction.create(Code.POPFQ))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, RED_ZONE, 1)))
    return a.instructions()


class ForkHook(Djprobe):
    """The jump probe after ``_Fork``'s ``clone`` (see the module docstring)."""

    #: the modes whose processes this custom stub is written for (32-bit: :mod:`djprobe.forks32`)
    stub_arches = frozenset({X86_64, I386})

    def build_stub(self, target: "ProbedProcess", analysis: "SiteAnalysis", region: "Region", slot: int) -> Stub:
        counter = region.counter_address(slot) + region.layout.locked_shard_base * region.layout.shard_stride
        wait_cycles = int(FOLLOW_WAIT * 1e9 / target.clock.ns_per_tick)
        data = region.data_address
        args = (counter, data + FORK_TABLE, data, data + LOADER_REQUEST, wait_cycles)
        if getattr(target.process, "arch", X86_64) is I386:  # 32-bit code: djprobe.forks32
            return finish32(analysis, region.layout, region.slot_address(slot), fork_action32(*args))
        return _finish(analysis, region.layout, region.slot_address(slot), fork_action(*args))


def find_fork_site(target: "ProbedProcess") -> int:
    """The instruction after the ``clone`` system call in libc's ``_Fork``.

    Raises SymbolNotFoundError when there is no ``_Fork`` (glibc before 2.34, a static program)
    or no ``mov eax, 56; ... syscall`` in it."""
    for module in target.symbols.modules:
        funcs = [s for s in module.symbols("_Fork") if s.size]
        if not funcs:
            continue
        func = funcs[0]
        code = target.process.read(func.address, func.size)
        if module.arch is I386:
            site, why = find_clone_return32(code, func.address)
            if site is None:
                raise SymbolNotFoundError(f"{module.name}:_Fork: {why}")
            return site
        known: dict[int, int | None] = {}  # eax / edi: the system call number, clone's flags
        for insn in Decoder(64, code, ip=func.address):
            if insn.mnemonic == Mnemonic.MOV and insn.op0_kind == OpKind.REGISTER:
                for regs in ((Register.EAX, Register.RAX), (Register.EDI, Register.RDI)):
                    if insn.op0_register in regs:
                        immediate = insn.op1_kind in (OpKind.IMMEDIATE32, OpKind.IMMEDIATE32TO64)
                        known[regs[0]] = insn.immediate(1) if immediate else None
            if insn.mnemonic == Mnemonic.SYSCALL and known.get(Register.EAX) == SYS_CLONE:
                flags = known.get(Register.EDI)
                if flags is None or flags & CLONE_VM:
                    break  # a child sharing the parent's memory must not replace anything
                return insn.next_ip
        raise SymbolNotFoundError(f"no clone system call without CLONE_VM found in {module.name}:_Fork")
    raise SymbolNotFoundError("no _Fork in the process (glibc 2.34 or later is needed)")


class ForkGuard:
    """Keeps a process's children from counting into its figures (see the module docstring)."""

    def __init__(self, target: "ProbedProcess") -> None:
        self.target = target
        self.hook: ForkHook | None = None

    def install(self) -> None:
        """Place the fork hook and keep every area's table. Raises SymbolNotFoundError without
        ``_Fork``, or what registering a probe raises."""
        site = find_fork_site(self.target)
        self.target.region_hooks.append(self._tables_with)
        for region in self.target._regions:
            self._write_table(region)
        hook = ForkHook(site, trap=False)  # its own stub or nothing
        self.target.register(hook)
        self.hook = hook

    @property
    def forks(self) -> int:
        """How many times the parent returned from ``_Fork``'s clone since the hook went in."""
        return self.hook.hits if self.hook is not None else 0

    def _tables_with(self, new: "Region") -> None:
        for region in self.target._regions:
            self._write_table(region)

    def _write_table(self, region: "Region") -> None:
        others = [r for r in self.target._regions if r is not region and r.mapped_in_target]
        entries = [region] + others[: FORK_TABLE_MAX - 1]
        buf = region.view.buffer
        for i, r in enumerate(entries):  # entries first, the count last: a child reads the count first
            at = FORK_TABLE_ENTRIES + 16 * i
            buf[at : at + 16] = struct.pack("<QQ", r.data_address, r.layout.data_size)
        buf[FORK_TABLE : FORK_TABLE + 4] = struct.pack("<I", len(entries))
        buf[FORK_NAME : FORK_NAME + 8] = b"djprobe\0"

    def close(self) -> None:
        """Remove the hook (children forked from now on keep counting apart only if they were
        forked before: afterwards there are no probes to count)."""
        if self._tables_with in self.target.region_hooks:
            self.target.region_hooks.remove(self._tables_with)
        if self.hook is not None and self.hook.registered:
            try:
                self.target.unregister(self.hook)
            except DjprobeError as exc:
                log.info("removing the fork hook: %s", exc)
