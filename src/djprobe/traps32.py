"""Recording trap probes in 32-bit (i386) processes: what the samples hold, and the record row.

A 32-bit function's arguments are on the stack (cdecl), not in registers, so a recording trap in
a 32-bit process asks perf for the user stack as well (``PERF_SAMPLE_STACK_USER``: 32 bytes from
``esp``) and for the i386 registers (perf's AX..FLAGS: a compat task's ``pt_regs``). The row
is laid out as a 32-bit jump probe's record (:data:`djprobe.stubs32.SLOTS32`): the words
``[esp+4]`` ... ``[esp+24]`` in the argument slots, ``ecx edx esi edi`` in the r12..r15 slots,
so :class:`djprobe.events32.Regs32`, prototypes (:mod:`djprobe.prototypes32`) and ``trace`` read
traps and jumps alike. Strings are not copied at a trap (as on x86-64).
"""

from __future__ import annotations

import struct

from ._sys import perf
from .area import ARG_REGISTERS, REGISTER_NAMES
from .stubs32 import SLOTS32

__all__ = ["STACK_BYTES", "regs_mask32", "row32"]

#: the bytes of user stack sampled: the return address and six argument words (28 bytes), rounded
#: up to the multiple of 8 perf wants
STACK_BYTES = -(-4 * (1 + len(ARG_REGISTERS)) // 8) * 8
_PERF_NAME = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi", "ebp": "rbp",
              "esp": "rsp", "eflags": "rflags"}
_BITS = sorted(perf.PERF_REGS[_PERF_NAME[r]] for r in SLOTS32)
#: REGISTER_NAMES index (the record slot) of each sampled register, in sample order
_SLOT_OF_BIT = {perf.PERF_REGS[_PERF_NAME[r]]: REGISTER_NAMES.index(slot) for r, slot in SLOTS32.items()}
_ORDER = [_SLOT_OF_BIT[b] for b in _BITS]
_ARG_SLOTS = [REGISTER_NAMES.index(n) for n in ARG_REGISTERS]


def regs_mask32() -> int:
    """perf's ``sample_regs_user`` mask of the i386 registers a 32-bit record holds."""
    return sum(1 << b for b in _BITS)


def row32(body: bytes, offset: int) -> list[int]:
    """The record row of a 32-bit sample whose ``abi`` word is at ``offset`` of ``body`` (the
    registers and the stack dump follow it)."""
    row = [0] * len(REGISTER_NAMES)
    (abi,) = struct.unpack_from("<Q", body, offset)
    at = offset + 8
    if abi:
        values = struct.unpack_from(f"<{len(_ORDER)}Q", body, at)
        for k, v in zip(_ORDER, values):
            row[k] = v & 0xFFFFFFFF
        at += 8 * len(_ORDER)
    (size,) = struct.unpack_from("<Q", body, at)
    if size >= 4 * (1 + len(ARG_REGISTERS)):
        words = struct.unpack_from(f"<{len(ARG_REGISTERS) + 1}I", body, at + 8)
        for slot, word in zip(_ARG_SLOTS, words[1:]):
            row[slot] = word
    return row
