"""The patch at one address (:class:`Instance`): a stub in a region slot, shared by the probes
placed there.

A whole process holds 20,000 of them, nearly all plain count sites: the attributes every
instance sets are slots, and the ones only record, shared, overlapping, springboard or
removed instances set (action, registers, carried counts, old slots, host and guests, ...) are
class defaults, stored in a per-instance ``__dict__`` created only when one of them is set
(80 bytes per instance instead of 192).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .probes import Djprobe
    from .regions import Region
    from .sites import SiteAnalysis
    from .stubs import Stub

__all__ = ["Instance"]


class Instance:
    """The patch at one address: a stub in a region slot, shared by the probes placed there."""

    __slots__ = ("analysis", "region", "slot", "stub", "original", "patched", "probes", "__dict__")

    # Class defaults: set per instance (in its __dict__) only where they differ.
    action: str = "count"  # or "record", "latency", "custom"
    registers: str = "all"
    lossless: bool = False  # its record stub waits for room while the consumer drains
    strings: int = 0  # argument registers whose strings its stub copies (djprobe.fetch_stubs)
    carried_hits: int = 0  # from earlier stubs of this instance that are given back
    carried_drops: int = 0
    carried_apart: int = 0  # vfork/posix_spawn children's hits (djprobe.vforks), as carried_hits
    # Earlier stubs (region, slot, stub) that a thread may still run through: still counted.
    old_slots: "tuple[tuple[Region, int, Stub], ...]" = ()
    removed: bool = False  # unregistered: its slot is in old_slots until given back
    drained: "tuple[Djprobe, ...]" = ()  # unregistered while a thread was inside
    # Overlapping probes (see overlaps.py): a guest's host, a host's guests.
    host: "Instance | None" = None
    guests: "tuple[Instance, ...]" = ()
    # A short jump (springboards.py): the jmp rel8's springboard and the padding bytes it replaced.
    springboard: int | None = None
    springboard_original: bytes = b""

    def __init__(self, analysis: "SiteAnalysis", region: "Region", slot: int, stub: "Stub", original: bytes,
                 patched: bytes, action: str = "count", registers: str = "all", lossless: bool = False,
                 strings: int = 0, *, host: "Instance | None" = None, springboard: int | None = None,
                 springboard_original: bytes = b"") -> None:
        self.analysis = analysis
        self.region = region
        self.slot = slot
        self.stub = stub
        self.original = original
        self.patched = patched
        self.probes: tuple[Djprobe, ...] = ()  # a tuple: one probe per site nearly always
        # only what differs from the class defaults goes into the instance's __dict__
        for name, value in (("action", action), ("registers", registers), ("lossless", lossless),
                            ("strings", strings), ("host", host), ("springboard", springboard),
                            ("springboard_original", springboard_original)):
            if value is not getattr(Instance, name) and value != getattr(Instance, name):
                setattr(self, name, value)

    def __repr__(self) -> str:
        return (f"<Instance {self.analysis.site} at {self.address:#x}, {self.action} stub at "
                f"{self.stub.address:#x}, {len(self.probes)} probe(s){', removed' if self.removed else ''}>")

    @property
    def address(self) -> int:
        return self.analysis.address

    @property
    def size(self) -> int:
        return self.analysis.size

    def count(self) -> int:
        live = 0 if self.removed else self.region.view.count(self.slot)
        return self.carried_hits + live + sum(r.view.count(i) for r, i, _ in self.old_slots)

    def apart(self) -> int:
        """Hits of vfork/posix_spawn children before their exec (see :mod:`djprobe.vforks`)."""
        live = 0 if self.removed else self.region.view.apart(self.slot)
        return self.carried_apart + live + sum(r.view.apart(i) for r, i, _ in self.old_slots)

    def drops(self) -> int:
        live = 0 if self.removed else self.region.view.drops(self.slot)
        return self.carried_drops + live + sum(r.view.drops(i) for r, i, _ in self.old_slots)

    def finish_drained(self) -> None:
        """The probes unregistered while a thread was inside get their final counts now."""
        for djp in self.drained:
            djp._final_hits = self.count() - djp._baseline
            djp._final_missed = self.drops() - djp._drop_baseline
            djp._final_apart = self.apart() - djp._apart_baseline
            djp._draining = None
        self.drained = ()

    def serves(self, djp: "Djprobe") -> bool:
        """Whether this instance's stub does what ``djp`` needs."""
        if not djp.record:
            return True
        return (
            self.action == "record"
            and (self.registers == "all" or djp.registers == "args")
            and (self.lossless or not djp.lossless)
            and not djp.strings & ~self.strings
        )
