"""Prototypes from DWARF: a C file compiled with -g, and libc's separate debug file."""

from __future__ import annotations

import pytest

from djprobe import debuginfo
from djprobe.symbols import Symbols
from tests.conftest import compile_c

SOURCE = r"""
#include <stdbool.h>
#include <stddef.h>
struct pair { long a, b; };
enum color { RED, GREEN };
typedef const char *name_t;
__attribute__((noinline)) long typed(const char *s, unsigned char c, short h, bool ok, void *p, enum color k)
{ return (long)s + c + h + ok + (long)p + k; }
__attribute__((noinline)) long with_float(double d, char *s, size_t n) { return (long)d + (long)s + (long)n; }
__attribute__((noinline)) long by_value(int a, struct pair p, int b) { return a + p.a + p.b + b; }
__attribute__((noinline)) long via_typedef(name_t n, unsigned long long u, ...) { return (long)n + (long)u; }
int main(void) { return typed(0, 0, 0, 0, 0, RED) + with_float(0, 0, 0) + by_value(0, (struct pair){0, 0}, 0) + via_typedef(0, 0); }
"""


@pytest.fixture(scope="module")
def symbols():
    exe = compile_c(SOURCE, "-g", name="dwarf_target")
    return Symbols.from_file(exe)


def _proto(symbols, name):
    (site,) = symbols.resolve(f"{symbols.modules[0].name}:{name}")
    return debuginfo.prototype_at(site.module, site.address)


def test_types_from_dwarf(symbols):
    proto = _proto(symbols, "typed")
    got = [(p.name, p.type.kind, p.type.bits, p.type.spelling) for p in proto.params]
    assert got == [
        ("s", "string", 64, "const char *"),
        ("c", "uint", 8, "unsigned char"),
        ("h", "int", 16, "short int"),
        ("ok", "bool", 8, "_Bool"),
        ("p", "pointer", 64, "void *"),
        ("k", "int", 32, "enum color"),
    ]
    assert not proto.variadic and proto.string_mask == 0b1


def test_floats_take_no_register_and_structs_by_value_cut_the_list(symbols):
    assert [(p.name, p.type.kind) for p in _proto(symbols, "with_float").params] == [("s", "string"), ("n", "uint")]
    assert [p.name for p in _proto(symbols, "by_value").params] == ["a"]
    proto = _proto(symbols, "via_typedef")
    assert [(p.name, p.type.kind) for p in proto.params] == [("n", "string"), ("u", "uint")] and proto.variadic


def test_no_debug_info_means_no_prototype():
    exe = compile_c(SOURCE, "-g0", name="dwarf_target_nodebug")
    symbols = Symbols.from_file(exe)
    (site,) = symbols.resolve(f"{symbols.modules[0].name}:typed")
    assert debuginfo.prototype_at(site.module, site.address) is None


def test_libc_from_its_build_id_debug_file():
    debuginfo.clear_cache()
    symbols = Symbols.from_file("/lib/x86_64-linux-gnu/libc.so.6")
    (site,) = symbols.resolve("libc.so.6:openat")
    proto = debuginfo.prototype_at(site.module, site.address)
    assert str(proto) == "int fd, const char *file, int oflag, ..."
    (site,) = symbols.resolve("libc.so.6:open")  # an alias of __libc_open64: found by address
    assert str(debuginfo.prototype_at(site.module, site.address)) == "const char *file, int oflag, ..."
