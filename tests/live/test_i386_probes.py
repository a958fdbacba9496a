"""Count probes in 32-bit (i386) processes (issue 16): ``gcc -m32`` targets, PIE and non-PIE,
several threads, functions that start with a PC-thunk call, a short ``js`` on the caller's flags,
an ``[esp+4]`` operand, a 64-bit value returned in edx:eax; ``malloc`` of the 32-bit libc.
Exact counts, and the programs' output unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import djprobe
from djprobe import Djprobe
from djprobe.arch import I386

from ..conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(180)
FUNCS = ("thunk_entry", "jcc_entry", "call_jcc", "esp_entry", "wide")


def _build(*flags: str):
    try:
        return compile_c(TARGETS / "i386.c", "-m32", *flags, name="i386")
    except RuntimeError as exc:  # pragma: no cover
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def target32(request):
    return _build(*request.param)


def _reference(exe, threads: int, n: int) -> str:
    return subprocess.run([exe, "run", str(threads), str(n)], capture_output=True, text=True, timeout=60, check=True).stdout


def test_spawned_32bit_counts_are_exact_and_output_unchanged(target32):
    threads, n = 4, 20_000
    want = _reference(target32, threads, n)
    proc = djprobe.spawn([str(target32), "run", str(threads), str(n)], stdout=subprocess.PIPE)
    try:
        assert proc.process.arch is I386
        probes = {name: proc.register(Djprobe(name)) for name in FUNCS}
        for region in proc._regions:  # below 4 GiB, and not at an address that reads as text
            assert region.end <= 1 << 32 and not 0x20 <= region.start >> 24 <= 0x7E
        # the relocated PC-thunk call pushes the original return address
        thunk = probes["thunk_entry"]._instance.stub
        assert bytes([0x68]) + (probes["thunk_entry"].address + 5).to_bytes(4, "little") in thunk.code
        proc.start()
        out, _ = proc.process.popen.communicate(timeout=120)
        assert out.decode() == want and proc.process.popen.returncode == 0
        assert {name: p.hits for name, p in probes.items()} == {name: threads * n for name in FUNCS}
    finally:
        proc.close()


def test_attached_32bit_counts_while_threads_run(target32, start_target):
    threads, n = 3, 30_000
    want = _reference(target32, threads, n)
    t = start_target([target32, "wait", threads, n], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == f"ready {t.pid}\n".encode()
    with djprobe.attach(t.pid) as proc:
        probes = {name: proc.register(Djprobe(name)) for name in FUNCS}
        t.proc.stdin.write(b"go\n")
        t.proc.stdin.flush()
        lines = [t.proc.stdout.readline().decode() for _ in range(5)]
        assert "".join(lines[:4]) == want and lines[4] == "done\n"
        assert {name: p.hits for name, p in probes.items()} == {name: threads * n for name in FUNCS}
        proc.unregister_many(list(probes.values()))
    t.proc.stdin.close()
    assert t.proc.wait(timeout=30) == 0


def test_libc_malloc_in_32bit_libc_exact(start_target):
    exe = _build("-fPIE", "-pie")
    threads, n = 4, 25_000
    t = start_target([exe, "malloc", threads, n], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == f"ready {t.pid}\n".encode()
    with djprobe.attach(t.pid) as proc:
        malloc = proc.register(Djprobe("libc:malloc"))
        assert malloc.site.startswith("libc.so.6:malloc") and malloc.address < 1 << 32
        assert proc.symbols.module("libc").arch is I386
        t.proc.stdin.write(b"go\n")
        t.proc.stdin.flush()
        assert t.proc.stdout.readline() == f"mallocs {threads * n}\n".encode()
        assert t.proc.stdout.readline() == b"done\n"
        assert malloc.hits == threads * n
    assert t.proc.wait(timeout=30) == 0


def test_count_cli_on_a_32bit_command(target32):
    threads, n = 2, 5_000
    want = _reference(target32, threads, n)
    res = subprocess.run(
        [sys.executable, "-m", "djprobe", "count", "--json", *FUNCS, "--", str(target32), "run", str(threads), str(n)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.splitlines()[-1])
    assert res.stdout.splitlines()[:-1] == want.splitlines()
    assert {p["site"].split(":")[1]: p["hits"] for p in report["probes"]} == {name: threads * n for name in FUNCS}


_TRACER = r"""
import sys
import djprobe
proc = djprobe.attach(int(sys.argv[1]))
for name in sys.argv[2:]:
    proc.register(djprobe.Djprobe(name))
print("in", flush=True)
sys.stdin.read()
"""


def test_killed_tracer_32bit_status_and_cleanup(target32, start_target):
    """The tracer is SIGKILLed with its probes in a 32-bit process: the stubs keep counting,
    ``status`` lists them, ``cleanup`` restores every byte and the program ends as it would."""
    threads, n = 2, 10_000
    want = _reference(target32, threads, n)
    t = start_target([target32, "wait", threads, n], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == f"ready {t.pid}\n".encode()
    syms = djprobe.symbols.Symbols.from_process(t.pid)
    sites = {name: syms.resolve(name)[0].address for name in FUNCS}
    original = {name: syms.module_at(a).read_file(a, 8) for name, a in sites.items()}
    tracer = start_target([sys.executable, "-c", _TRACER, t.pid, *FUNCS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert tracer.proc.stdout.readline() == b"in\n"
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        for name, a in sites.items():
            mem.seek(a)
            assert mem.read(1) == b"\xe9", name  # the jump is in
    tracer.kill()
    t.proc.stdin.write(b"go\n")
    t.proc.stdin.flush()
    lines = [t.proc.stdout.readline().decode() for _ in range(5)]
    assert "".join(lines) == want + "done\n"  # the stubs ran without their tracer
    res = subprocess.run([sys.executable, "-m", "djprobe", "status", "--json", "-p", str(t.pid)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    text = json.dumps(status)
    assert all(name in text for name in FUNCS), text
    assert str(threads * n) in text  # the counts the stubs kept
    res = subprocess.run([sys.executable, "-m", "djprobe", "cleanup", "-p", str(t.pid)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "5 restored" in res.stdout, (res.stdout, res.stderr)
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        for name, a in sites.items():
            mem.seek(a)
            assert mem.read(8) == original[name], name
    t.proc.stdin.close()
    assert t.proc.wait(timeout=30) == 0
