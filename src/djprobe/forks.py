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

Not covered: ``vfork`` and ``posix_spawn`` children share the parent's memory until they
``exec`` (what they run before, through probed functions, is counted as the parent's), and a raw
``clone`` without ``CLONE_VM`` that does not go through ``_Fork``.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from iced_x86 import Code, Decoder, Instruction, MemoryOperand, Mnemonic, OpKind, Register

from .area import FORK_TABLE, FORK_TABLE_ENTRIES, FORK_TABLE_MAX
from .errors import DjprobeError, SymbolNotFoundError
from .probes import Djprobe
from .stubs import RED_ZONE, Stub, _Asm, _finish

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .regions import Region
    from .sites import SiteAnalysis

log = logging.getLogger(__name__)

SYS_MMAP, SYS_CLONE = 9, 56
CLONE_VM = 0x100
PROT_READ_WRITE = 3
MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10


def _rip(address: int) -> MemoryOperand:
    return MemoryOperand(Register.RIP, displ=address)


def fork_action(counter: int, table: int) -> list[Instruction]:
    """The hook's action: count in the parent; in the child (rax == 0) map fresh private memory
    over each data part of the table at ``table``, last entry first. Saves what it clobbers
    (a mid-function site: the red zone is stepped over, the flags kept)."""
    R = Register
    a = _Asm()
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, -RED_ZONE, 1)))
    a.add(Instruction.create(Code.PUSHFQ))
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11, R.RBX, R.R12, R.R13)
    for reg in saved:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JE_REL32_64, "child")
    inc = Instruction.create_mem(Code.INC_RM64, _rip(counter))
    inc.has_lock_prefix = True
    a.add(inc)
    a.branch(Code.JMP_REL32_64, "done")
    a.label("child")
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.R13D, _rip(table)))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RBX, _rip(table + (FORK_TABLE_ENTRIES - FORK_TABLE))))
    a.label("next")
    a.add(Instruction.create_reg(Code.DEC_RM32, R.R13D))
    a.branch(Code.JS_REL32_64, "done")
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R12D, R.R13D))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.R12, 4))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDI, MemoryOperand(R.RBX, R.R12, 1, 0, 0)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RSI, MemoryOperand(R.RBX, R.R12, 1, 8, 1)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, PROT_READ_WRITE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.R10D, MAP_PRIVATE_ANONYMOUS_FIXED))
    a.add(Instruction.create_reg_i32(Code.MOV_RM64_IMM32, R.R8, -1))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_MMAP))
    a.add(Instruction.create(Code.SYSCALL))
    a.branch(Code.JMP_REL32_64, "next")
    a.label("done")
    for reg in reversed(saved):
        a.add(Instruction.create_reg(Code.POP_R64, reg))
    a.add(Instruction.create(Code.POPFQ))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, RED_ZONE, 1)))
    return a.instructions()


class ForkHook(Djprobe):
    """The jump probe after ``_Fork``'s ``clone`` (see the module docstring)."""

    def build_stub(self, target: "ProbedProcess", analysis: "SiteAnalysis", region: "Region", slot: int) -> Stub:
        counter = region.counter_address(slot) + region.layout.locked_shard_base * region.layout.shard_stride
        action = fork_action(counter, region.data_address + FORK_TABLE)
        return _finish(analysis, region.layout, region.slot_address(slot), action)


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
        hook = ForkHook(site)
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
