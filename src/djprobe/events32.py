"""The handler's view of a 32-bit (i386) event: :class:`Regs32`.

A 32-bit record is written in the x86-64 record layout (see :data:`djprobe.stubs32.SLOTS32`):
the cdecl arguments ``[esp+4]``... are in the argument slots (``arg0``...``arg5``, what ``trace``
prints), the registers in the slots named by ``SLOTS32``.
"""

from __future__ import annotations

from .area import REGISTER_NAMES
from .events import Regs
from .stubs32 import SLOTS32

__all__ = ["Regs32", "REGISTERS32"]

#: the i386 registers a handler sees, in pt_regs order
REGISTERS32 = ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "esp", "eflags")


class Regs32(Regs):
    """Registers of a 32-bit thread at the probe: ``eax`` ... ``edi``, ``esp``, ``eflags``;
    ``arg0`` ... ``arg5`` are the cdecl arguments ``[esp+4]`` ... ``[esp+24]`` (at a function's
    entry); ``retval`` is ``eax`` and ``retval64`` is ``edx:eax`` (a 64-bit return value)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in REGISTERS32}

    @property
    def retval(self) -> int:
        return self.eax  # type: ignore[attr-defined]

    @property
    def retval64(self) -> int:
        return self.edx << 32 | self.eax  # type: ignore[attr-defined]

    @property
    def flags(self) -> int:
        return self.eflags  # type: ignore[attr-defined]


def _slot(index: int) -> property:
    return property(lambda self: int(self._regs[self._k, index]))


for _name, _slot_name in SLOTS32.items():
    setattr(Regs32, _name, _slot(REGISTER_NAMES.index(_slot_name)))
