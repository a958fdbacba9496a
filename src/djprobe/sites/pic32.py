"""Code addresses taken by 32-bit (i386) code, found by a byte scan as the x86-64 scan finds
``lea reg, [rip+disp32]``: i386 has no RIP-relative operand, so a PIC function takes an address
as ``lea reg, [GOTREG+disp32]`` (``func@GOTOFF``: the target is the GOT address plus the
displacement, whatever register holds the GOT), and a non-PIC one as ``lea reg, [disp32]``.
Every such candidate whose target falls in code is a possible entry (a false one only refuses
a site)."""

from __future__ import annotations

import numpy as np
from typing import TYPE_CHECKING

from iced_x86 import Mnemonic, Register

from ..x86 import Insn

if TYPE_CHECKING:
    from .index import ModuleIndex

_U32 = 0xFFFFFFFF
#: ``mov REG, [esp]; ret``: the body of ``__x86.get_pc_thunk.REG``, by its ModRM byte
_THUNKS = {0x04 | n << 3: reg for n, reg in enumerate(
    (Register.EAX, Register.ECX, Register.EDX, Register.EBX, None, Register.EBP, Register.ESI, Register.EDI))
    if reg is not None}


def lea_candidates32(a: np.ndarray, pad: np.ndarray, addr: np.ndarray, got: int | None):
    """(targets, sources) of every byte position of ``a`` (code at runtime ``addr``) that may
    encode ``lea r32, [disp32]`` or ``lea r32, [reg(+idx*s)+disp32]``; ``got`` is the runtime
    GOT address (None: no GOT, PIC forms skipped)."""
    n = len(a)
    pos = np.arange(n, dtype=np.int64)
    modrm = pad[1 : n + 1]
    is_lea = a == 0x8D

    def disp_at(at: np.ndarray) -> np.ndarray:
        return (
            pad[at].astype(np.int64)
            | (pad[at + 1].astype(np.int64) << 8)
            | (pad[at + 2].astype(np.int64) << 16)
            | (pad[at + 3].astype(np.int64) << 24)
        )

    tg, sr = [], []
    p = pos[is_lea & ((modrm & 0xC7) == 0x05)]  # mod=00 rm=101: [disp32]
    tg.append(disp_at(p + 2))
    sr.append(addr[p])
    if got is not None:
        p = pos[is_lea & ((modrm & 0xC0) == 0x80) & ((modrm & 0x07) != 0x04)]  # [reg+disp32]
        tg.append((disp_at(p + 2) + got) & _U32)
        sr.append(addr[p])
        p = pos[is_lea & ((modrm & 0xC0) == 0x80) & ((modrm & 0x07) == 0x04)]  # [sib+disp32]
        tg.append((disp_at(p + 3) + got) & _U32)
        sr.append(addr[p])
    return np.concatenate(tg), np.concatenate(sr)


def lea_reaches32(ins: Insn, target: int, got: int | None) -> bool:
    """Is ``ins`` a ``lea`` whose address is ``target`` (absolute, or GOT-relative)?"""
    instr = ins.instruction
    if instr.mnemonic != Mnemonic.LEA:
        return False
    disp = instr.memory_displacement & _U32
    if instr.memory_base == Register.NONE and instr.memory_index == Register.NONE:
        return disp == target
    return got is not None and (disp + got) & _U32 == target


def pc_thunk_register(ix: "ModuleIndex", address: int) -> int | None:
    """The register that the function at ``address`` sets to its return address, if it is a PC
    thunk (``mov REG, [esp]; ret``: ``__x86.get_pc_thunk.REG``, named or not), else None."""
    cache = ix.__dict__.setdefault("_pc_thunks", {})
    if address in cache:
        return cache[address]
    try:
        code = ix._read(address, 4)
    except Exception:  # noqa: BLE001
        code = b""
    reg = _THUNKS.get(code[1]) if len(code) == 4 and code[0] == 0x8B and code[2] == 0x24 and code[3] == 0xC3 else None
    cache[address] = reg
    return reg
