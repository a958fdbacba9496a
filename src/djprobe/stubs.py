"""Trampoline (stub) emission.

A stub is: the action, then the relocated displaced instructions, then a jump back to the
instruction after them (the relocator appends it). The action saves exactly what it clobbers:

* **count**: two scratch registers (stored in the red zone, or just below it at a mid-function
  site after stepping ``rsp`` over it with ``lea``, which leaves the flags alone) and, only where the
  arithmetic flags are live, the flags (``lahf``/``seto``, restored with ``add al,0x7f``/``sahf``:
  about 1 ns, where ``pushf``/``popf`` cost about 8 ns on this kind of machine). It adds one to
  the instance's counter with ``lock inc``, in a shard chosen from the stack pointer so that
  threads on different CPUs rarely write the same cache line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

from .area import AreaLayout

if TYPE_CHECKING:
    from .x86.relocate import Relocated

RED_ZONE = 128
JMP_REL32_SIZE = 5


class Relocatable(Protocol):
    """What the stub builder needs from a site analysis."""

    address: int
    size: int
    at_entry: bool
    flags_dead: bool

    def relocate_to(self, stub_address: int, return_to: int | None = None) -> Relocated: ...


def assemble(instructions: Sequence[Instruction], address: int) -> bytes:
    """Encode ``instructions`` to run at ``address`` (RIP-relative operands hold absolute targets)."""
    encoder = BlockEncoder(64)
    encoder.add_many(list(instructions))
    return bytes(encoder.encode(address))


def _mem(base: Register, displ: int = 0, index: Register = Register.NONE, scale: int = 1) -> MemoryOperand:
    return MemoryOperand(base, index, scale, displ, 1 if displ else 0)


def _rsp_slot(offset: int) -> MemoryOperand:
    return MemoryOperand(Register.RSP, Register.NONE, 1, offset, 1)


def count_action(layout: AreaLayout, counter_address: int, *, red_zone_live: bool, flags_live: bool) -> list[Instruction]:
    """Instructions that add one to the counter of an instance (shard 0 at ``counter_address``)."""
    ins: list[Instruction] = []
    if red_zone_live:
        ins.append(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP, _rsp_slot(-RED_ZONE)))
    ins.append(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-8), Register.RAX))
    ins.append(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-16), Register.RCX))
    if flags_live:
        ins.append(Instruction.create(Code.LAHF))
        ins.append(Instruction.create_reg(Code.SETO_RM8, Register.AL))
        ins.append(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-24), Register.RAX))
    stride_shift = layout.shard_stride.bit_length() - 1
    ins.append(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RAX, Register.RSP))
    ins.append(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, Register.RAX, layout.shard_shift))
    ins.append(Instruction.create_reg_u32(Code.AND_RM32_IMM32, Register.EAX, layout.n_shards - 1))
    ins.append(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, Register.EAX, stride_shift))
    ins.append(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RCX, MemoryOperand(Register.RIP, displ=counter_address)))
    inc = Instruction.create_mem(Code.INC_RM64, _mem(Register.RCX, 0, Register.RAX, 1))
    inc.has_lock_prefix = True
    ins.append(inc)
    if flags_live:
        ins.append(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, _rsp_slot(-24)))
        ins.append(Instruction.create_reg_u32(Code.ADD_RM8_IMM8, Register.AL, 0x7F))
        ins.append(Instruction.create(Code.SAHF))
    ins.append(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RCX, _rsp_slot(-16)))
    ins.append(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, _rsp_slot(-8)))
    if red_zone_live:
        ins.append(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP, _rsp_slot(RED_ZONE)))
    return ins


@dataclass(frozen=True)
class Stub:
    """A stub ready to be written at ``address``."""

    address: int
    code: bytes
    action_size: int  # bytes of the action before the relocated instructions
    relocated: Relocated

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    def original_address(self, stub_address: int) -> int | None:
        """The original address equivalent to ``stub_address`` inside the relocated copy, if any."""
        for orig, new in self.relocated.address_map.items():
            if new == stub_address:
                return orig
        return None


def build_count_stub(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int) -> Stub:
    """Build the count stub for ``site`` in the stub slot at ``slot_address``.

    Raises RelocationError (from the relocator) if the displaced instructions cannot reach their
    targets from this slot, and ValueError if the stub does not fit in a slot.
    """
    action = count_action(
        layout,
        counter_address,
        red_zone_live=not site.at_entry,
        flags_live=not (site.at_entry or site.flags_dead),
    )
    action_code = assemble(action, slot_address)
    relocated = site.relocate_to(slot_address + len(action_code), site.address + site.size)
    code = action_code + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action_code), relocated=relocated)


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
