"""Short jumps (springboards.py, a jmp rel8 to a springboard in dead padding) for probes other
than plain count and record ones: string-fetching probes, 4 threads, every event exact."""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict

import pytest

import djprobe
from djprobe.events import EventBatch
from djprobe.fetched import FetchedString
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
THREADS, ROUNDS = 4, 3000


@pytest.fixture(scope="module")
def str_exe():
    return compile_c([TARGETS / "springboards_str.S", TARGETS / "springboards_str_main.c"], name="springboards_str")


def test_string_fetch_probe_through_a_short_jump(str_exe):
    """sb_str's entry takes no jmp rel32 (a branch lands 3 bytes in): with springboards, the
    probe copying ``s`` at the hit is a jmp rel8 to a springboard. Every call of each of the 4
    threads is one event, in order, whose string is the one passed (``t<thread>-k<n>``, the
    buffer rewritten before the next call) and whose ``n`` matches it."""
    plain = subprocess.run([str(str_exe), str(ROUNDS)], capture_output=True, text=True, timeout=60, check=True).stdout
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(str_exe), str(ROUNDS)], stdout=write_fd)
    os.close(write_fd)
    with proc:
        proc.wait_timeout = 5.0
        proc.springboards = True
        djp = proc.register(djprobe.Djprobe("sb_str", prototype="const char *s, long n", lossless=True))
        assert djp.mode == "jump" and proc.read(djp.address, 1) == b"\xeb"
        assert djp._instance.springboard is not None and djp._instance.strings
        proc.start()
        batches = list(proc.events(timeout=60))
        with os.fdopen(read_fd) as out:
            output = out.read()
        assert proc.process.popen.wait(timeout=30) == 0
        batches.append(proc.read_events())
        batch = EventBatch.concat([b for b in batches if len(b)] or [batches[-1]])
        assert output == plain and output.startswith("done")
        assert djp.hits == THREADS * ROUNDS and djp.missed == 0 and len(batch) == djp.hits
        per_thread: dict[int, list] = defaultdict(list)
        for tid, text, n in zip(batch.events["tid"].tolist(), batch.column("s"), batch.column("n")):
            per_thread[tid].append((text, n))
        assert len(per_thread) == THREADS
        seen = set()
        for calls in per_thread.values():
            t = calls[0][0].split("-")[0]
            assert calls == [(f"{t}-k{k % 5}", k % 5) for k in range(ROUNDS)]
            assert all(isinstance(text, FetchedString) and not text.truncated for text, _ in calls)
            seen.add(t)
        assert seen == {f"t{t}" for t in range(THREADS)}
