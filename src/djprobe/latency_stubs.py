"""Stub code of latency probes: the entry remembers when a call began, each exit adds the time
the call took into a log2 histogram of nanoseconds. See :mod:`djprobe.latency` for the design.

Both actions key a call in flight by ``key = rsp ^ (tag << 48)``: ``rsp`` is the same at the
entry (pointing at the return address) and at every exit of the same call (``ret`` or tail-call
``jmp``); threads have distinct stacks, recursion has distinct ``rsp``; ``tag`` (16 bits, never
reused by two registrations of one area while its table may hold entries of the older one)
keeps a function and the function it tail-calls (same ``rsp``) apart, and makes whatever an
earlier registration left in the table unmatchable. User-space stacks lie below 2**47, so the
key is unique.

The table entry of a key is ``table + 16 * (key * 0x9E3779B97F4A7C15 >> (64 - log2(slots)))``,
or its neighbour (index xor 1, the same cache line) when a call in flight holds the first: two
calls collide only if both are taken. An entry holds {key, start TSC} and is written and read whole with one aligned 16-byte SSE access
(``movdqa``: atomic on processors with AVX, checked by :func:`latency_supported`), so a reader
never sees the key of one call with the start of another: no lock, no ``cmpxchg``.

* **entry**: counts the call (the instance counter, per-CPU with rseq like the count stub), reads
  the TSC, and stores {key, TSC} in the first entry that is free (key 0) or holds its own key (an
  abandoned call of this function on this stack: overwritten); a stale copy of its key left in
  the neighbour is freed. If both hold other calls, the first one's call loses its sample: the
  collision is counted.
* **exit**: loads the entry, then its neighbour; if one holds its key, frees it (stores 0 in the key), converts the TSC
  difference to nanoseconds (``ticks * mul >> 32``, ``mul`` from the tracer's calibration), picks
  the bucket ``bsr(2 * ns + 1)`` (0 for 0 ns, b for [2**(b-1), 2**b)) and adds {1, ns} to the
  bucket's {count, sum} pair: in the current CPU's shard with one plain 16-byte store (the commit
  of an rseq critical section, as the count stub's ``inc``), or with two ``lock`` adds in a shard
  chosen by ``rsp`` where rseq cannot be used (as the locked counter shards). Otherwise the exit is *unpaired* (its entry ran before the probe existed, or lost its
  entry to a collision) and is counted as such, never measured.

Registers: the actions save and restore everything they touch (``rax``, ``rcx``, ``rdx``,
``r8``, the low 128 bits of ``xmm8``) in the red zone, dead at a function's entry and at its exit
(SysV), but a compiler's inter-procedural register allocation may keep a caller's value in a
call-clobbered register; the flags are not saved (dead at both places). Addresses of the latency
block are absolute (``mov r64, imm64``): exit stubs may sit in another area than the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .area import LATENCY_ENTRY_SIZE, HIST_WORDS, LATENCY_MISC_WORDS, MISC_COLLISIONS, MISC_UNPAIRED, AreaLayout
from .rseq import CPU_ID, RSEQ_CS, RSEQ_SIG, VFORK_CPU
from .stubs import RSEQ_CS_SIZE, PerCpu, Relocatable, Stub, _Asm, _finish, _fs, _mem, _rsp_slot, count_action, rseq_descriptor, stack_hash

__all__ = ["LatencyTargets", "GOLDEN", "TAG_SHIFT", "latency_key", "table_index", "build_latency_entry_stub",
           "build_latency_exit_stub", "build_latency_both_stub", "latency_supported"]

GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: the high bits of key * GOLDEN
TAG_SHIFT = 48
MUL_SHIFT = 32  # ns = ticks * mul >> 32
_MASK64 = (1 << 64) - 1

R = Register


@dataclass(frozen=True)
class LatencyTargets:
    """What a latency stub needs: where the block of its area is, its function's tag and slot."""

    table: int  # address of the in-flight table (16-byte aligned)
    slots: int  # entries in it (a power of two)
    misc: int  # address of this function's counters (collisions, unpaired exits)
    hist: int  # address of shard 0 of this function's histogram block
    shard_stride: int  # bytes between its shards
    cpu_shards: int  # shards [0, cpu_shards): one per CPU
    locked_shards: int  # shards [cpu_shards, cpu_shards + locked_shards): lock adds, by rsp (a power of two)
    shard_shift: int  # locked shard = cpu_shards + (rsp >> shard_shift) % locked_shards
    tag: int  # 1 .. 0xFFFF
    mul: int  # ns = ticks * mul >> 32

    @classmethod
    def of(cls, layout: AreaLayout, data_address: int, function: int, tag: int, ns_per_tick: float) -> "LatencyTargets":
        if not 0 < tag < 1 << 16:
            raise ValueError(f"latency tag {tag} out of range")
        return cls(
            table=data_address + layout.latency_offset,
            slots=layout.latency_slots,
            misc=data_address + layout.latency_misc_offset + function * LATENCY_MISC_WORDS * 8,
            hist=data_address + layout.hist_offset + function * HIST_WORDS * 8,
            shard_stride=layout.hist_shard_stride,
            cpu_shards=layout.latency_shards // 2,
            locked_shards=layout.latency_shards - layout.latency_shards // 2,
            shard_shift=layout.shard_shift,
            tag=tag,
            mul=max(1, round(ns_per_tick * (1 << MUL_SHIFT))),
        )


def latency_key(rsp: int, tag: int) -> int:
    """The key of a call in flight (as the stubs compute it)."""
    return (rsp ^ (tag << TAG_SHIFT)) & _MASK64


def table_index(key: int, slots: int) -> int:
    """The table entry of ``key`` (as the stubs compute it)."""
    return ((key * GOLDEN) & _MASK64) >> (64 - (slots.bit_length() - 1))


def _save(a: _Asm) -> None:
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-8), R.RAX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-16), R.RCX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-24), R.RDX))
    a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, _rsp_slot(-32), R.R8))
    a.add(Instruction.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _rsp_slot(-48), R.XMM8))


def _restore(a: _Asm) -> None:
    a.add(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM8, _rsp_slot(-48)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.R8, _rsp_slot(-32)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _rsp_slot(-24)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(-16)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(-8)))


def _key_and_entry(a: _Asm, t: LatencyTargets) -> None:
    """rcx = key, rdx = address of its table entry (rax clobbered)."""
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RSP))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, t.tag << TAG_SHIFT))
    a.add(Instruction.create_reg_reg(Code.XOR_R64_RM64, R.RCX, R.RAX))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, GOLDEN))
    a.add(Instruction.create_reg_reg(Code.IMUL_R64_RM64, R.RAX, R.RCX))
    a.add(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, R.RAX, 64 - (t.slots.bit_length() - 1)))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RAX, 4))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RDX, t.table))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.RAX))


def _locked(instruction: Instruction) -> Instruction:
    instruction.has_lock_prefix = True
    return instruction


def _rdtsc_rax(a: _Asm) -> None:
    """rax = TSC (rdx clobbered)."""
    a.add(Instruction.create(Code.RDTSC))
    a.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, R.RDX, 32))
    a.add(Instruction.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX))


def entry_action(a: _Asm, t: LatencyTargets) -> None:
    """Append the entry's latency action to ``a`` (after its count action)."""
    _save(a)
    _rdtsc_rax(a)
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RAX))  # r8 = start
    _key_and_entry(a, t)
    a.add(Instruction.create_reg_reg(Code.MOVQ_XMM_RM64, R.XMM8, R.RCX))
    a.add(Instruction.create_reg_reg_u32(Code.PINSRQ_XMM_RM64_IMM8, R.XMM8, R.R8, 1))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RDX)))  # the key there now
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JE_REL32_64, "lat_claim")  # free
    a.add(Instruction.create_reg_reg(Code.CMP_RM64_R64, R.RAX, R.RCX))
    a.branch(Code.JE_REL32_64, "lat_claim")  # this function, this stack: that call was abandoned
    # Taken by another call in flight: the neighbour entry (same cache line), on the same terms.
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RDX))
    a.add(Instruction.create_reg_u32(Code.XOR_RM64_IMM8, R.R8, LATENCY_ENTRY_SIZE))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.R8)))
    a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    a.branch(Code.JE_REL32_64, "lat_claim_other")
    a.add(Instruction.create_reg_reg(Code.CMP_RM64_R64, R.RAX, R.RCX))
    a.branch(Code.JE_REL32_64, "lat_claim_other")
    # Both taken: the call in the first entry loses its sample to this one (counted).
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, t.misc + 8 * MISC_COLLISIONS))
    a.add(_locked(Instruction.create_mem(Code.INC_RM64, _mem(R.RAX))))
    a.label("lat_claim")
    a.add(Instruction.create_mem_reg(Code.MOVDQA_XMMM128_XMM, _mem(R.RDX), R.XMM8))  # {key, start}, atomic
    # An abandoned call of ours left in the neighbour would pair with this call's exit if another
    # call took the first entry meanwhile: free it (only this thread ever writes this key).
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RDX))
    a.add(Instruction.create_reg_u32(Code.XOR_RM64_IMM8, R.R8, LATENCY_ENTRY_SIZE))
    a.add(Instruction.create_mem_reg(Code.CMP_RM64_R64, _mem(R.R8), R.RCX))
    a.branch(Code.JNE_REL32_64, "lat_done")
    a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _mem(R.R8), 0))
    a.branch(Code.JMP_REL32_64, "lat_done")
    a.label("lat_claim_other")
    a.add(Instruction.create_mem_reg(Code.MOVDQA_XMMM128_XMM, _mem(R.R8), R.XMM8))
    a.label("lat_done")
    a.add(Instruction.create_reg_mem(Code.MOVDQU_XMM_XMMM128, R.XMM8, _rsp_slot(-48)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.R8, _rsp_slot(-32)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _rsp_slot(-24)))
    a.label(ENTRY_SKIP)  # a vfork child's count (stubs.count_action's skip_to): rax, rcx restored here
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _rsp_slot(-16)))
    a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _rsp_slot(-8)))


#: The label of the entry action where the count of a vfork child (``cpu_id`` VFORK_CPU) goes:
#: its call is counted apart and not timed.
ENTRY_SKIP = "lat_entry_skip"


def exit_action(t: LatencyTargets, per_cpu: PerCpu | None = None) -> _Asm:
    """The exit's latency action (see the module docstring); with ``per_cpu``, the sample goes
    into this CPU's shard with a plain store inside an rseq critical section."""
    a = _Asm()
    _save(a)
    _key_and_entry(a, t)
    a.add(Instruction.create_reg_mem(Code.MOVDQA_XMM_XMMM128, R.XMM8, _mem(R.RDX)))  # atomic
    a.add(Instruction.create_reg_reg(Code.MOVQ_RM64_XMM, R.RAX, R.XMM8))
    a.add(Instruction.create_reg_reg(Code.CMP_RM64_R64, R.RAX, R.RCX))
    a.branch(Code.JE_REL32_64, "lat_paired")
    a.add(Instruction.create_reg_u32(Code.XOR_RM64_IMM8, R.RDX, LATENCY_ENTRY_SIZE))  # the neighbour
    a.add(Instruction.create_reg_mem(Code.MOVDQA_XMM_XMMM128, R.XMM8, _mem(R.RDX)))
    a.add(Instruction.create_reg_reg(Code.MOVQ_RM64_XMM, R.RAX, R.XMM8))
    a.add(Instruction.create_reg_reg(Code.CMP_RM64_R64, R.RAX, R.RCX))
    a.branch(Code.JNE_REL32_64, "lat_unpaired")
    a.label("lat_paired")
    a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, _mem(R.RDX), 0))  # free the entry
    a.add(Instruction.create_reg_reg_u32(Code.PEXTRQ_RM64_XMM_IMM8, R.RCX, R.XMM8, 1))  # start
    _rdtsc_rax(a)
    a.add(Instruction.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.RCX))
    a.branch(Code.JNS_REL32_64, "lat_ticks")
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX))  # a TSC that went back: 0
    a.label("lat_ticks")
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RDX, t.mul))
    a.add(Instruction.create_reg(Code.MUL_RM64, R.RDX))  # rdx:rax = ticks * mul
    a.add(Instruction.create_reg_reg_u32(Code.SHRD_RM64_R64_IMM8, R.RAX, R.RDX, MUL_SHIFT))  # rax = ns
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RCX, _mem(R.RAX, 1, R.RAX, 1)))
    a.add(Instruction.create_reg_reg(Code.BSR_R64_RM64, R.RCX, R.RCX))  # bucket
    a.add(Instruction.create_reg_u32(Code.SHL_RM32_IMM8, R.ECX, 4))  # its {count, sum} pair
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R8, t.hist))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R8, R.RCX))  # r8 = the pair in shard 0
    if per_cpu is not None:
        # One plain 16-byte store (the commit) of {count + 1, sum + ns} in this CPU's shard,
        # inside an rseq critical section (restarted from "arm" if the thread is preempted,
        # migrated or signalled in it). Left alone, as by the count stub, when the program's own
        # critical section is armed or the CPU has no shard: then the locked shards.
        rseq_cs = _fs(per_cpu.rseq_offset + RSEQ_CS)
        a.add(Instruction.create_mem_u32(Code.CMP_RM64_IMM8, rseq_cs, 0))
        a.branch(Code.JNE_REL32_64, "locked")
        a.label("arm")
        a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDX, MemoryOperand(R.RIP, displ=per_cpu.descriptor)))
        a.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, rseq_cs, R.RDX))
        a.label("cs_start")
        a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _fs(per_cpu.rseq_offset + CPU_ID)))
        a.add(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, R.EDX, t.cpu_shards))
        a.branch(Code.JAE_REL32_64, "disarm")
        a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, R.EDX, R.EDX, t.shard_stride))
        a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.R8))  # rdx = the pair on this CPU
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _mem(R.RDX)))
        a.add(Instruction.create_reg_u32(Code.ADD_RM64_IMM8, R.RCX, 1))
        a.add(Instruction.create_reg_reg(Code.MOVQ_XMM_RM64, R.XMM8, R.RCX))
        a.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _mem(R.RDX, 8)))
        a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.RCX, R.RAX))
        a.add(Instruction.create_reg_reg_u32(Code.PINSRQ_XMM_RM64_IMM8, R.XMM8, R.RCX, 1))
        a.add(Instruction.create_mem_reg(Code.MOVDQA_XMMM128_XMM, _mem(R.RDX), R.XMM8))  # the commit
        a.label("cs_end")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
        a.branch(Code.JMP_REL32_64, "lat_done")
        a.add(Instruction.create_declare_byte(b"\x0f\xb9\x3d" + RSEQ_SIG.to_bytes(4, "little")))
        a.label("abort")
        a.branch(Code.JMP_REL32_64, "arm")
        a.label("disarm")
        a.add(Instruction.create_mem_u32(Code.MOV_RM64_IMM32, rseq_cs, 0))
        a.label("locked")
    stack_hash(a, R.RDX, R.EDX, t.shard_shift)
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.EDX, t.locked_shards - 1))
    a.add(Instruction.create_reg_u32(Code.ADD_RM32_IMM32, R.EDX, t.cpu_shards))
    a.add(Instruction.create_reg_reg_u32(Code.IMUL_R32_RM32_IMM32, R.EDX, R.EDX, t.shard_stride))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R8, R.RDX))
    a.add(_locked(Instruction.create_mem(Code.INC_RM64, _mem(R.R8))))
    a.add(_locked(Instruction.create_mem_reg(Code.ADD_RM64_R64, _mem(R.R8, 8), R.RAX)))
    a.branch(Code.JMP_REL32_64, "lat_done")
    a.label("lat_unpaired")
    if per_cpu is not None:  # a vfork child's exit (its entry was not timed): not an unpaired exit
        a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM32, _fs(per_cpu.rseq_offset + CPU_ID), VFORK_CPU))
        a.branch(Code.JE_REL32_64, "lat_done")
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, t.misc + 8 * MISC_UNPAIRED))
    a.add(_locked(Instruction.create_mem(Code.INC_RM64, _mem(R.RAX))))
    a.label("lat_done")
    _restore(a)
    return a


def build_latency_entry_stub(
    site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int, targets: LatencyTargets,
    rseq_offset: int | None = None,
) -> Stub:
    """The stub at a latency probe's function entry: count the call (per CPU with rseq when
    ``rseq_offset`` is given, as the count stub does), then remember when it began."""
    from iced_x86 import Decoder

    if not site.at_entry:
        raise ValueError("a latency entry stub goes at the first byte of a function")
    descriptor = slot_address + layout.slot_size - RSEQ_CS_SIZE
    per_cpu = None if rseq_offset is None else PerCpu(rseq_offset, descriptor)
    a = count_action(layout, counter_address, red_zone_live=False, flags_live=False, per_cpu=per_cpu,
                     skip_to=ENTRY_SKIP if per_cpu is not None else None)
    entry_action(a, targets)
    if per_cpu is None:
        return _finish(site, layout, slot_address, a.instructions())
    stub = _finish(site, layout, slot_address, a.instructions(), reserve=RSEQ_CS_SIZE)
    ips = [insn.ip for insn in Decoder(64, stub.code[: stub.action_size], ip=slot_address)]
    start, end, abort = (ips[a.index_of(name)] for name in ("cs_start", "cs_end", "abort"))
    padding = b"\xcc" * (layout.slot_size - RSEQ_CS_SIZE - len(stub.code))
    code = stub.code + padding + rseq_descriptor(start, end, abort)
    return Stub(address=slot_address, code=code, action_size=stub.action_size, relocated=stub.relocated)


def build_latency_exit_stub(site: Relocatable, layout: AreaLayout, slot_address: int, targets: LatencyTargets,
                            rseq_offset: int | None = None) -> Stub:
    """The stub of one exit window of a latency probe (laid out as a return probe's); per-CPU
    histogram shards through glibc's rseq area at ``fs:[rseq_offset]`` when given."""
    from iced_x86 import Decoder

    if getattr(site, "exit", None) is None or getattr(site, "exit_early", False):
        raise ValueError("a latency exit stub goes at an exit window that acts at its exit")
    descriptor = slot_address + layout.slot_size - RSEQ_CS_SIZE
    per_cpu = None if rseq_offset is None else PerCpu(rseq_offset, descriptor)
    a = exit_action(targets, per_cpu)
    stub = _finish(site, layout, slot_address, a.instructions())
    if per_cpu is None:
        return stub
    if len(stub.code) > layout.slot_size - RSEQ_CS_SIZE:
        raise ValueError(f"stub of {len(stub.code)} bytes does not fit a {layout.slot_size}-byte slot")
    at, _ = stub.action_range
    offset = at - slot_address
    ips = [insn.ip for insn in Decoder(64, stub.code[offset: offset + stub.action_size], ip=at)]
    start, end, abort = (ips[a.index_of(name)] for name in ("cs_start", "cs_end", "abort"))
    padding = b"\xcc" * (layout.slot_size - RSEQ_CS_SIZE - len(stub.code))
    code = stub.code + padding + rseq_descriptor(start, end, abort)
    return Stub(address=slot_address, code=code, action_size=stub.action_size, relocated=stub.relocated,
                action_start=stub.action_start)


def build_latency_both_stub(
    site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int, targets: LatencyTargets,
    rseq_offset: int | None = None, exit_window: Relocatable | None = None,
) -> Stub:
    """The stub of a function whose entry window ends with one of its exits (straight-line code
    before it: ``lea eax,[rdi+1]; ret``, ``xor esi,esi; jmp f``): the entry action, the relocated
    instructions before the exit, the exit action, the relocated exit. With an ``exit_window``
    that is a path window whose way in ends the entry window (``test rdi,rdi; je <ret>``): the
    entry action, then the path-window stub of the entry window (see ``stubs._finish_exit_path``:
    its branches into the exit block aimed at a copy of the block, the exit action, the exit).
    Both rseq descriptors sit at the end of the slot (the entry's last, the exit's before it).
    The action range spans both actions and the code between them: a thread anywhere there at
    removal runs out of the stub by itself."""
    from dataclasses import replace

    from iced_x86 import Decoder

    from .stubs import _finish_exit_path, assemble
    from .x86.relocate import Relocated, relocate

    if not site.at_entry:
        raise ValueError("a latency entry stub goes at the first byte of a function")
    displaced = list(getattr(site, "displaced"))
    prefix, last = displaced[:-1], displaced[-1]
    entry_desc = slot_address + layout.slot_size - RSEQ_CS_SIZE
    exit_desc = entry_desc - RSEQ_CS_SIZE
    per_entry = None if rseq_offset is None else PerCpu(rseq_offset, entry_desc)
    per_exit = None if rseq_offset is None else PerCpu(rseq_offset, exit_desc)
    a = count_action(layout, counter_address, red_zone_live=False, flags_live=False, per_cpu=per_entry,
                     skip_to=ENTRY_SKIP if per_entry is not None else None)
    entry_action(a, targets)
    entry_code = assemble(a.instructions(), slot_address)
    at = slot_address + len(entry_code)
    b = exit_action(targets, per_exit)
    if exit_window is not None and getattr(exit_window, "exit_path", ()):
        merged = replace(site, exit=exit_window.exit, exit_path=exit_window.exit_path,  # type: ignore[type-var]
                         exit_via=exit_window.exit_via)
        rest = _finish_exit_path(merged, layout, at, b.instructions())
        code = entry_code + rest.code
        address_map = dict(rest.relocated.address_map)
        exit_at = rest.action_start
        exit_code = rest.code[exit_at - at: exit_at - at + rest.action_size]
    else:
        pre = relocate(prefix, at, None) if prefix else None
        address_map = dict(pre.address_map) if pre is not None else {}
        exit_at = at + (len(pre.code) if pre is not None else 0)
        exit_code = assemble(b.instructions(), exit_at)
        address_map[last.address] = exit_at  # a thread at the exit runs the exit action first
        last_code = relocate([last], exit_at + len(exit_code), None).code
        code = entry_code + (pre.code if pre is not None else b"") + exit_code + last_code
    reserve = 2 * RSEQ_CS_SIZE if rseq_offset is not None else 0
    if len(code) > layout.slot_size - reserve:
        raise ValueError(f"stub of {len(code)} bytes does not fit a {layout.slot_size}-byte slot")
    if rseq_offset is not None:
        descriptors = []
        for asm, piece, base in ((b, exit_code, exit_at), (a, entry_code, slot_address)):
            ips = [insn.ip for insn in Decoder(64, piece, ip=base)]
            descriptors.append(rseq_descriptor(*(ips[asm.index_of(n)] for n in ("cs_start", "cs_end", "abort"))))
        code = code + b"\xcc" * (layout.slot_size - reserve - len(code)) + b"".join(descriptors)
    relocated = Relocated(code, slot_address, address_map, None)
    return Stub(address=slot_address, code=code, action_size=exit_at + len(exit_code) - slot_address,
                relocated=relocated)


def latency_supported() -> str | None:
    """Why latency probes cannot run on this machine (the tracer's, which is the target's), or
    None: the table is read and written with 16-byte SSE accesses, atomic only where the CPU has
    AVX, and uses ``pinsrq``/``pextrq`` (SSE4.1)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    missing = [f for f in ("avx", "sse4_1") if f not in flags]
                    return f"the CPU lacks {', '.join(missing)}" if missing else None
    except OSError as exc:
        return f"cannot read /proc/cpuinfo: {exc}"
    return "no CPU flags in /proc/cpuinfo"
