"""prototypes32: ILP32 widths and cdecl stack words; typed values from 32-bit argument slots."""

from __future__ import annotations

from djprobe.fetched import typed_values
from djprobe.prototypes import parse_prototype
from djprobe.prototypes32 import cdecl_prototype


def test_ilp32_widths_and_stack_words():
    p = cdecl_prototype(parse_prototype("const char *s, long n, unsigned long long big, size_t len, int64_t t, void *p, int k"))
    assert [x.type.bits for x in p.params] == [32, 32, 64, 32, 64, 32, 32]
    assert p.slots == ((0, 1), (1, 1), (2, 2), (4, 1), (5, 2), (7, 1), (8, 1))
    assert [x.name for x in p.register_params] == ["s", "n", "big", "len"]  # t would need words 5 and 6
    assert p.string_mask == 1
    assert cdecl_prototype(p) is p


def test_typed_values_join_two_words_and_sign_extend_32_bits():
    p = cdecl_prototype(parse_prototype("long a, long long b, char *s, unsigned long c"))
    assert p.string_mask == 1 << 3
    args = [0xFFFFFFFF, 0x89ABCDEF, 0xFEDCBA98, 0x1000, 0xFFFFFFFE, 0]
    values = typed_values(p, args, (None, None, None, "x", None, None))
    assert values == {"a": -1, "b": -(0x0123456776543211), "s": "x", "c": 0xFFFFFFFE}
