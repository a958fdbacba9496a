"""TimeOrderedWriter: events of several processes read in several turns come out in time order,
an event whose record was read a turn late included; nothing is lost or written twice."""

from __future__ import annotations

import io
import time

import numpy as np

from djprobe.cli._follow_trace import TimeOrderedWriter


class _Batch:
    """What the writer reads of an EventBatch: its ``time_ns`` column."""

    def __init__(self, times: list[int]) -> None:
        self.events = {"time_ns": np.array(times, dtype=np.int64)}


def _text(batch: _Batch, mark: str) -> list[str]:
    return [f"{mark}{t}" for t in batch.events["time_ns"].tolist()]


def _json(batch: _Batch, pid: int) -> list[str]:
    return [f'{{"pid": {pid}, "t": {t}}}' for t in batch.events["time_ns"].tolist()]


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def test_an_event_read_a_turn_late_is_written_in_its_place():
    out = io.StringIO()
    w = TimeOrderedWriter(out, _text, _json, False, hold_ns=10**9)
    t = _now()
    w.write([(1, _Batch([t + 10, t + 30]))], several=True)
    assert out.getvalue() == ""  # younger than the hold: kept
    w.write([(2, _Batch([t + 20]))], several=True)  # committed before, read after
    w.write([], several=True, final=True)
    assert out.getvalue().splitlines() == [f"[pid 1] {t + 10}", f"[pid 2] {t + 20}", f"[pid 1] {t + 30}"]


def test_old_events_are_written_at_once_young_ones_held():
    out = io.StringIO()
    w = TimeOrderedWriter(out, _text, _json, True, hold_ns=50_000_000)
    t = _now()
    old = [t - 10**9 + k for k in range(5)]
    w.write([(7, _Batch([t + 5, *old]))], several=False)
    assert [line for line in out.getvalue().splitlines()] == [f'{{"pid": 7, "t": {x}}}' for x in old]
    w.write([], several=False, final=True)
    assert out.getvalue().splitlines()[-1] == f'{{"pid": 7, "t": {t + 5}}}'


def test_equal_times_keep_their_order_of_arrival_and_nothing_is_lost():
    out = io.StringIO()
    w = TimeOrderedWriter(out, _text, _json, False, hold_ns=0)
    rng = np.random.default_rng(3)
    written: list[int] = []
    base = _now() - 10**9
    for turn in range(20):
        times = sorted(int(x) for x in base + rng.integers(0, 1000, 50))
        written += times
        w.write([(turn % 3, _Batch(times))], several=False)
    w.write([], several=False, final=True)
    lines = [int(x) for x in out.getvalue().split()]
    assert sorted(lines) == sorted(written)
