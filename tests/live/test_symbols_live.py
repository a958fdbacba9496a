"""djprobe.symbols against live processes: addresses compared with what the target itself prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from djprobe._sys.procfs import read_maps
from djprobe.errors import InvalidSiteError, SymbolNotFoundError
from djprobe.symbols import Symbol, SymbolKind, Symbols, clear_cache

LIB_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
int djt_counter = 5;
int djt_add(int a, int b) { return a + b + djt_counter; }
int djt_add_alias(int a, int b) __attribute__((alias("djt_add")));
static int impl_a(int x) { return x + 1; }
static int impl_b(int x) { return x + 2; }
static int impl_c(int x) { return x + 3; }
/* exported IFUNC referenced by the program: resolved through the program's GOT */
static void *resolve_ifn(void) { return (void *)impl_b; }
int djt_ifn(int) __attribute__((ifunc("resolve_ifn")));
/* local IFUNC used inside the library: an R_X86_64_IRELATIVE relocation */
/* (&djt_hidden_ifn would be the PLT stub's address: the resolver records what it chose) */
static void *hidden_chosen;
static void *resolve_hidden(void) { hidden_chosen = (void *)impl_a; return hidden_chosen; }
static int djt_hidden_ifn(int) __attribute__((ifunc("resolve_hidden")));
int djt_call_hidden(int x) { return djt_hidden_ifn(x) * 2; }
void *djt_hidden_addr(void) { return hidden_chosen; }
/* exported IFUNC nobody references: no relocation anywhere */
static void *resolve_unref(void) { return (void *)impl_c; }
int djt_unref_ifn(int) __attribute__((ifunc("resolve_unref")));
"""

MAIN_SRC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <unistd.h>
extern int djt_add(int, int);
extern int djt_ifn(int);
extern int djt_counter;
extern void *djt_hidden_addr(void);
__attribute__((noinline)) int local_func(int x) { return x * 3 + 1; }
int main(void) {
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    printf("local_func %p\n", (void *)local_func);
    printf("djt_add %p\n", (void *)djt_add);
    printf("djt_ifn %p\n", (void *)djt_ifn);
    printf("djt_hidden %p\n", djt_hidden_addr());
    printf("djt_counter %p\n", (void *)&djt_counter);
    printf("malloc %p\n", dlsym(libc, "malloc"));
    printf("free %p\n", (void *)free);
    printf("strlen %p\n", (void *)strlen);
    printf("strlen_dl %p\n", dlsym(RTLD_DEFAULT, "strlen"));
    printf("memcpy_dl %p\n", dlsym(RTLD_DEFAULT, "memcpy"));
    printf("vdso %p\n", (void *)getauxval(AT_SYSINFO_EHDR));
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
"""


@pytest.fixture
def libdjt(build_c) -> Path:
    """libdjt.so in a directory of its own (stable per content, so program builds are cached)."""
    built = build_c(LIB_SRC, "-O2", "-shared", "-fPIC", "-Wl,-soname,libdjt.so", name="libdjt")
    d = built.parent / f"{built.name}.d"
    d.mkdir(exist_ok=True)
    lib = d / "libdjt.so"
    if not lib.exists():
        tmp = d / "libdjt.so.tmp"
        shutil.copyfile(built, tmp)
        tmp.rename(lib)
    return lib


@pytest.fixture(params=["pie", "no-pie"])
def program(request, build_c, libdjt) -> Path:
    d = libdjt.parent
    # (compile_c puts flags before the source: keep libdjt even though nothing needs it yet)
    flags = ["-L", str(d), "-Wl,--no-as-needed", "-ldjt", f"-Wl,-rpath,{d}", "-ldl"]
    if request.param == "no-pie":
        flags.insert(0, "-no-pie")
    return build_c(MAIN_SRC, *flags, name=f"symtarget-{request.param}")


def start(start_target, exe) -> tuple[int, dict[str, int]]:
    t = start_target([exe], stdout=subprocess.PIPE, text=True)
    printed: dict[str, int] = {}
    for line in t.proc.stdout:
        if line.strip() == "ready":
            break
        key, value = line.split()
        printed[key] = int(value, 16)
    else:
        pytest.fail("target exited before it was ready")
    t.proc.stdout.close()  # the target writes nothing more
    return t.pid, printed


def one(symbols: Symbols, spec: str):
    sites = symbols.resolve(spec)
    assert len(sites) == 1, (spec, sites)
    return sites[0]


def test_addresses_match_the_process(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    main = s.modules[0]
    assert main.is_main and main.name == program.name and main.path == str(program)
    assert sum(m.is_main for m in s.modules) == 1
    if program.name.startswith("symtarget-no-pie"):
        assert main.bias == 0
    else:
        assert main.bias != 0
    for spec, key in [
        ("local_func", "local_func"),
        (f"{program.name}:local_func", "local_func"),
        (f"{program}:local_func", "local_func"),
        ("libdjt:djt_add", "djt_add"),
        ("libdjt.so:djt_add", "djt_add"),
        ("djt_add", "djt_add"),
        ("libc:malloc", "malloc"),
        ("malloc", "malloc"),
        ("libc.so.6:free", "free"),
    ]:
        site = one(s, spec)
        assert site.address == printed[key], spec
        assert site.offset == 0 and site.via_ifunc is None and site.spec == spec
        assert site.function is not None and site.function.address == printed[key]
        assert s.function_at(printed[key] + 1) == site.function
        assert s.describe(printed[key]) == site.name
        assert one(s, site.name).address == printed[key]  # describe() text resolves back
    assert one(s, "libc:malloc").name == "libc.so.6:malloc"
    assert one(s, "libdjt:djt_add").module.name == "libdjt.so"
    # offsets
    site = one(s, "libc:malloc+0x4")
    assert site.address == printed["malloc"] + 4 and site.name == "libc.so.6:malloc+0x4"
    # raw addresses
    site = one(s, f"{printed['local_func']:#x}")
    assert site.function.name == "local_func" and site.module is main
    site = one(s, f"{printed['djt_add'] + 2:#x}")
    assert site.function.name == "djt_add" and site.offset == 2
    with pytest.raises(InvalidSiteError, match="not in executable memory"):
        s.resolve(f"{printed['djt_counter']:#x}")
    with pytest.raises(InvalidSiteError, match="data symbol"):
        s.resolve("libdjt:djt_counter")
    with pytest.raises(SymbolNotFoundError):
        s.resolve("libnope:malloc")
    assert s.module_at(printed["malloc"]).name == "libc.so.6"
    # the program's reference to djt_counter made a copy of it in the program (copy relocation)
    assert s.module_at(printed["djt_counter"]) is main
    assert s.describe(printed["djt_counter"]) == f"{main.name}:djt_counter"


def test_module_bounds_agree_with_maps(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    maps = read_maps(pid)
    for m in s.modules:
        if not m.file_backed:
            continue
        for lo, hi in m.executable_ranges():
            entry = next(e for e in maps if e.start <= lo < e.end)
            assert entry.executable and entry.path == m.path and hi <= entry.end
        # the code bytes in memory are the file's bytes (nobody patched them)
        lo, hi = m.executable_ranges()[0]
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(lo)
            assert f.read(64) == m.read_file(lo, 64)


def test_glob_and_aliases(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    sites = s.resolve("libdjt:djt_add*")
    assert [x.name for x in sites] == ["libdjt.so:djt_add"]
    assert sites[0].spec == "libdjt:djt_add" and sites[0].address == printed["djt_add"]
    sites = s.resolve("libc:*malloc")
    by_addr = {x.address: x for x in sites}
    assert by_addr[printed["malloc"]].function.name == "malloc"  # not __libc_malloc
    sites = s.resolve("libc:str*")
    assert len({x.address for x in sites}) == len(sites)
    assert all(x.function is None or x.function.kind is SymbolKind.FUNC for x in sites)
    strlen = [x for x in sites if x.via_ifunc == "strlen"]
    assert [x.address for x in strlen] == [printed["strlen_dl"]]
    assert [x.function.name for x in s.resolve("local_f*")] == ["local_func"]  # main exe only
    with pytest.raises(SymbolNotFoundError):
        s.resolve("djt_*")  # a glob without module looks in the main executable only


def test_ifunc_libc(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    assert printed["strlen"] == printed["strlen_dl"]
    site = one(s, "libc:strlen")
    assert site.address == printed["strlen_dl"]
    assert site.via_ifunc == "strlen"
    libc = s.module("libc")
    (resolver,) = [x for x in libc.symbols("strlen") if x.kind is SymbolKind.IFUNC]
    assert site.address != resolver.address
    if site.function is not None:  # named when libc's debug symbols are installed
        assert site.function.address == site.address and site.function.name.startswith("__strlen")
        assert site.name == f"libc.so.6:{site.function.name}"
    site = one(s, "strlen")
    assert site.address == printed["strlen_dl"]
    site = one(s, "libc:memcpy")
    assert site.address == printed["memcpy_dl"] and site.via_ifunc == "memcpy"


def test_ifunc_own_library(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    lib = s.module("libdjt")
    # exported, referenced by the program (GOT slot)
    site = one(s, "libdjt:djt_ifn")
    assert site.address == printed["djt_ifn"]
    assert (site.via_ifunc, site.function.name, site.name) == ("djt_ifn", "impl_b", "libdjt.so:impl_b")
    # local, used inside the library (IRELATIVE)
    site = one(s, "libdjt:djt_hidden_ifn")
    assert site.address == printed["djt_hidden"] and site.function.name == "impl_a"
    assert site.via_ifunc == "djt_hidden_ifn"
    # an IFUNC with no relocation anywhere: unknown unless a resolver callback says
    with pytest.raises(InvalidSiteError, match="IFUNC"):
        s.resolve("libdjt:djt_unref_ifn")
    (impl_c,) = lib.symbols("impl_c")
    asked: list[Symbol] = []

    def resolver(sym: Symbol) -> int:
        asked.append(sym)
        return impl_c.address

    s2 = Symbols.from_process(pid, ifunc_resolver=resolver)
    site = one(s2, "libdjt:djt_unref_ifn")
    assert site.address == impl_c.address and site.function.name == "impl_c"
    assert [a.name for a in asked] == ["djt_unref_ifn"]
    # the resolver callback is not asked when the process's relocations tell
    assert one(s2, "libdjt:djt_ifn").address == printed["djt_ifn"]
    assert [a.name for a in asked] == ["djt_unref_ifn"]


def test_vdso(start_target, program):
    pid, printed = start(start_target, program)
    s = Symbols.from_process(pid)
    vdso = s.module("vdso")
    assert vdso.name == "[vdso]" and not vdso.file_backed
    assert vdso.start == printed["vdso"]
    site = one(s, "[vdso]:__vdso_clock_gettime")
    assert vdso.start <= site.address < vdso.end and s.is_executable(site.address)
    # no file: the kernel's image (this process's own vDSO) is the reference, equal to the target's
    assert vdso.read_file(site.address, 16) == s._mem().read(site.address, 16)


@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_file_changed_on_disk(start_target, program, libdjt, tmp_path, how):
    """The maps path is not trusted: a replaced or deleted file is read through map_files."""
    exe = tmp_path / "prog"
    shutil.copyfile(program, exe)
    exe.chmod(0o755)
    pid, printed = start(start_target, exe)
    if how == "replaced":
        tmp = tmp_path / "prog.new"
        shutil.copyfile(libdjt, tmp)  # a different ELF file at the same path
        os.replace(tmp, exe)
    else:
        exe.unlink()
    s = Symbols.from_process(pid)
    main = s.modules[0]
    assert main.is_main and main.path == str(exe)
    assert one(s, "local_func").address == printed["local_func"]
    if how == "replaced":
        assert not main.symbols("djt_add")  # the impostor (libdjt.so's content) is not used


def test_dlopen_in_python(start_target, libdjt):
    """A Python target: libpython (when shared) and a dlopen()ed library."""
    code = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({str(libdjt)!r})\n"
        "print('djt_add', hex(ctypes.cast(lib.djt_add, ctypes.c_void_p).value))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    t = start_target([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    printed = {}
    for line in t.proc.stdout:
        if line.strip() == "ready":
            break
        k, v = line.split()
        printed[k] = int(v, 16)
    t.proc.stdout.close()
    clear_cache()
    t0 = time.perf_counter()
    s = Symbols.from_process(t.pid)
    one(s, "libc:malloc")
    if any(m.name.startswith("libpython") for m in s.modules):
        assert one(s, "PyEval_EvalCode").function.name == "PyEval_EvalCode"
    elapsed = time.perf_counter() - t0
    assert s.modules[0].is_main and s.modules[0].name.startswith("python")
    assert one(s, "libdjt:djt_add").address == printed["djt_add"]
    # about 0.3 s on an idle 2-CPU machine; the bound only catches a gross regression under load
    assert elapsed < 5.0, f"loading symbols took {elapsed:.2f} s"
    t.proc.stdin.close()  # lets the target exit
