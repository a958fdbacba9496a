"""RelocationTable: the rows of a real library's RELA sections, as struct reads them; selection
by type and grouping by symbol name keep file order."""

from __future__ import annotations

import os
import struct

import pytest
from elftools.elf.elffile import ELFFile

from djprobe.reloc_table import RelocationTable

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="module")
def rela():
    if not os.path.exists(LIBC):
        pytest.skip("no libc")
    with open(LIBC, "rb") as f:
        elf = ELFFile(f)
        chunks = [s.data() for s in elf.iter_sections() if s["sh_type"] == "SHT_RELA" and s["sh_flags"] & 2]
    return chunks


def test_rows_are_the_struct_reading(rela):
    table = RelocationTable.from_rela64(rela)
    expected = [(o, i & 0xFFFFFFFF, i >> 32, a) for data in rela for o, i, a in struct.iter_unpack("<QQq", data)]
    assert len(table) == len(expected) > 100
    assert list(table) == expected
    assert RelocationTable.from_rows(expected).offsets.tolist() == table.offsets.tolist()


def test_selection_and_grouping_keep_file_order(rela):
    table = RelocationTable.from_rela64(rela)
    rows = list(table)
    assert list(table.rows(table.of_types((7, 6)))) == [r for r in rows if r[1] in (6, 7)]
    names = [(f"s{i % 50}",) for i in range(max(r[2] for r in rows) // 2)]  # some indexes beyond the table
    groups = table.by_symbol_name((6, 7), names)
    for name, group in groups.items():
        assert group == [r for r in rows if r[1] in (6, 7) and r[2] < len(names) and names[r[2]][0] == name]
    assert table.by_symbol_name((7, 6), names) is groups  # kept
    assert list(RelocationTable.from_rows(())) == []
