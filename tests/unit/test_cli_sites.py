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
