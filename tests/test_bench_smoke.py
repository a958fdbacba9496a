"""Smoke test of the benchmark (bench/): --quick runs in time and every row counts right.

No timing assertions: the figures depend on the machine. A row may be skipped (tool missing);
a row that ran must have the exact count, and insertion must place, count and remove exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark traces processes and uses tracefs: run as root"),
]


def test_quick_bench_counts_are_exact(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.exists(), res.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["key"] for r in rows} >= {"none", "atomic", "djp_entry", "djp_mid", "uprobe", "ptrace"}
    for r in rows:
        assert r["status"] in ("ok", "skip"), (r["label"], r["threads"], r["status"], r.get("note"))
        if r["status"] == "ok":
            assert r["calls"] == r["iters"] * r["threads"]
            for h, e in zip(r["hits"], r["expected"]):
                assert h is None or h == e, (r["label"], r["threads"], h, e)
    # The rows that need nothing beyond the project itself never skip.
    ran = {r["key"] for r in rows if r["status"] == "ok"}
    assert {"none", "atomic", "djp_entry", "djp_mid", "ptrace"} <= ran
    ins = doc["insertion"]
    assert ins["refused"] == 0 and ins["counts_exact"] and ins["restored"]
    deep = doc["insertion_deep_stacks"]  # 16 more threads with 1 MiB of used stack each
    assert deep["refused"] == 0 and deep["counts_exact"] and deep["restored"]
    assert deep["stack_scan_kib"] > 16 * 1024
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "count probe at entry" in res.stdout
