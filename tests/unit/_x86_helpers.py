"""Shared checks for the x86 relocation tests (not a test module)."""

from __future__ import annotations

import struct

from iced_x86 import Code

from djprobe.x86 import FALLS_THROUGH, Flow, Insn, Relocated, decode

LOOP_CODES = {
    Code.LOOP_REL8_64_RCX, Code.LOOP_REL8_64_ECX, Code.LOOPE_REL8_64_RCX, Code.LOOPE_REL8_64_ECX,
    Code.LOOPNE_REL8_64_RCX, Code.LOOPNE_REL8_64_ECX, Code.JRCXZ_REL8_64, Code.JECXZ_REL8_64,
}


def check_relocation(orig: list[Insn], rel: Relocated, return_to: int | None) -> None:
    """Independent semantic check of a relocation (decodes the result again)."""
    new = {i.address: i for i in decode(rel.code, rel.address)}
    amap = rel.address_map
    lo, hi = orig[0].address, orig[-1].end
    starts = {i.address for i in orig}

    def expected(t: int) -> int:
        if lo <= t < hi:
            assert t in starts
            return amap[t]
        return t

    # address map: every start and end, in order, inside the code
    prev = rel.address - 1
    for k, o in enumerate(orig):
        assert o.address in amap and o.end in amap
        s = amap[o.address]
        assert rel.address <= s < rel.end and s > prev
        prev = s
        if k + 1 < len(orig):
            assert amap[o.end] == amap[orig[k + 1].address]
    last = orig[-1]
    if last.flow in (Flow.CALL, Flow.INDIRECT_CALL):
        assert amap[last.end] == last.end
    else:
        assert amap[last.end] == (rel.return_jump if rel.return_jump is not None else rel.end)
    assert amap[lo] == rel.address

    for k, o in enumerate(orig):
        at = amap[o.address]
        n = new[at]  # an instruction starts exactly there
        nxt = amap[o.end] if not (k == len(orig) - 1 and o.flow in (Flow.CALL, Flow.INDIRECT_CALL)) else None
        if o.flow in (Flow.CALL, Flow.INDIRECT_CALL):
            # push qword [rip+L] ; jmp target ; L: dq original return address
            assert n.text.startswith("push qword ptr [") and n.rip_relative
            lit = n.mem_target
            assert struct.unpack_from("<Q", rel.code, lit - rel.address)[0] == o.end
            j = new[n.end]
            if o.flow is Flow.CALL:
                assert j.flow is Flow.JUMP and j.instruction.code == Code.JMP_REL32_64
                assert j.target == expected(o.target)
            else:
                assert j.flow is Flow.INDIRECT_JUMP
                assert j.mem_target == o.mem_target
                assert j.text.replace("jmp", "call", 1) == o.text
            assert lit == j.end and lit + 8 <= rel.end
            assert k == len(orig) - 1
            continue
        if o.flow in (Flow.JUMP, Flow.COND_JUMP):
            if o.instruction.code in LOOP_CODES:
                assert n.instruction.code == o.instruction.code
                far = new[n.target]
                assert far.instruction.code == Code.JMP_REL32_64 and far.target == expected(o.target)
                short = new[n.end]  # not taken: skip the far jump
                assert short.flow is Flow.JUMP and short.target == far.end == nxt
            else:
                assert n.flow is o.flow and n.target == expected(o.target)
                assert n.instruction.condition_code == o.instruction.condition_code
                assert n.instruction.is_jcc_near or n.instruction.code in (
                    Code.JMP_REL32_64, Code.XBEGIN_REL32)
                assert n.end == nxt
            continue
        if o.rip_relative:
            assert n.mem_target == o.mem_target
            assert n.instruction.code == o.instruction.code and n.length == o.length
        else:
            assert n.raw == o.raw
        assert n.end == nxt

    if return_to is not None and last.flow in FALLS_THROUGH:
        j = new[rel.return_jump]
        assert j.flow is Flow.JUMP and j.target == return_to and j.end == rel.end
    else:
        assert rel.return_jump is None
