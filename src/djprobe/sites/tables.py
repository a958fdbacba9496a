"""Reading jump tables: the targets of a register-indirect ``jmp`` from the value its register
holds there (:mod:`.slices`), each table read as far as its guard allows, or, without a guard,
over instruction starts of its function up to the next table."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from ..x86 import Insn
from .slices import _MAX_TABLE, _Slicer, _Val

if TYPE_CHECKING:
    from .index import ModuleIndex


def targets_of(ix: "ModuleIndex", v: _Val, slicer: _Slicer, ins: Insn) -> tuple[int, int, list[int]] | None:
    """(jmp, table address, targets) of a jmp through a register holding ``v``; targets
    already known as ways in (code pointers: address-taken points) are left out. None: unknown."""
    alts = v.alts if v.kind == "set" else (v,)
    targets: set[int] = set()
    table = 0
    for a in alts:
        if a.kind in ("ptr", "loop"):
            continue  # a code pointer: lands only on address-taken points (a tail call)
        if a.kind == "const":
            # jmp to a constant address (lea-taken label, non-PIE immediate): that one
            if ix.in_code(a.value):  # elsewhere: lands in no code of this module
                targets.add(a.value)
                table = table or a.value
            continue
        found = table_from(ix, a, slicer, ins)
        if found is None:
            return None
        table = table or found[1]
        targets.update(found[2])
    return (ins.address, table, sorted(targets))


def table_from(ix: "ModuleIndex", v: _Val, slicer: _Slicer, ins: Insn) -> tuple[int, int, list[int]] | None:
    """Recognise T + movsxd [T' + idx*4 + d] (in either order); read the table: as many
    entries as the guard on the index allows (``cmp idx, N; ja`` or ``and idx, N``), or one for
    a movsxd [rip + d]. Without a guard, entries while they are instruction starts of the
    function holding the jump, up to the next table."""
    if v.kind != "add" or v.base is None or v.other is None:
        return None
    for const, load in ((v.base, v.other), (v.other, v.base)):
        if not (const.kind == "const" and load.kind == "tload" and load.base is not None
                and load.base.kind == "const"):
            continue
        base = const.value
        table = load.base.value + load.disp
        lreg = ix._regions.get(load.at[0])
        if load.index == 0:
            n: int | None = 1
        else:
            n = slicer.bound(load.index, lreg, load.at[1]) if lreg is not None else None
        if n is not None:
            try:
                raw = ix._read_data(table, 4 * n)
            except Exception:  # noqa: BLE001
                return None
            targets = [base + e for (e,) in struct.iter_unpack("<i", raw)]
            if not all(ix.in_code(t) for t in targets):
                return None
            return (ins.address, table, sorted(set(targets)))
        # No bound found (glibc's assembly: index from bsf, ...): read entries while they
        # land on an instruction start of the function holding the jump (symbol, its .cold
        # parts, its FDE range) and until the start of another table (an address the code
        # takes). Every real entry does, so the real table is a prefix of what is read.
        spans = ix._home_spans(ins.address)
        if not spans:
            return None
        labels = labels_in(ix, table + 4, table + 4 * _MAX_TABLE)
        targets = []
        for i in range(_MAX_TABLE):
            if i and table + 4 * i in labels:
                break
            try:
                (e,) = struct.unpack("<i", ix._read_data(table + 4 * i, 4))
            except Exception:  # noqa: BLE001
                break
            t = base + e
            if not any(lo <= t < hi for lo, hi in spans) or not is_insn_start(ix, t):
                break
            targets.append(t)
        if not targets:
            return None
        return (ins.address, table, sorted(set(targets)))
    return None


def is_insn_start(ix: "ModuleIndex", address: int) -> bool:
    r = ix.region_at(address)
    return r is not None and r.index(address) is not None


def labels_in(ix: "ModuleIndex", lo: int, hi: int) -> set[int]:
    """Addresses in [lo, hi) that an instruction of the module takes or reads RIP-relative
    (``lea``/``movsxd``/``mov reg, [rip + d]``: the start of another table among them); found
    by a byte scan, each confirmed by decoding its source."""
    if ix._labels is None:
        tg, sr = [], []
        for clo, chi in ix.code_ranges():
            try:
                buf = ix._read(clo, chi - clo)
            except Exception:  # noqa: BLE001
                continue
            a = np.frombuffer(buf, dtype=np.uint8)
            n = len(a)
            if n < 6:
                continue
            pad = np.concatenate([a, np.zeros(8, dtype=np.uint8)])
            p = np.nonzero(((a == 0x8D) | (a == 0x63) | (a == 0x8B)) & ((pad[1 : n + 1] & 0xC7) == 0x05))[0]
            rel = (pad[p + 2].astype(np.int64) | (pad[p + 3].astype(np.int64) << 8)
                   | (pad[p + 4].astype(np.int64) << 16) | (pad[p + 5].astype(np.int64) << 24))
            rel = rel.astype(np.uint32).astype(np.int32).astype(np.int64)
            tg.append(p + clo + 6 + rel)
            sr.append(p + clo)
        t = np.concatenate(tg) if tg else np.zeros(0, dtype=np.int64)
        s_ = np.concatenate(sr) if sr else np.zeros(0, dtype=np.int64)
        order = np.argsort(t, kind="stable")
        ix._labels = (t[order], s_[order])
    t, src = ix._labels
    out: set[int] = set()
    for i in range(int(np.searchsorted(t, lo)), int(np.searchsorted(t, hi))):
        label, at = int(t[i]), int(src[i])
        r = ix.region_at(at)
        if r is None:
            continue
        ins = r.insn_containing(at)
        # the opcode byte is at ``at``; a prefix (REX) may start the instruction just before
        if ins is not None and ins.rip_relative and ins.mem_target == label and ins.end == at + 6:
            out.add(label)
    return out
