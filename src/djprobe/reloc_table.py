"""A module's relocations as columns of numpy arrays (IFUNC resolution reads them).

A whole python3 process has about 100,000 relocations in its modules; kept as a list of 4-tuples
of Python ints they took 10 MB of the tracer, here 25 bytes each. Rows are still read as
``(r_offset, type, symbol index, addend)`` tuples; :meth:`RelocationTable.rows` selects them
with a mask first, so a search looks at the few rows of the types it wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["RelocationTable", "RowsByName"]

_RELA64 = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])


class RelocationTable:
    """Relocations of one ELF file: ``offsets`` (r_offset, file vaddr), ``types``, ``indexes``
    (symbol index) and ``addends``, one row per relocation, in file order."""

    __slots__ = ("offsets", "types", "indexes", "addends", "_by_name")

    def __init__(self, offsets: np.ndarray, types: np.ndarray, indexes: np.ndarray, addends: np.ndarray) -> None:
        self.offsets = offsets
        self.types = types
        self.indexes = indexes
        self.addends = addends
        self._by_name: dict[tuple[int, ...], RowsByName] = {}

    @classmethod
    def from_rela64(cls, chunks: Iterable[bytes]) -> "RelocationTable":
        """From the bytes of ``SHT_RELA`` sections of a 64-bit file (24-byte entries; a trailing
        partial entry is ignored)."""
        parts = [np.frombuffer(data, dtype=_RELA64, count=len(data) // 24) for data in chunks]
        rows = np.concatenate(parts) if parts else np.empty(0, dtype=_RELA64)
        info = rows["info"]
        return cls(rows["offset"].copy(), (info & 0xFFFFFFFF).astype(np.uint32), (info >> np.uint64(32)).astype(np.uint32),
                   rows["addend"].copy())

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, int, int, int]]) -> "RelocationTable":
        """From ``(r_offset, type, symbol index, addend)`` tuples (32-bit files, tests)."""
        listed = list(rows)
        if not listed:
            return cls(np.empty(0, np.uint64), np.empty(0, np.uint32), np.empty(0, np.uint32), np.empty(0, np.int64))
        offsets, types, indexes, addends = zip(*listed)
        return cls(np.array(offsets, np.uint64), np.array(types, np.uint32), np.array(indexes, np.uint32),
                   np.array(addends, np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        return self.rows(None)

    def rows(self, mask: np.ndarray | None) -> Iterator[tuple[int, int, int, int]]:
        """The rows where ``mask`` is true (all rows for None), as Python int tuples, in order."""
        picked = np.arange(len(self.offsets)) if mask is None else np.flatnonzero(mask)
        for i in picked.tolist():
            yield int(self.offsets[i]), int(self.types[i]), int(self.indexes[i]), int(self.addends[i])

    def of_types(self, types: Iterable[int]) -> np.ndarray:
        """A mask of the rows whose type is one of ``types``."""
        return np.isin(self.types, np.fromiter(types, dtype=np.uint32))

    def row(self, i: int) -> tuple[int, int, int, int]:
        """Row ``i`` as Python ints."""
        return int(self.offsets[i]), int(self.types[i]), int(self.indexes[i]), int(self.addends[i])

    def by_symbol_name(self, types: Iterable[int], symbols: Sequence[Sequence]) -> "RowsByName":
        """The rows of ``types`` grouped by the name of their symbol (``symbols[index][0]``, the
        file's dynamic symbol table; rows whose index is beyond it are left out), each group in
        file order. Kept per ``types``: a file's tables do not change."""
        key = tuple(sorted(types))
        found = self._by_name.get(key)
        if found is None:
            groups: dict[str, list[int]] = {}
            picked = np.flatnonzero(self.of_types(key))
            for i, index in zip(picked.tolist(), self.indexes[picked].tolist()):
                if index < len(symbols):
                    groups.setdefault(symbols[index][0], []).append(i)
            found = RowsByName(self, groups)
            self._by_name[key] = found
        return found


class RowsByName(Mapping[str, list[tuple[int, int, int, int]]]):
    """Rows of a :class:`RelocationTable` grouped by symbol name, kept as one array of row numbers
    (grouped, each group in file order) and one integer per name (where its group starts, how
    many): a whole python3's GOT relocations took 4 MiB as lists of row tuples. A group is read
    as a list of ``(r_offset, type, symbol index, addend)`` tuples."""

    __slots__ = ("_table", "_order", "_spans")

    def __init__(self, table: RelocationTable, groups: dict[str, list[int]]) -> None:
        self._table = table
        order: list[int] = []
        self._spans: dict[str, int] = {}
        for name, rows in groups.items():
            self._spans[name] = len(order) << 32 | len(rows)
            order += rows
        self._order = np.array(order, dtype=np.uint32)

    def __getitem__(self, name: str) -> list[tuple[int, int, int, int]]:
        span = self._spans[name]
        start = span >> 32
        return [self._table.row(i) for i in self._order[start: start + (span & 0xFFFFFFFF)].tolist()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)
