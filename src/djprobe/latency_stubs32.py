"""Stub code of latency probes in 32-bit (i386) processes: the i386 counterparts of
:mod:`djprobe.latency_stubs`, with the same three builders (entry, exit, both) and the same data:
{key, start TSC} entries of 16 bytes in the area's table of calls in flight, 64 log2 buckets of
{count, sum of ns} per function and shard, the collision and unpaired counters.

* **key**: ``esp`` at the probe (the return address's slot, the same at the entry and at every
  exit of the call) in the low dword, ``tag << 16`` in the high dword: the 64-bit key is
  :func:`djprobe.latency_stubs.latency_key` of ``esp``. A valid key's high dword is never 0
  (tags start at 1), so an entry is free when its high dword is 0; freeing it writes that dword.
* **index**: Fibonacci hashing in 32 bits, ``((esp ^ tag * 0x9E3779B9) * 0x9E3779B9) >> (32 -
  log2(slots))`` (:func:`table_index32`): only the stubs of one area's 32-bit process use its
  table, so it need not agree with the x86-64 hash. The neighbour (index xor 1) as in x86-64.
* **atomicity**: the entry is written and read whole with one 16-byte ``movdqa`` (atomic on CPUs
  with AVX, as for x86-64); the value is built, and read back, through 16 bytes of the stub's
  frame, so no ``pinsrq`` (absent in 32-bit code) is needed.
* **time**: ``rdtsc`` gives ``edx:eax``; ``ns = ticks * mul >> 32`` in register pairs (64 x 32
  bits, plus the high word of ``mul`` when the TSC runs below 1 GHz); the bucket is the bit
  length of ``ns`` (``bsr`` of the high or the low dword), as ``bsr(2 * ns + 1)`` in x86-64.
* **histogram**: no rseq in 32-bit processes, so every sample takes the locked path: a shard
  chosen by ``esp >> shard_shift`` over *all* the area's shards (no per-CPU half to keep apart),
  ``lock add`` of the low dwords and ``lock inc``/``lock add`` of the high ones only when a carry
  (or the sum's high dword) asks for it: each carry is added once, by the thread that made it, so
  the figures are exact once no stub runs (as the 32-bit count stub's counters).

* **vfork children** (with the rseq offset, :mod:`djprobe.vforks32`): the entry's count sends a
  marked child to the apart counter and then to the entry frame's ``popad`` (:data:`ENTRY_SKIP`):
  its call is not timed; the exit checks the marker on its unpaired path only (a child's exit,
  whose entry was not timed, is not an unpaired one).

Registers: ``pushad`` (and ``pushfd`` at an entry whose flags are live: a first instruction that
reads them), and ``xmm0`` in the frame; there is no red zone, but the stack below ``esp`` is
nobody's at a function's entry or exit (a ``call`` would write there).
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .area import LATENCY_ENTRY_SIZE, MISC_COLLISIONS, MISC_UNPAIRED, AreaLayout
from .latency_stubs import TAG_SHIFT, LatencyTargets
from .stubs import Relocatable, Stub, _Asm
from .stubs32 import _add64, _aimed32, _finish_exit32, assemble32, count_into32, vfork_check32

__all__ = ["GOLDEN32", "table_index32", "build_latency_entry_stub", "build_latency_exit_stub",
           "build_latency_both_stub"]

GOLDEN32 = 0x9E3779B9
_M32 = 0xFFFFFFFF
R = Register

# the frame below the pushad block: [esp+0, 16) the entry being written, [16, 32) an entry read
# back, [32, 48) the program's xmm0
_NEW, _READ, _XMM0 = 0, 16, 32
_LOCALS = 48
_PUSHAD = 32


def table_index32(esp: int, tag: int, slots: int) -> int:
    """The table entry of the call at ``esp`` of the function tagged ``tag`` (as the 32-bit stubs
    compute it)."""
    mixed = (esp ^ (tag * GOLDEN32)) & _M32
    return ((mixed * GOLDEN32) & _M32) >> (32 - (slots.bit_length() - 1))


def _m(base: Register, displ: int = 0) -> MemoryOperand:
    return MemoryOperand(base, Register.NONE, 1, displ, 1 if -128 <= displ < 128 else 4)


def _abs(displ: int, base: Register = Register.NONE) -> MemoryOperand:
    return MemoryOperand(base, Register.NONE, 1, displ & _M32, 4)


def _locked(i: Instruction) -> Instruction:
    i.has_lock_prefix = True
    return i


class _Frame:
    """The action's saved state: ``pushfd`` (optional), ``pushad``, 48 bytes of locals."""

    def __init__(self, flags: bool) -> None:
        self.flags = flags
        self.size = _LOCALS + _PUSHAD + (4 if flags else 0)  # esp at the probe = esp + size

    def save(self, a: _Asm) -> None:
        if self.flags:
            a.add(Instruction.create(Code.PUSHFD))
        a.add(Instruction.create(Code.PUSHAD))
        a.add(Instruction.create_reg_u32(Code.SUB_RM32_IMM8, R.ESP, _LOCALS))
        a.add(Instruction.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _m(R.ESP, _XMM0), R.XMM0))

    def restore(self, a: _Asm) -> None:
        a.add(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM0, _m(R.ESP, _XMM0)))
        a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.ESP, _LOCALS))
        a.label(ENTRY_SKIP)  # a vfork child's count (count_into32's skip_to) comes here, pushad done
        a.add(Instruction.create(Code.POPAD))
        if self.flags:
            a.add(Instruction.create(Code.POPFD))


def _key_and_entry(a: _Asm, t: LatencyTargets, frame: _Frame) -> None:
    """ecx = the key's low dword (esp at the probe), edx = the address of its table entry (eax
    clobbered)."""
    a.add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ECX, _m(R.ESP, frame.size)))
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.ECX))
    a.add(Instruction.create_reg_u32(Code.XOR_RM32_IMM32, R.EAX, (t.tag * GOLDEN32) & _M32))
    a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, R.EAX, R.EAX, GOLDEN32))
    a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EAX, 32 - (t.slots.bit_length() - 1)))
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, 4))
    a.add(Instruction.create_reg_mem(Code.LEA_R32_M, R.EDX, _abs(t.table, R.EAX)))


def _read_entry(a: _Asm, entry: Register) -> None:
    """The 16 bytes at ``entry``, read whole (``movdqa``), copied to the frame's read slot."""
    a.add(Instruction.create_reg_mem(Code.MOVDQA_XMM_XMMM128, R.XMM0, _m(entry)))
    a.add(Instruction.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _m(R.ESP, _READ), R.XMM0))


def _is_ours(a: _Asm, high: int, label: str) -> None:
    """Jump to ``label`` unless the entry read back holds the key {ecx, ``high``}."""
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _m(R.ESP, _READ + 4), high))
    a.branch(Code.JNE_REL32_32, label)
    a.add(Instruction.create_mem_reg(Code.CMP_RM32_R32, _m(R.ESP, _READ), R.ECX))
    a.branch(Code.JNE_REL32_32, label)


def entry_action32(a: _Asm, t: LatencyTargets, frame: _Frame) -> None:
    """Append the entry's latency action (store {key, TSC} in a free entry or its own, else take
    the first entry and count the collision; free a stale copy of its key in the neighbour)."""
    high = t.tag << (TAG_SHIFT - 32)
    frame.save(a)
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _m(R.ESP, _NEW + 8), R.EAX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _m(R.ESP, _NEW + 12), R.EDX))
    _key_and_entry(a, t, frame)
    a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _m(R.ESP, _NEW), R.ECX))
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _m(R.ESP, _NEW + 4), high))
    _read_entry(a, R.EDX)
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _m(R.ESP, _READ + 4), 0))
    a.branch(Code.JE_REL32_32, "lat_claim")  # free
    _is_ours(a, high, "lat_neighbour")
    a.branch(Code.JMP_REL32_32, "lat_claim")  # this function, this stack: that call was abandoned
    a.label("lat_neighbour")  # taken by another call in flight: the neighbour, on the same terms
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EDX))
    a.add(Instruction.create_reg_u32(Code.XOR_RM32_IMM8, R.EBX, LATENCY_ENTRY_SIZE))
    _read_entry(a, R.EBX)
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _m(R.ESP, _READ + 4), 0))
    a.branch(Code.JE_REL32_32, "lat_claim_other")
    _is_ours(a, high, "lat_collision")
    a.branch(Code.JMP_REL32_32, "lat_claim_other")
    a.label("lat_collision")  # both taken: the call in the first entry loses its sample (counted)
    misc = t.misc + 8 * MISC_COLLISIONS
    _add64(a, _abs(misc), _abs(misc + 4), "lat_counted")
    a.label("lat_claim")
    a.add(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM0, _m(R.ESP, _NEW)))
    a.add(Instruction.create_mem_reg(Code.MOVDQA_XMMM128_XMM, _m(R.EDX), R.XMM0))  # {key, start}, atomic
    # an abandoned call of ours left in the neighbour would pair with this call's exit: free it
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EDX))
    a.add(Instruction.create_reg_u32(Code.XOR_RM32_IMM8, R.EBX, LATENCY_ENTRY_SIZE))
    _read_entry(a, R.EBX)
    _is_ours(a, high, "lat_done")
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _m(R.EBX, 4), 0))
    a.branch(Code.JMP_REL32_32, "lat_done")
    a.label("lat_claim_other")
    a.add(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM0, _m(R.ESP, _NEW)))
    a.add(Instruction.create_mem_reg(Code.MOVDQA_XMMM128_XMM, _m(R.EBX), R.XMM0))
    a.label("lat_done")
    frame.restore(a)


#: The label of the entry frame's ``popad`` where a vfork child's count goes (not timed).
ENTRY_SKIP = "lat_skip"


def exit_action32(t: LatencyTargets, layout: AreaLayout, rseq_offset: int | None = None) -> list[Instruction]:
    """The exit's latency action: find its call's entry (or the neighbour), free it, add the
    nanoseconds into a bucket of a locked shard; else count the exit as unpaired (with
    ``rseq_offset``: unless it is a vfork child's, whose entry was not timed)."""
    frame = _Frame(flags=False)  # dead at a return or a tail call
    high = t.tag << (TAG_SHIFT - 32)
    a = _Asm()
    frame.save(a)
    _key_and_entry(a, t, frame)
    _read_entry(a, R.EDX)
    _is_ours(a, high, "lat_neighbour")
    a.branch(Code.JMP_REL32_32, "lat_paired")
    a.label("lat_neighbour")
    a.add(Instruction.create_reg_u32(Code.XOR_RM32_IMM8, R.EDX, LATENCY_ENTRY_SIZE))
    _read_entry(a, R.EDX)
    _is_ours(a, high, "lat_unpaired")
    a.label("lat_paired")
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _m(R.EDX, 4), 0))  # free the entry
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_reg_mem(Code.SUB_R32_RM32, R.EAX, _m(R.ESP, _READ + 8)))
    a.add(Instruction.create_reg_mem(Code.SBB_R32_RM32, R.EDX, _m(R.ESP, _READ + 12)))
    a.branch(Code.JNS_REL32_32, "lat_ticks")
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))  # a TSC that went back: 0
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))
    a.label("lat_ticks")
    # ns = (ticks * mul) >> 32, ticks = edx:eax (< 2**63), mul = mh:ml
    ml, mh = t.mul & _M32, t.mul >> 32
    if mh >> 31:
        raise ValueError(f"latency multiplier {t.mul:#x} out of range")
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ESI, R.EDX))  # th
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBP, R.EAX))  # tl
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, ml))
    a.add(Instruction.create_reg(Code.MUL_RM32, R.ECX))  # edx:eax = tl * ml
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.EDX))  # (tl * ml) >> 32
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.ESI))
    a.add(Instruction.create_reg(Code.MUL_RM32, R.ECX))  # edx:eax = th * ml
    a.add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EAX, R.EDI))
    a.add(Instruction.create_reg_u32(Code.ADC_RM32_IMM8, R.EDX, 0))  # edx:eax = ns (mh == 0)
    if mh:  # a TSC below 1 GHz: + tl * mh + (th * mh << 32)
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EDX))
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.EAX))
        a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, R.ESI, R.ESI, mh))
        a.add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EBX, R.ESI))
        a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, mh))
        a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EBP))
        a.add(Instruction.create_reg(Code.MUL_RM32, R.ECX))
        a.add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EAX, R.EDI))
        a.add(Instruction.create_reg_reg(Code.ADC_R32_RM32, R.EDX, R.EBX))
    # bucket = bit length of ns (ecx)
    a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
    a.branch(Code.JNE_REL32_32, "lat_high")
    a.add(Instruction.create_reg_reg(Code.BSR_R32_RM32, R.ECX, R.EAX))
    a.branch(Code.JE_REL32_32, "lat_zero")
    a.add(Instruction.create_reg(Code.INC_R32, R.ECX))
    a.branch(Code.JMP_REL32_32, "lat_bucket")
    a.label("lat_zero")
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX))
    a.branch(Code.JMP_REL32_32, "lat_bucket")
    a.label("lat_high")
    a.add(Instruction.create_reg_reg(Code.BSR_R32_RM32, R.ECX, R.EDX))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.ECX, 33))
    a.label("lat_bucket")
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.ECX, 4))  # its {count, sum} pair
    # the shard: (esp at the probe >> shard_shift) over all the area's shards
    shards = t.cpu_shards + t.locked_shards
    a.add(Instruction.create_reg_mem(Code.LEA_R32_M, R.EBX, _m(R.ESP, frame.size)))
    a.add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EBX, t.shard_shift))
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EBX, shards - 1))
    a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, R.EBX, R.EBX, t.shard_stride))
    a.add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ECX, MemoryOperand(R.ECX, R.EBX, 1, t.hist & _M32, 4)))
    _add64(a, _m(R.ECX, 0), _m(R.ECX, 4), "lat_counted")
    a.add(_locked(Instruction.create_mem_reg(Code.ADD_RM32_R32, _m(R.ECX, 8), R.EAX)))
    a.branch(Code.JAE_REL32_32, "lat_nocarry")
    a.add(_locked(Instruction.create_mem(Code.INC_RM32, _m(R.ECX, 12))))
    a.label("lat_nocarry")
    a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
    a.branch(Code.JE_REL32_32, "lat_done")
    a.add(_locked(Instruction.create_mem_reg(Code.ADD_RM32_R32, _m(R.ECX, 12), R.EDX)))
    a.branch(Code.JMP_REL32_32, "lat_done")
    a.label("lat_unpaired")
    vfork_check32(a, rseq_offset, "lat_done")  # a vfork child's exit: not an unpaired one
    misc = t.misc + 8 * MISC_UNPAIRED
    _add64(a, _abs(misc), _abs(misc + 4), "lat_unpaired_counted")
    a.label("lat_done")
    frame.restore(a)
    return _aimed32(a)


def _check(layout: AreaLayout, t: LatencyTargets) -> None:
    shards = t.cpu_shards + t.locked_shards
    if shards & (shards - 1) or t.slots & (t.slots - 1):
        raise ValueError("latency shards and slots must be powers of two")
    if t.table + layout.latency_size > 1 << 32:
        raise ValueError(f"latency block at {t.table:#x} is not below 4 GiB")


def build_latency_entry_stub(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int,
                             targets: LatencyTargets, rseq_offset: int | None = None) -> Stub:
    """The stub at a latency probe's function entry in 32-bit code: count the call (as the
    32-bit count stub), then remember when it began; the relocated entry instructions, the jump
    back. The flags are kept where the first instruction reads them. With ``rseq_offset``, a vfork
    child's call is counted apart and not timed.

    Raises ValueError (not at an entry, or too big for a slot), RelocationError."""
    if not site.at_entry:
        raise ValueError("a latency entry stub goes at the first byte of a function")
    _check(layout, targets)
    flags = not site.flags_dead
    a = _Asm()
    count_into32(a, layout, counter_address, flags_live=flags, rseq_offset=rseq_offset, skip_to=ENTRY_SKIP)
    entry_action32(a, targets, _Frame(flags))
    action = assemble32(_aimed32(a), slot_address)
    relocated = site.relocate_to(slot_address + len(action), site.address + site.size)
    code = action + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action), relocated=relocated)


def build_latency_exit_stub(site: Relocatable, layout: AreaLayout, slot_address: int,
                            targets: LatencyTargets, rseq_offset: int | None = None) -> Stub:
    """The stub of one exit window of a latency probe in 32-bit code (laid out as a return
    probe's: relocated prefix, exit action, relocated exit).

    Raises ValueError (not an exit window, or too big for a slot), RelocationError."""
    if getattr(site, "exit", None) is None or getattr(site, "exit_early", False):
        raise ValueError("a latency exit stub goes at an exit window that acts at its exit")
    _check(layout, targets)
    return _finish_exit32(site, layout, slot_address, exit_action32(targets, layout, rseq_offset))


def build_latency_both_stub(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int,
                            targets: LatencyTargets, rseq_offset: int | None = None) -> Stub:
    """The stub of a 32-bit function whose entry window ends with one of its exits: the entry
    action, the relocated instructions before the exit, the exit action, the relocated exit (see
    :func:`djprobe.latency_stubs.build_latency_both_stub`).

    Raises ValueError (not at an entry, or too big for a slot), RelocationError."""
    from .x86.relocate import Relocated, relocate

    if not site.at_entry:
        raise ValueError("a latency entry stub goes at the first byte of a function")
    _check(layout, targets)
    displaced = list(getattr(site, "displaced"))
    prefix, last = displaced[:-1], displaced[-1]
    flags = not site.flags_dead
    a = _Asm()
    count_into32(a, layout, counter_address, flags_live=flags, rseq_offset=rseq_offset, skip_to=ENTRY_SKIP)
    entry_action32(a, targets, _Frame(flags))
    entry_code = assemble32(_aimed32(a), slot_address)
    at = slot_address + len(entry_code)
    pre = relocate(prefix, at, None) if prefix else None
    address_map = dict(pre.address_map) if pre is not None else {}
    exit_at = at + (len(pre.code) if pre is not None else 0)
    exit_code = assemble32(exit_action32(targets, layout, rseq_offset), exit_at)
    address_map[last.address] = exit_at  # a thread at the exit runs the exit action first
    last_code = relocate([last], exit_at + len(exit_code), None).code
    code = entry_code + (pre.code if pre is not None else b"") + exit_code + last_code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    relocated = Relocated(code, slot_address, address_map, None)
    return Stub(address=slot_address, code=code, action_size=exit_at + len(exit_code) - slot_address,
                relocated=relocated)

