"""`djprobe sites`: human output, --json lines, --all coverage, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from djprobe.cli import main

TARGETS = Path(__file__).parent.parent / "targets"


@pytest.fixture(scope="module")
def sites_bin():
    from tests.conftest import compile_c

    return compile_c(TARGETS / "sites.S")


def test_human_output(sites_bin, capsys):
    rc = main(["sites", f"{sites_bin}:f_jcc", f"{sites_bin}:f_loop"])
    out = capsys.readouterr().out
    assert rc == 1  # one site refused
    assert "test edi,edi" in out and "85 ff" in out and "je short" in out
    assert "size 9: JUMP (function entry, flags dead)" in out
    assert "size 5: REFUSED" in out and "lands at" in out
    assert all(len(line) < 80 for line in out.splitlines())


def test_all_jump_exit_zero(sites_bin, capsys):
    assert main(["sites", f"{sites_bin}:f_rip"]) == 0
    assert "mov rax,[0x" in capsys.readouterr().out


def test_explicit_size(sites_bin, capsys):
    main(["sites", "--size", "6", f"{sites_bin}:f_jcc"])
    assert "ends inside" in capsys.readouterr().out


def test_json_subprocess(sites_bin):
    res = subprocess.run(
        [sys.executable, "-m", "djprobe", "sites", "--json", f"{sites_bin}:f_rip", f"{sites_bin}:f_icall"],
        capture_output=True, text=True, timeout=120,
    )
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0]["verdict"] == "jump" and lines[0]["size"] == 7
    assert lines[1]["verdict"] == "refused" and "not the last displaced" in lines[1]["reason"]
    for obj in lines:
        for key in ("site", "address", "size", "verdict", "reason", "instructions"):
            assert key in obj
    assert int(lines[0]["address"], 16) == int(lines[0]["instructions"][0]["address"], 16)


def test_library_name_without_pid(capsys):
    assert main(["sites", "--json", "libc:malloc"]) in (0, 1)
    obj = json.loads(capsys.readouterr().out)
    assert obj["function"] == "malloc" and obj["verdict"] in ("jump", "refused") and obj["reason"]


def test_all_module(sites_bin, capsys):
    assert main(["sites", "--all", str(sites_bin), "--boundaries"]) == 0
    out = capsys.readouterr().out
    assert "function entries" in out and "all instruction boundaries" in out
    assert "call/syscall not last" in out
    assert all(len(line) < 80 for line in out.splitlines())
    main(["sites", "--json", "--all", str(sites_bin)])
    obj = json.loads(capsys.readouterr().out)
    assert obj["entries"] == obj["entries_jump"] + obj["entries_refused"]
    assert obj["refused"]["indirect jump with unknown targets"] >= 1


def test_errors(sites_bin, capsys):
    assert main(["sites", "f_rip"]) == 1
    assert "MODULE:SYMBOL" in capsys.readouterr().err
    assert main(["sites", f"{sites_bin}:no_such_function"]) == 1
    assert "djprobe: error:" in capsys.readouterr().err
    assert main(["sites"]) == 1


def test_live_pid(sites_bin, start_target, capsys):
    t = start_target([sites_bin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == b"ready\n"
    name = Path(sites_bin).name
    assert main(["sites", "-p", str(t.pid), "--json", f"{name}:f_tailptr"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["verdict"] == "jump" and obj["size"] == 7
    t.proc.stdin.close()


def test_ifunc_without_pid_resolves_to_this_machines_choice(capsys):
    import json as _json

    from djprobe.cli import main as _main

    code = _main(["sites", "--json", "libc:strlen"])
    out = [_json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(out) == 1 and "strlen" in out[0]["site"] and out[0]["site"] != "libc.so.6:strlen"
    assert code == (0 if out[0]["verdict"] == "jump" else 1)


# Five functions too short for a jump (3 bytes each, packed: no padding), two that take one.
TINY_S = """#asm
        .intel_syntax noprefix
        .text
#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, .-name
#define PACKED(name) .globl name; .type name, @function; name:
FUNC(t_short0)
        xor eax, eax
        ret
END(t_short0)
PACKED(t_short1)
        xor eax, eax
        ret
END(t_short1)
PACKED(t_short2)
        xor eax, eax
        ret
END(t_short2)
PACKED(t_short3)
        xor eax, eax
        ret
END(t_short3)
PACKED(t_short4)
        xor eax, eax
        ret
END(t_short4)
PACKED(t_ok)
        mov eax, 12345678
        add eax, edi
        ret
END(t_ok)
FUNC(main)
        mov eax, 0
        add eax, 0
        ret
END(main)
        .section .note.GNU-stack,"",@progbits
"""


@pytest.fixture(scope="module")
def tiny_bin():
    from tests.conftest import compile_c

    return compile_c(TINY_S, name="tiny")


def test_all_names_refused_functions_grouped(tiny_bin, capsys):
    assert main(["sites", "--all", str(tiny_bin)]) == 0
    out = capsys.readouterr().out.splitlines()
    returns_at = next(i for i, line in enumerate(out) if line.startswith("return side:"))
    head = [i for i, line in enumerate(out[:returns_at]) if "too close to the end of the function" in line]
    assert len(head) == 1 and out[head[0]].split()[0] == "5"  # the entry side (the return side follows)
    # entries are indented 11 columns, their wrapped continuations 13
    listed = [line for line in out[head[0] + 1 :] if len(line) - len(line.lstrip()) == 11]
    assert [line.split()[0] for line in listed] == [f"{tiny_bin.name}:t_short{i}" for i in range(3)] + ["..."]
    assert listed[3].strip() == "... and 2 more (-v lists every one)"
    assert "only 3 byte(s)" in "\n".join(out)
    assert all(len(line) < 80 for line in out)
    assert main(["sites", "--all", str(tiny_bin), "-v"]) == 0
    out = capsys.readouterr().out
    assert all(f"{tiny_bin.name}:t_short{i} (0x" in out for i in range(5))
    assert "more (-v" not in out and "t_ok" not in out


def test_all_json_lists_every_refused_site(tiny_bin, capsys):
    main(["sites", "--all", str(tiny_bin), "--json"])
    obj = json.loads(capsys.readouterr().out)
    refused = obj["refused_sites"]
    assert len(refused) == obj["entries_refused"] == sum(obj["refused"].values())
    assert sorted(r["site"].split(":")[-1] for r in refused) == [f"t_short{i}" for i in range(5)]
    for r in refused:
        assert r["class"] == "too close to the end of the function" and "only 3 byte(s)" in r["reason"]
        assert isinstance(r["address"], int)


def test_all_says_which_file_a_module_name_is(capsys):
    assert main(["sites", "--all", "libc"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("module libc: /")
    path = first.split(": ", 1)[1]
    assert Path(path).exists() and Path(path).name.startswith("libc.so")
    main(["sites", "--all", "libc", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert obj["module"] == path and obj["module_name"] == "libc"


def test_sites_says_which_file_a_module_name_is(sites_bin, capsys):
    main(["sites", "libc:free"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("module libc: /") and Path(first.split(": ", 1)[1]).name.startswith("libc.so")
    main(["sites", f"{sites_bin}:f_rip"])
    assert not capsys.readouterr().out.startswith("module ")  # a path names itself
