"""The apart counter of vfork/posix_spawn children (djprobe.vforks): its row in the layout, what
the view reads, and where the stubs check the marker (the fallback path only)."""

from __future__ import annotations

import struct

import pytest
from iced_x86 import Code, Decoder, Instruction, Mnemonic, Register

from djprobe.area import VERSION, AreaHeader, AreaLayout, AreaView
from djprobe.rseq import VFORK_CPU
from djprobe.stubs import PerCpu, RecordTargets, _record_asm, assemble, count_action
from djprobe.vforks import vfork_action

SLOT = 0x4000_0000
COUNTER = 0x5000_0000


@pytest.mark.parametrize("layout", [AreaLayout(), AreaLayout.for_counting(), AreaLayout(n_shards=2, max_instances=16)])
def test_apart_row_after_the_shards_before_the_drops(layout):
    assert layout.apart_offset == layout.n_shards * layout.shard_stride
    assert layout.counters_offset + layout.apart_offset + layout.shard_stride <= layout.drops_offset
    view = AreaView(bytearray(layout.data_size), layout)
    i = min(5, layout.max_instances - 1)
    at = layout.counter_address(0, i) + layout.apart_offset  # data part at 0: the offset itself
    struct.pack_into("<Q", view.buffer, at, 7)
    struct.pack_into("<Q", view.buffer, layout.counter_address(0, i), 3)  # shard 0
    assert (view.count(i), view.apart(i), int(view.counts()[i])) == (3, 7, 3)
    view.reset_count(i)
    assert (view.count(i), view.apart(i)) == (0, 0)
    view.release()


def test_header_of_this_version_only():
    layout = AreaLayout.for_counting()
    raw = AreaHeader(layout, 1, 2, 0x10000, 0x10000 + layout.code_size).pack()
    assert AreaHeader.unpack(raw).layout == layout
    older = raw[:8] + struct.pack("<I", VERSION - 1) + raw[12:]
    with pytest.raises(ValueError, match="version"):
        AreaHeader.unpack(older)


def _marker_checks(code: bytes, ip: int) -> list[int]:
    return [i.ip for i in Decoder(64, code, ip=ip) if i.code == Code.CMP_RM32_IMM32 and i.immediate(1) == VFORK_CPU]


@pytest.mark.parametrize("red_zone_live,flags_live", [(True, True), (False, False)])
def test_count_checks_the_marker_after_its_critical_section_only(red_zone_live, flags_live):
    layout = AreaLayout()
    a = count_action(layout, COUNTER, red_zone_live=red_zone_live, flags_live=flags_live,
                     per_cpu=PerCpu(-0x60, SLOT + layout.slot_size - 32))
    code = assemble(a.instructions(), SLOT)
    ips = [i.ip for i in Decoder(64, code, ip=SLOT)]
    (check,) = _marker_checks(code, SLOT)
    assert check > ips[a.index_of("cs_end")] and check >= ips[a.index_of("disarm")]
    apart = [i for i in Decoder(64, code, ip=SLOT) if i.mnemonic == Mnemonic.INC and i.memory_displacement == layout.apart_offset]
    assert len(apart) == 1 and apart[0].has_lock_prefix
    locked = count_action(layout, COUNTER, red_zone_live=red_zone_live, flags_live=flags_live, per_cpu=None)
    assert _marker_checks(assemble(locked.instructions(), SLOT), SLOT) == []  # no rseq: nothing to check


def test_record_checks_the_marker_on_its_fallback_or_locked_path():
    layout = AreaLayout()
    where = RecordTargets(COUNTER, COUNTER + 0x1000, COUNTER + 0x2000, COUNTER + 0x3000, COUNTER + 0x4000,
                          COUNTER + 0x5000, 3, rseq_offset=-0x60)
    per_cpu = _record_asm(layout, where, "all", (SLOT + 0x700, SLOT + 0x720))
    code = assemble(per_cpu.instructions(), SLOT)
    ips = [i.ip for i in Decoder(64, code, ip=SLOT)]
    checks = _marker_checks(code, SLOT)
    assert len(checks) == 1 and checks[0] > ips[per_cpu.index_of("count_end")]
    shared = _record_asm(layout, where, "all", None)  # a shared stub's record: locked only
    assert len(_marker_checks(assemble(shared.instructions(), SLOT), SLOT)) == 1
    plain = _record_asm(layout, RecordTargets(COUNTER, 0, 0, 0, 0, 0, 3), "all", None)
    assert _marker_checks(assemble(plain.instructions(), SLOT), SLOT) == []


APART = 0x5000_8000


@pytest.mark.parametrize("after_syscall", [True, False])
def test_vfork_action_marks_only_the_child(after_syscall):
    """After the syscall: test rax, jne to the parent's count; then cpu_id >= 0 checked (else
    the same count: an unregistered thread's child counts as the parent's), the marker written
    and the apart counter lock-inc'd, so that a counting probe sharing the hook's stub gets the
    figures a count stub would give it."""
    code = assemble(vfork_action(COUNTER, APART, -0x60, child_only_if_rax_zero=after_syscall), SLOT)
    insns = list(Decoder(64, code, ip=SLOT))
    assert insns[0].code == Code.LEA_R64_M and insns[-1].code == Code.LEA_R64_M  # the red zone stepped over and back
    assert insns[1].mnemonic == Mnemonic.PUSHFQ and insns[-2].mnemonic == Mnemonic.POPFQ
    branches = [i for i in insns if i.mnemonic in (Mnemonic.JNE, Mnemonic.JL)]
    assert [i.mnemonic for i in branches] == ([Mnemonic.JNE] if after_syscall else []) + [Mnemonic.JL]
    (check,) = [i for i in insns if i.mnemonic == Mnemonic.CMP]
    assert check.memory_displacement == (-0x60 + 4) & 0xFFFFFFFF and check.immediate(1) == 0
    (mark,) = [i for i in insns if i.code == Code.MOV_RM32_IMM32]
    assert mark.immediate(1) == VFORK_CPU and mark.memory_displacement == (-0x60 + 4) & 0xFFFFFFFF
    incs = [i for i in insns if i.mnemonic == Mnemonic.INC]
    assert [(i.has_lock_prefix, i.ip_rel_memory_address) for i in incs] == [(True, APART), (True, COUNTER)]
    apart, parent = incs
    assert insns[insns.index(mark) + 1] is apart  # the apart count right after the mark
    start = _unmark_before(insns, parent, -0x60, Register.FS)
    assert all(b.near_branch_target == start.ip for b in branches)  # parent and unregistered: unmark, count
    (over,) = [i for i in insns if i.mnemonic == Mnemonic.JMP]
    assert insns[insns.index(apart) + 1] is over and over.near_branch_target == insns[-2].ip  # past the count


def _unmark_before(insns, count, offset: int, segment) -> Instruction:
    """The parent's way (``vforks.unmark_parent``) right before its count: save eax and ecx,
    ``lock cmpxchg`` cpu_id from the mark to cpu_id_start, restore; returns its first
    instruction."""
    at = insns.index(count)
    seq = insns[at - 7:at]
    assert [i.mnemonic for i in seq] == [Mnemonic.PUSH, Mnemonic.PUSH, Mnemonic.MOV, Mnemonic.MOV, Mnemonic.CMPXCHG,
                                         Mnemonic.POP, Mnemonic.POP]
    assert seq[2].op0_register == Register.EAX and seq[2].immediate(1) == VFORK_CPU
    assert (seq[3].op0_register, seq[3].segment_prefix, seq[3].memory_displacement) == (
        Register.ECX, segment, offset & 0xFFFFFFFF)  # cpu_id_start
    cas = seq[4]
    assert cas.has_lock_prefix and cas.segment_prefix == segment and cas.op1_register == Register.ECX
    assert cas.memory_displacement == (offset + 4) & 0xFFFFFFFF  # cpu_id
    assert [i.op0_register for i in seq[5:]] == [seq[1].op0_register, seq[0].op0_register]
    return seq[0]
