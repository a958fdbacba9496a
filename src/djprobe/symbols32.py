"""What the symbol layer reads differently in 32-bit (i386) files: ``SHT_REL`` relocations (the
addend is in the place, read from the file) and the i386 relocation types that resolve IFUNC
symbols (``R_386_IRELATIVE``; ``R_386_GLOB_DAT``/``JUMP_SLOT``/``R_386_32`` GOT slots)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .symbols import _ElfInfo

R_386_32 = 1
R_386_GLOB_DAT = 6
R_386_JUMP_SLOT = 7
R_386_IRELATIVE = 42


def rel_relocations(info: "_ElfInfo") -> list[tuple[int, int, int, int]]:
    """(r_offset, type, symbol index, addend) of every allocated ``SHT_REL`` entry of a 32-bit
    file; the addend is the word at ``r_offset`` in the file (None-free: 0 where unreadable)."""
    out = []
    for off, size, _entsize in info._rel_sections:
        data = info.read_at(off, size)
        for r_offset, r_info in struct.iter_unpack("<II", data[: len(data) // 8 * 8]):
            addend = 0
            for load in info.loads:
                if load.vaddr <= r_offset < load.vaddr + load.filesz:
                    raw = info.read_at(load.offset + r_offset - load.vaddr, 4)
                    if len(raw) == 4:
                        (addend,) = struct.unpack("<I", raw)
                    break
            out.append((r_offset, r_info & 0xFF, r_info >> 8, addend))
    return out
