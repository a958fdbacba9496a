"""Rows of the 32-bit (i386) loop target: `work` of targets/work32.S (cdecl, arguments on the
stack) called by targets/loop.c built with ``gcc -m32``.

- *djprobe count, entry, i386* (`djp_entry_i386`): `Djprobe("work")` in the 32-bit process (the
  32-bit count stub: `lock add` on an esp-sharded counter; no rseq in 32-bit processes).
- *kernel uprobe, i386* (`uprobe_i386`): a tracefs uprobe on the same function of the same file.
- *djprobe record + string, i386* (`djp_record_string_i386`): `Djprobe("work_str", prototype=
  "const char *s, long limit")` in the 32-bit process (``work_str`` is ``work``'s code): the
  32-bit fetch stub copies 64 bytes with ``process_vm_readv`` by ``int 0x80`` at each hit; rounds
  of 1,024 calls with 50 ms pauses in which ``read_events()`` drains, every string checked (as the
  x86-64 ``djp_record_string`` row).

Each row measures its own baseline (the same 32-bit loop with no probe, just before) and reports
it as ``base_ns``: the overhead column is over the 32-bit loop, not the x86-64 one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import build
from .loop import TRACEFS, Sample, Skip, _Out, _parse_result, _sample, _tracefs_append


def loop32_target() -> Path:
    try:
        return build.compile_c([build.TARGETS / "loop.c", build.TARGETS / "work32.S"], "loop32", "-m32")
    except RuntimeError as exc:
        raise Skip(f"gcc -m32 cannot build the 32-bit loop (gcc-multilib): {str(exc).splitlines()[-1]}") from exc


def _argv(iters: int, threads: int, out: Path) -> list[str]:
    return [str(loop32_target()), "work", str(iters), str(threads), str(out)]


def _plain(threads: int, iters: int) -> dict[str, int]:
    with _Out() as out:
        subprocess.run(_argv(iters, threads, out), check=True, timeout=600)
        return _parse_result(out.read_text())


def run_djprobe_entry_i386(threads: int, iters: int) -> Sample:
    import djprobe

    base = _plain(threads, iters)
    with _Out() as out:
        with djprobe.spawn(_argv(iters, threads, out)) as proc:
            if proc.process.arch.bits != 32:
                raise RuntimeError("the 32-bit loop target is not a 32-bit process")
            djp = proc.register(djprobe.Djprobe("work"))
            if djp.mode != "jump":
                raise RuntimeError(f"work took no jump: {djp.no_jump_reason}")
            proc.start()
            if proc.process.popen.wait(timeout=600) != 0:
                raise RuntimeError("target failed")
            hits = djp.hits
        result = _parse_result(out.read_text())
    return _sample(result, iters, hits, base_ns=base["elapsed_ns"] / iters)


def run_uprobe_i386(threads: int, iters: int) -> Sample:
    if os.geteuid() != 0:
        raise Skip("not root")
    if not (TRACEFS / "uprobe_events").exists():
        raise Skip("no tracefs with uprobe_events")
    exe = loop32_target()
    base = _plain(threads, iters)
    _, offset = build.symbol(exe, "work")
    group, event = f"djbench32{os.getpid()}", "work"
    events = TRACEFS / "uprobe_events"
    _tracefs_append(events, f"p:{group}/{event} {exe}:{offset:#x}")
    try:
        (TRACEFS / "events" / group / event / "enable").write_text("1")
        try:
            r = _plain(threads, iters)
            hits = None
            for line in (TRACEFS / "uprobe_profile").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] in (event, f"{group}/{event}") and parts[0] == str(exe):
                    hits = int(parts[2])
        finally:
            (TRACEFS / "events" / group / event / "enable").write_text("0")
    finally:
        _tracefs_append(events, f"-:{group}/{event}")
    return _sample(r, iters, hits, base_ns=base["elapsed_ns"] / iters)


def run_djprobe_record_string_i386(threads: int, iters: int) -> Sample:
    import time

    import djprobe
    from djprobe.area import AreaLayout

    from .string_rows import BENCH_STRING, PROTOTYPE, ROUNDS

    def argv(out: Path) -> list[str]:
        return [str(loop32_target()), "str", str(iters), str(threads), str(out), *ROUNDS]

    with _Out() as out:
        subprocess.run(argv(out), check=True, timeout=600)
        base = _parse_result(out.read_text())
    events = wrong = 0
    with _Out() as out:
        with djprobe.spawn(argv(out)) as proc:
            if proc.process.arch.bits != 32:
                raise RuntimeError("the 32-bit loop target is not a 32-bit process")
            proc.layout = AreaLayout(string_ring_slots=4096)  # a round of 1,024 calls fits a ring
            djp = proc.register(djprobe.Djprobe("work_str", prototype=PROTOTYPE))
            if djp.mode != "jump":
                raise RuntimeError(f"work_str took no jump: {djp.no_jump_reason}")
            proc.read_events()  # TSC clock calibration before the target runs
            proc.start()
            popen = proc.process.popen
            while True:
                alive = popen.poll() is None
                batch = proc.read_events()
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
