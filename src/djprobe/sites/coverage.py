"""Coverage: how much of a module a jump probe can reach, with refusals grouped by reason; and
how much is reachable at all, counting the trap fallback (a kernel uprobe) where no jump fits."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidSiteError
from ..x86.uprobe_rules import uprobe_refusal
from .exits import function_exits
from .function import FunctionAnalysis
from .index import module_index
from .result import SiteAnalysis, Verdict
from .sharing import sharing_problem
from .springboards import ShortJump, short_jump

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
    #: Refused entries/boundaries where the trap fallback (a kernel uprobe) goes, and those where
    #: neither a jump nor a trap does, per reason the kernel gives.
    entries_trap: int = 0
    entries_neither: Counter = field(default_factory=Counter)
    boundaries_trap: int = 0
    boundaries_neither: Counter = field(default_factory=Counter)
    #: With ``springboards``: refused entries/boundaries where a short jump (``jmp rel8`` to a
    #: springboard in dead padding, ``sites/springboards.py``) fits, by the refusal's class.
    #: Probes place them unless ``ProbedProcess.springboards`` is off (on by default).
    springboards: bool = False
    entries_short: int = 0
    boundaries_short: int = 0
    boundary_short_by: Counter = field(default_factory=Counter)

    @property
    def boundary_short_ratio(self) -> float:
        """Share of boundaries a jump or a short jump reaches."""
        return (self.boundaries_jump + self.boundaries_short) / self.boundaries if self.boundaries else 0.0

    @property
    def reachable_ratio(self) -> float:
        """Share of function entries a probe reaches at all (jump or trap)."""
        return (self.entries_jump + self.entries_trap) / self.entries if self.entries else 0.0

    @property
    def boundary_reachable_ratio(self) -> float:
        return (self.boundaries_jump + self.boundaries_trap) / self.boundaries if self.boundaries else 0.0

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
            "entries_trap": self.entries_trap,
            "entries_neither": sum(self.entries_neither.values()),
            "entry_reachable_ratio": round(self.reachable_ratio, 5),
            "neither": dict(self.entries_neither.most_common()),
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
        if self.springboards:
            out.update(entries_short=self.entries_short,
                       entry_short_ratio=round((self.entries_jump + self.entries_short) / self.entries, 5)
                       if self.entries else 0.0)
            if self.boundaries:
                out.update(boundaries_short=self.boundaries_short,
                           boundary_short_ratio=round(self.boundary_short_ratio, 5),
                           boundary_short_by=dict(self.boundary_short_by.most_common()))
        if self.boundaries:
            out.update(
                boundaries=self.boundaries,
                boundaries_jump=self.boundaries_jump,
                boundary_ratio=round(self.boundary_ratio, 5),
                boundary_refused=dict(self.boundary_refused.most_common()),
                boundaries_trap=self.boundaries_trap,
                boundaries_neither=sum(self.boundaries_neither.values()),
                boundary_reachable_ratio=round(self.boundary_reachable_ratio, 5),
                boundary_neither=dict(self.boundaries_neither.most_common()),
            )
        return out


def coverage(module: "Module", memory=None, *, all_boundaries: bool = False, returns: bool = True,
             each: "Callable[[SiteAnalysis], None] | None" = None,
             springboards: bool = False) -> CoverageReport:
    """Analyse every function entry of ``module`` (and with ``all_boundaries`` every instruction
    boundary of every function; with ``returns`` every function's exits, see ``sites/exits.py``).
    ``memory`` adds the live "already patched" check. ``each`` is called with every site's
    analysis (every function entry, and every boundary with ``all_boundaries``), once per address.
    With ``springboards``, a refused site where a short jump fits is counted apart (the
    ``*_short`` figures) and ``each`` gets its ``SHORT_JUMP`` verdict instead of the refusal."""
    t0 = time.perf_counter()
    rep = CoverageReport(module=module.path, returns=returns, springboards=springboards)
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
        short = short_jump(fa, func.address) if springboards and not res.ok else None
        if each is not None and not all_boundaries:
            each(short.window if short is not None else res)
        if res.verdict is Verdict.JUMP:
            rep.entries_jump += 1
        else:
            rep.entries_short += short is not None
            cls = _reason_class(res.reason)
            rep.refused[cls] += 1
            rep.examples.setdefault(cls, f"{res.site}: {res.reason}")
            rep.refused_entries.append(RefusedEntry(res.site, func.address, cls, res.reason))
            why_not = "already patched" if res.busy else trap_refusal(module, func.address)
            if why_not is None:
                rep.entries_trap += 1
            else:
                rep.entries_neither[why_not] += 1
        if returns:
            _count_returns(rep, module, func, memory, idx, res, fa)
        if all_boundaries:
            for a in fa.addrs or [func.address]:
                r = res if a == func.address else fa.analyse(a, site=f"{a:#x}")
                short = short_jump(fa, a) if springboards and not r.ok else None
                if each is not None:
                    each(short.window if short is not None else r)
                rep.boundaries += 1
                if r.verdict is Verdict.JUMP:
                    rep.boundaries_jump += 1
                else:
                    rep.boundary_refused[_reason_class(r.reason)] += 1
                    if short is not None:
                        rep.boundaries_short += 1
                        rep.boundary_short_by[_reason_class(r.reason)] += 1
                    why_not = "already patched" if r.busy else trap_refusal(module, a)
                    if why_not is None:
                        rep.boundaries_trap += 1
                    else:
                        rep.boundaries_neither[why_not] += 1
    rep.seconds = time.perf_counter() - t0
    return rep


def trap_refusal(module: "Module", address: int) -> str | None:
    """Why the trap fallback (a kernel uprobe) cannot go at ``address`` either, or None: the
    module is no file, or the kernel refuses the instruction (``x86/uprobe_rules.py``)."""
    if not module.file_backed:
        return "not in a file (a uprobe needs one)"
    for size in (15, 8, 4, 2, 1):
        try:
            code = module.read_file(address, size)
        except InvalidSiteError:
            continue
        refusal = uprobe_refusal(code)
        return None if refusal is None else refusal.split(" (")[0]
    return "not readable from the file"


def site_trap_refusal(res: SiteAnalysis) -> str | None:
    """Why the trap fallback cannot go at the site of ``res`` (a refused jump verdict) either, or
    None: someone else's patch, no known instruction boundary there, or :func:`trap_refusal`."""
    if res.busy:
        return "the bytes are already patched"
    if res.module is None or res.function is None:
        return "no function covers it: its instruction boundaries are unknown"
    fa = FunctionAnalysis(res.module, res.function)
    if fa.problem is not None:
        return fa.problem
    if res.address not in fa.boundaries():
        return "it is not an instruction boundary"
    return trap_refusal(res.module, res.address)


def site_short_jump(res: SiteAnalysis) -> "ShortJump | None":
    """The short jump (``springboards.short_jump``) a probe would take at the site of ``res`` (a
    refused default-size jump verdict), or None: someone else's patch, no function, a 32-bit
    module, or none fits."""
    if res.ok or res.busy or res.module is None or res.function is None or res.exit is not None:
        return None
    if res.module.arch.bits != 64:
        return None  # no short jumps in 32-bit processes
    fa = FunctionAnalysis(res.module, res.function)
    return short_jump(fa, res.address)


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
