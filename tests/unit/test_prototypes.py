"""Prototype parsing (what users write after a site) and typed values of recorded registers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from djprobe.errors import InvalidSiteError
from djprobe.fetched import Args, FetchedString, FetchError, decode_slots, format_value, json_value, typed_values
from djprobe.prototypes import CType, parse_prototype, parse_type, split_prototype


def kinds(text):
    return [(p.name, p.type.kind, p.type.bits) for p in parse_prototype(text).params]


def test_the_issue_examples():
    assert kinds("char *s, long n") == [("s", "string", 64), ("n", "int", 64)]
    assert kinds("int fd, char *path, int flags") == [("fd", "int", 32), ("path", "string", 64), ("flags", "int", 32)]
    proto = parse_prototype("const char *file, int oflag, ...")
    assert proto.variadic and proto.string_mask == 0b1
    assert str(proto) == "const char *file, int oflag, ..."


@pytest.mark.parametrize(
    "text, kind, bits",
    [
        ("unsigned char c", "uint", 8), ("signed char c", "int", 8), ("short s", "int", 16),
        ("unsigned short int s", "uint", 16), ("unsigned u", "uint", 32), ("long long x", "int", 64),
        ("unsigned long long x", "uint", 64), ("uint8_t b", "uint", 8), ("int16_t h", "int", 16),
        ("size_t n", "uint", 64), ("ssize_t n", "int", 64), ("bool ok", "bool", 8), ("_Bool ok", "bool", 8),
        ("void *p", "pointer", 64), ("const void *p", "pointer", 64), ("char **argv", "pointer", 64),
        ("struct stat *st", "pointer", 64), ("int *out", "pointer", 64), ("char const *s", "string", 64),
        ("char *const s", "string", 64), ("char buf[]", "string", 64), ("my_handle_t *h", "pointer", 64),
        ("enum color c", "int", 32), ("const char *restrict s", "string", 64),
    ],
)  # fmt: skip
def test_types(text, kind, bits):
    (param,) = parse_prototype(text).params
    assert (param.type.kind, param.type.bits) == (kind, bits)


def test_names_are_optional():
    assert [p.name for p in parse_prototype("char *, unsigned long").params] == ["arg0", "arg1"]
    assert parse_prototype("void").params == () and parse_prototype("").params == ()
    assert parse_type("const char *").kind == "string"


@pytest.mark.parametrize(
    "text, words",
    [
        ("float x", "floating-point"),
        ("double d, int n", "parameter 1"),
        ("struct timeval tv", "by value"),
        ("int a, ..., int b", "must be the last"),
        ("...", "named parameter before"),
        ("int a, int a", "used twice"),
        ("int a,, int b", "parameter 2 is empty"),
        ("frobnicate x", "unknown type 'frobnicate'"),
        ("int (*cb)(int)", "function pointer"),
        ("int @x", "unexpected '@'"),
        ("void x", "'void' is only allowed alone"),
    ],
)
def test_bad_input_says_what_is_wrong(text, words):
    with pytest.raises(InvalidSiteError) as info:
        parse_prototype(text)
    assert words in str(info.value)
    assert text in str(info.value)


def test_split_prototype_from_patterns():
    site, proto = split_prototype("libc:openat(int fd, char *path, int flags)")
    assert site == "libc:openat" and [p.name for p in proto.params] == ["fd", "path", "flags"]
    site, proto = split_prototype("libc:malloc(size_t n)%return")
    assert site == "libc:malloc%return" and proto.params[0].type.kind == "uint"
    assert split_prototype("libc:open*") == ("libc:open*", None)
    with pytest.raises(InvalidSiteError, match="expected SITE"):
        split_prototype("f(int a")


@given(st.integers(0, 2**64 - 1), st.sampled_from([8, 16, 32, 64]))
def test_integer_conversion_keeps_the_low_bits(raw, bits):
    signed = CType("int", bits).convert(raw)
    unsigned = CType("uint", bits).convert(raw)
    assert 0 <= unsigned < 2**bits and unsigned == raw % 2**bits
    assert -(2 ** (bits - 1)) <= signed < 2 ** (bits - 1) and signed % 2**bits == unsigned


@given(st.lists(st.sampled_from(["int", "long", "char *", "const char *", "void *", "bool", "uint8_t", "size_t"]),
                min_size=1, max_size=8))
def test_generated_prototypes_round_trip(types):
    text = ", ".join(f"{t} p{i}" for i, t in enumerate(types))
    proto = parse_prototype(text)
    assert [p.name for p in proto.params] == [f"p{i}" for i in range(len(types))]
    assert parse_prototype(str(proto)) == proto
    mask = sum(1 << i for i, t in enumerate(types[:6]) if t.endswith("char *"))
    assert proto.string_mask == mask


def _slots(entries, size=64):
    import numpy as np

    from djprobe.area import string_slot_dtype

    slots = np.zeros(6, dtype=string_slot_dtype(size))
    for i, (address, result, data) in entries.items():
        slots[i]["address"], slots[i]["result"] = address, result
        slots[i]["data"][: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return slots


def test_decoding_string_slots():
    slots = _slots({0: (0x1000, 64, b"abc\0zzz"), 1: (0, -14, b""), 2: (0x2000, 64, b"x" * 64), 3: (0x3000, 3, b"xyz")})
    s, err, long, partial, *_ = decode_slots(0b1111, slots)
    assert s == "abc" and not s.truncated and s.address == 0x1000
    assert err == FetchError(0, 14) and err.error == "EFAULT" and str(err) == "0x0<EFAULT>"
    assert long == "x" * 64 and long.truncated
    assert partial == "xyz" and partial.truncated  # ran into an unmapped page
    assert decode_slots(0b0001, slots)[1:] == (None,) * 5


def test_typed_values_and_their_forms():
    proto = parse_prototype("const char *s, int n, bool b, void *p")
    fetched = (FetchedString('a"b', 0x10, True), None, None, None, None, None)
    values = typed_values(proto, [0x10, 0xFFFFFFFF, 0x100, 0xABC, 0, 0], fetched)
    assert values == {"s": 'a"b', "n": -1, "b": False, "p": 0xABC}
    kinds = {p.name: p.type.kind for p in proto.params}
    assert [format_value(kinds[k], v) for k, v in values.items()] == ['"a\\"b"...', "-1", "false", "0xabc"]
    assert json_value(FetchError(1, 14)) == {"address": 1, "error": "EFAULT"}
    args = Args((1, 2, 3, 4, 5, 6), values)
    assert args == (1, 2, 3, 4, 5, 6) and args.n == -1 and args.s == 'a"b'
    with pytest.raises(AttributeError, match="no parameter named 'x'"):
        args.x


@given(st.text(alphabet="abcint chr*,.()[]_0123456789&@-", max_size=40))
def test_any_text_parses_or_says_what_is_wrong(text):
    try:
        proto = parse_prototype(text)
    except InvalidSiteError as exc:
        assert "bad prototype" in str(exc) or "prototype must" in str(exc)
    else:
        assert all(p.name for p in proto.params)
