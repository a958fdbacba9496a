"""The pure x86-64 layer: decoding, relocation of displaced instructions, flag liveness."""

from __future__ import annotations

from .decode import DIRECT_FLOWS, FALLS_THROUGH, Flow, Insn, decode, decode_one, format_instruction, iter_decode
from .flags import STATUS_FLAGS, flags_dead_after, flags_effect
from .relocate import Relocated, RelocationError, max_relocated_size, relocate, relocation_problem

__all__ = [
    "DIRECT_FLOWS",
    "FALLS_THROUGH",
    "Flow",
    "Insn",
    "Relocated",
    "RelocationError",
    "STATUS_FLAGS",
    "decode",
    "decode_one",
    "flags_dead_after",
    "flags_effect",
    "format_instruction",
    "iter_decode",
    "max_relocated_size",
    "relocate",
    "relocation_problem",
]
