"""Rows kept as columns (djprobe.row_columns) come back as the tuples given."""

from __future__ import annotations

import pytest

from djprobe.row_columns import RowColumns
from djprobe.symbols import _RAW_SYM_DTYPES


def test_rows_come_back_equal_and_of_python_types():
    rows = [("malloc", "GLIBC_2.2.5", False, 0xA0D40, 0x1F3, 2, 1, True),
            ("sub_1", None, True, 2**64 - 1, 0, 10, 2, False),
            ("é", None, False, 0, 2**40, 0, 0, False)]
    table = RowColumns(rows, _RAW_SYM_DTYPES)
    assert len(table) == 3 and list(table) == rows and table[1] == rows[1] and table[-1] == rows[-1]
    assert [type(v) for v in table[0]] == [type(v) for v in rows[0]]
    assert [type(v) for v in next(iter(table))] == [type(v) for v in rows[0]]
    with pytest.raises(IndexError):
        table[3]


def test_an_empty_table():
    table = RowColumns([], (None, "?"))
    assert len(table) == 0 and list(table) == [] and not table
