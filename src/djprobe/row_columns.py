"""Tables of rows kept as columns: a list for Python objects, a numpy array for numbers.

A whole python3 has 40,000 ELF symbols in its modules; as 8-tuples of Python objects (with an
integer object for each address and size) they took 6 MiB of the tracer, kept for later symbol
tables of the same files. :class:`RowColumns` keeps each field as a column (a pointer per row
for strings, 1 to 8 bytes for a number) and gives the rows back as the same tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["RowColumns"]


class RowColumns(Sequence[tuple]):
    """Rows (tuples of as many fields as ``dtypes``) kept as columns: a field whose dtype is None
    holds Python objects (a list), any other a numpy array of that dtype (the values must fit it;
    they come back as Python ``int``/``bool``). Iterating or indexing gives tuples equal to the
    rows given."""

    __slots__ = ("_columns", "_numeric", "_len")

    def __init__(self, rows: Iterable[tuple], dtypes: Sequence[str | None]) -> None:
        listed = rows if isinstance(rows, list) else list(rows)
        self._len = len(listed)
        self._numeric = tuple(dtype is not None for dtype in dtypes)
        columns: list = []
        for k, dtype in enumerate(dtypes):
            values = [row[k] for row in listed]
            columns.append(values if dtype is None else np.array(values, dtype=dtype))
        self._columns = tuple(columns)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple]:
        return zip(*(c.tolist() if numeric else c for c, numeric in zip(self._columns, self._numeric)))

    def __getitem__(self, index: int) -> tuple:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError(f"row index must be an int, not {type(index).__name__}")
        if not -self._len <= index < self._len:
            raise IndexError(f"row {index} of a table of {self._len}")
        return tuple(c[index].item() if numeric else c[index] for c, numeric in zip(self._columns, self._numeric))
