"""Trampoline (stub) emission.

A stub is: the action, then the relocated displaced instructions, then a jump back to the
instruction after them (the relocator appends it). The action saves exactly what it clobbers:

* **record** (events and handlers): steps over the red zone, saves every general-purpose
  register and the arithmetic flags (``lahf``/``seto``) as a pt_regs-like frame on the stack, counts the hit, reserves a slot
  in one of the instance's area's event rings (a ``cmpxchg`` on the ring head, refused when the
  ring is full: the drop is counted), writes the record (instance, thread pointer ``fs:[0]`` and the TID read
  from the thread control block, TSC, registers) and commits it by writing its sequence number last.

* **count**: two scratch registers (stored in the red zone, or just below it at a mid-function
  site after stepping ``rsp`` over it with ``lea``, which leaves the flags alone) and, only where the
  arithmetic flags are live, the flags (``lahf``/``seto``, restored with ``add al,0x7f``/``sahf``:
  about 1 ns, where ``pushf``/``popf`` cost about 8 ns on this kind of machine). It adds one to
  the instance's counter with ``lock inc``, in a shard chosen from the stack pointer so that
  threads on different CPUs rarely write the same cache line.

The stub of a return probe's exit window (``site.exit`` set, see ``sites/exits.py``) is laid out
differently: the relocated instructions before the exit, then the action, then the relocated exit
instruction (a ``ret`` runs from the stub and returns to the caller; a tail-call ``jmp`` goes to its
absolute target), so the action sees ``rax`` = the return value and ``rsp`` at the return address.
The red zone and the arithmetic flags are dead there (the SysV ABI preserves neither across a
return or a call). Its action starts at ``action_start`` (after the relocated prefix), and its
address map sends the exit instruction to the action's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import struct

from iced_x86 import BlockEncoder, Code, Decoder, Encoder, Instruction, MemoryOperand, Register

from .area import ARG_REGISTERS, ARGS_RECORD_SIZE, RECORD_SIZE, REGISTER_NAMES, RING_HEARTBEAT, RING_TAIL, RING_WAITED, AreaLayout
from .rseq import CPU_ID, RSEQ_CS, RSEQ_SIG

if TYPE_CHECKING:
    from .x86.relocate import Relocated

RED_ZONE = 128
JMP_REL32_SIZE = 5
RSEQ_CS_SIZE = 32  # struct rseq_cs, at the end of a per-CPU count stub's slot


class Relocatable(Protocol):
    """What the stub builder needs from a site analysis."""

    address: int
    size: int
    at_entry: bool
    flags_dead: bool

    def relocate_to(self, stub_address: int, return_to: int | None = None) -> Relocated: ...


def assemble(instructions: Sequence[Instruction], address: int, bits: int = 64) -> bytes:
    """Encode ``instructions`` to run at ``address`` (RIP-relative operands hold absolute targets;
    ``bits`` 32: i386 code)."""
    encoder = BlockEncoder(bits)
    encoder.add_many(list(instructions))
    return bytes(encoder.encode(address))


def _mem(base: Register, displ: int = 0, index: Register = Register.NONE, scale: int = 1) -> MemoryOperand:
    return MemoryOperand(base, index, scale, displ, 1 if displ else 0)


def _rsp_slot(offset: int) -> MemoryOperand:
    return MemoryOperand(Register.RSP, Register.NONE, 1, offset, 1)


@dataclass(frozen=True)
class PerCpu:
    """Where a count stub finds glibc's rseq area (``fs:[rseq_offset]``) and where its rseq
    critical-section descriptor lives (32 bytes at the end of its slot)."""

    rseq_offset: int
    descriptor: int


def _fs(offset: int) -> MemoryOperand:
    return MemoryOperand(Register.NONE, Register.NONE, 1, offset, 4, False, Register.FS)


def count_action(
    layout: AreaLayout,
    counter_address: int,
    *,
    red_zone_live: bool,
    flags_live: bool,
    per_cpu: PerCpu | None = None,
) -> _Asm:
    """Instructions that add one to the counter of an instance (shard 0 at ``counter_address``).

    With ``per_cpu``: a plain ``inc`` of the current CPU's shard inside an rseq critical section
    (armed in ``rseq_cs``, restarted by the kernel at the abort handler on preemption, migration
    or a signal); the ``lock inc`` of an rsp-chosen locked shard where the thread has no rseq
    registration (``cpu_id`` < 0), the CPU number has no shard of its own, or the program has a
    critical section of its own armed (its ``rseq_cs`` is left untouched)."""
    a = _Asm()
    R = Register
    if red_zone_live:
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(-RED_ZONE)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-8), R.RAX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-16), R.RCX))
    if flags_live:
        a.add(Instruction.create(Code.LAHF))
        a.add(Instruction.create_reg(Code.SETO_RM8, R.AL))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-24), R.RAX))
    stride_shift = layout.shard_stride.bit_length() - 1
    counter = MemoryOperand(R.RIP, displ=counter_address)
    if per_cpu is not None:
        rseq_cs = _fs(per_cpu.rseq_offset + RSEQ_CS)
        a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, rseq_cs, 0))
        a.branch(Code.JNE_REL32_64, "locked")  # the program's own critical section is armed
        a.label("arm")
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, MemoryOperand(R.RIP, displ=per_cpu.descriptor)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, rseq_cs, R.RAX))
        a.label("cs_start")
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _fs(per_cpu.rseq_offset + CPU_ID)))
        a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, layout.cpu_shards))
        a.branch(Code.JAE_REL32_64, "disarm")  # cpu_id < 0 (no registration) or no shard of its own
        a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, counter))
        a.add(Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1)))  # the commit
        a.label("cs_end")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
        a.branch(Code.JMP_REL32_64, "done")
        # The signature before the abort handler, as the never-executed ud1 edi,[rip+RSEQ_SIG].
        a.add(Instruction.create_declare_byte(b"\x0f\xb9\x3d" + RSEQ_SIG.to_bytes(4, "little")))
        a.label("abort")  # the kernel cleared rseq_cs: arm again and retry
        a.branch(Code.JMP_REL32_64, "arm")
        a.label("disarm")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
        a.label("locked")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RSP))
    a.add(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, R.RAX, layout.shard_shift))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base))
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, counter))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1))
    inc.has_lock_prefix = True
    a.add(inc)
    a.label("done")
    if flags_live:
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(-24)))
        a.add(Instruction.create_reg_u32(Code.ADD_RM8_IMM8, R.AL, 0x7F))
        a.add(Instruction.create(Code.SAHF))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(-16)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(-8)))
    if red_zone_live:
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(RED_ZONE)))
    return a


def rseq_descriptor(start: int, post_commit: int, abort: int) -> bytes:
    """``struct rseq_cs`` (version 0, no flags) of the critical section [start, post_commit)."""
    return struct.pack("<IIQQQ", 0, 0, start, post_commit - start, abort)


@dataclass(frozen=True)
class Stub:
    """A stub ready to be written at ``address``."""

    address: int
    code: bytes
    action_size: int  # bytes of the action
    relocated: Relocated
    action_start: int | None = None  # where the action begins (None: at ``address``, before the relocated code)
    extra_action_ranges: tuple[tuple[int, int], ...] = ()  # the other actions of a shared stub

    @property
    def action_range(self) -> tuple[int, int]:
        """[start, end) of the (first) action: a thread there has not finished the probe's work."""
        start = self.address if self.action_start is None else self.action_start
        return start, start + self.action_size

    @property
    def action_ranges(self) -> tuple[tuple[int, int], ...]:
        """[start, end) of every action of the stub (several in a shared stub)."""
        return (self.action_range, *self.extra_action_ranges)

    def in_action(self, address: int) -> bool:
        """Whether ``address`` lies inside one of the stub's actions."""
        return any(start <= address < end for start, end in self.action_ranges)

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    def original_address(self, stub_address: int) -> int | None:
        """The original address equivalent to ``stub_address`` inside the relocated copy, if any."""
        for orig, new in self.relocated.address_map.items():
            if new == stub_address:
                return orig
        return None


def build_count_stub(
    site: Relocatable,
    layout: AreaLayout,
    slot_address: int,
    counter_address: int,
    rseq_offset: int | None = None,
) -> Stub:
    """Build the count stub for ``site`` in the stub slot at ``slot_address``; per-CPU counting
    through glibc's rseq area at ``fs:[rseq_offset]`` when given (see :func:`count_action`).

    Raises RelocationError (from the relocator) if the displaced instructions cannot reach their
    targets from this slot, and ValueError if the stub does not fit in a slot.
    """
    at_exit = getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False)
    # Exit windows (their action sits after a relocated prefix) count with lock inc.
    descriptor = slot_address + layout.slot_size - RSEQ_CS_SIZE
    per_cpu = None if rseq_offset is None or at_exit else PerCpu(rseq_offset, descriptor)
    a = count_action(
        layout,
        counter_address,
        red_zone_live=not (site.at_entry or at_exit),
        flags_live=not (site.flags_dead or at_exit),  # dead at an entry unless its first instruction reads them
        per_cpu=per_cpu,
    )
    if per_cpu is None:
        return _finish(site, layout, slot_address, a.instructions())
    stub = _finish(site, layout, slot_address, a.instructions(), reserve=RSEQ_CS_SIZE)
    ips = [insn.ip for insn in Decoder(64, stub.code[: stub.action_size], ip=slot_address)]
    start, end, abort = (ips[a.index_of(name)] for name in ("cs_start", "cs_end", "abort"))
    padding = b"\xcc" * (layout.slot_size - RSEQ_CS_SIZE - len(stub.code))
    code = stub.code + padding + rseq_descriptor(start, end, abort)
    return Stub(address=slot_address, code=code, action_size=stub.action_size, relocated=stub.relocated)


def jump_bytes(site: int, target: int) -> bytes:
    """The 5-byte ``jmp rel32`` from ``site`` to ``target``; ValueError if out of reach."""
    rel = target - (site + JMP_REL32_SIZE)
    if not -(1 << 31) <= rel < (1 << 31):
        raise ValueError(f"stub at {target:#x} is out of rel32 reach of {site:#x}")
    return b"\xe9" + rel.to_bytes(4, "little", signed=True)


def jump_target(code: bytes, site: int) -> int | None:
    """If ``code`` starts with a ``jmp rel32``, the address it jumps to from ``site``."""
    if len(code) >= JMP_REL32_SIZE and code[0] == 0xE9:
        return site + JMP_REL32_SIZE + int.from_bytes(code[1:5], "little", signed=True)
    return None


_PUSH_ORDER = (
    Register.RAX, Register.RCX, Register.RDX, Register.RBX, Register.RBP, Register.RSI, Register.RDI,
    Register.R8, Register.R9, Register.R10, Register.R11, Register.R12, Register.R13, Register.R14, Register.R15,
)  # fmt: skip
# After the pushes, the frame at rsp holds REGISTER_NAMES[0..14] (r15 first), then the flags slot.
_FRAME_SIZE = 8 * (len(_PUSH_ORDER) + 1)
_FLAGS_SLOT = 8 * len(_PUSH_ORDER)


@dataclass(frozen=True)
class RecordTargets:
    """Target addresses a record stub writes to."""

    counter: int  # shard 0 of the instance's hit counter
    drops: int  # the instance's dropped-events counter
    ring_headers: int  # ring 0's header
    records: int  # ring 0's first record
    args_ring_headers: int  # header of ring 0 of argument-only records (registers="args")
    args_records: int  # its first record
    instance: int  # index written into each record
    tid_offset: int | None = None  # where the thread control block (fs:0) holds the TID, if known
    wait_cycles: int = 0  # lossless: wait up to this many TSC cycles for room (0: drop at once)


class _Asm:
    """A tiny assembler over iced: instructions with labels, encoded by BlockEncoder."""

    def __init__(self) -> None:
        self.ins: list[Instruction] = []
        self._labels: dict[str, int] = {}
        self._fixups: list[tuple[Instruction, str]] = []

    def add(self, instruction: Instruction) -> None:
        instruction.ip = 0x1000 + len(self.ins)  # unique fake ip: branch targets refer to it
        self.ins.append(instruction)

    def label(self, name: str) -> None:
        self._labels[name] = 0x1000 + len(self.ins)

    def branch(self, code: Code, label: str) -> None:
        instruction = Instruction.create_branch(code, 0)
        self._fixups.append((instruction, label))
        self.add(instruction)

    def index_of(self, label: str) -> int:
        """Index of the instruction a label stands before."""
        return self._labels[label] - 0x1000

    def instructions(self) -> list[Instruction]:
        for instruction, label in self._fixups:
            instruction.near_branch64 = self._labels[label]
        return self.ins


def record_action(layout: AreaLayout, where: RecordTargets, registers: str = "all") -> list[Instruction]:
    """Instructions that count the hit and write an event record (see the module docstring)."""
    a = _Asm()
    R = Register
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(-RED_ZONE - 8)))  # + the flags slot
    for reg in _PUSH_ORDER:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    # The arithmetic flags, with lahf/seto (pushfq/popfq cost ~8 ns more here): raw AH:AL in the
    # flags slot; the record gets them as an rflags image.
    a.add(Instruction.create(Code.LAHF))
    a.add(Instruction.create_reg(Code.SETO_RM8, R.AL))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_FLAGS_SLOT), R.RAX))
    # Count the hit (flags are saved: free to clobber).
    stride_shift = layout.shard_stride.bit_length() - 1
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RSP))
    a.add(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, R.RAX, layout.shard_shift))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBX, R.RAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, MemoryOperand(R.RIP, displ=where.counter)))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1))
    inc.has_lock_prefix = True
    a.add(inc)
    # Ring = shard % ring_count: rsi = its header, rdi = its records. Argument-only records
    # (two cache lines) have rings of their own.
    args_only = registers != "all"
    headers, records = (where.args_ring_headers, where.args_records) if args_only else (where.ring_headers, where.records)
    stride = layout.args_ring_stride if args_only else layout.ring_stride
    record_size = ARGS_RECORD_SIZE if args_only else RECORD_SIZE
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EBX, layout.ring_count - 1))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RBX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, 7))  # RING_HEADER_SIZE == 128
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSI, MemoryOperand(R.RIP, displ=headers)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RSI, R.RAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RBX, stride.bit_length() - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, MemoryOperand(R.RIP, displ=records)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RBX))
    # Reserve: while head - tail < slots: cmpxchg head -> head + 1.
    a.label("retry")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI)))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RCX, _mem(R.RSI, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RCX, layout.ring_slots))
    a.branch(Code.JAE_REL32_64, "full")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.RAX, 1)))
    cas = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.RSI), R.RCX)
    cas.has_lock_prefix = True
    a.add(cas)
    a.branch(Code.JNE_REL32_64, "retry")
    # rbp = pos; rdi = the record.
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RBP, R.RAX))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.ring_slots - 1))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, record_size.bit_length() - 1))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RAX))
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _mem(R.RDI, 8), where.instance))
    fs0 = MemoryOperand(R.NONE, R.NONE, 1, 0, 8, False, R.FS)
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, fs0))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 16), R.RCX))
    if where.tid_offset is not None:
        tid = MemoryOperand(R.NONE, R.NONE, 1, where.tid_offset, 8, False, R.FS)
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, tid))
        a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _mem(R.RDI, 12), R.ECX))
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RDX, 32))
    a.add(Instruction.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 24), R.RAX))
    if args_only:  # the six argument registers in ARG_REGISTERS order, then rax (a return value)
        for j, name in enumerate(ARG_REGISTERS + ("rax",)):
            i = REGISTER_NAMES.index(name)
            a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(8 * i)))
            a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 32 + 8 * j), R.RCX))
    else:
        for i, name in enumerate(REGISTER_NAMES[:15]):
            a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(8 * i)))
            a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 32 + 8 * i), R.RCX))
    if registers == "all":
        # rflags image = AH (CF PF AF ZF SF) | OF << 11 | IF | bit 1
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(_FLAGS_SLOT)))
        a.add(Instruction.create_reg_reg(Code.MOVZX_R32_RM8, R.EDX, R.CL))
        a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EDX, 11))
        a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.ECX, 8))
        a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, 0xD5))
        a.add(Instruction.create_reg_reg(Code.OR_R32_RM32, R.ECX, R.EDX))
        a.add(Instruction.create_reg_u32(Code.OR_RM32_IMM32, R.ECX, 0x202))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 32 + 8 * 15), R.RCX))
    if not args_only:  # the stack pointer at the probe
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _rsp_slot(_FRAME_SIZE + RED_ZONE)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, 32 + 8 * 16), R.RCX))
    # Commit: seq = pos + 1, written last.
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.RBP, 1)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI), R.RCX))
    a.branch(Code.JMP_REL32_64, "done")
    a.label("full")
    if where.wait_cycles:
        _wait_for_room(a, layout, where.wait_cycles)
    a.label("drop")
    drop = Instruction.create_mem(Code.INC_RM64, MemoryOperand(R.RIP, displ=where.drops))
    drop.has_lock_prefix = True
    a.add(drop)
    a.label("done")
    for reg in reversed(_PUSH_ORDER[1:]):
        a.add(Instruction.create_reg(Code.POP_R64, reg))
    # rsp now at the saved rax; the flags slot is above it.
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(8)))
    a.add(Instruction.create_reg_u32(Code.ADD_RM8_IMM8, R.AL, 0x7F))
    a.add(Instruction.create(Code.SAHF))
    a.add(Instruction.create_reg(Code.POP_R64, R.RAX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(RED_ZONE + 8)))
    return a.instructions()


def _rdtsc(a: _Asm) -> None:
    """rax = the TSC (rdx clobbered)."""
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RDX, 32))
    a.add(Instruction.create_reg_reg(Code.OR_R64_RM64, Register.RAX, Register.RDX))


def _wait_for_room(a: _Asm, layout: AreaLayout, wait_cycles: int) -> None:
    """The ring at rsi is full: if its consumer drained it within the last ``wait_cycles`` TSC
    cycles, spin (``pause``) until there is room (then reserve again) or until ``wait_cycles``
    have passed (then drop). The cycles waited are added to the ring's RING_WAITED. A stopped or
    dead consumer stops draining: after one timeout, full rings drop at once."""
    R = Register
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RAX))  # when the wait began
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RCX, _mem(R.RSI, RING_HEARTBEAT)))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R9, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R9))
    a.branch(Code.JA_REL32_64, "drop")  # no drain for longer than the timeout: do not wait
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R9, R.R8))  # the deadline
    a.label("wait")
    a.add(Instruction.create(Code.PAUSE))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI)))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.RSI, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
    a.branch(Code.JB_REL32_64, "room")
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.R9))
    a.branch(Code.JB_REL32_64, "wait")
    a.add(Instruction.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.R8))
    added = Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem(R.RSI, RING_WAITED), R.RAX)
    added.has_lock_prefix = True
    a.add(added)
    a.branch(Code.JMP_REL32_64, "drop")  # timed out
    a.label("room")
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.R8))
    added = Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem(R.RSI, RING_WAITED), R.RAX)
    added.has_lock_prefix = True
    a.add(added)
    a.branch(Code.JMP_REL32_64, "retry")


def build_record_stub(
    site: Relocatable, layout: AreaLayout, slot_address: int, where: RecordTargets, registers: str = "all"
) -> Stub:
    """Build the record stub for ``site`` at ``slot_address`` (see :func:`build_count_stub`).
    At an exit window, ``registers="args"`` records ``rax`` (the return value) too."""
    if registers == "args" and getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False):
        registers = "args+rax"
    return _finish(site, layout, slot_address, record_action(layout, where, registers))


def _finish(site: Relocatable, layout: AreaLayout, slot_address: int, action: list[Instruction], reserve: int = 0) -> Stub:
    if getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False):
        return _finish_exit(site, layout, slot_address, action)
    action_code = assemble(action, slot_address)
    relocated = site.relocate_to(slot_address + len(action_code), site.address + site.size)
    code = action_code + relocated.code
    if len(code) > layout.slot_size - reserve:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action_code), relocated=relocated)


def _finish_exit(site: Relocatable, layout: AreaLayout, slot_address: int, action: list[Instruction]) -> Stub:
    """The stub of an exit window: relocated prefix, action, relocated exit instruction."""
    from .x86.relocate import Relocated, RelocationError, relocate

    if getattr(site, "exit_path", ()):
        return _finish_exit_path(site, layout, slot_address, action)
    displaced = list(getattr(site, "displaced"))
    prefix, last = displaced[:-1], displaced[-1]
    if not -(2**31) <= slot_address - (site.address + JMP_REL32_SIZE) < 2**31:
        raise RelocationError(
            f"stub at {slot_address:#x} is beyond the +-2 GiB reach of a jmp rel32 at {site.address:#x}",
            address=site.address,
            out_of_reach=True,
        )
    pre = relocate(prefix, slot_address, None) if prefix else None
    action_at = slot_address + (len(pre.code) if pre is not None else 0)
    action_code = assemble(action, action_at)
    exit_code = relocate([last], action_at + len(action_code), None)
    address_map = dict(pre.address_map) if pre is not None else {}
    address_map[last.address] = action_at  # a thread at the exit runs the action first
    code = (pre.code if pre is not None else b"") + action_code + exit_code.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    relocated = Relocated(code, slot_address, address_map, None)
    return Stub(address=slot_address, code=code, action_size=len(action_code), relocated=relocated, action_start=action_at)


def _finish_exit_path(site: Relocatable, layout: AreaLayout, slot_address: int, action: list[Instruction]) -> Stub:
    """The stub of a path window: the relocated window (its branches to the copied block aimed at
    the copy; a fall-through out of it goes back to the original code), then a copy of the block
    (one or two blocks of the original code, from a branch target to the exit), the action and
    the exit instruction."""
    from .x86 import FALLS_THROUGH, Flow
    from .x86.relocate import Relocated, RelocationError, relocate

    window = list(getattr(site, "displaced"))
    path = list(getattr(site, "exit_path"))
    via = getattr(site, "exit_via", None) or path[0].address
    last = path[-1]
    bits = window[0].bits  # 32: an i386 function (djprobe.stubs32); a rel32 then reaches everywhere
    if bits == 64 and not -(2**31) <= slot_address - (site.address + JMP_REL32_SIZE) < 2**31:
        raise RelocationError(
            f"stub at {slot_address:#x} is beyond the +-2 GiB reach of a jmp rel32 at {site.address:#x}",
            address=site.address,
            out_of_reach=True,
        )

    def exact(instruction: Instruction, at: int) -> bytes:
        encoder = Encoder(bits)  # the form given, never a shorter one: both passes lay out alike
        encoder.encode(instruction, at)
        return bytes(encoder.take_buffer())

    def branch_to(insn, at: int, to: int) -> bytes:
        c = insn.instruction.copy()
        c.as_near_branch()
        if bits == 32:
            c.near_branch32 = to
        else:
            c.near_branch64 = to
        return exact(c, at)

    copies = {insn.address for insn in path} | {via}

    def redirected(insn) -> bool:  # a branch into the copied instructions: aimed at the copy
        return insn.flow in (Flow.JUMP, Flow.COND_JUMP) and insn.target in copies

    def emit(copy: dict[int, int]) -> tuple[bytes, dict[int, int], int]:
        """Lay out window and block with ``copy`` (original -> copy address; a branch to the exit
        goes to the action before it). Returns the code, the address map, the action's address."""
        code = bytearray()
        amap: dict[int, int] = {}
        at = slot_address
        for insn in window:
            amap[insn.address] = at
            piece = branch_to(insn, at, copy.get(insn.target, at)) if redirected(insn) else relocate([insn], at, None).code
            code += piece
            at += len(piece)
        end = window[-1]
        if end.end != via and end.flow in FALLS_THROUGH:
            amap[end.end] = at  # the fall-through of the window's last branch goes back
            piece = exact(Instruction.create_branch(Code.JMP_REL32_64 if bits == 64 else Code.JMP_REL32_32, copy.get(end.end, end.end)), at)
            code += piece
            at += len(piece)
        for insn in path[:-1]:
            amap[insn.address] = at
            piece = branch_to(insn, at, copy.get(insn.target, at)) if redirected(insn) else relocate([insn], at, None).code
            code += piece
            at += len(piece)
        # a thread at the exit runs the action first (the exit alone: the address the window's
        # branches go to, which for a conditional tail call is the called function)
        amap[via if len(path) == 1 else last.address] = at
        return bytes(code), amap, at

    _, first, action_at = emit({})  # sizes do not depend on the targets (rel32 forms)
    copy = {a: first[a] for a in copies if a in first}
    copy[last.address] = copy[via] if len(path) == 1 else action_at
    copy.setdefault(via, first.get(path[0].address, action_at))
    code, address_map, at = emit(copy)
    if at != action_at:
        raise RelocationError(f"stub layout of the path window at {site.address:#x} did not converge",
                              address=site.address)
    action_code = assemble(action, at, bits)
    code += action_code
    code += relocate([last], slot_address + len(code), None).code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    relocated = Relocated(bytes(code), slot_address, address_map, None)
    return Stub(address=slot_address, code=bytes(code), action_size=len(action_code), relocated=relocated, action_start=at)
