"""Whole instructions kept as their bytes and decoded when asked (:class:`PackedInsns`).

A decoded instruction costs about 230 bytes of tracer memory (the :class:`~djprobe.x86.decode.Insn`,
iced's ``Instruction``, two integers); 20,000 probes of a whole process keep about 45,000 of
them as their displaced instructions, needed again only to build a stub, to move a thread or
to show the site. A :class:`PackedInsns` keeps the bytes, the address and the mode, and decodes
them again on each access (a few microseconds for the one to four instructions of a site).
"""

from __future__ import annotations

from typing import Iterator, Sequence, overload

from .decode import Insn, decode

__all__ = ["PackedInsns"]


class PackedInsns(Sequence[Insn]):
    """A read-only sequence of the whole instructions in ``raw`` at ``address`` (``bits``: 64 or
    32), equal to (and hashed as) the tuple of their :class:`Insn`; slices and ``+`` give tuples.
    Nothing decoded is kept: each access decodes ``raw`` again."""

    __slots__ = ("raw", "address", "bits", "_count")

    def __init__(self, raw: bytes, address: int, bits: int = 64, count: int | None = None) -> None:
        self.raw = bytes(raw)
        self.address = address
        self.bits = bits
        self._count = len(decode(self.raw, address, bits)) if count is None else count

    @classmethod
    def of(cls, insns: Sequence[Insn]) -> "PackedInsns | tuple[Insn, ...]":
        """``insns`` packed when they are contiguous and decode back to themselves from their
        bytes (anything else stays a tuple)."""
        insns = tuple(insns)
        if not insns:
            return ()
        raw = b"".join(i.raw for i in insns)
        packed = cls(raw, insns[0].address, insns[0].bits, len(insns))
        return packed if packed.decoded() == insns else insns

    def decoded(self) -> tuple[Insn, ...]:
        """The instructions, decoded now."""
        return tuple(decode(self.raw, self.address, self.bits))

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Insn]:
        return iter(self.decoded())

    @overload
    def __getitem__(self, index: int) -> Insn: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Insn, ...]: ...

    def __getitem__(self, index: int | slice) -> Insn | tuple[Insn, ...]:
        return self.decoded()[index]

    def __add__(self, other: Sequence[Insn]) -> tuple[Insn, ...]:
        return self.decoded() + tuple(other)

    def __radd__(self, other: Sequence[Insn]) -> tuple[Insn, ...]:
        return tuple(other) + self.decoded()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedInsns):
            return (self.raw, self.address, self.bits) == (other.raw, other.address, other.bits)
        if isinstance(other, (tuple, list)):
            return self.decoded() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.decoded())

    def __repr__(self) -> str:
        return f"PackedInsns({self.raw.hex()!r}, {self.address:#x}, bits={self.bits}, {self._count} instruction(s))"
