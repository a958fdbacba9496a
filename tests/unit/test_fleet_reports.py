"""The pure parts of trace and latency over several processes: PID lists, the trace summary's
totals and exited marks, latency's totals bucket by bucket and per-process resets, error naming."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from djprobe.area import HIST_BUCKETS
from djprobe.cli._fleet import _naming, fleet_pids, pid_list, process_heading
from djprobe.cli._fleet_latency import FleetRefusal
from djprobe.cli._follow_latency import LatencyFamily, Member, SiteFigures, _zero
from djprobe.cli._follow_trace import _Row, summary
from djprobe.cli.latency import write_report
from djprobe.errors import InvalidSiteError, ProcessGoneError, SymbolNotFoundError
from djprobe.latency import LatencyFigures


def test_pid_list_keeps_order_and_drops_repeats():
    assert pid_list("12,7,12,9") == [12, 7, 9]
    for bad, said in (("12,x", "not a PID: 'x'"), ("0", "invalid PID 0"), ("3,-4", "invalid PID -4")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            pid_list(bad)


def _args(**kw) -> argparse.Namespace:
    base = dict(pid=None, name=None, command_argv=[], json=False, interval=None, unit="nsecs")
    base.update(kw)
    return argparse.Namespace(**base)


def test_fleet_pids_errors():
    with pytest.raises(ProcessGoneError, match="no running process named 'no-such-comm-9'"):
        fleet_pids(_args(name="no-such-comm-9"))
    with pytest.raises(InvalidSiteError, match="not both"):
        fleet_pids(_args(pid=[5, 6], command_argv=["ls"]))
    assert fleet_pids(_args(pid=[5, 6])) == [5, 6]


def test_errors_name_the_process_once():
    exc = _naming(SymbolNotFoundError("pattern 'f' matches nothing"), 4321, "./srv -w 3")
    assert str(exc) == "process 4321 (./srv -w 3): pattern 'f' matches nothing"
    assert isinstance(exc, SymbolNotFoundError)
    assert str(_naming(ProcessGoneError("no such process: 4321"), 4321, "?")) == "no such process: 4321"


def test_process_heading():
    assert process_heading(7, "a b") == "process 7 (a b):"
    assert process_heading(7, "a b", True) == "process 7 (a b), exited while traced:"


def test_trace_summary_totals_per_site_then_each_process():
    members = [
        (10, "srv", [_Row("m:f", 0x1000, "jump", 5, 1), _Row("m:g", 0x2000, "jump", 2, 0)]),
        (11, "srv", [_Row("m:f", 0x1000, "jump", 7, 0), _Row("m:g", 0x2000, "jump", 0, 0)]),
    ]
    doc = json.loads(summary(members, True, 0.25, {11}))
    assert [(r["site"], r["hits"], r["delivered"], r["dropped"]) for r in doc["summary"]] == [
        ("m:f", 12, 11, 1), ("m:g", 2, 2, 0)]
    assert [p["pid"] for p in doc["processes"]] == [10, 11]
    assert "exited" not in doc["processes"][0] and doc["processes"][1]["exited"] is True
    assert doc["waited_s"] == 0.25
    assert doc["summary"][0]["address"] == 0x1000  # the same address in both
    moved = members + [(12, "srv", [_Row("m:f", 0x5000, "jump", 1, 0)])]  # another load address
    assert json.loads(summary(moved, True, 0.0))["summary"][0]["address"] is None
    text = summary(members, False, 0.0, {11}).splitlines()
    assert text[0] == "all 2 processes:"
    assert text[2].split() == ["m:f", "12", "11", "1"]
    assert "process 10 (srv):" in text and "process 11 (srv), exited while traced:" in text


def _figures(counts: dict[int, int], calls: int) -> LatencyFigures:
    hist = np.zeros(HIST_BUCKETS, dtype=np.uint64)
    for bucket, n in counts.items():
        hist[bucket] = n
    total = sum((1 << b) * n for b, n in counts.items())
    return LatencyFigures(hist, calls, total, 0, 0)


class _Counter:
    """A process's raw figures of one function, growing as a test says."""

    def __init__(self, figures: LatencyFigures) -> None:
        self.figures = figures

    def __call__(self) -> LatencyFigures:
        return self.figures


def test_latency_totals_add_bucket_by_bucket_and_reset_per_process():
    raw_a, raw_b = _Counter(_figures({3: 4, 10: 1}, 5)), _Counter(_figures({3: 2, 12: 6}, 9))
    site_a = SiteFigures("m:f", 0x1000, raw_a, _zero())
    site_b = SiteFigures("m:f", 0x1000, raw_b, _zero())
    members = [Member(1, "a", lambda: [site_a]), Member(2, "b", lambda: [site_b])]

    def read():
        return [(m, [(s, s.read()) for s in m.sites()]) for m in members]

    readings = read()
    ((site, total),) = LatencyFamily.totals(readings)
    assert site.site == "m:f" and site.address == 0x1000 and total.calls == 14 and total.returns == 13
    assert total.histogram[3] == 6 and total.histogram[10] == 1 and total.histogram[12] == 6
    assert total.total_ns == 8 * 6 + 1024 + 4096 * 6
    LatencyFamily.reset(readings)  # -i: each process starts again from zero
    raw_a.figures = _figures({3: 5, 10: 1}, 6)  # one more call of 8 ns in process 1 since
    ((_, since),) = LatencyFamily.totals(read())
    assert since.calls == 1 and since.returns == 1 and since.histogram[3] == 1 and since.total_ns == 8


def test_latency_report_marks_exited_and_refusals_by_pid():
    site = SiteFigures("m:f", 0x1000, lambda: _figures({4: 2}, 2), _zero())
    figures = site.read()
    out = io.StringIO()
    write_report(out, _args(json=True), [(site, figures)], [(1, "a", [(site, figures)]), (2, "a", [])],
                 [FleetRefusal(2, "m:g", "too short")], None, interval=1, final=True, ended={2})
    doc = json.loads(out.getvalue())
    assert doc["functions"][0]["calls"] == 2
    assert [p.get("exited", False) for p in doc["processes"]] == [False, True]
    assert doc["refused"] == [{"pid": 2, "site": "m:g", "reason": "too short"}]
    out = io.StringIO()
    write_report(out, _args(), [(site, figures)], [(1, "a", [(site, figures)]), (2, "a", [])], [], None,
                 interval=1, final=True, ended={2})
    text = out.getvalue()
    assert text.startswith("all 2 processes:\nFunction = m:f")
    assert "process 1 (a):\nFunction = m:f" in text and "process 2 (a), exited while traced:" in text
