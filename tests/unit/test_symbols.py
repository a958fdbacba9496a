"""djprobe.symbols on files: site spec parsing, module names, symbol tables vs nm, resolution."""

from __future__ import annotations

import glob
import os
import subprocess
import sysconfig

import pytest

from djprobe.errors import InvalidSiteError, SymbolNotFoundError
from djprobe.symbols import (
    Module,
    SiteSpec,
    SymbolKind,
    Symbols,
    parse_site_spec,
)

LIB_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
int djt_counter = 5;
int djt_add(int a, int b) { return a + b + djt_counter; }
int djt_add_alias(int a, int b) __attribute__((alias("djt_add")));
static int impl_a(int x) { return x + 1; }
static int impl_b(int x) { return x + 2; }
static void *resolve_ifn(void) { return (void *)impl_b; }
int djt_ifn(int) __attribute__((ifunc("resolve_ifn")));
__attribute__((cold, noinline)) void djt_fail(int x) { fprintf(stderr, "bad %d\n", x); }
__attribute__((noinline)) int djt_check(int x) {
    if (x < 0) { djt_fail(x); fprintf(stderr, "negative %d\n", x); abort(); }
    return x * 7 + 1;
}
"""


@pytest.fixture
def lib(build_c):
    return build_c(LIB_SRC, "-O2", "-shared", "-fPIC", name="libdjt-unit")


def nm_functions(path) -> set[tuple[str, int, int]]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    result = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TtWwi":
            size = int(parts[1], 16)
            if size:
                result.add((parts[3], int(parts[0], 16), size))
    return result


# --- parse_site_spec ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("malloc", SiteSpec(None, "malloc", None, 0)),
        ("libc:malloc", SiteSpec("libc", "malloc", None, 0)),
        ("libc:malloc+0x10", SiteSpec("libc", "malloc", None, 16)),
        ("libc:malloc+16", SiteSpec("libc", "malloc", None, 16)),
        ("malloc+010", SiteSpec(None, "malloc", None, 10)),
        ("0x401000", SiteSpec(None, None, 0x401000, 0)),
        ("0X401000+4", SiteSpec(None, None, 0x401000, 4)),
        ("libc.so.6:0x1234", SiteSpec("libc.so.6", None, 0x1234, 0)),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6:free", SiteSpec("/usr/lib/x86_64-linux-gnu/libc.so.6", "free", None, 0)),
        ("/opt/g++/lib.so:foo+0x1", SiteSpec("/opt/g++/lib.so", "foo", None, 1)),
        ("libc:str*", SiteSpec("libc", "str*", None, 0)),
        ("memcpy@@GLIBC_2.14", SiteSpec(None, "memcpy@@GLIBC_2.14", None, 0)),
        ("  libc:free  ", SiteSpec("libc", "free", None, 0)),
    ],
)
def test_parse_site_spec(text, expected):
    assert parse_site_spec(text) == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty site"),
        ("   ", "empty site"),
        ("libc:", "empty symbol"),
        ("libc:+4", "empty symbol"),
        (":malloc", "empty module"),
        ("malloc+", "empty offset"),
        ("malloc+zz", "bad offset 'zz'"),
        ("malloc+0xzz", "bad offset '0xzz'"),
        ("malloc+-4", "bad offset '-4'"),
        ("malloc+1+2", "bad offset '1+2'"),
        ("0xzz", "bad address '0xzz'"),
        ("0x", "bad address '0x'"),
        ("1234", "addresses are written in hex"),
        ("lib c:malloc", "white space"),
    ],
)
def test_parse_site_spec_errors(text, why):
    with pytest.raises(InvalidSiteError) as exc:
        parse_site_spec(text)
    assert why in str(exc.value)
    assert exc.value.errno == 22


def test_glob_flag():
    assert parse_site_spec("libc:str*").is_glob
    assert parse_site_spec("libc:str[a-z]").is_glob
    assert not parse_site_spec("libc:strlen").is_glob


# --- module names ---------------------------------------------------------------------------


def fake_symbols(lib, paths) -> Symbols:
    info = Symbols.from_file(lib).modules[0]._info
    return Symbols([Module(info, p, 0x1000 * (i + 1) << 20, i == 0) for i, p in enumerate(paths)])


def test_module_name_rules(lib):
    paths = [
        "/usr/bin/python3.11",
        "/usr/lib/x86_64-linux-gnu/libcap.so.2",
        "/usr/lib/x86_64-linux-gnu/libcrypt.so.1",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
        "/usr/lib/x86_64-linux-gnu/libpython3.so",
        "/opt/old/libm-2.31.so",
        "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    ]
    s = fake_symbols(lib, paths)
    assert s.module("libc").path == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert s.module("libc.so.6").path == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert s.module("libcap").name == "libcap.so.2"
    assert s.module("libcrypt").name == "libcrypt.so.1"
    assert s.module("libcrypto").name == "libcrypto.so.3"
    assert s.module("libpython3.11").name == "libpython3.11.so.1.0"
    assert s.module("libpython3.11.so.1.0").name == "libpython3.11.so.1.0"
    assert s.module("libpython3").name == "libpython3.so"  # not libpython3.11
    assert s.module("libm").name == "libm-2.31.so"
    assert s.module("python3.11").is_main
    assert s.module("/usr/lib/x86_64-linux-gnu/libc.so.6").name == "libc.so.6"
    assert s.module("/usr/lib/x86_64-linux-gnu//libc.so.6").name == "libc.so.6"
    for bad in ("lib", "libc.so", "python", "c", "libpython3.1", "libcry", "/usr/lib/libc.so.6"):
        with pytest.raises(SymbolNotFoundError) as exc:
            s.module(bad)
        assert "libc.so.6" in str(exc.value)  # lists the loaded modules


def test_module_name_ambiguous(lib):
    s = fake_symbols(lib, ["/bin/prog", "/a/libfoo.so.1", "/b/libfoo.so.2"])
    with pytest.raises(InvalidSiteError) as exc:
        s.module("libfoo")
    assert "/a/libfoo.so.1" in str(exc.value) and "/b/libfoo.so.2" in str(exc.value)
    assert not isinstance(exc.value, SymbolNotFoundError)
    assert s.module("libfoo.so.2").path == "/b/libfoo.so.2"


def test_module_by_path_through_symlink(lib, tmp_path):
    link = tmp_path / "libdjt.so"
    link.symlink_to(lib)
    s = Symbols.from_file(lib)
    assert s.module(str(link)) is s.modules[0]
    (site,) = s.resolve(f"{link}:djt_add")
    assert site.function.name == "djt_add"


# --- one file -------------------------------------------------------------------------------


def test_functions_match_nm(lib):
    m = Symbols.from_file(lib).modules[0]
    assert m.bias == 0 and m.is_main and m.name == os.path.basename(lib)
    ours = {(s.name, s.address, s.size) for s in m.functions()}
    assert ours == nm_functions(lib)
    addrs = [s.address for s in m.functions()]
    assert addrs == sorted(addrs)
    assert all(s.kind in (SymbolKind.FUNC, SymbolKind.IFUNC) and s.size > 0 for s in m.functions())


def test_exe_functions_match_nm(build_c):
    for flags in ((), ("-no-pie",)):
        exe = build_c("int f(int x){return x+1;}\nint main(void){return f(2);}\n", *flags, name="tiny")
        m = Symbols.from_file(exe).modules[0]
        assert {(s.name, s.address, s.size) for s in m.functions()} == nm_functions(exe)


def test_symbol_queries(lib):
    s = Symbols.from_file(lib)
    m = s.modules[0]
    nm = {n: (a, z) for n, a, z in nm_functions(lib)}
    (add,) = m.symbols("djt_add")
    assert (add.address, add.size, add.kind) == (*nm["djt_add"], SymbolKind.FUNC)
    assert add.end == add.address + add.size
    # aliases: both names known, the shorter public one preferred
    assert m.symbols("djt_add_alias")[0].address == add.address
    assert m.function_at(add.address).name == "djt_add"
    assert m.function_at(add.address + add.size - 1).name == "djt_add"
    assert m.function_at(add.address + add.size) is None or m.function_at(add.address + add.size).name != "djt_add"
    (counter,) = m.symbols("djt_counter")
    assert counter.kind is SymbolKind.OBJECT
    (ifn,) = m.symbols("djt_ifn")
    assert ifn.kind is SymbolKind.IFUNC
    # symbol starts include every code symbol, aliases and the IFUNC resolver too
    starts = m.symbol_starts()
    assert starts == sorted(starts)
    assert add.address in starts and ifn.address in starts and nm["impl_b"][0] in starts
    # cold parts
    (check,) = m.symbols("djt_check")
    cold = m.cold_parts(check)
    assert [c.name for c in cold] == ["djt_check.cold"]
    assert cold[0].address == nm["djt_check.cold"][0]
    assert m.cold_parts(add) == []


def test_read_file_and_ranges(lib):
    m = Symbols.from_file(lib).modules[0]
    (add,) = m.symbols("djt_add")
    ranges = m.executable_ranges()
    assert any(lo <= add.address < hi for lo, hi in ranges)
    (counter,) = m.symbols("djt_counter")
    assert not any(lo <= counter.address < hi for lo, hi in ranges)
    data = lib.read_bytes()
    off = m.file_offset(add.address)
    assert m.read_file(add.address, add.size) == data[off : off + add.size]
    # objdump agrees on the bytes
    out = subprocess.run(
        ["objdump", "-d", "--start-address", hex(add.address), "--stop-address", hex(add.end), str(lib)],
        capture_output=True, text=True, check=True,
    ).stdout
    hexbytes = "".join(
        part
        for line in out.splitlines()
        if line.strip().endswith(":") is False and "\t" in line
        for part in line.split("\t")[1].split()
    )
    assert bytes.fromhex(hexbytes) == m.read_file(add.address, add.size)
    with pytest.raises(InvalidSiteError):
        m.read_file(0x7FFF_FFFF_0000, 4)


def test_describe_round_trip(lib):
    s = Symbols.from_file(lib)
    m = s.modules[0]
    (add,) = m.symbols("djt_add")
    name = os.path.basename(lib)
    assert s.describe(add.address) == f"{name}:djt_add"
    assert s.describe(add.address + 4) == f"{name}:djt_add+0x4"
    # at an IFUNC's address lies its resolver: described by the resolver's own (FUNC) name
    (ifn,) = m.symbols("djt_ifn")
    assert s.describe(ifn.address) == f"{name}:resolve_ifn"
    for f in m.functions():
        for address in (f.address, f.address + f.size // 2, f.end - 1):
            text = s.describe(address)
            (site,) = s.resolve(text)
            assert site.address == address, text
            assert site.name == text
    # an address that no symbol covers: module:vaddr, and that resolves back
    gap = m.executable_ranges()[0][0]
    if m.function_at(gap) is None:
        assert s.describe(gap) == f"{name}:{gap:#x}"
        (site,) = s.resolve(f"{name}:{gap:#x}")
        assert site.address == gap and site.function is None
    assert s.describe(0x7FFF_0000_0000) == "0x7fff00000000"


def test_resolve_in_file(lib):
    s = Symbols.from_file(lib)
    m = s.modules[0]
    (add,) = m.symbols("djt_add")
    for spec in ("djt_add", f"{m.name}:djt_add", f"{lib}:djt_add"):
        (site,) = s.resolve(spec)
        assert (site.address, site.function, site.offset, site.via_ifunc) == (add.address, add, 0, None)
        assert site.spec == spec and site.module is m
    (site,) = s.resolve("djt_add+0x4")
    assert site.address == add.address + 4 and site.offset == 4 and site.name == f"{m.name}:djt_add+0x4"
    (site,) = s.resolve(f"djt_add+{add.size - 1}")
    assert site.offset == add.size - 1
    with pytest.raises(InvalidSiteError, match="beyond the end"):
        s.resolve(f"djt_add+{add.size}")
    with pytest.raises(InvalidSiteError, match="is a data symbol, not code"):
        s.resolve("djt_counter")
    with pytest.raises(SymbolNotFoundError):
        s.resolve("no_such_function")
    with pytest.raises(SymbolNotFoundError):
        s.resolve("libnope:djt_add")
    with pytest.raises(InvalidSiteError, match="IFUNC"):
        s.resolve("djt_ifn")
    (site,) = s.resolve(f"{add.address:#x}")
    assert site.function == add
    (counter,) = m.symbols("djt_counter")
    with pytest.raises(InvalidSiteError, match="not in executable memory"):
        s.resolve(f"{counter.address:#x}")


def test_globs(lib):
    s = Symbols.from_file(lib)
    m = s.modules[0]
    sites = s.resolve("djt_*")
    names = [x.function.name for x in sites]
    # functions only (no djt_counter), one site for the alias pair, IFUNC left out in a file
    assert "djt_counter" not in names and "djt_ifn" not in names
    assert names.count("djt_add") == 1 and "djt_add_alias" not in names
    assert {"djt_add", "djt_check", "djt_check.cold", "djt_fail"} <= set(names)
    assert [x.address for x in sites] == sorted(x.address for x in sites)
    assert all(x.spec == f"{m.name}:{x.function.name}" for x in sites)
    assert [x.name for x in s.resolve(f"{m.name}:djt_add_a*")] == [f"{m.name}:djt_add_alias"]
    assert [x.function.name for x in s.resolve("djt_?dd")] == ["djt_add"]
    assert [x.function.name for x in s.resolve("djt_chec[k]")] == ["djt_check"]
    with pytest.raises(SymbolNotFoundError):
        s.resolve("nothing*")
    with pytest.raises(SymbolNotFoundError):
        s.resolve("DJT_*")  # case-sensitive
    with pytest.raises(SymbolNotFoundError):
        s.resolve("djt_count*")  # data only


# --- the machine's own libraries ------------------------------------------------------------


def _libc_path() -> str:
    out = subprocess.run(["gcc", "-print-file-name=libc.so.6"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(out if os.path.isabs(out) else "/lib/x86_64-linux-gnu/libc.so.6")


def _libpythons() -> list[str]:
    found = []
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if ldlib.endswith(".so") or ".so." in ldlib:
        p = os.path.join(libdir, ldlib)
        if os.path.exists(p):
            found.append(os.path.realpath(p))
    found += [os.path.realpath(p) for p in glob.glob("/usr/lib/x86_64-linux-gnu/libpython3*.so.1.0")]
    return sorted(set(found))


def test_real_libc():
    s = Symbols.from_file(_libc_path())
    m = s.modules[0]
    (malloc,) = s.resolve("malloc")
    assert malloc.function.kind is SymbolKind.FUNC and malloc.function.size > 0
    # aliases: malloc / __libc_malloc are one function, named malloc
    libc_malloc = m.symbols("__libc_malloc")
    if libc_malloc:
        assert libc_malloc[0].address == malloc.address
        assert m.function_at(malloc.address).name == "malloc"
    assert s.describe(malloc.address + 1) == f"{m.name}:malloc+0x1"
    # dynamic functions agree with nm -D
    out = subprocess.run(["nm", "-D", "-S", "--defined-only", m.path], capture_output=True, text=True, check=True)
    funcs = {(f.name, f.address, f.size) for f in m.functions()}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TWi" and int(parts[1], 16):
            name = parts[3].split("@")[0]
            assert (name, int(parts[0], 16), int(parts[1], 16)) in funcs, line
    # strlen is an IFUNC: no implementation without a live process
    with pytest.raises(InvalidSiteError, match="IFUNC"):
        s.resolve("strlen")
    sites = s.resolve("str*")
    assert sites and all(x.function.kind is SymbolKind.FUNC for x in sites)
    assert len({x.address for x in sites}) == len(sites)
    with pytest.raises(InvalidSiteError, match="data symbol"):
        s.resolve("environ")


def test_real_libc_versions():
    m = Symbols.from_file(_libc_path()).modules[0]
    versions = {(x.version, x.version_hidden) for x in m.symbols("memcpy")}
    if ("GLIBC_2.14", False) not in versions:
        pytest.skip("this libc has no versioned memcpy")
    (new,) = m.symbols("memcpy@@GLIBC_2.14")
    assert new.kind is SymbolKind.IFUNC and new.versioned_name == "memcpy@@GLIBC_2.14"
    old = m.symbols("memcpy@GLIBC_2.2.5")
    assert old and old[0].version_hidden and old[0].address != new.address
    assert m.symbols("memcpy")[0] == new  # default version first


def test_real_libpython():
    libs = _libpythons()
    if not libs:
        pytest.skip("no shared libpython on this machine")
    for path in libs:
        s = Symbols.from_file(path)
        (site,) = s.resolve("PyEval_EvalCode")
        assert site.function.name == "PyEval_EvalCode" and site.function.size > 0
        assert s.resolve(f"{path}:Py_Initialize")[0].function.name == "Py_Initialize"
        assert len(s.resolve("PyList_*")) > 5


def test_exact_name_prefers_global_over_static_namesakes(build_c):
    lib = build_c(
        "__attribute__((noinline)) static int helper(int x) { return x * 5; }\n"
        "int use_static(int x) { return helper(x) + 1; }\n"
        "int helper2(int x) { return x + 9; }\n",
        "-O1", "-shared", "-fPIC", name="libstatic-a",
    )
    s = Symbols.from_file(lib)
    (site,) = s.resolve("helper")  # the only one: a static function is still a site
    assert site.function.binding == "LOCAL"
    (site,) = s.resolve("helper2")
    assert site.function.binding == "GLOBAL"


def test_several_static_functions_of_one_name(build_c, tmp_path):
    a = tmp_path / "a.c"
    b = tmp_path / "b.c"
    a.write_text("__attribute__((noinline)) static int init(int x) { return x * 5; }\nint fa(int x) { return init(x); }\n")
    b.write_text("__attribute__((noinline)) static int init(int x) { return x * 7 + 3; }\nint fb(int x) { return init(x); }\nint init_g(int x) { return x; }\n")
    lib = build_c([a, b], "-O1", "-shared", "-fPIC", name="libstatic-b")
    s = Symbols.from_file(lib)
    sites = s.resolve("init")
    assert len(sites) == 2 and len({x.address for x in sites}) == 2
    assert {x.function.name for x in sites} == {"init"}
