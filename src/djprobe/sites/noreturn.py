"""Functions that never return (``abort``, ``__assert_fail``, ``__libc_fatal``): the code after a
call of one is not reached by falling through the call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import Mnemonic

from ..x86 import Flow, Insn

if TYPE_CHECKING:
    from .index import ModuleIndex


def never_returns(ix: "ModuleIndex", address: int) -> bool:
    """Is ``address`` the start of a function of this module that never returns: no ``ret``,
    no indirect jump, every jump that leaves it goes to such a function, and its end is
    reached only after a call to one? (Cycles count as returning.)"""
    memo = ix._noreturn
    if address in memo:
        return memo[address]
    memo[address] = False  # while deciding (recursion): assume it returns
    memo[address] = _decide(ix, address)
    return memo[address]


def _decide(ix: "ModuleIndex", address: int) -> bool:
    func = ix.module.function_at(address)
    if func is None or func.address != address or func.size <= 0:
        return False
    spans = ix._home_spans(address)
    for lo, hi in [(func.address, func.address + func.size)] + \
            [(c.address, c.address + c.size) for c in ix.module.cold_parts(func)]:
        insns: list[Insn] = []
        a = lo
        while a < hi:
            r = ix.region_at(a)
            if r is None or r.bad is not None and r.bad.address < hi:
                return False
            insns.extend(ins for ins in r.insns if lo <= ins.address < hi)
            a = r.end
        for ins in insns:
            if ins.flow in (Flow.RETURN, Flow.INDIRECT_JUMP, Flow.INVALID):
                return False
            if ins.flow in (Flow.JUMP, Flow.COND_JUMP) and ins.target is not None and \
                    not any(s <= ins.target < e for s, e in spans) and not never_returns(ix, ins.target):
                return False
        real = [i for i in insns if i.instruction.mnemonic != Mnemonic.NOP]
        if not real:
            return False
        last = real[-1]
        if last.flow is Flow.CALL:
            if last.target is None or not never_returns(ix, last.target):
                return False
        elif last.flow not in (Flow.JUMP, Flow.INTERRUPT):
            return False
    return True
