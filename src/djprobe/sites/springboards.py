"""Short jumps through springboards: where no 5-byte ``jmp rel32`` fits at a site (a branch lands
in the bytes after it), a 2-byte ``jmp rel8`` to a *springboard*, a ``jmp rel32`` to the stub
written into dead bytes within reach of the rel8 (-128..+127 from the end of the short jump).

Dead bytes are only the padding *between* functions: after a function whose last instruction
cannot fall through (``jmp``, ``ret``, an indirect ``jmp``, a ``call`` of a function of the module
that never returns, see ``noreturn.py``), up to the next function, symbol or
FDE start, every byte a nop or an ``int3``, covered by no symbol and no FDE, and entered by no
known way (branch, code pointer, taken address, jump table, landing pad, indirect jump with
unknown targets). Alignment nops *inside* a function are never used: fall-through executes them.

This module only finds the places (:func:`dead_runs`, :func:`short_jump`, :func:`springboard_for`).
The coverage report counts them only when asked (``springboards=True``); ``djprobe/springboards.py``
places them in a process when ``ProbedProcess.springboards`` is on (the default).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from iced_x86 import Mnemonic

from ..x86 import Flow
from .result import JUMP_SIZE, SiteAnalysis, Verdict

if TYPE_CHECKING:
    from .function import FunctionAnalysis
    from .index import ModuleIndex

__all__ = ["SHORT_JUMP_SIZE", "DeadRun", "ShortJump", "dead_runs", "nearest_springboard", "short_jump", "springboard_for"]

#: Size of the ``jmp rel8`` written at a short-jump site.
SHORT_JUMP_SIZE = 2
#: Reach of a rel8 displacement, from the end of the short jump.
REL8_MIN, REL8_MAX = -128, 127

_ENDS = frozenset({Flow.JUMP, Flow.INDIRECT_JUMP, Flow.RETURN})
_FILL = frozenset({Mnemonic.NOP, Mnemonic.INT3})


@dataclass(frozen=True)
class DeadRun:
    """Runtime [start, end) of padding after function ``after`` that no code reaches."""

    start: int
    end: int
    after: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShortJump:
    """A short-jump placement: ``window`` (verdict ``SHORT_JUMP``: the displaced whole
    instructions, at least 2 bytes, that passed the checks of a jump window), and the
    springboard's address in ``run``."""

    window: SiteAnalysis
    springboard: int
    run: DeadRun

    @property
    def rel8(self) -> int:
        """The displacement of the ``jmp rel8`` at the site."""
        return self.springboard - (self.window.address + SHORT_JUMP_SIZE)

    def to_json(self) -> dict:
        return {"springboard": f"{self.springboard:#x}", "rel8": self.rel8,
                "run": [f"{self.run.start:#x}", f"{self.run.end:#x}"], "after": self.run.after}


_RUNS: "weakref.WeakKeyDictionary[ModuleIndex, tuple[list[int], list[DeadRun]]]" = weakref.WeakKeyDictionary()


def dead_runs(index: "ModuleIndex") -> list[DeadRun]:
    """Every stretch of inter-function padding of the index's module that no code reaches (at
    least :data:`JUMP_SIZE` bytes long), sorted by address."""
    return _runs(index)[1]


def _runs(index: "ModuleIndex") -> tuple[list[int], list[DeadRun]]:
    got = _RUNS.get(index)
    if got is None:
        runs = _find_runs(index)
        got = ([r.start for r in runs], runs)
        _RUNS[index] = got
    return got


def _find_runs(index: "ModuleIndex") -> list[DeadRun]:
    module = index.module
    facts = index.facts
    if facts is None:  # without FDEs nothing says where functions end for sure
        return []
    fdes = sorted((lo + index.bias, hi + index.bias) for lo, hi in facts.fdes)
    fde_starts = [lo for lo, _ in fdes]
    fde_reach: list[int] = []  # the furthest end of the FDEs up to each one
    for _, fhi in fdes:
        fde_reach.append(max(fhi, fde_reach[-1]) if fde_reach else fhi)
    starts = module.symbol_starts()
    out: list[DeadRun] = []
    seen: set[int] = set()
    for func in module.functions():
        end = func.address + func.size
        if end in seen or func.size <= 0:
            continue
        seen.add(end)
        reg = index.region_at(end - 1)
        last = reg.insn_containing(end - 1) if reg is not None else None
        if last is None or last.end != end or (reg is not None and reg.bad is not None):
            continue
        if last.flow not in _ENDS and not (
            last.flow is Flow.CALL and last.target is not None and index.never_returns(last.target)
        ):
            continue
        pad = index.region_at(end)
        if pad is None or pad.start != end or pad.bad is not None:
            continue
        # the run stops at the next symbol start or FDE start, whichever is first
        limit = pad.end
        s = bisect.bisect_right(starts, end - 1)
        if s < len(starts):
            limit = min(limit, starts[s])
        f = bisect.bisect_right(fde_starts, end - 1)
        if f < len(fde_starts):
            limit = min(limit, fde_starts[f])
        hi = end
        for ins in pad.insns:
            if ins.end > limit or ins.instruction.mnemonic not in _FILL:
                break
            hi = ins.end
        if hi - end < JUMP_SIZE:
            continue
        if module.function_at(end) is not None or module.function_at(hi - 1) is not None:
            continue
        if f > 0 and fde_reach[f - 1] > end:  # an FDE starting before the run covers some of it
            continue
        if index.entries_between(end - 1, hi) or index.tainted(pad) is not None:
            continue
        out.append(DeadRun(end, hi, func.name))
    out.sort(key=lambda r: r.start)
    return out


def springboard_for(index: "ModuleIndex", site: int, taken: "set[int] | None" = None) -> tuple[int, DeadRun] | None:
    """The nearest springboard address a ``jmp rel8`` at ``site`` reaches (5 dead bytes, none of
    them in ``taken``, springboards already in use), and its run; None if there is none."""
    keys, runs = _runs(index)
    return nearest_springboard(keys, runs, site, taken)


def nearest_springboard(keys: list[int], runs: list[DeadRun], site: int,
                        taken: "set[int] | None" = None) -> tuple[int, DeadRun] | None:
    """:func:`springboard_for` over ``runs`` (sorted, ``keys`` their starts)."""
    base = site + SHORT_JUMP_SIZE
    lo, hi = base + REL8_MIN, base + REL8_MAX
    best: tuple[int, int, DeadRun] | None = None
    i = max(0, bisect.bisect_right(keys, lo) - 1)
    while i < len(runs) and runs[i].start <= hi:
        run = runs[i]
        a = max(run.start, lo)
        while a + JUMP_SIZE <= run.end and a <= hi:
            if taken is None or not any(a <= t < a + JUMP_SIZE for t in taken):
                d = abs(a - base)
                if best is None or d < best[0]:
                    best = (d, a, run)
                break
            a += 1
        i += 1
    return None if best is None else (best[1], best[2])


def short_jump(fa: "FunctionAnalysis", address: int, taken: "set[int] | None" = None) -> ShortJump | None:
    """A short jump at ``address`` of the function analysed by ``fa``: the fewest whole
    instructions covering 2 bytes pass every check a jump window passes (no way in after the
    first byte, relocatable, a ``call`` only last, not already patched...), and a springboard is
    within reach. None otherwise (the site keeps its refusal)."""
    if fa.problem is not None:
        return None
    k = fa._pos.get(address)
    if k is None:
        return None
    insns = fa.insns
    j = k
    while insns[j].end - address < SHORT_JUMP_SIZE:
        if j + 1 >= len(insns) or insns[j + 1].address != insns[j].end:
            return None
        j += 1
    if insns[j].end > fa.end:
        return None
    base = dict(site=fa.module.describe(address), address=address, function=fa.function,
                at_entry=address == fa.start, module=fa.module)
    res = fa._finish(address, k, j, (), base)
    if res.verdict is not Verdict.JUMP:
        return None
    spot = springboard_for(fa.index, address, taken)
    if spot is None:
        return None
    reason = (f"short jump: displaces {len(res.displaced)} instruction(s), {res.size} bytes; "
              f"jmp rel8 to a springboard at {spot[0]:#x} in the padding after {spot[1].after}")
    return ShortJump(window=_short(res, reason, spot[0]), springboard=spot[0], run=spot[1])


def _short(res: SiteAnalysis, reason: str, springboard: int) -> SiteAnalysis:
    return replace(res, reason=reason, verdict=Verdict.SHORT_JUMP, springboard=springboard)
