"""Return probes: a ``Djprobe(..., at="return")`` placed as one jump instance per exit window.

The exits of the function and their windows come from :mod:`djprobe.sites.exits`. Each window
becomes an internal *part*: a ``Djprobe`` with the window as its preset analysis, whose stub runs
the action right before the relocated exit instruction (see ``stubs.py``). The return probe is the
sum of its parts: ``hits`` counts returns (exactly), events of every part are the return probe's
(``regs.retval`` is ``rax``), and its handler is called with the return probe itself.

:class:`~djprobe.probes.ProbedProcess` calls the hooks here: :func:`expand` replaces the return
probes of a registration by their parts, :func:`same_group` keeps the parts of one return probe
in one stop of the world, :func:`settle` removes the parts of a return probe that was refused in
part (it is refused as a whole), :func:`parts_of` gives the parts to remove, :func:`join_conflict`
keeps an entry probe and an exit window from sharing a stub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from . import short_exits
from .errors import DjprobeError, InvalidSiteError, SiteBusyError
from .sites import ExitAnalysis, SiteAnalysis, analyse_exits

if TYPE_CHECKING:
    from .probes import Djprobe, Instance, ProbedProcess

__all__ = ["analyse_return", "expand", "same_group", "settle", "parts_of", "join_conflict"]


def analyse_return(proc: "ProbedProcess", djp: "Djprobe") -> ExitAnalysis:
    """Resolve the function of the return probe ``djp`` and analyse its exits (live bytes
    checked). Raises InvalidSiteError if the spec names several functions; a refused analysis is
    returned (its ``error()`` says why)."""
    from .overlaps import unpatched_memory

    site = proc.resolve_site(djp.addr)
    func = getattr(site, "function", None)
    memory = unpatched_memory(proc, func.address, func.address + func.size) if func is not None else proc.process.memory
    exits = analyse_exits(proc.symbols, site, memory)  # type: ignore[arg-type]
    return short_exits.with_short_windows(proc, exits, memory.read)  # springboards on: short exit windows


def _forward(parent: "Djprobe"):
    def handler(_part: "Djprobe", regs: object) -> None:
        if parent.handler is not None:
            parent.handler(parent, regs)

    return handler


def _part(parent: "Djprobe", window: SiteAnalysis) -> "Djprobe":
    from .probes import Djprobe

    part = Djprobe(window.address, None, _forward(parent) if parent.handler is not None else None,
                   record=parent.record, registers=parent.registers, lossless=parent.lossless)
    part.size = window.size
    part._parent = parent
    part._preset = window
    return part


def expand(proc: "ProbedProcess", djps: Sequence["Djprobe"], refused: list) -> list["Djprobe"]:
    """``djps`` with every return probe replaced by one part per exit window. A return probe
    whose function is refused (some exit cannot take a jump) goes to ``refused`` with the error."""
    out: list[Djprobe] = []
    for djp in djps:
        if djp.at != "return":
            out.append(djp)
            continue
        if djp.registered:
            refused.append((djp, InvalidSiteError(f"{djp!r} is already registered")))
            continue
        try:
            exits = analyse_return(proc, djp)
            if not exits.ok:
                for e in exits.exits:
                    other = proc._overlapping(e.window.address, e.insn.end - e.window.address)
                    if other is not None and not e.ok:
                        raise SiteBusyError(f"{exits.site}: the window of exit '{e.insn.text}' at {e.insn.address:#x} "
                                            f"overlaps the probe at {other.address:#x}", address=e.window.address)
                raise exits.error()
        except DjprobeError as exc:
            refused.append((djp, proc._site_error(exc)))
            continue
        djp.exits = exits
        djp.address = exits.address
        djp.site = exits.site
        djp._parts = [_part(djp, w) for w in exits.windows]
        out.extend(djp._parts)
    return out


def same_group(djp: "Djprobe", pending: list) -> bool:
    """Whether the next pending insertion (``pending[-1]``, a plan or a probe) is a part of the
    same return probe as ``djp``: they go in under one stop of the world."""
    if not pending or djp._parent is None:
        return False
    nxt = pending[-1]
    nxt = nxt[0] if isinstance(nxt, list) else nxt
    return nxt is not None and getattr(nxt, "_parent", None) is djp._parent


def settle(proc: "ProbedProcess", refused: list) -> list:
    """Refuse as a whole each return probe some part of which was refused: its placed parts are
    removed again, and it is reported once, with the error of the exit that failed."""
    out = []
    failed: dict[int, tuple[Djprobe, DjprobeError]] = {}
    for djp, exc in refused:
        parent = djp._parent
        if parent is None:
            out.append((djp, exc))
        elif id(parent) not in failed:
            window = djp._preset
            where = f"exit window at {window.address:#x} (ending with '{window.exit.text}' at {window.exit.address:#x})" \
                if window is not None and window.exit is not None else \
                f"entry window at {window.address:#x}" if window is not None else "an exit window"
            err = type(exc)(f"{parent.site}: {where}: {exc}", address=getattr(exc, "address", None))
            failed[id(parent)] = (parent, err)
    for parent, err in failed.values():
        placed = [p for p in parent._parts or [] if p.registered]
        if placed:
            proc.unregister_many(placed)
        parent._parts = None
        out.append((parent, err))
    return out


def parts_of(djps: Iterable["Djprobe"]) -> list["Djprobe"]:
    """``djps`` with every return probe replaced by its registered parts (for removal)."""
    out: list[Djprobe] = []
    for djp in djps:
        if djp._parts is not None:  # a return or latency probe
            out.extend(p for p in djp._parts if p.registered)
        else:
            out.append(djp)
    return out


def join_conflict(existing: "Instance", analysis: SiteAnalysis) -> str | None:
    """Why a probe with ``analysis`` cannot share the instance ``existing`` at the same address,
    or None: an exit window's action runs at its exit instruction, an entry probe's at its first
    byte, so they share a stub only for the same exit, when the window is the exit alone, or when
    it acts at the entry (``exit_early``)."""
    if existing.analysis.exit == analysis.exit:
        return None
    windows = [a for a in (existing.analysis, analysis) if a.exit is not None]
    if len(windows) == 1 and existing.size == analysis.size and (
            windows[0].displaced == (windows[0].exit,) or windows[0].exit_early):
        return None  # the window is the exit alone, or acts at the entry: the same stub
    if existing.analysis.exit is not None:
        return (f"the exit window of a return probe (ending at {existing.analysis.exit.address:#x}) is at this "
                "address; an entry probe cannot share it")
    return "an entry probe is at this address; the exit window of a return probe cannot share it"
