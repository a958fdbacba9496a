"""Rows of the 32-bit (i386) loop target: `work` of targets/work32.S (cdecl, arguments on the
stack) called by targets/loop.c built with ``gcc -m32``.

- *djprobe count, entry, i386* (`djp_entry_i386`): `Djprobe("work")` in the 32-bit process (the
  32-bit count stub: `lock add` on an esp-sharded counter; no rseq in 32-bit processes).
- *kernel uprobe, i386* (`uprobe_i386`): a tracefs uprobe on the same function of the same file.

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
