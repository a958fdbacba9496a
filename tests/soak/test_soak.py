"""Short forms of the soak (tests/soak/run_soak.py): a probe on every function djprobe accepts
in a real shared library while its real workload runs; same output and exit status as
unprobed. DJPROBE_LONG=1 runs the long forms (4 MB zlib round trips; a dozen CPython test
modules, more with the long list)."""

from __future__ import annotations

import os

import pytest

from tests.soak import run_soak

LONG = os.environ.get("DJPROBE_LONG") == "1"

LONG_PY_TESTS = run_soak.DEFAULT_PY_TESTS + [
    "test_re", "test_dict", "test_set", "test_list", "test_math", "test_float", "test_datetime",
    "test_pickle", "test_thread", "test_queue", "test_signal", "test_unicode", "test_functools",
]  # fmt: skip


def _check(result: run_soak.SoakResult) -> None:
    print(result.summary())
    assert result.placed >= 0.95 * result.functions
    assert result.hit > 0
    assert result.plain_status == 0, "the unprobed workload fails here: choose other tests"
    assert result.probed_status == result.plain_status
    assert result.same_output, result.diff


@pytest.mark.timeout(600 if LONG else 120)
def test_soak_zlib():
    _check(run_soak.zlib_workload(4.0 if LONG else 1.0, timeout=300))


@pytest.mark.timeout(1800 if LONG else 180)
def test_soak_libpython():
    if not run_soak.PYENV_PYTHON.exists():
        pytest.skip("no CPython with a shared libpython3.11 and its test package")
    tests = LONG_PY_TESTS if LONG else ["test_bisect", "test_json"]
    _check(run_soak.python_workload(tests, timeout=1500 if LONG else 150))
