"""i386 PIC jump tables: the cases of a ``jmp reg`` whose register was computed from a table of
offsets relative to a base register (the GOT pointer, or the table itself).

The forms recognised (what gcc emits for a ``switch`` in ``-fPIC``/``-fPIE`` code, and glibc's
hand-written ``BRANCH_TO_JMPTBL_ENTRY``), ``G`` a base register, ``I`` the index:

* ``mov R, [G + I*4 + d]; add R, G; jmp R``          (entries ``case@GOTOFF``, ``G`` = GOT)
* ``add G, [G + I*4 + d]; jmp G``                    (the same, one instruction)

with, between them, only straight-line code that writes none of ``R``, ``G``, ``I`` and is
entered from nowhere else. The targets are ``G + entry`` for each entry of the table at ``G +
d``, as many as the guard on ``I`` allows (``cmp I, N; ja``...: :meth:`.slices._Slicer.bound`);
without a guard the jump stays unknown. ``G``'s value comes from the value analysis (``call
__x86.get_pc_thunk.G; add G, imm``, a ``lea G, [G + T@GOTOFF]``); where it was reloaded from a
stack slot (the PIC register spilled under register pressure) and ``d`` is not 0, ``G`` is
taken to be the module's GOT (the only base a ``@GOTOFF`` displacement has), and the table is
accepted only if every entry lands on an instruction start of the function holding the jump.
Anything else is left unknown: its region's sites stay refused.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from iced_x86 import Mnemonic, OpKind, Register

from ..x86 import Flow, Insn
from .slices import _GPR32, _MAX_TABLE, _full, _Region, _Slicer, _writes

if TYPE_CHECKING:
    from .index import ModuleIndex

__all__ = ["pic_table32"]

_U32 = 0xFFFFFFFF
_MAX_GAP = 8  # straight-line instructions looked through between the load, the add and the jmp


def _is_table_operand(instr, base_reg: int | None = None) -> bool:
    return (instr.op1_kind == OpKind.MEMORY and instr.memory_index in _GPR32 and instr.memory_index_scale == 4
            and instr.memory_base in _GPR32 and instr.memory_base != Register.ESP
            and instr.segment_prefix == Register.NONE
            and (base_reg is None or instr.memory_base == base_reg))


def _straight_back(slicer: _Slicer, r: _Region, k: int) -> list[tuple[_Region, int]]:
    """The instructions before r.insns[k] on its only path, nearest first, while each is reached
    by fall-through alone (at most ``_MAX_GAP``)."""
    out = []
    for _ in range(_MAX_GAP):
        preds, entered = slicer.preds(r, k)
        if entered or len(preds) != 1 or preds[0][2]:
            break
        r, k = preds[0][0], preds[0][1]
        out.append((r, k))
    return out


def pic_table32(ix: "ModuleIndex", r: _Region, k: int, ins: Insn) -> tuple[int, int, list[int]] | None:
    """(jmp, table address, targets) of the 32-bit ``jmp reg`` at r.insns[k] if it is one of
    the PIC table forms above with a guarded index, else None (unknown targets)."""
    jreg = ins.instruction.op0_register
    slicer = _Slicer(ix)
    back = _straight_back(slicer, r, k)
    # find the add into the jump register, then (for the two-instruction form) its load
    for n, (ar, ak) in enumerate(back):
        add = ar.insns[ak].instruction
        if not _writes(ar.insns[ak], _full(jreg)):
            continue
        if add.op0_kind != OpKind.REGISTER or add.op0_register != jreg:
            return None
        extra = 0
        if add.mnemonic == Mnemonic.ADD and _is_table_operand(add, jreg):  # add G, [G + I*4 + d]
            return _read(ix, slicer, ins, ar, ak, add, jreg)
        if add.mnemonic == Mnemonic.ADD and add.op1_kind == OpKind.REGISTER and add.op1_register in _GPR32 \
                and add.op1_register != jreg:
            base, loaded = add.op1_register, jreg  # mov R, [G + I*4 + d]; add R, G
        elif add.mnemonic == Mnemonic.LEA and add.memory_index_scale == 1 and add.segment_prefix == Register.NONE \
                and add.memory_base in _GPR32 and add.memory_index in _GPR32:
            # mov X, [G + I*4 + d]; lea R, [G + X + d2] (either order): R = G + entry + d2
            pair = (add.memory_base, add.memory_index)
            extra = add.memory_displacement & _U32
            for base, loaded in (pair, pair[::-1]):
                if _loaded_by(slicer, back[n + 1:], base, loaded) is not None:
                    break
            else:
                return None
        else:
            return None
        found = _loaded_by(slicer, back[n + 1:], base, loaded)
        if found is None:
            return None
        lr, lk = found
        return _read(ix, slicer, ins, lr, lk, lr.insns[lk].instruction, base, extra)
    return None


def _loaded_by(slicer: _Slicer, back: list[tuple[_Region, int]], base: int, loaded: int) -> tuple[_Region, int] | None:
    """The ``mov loaded, [base + I*4 + d]`` among ``back`` (nearest first) with ``base``
    unchanged since, before any other write of ``loaded``."""
    if base == loaded:
        return None
    for lr, lk in back:
        load_ins = lr.insns[lk]
        load = load_ins.instruction
        if _writes(load_ins, _full(base)):
            return None
        if not _writes(load_ins, _full(loaded)):
            continue
        if load.mnemonic == Mnemonic.MOV and load.op0_register == loaded and _is_table_operand(load, base):
            return lr, lk
        return None
    return None


def _read(ix: "ModuleIndex", slicer: _Slicer, ins: Insn, lr: _Region, lk: int, load, base: int,
          extra: int = 0) -> tuple[int, int, list[int]] | None:
    """Read the table of the load at lr.insns[lk] (``[base + I*4 + d]``; ``base`` unchanged up
    to where its value is added): targets ``base + entry + extra``."""
    from .tables import is_insn_start

    index = _full(load.memory_index)
    if _full(base) == index:
        return None
    d = load.memory_displacement & _U32
    try:
        v = slicer.value_before(_full(base), lr, lk, set())
        n = slicer.bound(index, lr, lk)
    except Exception:  # noqa: BLE001 - the budget: unknown
        return None
    strict = False
    if v is not None and v.kind == "const":
        g = v.value & _U32
    else:
        got = ix._got()
        if got is None or d == 0 or n is None:
            return None
        g, strict = got & _U32, True  # a GOTOFF displacement from a reloaded PIC register
    table = (g + d) & _U32
    spans = ix._home_spans(ins.address)

    def home(t: int) -> bool:
        return any(lo <= t < hi for lo, hi in spans) and is_insn_start(ix, t)

    if n is None:
        # No guard (glibc's assembly: the index from bsf ...): entries while they land on an
        # instruction start of the function holding the jump, as tables.table_from does; the
        # real table is a prefix of what is read (what follows it only adds false cases).
        targets: set[int] = set()
        for i in range(_MAX_TABLE):
            try:
                (e,) = struct.unpack("<i", ix._read_data(table + 4 * i, 4))
            except Exception:  # noqa: BLE001
                break
            t = (g + e + extra) & _U32
            if not home(t):
                break
            targets.add(t)
        return (ins.address, table, sorted(targets)) if targets else None
    try:
        raw = ix._read_data(table, 4 * n)
    except Exception:  # noqa: BLE001
        return None
    found = sorted({(g + e + extra) & _U32 for (e,) in struct.iter_unpack("<i", raw)})
    for t in found:
        if not ix.in_code(t) or (strict and not home(t)):
            return None
    return (ins.address, table, found)
