"""Whether a function's entry window and its exit windows can share stubs (see ``overlaps.py``).

An exit window that overlaps the entry window is no obstacle when one window can hold both
actions: the exit instruction lies inside the entry window (on one of its instruction
boundaries), or the entry window can be grown to the exit instruction's end (a window from the
function's first byte through the exit, at most ``MAX_DISPLACED`` bytes, that the site analysis
accepts). The entry action then runs at the first byte and the exit's right before its exit
instruction, in one stub. A path window (an exit reached through a branch into a short block, or
a conditional tail call) shares too when that branch lies in the window: the shared stub aims it
at a copy of the block with the exit's action.

This is the rule the coverage report applies; the probe layer reaches the same windows one
probe at a time (``overlaps.place_exit`` and ``overlaps.reanchor``).
"""

from __future__ import annotations

from typing import Sequence

from ..area import MAX_DISPLACED
from .function import FunctionAnalysis
from ..x86 import Flow
from .result import SiteAnalysis

__all__ = ["sharing_problem", "way_in"]


def way_in(window: SiteAnalysis) -> int | None:
    """The branch of a path window that leads into its exit's block (its last instruction), by
    which a path exit sharing a stub is known; None if the window falls into the block."""
    last = window.displaced[-1] if window.displaced else None
    via = window.exit_via or (window.exit_path[0].address if window.exit_path else None)
    copies = {i.address for i in window.exit_path} | {via}
    if last is not None and last.flow in (Flow.JUMP, Flow.COND_JUMP) and last.target in copies:
        return last.address
    return None


def _alone(window: SiteAnalysis, entry: SiteAnalysis) -> bool:
    """The exit window is the entry window itself acting at the first byte, or the exit alone."""
    return window.address == entry.address and window.size == entry.size and (
        window.displaced == (window.exit,) or window.exit_early)


def sharing_problem(fa: FunctionAnalysis, entry: SiteAnalysis, windows: Sequence[SiteAnalysis]) -> str | None:
    """Why the entry probe (window ``entry``) and the exits (``windows``) of one function cannot
    be placed together, or None."""
    lo, hi = entry.address, entry.address + entry.size
    over = [w for w in windows if w.address < hi and lo < w.address + w.size and not _alone(w, entry)]
    if not over:
        return None
    keys, end = [], hi
    for w in over:
        what = f"the window of exit '{w.exit.text if w.exit else '?'}' at {w.address:#x}"
        key = way_in(w) if w.exit_path else (w.exit.address if w.exit is not None else None)
        if key is None or key == lo or w.address < lo:
            return f"{what} overlaps the entry window"
        keys.append((key, what))
        end = max(end, w.address + w.size if w.exit_path else w.exit.end)
    merged = entry
    if end > hi:
        if end - lo > MAX_DISPLACED or entry.padding:
            return f"{keys[0][1]} overlaps the entry window, too far to share"
        merged = fa.analyse(lo, end - lo, site=entry.site)
        if not merged.ok:
            return f"{keys[0][1]} overlaps the entry window, and one window through it is refused: {merged.reason}"
    bounds = {i.address for i in merged.displaced}
    for key, what in keys:
        if key not in bounds:
            return f"{what} overlaps the entry window"
    return None
