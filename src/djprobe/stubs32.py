"""Stubs in 32-bit (i386) code: the i386 counterparts of :mod:`djprobe.stubs`.

i386 has no red zone, but the stack below ``esp`` belongs to nobody at a probe site either: a
``push`` there is what any ``call`` would do, so the stubs save what they clobber with
``push``/``pop``. There is no RIP-relative addressing: counters and rings are addressed with
absolute 32-bit displacements (the area is below 4 GiB, like everything in a 32-bit process).

* **count**: ``push eax`` (and ``pushfd`` only where the arithmetic flags are live), the shard
  from ``esp`` (``esp >> shard_shift``, as the x86-64 stub uses ``rsp``), then the 64-bit counter
  of that shard incremented with ``lock add dword [lo], 1; lock adc dword [hi], 0`` (each carry out
  of the low word is added once, by the thread whose increment produced it: the count stays
  exact), then ``popfd``/``pop eax``. Per-CPU (rseq) counting is not used in 32-bit processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

from .area import AreaLayout
from .errors import InvalidSiteError
from .stubs import Relocatable, Stub

if TYPE_CHECKING:  # pragma: no cover
    from .regions import Region

__all__ = ["assemble32", "count_action32", "build_count_stub32", "build_stub32", "jump_bytes32"]

JMP_REL32_SIZE = 5


def assemble32(instructions: list[Instruction], address: int) -> bytes:
    """Encode 32-bit ``instructions`` to run at ``address``."""
    encoder = BlockEncoder(32)
    encoder.add_many(list(instructions))
    return bytes(encoder.encode(address))


def _abs(displ: int, base: Register = Register.NONE) -> MemoryOperand:
    return MemoryOperand(base, Register.NONE, 1, displ & 0xFFFFFFFF, 4)


def count_action32(layout: AreaLayout, counter_address: int, *, flags_live: bool) -> list[Instruction]:
    """Instructions that add one to the counter of an instance (shard 0 at ``counter_address``)."""
    R = Register
    out = [Instruction.create_reg(Code.PUSH_R32, R.EAX)]
    if flags_live:
        out.append(Instruction.create(Code.PUSHFD))
    stride_shift = layout.shard_stride.bit_length() - 1
    out += [
        Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.ESP),
        Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EAX, layout.shard_shift),
        Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1),
        Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base),
        Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift),
    ]
    low = Instruction.create_mem_u32(Code.ADD_RM32_IMM8, _abs(counter_address, R.EAX), 1)
    low.has_lock_prefix = True
    high = Instruction.create_mem_u32(Code.ADC_RM32_IMM8, _abs(counter_address + 4, R.EAX), 0)
    high.has_lock_prefix = True
    out += [low, high]
    if flags_live:
        out.append(Instruction.create(Code.POPFD))
    out.append(Instruction.create_reg(Code.POP_R32, R.EAX))
    return out


def build_count_stub32(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int) -> Stub:
    """The count stub of a site in 32-bit code, in the slot at ``slot_address``: the action, the
    relocated displaced instructions, the jump back.

    Raises ValueError for what 32-bit stubs do not do yet (return probes' exit windows) and when
    the stub does not fit a slot; RelocationError from the relocator."""
    if getattr(site, "exit", None) is not None:
        raise ValueError("return probes are not supported in 32-bit processes yet")
    action = assemble32(count_action32(layout, counter_address, flags_live=not site.flags_dead), slot_address)
    relocated = site.relocate_to(slot_address + len(action), site.address + site.size)
    code = action + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action), relocated=relocated)


def jump_bytes32(site: int, target: int) -> bytes:
    """The 5-byte ``jmp rel32`` from ``site`` to ``target`` in a 32-bit process (reaches all 4 GiB)."""
    rel = (target - (site + JMP_REL32_SIZE)) & 0xFFFFFFFF
    return b"\xe9" + rel.to_bytes(4, "little")


def build_stub32(site: Relocatable, region: "Region", slot: int, action: str) -> Stub:
    """The stub of ``action`` ("count"; "record" is not written yet) for a site of a 32-bit
    process in slot ``slot`` of ``region``.

    Raises InvalidSiteError naming what 32-bit processes cannot take yet (records and handlers,
    return probes), RelocationError from the relocator."""
    what = getattr(site, "site", None) or f"{site.address:#x}"
    if action != "count":
        raise InvalidSiteError(
            f"{what}: recording events (handlers, trace) is not supported in 32-bit processes yet; counting is",
            address=site.address, reason="records not supported in 32-bit processes yet",
        )
    if getattr(site, "exit", None) is not None:
        raise InvalidSiteError(
            f"{what}: return probes are not supported in 32-bit processes yet",
            address=site.address, reason="return probes not supported in 32-bit processes yet",
        )
    return build_count_stub32(site, region.layout, region.slot_address(slot), region.counter_address(slot))
