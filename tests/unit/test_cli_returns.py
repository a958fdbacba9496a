"""`djprobe sites SITE%return` and the return side of `sites --all`."""

from __future__ import annotations

import json

import pytest

from djprobe.cli import main
from tests.conftest import TARGETS, compile_c


@pytest.fixture(scope="module")
def exe():
    return compile_c([TARGETS / "exits.S", TARGETS / "returns_main.c"], "-O2", name="returns")


def test_exit_windows_text(exe, capsys):
    rc = main(["sites", f"{exe}:x_paths%return", f"{exe}:x_three%return"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("path window (way into") == 3 and "js short" in out and "jmp short" in out
    assert out.count("exit return 'ret'") == 4
    assert "return probe: JUMP: jump at each of 3 exit(s)" in out
    assert all(len(line) < 80 for line in out.splitlines())


def test_refused_function_exit_status_and_reason(exe, capsys):
    rc = main(["sites", f"{exe}:x_tiny%return"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "return probe: REFUSED" in out and "only 4 byte(s) from the start of x_tiny" in out


def test_exit_windows_json(exe, capsys):
    main(["sites", "--json", f"{exe}:x_condtail%return", f"{exe}:x_paths%return"])
    cond, paths = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert cond["verdict"] == "jump" and [e["exit_kind"] for e in cond["exits"]] == ["tail_call", "return"]
    assert cond["exits"][0]["exit_text"].startswith("jne")
    (e,) = paths["exits"]
    assert e["verdict"] == "refused" and len(e["paths"]) == 3
    assert all(p["verdict"] == "jump" and p["exit_path"][0]["text"] == "ret" for p in e["paths"])


def test_coverage_reports_the_return_side(exe, capsys):
    main(["sites", "--json", "--all", str(exe)])
    rep = json.loads(capsys.readouterr().out)
    refused = {"x_tiny", "x_short"}  # the hand-written refusals; the rest of the file is fine
    assert rep["functions"] - rep["returns_jump"] >= len(refused)
    assert 0 < rep["return_ratio"] < 1 and rep["entry_and_returns_jump"] <= rep["returns_jump"]
    assert sum(rep["return_refused"].values()) == rep["functions"] - rep["returns_jump"]
    assert "function too short" in rep["return_refused"]
    main(["sites", "--all", str(exe)])
    out = " ".join(capsys.readouterr().out.split())
    assert "return side:" in out and "entry and every exit:" in out
