"""Short-jump probes: a ``jmp rel8`` at a site where no ``jmp rel32`` fits, to a springboard (a
``jmp rel32`` to the stub) in dead padding between functions (``sites/springboards.py`` finds
both). On by default; ``ProbedProcess.springboards = False`` turns them off for one process,
``DJPROBE_SPRINGBOARDS=0`` for every process made from then on (``--no-short`` on the command line):
such sites then trap or are refused, as before.

Insertion, world stopped: the stub is written, the instance entry recorded PREPARED with kind
``ENTRY_SHORT`` (its patched bytes are the rel8; the springboard is where the rel8 leads), the
springboard written, threads inside the window moved into the stub, the rel8 written, the entry
marked INSERTED. Removal reverses it: the site's bytes first, then threads standing at the
springboard are moved to its target (they took the rel8), then the padding bytes. ``recovery``
undoes a dead tracer's in the same order.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import TYPE_CHECKING

from .area import ENTRY_SHORT, InstanceEntry, InstanceState
from .errors import DjprobeError, InvalidSiteError, NoRoomError, SiteBusyError
from . import springboard_cache
from .sites import SiteAnalysis, Verdict
from .sites.springboards import SHORT_JUMP_SIZE
from .stubs import Stub, jump_bytes, jump_target

if TYPE_CHECKING:
    from .probes import Djprobe, Instance, ProbedProcess
    from .regions import Region

__all__ = ["SPRINGBOARD_SIZE", "ENV_VARIABLE", "default_on", "plan", "refusal", "in_the_way", "insert", "remove", "repoint", "patch_for", "joins_short"]

#: Size of the springboard (a jmp rel32).
SPRINGBOARD_SIZE = 5

#: The environment variable that sets ``ProbedProcess.springboards`` for new processes.
ENV_VARIABLE = "DJPROBE_SPRINGBOARDS"
_ON = ("", "1", "on", "yes", "true")
_OFF = ("0", "off", "no", "false")


def default_on(environ: "dict[str, str] | None" = None) -> bool:
    """Whether short jumps are placed by default: True unless ``DJPROBE_SPRINGBOARDS`` is
    ``0``/``off``/``no``/``false``. Raises InvalidSiteError (a ValueError) naming the variable
    for any other value."""
    import os

    value = (os.environ if environ is None else environ).get(ENV_VARIABLE, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise InvalidSiteError(f"{ENV_VARIABLE}={value!r}: give 1 (short jumps on, the default) or 0 (off)")


def plan(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis) -> SiteAnalysis | None:
    """The short-jump window for ``djp`` whose site ``analysis`` refused a jmp rel32, as a
    jump verdict with ``springboard`` set (the nearest one now; the one used is chosen at
    insertion), or None: springboards off, a probe of another kind (return, latency, custom
    stub, a size asked for), a 32-bit process, someone else's patch, or no
    short jump fits."""
    if not getattr(proc, "springboards", False) or analysis.ok or analysis.busy or not _plain(djp):
        return None
    if getattr(proc.process, "arch", None) is not None and proc.process.arch.bits != 64:
        return None
    if analysis.module is None or analysis.function is None:
        return None
    window = springboard_cache.short_window(proc, analysis)  # cached with the site verdicts
    if window is None:
        return None
    return replace(window, verdict=Verdict.JUMP, site=analysis.site)


def refusal(analysis: SiteAnalysis, exc: DjprobeError) -> DjprobeError:
    """The error for a site refused a jmp rel32 (``analysis``) whose short jump could not be
    placed either (``exc``: no springboard left, stub memory, bytes changed): the site's own
    reason first, then the short jump's, so that the trap fallback (or the refusal) says why no
    jump went in."""
    why = getattr(exc, "reason", None) or str(exc)
    prefix = f"{analysis.site}: "
    if why.startswith(prefix):
        why = why[len(prefix):]
    reason = f"{analysis.reason}; no short jump either: {why}"
    if analysis.busy or isinstance(exc, SiteBusyError):
        return SiteBusyError(f"{analysis.site}: {reason}", address=analysis.address)
    return InvalidSiteError(f"{analysis.site}: {reason}", address=analysis.address, reason=reason)


def _plain(djp: "Djprobe") -> bool:
    """A count or record probe of its own site (also one copying string arguments): what a
    short jump can serve."""
    return not (djp._preset is not None or djp._latency_role is not None or djp.size is not None
                or getattr(djp, "build_stub", None) is not None or djp.trap == "only")


def _windows_meet(a: int, n: int, b: int, m: int) -> bool:
    return a < b + m and b < a + n


def in_the_way(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis) -> "Instance | None":
    """A short-jump instance whose window or springboard the window of ``analysis`` overlaps,
    unless ``djp`` is a count or record probe at the short jump's own site (it joins that
    instance): nothing but the probes of its own site can share a short jump."""
    size = max(1, analysis.size)
    for sb, inst in proc._springboards.items():
        if inst.address == analysis.address and _plain(djp):
            continue
        if _guest(proc, djp, analysis, inst):
            continue  # it joins the short jump's stub (overlaps.py: a shared stub)
        if _windows_meet(analysis.address, size, inst.address, inst.size) or \
                _windows_meet(analysis.address, size, sb, SPRINGBOARD_SIZE):
            return inst
    return None


def _siblings(djp: "Djprobe") -> set[int]:
    """The bytes of the windows of the other parts of ``djp``'s return or latency probe (a last
    exit's window may take the padding after it): placed in the same stop, perhaps after it."""
    parent = djp._parent
    out: set[int] = set()
    for part in (parent._parts or []) if parent is not None else []:
        w = part._preset
        if part is not djp and w is not None:
            out.update(range(w.address, w.address + max(1, w.size)))
    return out


def _guest(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis, inst: "Instance") -> bool:
    """Whether ``djp`` at ``analysis`` joins the short jump ``inst`` as a guest: an instruction
    boundary inside its window (not its first byte), a count or record probe without strings."""
    from . import overlaps

    return (djp._preset is None and djp.size is None and overlaps.can_share(proc, djp)
            and inst.address < analysis.address < inst.address + inst.size
            and overlaps.host_for(proc, analysis.address) is inst)


def joins_short(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis) -> bool:
    """Whether ``djp``, planned as a short jump of its own, joins instead the placed short jump
    whose window it lies in (planned in the same batch, before that window was known)."""
    inst = proc._overlapping(analysis.address, 1)
    return inst is not None and inst.springboard is not None and _guest(proc, djp, analysis, inst)


def _choose(proc: "ProbedProcess", analysis: SiteAnalysis, djp: "Djprobe") -> tuple[int, bytes]:
    """A springboard for the short jump of ``analysis`` (world stopped): dead bytes in reach,
    not used by another springboard of ours or by any window (also the windows of ``djp``'s
    sibling parts), the same in memory as in the file, no thread at them or holding an address
    in them. Returns its address and its bytes."""
    assert analysis.module is not None
    taken = {b for sb in proc._springboards for b in range(sb, sb + SPRINGBOARD_SIZE)} | _siblings(djp)
    while True:
        spot = springboard_cache.springboard(analysis.module, analysis.address, taken)
        if spot is None:
            raise NoRoomError(f"{analysis.site}: no free springboard (dead padding) within reach of a jmp rel8",
                              address=analysis.address)
        sb = spot[0]
        try:
            ok = (proc._overlapping(sb, SPRINGBOARD_SIZE) is None
                  and proc.process.read(sb, SPRINGBOARD_SIZE) == analysis.module.read_file(sb, SPRINGBOARD_SIZE)
                  and proc._return_into(sb - 1, sb + SPRINGBOARD_SIZE) is None
                  and not any(sb <= t.regs().rip < sb + SPRINGBOARD_SIZE for t in proc.process.threads.values()))
        except DjprobeError:
            ok = False
        if ok:
            return sb, analysis.module.read_file(sb, SPRINGBOARD_SIZE)
        taken.update(range(sb, sb + SPRINGBOARD_SIZE))


def insert(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis,
           prepared: "tuple[Region, int, Stub] | None") -> None:
    """Place a short-jump probe at the site of ``analysis`` (from :func:`plan`), world stopped.

    Raises SiteBusyError (the bytes changed, another window is there, a thread may return into
    the window), NoRoomError (no springboard or stub memory within reach)."""
    from .probes import Instance

    address, size = analysis.address, analysis.size
    other = proc._overlapping(address, size)
    if other is not None:
        raise SiteBusyError(f"{analysis.site}: displaced bytes overlap the probe at {other.address:#x}", address=address)
    original = proc.process.read(address, size)
    if original != analysis.original:
        raise SiteBusyError(f"{analysis.site}: the bytes at the site differ from the file", address=address)
    blocker = proc._return_into(address, address + size)
    if blocker:
        raise SiteBusyError(f"{analysis.site}: {blocker}", address=address)
    sb, padding = _choose(proc, analysis, djp)
    action, registers, lossless = proc._action_for(djp)
    region, slot, stub = prepared or proc._prepare(analysis, action, registers, lossless, part=djp, strings=djp.strings)
    try:
        board = jump_bytes(sb, stub.address)
    except ValueError as exc:
        raise NoRoomError(f"{analysis.site}: {exc}", address=address) from exc
    rel8 = sb - (address + SHORT_JUMP_SIZE)
    patched = bytes([0xEB, rel8 & 0xFF]) + original[SHORT_JUMP_SIZE:]
    entry = InstanceEntry(address=address, stub_address=stub.address, state=InstanceState.PREPARED, size=size,
                          original=original, patched=patched, name=analysis.site[:48], kind=ENTRY_SHORT)
    region.view.set_entry(slot, entry)
    proc.process.write(sb, board)  # dead bytes: nothing runs them until the rel8 is there
    try:
        proc._move_threads_into_stub(analysis, stub)
    except BaseException:
        proc.process.write(sb, padding)
        region.view.set_entry(slot, InstanceEntry())
        raise
    proc.process.write(address, patched[:SHORT_JUMP_SIZE])
    entry.state = InstanceState.INSERTED
    region.view.set_entry(slot, entry)
    instance = Instance(analysis, region, slot, stub, original, patched, action, registers, lossless, djp.strings,
                        springboard=sb, springboard_original=padding)
    proc._instances[address] = instance
    bisect.insort(proc._addresses, address)
    proc._by_slot[(proc._regions.index(region), slot)] = instance
    proc._springboards[sb] = instance
    proc._join(djp, instance, analysis)


def remove(proc: "ProbedProcess", instance: "Instance") -> None:
    """Take the springboard of ``instance`` away once its rel8 is gone (world stopped): a
    thread standing at it goes on at its target, then the padding bytes are back. Left in place
    (dead bytes, harmless) if the site still holds anything but its original bytes."""
    sb = instance.springboard
    if sb is None:
        return
    proc._springboards.pop(sb, None)
    try:
        if proc.process.read(instance.address, instance.size) != instance.original:
            return
        now = proc.process.read(sb, SPRINGBOARD_SIZE)
    except DjprobeError:
        return
    target = jump_target(now, sb)
    if target is None:
        return
    for thread in proc.process.threads.values():
        regs = thread.regs()
        if sb <= regs.rip < sb + SPRINGBOARD_SIZE:
            regs = regs.copy()
            regs.rip = target
            thread.set_regs(regs)
    proc.process.write(sb, instance.springboard_original)


def repoint(proc: "ProbedProcess", instance: "Instance", stub: Stub) -> None:
    """Lead the springboard of ``instance`` to ``stub`` (its new stub; world stopped)."""
    assert instance.springboard is not None
    proc.process.write(instance.springboard, jump_bytes(instance.springboard, stub.address))


def patch_for(proc: "ProbedProcess", instance: "Instance", stub: Stub) -> bytes:
    """Lead ``instance`` to ``stub`` (its rebuilt shared stub; world stopped): a short jump keeps
    its rel8 and its springboard is repointed; else the jmp rel32 at the site is rewritten.
    Returns the jump's bytes at the site."""
    if instance.springboard is not None:
        repoint(proc, instance, stub)
        return instance.patched[:SHORT_JUMP_SIZE]
    patched = jump_bytes(instance.address, stub.address)
    proc.process.write(instance.address, patched)
    return patched
