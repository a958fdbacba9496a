"""Trampoline (stub) emission.

A stub is: the action, then the relocated displaced instructions, then a jump back to the
instruction after them (the relocator appends it). The action saves exactly what it clobbers:

* **record** (events and handlers): steps over the red zone, saves five scratch registers and
  the arithmetic flags (``lahf``/``seto``) in a frame on the stack, counts the hit, and writes a
  record (instance, thread pointer ``fs:[0]`` and the TID read from the thread control block,
  TSC, registers) into one of the area's event rings. Per CPU (rseq): reserve, write and commit
  (the head store) in one critical section. Locked: reserve with ``lock cmpxchg`` on the ring
  head (a lossless probe claims the slot first), write, commit by writing the sequence number
  last. A full ring drops the event (counted) or, lossless, waits for room, bounded.

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

from .area import (
    ARG_REGISTERS, ARGS_RECORD_SIZE, RECORD_SIZE, REGISTER_NAMES, RING_HEADER_SIZE, RING_HEARTBEAT, RING_TAIL, RING_WAITED,
    SLOT_CLAIM_FROM_END, AreaLayout,
)
from .rseq import CPU_ID, RSEQ_CS, RSEQ_SIG, VFORK_CPU

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
    skip_to: str | None = None,
) -> _Asm:
    """Instructions that add one to the counter of an instance (shard 0 at ``counter_address``).

    With ``per_cpu``: a plain ``inc`` of the current CPU's shard inside an rseq critical section
    (armed in ``rseq_cs``, restarted by the kernel at the abort handler on preemption, migration
    or a signal); the ``lock inc`` of an rsp-chosen locked shard where the thread has no rseq
    registration (``cpu_id`` < 0), the CPU number has no shard of its own, or the program has a
    critical section of its own armed (its ``rseq_cs`` is left untouched). A ``cpu_id`` of
    :data:`~djprobe.rseq.VFORK_CPU` (a vfork/posix_spawn child before its exec, see
    :mod:`djprobe.vforks`) takes the fallback too, where it ``lock inc``s the instance's apart
    counter instead; then, with ``skip_to``, it jumps to that label of the caller's action without
    restoring ``rax``/``rcx`` (the caller's code there restores them from ``[rsp-8]``/``[rsp-16]``;
    only without a live red zone or live flags)."""
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
        a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, VFORK_CPU))
        a.branch(Code.JNE_REL32_64, "locked")
        apart_inc(a, layout, counter_address)  # a vfork child: counted apart, nothing else
        if skip_to is not None:
            if red_zone_live or flags_live:
                raise ValueError("skip_to needs a dead red zone and dead flags")
            a.branch(Code.JMP_REL32_64, skip_to)
        else:
            a.branch(Code.JMP_REL32_64, "done")
        a.label("locked")
    stack_hash(a, R.RAX, R.EAX, layout.shard_shift)
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


def apart_inc(a: "_Asm", layout: AreaLayout, counter_address: int) -> None:
    """``lock inc`` of the apart counter of the instance whose shard 0 is at ``counter_address``
    (rcx clobbered): the counter's RIP-relative operand is the one the count templates patch."""
    R = Register
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, MemoryOperand(R.RIP, displ=counter_address)))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, layout.apart_offset))
    inc.has_lock_prefix = True
    a.add(inc)


def rseq_descriptor(start: int, post_commit: int, abort: int) -> bytes:
    """``struct rseq_cs`` (version 0, no flags) of the critical section [start, post_commit)."""
    return struct.pack("<IIQQQ", 0, 0, start, post_commit - start, abort)


@dataclass(frozen=True, slots=True)
class Stub:
    """A stub ready to be written at ``address``."""

    address: int
    code: bytes
    action_size: int  # bytes of the action
    relocated: Relocated
    action_start: int | None = None  # where the action begins (None: at ``address``, before the relocated code)
    extra_action_ranges: tuple[tuple[int, int], ...] = ()  # the other actions of a shared stub
    trailer: bytes = b""  # data at the end of the slot (a per-CPU count stub's rseq descriptor)
    slot_size: int = 0  # where the trailer ends (with a trailer)

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
        return self.address + (self.slot_size if self.trailer else len(self.code))

    def image(self) -> bytes:
        """The bytes to write at ``address``: the code, then (int3 padding and) the trailer; built
        on demand so that thousands of stubs do not each keep a padded slot in the tracer."""
        if not self.trailer:
            return self.code
        return self.code + b"\xcc" * (self.slot_size - len(self.trailer) - len(self.code)) + self.trailer

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
    return Stub(address=slot_address, code=stub.code, action_size=stub.action_size, relocated=stub.relocated,
                trailer=rseq_descriptor(start, end, abort), slot_size=layout.slot_size)


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
    rseq_offset: int | None = None  # glibc's rseq area (fs:[rseq_offset]): per-CPU counting and rings


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


# The record action's frame, below the red zone: the registers it uses as scratch (their values
# at the probe are read from here into the record), the raw flags, and the lossless wait's two
# TSC values.
_SCRATCH = (Register.RAX, Register.RCX, Register.RDX, Register.R10, Register.R11)


#: Fibonacci hashing's multiplier (2**32 / the golden ratio): the stack address a locked shard or
#: ring is chosen by is hashed, see :func:`stack_hash`.
STACK_HASH = 0x9E3779B1


def stack_hash(a: "_Asm", reg64: Register, reg32: Register, shift: int) -> None:
    """``reg32`` = a hash of ``rsp >> shift`` in its low 8 bits (take them with a mask). glibc
    gives each thread an 8 MiB stack plus a guard page, so ``rsp >> 21`` differs by 4 between
    threads: masked alone, every thread chose the same one of four locked rings."""
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, reg64, Register.RSP))
    a.add(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, reg64, shift))
    a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, reg32, reg32, STACK_HASH))
    a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, reg32, 24))  # the product's top byte


_SAVED_AT = {Register.RAX: 40, Register.RCX: 32, Register.RDX: 24, Register.R10: 16, Register.R11: 8}
_FLAGS_SLOT = 0
_WAIT_BEGAN = 48
_WAIT_DEADLINE = 56
_TSC_SLOT = 64
_ESCAPED = 72  # locked rings skipped: the ring chosen by rsp (and the next ones) held an own uncommitted slot
_WAIT_TAIL = 80  # the ring's tail when the wait's deadline was last set
_CLAIM_POS = 88  # the ring position whose slot a lossless locked reservation claims
_FRAME_SIZE = 96
_REGISTER = {name: getattr(Register, name.upper()) for name in REGISTER_NAMES if name not in ("rflags", "rsp")}
RECORD_RSEQ_CS_SIZE = 2 * RSEQ_CS_SIZE  # two critical sections: the count, the record


def _per_cpu_section(a: _Asm, per_cpu: PerCpu, name: str, limit: int, body, fallback: str, on_full: str | None = None,
                     apart: str | None = None) -> None:
    """An rseq critical section named ``name``: arm ``rseq_cs`` with the descriptor at
    ``per_cpu.descriptor``, eax = cpu_id; if it is ``limit`` or more (or negative: no
    registration), disarm and go to ``fallback``; else ``body(a)`` ending with its one commit
    store; disarm. A program with its own ``rseq_cs`` armed (not 0) goes to ``fallback`` untouched.
    ``body`` may branch to ``name + "_full"`` (disarms, then goes to ``on_full``). With ``apart``,
    a ``cpu_id`` of VFORK_CPU (a vfork child, see :mod:`djprobe.vforks`) goes there instead of to
    ``fallback`` (a check on the fallback path only)."""
    R = Register
    rseq_cs = _fs(per_cpu.rseq_offset + RSEQ_CS)
    a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, rseq_cs, 0))
    a.branch(Code.JNE_REL32_64, fallback)
    a.label(f"{name}_arm")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, MemoryOperand(R.RIP, displ=per_cpu.descriptor)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, rseq_cs, R.RAX))
    a.label(f"{name}_start")  # right after the arming store: a signal before it finds nothing armed
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _fs(per_cpu.rseq_offset + CPU_ID)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, limit))
    a.branch(Code.JAE_REL32_64, f"{name}_disarm")
    body(a)  # ends with the commit
    a.label(f"{name}_end")
    a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
    a.branch(Code.JMP_REL32_64, f"{name}_done")
    a.add(Instruction.create_declare_byte(b"\x0f\xb9\x3d" + RSEQ_SIG.to_bytes(4, "little")))
    a.label(f"{name}_abort")  # the kernel cleared rseq_cs: arm again and retry
    a.branch(Code.JMP_REL32_64, f"{name}_arm")
    if on_full is not None:
        a.label(f"{name}_full")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
        a.branch(Code.JMP_REL32_64, on_full)
    a.label(f"{name}_disarm")
    a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
    if apart is not None:
        a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, VFORK_CPU))
        a.branch(Code.JE_REL32_64, apart)
    a.branch(Code.JMP_REL32_64, fallback)


def _ring_pointers(a: _Asm, headers: int, records: int, stride: int) -> None:
    """eax = a ring number: r11 = its header, rcx = its first record (rax clobbered)."""
    R = Register
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, 7))  # RING_HEADER_SIZE == 128
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.R11, MemoryOperand(R.RIP, displ=headers)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R11, R.RAX))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RCX, stride.bit_length() - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, MemoryOperand(R.RIP, displ=records)))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RCX, R.RAX))


def record_action(
    layout: AreaLayout, where: RecordTargets, registers: str = "all", descriptors: tuple[int, int] | None = None
) -> list[Instruction]:
    """Instructions that count the hit and write an event record (see :func:`_record_asm`)."""
    return _record_asm(layout, where, registers, descriptors).instructions()


def _record_asm(
    layout: AreaLayout, where: RecordTargets, registers: str = "all", descriptors: tuple[int, int] | None = None
) -> _Asm:
    """Instructions that count the hit and write an event record (see the module docstring).

    With ``where.rseq_offset`` and ``descriptors`` (the addresses of two ``struct rseq_cs`` for
    the count and the record): the hit is counted with a plain ``inc`` of the current CPU's
    counter shard, and the record is written into the current CPU's ring and committed by a
    plain store of the ring head, each inside an rseq critical section (see
    :func:`count_action`): a signal, a preemption or a migration restarts the record, so no
    per-CPU slot is ever reserved and left uncommitted. Rings ``[0, ring_count/2)`` belong to one
    CPU each; a thread without rseq, a CPU without a ring of its own, or a program with its own
    critical section armed reserves in one of the other rings (chosen by ``rsp``) with ``lock
    cmpxchg``, so that plain and locked reservations never meet on one ring. Only the five
    scratch registers and the flags are saved; the recorded registers are written straight into
    the record (from the frame for the scratch ones)."""
    a = _Asm()
    R = Register
    args_only = registers != "all"
    headers, records = (where.args_ring_headers, where.args_records) if args_only else (where.ring_headers, where.records)
    stride = layout.args_ring_stride if args_only else layout.ring_stride
    record_size = ARGS_RECORD_SIZE if args_only else RECORD_SIZE
    per_cpu = where.rseq_offset is not None and descriptors is not None
    cpu_rings = layout.ring_count // 2  # 0 with a single ring: every reservation is locked
    locked_base = cpu_rings
    locked_rings = layout.ring_count - cpu_rings
    stride_shift = layout.shard_stride.bit_length() - 1

    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(-RED_ZONE - _FRAME_SIZE)))
    for reg in _SCRATCH:
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_SAVED_AT[reg]), reg))
    # The arithmetic flags, with lahf/seto (pushfq/popfq cost ~8 ns more here).
    a.add(Instruction.create(Code.LAHF))
    a.add(Instruction.create_reg(Code.SETO_RM8, R.AL))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_FLAGS_SLOT), R.RAX))
    # The timestamp first: rdtsc's latency overlaps with the rest.
    _rdtsc(a)
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_TSC_SLOT), R.RAX))
    if where.wait_cycles:
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _rsp_slot(_ESCAPED), 0))

    # Count the hit.
    def count_body(b: _Asm) -> None:
        b.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
        b.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, MemoryOperand(R.RIP, displ=where.counter)))
        b.add(Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1)))  # the commit

    if per_cpu:
        assert descriptors is not None and where.rseq_offset is not None
        _per_cpu_section(a, PerCpu(where.rseq_offset, descriptors[0]), "count", layout.cpu_shards, count_body,
                         "count_locked", apart="apart")
    a.label("count_locked")
    if where.rseq_offset is not None and not per_cpu:  # locked only (a shared stub's record): the check here
        a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _fs(where.rseq_offset + CPU_ID), VFORK_CPU))
        a.branch(Code.JE_REL32_64, "apart")
    stack_hash(a, R.RAX, R.EAX, layout.shard_shift)
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base))
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, MemoryOperand(R.RIP, displ=where.counter)))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RCX, 0, R.RAX, 1))
    inc.has_lock_prefix = True
    a.add(inc)
    a.label("count_done")

    # Per-CPU: reserve, write and commit in one critical section (a signal, a preemption or a
    # migration aborts it before the commit: no slot is ever reserved and left uncommitted).
    a.label("retry")
    if per_cpu and cpu_rings:
        assert descriptors is not None and where.rseq_offset is not None

        def record_body(b: _Asm) -> None:
            _ring_pointers(b, headers, records, stride)  # r11 = the ring's header, rcx = its first record
            b.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _mem(R.R11)))
            b.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RDX))
            b.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.R11, RING_TAIL)))
            b.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
            b.branch(Code.JAE_REL32_64, "record_full")
            _write_record(b, layout, where, record_size, args_only)  # into the free slot at the head
            b.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.R11), R.RAX))  # head = pos + 1: the commit

        _per_cpu_section(a, PerCpu(where.rseq_offset, descriptors[1]), "record", cpu_rings, record_body,
                         "reserve_locked", on_full="full")
        a.label("record_done")
        a.branch(Code.JMP_REL32_64, "done")
    # Locked: reserve with lock cmpxchg in a ring chosen by rsp (plus the rings escaped, see
    # _own_slot_check), then write, then commit with the slot's sequence number.
    a.label("reserve_locked")
    stack_hash(a, R.RAX, R.EAX, layout.shard_shift)
    if where.wait_cycles and locked_rings > 1:
        a.add(Instruction.create_reg_mem(Code.ADD_R32_RM32, R.EAX, _rsp_slot(_ESCAPED)))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, locked_rings - 1))
    if locked_base:
        a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, locked_base))
    _ring_pointers(a, headers, records, stride)
    a.label("cas")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R11)))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RDX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RDX, layout.ring_slots))
    a.branch(Code.JAE_REL32_64, "full")
    if where.wait_cycles:
        # Lossless: claim the slot (0 -> this thread's pointer, in its last 8 bytes) before the
        # head moves, so that a signal handler of this thread that finds it full and
        # uncommitted knows it for its own (see _own_slot_check). A head that moved meanwhile
        # gives the claim back. A claim already held by this thread is that of its own record,
        # interrupted between its claim and its reservation: this is its signal handler.
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_CLAIM_POS), R.RAX))
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R10D, R.EAX))
        a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.R10D, layout.ring_slots - 1))
        a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.R10, record_size.bit_length() - 1))
        a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R10, R.RCX))
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _fs(0)))
        a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))
        claim = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.R10, record_size - SLOT_CLAIM_FROM_END), R.RDX)
        claim.has_lock_prefix = True
        a.add(claim)
        a.branch(Code.JNE_REL32_64, "claim_held")
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(_CLAIM_POS)))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDX, _mem(R.RAX, 1)))
    cas = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.R11), R.RDX)
    cas.has_lock_prefix = True
    a.add(cas)
    if where.wait_cycles:
        a.branch(Code.JE_REL32_64, "reserved")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _mem(R.R10, record_size - SLOT_CLAIM_FROM_END), 0))
        a.branch(Code.JMP_REL32_64, "cas")
        a.label("claim_held")  # rax = the claim's holder
        a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RAX, _fs(0)))
        a.branch(Code.JE_REL32_64, "own_claim")
        a.add(Instruction.create(Code.PAUSE))  # another thread's, which takes the slot or gives it back at once
        a.branch(Code.JMP_REL32_64, "cas")
        a.label("own_claim")
        if locked_rings > 1:
            a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, _rsp_slot(_ESCAPED), locked_rings - 1))
            a.branch(Code.JB_REL32_64, "escape")
        a.branch(Code.JMP_REL32_64, "drop")
        a.label("reserved")
    else:
        a.branch(Code.JNE_REL32_64, "cas")
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.RAX))
    _write_record(a, layout, where, record_size, args_only)  # ends with the commit (seq = pos + 1)
    a.branch(Code.JMP_REL32_64, "done")
    if where.rseq_offset is not None:
        a.label("apart")  # a vfork/posix_spawn child before its exec: counted apart, no record
        apart_inc(a, layout, where.counter)
        a.branch(Code.JMP_REL32_64, "done")
    a.label("full")
    if where.wait_cycles:
        _wait_for_room(a, layout, where.wait_cycles, record_size, escapes=locked_rings - 1)
    if where.wait_cycles and locked_rings > 1:
        # The locked ring this thread waited for is blocked by its own uncommitted slot (its
        # signal handler interrupted that record): reserve in the next locked ring from now on.
        a.label("escape")
        a.add(Instruction.create_mem(Code.INC_RM64, _rsp_slot(_ESCAPED)))
        a.branch(Code.JMP_REL32_64, "reserve_locked")
    a.label("drop")
    drop = Instruction.create_mem(Code.INC_RM64, MemoryOperand(R.RIP, displ=where.drops))
    drop.has_lock_prefix = True
    a.add(drop)
    a.label("done")
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(_FLAGS_SLOT)))
    a.add(Instruction.create_reg_u32(Code.ADD_RM8_IMM8, R.AL, 0x7F))
    a.add(Instruction.create(Code.SAHF))
    for reg in reversed(_SCRATCH):
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, reg, _rsp_slot(_SAVED_AT[reg])))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, _rsp_slot(RED_ZONE + _FRAME_SIZE)))
    return a


def _write_record(a: _Asm, layout: AreaLayout, where: RecordTargets, record_size: int, args_only: bool) -> None:
    """Write the record of ring position rdx into its slot (rcx: the ring's first record, moved
    to the slot) and its sequence number ``pos + 1`` last; rax = pos + 1 after it. The thread
    rax and r10 clobbered; r11 is left alone (the per-CPU commit stores through it)."""
    R = Register
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EDX))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.ring_slots - 1))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, record_size.bit_length() - 1))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _fs(0)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, 16), R.RAX))
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _mem(R.RCX, 8), where.instance))
    if where.tid_offset is not None:
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _fs(where.tid_offset)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _mem(R.RCX, 12), R.EAX))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(_TSC_SLOT)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, 24), R.RAX))

    def put(name: str, offset: int) -> None:
        reg = _REGISTER[name]
        if reg in _SAVED_AT:
            a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(_SAVED_AT[reg])))
            a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, offset), R.RAX))
        else:
            a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, offset), reg))

    if args_only:  # the six argument registers in ARG_REGISTERS order, then rax (a return value)
        for j, name in enumerate(ARG_REGISTERS + ("rax",)):
            put(name, 32 + 8 * j)
    else:
        for i, name in enumerate(REGISTER_NAMES[:15]):
            put(name, 32 + 8 * i)
        # rflags image = AH (CF PF AF ZF SF) | OF << 11 | IF | bit 1
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(_FLAGS_SLOT)))
        a.add(Instruction.create_reg_reg(Code.MOVZX_R32_RM8, R.R10D, R.AL))
        a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.R10D, 11))
        a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EAX, 8))
        a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, 0xD5))
        a.add(Instruction.create_reg_reg(Code.OR_R32_RM32, R.EAX, R.R10D))
        a.add(Instruction.create_reg_u32(Code.OR_RM32_IMM32, R.EAX, 0x202))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, 32 + 8 * 15), R.RAX))
        # the stack pointer at the probe
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, _rsp_slot(_FRAME_SIZE + RED_ZONE)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, 32 + 8 * 16), R.RAX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RDX, 1)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX), R.RAX))


def _rdtsc(a: _Asm) -> None:
    """rax = the TSC (rdx clobbered)."""
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RDX, 32))
    a.add(Instruction.create_reg_reg(Code.OR_R64_RM64, Register.RAX, Register.RDX))


def _wait_for_room(a: _Asm, layout: AreaLayout, wait_cycles: int, record_size: int, escapes: int) -> None:
    """The ring whose header is at r11 (first record at rcx) is full: if its consumer drained it
    within the last ``wait_cycles`` TSC cycles, spin (``pause``) until there is room (then
    reserve again, maybe in another ring if the thread moved to another CPU) or until
    ``wait_cycles`` have passed without the consumer draining this ring (then drop): each drain
    of the ring seen starts the timeout again, so a thread whose room is taken by others (its
    own signal handlers in a storm, other threads) waits as long as the consumer is alive and
    draining. The cycles waited are added to the ring's RING_WAITED. A stopped or dead consumer
    stops draining: after one timeout, full rings drop at once. A heartbeat a little ahead of this CPU's TSC (written by the consumer on another CPU
    just now) is recent: the age is compared signed. Uses rax and rdx, and two frame slots for
    when the wait began and its deadline. While it waits, :func:`_own_slot_check` looks at the
    slot at the ring's tail (the one the consumer waits for)."""
    R = Register
    _rdtsc(a)
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_WAIT_BEGAN), R.RAX))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.R11, RING_HEARTBEAT)))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RDX, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.RDX))
    a.branch(Code.JG_REL32_64, "drop")  # no drain for longer than the timeout: do not wait
    a.add(Instruction.create_reg_mem(Code.ADD_R64_RM64, R.RDX, _rsp_slot(_WAIT_BEGAN)))
    a.label("progress")  # rdx = the new deadline
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_WAIT_DEADLINE), R.RDX))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(_WAIT_TAIL), R.RAX))
    a.label("wait")
    a.add(Instruction.create(Code.PAUSE))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R11)))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
    a.branch(Code.JB_REL32_64, "room")
    _own_slot_check(a, layout, record_size, escapes)
    a.label("not_mine")
    _rdtsc(a)
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RDX, _rsp_slot(_WAIT_TAIL)))
    a.branch(Code.JE_REL32_64, "no_progress")
    # The consumer drained this ring (others took the room first: the thread's own signal
    # handlers, other threads): it is alive, so the timeout starts again.
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RDX, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.RAX))
    a.branch(Code.JMP_REL32_64, "progress")
    a.label("no_progress")
    a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RAX, _rsp_slot(_WAIT_DEADLINE)))
    a.branch(Code.JB_REL32_64, "wait")
    _add_waited(a)
    a.branch(Code.JMP_REL32_64, "drop")  # timed out
    a.label("room")
    _add_waited(a)
    a.branch(Code.JMP_REL32_64, "retry")


def _own_slot_check(a: _Asm, layout: AreaLayout, record_size: int, escapes: int) -> None:
    """In the wait loop: is the slot at the tail of the full ring at r11 reserved, not committed
    and claimed by this thread? Then it is this thread's own record, interrupted by the signal
    handler that is waiting now, which would wait for itself: leave the wait and reserve in the
    next locked ring (at most ``escapes`` times), else drop. A lossless locked reservation
    claims its slot (its thread pointer, with ``lock cmpxchg`` from 0, in the slot's last 8
    bytes, which the consumer zeroes when it drains the slot) before it moves the head, so a
    reserved slot always names its owner; a per-CPU ring never has an uncommitted slot (its
    records are committed in the critical section that reserves them). rax, rdx clobbered."""
    R = Register
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDX, R.EAX))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EDX, layout.ring_slots - 1))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RDX, record_size.bit_length() - 1))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.RCX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RAX, 1)))
    a.add(Instruction.create_mem_reg(Code.CMP_RM64_R64, _mem(R.RDX), R.RAX))
    a.branch(Code.JAE_REL32_64, "not_mine")  # seq >= tail + 1: committed (or read as a later lap's)
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R11)))
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.R11, RING_TAIL)))
    a.add(Instruction.create_reg_u32(Code.CMP_RM64_IMM32, R.RAX, layout.ring_slots))
    a.branch(Code.JB_REL32_64, "room")  # drained meanwhile
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RDX, record_size - SLOT_CLAIM_FROM_END)))
    a.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, R.RAX, _fs(0)))
    a.branch(Code.JNE_REL32_64, "not_mine")
    _add_waited(a)
    if escapes:
        a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, _rsp_slot(_ESCAPED), escapes))
        a.branch(Code.JB_REL32_64, "escape")
    a.branch(Code.JMP_REL32_64, "drop")


def _add_waited(a: _Asm) -> None:
    """Add the TSC cycles since the wait began to the ring's RING_WAITED (rax, rdx clobbered)."""
    R = Register
    _rdtsc(a)
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _rsp_slot(_WAIT_BEGAN)))
    added = Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem(R.R11, RING_WAITED), R.RAX)
    added.has_lock_prefix = True
    a.add(added)


def build_record_stub(
    site: Relocatable, layout: AreaLayout, slot_address: int, where: RecordTargets, registers: str = "all"
) -> Stub:
    """Build the record stub for ``site`` at ``slot_address`` (see :func:`build_count_stub`).
    At an exit window, ``registers="args"`` records ``rax`` (the return value) too."""
    if registers == "args" and getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False):
        registers = "args+rax"
    if where.rseq_offset is None:
        return _finish(site, layout, slot_address, record_action(layout, where, registers))
    trailer_at = slot_address + layout.slot_size - RECORD_RSEQ_CS_SIZE
    descriptors = (trailer_at, trailer_at + RSEQ_CS_SIZE)
    a = _record_asm(layout, where, registers, descriptors)
    stub = _finish(site, layout, slot_address, a.instructions(), reserve=RECORD_RSEQ_CS_SIZE)
    if len(stub.code) > layout.slot_size - RECORD_RSEQ_CS_SIZE:
        raise ValueError(f"stub of {len(stub.code)} bytes does not fit a {layout.slot_size}-byte slot with its rseq descriptors")
    start = stub.action_range[0]
    action = stub.code[start - slot_address : start - slot_address + stub.action_size]
    ips = [insn.ip for insn in Decoder(64, action, ip=start)]
    trailer = b"".join(
        rseq_descriptor(*(ips[a.index_of(f"{name}_{part}")] for part in ("start", "end", "abort")))
        for name in ("count", "record")
    ) if "record_start" in a._labels else rseq_descriptor(
        *(ips[a.index_of(f"count_{part}")] for part in ("start", "end", "abort"))
    ) + bytes(RSEQ_CS_SIZE)
    return Stub(address=slot_address, code=stub.code, action_size=stub.action_size, relocated=stub.relocated,
                action_start=stub.action_start, trailer=trailer, slot_size=layout.slot_size)


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


def encode_exact(instruction: Instruction, at: int, bits: int = 64) -> bytes:
    """``instruction`` encoded at ``at`` in the form given, never a shorter one (so that two
    layout passes with different branch targets lay out alike)."""
    encoder = Encoder(bits)
    encoder.encode(instruction, at)
    return bytes(encoder.take_buffer())


def near_branch_to(insn, at: int, to: int, bits: int = 64) -> bytes:
    """The branch ``insn`` (an ``Insn``) in its near form, aimed at ``to``, encoded at ``at``."""
    c = insn.instruction.copy()
    c.as_near_branch()
    if bits == 32:
        c.near_branch32 = to
    else:
        c.near_branch64 = to
    return encode_exact(c, at, bits)


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
        return encode_exact(instruction, at, bits)

    def branch_to(insn, at: int, to: int) -> bytes:
        return near_branch_to(insn, at, to, bits)

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
