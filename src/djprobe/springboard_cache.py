"""Short-jump verdicts in the sites cache (``sites_cache.py``): finding a short jump needs the
module's whole index (every way into its code) and its dead padding runs; a process probed again
(or another process of the same module build) reads both from the cache instead.

An entry is kept in the module's cache file under ``s<file vaddr>`` (keys apart from the sites'
verdicts, so a reader of the same format that does not know them never meets them), with the
function's bounds like every verdict:

- ``["s", F, S, window bytes, flags dead, [[start, end, after], ...]]``: a short jump;
  its window, and the dead runs (file vaddrs) within reach of its ``jmp rel8``, from which the
  springboard is chosen at insertion (:func:`springboard`);
- ``["n", F, S]``: no short jump fits at the site.

Only verdicts of the file are kept: a window whose live bytes are the file's, a refusal where
the 32 bytes around the site are the file's (a short jump refused because someone patched the
site depends on the process). A cached window is used
only if its bytes are the file's at the site and decode into whole instructions; the live bytes
are compared again when the jump goes in, with the world stopped (``springboards.insert``), and
the springboard's bytes in memory against the file's (``springboards._choose``).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import DjprobeError
from .sites import FunctionAnalysis, SiteAnalysis, Verdict, module_index
from .sites.springboards import REL8_MAX, REL8_MIN, SHORT_JUMP_SIZE, DeadRun, dead_runs, nearest_springboard, short_jump
from .x86 import Flow, decode

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .symbols import Module

__all__ = ["short_window", "springboard"]

#: The dead runs within reach of each short-jump site found so far, per module (runtime addresses).
_NEAR: "weakref.WeakKeyDictionary[Module, dict[int, list[DeadRun]]]" = weakref.WeakKeyDictionary()


def _key(vaddr: int) -> str:
    return f"s{vaddr:#x}"


def short_window(proc: "ProbedProcess", analysis: SiteAnalysis) -> SiteAnalysis | None:
    """The short-jump window at the site of ``analysis`` (a refused default-size verdict of a
    64-bit module), verdict ``SHORT_JUMP`` with its nearest springboard, or None: from the cache
    when it knows the site, else computed (``sites.springboards.short_jump``) and kept."""
    module, function, address = analysis.module, analysis.function, analysis.address
    assert module is not None and function is not None
    verdicts = proc.site_cache.verdicts(module) if proc.site_cache.enabled else None
    if verdicts is not None:
        entry = verdicts.get(_key(address - module.bias))
        if entry is not None:
            try:
                found = _rebuild(module, analysis, entry)
            except (ValueError, TypeError, IndexError, KeyError, DjprobeError, OSError):
                found = None  # a damaged or stale entry: look afresh
            if found is not None:
                verdicts.hits += 1
                return found[0]
        verdicts.misses += 1
    fa = FunctionAnalysis(module, function, proc.process.memory.read)
    sj = short_jump(fa, address)
    near = _near_runs(module, address) if sj is not None else []
    if sj is not None:
        _NEAR.setdefault(module, {})[address] = near
    if verdicts is not None:
        bias = module.bias
        head = [f"{function.address - bias:#x}", function.size]
        if sj is None and _as_in_file(proc, module, address - 16, 32):
            verdicts.put(_key(address - bias), ["n", *head])
        elif sj is not None and _as_in_file(proc, module, address, sj.window.size):
            w = sj.window
            runs = [[r.start - bias, r.end - bias, r.after] for r in near]
            verdicts.put(_key(address - bias), ["s", *head, w.original.hex(), int(w.flags_dead), runs])
    return sj.window if sj is not None else None


def _as_in_file(proc: "ProbedProcess", module: "Module", address: int, size: int) -> bool:
    """Whether the live bytes at [address, address+size) are the file's: a window found there,
    or no window around, is the file's verdict, not the process's."""
    try:
        return proc.process.read(address, size) == module.read_file(address, size)
    except (DjprobeError, OSError):
        return False


def _near_runs(module: "Module", address: int) -> list[DeadRun]:
    """The dead runs of ``module`` a jmp rel8 at ``address`` reaches."""
    base = address + SHORT_JUMP_SIZE
    lo, hi = base + REL8_MIN, base + REL8_MAX
    return [r for r in dead_runs(module_index(module)) if r.start <= hi and r.end > lo]


def _rebuild(module: "Module", analysis: SiteAnalysis, entry: list) -> tuple[SiteAnalysis | None] | None:
    """The cached verdict: (window or None,), or None when the entry does not apply."""
    function = analysis.function
    assert function is not None
    bias, address = module.bias, analysis.address
    if int(entry[1], 16) != function.address - bias or entry[2] != function.size:
        return None
    if entry[0] == "n":
        return (None,)
    if entry[0] != "s":
        return None
    raw, flags_dead = bytes.fromhex(entry[3]), bool(entry[4])
    if len(raw) < SHORT_JUMP_SIZE or module.read_file(address, len(raw)) != raw:
        return None
    displaced = tuple(decode(raw, address, module.arch.bits))
    if any(i.flow is Flow.INVALID for i in displaced) or sum(i.length for i in displaced) != len(raw):
        return None
    near = [DeadRun(int(s) + bias, int(e) + bias, str(a)) for s, e, a in entry[5]]
    spot = nearest_springboard([r.start for r in near], near, address)
    if spot is None:
        return None
    _NEAR.setdefault(module, {})[address] = near
    reason = (f"short jump: displaces {len(displaced)} instruction(s), {len(raw)} bytes; "
              f"jmp rel8 to a springboard at {spot[0]:#x} in the padding after {spot[1].after}")
    window = replace(analysis, size=len(raw), verdict=Verdict.SHORT_JUMP, reason=reason, displaced=displaced,
                     flags_dead=flags_dead, padding=(), springboard=spot[0], busy=False)
    return (window,)


def springboard(module: "Module", address: int, taken: set[int]) -> tuple[int, DeadRun] | None:
    """The nearest springboard (5 dead bytes, none in ``taken``) a jmp rel8 at ``address``
    reaches, among the runs found (or cached) for it; the module's index only if none were."""
    near = _NEAR.get(module, {}).get(address)
    if near is None:
        near = _near_runs(module, address)
        _NEAR.setdefault(module, {})[address] = near
    return nearest_springboard([r.start for r in near], near, address, taken)
