"""Stubs in 32-bit (i386) code: the i386 counterparts of :mod:`djprobe.stubs`.

i386 has no red zone, but the stack below ``esp`` belongs to nobody at a probe site either: a
``push`` there is what any ``call`` would do, so the stubs save what they clobber with
``push``/``pop``. There is no RIP-relative addressing: counters and rings are addressed with
absolute 32-bit displacements (the area is below 4 GiB, like everything in a 32-bit process).

* **count**: ``push eax`` (and ``pushfd`` only where the arithmetic flags are live), the shard
  from ``esp`` (``esp >> shard_shift``, as the x86-64 stub uses ``rsp``), then the 64-bit counter
  of that shard incremented with ``lock add dword [lo], 1`` and, only when that carried,
  ``lock inc dword [hi]`` (each carry out of the low word is added once, by the thread whose
  increment produced it: the count stays exact), then ``popfd``/``pop eax``. Per-CPU (rseq)
  counting is not used in 32-bit processes.
* **vfork children**: where glibc registered rseq (``rseq_offset`` given), one ``cmp dword
  gs:[rseq_offset + 4], VFORK_CPU`` and a ``jcc`` come before the locked count: a vfork or
  posix_spawn child marked by the vfork hook (:mod:`djprobe.vforks32`) adds one to the
  instance's *apart* counter (:attr:`AreaLayout.apart_offset`, 64 bits in two words as
  :func:`_add64`) and does nothing else (no record). Without ``rseq_offset`` (glibc without rseq,
  ``glibc.pthread.rseq=0``) the stubs are as before and such children count as the parent's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

from .area import RING_TAIL, AreaLayout
from .rseq import CPU_ID, VFORK_CPU
from .stubs import Relocatable, Stub

if TYPE_CHECKING:  # pragma: no cover
    from .regions import Region
    from .stubs import RecordTargets

__all__ = ["assemble32", "count_action32", "count_into32", "vfork_check32", "apart_add32", "build_count_stub32",
           "build_stub32", "finish32", "jump_bytes32"]

JMP_REL32_SIZE = 5


def assemble32(instructions: list[Instruction], address: int) -> bytes:
    """Encode 32-bit ``instructions`` to run at ``address``."""
    encoder = BlockEncoder(32)
    encoder.add_many(list(instructions))
    return bytes(encoder.encode(address))


def _abs(displ: int, base: Register = Register.NONE) -> MemoryOperand:
    return MemoryOperand(base, Register.NONE, 1, displ & 0xFFFFFFFF, 4)


def count_action32(layout: AreaLayout, counter_address: int, *, flags_live: bool,
                   rseq_offset: int | None = None) -> list[Instruction]:
    """Instructions that add one to the counter of an instance (shard 0 at ``counter_address``);
    with ``rseq_offset``, a vfork child's hit to its apart counter instead (see the module
    docstring)."""
    from .stubs import _Asm

    a = _Asm()
    count_into32(a, layout, counter_address, flags_live=flags_live, rseq_offset=rseq_offset)
    return _aimed32(a)


def count_into32(a, layout: AreaLayout, counter_address: int, *, flags_live: bool, rseq_offset: int | None = None,
                 skip_to: str | None = None) -> None:
    """Append :func:`count_action32` to ``a``. With ``skip_to``, a vfork child's path, once it
    counted apart and restored ``eax`` (and the flags), pushes ``pushfd`` (where ``flags_live``)
    and ``pushad`` and jumps to that label (the latency entry's ``popad``: its call is not
    timed)."""
    R = Register
    a.add(Instruction.create_reg(Code.PUSH_R32, R.EAX))
    if flags_live:
        a.add(Instruction.create(Code.PUSHFD))
    if rseq_offset is not None:  # the fast path: one cmp and one jcc more
        a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _gs(rseq_offset + CPU_ID), VFORK_CPU))
        a.branch(Code.JNE_REL32_32, "count_shard")
        apart_add32(a, layout, counter_address, "count_apart")
        if skip_to is not None:
            if flags_live:
                a.add(Instruction.create(Code.POPFD))
            a.add(Instruction.create_reg(Code.POP_R32, R.EAX))
            if flags_live:
                a.add(Instruction.create(Code.PUSHFD))
            a.add(Instruction.create(Code.PUSHAD))
            a.branch(Code.JMP_REL32_32, skip_to)
        else:
            a.branch(Code.JMP_REL32_32, "count_done")
        a.label("count_shard")
    stride_shift = layout.shard_stride.bit_length() - 1
    for i in (
        Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.ESP),
        Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EAX, layout.shard_shift),
        Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1),
        Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base),
        Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, stride_shift),
    ):
        a.add(i)
    _add64(a, _abs(counter_address, R.EAX), _abs(counter_address + 4, R.EAX), "counted")
    a.label("count_done")
    if flags_live:
        a.add(Instruction.create(Code.POPFD))
    a.add(Instruction.create_reg(Code.POP_R32, R.EAX))


def _gs(displ: int) -> MemoryOperand:
    """``gs:[displ]``: the thread's TLS (glibc's rseq area at ``__rseq_offset``)."""
    return MemoryOperand(Register.NONE, Register.NONE, 1, displ & 0xFFFFFFFF, 4, False, Register.GS)


def vfork_check32(a, rseq_offset: int | None, label: str) -> None:
    """``cmp dword gs:[rseq_offset + 4], VFORK_CPU; je label`` (clobbers the flags): a vfork or
    posix_spawn child marked by the vfork hook goes to ``label``. Nothing without ``rseq_offset``."""
    if rseq_offset is not None:
        a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _gs(rseq_offset + CPU_ID), VFORK_CPU))
        a.branch(Code.JE_REL32_32, label)


def apart_add32(a, layout: AreaLayout, counter_address: int, label: str) -> None:
    """Add one to the apart counter of the instance whose shard 0 is at ``counter_address`` (a
    vfork child's hit; 64 bits in two words as :func:`_add64`, clobbers the flags)."""
    apart = counter_address + layout.apart_offset
    _add64(a, _abs(apart), _abs(apart + 4), label)


def _add64(a, low: MemoryOperand, high: MemoryOperand, label: str) -> None:
    """Add one to the 64-bit counter at ``low``/``high`` (clobbers the flags): ``lock add`` of the
    low word, and only when that carried (once in 2^32) ``lock inc`` of the high word. Each carry
    is made, and added, by exactly one thread: the count is exact; one locked instruction a hit."""
    add = Instruction.create_mem_u32(Code.ADD_RM32_IMM8, low, 1)
    add.has_lock_prefix = True
    a.add(add)
    a.branch(Code.JAE_REL32_32, label)  # no carry
    inc = Instruction.create_mem(Code.INC_RM32, high)
    inc.has_lock_prefix = True
    a.add(inc)
    a.label(label)


def build_count_stub32(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int,
                       rseq_offset: int | None = None) -> Stub:
    """The count stub of a site in 32-bit code, in the slot at ``slot_address``: the action, the
    relocated displaced instructions, the jump back (``rseq_offset``: a vfork child counted apart).

    Raises ValueError when the stub does not fit a slot; RelocationError from the relocator."""
    action = assemble32(count_action32(layout, counter_address, flags_live=not site.flags_dead,
                                       rseq_offset=rseq_offset), slot_address)
    relocated = site.relocate_to(slot_address + len(action), site.address + site.size)
    code = action + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action), relocated=relocated)


def jump_bytes32(site: int, target: int) -> bytes:
    """The 5-byte ``jmp rel32`` from ``site`` to ``target`` in a 32-bit process (reaches all 4 GiB)."""
    rel = (target - (site + JMP_REL32_SIZE)) & 0xFFFFFFFF
    return b"\xe9" + rel.to_bytes(4, "little")


def build_stub32(site: Relocatable, region: "Region", slot: int, action: str, registers: str = "all",
                 targets: "RecordTargets | None" = None, rseq_offset: int | None = None) -> Stub:
    """The stub of ``action`` ("count" or "record", with ``targets``) for a site of a 32-bit
    process in slot ``slot`` of ``region``; at an exit window of a return probe, laid out as the
    x86-64 one (relocated prefix, action, relocated exit: ``eax``/``edx`` hold the value returned).
    ``rseq_offset`` (glibc's, where it registered rseq): a vfork child's hit is counted apart (a
    record stub takes it from ``targets.rseq_offset``).

    Raises RelocationError from the relocator, ValueError if the stub does not fit a slot."""
    at_exit = getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False)
    layout = region.layout
    slot_address = region.slot_address(slot)
    if action == "record":
        assert targets is not None
        if not at_exit:
            return build_record_stub32(site, layout, slot_address, targets, registers)
        return _finish_exit32(site, layout, slot_address, record_action32(layout, targets, registers))
    if not at_exit:
        return build_count_stub32(site, layout, slot_address, region.counter_address(slot), rseq_offset)
    # the flags are dead at a return or a tail call (cdecl keeps none across them)
    return _finish_exit32(site, layout, slot_address, count_action32(layout, region.counter_address(slot),
                                                                     flags_live=False, rseq_offset=rseq_offset))


def _finish_exit32(site: Relocatable, layout: AreaLayout, slot_address: int, action: list[Instruction]) -> Stub:
    """The stub of an exit window: relocated prefix, action, relocated exit instruction (as
    :func:`djprobe.stubs._finish_exit`)."""
    from .x86.relocate import Relocated, relocate

    if getattr(site, "exit_path", ()):  # a path window: the x86-64 layout, in 32-bit forms
        from .stubs import _finish_exit_path

        return _finish_exit_path(site, layout, slot_address, action)
    displaced = list(getattr(site, "displaced"))
    prefix, last = displaced[:-1], displaced[-1]
    pre = relocate(prefix, slot_address, None) if prefix else None
    action_at = slot_address + (len(pre.code) if pre is not None else 0)
    action_code = assemble32(action, action_at)
    exit_code = relocate([last], action_at + len(action_code), None)
    address_map = dict(pre.address_map) if pre is not None else {}
    address_map[last.address] = action_at  # a thread at the exit runs the action first
    code = (pre.code if pre is not None else b"") + action_code + exit_code.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    relocated = Relocated(code, slot_address, address_map, None)
    return Stub(address=slot_address, code=code, action_size=len(action_code), relocated=relocated, action_start=action_at)


# -- records ----------------------------------------------------------------------------------------
#
# The record of a 32-bit hit uses the x86-64 record layout (the consumer, ``trace`` and ``status``
# read one format): 64-bit slots, upper halves zero. The cdecl arguments ``[esp+4]``...``[esp+24]``
# (``esp`` at the probe) go in the argument slots (rdi, rsi, rdx, rcx, r8, r9: what ``trace`` and
# ``regs.arg0``... show), ``eax``/``ebx``/``ebp``/``eflags``/``esp`` in the rax/rbx/rbp/rflags/rsp
# slots, and ``edi``/``esi``/``edx``/``ecx`` in the otherwise unused r15/r14/r13/r12 slots
# (:data:`SLOTS32`; :class:`djprobe.events32.Regs32` names them back).

#: record slot (x86-64 register name) that holds each i386 register
SLOTS32 = {"eax": "rax", "ebx": "rbx", "ecx": "r12", "edx": "r13", "esi": "r14", "edi": "r15", "ebp": "rbp",
           "esp": "rsp", "eflags": "rflags"}
# pushfd; pushad: the frame at esp, in 4-byte words
_PUSHAD = {"edi": 0, "esi": 4, "ebp": 8, "ebx": 16, "edx": 20, "ecx": 24, "eax": 28, "eflags": 32}
_FRAME32 = 36  # bytes pushed: esp at the probe is esp + _FRAME32


def _esp(displ: int) -> MemoryOperand:
    return MemoryOperand(Register.ESP, Register.NONE, 1, displ, 1 if -128 <= displ < 128 else 4)


def _at(base: Register, displ: int) -> MemoryOperand:
    return MemoryOperand(base, Register.NONE, 1, displ, 1 if -128 <= displ < 128 else 4)


def count_and_reserve32(a, layout: AreaLayout, counter: int, headers: int, records: int, stride: int,
                        slots: int, rseq_offset: int | None = None) -> None:
    """Count the hit in a locked shard chosen by ``esp`` (ebx = the shard), then reserve a slot
    in ring ``shard % ring_count`` of the rings at ``headers``/``records`` (``stride`` bytes of
    records each, ``slots`` slots) with ``lock cmpxchg8b`` on its head: esi = the ring's header,
    edi = its records, edx:eax = the position; a full ring goes to ``full``. With ``rseq_offset``,
    a vfork child (``cpu_id`` VFORK_CPU) goes to ``apart`` first, counting nothing (the caller
    counts it apart there: :func:`apart_add32`)."""
    R = Register
    add = a.add
    vfork_check32(a, rseq_offset, "apart")
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.ESP))
    add(Instruction.create_reg_u32(Code.SHR_RM32_IMM8, R.EAX, layout.shard_shift))
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.locked_shards - 1))
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EAX, layout.locked_shard_base))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EAX))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, layout.shard_stride.bit_length() - 1))
    _add64(a, _abs(counter, R.EAX), _abs(counter + 4, R.EAX), "counted")
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EBX, layout.ring_count - 1))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EBX))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, 7))  # RING_HEADER_SIZE == 128
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ESI, _abs(headers, R.EAX)))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EBX, stride.bit_length() - 1))
    add(Instruction.create_reg_mem(Code.LEA_R32_M, R.EDI, _abs(records, R.EBX)))
    # reserve: while head - tail < slots: cmpxchg8b head -> head + 1
    a.label("retry")
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _at(R.ESI, 0)))
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _at(R.ESI, 4)))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EAX))
    add(Instruction.create_reg_mem(Code.SUB_R32_RM32, R.ECX, _at(R.ESI, RING_TAIL)))
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.ECX, slots))
    a.branch(Code.JAE_REL32_32, "full")
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EAX))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EDX))
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.EBX, 1))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM8, R.ECX, 0))
    cas = Instruction.create_mem(Code.CMPXCHG8B_M64, _at(R.ESI, 0))
    cas.has_lock_prefix = True
    add(cas)
    a.branch(Code.JNE_REL32_32, "retry")


def record_action32(layout: AreaLayout, where: "RecordTargets", registers: str = "all") -> list[Instruction]:
    """Instructions that count the hit and write an event record of a 32-bit thread (see
    :func:`djprobe.stubs.record_action`; ``lock cmpxchg8b`` reserves the 64-bit ring head)."""
    from .area import ARG_REGISTERS, ARGS_RECORD_SIZE, RECORD_SIZE, REGISTER_NAMES, RING_HEARTBEAT, RING_TAIL, RING_WAITED
    from .stubs import _Asm

    R = Register
    a = _Asm()

    def add(i: Instruction) -> None:
        a.add(i)

    add(Instruction.create(Code.PUSHFD))
    add(Instruction.create(Code.PUSHAD))
    # count (esp-sharded, as the count stub), then reserve a slot in one of the rings
    args_only = registers != "all"
    headers, records = (where.args_ring_headers, where.args_records) if args_only else (where.ring_headers, where.records)
    stride = layout.args_ring_stride if args_only else layout.ring_stride
    record_size = ARGS_RECORD_SIZE if args_only else RECORD_SIZE
    count_and_reserve32(a, layout, where.counter, headers, records, stride, layout.ring_slots, where.rseq_offset)
    # ebp:ebx = pos; edi = the record
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBP, R.EAX))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EDX))
    add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EAX, layout.ring_slots - 1))
    add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.EAX, record_size.bit_length() - 1))
    add(Instruction.create_reg_reg(Code.ADD_R32_RM32, R.EDI, R.EAX))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, 8), where.instance))
    gs0 = MemoryOperand(R.NONE, R.NONE, 1, 0, 4, False, R.GS)
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, gs0))  # the thread pointer (TCB self pointer)
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 16), R.ECX))
    add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, 20), 0))
    if where.tid_offset is not None:
        tid = MemoryOperand(R.NONE, R.NONE, 1, where.tid_offset, 4, False, R.GS)
        add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, tid))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 12), R.ECX))
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 24), R.EAX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 28), R.EDX))

    def store(slot_offset: int, source: MemoryOperand | None) -> None:
        """The 64-bit record slot at edi + slot_offset = the dword at ``source`` (None: esp at the probe)."""
        if source is None:
            add(Instruction.create_reg_mem(Code.LEA_R32_M, R.ECX, _esp(_FRAME32)))
        else:
            add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.ECX, source))
        add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, slot_offset), R.ECX))
        add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, slot_offset + 4), 0))

    stack_args = [_esp(_FRAME32 + 4 * (i + 1)) for i in range(len(ARG_REGISTERS))]
    if args_only:  # the six cdecl arguments in ARG_REGISTERS order, then eax in the rax slot
        for j, source in enumerate(stack_args):
            store(32 + 8 * j, source)
        store(32 + 8 * len(ARG_REGISTERS), _esp(_PUSHAD["eax"]))
    else:
        slots = {name: 32 + 8 * i for i, name in enumerate(REGISTER_NAMES)}
        for name, source in zip(ARG_REGISTERS, stack_args):
            store(slots[name], source)
        for reg, slot in SLOTS32.items():
            store(slots[slot], None if reg == "esp" else _esp(_PUSHAD[reg]))
        for unused in ("r11", "r10"):
            add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, slots[unused]), 0))
            add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _at(R.EDI, slots[unused] + 4), 0))
    # commit: seq = pos + 1, its low word written last
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.EBP, 1))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM8, R.EBX, 0))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 4), R.EBX))
    add(Instruction.create_mem_reg(Code.MOV_RM32_R32, _at(R.EDI, 0), R.EBP))
    a.branch(Code.JMP_REL32_32, "done")
    if where.rseq_offset is not None:
        a.label("apart")  # a vfork/posix_spawn child before its exec: counted apart, no record
        apart_add32(a, layout, where.counter, "counted_apart")
        a.branch(Code.JMP_REL32_32, "done")
    a.label("full")
    if where.wait_cycles:
        _wait_for_room32(a, layout, where.wait_cycles, RING_HEARTBEAT, RING_TAIL, RING_WAITED)
    a.label("drop")
    _add64(a, _abs(where.drops), _abs(where.drops + 4), "dropped")
    a.label("done")
    add(Instruction.create(Code.POPAD))
    add(Instruction.create(Code.POPFD))
    return _aimed32(a)


def _aimed32(a) -> list[Instruction]:
    """The instructions of a :class:`djprobe.stubs._Asm` with 32-bit branch targets."""
    for instruction, label in a._fixups:
        instruction.near_branch32 = a._labels[label]
    return a.ins


def _wait_for_room32(a, layout: AreaLayout, wait_cycles: int, heartbeat: int, tail: int, waited: int) -> None:
    """The ring at esi is full: wait for room as :func:`djprobe.stubs._wait_for_room` does, with
    64-bit TSC arithmetic in register pairs (start in ebp:ebx, deadline in [esp]:ecx)."""
    R = Register
    lo, hi = wait_cycles & 0xFFFFFFFF, wait_cycles >> 32

    def add(i: Instruction) -> None:
        a.add(i)

    def waited_add() -> None:
        add(Instruction.create(Code.RDTSC))
        add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.EAX, R.EBX))
        add(Instruction.create_reg_reg(Code.SBB_R32_RM32, R.EDX, R.EBP))
        i = Instruction.create_mem_reg(Code.ADD_RM32_R32, _at(R.ESI, waited), R.EAX)
        i.has_lock_prefix = True
        add(i)
        i = Instruction.create_mem_reg(Code.ADC_RM32_R32, _at(R.ESI, waited + 4), R.EDX)
        i.has_lock_prefix = True
        add(i)

    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EAX))  # when the wait began
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBP, R.EDX))
    add(Instruction.create_reg_mem(Code.SUB_R32_RM32, R.EAX, _at(R.ESI, heartbeat)))
    add(Instruction.create_reg_mem(Code.SBB_R32_RM32, R.EDX, _at(R.ESI, heartbeat + 4)))
    # no drain for longer than the timeout (now - heartbeat > wait_cycles, signed: a heartbeat
    # written on another CPU just now may be a few cycles ahead of this one's TSC): drop
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EDX, hi))
    a.branch(Code.JG_REL32_32, "drop")
    a.branch(Code.JL_REL32_32, "recent")
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, lo))
    a.branch(Code.JA_REL32_32, "drop")
    a.label("recent")
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.ECX, R.EBX))  # deadline = start + wait
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.ECX, lo))
    add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EBP))
    add(Instruction.create_reg_u32(Code.ADC_RM32_IMM32, R.EAX, hi))
    add(Instruction.create_reg(Code.PUSH_R32, R.EAX))  # deadline's high word at [esp]
    a.label("wait")
    add(Instruction.create(Code.PAUSE))
    add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _at(R.ESI, 0)))
    add(Instruction.create_reg_mem(Code.SUB_R32_RM32, R.EAX, _at(R.ESI, tail)))
    add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EAX, layout.ring_slots))
    a.branch(Code.JB_REL32_32, "room")
    add(Instruction.create(Code.RDTSC))
    add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.EDX, _esp(0)))
    a.branch(Code.JB_REL32_32, "wait")
    a.branch(Code.JA_REL32_32, "timeout")
    add(Instruction.create_reg_reg(Code.CMP_R32_RM32, R.EAX, R.ECX))
    a.branch(Code.JB_REL32_32, "wait")
    a.label("timeout")
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.ESP, 4))
    waited_add()
    a.branch(Code.JMP_REL32_32, "drop")
    a.label("room")
    add(Instruction.create_reg_u32(Code.ADD_RM32_IMM8, R.ESP, 4))
    waited_add()
    a.branch(Code.JMP_REL32_32, "retry")


def build_record_stub32(site: Relocatable, layout: AreaLayout, slot_address: int, where: "RecordTargets",
                        registers: str = "all") -> Stub:
    """The record stub of a site in 32-bit code (see :func:`build_count_stub32`)."""
    action = assemble32(record_action32(layout, where, registers), slot_address)
    relocated = site.relocate_to(slot_address + len(action), site.address + site.size)
    code = action + relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(action), relocated=relocated)


def finish32(site: Relocatable, layout: AreaLayout, slot_address: int, action: list[Instruction]) -> Stub:
    """The stub of an entry site in 32-bit code: ``action``, then the relocated displaced
    instructions and the jump back (:func:`djprobe.stubs._finish` for 32-bit code; custom stubs
    such as the loader hook's).

    Raises ValueError when the stub does not fit a slot; RelocationError from the relocator."""
    code = assemble32(action, slot_address)
    relocated = site.relocate_to(slot_address + len(code), site.address + site.size)
    code += relocated.code
    if len(code) > layout.slot_size:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    return Stub(address=slot_address, code=code, action_size=len(code) - len(relocated.code), relocated=relocated)
