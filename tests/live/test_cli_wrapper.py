"""Issue 13 item 8: a command that is a #! script, or that execs another program, is named as
such instead of counting nothing in silence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


def _script(path, text: str):
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=90)


def _unwrapped(text: str) -> str:
    return " ".join(text.split())


def test_script_with_patterns_of_the_real_program(tmp_path):
    script = _script(tmp_path / "wrap.sh", "#!/bin/sh\nexec /bin/true\n")
    res = _run(DJPROBE + ["count", "work_a", "--", script])
    assert res.returncode == 1
    err = _unwrapped(res.stderr)
    assert err.startswith("note: wrap.sh is a shell script run by /bin/sh; patterns apply to /bin/sh")
    assert "--follow is not supported" in err and "give the real program after --" in err
    assert "djprobe: error: wrap.sh: not started: pattern 'work_a' matches nothing" in err
    assert err.endswith(f"({script} is a script: see the note above)")
    assert "Traceback" not in res.stderr
    assert all(len(line) < 80 for line in res.stderr.splitlines() if line.startswith(("note", "  ")))


def test_env_script_names_the_interpreter(tmp_path):
    script = _script(tmp_path / "tool", "#!/usr/bin/env python3\nprint('hi')\n")
    res = _run(DJPROBE + ["count", "--json", "libc:getpid", "--", script])
    err = _unwrapped(res.stderr)
    assert "note: tool is a script run by /usr/bin/env python3; patterns apply to python3" in err


def test_exec_of_another_program_is_reported(tmp_path, counts_exe):
    script = _script(tmp_path / "shim.sh", f"#!/bin/sh\nexec {counts_exe} run 100\n")
    res = _run(DJPROBE + ["count", "--json", "libc:malloc", "--", script])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "done calls_a=400 bad=0"
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["exit_status"] == 0
    err = _unwrapped(res.stderr)
    real = os.path.basename(counts_exe)[:15]  # comm is at most 15 characters
    assert f"replaced its program by exec (shim.sh -> {real})" in err
    assert "the counts are those of shim.sh only" in err


def test_binary_that_does_not_exec_gets_no_note(counts_exe):
    res = _run(DJPROBE + ["count", "--json", "work_a", "--", counts_exe, "run", "10"])
    assert res.returncode == 0, res.stderr
    assert "note:" not in res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["probes"][0]["hits"] == 40


def test_trace_notes_too(tmp_path, counts_exe):
    script = _script(tmp_path / "shim.sh", f"#!/bin/sh\nexec {counts_exe} run 10\n")
    res = _run(DJPROBE + ["trace", "--json", "libc:getenv", "--", script])
    assert res.returncode == 0, res.stderr
    err = _unwrapped(res.stderr)
    assert "note: shim.sh is a shell script run by /bin/sh" in err
    assert "replaced its program by exec (shim.sh ->" in err
