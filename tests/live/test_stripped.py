"""Issue 13 item 4: a stripped executable and a stripped library are probed at functions only
.eh_frame describes (named sub_<vaddr>), with exact counts; `sites` names and covers them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import compile_c

pytestmark = pytest.mark.timeout(180)
DJPROBE = [sys.executable, "-m", "djprobe"]

LIB_C = r"""
static __attribute__((noinline, noclone)) long lib_hidden(long x) { __asm__ volatile(""); return x * 5 + 2; }
long lib_run(long n) { long acc = 0; for (long i = 0; i < n; i++) acc += lib_hidden(i); return acc; }
"""

EXE_C = r"""
#include <stdio.h>
#include <stdlib.h>
long lib_run(long n);
static __attribute__((noinline, noclone)) long exe_hidden(long x) { __asm__ volatile(""); return x * 3 + 1; }
static __attribute__((noinline, noclone)) long exe_rare(long x) { __asm__ volatile(""); return x ^ 0x55; }
int main(int argc, char **argv) {
    long n = atol(argv[1]), acc = 0;
    for (long i = 0; i < n; i++) {
        acc += exe_hidden(i);
        if (i % 4 == 0) acc += exe_rare(i);
    }
    printf("acc %ld lib %ld\n", acc, lib_run(n / 2));
    return 0;
}
"""


def _nm(path) -> dict[str, int]:
    out = subprocess.run(["nm", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(stripped exe, stripped lib, vaddrs from the unstripped builds)."""
    d = tmp_path_factory.mktemp("stripped")
    lib = compile_c(LIB_C, "-shared", "-fPIC", name="libstrip")
    subprocess.run(["strip", "-o", str(d / "libstrip.so"), str(lib)], check=True, timeout=60)
    exe = compile_c(EXE_C, f"-L{d}", f"-Wl,-rpath,{d}", "-l:libstrip.so", name="strippedexe")
    subprocess.run(["strip", "-o", str(d / "prog"), str(exe)], check=True, timeout=60)
    vaddrs = {**_nm(exe), **_nm(lib)}
    return d / "prog", d / "libstrip.so", vaddrs


def test_stripped_files_have_no_symbols_for_them(built):
    prog, lib, v = built
    res = subprocess.run(["nm", str(prog)], capture_output=True, text=True)
    assert "exe_hidden" not in res.stdout and "no symbols" in res.stderr
    res = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True)
    assert "lib_run" in res.stdout and "lib_hidden" not in res.stdout


def test_count_at_fde_only_functions_is_exact(built):
    prog, lib, v = built
    patterns = [f"sub_{v['exe_hidden']:x}", f"sub_{v['exe_rare']:x}", f"libstrip:sub_{v['lib_hidden']:x}"]
    res = subprocess.run(DJPROBE + ["count", "--json", *patterns, "--", str(prog), "1000"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("acc ")
    report = json.loads(lines[-1])
    assert report["refused"] == []
    hits = {p["site"]: p["hits"] for p in report["probes"]}
    assert hits == {
        f"prog:sub_{v['exe_hidden']:x}": 1000,
        f"prog:sub_{v['exe_rare']:x}": 250,
        f"libstrip.so:sub_{v['lib_hidden']:x}": 500,
    }


def test_count_at_an_fde_only_function_given_as_an_address(built):
    prog, lib, v = built
    # the function's entry given as an address (file vaddr of the main executable)
    res = subprocess.run(DJPROBE + ["count", "--json", f"prog:0x{v['exe_rare']:x}", "--", str(prog), "400"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.splitlines()[-1])
    assert [(p["site"], p["hits"]) for p in report["probes"]] == [(f"prog:sub_{v['exe_rare']:x}", 100)]


def test_sites_names_and_covers_fde_only_functions(built):
    prog, lib, v = built
    res = subprocess.run(DJPROBE + ["sites", "--json", f"{lib}:0x{v['lib_hidden']:x}"],
                         capture_output=True, text=True, timeout=120)
    obj = json.loads(res.stdout)
    assert obj["function"] == f"sub_{v['lib_hidden']:x}" and obj["verdict"] == "jump", obj
    res = subprocess.run(DJPROBE + ["sites", "--all", str(prog), "--json"], capture_output=True, text=True, timeout=120)
    cov = json.loads(res.stdout)
    assert cov["entries"] >= 3  # main has no symbol either: every function comes from an FDE
    res = subprocess.run(DJPROBE + ["sites", "--all", str(prog), "-v"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
