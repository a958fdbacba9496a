"""Coverage: how much of a module a jump probe can reach, with refusals grouped by reason."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .function import FunctionAnalysis
from .index import module_index
from .result import Verdict

if TYPE_CHECKING:
    from ..symbols import Module


def _reason_class(reason: str) -> str:
    """A short class for grouping refusal reasons in a summary."""
    r = reason
    table = [
        ("already patched", "already patched (busy)"),
        ("not the last displaced", "call/syscall not last"),
        ("only be reached from elsewhere", "instruction after a jump/return"),
        ("byte(s) of whole instructions before the end", "too close to the end of the function"),
        ("cross the end", "crosses the end of the function"),
        ("jump table of the jmp", "jump-table case inside"),
        ("unknown targets", "indirect jump with unknown targets"),
        ("landing pad", "exception landing pad inside"),
        ("lands at", "branch target inside"),
        ("code symbol starts", "another symbol starts inside"),
        ("relocated code pointer", "code pointer targets inside"),
        ("is taken at", "address taken inside"),
        ("can only be reached from elsewhere", "instruction after a jump/return"),
        ("int3", "int3/trap displaced"),
        ("traps", "int3/trap displaced"),
        ("cannot be relocated", "cannot be relocated"),
        ("cannot be re-aimed", "cannot be relocated"),
        ("reads its target through rsp", "cannot be relocated"),
        ("does not decode", "undecodable bytes"),
        ("no size", "symbol without size"),
        ("not in an executable", "not in code"),
        ("not an instruction boundary", "not an instruction boundary"),
    ]
    for needle, cls in table:
        if needle in r:
            return cls
    return r.split(":")[0][:50]


@dataclass
class CoverageReport:
    """How much of a module a jump probe can reach.

    ``entries``/``entries_jump``: function entries (unique addresses) and how many take a jump;
    ``refused``: refused entries per reason class; ``examples``: one refused site per class.
    With ``all_boundaries``: ``boundaries``/``boundaries_jump`` over every instruction start of
    every function, and ``boundary_refused`` per class.
    """

    module: str
    entries: int = 0
    entries_jump: int = 0
    refused: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    boundaries: int = 0
    boundaries_jump: int = 0
    boundary_refused: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def entry_ratio(self) -> float:
        return self.entries_jump / self.entries if self.entries else 0.0

    @property
    def boundary_ratio(self) -> float:
        return self.boundaries_jump / self.boundaries if self.boundaries else 0.0

    def to_json(self) -> dict:
        out = {
            "module": self.module,
            "entries": self.entries,
            "entries_jump": self.entries_jump,
            "entries_refused": self.entries - self.entries_jump,
            "entry_ratio": round(self.entry_ratio, 5),
            "refused": dict(self.refused.most_common()),
            "examples": self.examples,
            "seconds": round(self.seconds, 2),
        }
        if self.boundaries:
            out.update(
                boundaries=self.boundaries,
                boundaries_jump=self.boundaries_jump,
                boundary_ratio=round(self.boundary_ratio, 5),
                boundary_refused=dict(self.boundary_refused.most_common()),
            )
        return out


def coverage(module: "Module", memory=None, *, all_boundaries: bool = False) -> CoverageReport:
    """Analyse every function entry of ``module`` (and with ``all_boundaries`` every instruction
    boundary of every function). ``memory`` adds the live "already patched" check."""
    t0 = time.perf_counter()
    rep = CoverageReport(module=module.path)
    reader = memory.read if memory is not None else None
    idx = module_index(module)
    seen: set[int] = set()
    for func in module.functions():
        if func.address in seen:
            continue
        seen.add(func.address)
        fa = FunctionAnalysis(module, func, reader, index=idx)
        res = fa.analyse(func.address, site=f"{module.name}:{func.name}")
        rep.entries += 1
        if res.verdict is Verdict.JUMP:
            rep.entries_jump += 1
        else:
            cls = _reason_class(res.reason)
            rep.refused[cls] += 1
            rep.examples.setdefault(cls, f"{res.site}: {res.reason}")
        if all_boundaries:
            for a in fa.addrs or [func.address]:
                r = res if a == func.address else fa.analyse(a, site=f"{a:#x}")
                rep.boundaries += 1
                if r.verdict is Verdict.JUMP:
                    rep.boundaries_jump += 1
                else:
                    rep.boundary_refused[_reason_class(r.reason)] += 1
    rep.seconds = time.perf_counter() - t0
    return rep
