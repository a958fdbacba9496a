"""Short jumps at exit windows (return probes, and the exits of latency probes): where the block
of an exit begins at a branch target too close to it for a ``jmp rel32`` (``sites/exits.py``:
"only N byte(s) from a branch target to the end of 'ret'"), and no path windows replace it, the
window from that target to the end of the exit, if every way into the target is a direct branch
from inside the function (no other function's returns counted), it is at least 2 bytes and passes
every check
of a jump window (no way in after its first byte, relocatable, a ``call`` only last, not patched:
``FunctionAnalysis._finish``), takes a ``jmp rel8`` to a springboard in dead padding within reach
(``springboards.py`` places it like any short jump; the part's stub is the exit's stub).

Only when ``ProbedProcess.springboards`` is on, in a 64-bit process; an exit of an unnamed part
of the function (code reached by a jump outside its symbol) is left refused.

:func:`short_entry` does the same for the entry window of a latency probe: the short window a
count probe would get there (``springboard_cache.short_window``), its stub the entry's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from . import springboard_cache
from .sites import FunctionAnalysis, SiteAnalysis, Verdict, module_index
from .sites.exits import Exit, ExitAnalysis
from .sites.springboards import SHORT_JUMP_SIZE

if TYPE_CHECKING:
    from .probes import ProbedProcess

__all__ = ["with_short_windows", "short_entry"]


def short_entry(proc: "ProbedProcess", entry: SiteAnalysis) -> SiteAnalysis | None:
    """The short-jump window at a function's entry refused a jmp rel32 (``entry``), as a jump
    verdict with ``springboard`` set (the nearest one now; the one used is chosen at insertion),
    or None: springboards off, a 32-bit process, someone else's patch, no short jump fits."""
    if not getattr(proc, "springboards", False) or entry.ok or entry.busy:
        return None
    if getattr(proc.process, "arch", None) is not None and proc.process.arch.bits != 64:
        return None
    if entry.module is None or entry.function is None:
        return None
    window = springboard_cache.short_window(proc, entry)
    if window is None:
        return None
    return replace(window, verdict=Verdict.JUMP, site=entry.site)


def with_short_windows(proc: "ProbedProcess", exits: ExitAnalysis, reader) -> ExitAnalysis:
    """``exits`` with a short-jump window for each exit that takes no jump otherwise, where one
    fits; the verdict becomes JUMP if every exit is caught then. ``reader`` reads the live code
    (the function's own probes' bytes shown unpatched)."""
    if not getattr(proc, "springboards", False) or exits.ok or exits.module is None or not exits.exits:
        return exits
    if getattr(proc.process, "arch", None) is not None and proc.process.arch.bits != 64:
        return exits
    if not _refused_for_an_exit(exits) or any(not e.ok and not _short_candidate(e) for e in exits.exits):
        return exits  # refused for a reason a short window does not lift
    placed = {b for e in exits.exits if e.ok for w in e.windows for b in range(w.address, w.address + w.size)}
    new = [e if e.ok else _short_exit(proc, exits, e, reader, placed) for e in exits.exits]
    if any(e is None or not e.ok for e in new):
        return exits
    spans = sorted((w.address, w.address + w.size, e.insn.address) for e in new for w in e.windows)  # type: ignore[union-attr]
    if any(b0 < a1 for (a0, a1, _), (b0, _b1, _) in zip(spans, spans[1:])):
        return exits
    short = sum(1 for e in new if e.window.springboard is not None)  # type: ignore[union-attr]
    reason = f"jump at each of {len(new)} exit(s) ({short} a short jump to a springboard)"
    return replace(exits, exits=tuple(new), verdict=Verdict.JUMP, reason=reason)  # type: ignore[arg-type]


def _refused_for_an_exit(exits: ExitAnalysis) -> bool:
    """Whether ``exits`` was refused only because an exit takes no jump: every exit analysed and
    every check of the whole function passed (``function_exits`` words that refusal so, after
    them; a refusal of the function, e.g. code of another function jumping into it, is worded
    otherwise and may come with all exits fine)."""
    bad = next((e for e in exits.exits if not e.ok), None)
    if bad is None or exits.module is None:
        return False
    address = bad.insn.address
    return exits.reason == (f"exit '{bad.insn.text}' at {address:#x} ({exits.module.describe(address)}) "
                            f"cannot take a jump: {bad.window.reason}")


def _short_candidate(e: Exit) -> bool:
    return e.window.exit is not None and bool(e.window.displaced) and "branch target" in e.window.reason


def _entered_from_inside(module, function, start: int) -> bool:
    """Whether every known way into ``start`` (the branch target beginning the exit's block) is
    a direct branch from inside ``function``: a window there counts no other function's returns
    (libc's ``__memset_avx512_unaligned`` jumps into the exit blocks of ``..._erms``)."""
    ways = module_index(module).entries_between(start - 1, start + 1)
    lo, hi = function.address, function.address + function.size
    return bool(ways) and all(kind == "branch" and lo <= src < hi for _t, kind, src in ways)


def _short_exit(proc: "ProbedProcess", exits: ExitAnalysis, e: Exit, reader, placed: set[int]) -> Exit | None:
    """The exit ``e`` with a short window, or None. ``placed``: bytes of the other exits'
    windows (a springboard is never among them)."""
    module = exits.module
    assert module is not None
    w = e.window
    start, exit_ins = w.displaced[0].address, e.insn
    if exit_ins.end - start < SHORT_JUMP_SIZE:
        return None
    function = module.function_at(start)
    if function is None or exits.function is None or function.address != exits.function.address:
        return None
    if not _entered_from_inside(module, function, start):
        return None
    fa = FunctionAnalysis(module, function, reader)
    if fa.problem is not None:
        return None
    k, j = fa._pos.get(start), fa._pos.get(exit_ins.address)
    if k is None or j is None or j < k:
        return None
    base = dict(site=w.site, address=start, function=function, at_entry=start == function.address, module=module)
    res = fa._finish(start, k, j, (), base)
    if res.verdict is not Verdict.JUMP:
        return None
    spot = springboard_cache.springboard(module, start, placed)
    if spot is None:
        return None
    reason = (f"short jump: displaces {len(res.displaced)} instruction(s), {res.size} bytes, ending with "
              f"'{exit_ins.text}'; jmp rel8 to a springboard at {spot[0]:#x} in the padding after {spot[1].after}")
    window = replace(res, reason=reason, exit=w.exit, springboard=spot[0])
    return Exit(e.insn, e.kind, window, ())
