"""Coverage: how much of a module a jump probe can reach, with refusals grouped by reason."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .exits import function_exits
from .function import FunctionAnalysis
from .index import module_index
from .result import SiteAnalysis, Verdict
from .sharing import sharing_problem

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
        ("may both stay", "indirect jump both jump table and tail call"),
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
        ("conditional tail call", "conditional tail call"),
        ("falls through the end", "falls through its end into the next function"),
        ("jumps into", "jumped into from another function"),
        ("starts inside", "another function starts inside"),
        ("has no exit", "no exit (never returns)"),
        ("far or interrupt return", "far or interrupt return"),
        ("from a branch target", "exit too close after a branch target"),
        ("after which nothing falls through", "exit too close after another exit"),
        ("byte(s) from the start of", "function too short"),
        ("overlaps the entry window", "an exit window overlaps the entry window"),
        ("windows of the exits", "exit windows overlap each other"),
        ("not in an executable", "not in code"),
        ("not an instruction boundary", "not an instruction boundary"),
    ]
    for needle, cls in table:
        if needle in r:
            return cls
    return r.split(":")[0][:50]


@dataclass(frozen=True)
class RefusedEntry:
    """A function entry that cannot take a jump: its site name, address, reason class, reason."""

    site: str
    address: int
    reason_class: str
    reason: str

    def to_json(self) -> dict:
        return {"site": self.site, "address": self.address, "class": self.reason_class, "reason": self.reason}


@dataclass
class CoverageReport:
    """How much of a module a jump probe can reach.

    ``entries``/``entries_jump``: function entries (unique addresses) and how many take a jump;
    ``refused``: refused entries per reason class; ``examples``: one refused site per class;
    ``refused_entries``: every refused entry, in address order.
    With ``all_boundaries``: ``boundaries``/``boundaries_jump`` over every instruction start of
    every function, and ``boundary_refused`` per class. With ``returns``: ``returns_jump`` counts
    functions whose every exit takes a jump (``return_refused`` per class), ``both_jump`` those
    whose entry and every exit take a jump, where an exit window overlapping the entry's can
    share its stub (``sites/sharing.py``), so entry and return probes fit together (``both_refused`` per class); both over ``functions``, the
    functions that are not ``.cold`` parts (those are analysed with their function).
    """

    module: str
    entries: int = 0
    entries_jump: int = 0
    refused: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    refused_entries: list[RefusedEntry] = field(default_factory=list)
    boundaries: int = 0
    boundaries_jump: int = 0
    boundary_refused: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    returns: bool = False
    functions: int = 0  # functions counted for the return side (``.cold`` parts are not functions)
    returns_jump: int = 0
    both_jump: int = 0
    return_refused: Counter = field(default_factory=Counter)
    both_refused: Counter = field(default_factory=Counter)
    return_examples: dict[str, str] = field(default_factory=dict)

    @property
    def both_ratio(self) -> float:
        """Share of functions whose entry and every exit take a jump."""
        return self.both_jump / self.functions if self.functions else 0.0

    @property
    def return_ratio(self) -> float:
        """Share of functions whose every exit takes a jump."""
        return self.returns_jump / self.functions if self.functions else 0.0

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
            "refused_sites": [e.to_json() for e in self.refused_entries],
            "seconds": round(self.seconds, 2),
        }
        if self.returns:
            out.update(
                functions=self.functions,
                returns_jump=self.returns_jump,
                return_ratio=round(self.return_ratio, 5),
                return_refused=dict(self.return_refused.most_common()),
                return_examples=self.return_examples,
                entry_and_returns_jump=self.both_jump,
                entry_and_returns_ratio=round(self.both_ratio, 5),
                entry_and_returns_refused=dict(self.both_refused.most_common()),
            )
        if self.boundaries:
            out.update(
                boundaries=self.boundaries,
                boundaries_jump=self.boundaries_jump,
                boundary_ratio=round(self.boundary_ratio, 5),
                boundary_refused=dict(self.boundary_refused.most_common()),
            )
        return out


def coverage(module: "Module", memory=None, *, all_boundaries: bool = False, returns: bool = True,
             each: "Callable[[SiteAnalysis], None] | None" = None) -> CoverageReport:
    """Analyse every function entry of ``module`` (and with ``all_boundaries`` every instruction
    boundary of every function; with ``returns`` every function's exits, see ``sites/exits.py``).
    ``memory`` adds the live "already patched" check. ``each`` is called with every site's
    analysis (every function entry, and every boundary with ``all_boundaries``), once per address."""
    t0 = time.perf_counter()
    rep = CoverageReport(module=module.path, returns=returns)
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
        if each is not None and not all_boundaries:
            each(res)
        if res.verdict is Verdict.JUMP:
            rep.entries_jump += 1
        else:
            cls = _reason_class(res.reason)
            rep.refused[cls] += 1
            rep.examples.setdefault(cls, f"{res.site}: {res.reason}")
            rep.refused_entries.append(RefusedEntry(res.site, func.address, cls, res.reason))
        if returns:
            _count_returns(rep, module, func, memory, idx, res, fa)
        if all_boundaries:
            for a in fa.addrs or [func.address]:
                r = res if a == func.address else fa.analyse(a, site=f"{a:#x}")
                if each is not None:
                    each(r)
                rep.boundaries += 1
                if r.verdict is Verdict.JUMP:
                    rep.boundaries_jump += 1
                else:
                    rep.boundary_refused[_reason_class(r.reason)] += 1
    rep.seconds = time.perf_counter() - t0
    return rep


_COLD = re.compile(r"^.*\.cold(?:\.\d+)?$")


def _count_returns(rep: CoverageReport, module: "Module", func, memory, idx, entry: SiteAnalysis,
                   fa: FunctionAnalysis) -> None:
    """Add one function's return side (and entry + return side together) to ``rep``."""
    if _COLD.match(func.name):
        return
    rep.functions += 1
    ex = function_exits(module, func, memory, index=idx)
    if ex.ok:
        rep.returns_jump += 1
        reason = None
        if entry.ok:  # an exit window overlapping the entry's may share its stub (sites/sharing.py)
            reason = sharing_problem(fa, entry, ex.windows)
        else:
            reason = entry.reason
    else:
        cls = _reason_class(ex.reason)
        rep.return_refused[cls] += 1
        rep.return_examples.setdefault(cls, f"{ex.site}: {ex.reason}")
        reason = ex.reason if entry.ok else entry.reason
    if reason is None:
        rep.both_jump += 1
    else:
        rep.both_refused[("entry: " if not entry.ok else "") + _reason_class(reason)] += 1
