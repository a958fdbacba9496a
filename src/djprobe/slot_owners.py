"""Which instance owns each stub slot, by (region number, slot): one list per region.

Events carry their stub's region number and slot; the reader maps them back to the instance
that placed them. A dict keyed by ``(region, slot)`` tuples kept a tuple, an integer and a
dictionary entry per probe (about 84 bytes, 1.6 MiB for a whole process's 20,000 probes); here
each region has one list as long as its slots, grown on demand, holding the owner or None.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

__all__ = ["SlotOwners"]

T = TypeVar("T")


class SlotOwners(Generic[T]):
    """A mapping ``(region number, slot) -> owner`` (``get``, ``[]``, ``in``, ``del``, ``copy``)."""

    __slots__ = ("_regions", "_count")

    def __init__(self) -> None:
        self._regions: list[list[T | None]] = []
        self._count = 0

    @staticmethod
    def _check(key: tuple[int, int]) -> tuple[int, int]:
        region, slot = key
        if region < 0 or slot < 0:
            raise KeyError(key)
        return region, slot

    def get(self, key: tuple[int, int], default: T | None = None) -> T | None:
        region, slot = key
        if 0 <= region < len(self._regions):
            owners = self._regions[region]
            if 0 <= slot < len(owners):
                owner = owners[slot]
                if owner is not None:
                    return owner
        return default

    def __getitem__(self, key: tuple[int, int]) -> T:
        owner = self.get(key)
        if owner is None:
            raise KeyError(key)
        return owner

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and self.get(key) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: tuple[int, int], owner: T) -> None:
        if owner is None:
            raise ValueError("an owner cannot be None (delete the key instead)")
        region, slot = self._check(key)
        while len(self._regions) <= region:
            self._regions.append([])
        owners = self._regions[region]
        if len(owners) <= slot:
            owners.extend([None] * (slot + 1 - len(owners)))
        if owners[slot] is None:
            self._count += 1
        owners[slot] = owner

    def __delitem__(self, key: tuple[int, int]) -> None:
        if self.get(key) is None:
            raise KeyError(key)
        region, slot = key
        self._regions[region][slot] = None
        self._count -= 1

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[tuple[int, int], T]]:
        for region, owners in enumerate(self._regions):
            for slot, owner in enumerate(owners):
                if owner is not None:
                    yield (region, slot), owner

    def values(self) -> Iterator[T]:
        return (owner for _, owner in self.items())

    def copy(self) -> "SlotOwners[T]":
        """A copy whose later changes do not touch this one (the owners are shared)."""
        other: SlotOwners[T] = SlotOwners()
        other._regions = [list(owners) for owners in self._regions]
        other._count = self._count
        return other
