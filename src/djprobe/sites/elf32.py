"""ELF facts of 32-bit (i386) files that differ from x86-64: code pointers from ``SHT_REL``
relocations (the addend is in the place) and RELR with 4-byte words, and the address of the GOT
that PIC code addresses its data (and jump tables, and taken code addresses) from."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .elf import _ElfFacts

_SHF_ALLOC = 0x2
_R_386_32 = 1
_R_386_RELATIVE = 8
_R_386_IRELATIVE = 42


def code_pointers32(facts: "_ElfFacts", sections: dict, data: bytes) -> list[np.ndarray]:
    """Every code address the dynamic loader puts in memory (``R_386_RELATIVE``, ``IRELATIVE``,
    ``R_386_32`` of a defined symbol, RELR), as arrays of file vaddrs (not yet filtered)."""
    out: list[np.ndarray] = []
    dynsym_values = None
    dynsym = sections.get(".dynsym")
    if dynsym is not None and dynsym["sh_size"]:
        raw = data[dynsym["sh_offset"] : dynsym["sh_offset"] + dynsym["sh_size"]]
        arr = np.frombuffer(raw[: len(raw) // 16 * 16], dtype=np.dtype(
            [("name", "<u4"), ("value", "<u4"), ("size", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2")]
        ))
        dynsym_values = np.where(arr["shndx"] != 0, arr["value"], 0).astype(np.uint64)
    rel_t = np.dtype([("off", "<u4"), ("info", "<u4")])
    for sec in sections.values():
        if not sec["sh_size"]:
            continue
        if sec["sh_type"] == "SHT_REL" and sec["sh_flags"] & _SHF_ALLOC:
            raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
            r = np.frombuffer(raw[: len(raw) // 8 * 8], dtype=rel_t)
            typ = r["info"] & 0xFF
            sym = (r["info"] >> 8).astype(np.int64)
            want = (typ == _R_386_RELATIVE) | (typ == _R_386_IRELATIVE) | ((typ == _R_386_32) & (sym > 0))
            vals = []
            for off, t, s in zip(r["off"][want].tolist(), typ[want].tolist(), sym[want].tolist()):
                try:
                    (addend,) = struct.unpack("<I", facts.image.read(off, 4))
                except ValueError:
                    continue
                if t == _R_386_32:
                    if dynsym_values is None or s >= len(dynsym_values) or not dynsym_values[s]:
                        continue
                    addend = (addend + int(dynsym_values[s])) & 0xFFFFFFFF
                vals.append(addend)
            out.append(np.array(vals, dtype=np.uint64))
        elif sec["sh_type"] in ("SHT_RELR", 19):
            out.append(_relr32(facts, data, sec))
    return out


def _relr32(facts: "_ElfFacts", data: bytes, sec) -> np.ndarray:
    raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
    places = []
    where = 0
    for (entry,) in struct.iter_unpack("<I", raw[: len(raw) // 4 * 4]):
        if not entry & 1:
            where = entry
            places.append(where)
            where += 4
        else:
            bits = entry >> 1
            for i in range(31):
                if bits >> i & 1:
                    places.append(where + i * 4)
            where += 31 * 4
    out = []
    for v in places:
        try:
            out.append(struct.unpack("<I", facts.image.read(v, 4))[0])
        except ValueError:
            pass
    return np.array(out, dtype=np.uint64)


def got_address(sections: dict) -> int | None:
    """The file vaddr of ``_GLOBAL_OFFSET_TABLE_`` (the start of ``.got.plt``, else of ``.got``):
    the value PIC code keeps in its GOT register (``call __x86.get_pc_thunk.bx; add ebx, N``)."""
    for name in (".got.plt", ".got"):
        sec = sections.get(name)
        if sec is not None and sec["sh_addr"]:
            return int(sec["sh_addr"])
    return None
