"""A whole process probed at once: ``djprobe count -p PID --all-modules`` ('*:*') on python3
(libc, libpython, libm, ld.so, extension modules), with the site cache cold and then warm.

Not timed (bench/whole_process.py measures it). Checked: every module takes probes, an exact
count where the program's calls are known (``os.getppid`` -> libc ``getppid``, N times), hits
in libpython and in the extension modules the work uses, and the program's output unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

N = 1234
PROGRAM = f"""
import hashlib, json, math, os, sys
print("ready", flush=True)
sys.stdin.readline()
for _ in range({N}):
    os.getppid()
data = json.dumps({{"roots": [math.sqrt(i) for i in range(2000)], "logs": [math.log1p(i) for i in range(2000)]}})
print(hashlib.sha256(data.encode()).hexdigest(), len(data), flush=True)
sys.stdin.readline()
"""


def _reference() -> str:
    done = subprocess.run([sys.executable, "-c", PROGRAM], input="\n\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _probe_whole(cache_dir: str, pattern_args: list[str]) -> tuple[str, dict, str]:
    """Run PROGRAM under ``djprobe count -p PID`` over the whole process; returns the program's
    output, djprobe's JSON report and its stderr."""
    target = subprocess.Popen([sys.executable, "-c", PROGRAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        output = target.stdout.readline()
        assert output == "ready\n"
        env = dict(os.environ, DJPROBE_CACHE_DIR=cache_dir)
        tracer = subprocess.Popen(
            [sys.executable, "-m", "djprobe", "count", "--json", "-p", str(target.pid), *pattern_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        notes = ""  # notes come before the banner, which is written once every probe is in
        banner = tracer.stderr.readline()
        while banner.startswith(("note:", "  ")):
            notes, banner = notes + banner, tracer.stderr.readline()
        if not banner.startswith("Tracing") or _hook_refused(notes):
            # stderr.read() here would wait for a tracer that runs until SIGINT, while it waits
            # to write its report into a full stdout pipe: the test would hang to its timeout
            tracer.kill()
            _, rest = tracer.communicate(timeout=60)
            pytest.fail(f"no banner, or a vfork hook not in:\n{notes}{banner}{rest[:4000]}")
        target.stdin.write("go\n")
        target.stdin.flush()
        output += target.stdout.readline()
        tracer.send_signal(signal.SIGINT)
        report_text, errors = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, errors
        target.stdin.write("exit\n")
        target.stdin.flush()
        output += target.stdout.read()
        assert target.wait(timeout=30) == 0
        return output, json.loads(report_text.strip().splitlines()[-1]), notes + banner + errors
    finally:
        for p in (tracer, target):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _hook_refused(notes: str) -> bool:
    """Whether djprobe's notes say a vfork hook could not go in where libc has its place: '*:*'
    probes ``vfork`` and ``__spawni_child``, which once refused both hooks (a libc without
    ``__spawni_child`` in any symbol table is the machine's, not a fault)."""
    text = " ".join(notes.split())
    return "vfork hook at" in text or "no vfork system call" in text


def _module_hits(report: dict) -> dict[str, tuple[int, int]]:
    """module name -> (probes, probes with hits)."""
    out: dict[str, tuple[int, int]] = {}
    for p in report["probes"]:
        module = p["site"].rsplit(":", 1)[0]
        n, hit = out.get(module, (0, 0))
        out[module] = (n + 1, hit + (p["hits"] > 0))
    return out


@pytest.mark.parametrize("pattern_args", [["--all-modules"]])
def test_whole_python_process_counts_cold_then_warm_cache(tmp_path, pattern_args):
    expected = _reference()
    cache = str(tmp_path / "cache")
    cold_out, cold, _ = _probe_whole(cache, pattern_args)
    assert os.listdir(cache), "the cold run wrote its verdicts"
    warm_out, warm, _ = _probe_whole(cache, ["*:*"])
    for output, report in ((cold_out, cold), (warm_out, warm)):
        assert output == expected  # the program computed and printed the same
        hits = {p["site"]: p["hits"] for p in report["probes"]}
        assert len(hits) > 10_000
        assert hits["libc.so.6:getppid"] == N  # exact: nothing else in the program calls it
        modules = _module_hits(report)
        for name in ("libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"):
            assert modules[name][0] > 100, (name, modules.get(name))
        libpython = next(m for m in modules if m.startswith("libpython"))
        assert modules[libpython][1] > 100  # the interpreter ran
        assert hits[f"{libpython}:PyFloat_FromDouble"] >= 4000  # a float per math result
        assert modules["libm.so.6"][1] > 0
        for ext in ("_json", "math"):  # extension modules the work used
            name = next(m for m in modules if m.startswith(ext + ".cpython"))
            assert modules[name][1] > 0, name
    # the same sites, the same verdicts, cache or not
    assert {p["site"] for p in cold["probes"]} == {p["site"] for p in warm["probes"]}
    assert {(r["site"], _masked(r["reason"])) for r in cold["refused"]} == {
        (r["site"], _masked(r["reason"])) for r in warm["refused"]
    }


def _masked(reason: str) -> str:
    """A refusal reason without its addresses (two processes, two address-space layouts)."""
    return re.sub(r"0x[0-9a-f]+", "0x?", reason)
