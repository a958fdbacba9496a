"""Rows that read a string argument at every hit: `work_str(s, limit)` of the loop target (the
code of `work`, with a 31-byte path-like string as first argument).

- *djprobe record + string* (`djp_record_string`): `Djprobe("work_str", prototype="const char *s,
  long limit")`: the stub copies `s` with `process_vm_readv` in the target (64 bytes); rounds of
  1,024 calls with 50 ms pauses in which `read_events()` drains (as the record rows, with longer
  pauses: the consumer decodes the strings); every event must arrive with the right string.
- *Frida onEnter + readUtf8String* (`frida_string`): `Interceptor.attach(work_str, {onEnter(args)
  { args[0].readUtf8String(); n++ }})` in JavaScript.
- *bpftrace str(arg0)* (`bpftrace_string`): `uprobe:EXE:work_str { @c = count(); @s = str(arg0); }`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from . import build
from .loop import Sample, Skip, _need_record, _Out, _loop_argv, _parse_result, _sample

# Rounds of 1,024 calls per thread, then 50 ms for the consumer (which decodes each string in
# Python: a few microseconds per event on a loaded machine).
ROUNDS = ("round=1024", "pause=50000")

BENCH_STRING = "/usr/share/djprobe/bench-string"  # as in targets/loop.c
PROTOTYPE = "const char *s, long limit"


def run_djprobe_record_string(threads: int, iters: int) -> Sample:
    _need_record()
    import djprobe
    from djprobe.area import AreaLayout

    with _Out() as out:
        subprocess.run(_loop_argv("str", iters, threads, out, *ROUNDS), check=True, timeout=600)
        base = _parse_result(out.read_text())
    events = wrong = 0
    busy = 0.0
    with _Out() as out:
        with djprobe.spawn(_loop_argv("str", iters, threads, out, *ROUNDS)) as proc:
            proc.layout = AreaLayout(string_ring_slots=4096)  # a round of 1,024 calls fits a ring
            djp = proc.register(djprobe.Djprobe("work_str", prototype=PROTOTYPE))
            proc.read_events()  # TSC clock calibration before the target runs
            proc.start()
            popen = proc.process.popen
            while True:
                alive = popen.poll() is None
                t0 = time.perf_counter()
                batch = proc.read_events()
                busy += time.perf_counter() - t0
                events += len(batch)
                wrong += sum(1 for slots in batch.fetched.values() if slots[0] != BENCH_STRING)
                if not alive:
                    break
                if not len(batch):
                    time.sleep(0.0005)
            if popen.wait(timeout=600) != 0:
                raise RuntimeError("target failed")
            hits, missed = djp.hits, djp.missed
        r = _parse_result(out.read_text())
    s = _sample(r, iters, hits, events=events, missed=missed, base_ns=base["elapsed_ns"] / iters, wrong_strings=wrong)
    if events + missed != hits or wrong:
        s.expected_hits = events + missed if not wrong else -1  # lost events or a wrong string: WRONG
    return s


def run_bpftrace_string(threads: int, iters: int) -> Sample:
    tool = shutil.which("bpftrace")
    if tool is None:
        raise Skip("bpftrace not installed")
    if os.geteuid() != 0:
        raise Skip("not root")
    exe = build.loop_target()
    with _Out() as out:
        cmd = " ".join(_loop_argv("str", iters, threads, out))
        res = subprocess.run(
            [tool, "-e", f"uprobe:{exe}:work_str {{ @c = count(); @s = str(arg0); }}", "-c", cmd],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        text = out.read_text()
        if not text:
            raise RuntimeError(f"bpftrace run failed: {res.stderr.strip()[-300:]}")
        r = _parse_result(text)
    hits = None
    for line in res.stdout.splitlines():
        if line.startswith("@c:"):
            hits = int(line.split(":")[1])
    return _sample(r, iters, hits if hits is not None else -1)
