"""Issue 13, items 2, 3 and 6: the report on stdout or -o FILE, djprobe's own messages on stderr,
JSON lines per interval, and the wording of banners and refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
DJPROBE = [sys.executable, "-m", "djprobe"]

# tick() is called N times, 10 ms apart: long enough for several -i intervals, exact in the end.
TICKS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) void tick(long i) { sink += i; }
__attribute__((noinline)) void never(long i) { sink -= i; }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) { tick(i); usleep(10000); }
    printf("ticks %ld\n", n);
    return 3;
}
"""


def _many_functions_c(n: int) -> str:
    funcs = "\n".join(f"__attribute__((noinline)) void f{i}(long x) {{ sink += x * {i + 1}; }}" for i in range(n))
    calls = " ".join(f"f{i}(k);" for i in range(n))
    return (
        "#include <stdio.h>\nvolatile long sink;\n" + funcs + "\n"
        "int main(void) { for (long k = 0; k < 3; k++) { " + calls + " } puts(\"many done\"); return 0; }\n"
    )


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


@pytest.fixture(scope="module")
def ticks_exe():
    return compile_c(TICKS_C, name="ticks")


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=90, **kw)


# -- item 2: output where it belongs ------------------------------------------------------------
def test_count_banner_on_stderr_report_on_stdout(counts_exe):
    res = run(DJPROBE + ["count", "work_a", "--", counts_exe, "run", "500"])
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == 'Tracing 1 function for "work_a"... Hit Ctrl-C to end.'
    assert "Tracing" not in res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == "done calls_a=2000 bad=0"  # the program's own output
    assert lines[1].split() == ["FUNC", "MODE", "COUNT"]
    assert lines[2].split()[0].endswith(":work_a") and lines[2].split()[-1] == "2000"
    assert len(lines) == 3


def test_count_json_to_file_leaves_stdout_to_the_program(counts_exe, tmp_path):
    report = tmp_path / "report.json"
    res = run(DJPROBE + ["count", "--json", "-o", report, "work_a", "work_b", "--", counts_exe, "run", "1000"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done calls_a=4000 bad=0\n"
    assert res.stderr.startswith('Tracing 2 functions for "work_a work_b"')
    (line,) = report.read_text().splitlines()
    obj = json.loads(line)
    assert {p["site"].split(":")[-1]: p["hits"] for p in obj["probes"]} == {"work_a": 4000, "work_b": 1000}
    assert obj["final"] is True and obj["exit_status"] == 0


def test_trace_to_file(tmp_path):
    args_exe = compile_c(TARGETS / "args.c", name="args")
    report = tmp_path / "hits.txt"
    res = run(DJPROBE + ["trace", "-o", report, "f", "--", args_exe, "20"])
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith('Tracing 1 function for "f"')
    assert "TIME" not in res.stdout and "PROBE" not in res.stdout  # only the program's own lines
    text = report.read_text().splitlines()
    assert text[0].split() == ["TIME", "TID", "PROBE", "ARGS"]
    hits = [line for line in text if line.split()[2:3] and line.split()[2].endswith(":f")]
    assert len(hits) == 60
    assert text[-3].split() == ["PROBE", "MODE", "HITS", "DELIVERED", "DROPPED"] and text[-2].split()[1:] == ["jump", "60", "60", "0"]
    assert text[-1].startswith("probes waited ")


def test_sites_status_cleanup_to_file(tmp_path, start_target, counts_exe):
    sites_exe = compile_c(TARGETS / "sites.S")
    out = tmp_path / "sites.txt"
    res = run(DJPROBE + ["sites", "-o", out, f"{sites_exe}:f_rip"])
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    assert "size 7: JUMP" in out.read_text()
    t = start_target([counts_exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    for cmd in ("status", "cleanup"):
        out = tmp_path / f"{cmd}.json"
        res = run(DJPROBE + [cmd, "-p", t.pid, "--json", "-o", out])
        assert res.returncode == 0, res.stderr
        assert res.stdout == ""
        assert json.loads(out.read_text())["pid"] == t.pid
    t.proc.stdin.close()
    assert t.proc.stdout.readline().split()[-1] == "0"


def test_output_to_bad_path_fails_before_the_command_runs(counts_exe, tmp_path):
    bad = tmp_path / "no" / "such" / "dir" / "r.json"
    res = run(DJPROBE + ["count", "-o", bad, "work_a", "--", counts_exe, "run", "10"])
    assert res.returncode == 1
    assert str(bad) in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""  # the command never ran


# -- item 3: intervals ------------------------------------------------------------------------------
def test_count_interval_json_lines(ticks_exe):
    res = run(DJPROBE + ["count", "--json", "-i", "0.3", "tick", "never", "--", ticks_exe, "150"])
    assert res.returncode == 3, res.stderr
    lines = res.stdout.splitlines()
    assert [line for line in lines if not line.startswith("{")] == ["ticks 150"]
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(reports) >= 3, reports
    assert [r["interval"] for r in reports] == list(range(1, len(reports) + 1))
    assert [r["final"] for r in reports] == [False] * (len(reports) - 1) + [True]
    times = [r["time"] for r in reports]
    assert times == sorted(times) and times[-1] - times[0] >= 0.3
    ticks = [{p["site"].split(":")[-1]: p["hits"] for p in r["probes"]}["tick"] for r in reports]
    assert ticks == sorted(ticks) and 0 < ticks[0] < 150 and ticks[-1] == 150
    assert all({p["site"].split(":")[-1]: p["hits"] for p in r["probes"]}["never"] == 0 for r in reports)
    assert reports[-1]["exit_status"] == 3 and all(r["exit_status"] is None for r in reports[:-1])


def test_count_interval_text_marks_final(ticks_exe):
    res = run(DJPROBE + ["count", "-i", "0.3", "tick", "--", ticks_exe, "100"])
    assert res.returncode == 3, res.stderr
    heads = [line for line in res.stdout.splitlines() if line.startswith("[")]
    assert len(heads) >= 2
    assert [h.endswith("(final)") for h in heads] == [False] * (len(heads) - 1) + [True]
    assert [int(h.split()[2]) for h in heads] == list(range(1, len(heads) + 1))
    assert res.stdout.splitlines()[-1].split()[-1] == "100"


# -- item 6: messages -----------------------------------------------------------------------------
def test_banner_with_many_patterns_is_short():
    exe = compile_c(_many_functions_c(40), name="many")
    patterns = [f"f{i}" for i in range(40)]
    res = run(DJPROBE + ["count", "--json", *patterns, "--", exe])
    assert res.returncode == 0, res.stderr
    banner = res.stderr.splitlines()[0]
    assert banner == 'Tracing 40 functions for "f0 f1 f2 f3 f4 and 35 more"... Hit Ctrl-C to end.'
    obj = json.loads(res.stdout.splitlines()[-1])
    assert sorted(p["hits"] for p in obj["probes"]) == [3] * 40


def test_busy_site_reason_names_the_site_once(start_target):
    """An int3 that is not ours at f_rip (it runs only after stdin closes): refused, EBUSY,
    the site named once in the message."""
    sites_exe = compile_c(TARGETS / "sites.S")
    t = start_target([sites_exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with Symbols.from_process(t.pid) as syms:
        addr = syms.modules[0].symbols("f_rip")[0].address
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(addr)
        orig = mem.read(1)
        mem.seek(addr)
        mem.write(b"\xcc")
        try:
            res = run(DJPROBE + ["count", "-p", t.pid, "-d", "0.2", "f_rip", "f_jcc"])
        finally:
            mem.seek(addr)
            mem.write(orig)
    assert res.returncode == 0, res.stderr
    err = res.stderr.splitlines()
    assert err[0].startswith('Tracing 1 function for "f_rip f_jcc"')
    assert err[1] == "1 site refused:"
    (line,) = [e for e in err if "f_rip" in e and "already patched" in e]
    assert line.count("f_rip") == 1, line
    assert line.startswith("  ") and line.split(": ", 1)[1].startswith("already patched"), line
    t.proc.stdin.close()
    assert t.proc.wait(timeout=10) == 0
