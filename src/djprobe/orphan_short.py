"""Orphan short jumps: a patched ``jmp rel8`` leading to a springboard (a ``jmp rel32`` into a
stub slot, in dead padding) that no table entry accounts for, e.g. in a child forked while probed
(``forks.py`` gives it fresh private data, so its table is empty, but its code holds the parent's
jumps). ``recovery.cleanup`` undoes them after the sites of the entries it trusts and their springboards,
before the orphan ``jmp rel32`` jumps, in the order a tracer removes a short jump (``springboards.remove``):

1. each rel8 leading to the springboard goes back to the file's 2 bytes, if every byte that
   differs from the file within 16 bytes of it and of the springboard is a rel8 or springboard
   of such a pair: nothing else of anyone's is patched there;
2. then a thread standing at the springboard goes on at the stub it leads to (it took the rel8);
3. then the file's bytes go back at the springboard, if they are padding (nops, ``int3``).

A rel8 that fails its check keeps the springboard, and the area stays mapped (the rel8 still
leads there). Threads inside the stub run out of it, and stack words pointing into it keep the
area mapped, as for every jump (``recovery._leave_stubs``, ``_references``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._sys.procfs import ProcessMemory
    from .process import Process
    from .symbols import Symbols

__all__ = ["ShortOrphan", "find", "restore"]

#: Bytes each side of a rel8 and of a springboard whose differences from the file must all be
#: explained by orphan short jumps (their rel8s and springboards).
CLEAN_AROUND = 16


@dataclass
class ShortOrphan:
    """A patched ``jmp rel8`` at ``site`` leading to a springboard: a ``jmp rel32`` to
    ``target``, the start of a stub slot of ``area`` (a ``recovery.FoundArea``)."""

    site: int
    springboard: int
    target: int
    site_original: bytes  # the file's 2 bytes at the site
    board_original: bytes  # the file's 5 bytes at the springboard
    area: object


def find(memory: "ProcessMemory", maps: list, symbols: "Symbols", areas: list, known: set[int]) -> tuple[list[ShortOrphan], list[tuple[object, str]]]:
    """Orphan short jumps into the stub slots of ``areas``, found by comparing every
    executable file mapping with its file: a ``jmp rel8`` differing from the file, not at one of
    ``known`` (sites of table entries that stay), landing on a ``jmp rel32`` (differing from the
    file) to a slot start. A springboard is taken with all its rel8s only if every byte that
    differs from the file within :data:`CLEAN_AROUND` of each of them and of it belongs to such
    a rel8 or springboard; else it is returned with why it stays (its area, the reason)."""
    from .recovery import changed_code

    live = [a for a in areas if a.valid and a.layout is not None]
    found: list[ShortOrphan] = []
    kept: list[tuple[object, str]] = []
    if not live:
        return found, kept
    for lo, now, disk, diff in changed_code(memory, maps, symbols, 7):
        changed = {lo + int(d) for d in diff}
        pairs: list[ShortOrphan] = []
        for p in sorted({int(d) - k for d in diff for k in (0, 1) if int(d) - k >= 0}):
            if now[p] != 0xEB or p + 2 > len(now) or lo + p in known:
                continue
            sb = p + 2 + int.from_bytes(now[p + 1:p + 2], "little", signed=True)
            if sb < 0 or sb + 5 > len(now) or now[sb] != 0xE9 or now[sb:sb + 5] == disk[sb:sb + 5]:
                continue
            target = lo + sb + 5 + int.from_bytes(now[sb + 1:sb + 5], "little", signed=True)
            owner = next((a for a in live if a.slot_start(target)), None)
            if owner is None:
                continue
            pairs.append(ShortOrphan(lo + p, lo + sb, target, disk[p:p + 2], disk[sb:sb + 5], owner))
        explained = {a for o in pairs for a in (*range(o.site, o.site + 2), *range(o.springboard, o.springboard + 5))}
        bad_boards: dict[int, str] = {}
        for o in pairs:
            for at in (o.site, o.springboard):
                stray = sorted(a for a in changed - explained if at - CLEAN_AROUND <= a < at + 5 + CLEAN_AROUND)
                if stray:
                    bad_boards.setdefault(o.springboard, f"the code at {stray[0]:#x}, near the jmp rel8 at "
                                          f"{o.site:#x} or its springboard {o.springboard:#x}, differs from the file")
        for o in pairs:
            if o.springboard in bad_boards:
                kept.append((o.area, bad_boards[o.springboard]))
            else:
                found.append(o)
    return found, kept


def restore(process: "Process", orphans: list[ShortOrphan]) -> list[tuple[ShortOrphan, str]]:
    """Undo ``orphans`` (from :func:`find`), world stopped: every rel8 back to the file's bytes
    first, then at each springboard a thread standing there goes on at its stub, then the file's
    bytes, if they are padding (nops, ``int3``). Returns those whose springboard stays, with why
    (their rel8s are gone: the springboard is dead bytes, harmless)."""
    from .recovery import _all_nops

    memory = process.memory
    for o in orphans:
        memory.write(o.site, o.site_original)
    boards = {o.springboard: o for o in orphans}
    stays: list[tuple[ShortOrphan, str]] = []
    threads = [t for t in process.threads.values() if not t.gone]
    for sb, o in boards.items():
        if any(b not in (0x90, 0xCC) for b in o.board_original) and not _all_nops(o.board_original, sb):
            stays.append((o, f"the file's bytes at the springboard {sb:#x} ({o.board_original.hex()}) are not padding"))
            continue
        for thread in threads:
            regs = thread.regs()
            if sb <= regs.rip < sb + 5:
                regs = regs.copy()
                regs.rip = o.target
                thread.set_regs(regs)
        memory.write(sb, o.board_original)
    return stays
