"""vfork children in 32-bit code (djprobe.vforks32, the marker checks of djprobe.stubs32,
latency_stubs32, fetch_stubs32): one ``cmp gs:[off + 4], VFORK_CPU`` and one jcc before each
locked count, the apart counter added in two words, nothing without the rseq offset."""

from __future__ import annotations

import dataclasses

import pytest
from iced_x86 import Code, Decoder, Mnemonic, OpKind, Register

from djprobe.area import AreaLayout
from djprobe.latency_stubs import LatencyTargets
from djprobe.latency_stubs32 import ENTRY_SKIP, exit_action32
from djprobe.rseq import VFORK_CPU
from djprobe.stubs import RecordTargets
from djprobe.stubs32 import assemble32, count_action32, record_action32
from djprobe.vforks32 import CloneFlagsAt, vfork_action32
from tests.unit.test_vfork_apart import _unmark_before

SLOT = 0x4000_0000
COUNTER = 0x5000_0000
APART = 0x5000_8000
OFFSET = 1184  # glibc 2.36's __rseq_offset in i386 processes here


def _decode(code: bytes) -> list:
    return list(Decoder(32, code, ip=SLOT))


def _checks(insns) -> list:
    return [i for i in insns if i.code == Code.CMP_RM32_IMM32 and i.immediate(1) == VFORK_CPU]


def _apart_adds(insns, layout: AreaLayout, counter: int) -> list:
    at = counter + layout.apart_offset
    return [i for i in insns if i.memory_displacement in (at, at + 4) and i.mnemonic in (Mnemonic.ADD, Mnemonic.INC)]


@pytest.mark.parametrize("flags_live", [True, False])
def test_count_one_check_before_the_locked_count(flags_live):
    layout = AreaLayout()
    insns = _decode(assemble32(count_action32(layout, COUNTER, flags_live=flags_live, rseq_offset=OFFSET), SLOT))
    (check,) = _checks(insns)
    assert check.segment_prefix == Register.GS and check.memory_displacement == OFFSET + 4
    after = insns[insns.index(check) + 1]
    assert after.mnemonic == Mnemonic.JNE  # the fast path: this cmp and this jcc only
    fast = [i for i in insns if i.ip >= after.near_branch_target]
    assert fast[0].code == Code.MOV_R32_RM32 and not _checks(fast) and not _apart_adds(fast, layout, COUNTER)
    adds = _apart_adds(insns, layout, COUNTER)
    assert [(i.mnemonic, i.has_lock_prefix) for i in adds] == [(Mnemonic.ADD, True), (Mnemonic.INC, True)]
    assert all(i.ip < after.near_branch_target for i in adds)
    plain = _decode(assemble32(count_action32(layout, COUNTER, flags_live=flags_live), SLOT))
    assert not _checks(plain) and len(plain) == len(insns) - 2 - 4  # cmp, jne; add, jae, inc, jmp


@pytest.mark.parametrize("registers", ["all", "args"])
def test_record_checks_before_counting_no_record(registers):
    layout = AreaLayout()
    where = RecordTargets(COUNTER, COUNTER + 0x1000, COUNTER + 0x2000, COUNTER + 0x3000, COUNTER + 0x4000,
                          COUNTER + 0x5000, 3, rseq_offset=OFFSET)
    insns = _decode(assemble32(record_action32(layout, where, registers), SLOT))
    (check,) = _checks(insns)
    assert insns[:2] == [i for i in insns[:2] if i.mnemonic in (Mnemonic.PUSHFD, Mnemonic.PUSHAD)]
    assert insns.index(check) == 2 and insns[3].mnemonic == Mnemonic.JE
    apart = [i for i in insns if i.ip >= insns[3].near_branch_target]
    adds = _apart_adds(apart, layout, COUNTER)
    assert len(adds) == 2 and not [i for i in apart[:4] if i.mnemonic == Mnemonic.RDTSC]
    plain = _decode(assemble32(record_action32(layout, dataclasses.replace(where, rseq_offset=None), registers), SLOT))
    assert not _checks(plain) and not _apart_adds(plain, layout, COUNTER)


def test_latency_exit_checks_on_its_unpaired_path_only():
    layout = AreaLayout()
    t = LatencyTargets.of(layout, 0x6000_0000, 0, 1, 0.4)
    insns = _decode(assemble32(exit_action32(t, layout, OFFSET), SLOT))
    (check,) = _checks(insns)
    je = insns[insns.index(check) + 1]
    assert je.mnemonic == Mnemonic.JE
    assert insns[[i.ip for i in insns].index(je.near_branch_target)].code == Code.MOVDQU_XMM_XMMM128  # to the restore
    assert not _checks(_decode(assemble32(exit_action32(t, layout), SLOT)))


def test_latency_entry_skip_label_is_the_frames_popad():
    from djprobe.latency_stubs32 import _Frame
    from djprobe.stubs import _Asm

    a = _Asm()
    _Frame(True).restore(a)
    assert a.ins[a.index_of(ENTRY_SKIP)].mnemonic == Mnemonic.POPAD


@pytest.mark.parametrize("after_syscall", [True, False])
def test_vfork_action32_marks_only_the_child(after_syscall):
    insns = _decode(assemble32(vfork_action32(COUNTER, APART, OFFSET, child_only_if_eax_zero=after_syscall), SLOT))
    assert insns[0].mnemonic == Mnemonic.PUSHFD and insns[-1].mnemonic == Mnemonic.POPFD
    branches = [i for i in insns if i.mnemonic in (Mnemonic.JNE, Mnemonic.JL)]
    assert [i.mnemonic for i in branches] == ([Mnemonic.JNE] if after_syscall else []) + [Mnemonic.JL]
    (mark,) = [i for i in insns if i.code == Code.MOV_RM32_IMM32]
    assert mark.segment_prefix == Register.GS and mark.memory_displacement == OFFSET + 4 and mark.immediate(1) == VFORK_CPU
    adds = [i for i in insns if i.mnemonic == Mnemonic.ADD]
    assert [(i.has_lock_prefix, i.memory_displacement) for i in adds] == [(True, APART), (True, COUNTER)]
    assert insns[insns.index(mark) + 1] is adds[0]
    start = _unmark_before(insns, adds[1], OFFSET, Register.GS)
    assert all(b.near_branch_target == start.ip for b in branches)  # the parent, or an unregistered child


@pytest.mark.parametrize("where", list(CloneFlagsAt), ids=lambda w: w.value)
def test_clone_hook_marks_only_a_vfork_child_without_tls(where):
    """The clone hooks (after ``__clone``'s and ``__clone3``'s ``int 0x80``): the mark is reached
    only through eax == 0 (the child), for ``[ebx]`` esi != gs:[8] (not a pthread_create thread,
    whose argument is its own struct pthread), CLONE_VM and CLONE_VFORK set, CLONE_SETTLS clear and
    a registered cpu_id; every other way goes to the parent's count, which writes nothing but
    the counter. No register is written."""
    from djprobe.vforks32 import CLONE_SETTLS, CLONE_VFORK, CLONE_VM

    insns = _decode(assemble32(vfork_action32(COUNTER, APART, OFFSET, child_only_if_eax_zero=True, clone_flags=where),
                               SLOT))
    assert insns[0].mnemonic == Mnemonic.PUSHFD and insns[-1].mnemonic == Mnemonic.POPFD
    adds = [i for i in insns if i.mnemonic == Mnemonic.ADD]
    assert [(i.has_lock_prefix, i.memory_displacement) for i in adds] == [(True, APART), (True, COUNTER)]
    (mark,) = [i for i in insns if i.code == Code.MOV_RM32_IMM32]
    checks = insns[1:insns.index(mark)]
    tests = [(c.mnemonic, c.immediate(1) if c.op1_kind != OpKind.REGISTER and c.mnemonic == Mnemonic.TEST else None,
              b.mnemonic) for c, b in zip(checks[::2], checks[1::2])]
    thread = [(Mnemonic.CMP, None, Mnemonic.JE)] if where is CloneFlagsAt.CLONE_ARGS_AT_EBX else []
    assert tests == [(Mnemonic.TEST, None, Mnemonic.JNE)] + thread + [
        (Mnemonic.TEST, CLONE_VM, Mnemonic.JE), (Mnemonic.TEST, CLONE_VFORK, Mnemonic.JE),
        (Mnemonic.TEST, CLONE_SETTLS, Mnemonic.JNE), (Mnemonic.CMP, None, Mnemonic.JL)]
    start = _unmark_before(insns, adds[1], OFFSET, Register.GS)
    assert all(b.near_branch_target == start.ip for b in checks[1::2])  # each way out: the parent's count
    flag_tests = [c for c in checks[::2] if c.mnemonic == Mnemonic.TEST][1:]
    if where is CloneFlagsAt.EBX:
        assert all(c.op0_kind == OpKind.REGISTER and c.op0_register == Register.EBX for c in flag_tests)
    else:
        assert all(c.op0_kind == OpKind.MEMORY and c.memory_base == Register.EBX and c.memory_displacement == 0
                   for c in flag_tests)
        (self_cmp,) = [c for c in checks[::2] if c.mnemonic == Mnemonic.CMP and c.op0_kind == OpKind.REGISTER]
        assert (self_cmp.op0_register, self_cmp.segment_prefix, self_cmp.memory_displacement) == (
            Register.ESI, Register.GS, 8)
    unmark = insns[insns.index(start):insns.index(start) + 7]  # saves and restores eax, ecx
    written = [i for i in insns if i.op_count and i.op0_kind == OpKind.REGISTER and i.mnemonic not in (
        Mnemonic.TEST, Mnemonic.CMP) and i not in unmark]
    assert written == []  # no register touched (pushfd/popfd keep the flags)
    gs_writes = [i for i in insns if i.segment_prefix == Register.GS and i.op0_kind == OpKind.MEMORY
                 and i.mnemonic in (Mnemonic.MOV, Mnemonic.CMPXCHG)]
    assert gs_writes == [mark, unmark[4]]  # the child's mark; the parent's unmark (only from the mark)


def test_clone_flags_must_be_known():
    with pytest.raises(ValueError, match="clone_flags"):
        vfork_action32(COUNTER, APART, OFFSET, child_only_if_eax_zero=True, clone_flags="ecx")
