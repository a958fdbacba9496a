"""A prototype laid out for 32-bit (i386) code: ILP32 types on the cdecl stack.

In a 32-bit process ``long``, ``size_t``, pointers and their kin are 32 bits wide, and every
parameter is on the stack at a function's entry: ``[esp+4]``, ``[esp+8]``, ... one 4-byte word
each, two (low word first) for a 64-bit integer (``long long``, ``int64_t``, ``off64_t``). The
record stubs of 32-bit processes copy the first six words into the six argument slots
(:mod:`djprobe.stubs32`, :mod:`djprobe.fetch_stubs32`); :func:`cdecl_prototype` says which slots
each parameter takes (``Prototype.slots``), so a parameter beyond the sixth word is not shown,
and a ``char *`` is fetched from the word that holds it.
"""

from __future__ import annotations

import dataclasses

from .prototypes import CType, Param, Prototype

__all__ = ["cdecl_prototype", "ilp32_type"]

#: types whose width differs in ILP32 (the rest are as on x86-64: ``long long`` stays 64 bits)
_ILP32_BITS = {
    "long": 32, "long int": 32, "signed long": 32, "signed long int": 32,
    "unsigned long": 32, "unsigned long int": 32,
    "size_t": 32, "ssize_t": 32, "off_t": 32, "ptrdiff_t": 32, "intptr_t": 32, "uintptr_t": 32, "time_t": 32,
}  # fmt: skip
_QUALIFIERS = {"const", "volatile", "restrict", "__restrict", "__restrict__"}


def ilp32_type(t: CType) -> CType:
    """``t`` as a 32-bit process has it: pointers and strings 32 bits, ``long`` and the
    pointer-sized typedefs 32 bits (glibc's default ``off_t`` and ``time_t`` too)."""
    if t.kind in ("pointer", "string"):
        return dataclasses.replace(t, bits=32)
    base = " ".join(w for w in t.spelling.split() if w not in _QUALIFIERS)
    bits = _ILP32_BITS.get(base)
    return dataclasses.replace(t, bits=bits) if bits is not None else t


def cdecl_prototype(prototype: Prototype) -> Prototype:
    """``prototype`` with ILP32 types and the cdecl stack words of each parameter in ``slots``
    (argument slot i = ``[esp+4+4*i]`` at the entry). A prototype already laid out comes back as
    it is."""
    if prototype.slots is not None:
        return prototype
    params: list[Param] = []
    slots: list[tuple[int, int]] = []
    word = 0
    for p in prototype.params:
        t = ilp32_type(p.type)
        n = 2 if t.bits > 32 else 1
        params.append(Param(p.name, t))
        slots.append((word, n))
        word += n
    return Prototype(tuple(params), prototype.variadic, tuple(slots))
