"""The commands and examples, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DJPROBE = [sys.executable, "-m", "djprobe"]


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


@pytest.fixture(scope="module")
def args_exe():
    return compile_c(TARGETS / "args.c", name="args")


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=90, **kw)


def test_count_json_exact_and_exit_status(counts_exe):
    res = run(DJPROBE + ["count", "--json", "work_a", "work_b", "--", counts_exe, "run", "2000"])
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().splitlines()
    assert out[0] == "done calls_a=8000 bad=0"
    report = json.loads(out[-1])
    hits = {p["site"].split(":")[1]: p["hits"] for p in report["probes"]}
    assert hits == {"work_a": 8000, "work_b": 2000}
    assert report["refused"] == [] and report["exit_status"] == 0
    assert [p["hits"] for p in report["probes"]] == sorted((p["hits"] for p in report["probes"]), reverse=True)


def test_count_passes_on_command_exit_status():
    behave = compile_c([TARGETS / "behave.S", TARGETS / "behave_main.c"], name="behave")
    res = run(DJPROBE + ["count", "riprel", "--", behave, "100"])
    assert res.returncode == 7, res.stderr
    assert res.stderr.startswith("Tracing 1 function for")
    assert any(line.split()[-1] == "400" for line in res.stdout.splitlines() if "riprel" in line)


def test_count_lists_refused_sites_with_reason():
    res = run(DJPROBE + ["count", "--json", "libc:*alloc", "libc:free", "--", "/bin/true"])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["probes"], "some allocator functions take probes"
    sites = {p["site"] for p in report["probes"]}
    assert any(s.endswith(":malloc") for s in sites)
    for r in report["refused"]:
        assert r["reason"]


def test_count_main_job_of_readme():
    res = run(DJPROBE + ["count", "libc:*alloc", "libc:free", "--", "ls", "-l", "/"])
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("Tracing") and "malloc" in res.stdout
    malloc_line = next(line for line in res.stdout.splitlines() if line.split()[0].endswith(":malloc"))
    assert int(malloc_line.split()[-1]) > 0


def test_count_bad_input_is_one_line_error():
    res = run(DJPROBE + ["count", "-p", "999999999", "work_a"])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "999999999" in res.stderr
    res = run(DJPROBE + ["count", "nosuchfunction_xyz", "--", "/bin/true"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "nosuchfunction_xyz" in res.stderr


def test_trace_json_lines(args_exe):
    res = run(DJPROBE + ["trace", "--json", "f", "--", args_exe, "100"])
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    events = [e for e in lines if "time_ns" in e]
    summary = [e for e in lines if "summary" in e]
    assert len(events) == 300
    tids = {int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("tid ")}
    assert {e["tid"] for e in events} == tids
    for e in events:
        i = e["args"][0] % 1000000
        assert e["args"][1:] == [2 * i, 3 * i, 4 * i, 5 * i, 6 * i]
        assert e["site"].endswith(":f") and isinstance(e["address"], int)
    assert summary[0]["summary"][0]["hits"] == 300 and summary[0]["summary"][0]["dropped"] == 0


def test_trace_into_head_ends_cleanly_and_unpatches(start_target, counts_exe):
    t = start_target([counts_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    cmd = f"{sys.executable} -m djprobe trace -p {t.pid} work_b | head -5"
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0
    assert len(res.stdout.splitlines()) == 5
    assert "Traceback" not in res.stderr, res.stderr
    live = Symbols.from_process(t.pid)
    sym = live.modules[0].symbols("work_b")[0]
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        mem.seek(sym.address)
        assert mem.read(16) == live.modules[0].read_file(sym.address, 16)
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"


def test_examples_run(args_exe):
    res = run([sys.executable, ROOT / "examples" / "noop_djprobe.py", "f", "--", args_exe, "500"])
    assert res.returncode == 0, res.stderr
    assert "hits=1500" in res.stdout
    res = run([sys.executable, ROOT / "examples" / "sample_handler.py", "f", "--", args_exe, "4"])
    assert res.returncode == 0, res.stderr
    probing = [line for line in res.stdout.splitlines() if line.startswith("Probing(0x")]
    assert len(probing) == 12
    assert "hits=12 missed=0" in res.stdout
