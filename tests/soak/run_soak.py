"""Soak: a jump probe on every function of a real shared library that djprobe accepts, while the
library's real workload runs; output and exit status must equal those of an unprobed run.

    python3 -m tests.soak.run_soak zlib [--mb 4]            libz under a compression round trip
    python3 -m tests.soak.run_soak python [--tests ...]     libpython3.11 under CPython's test suite
    python3 -m tests.soak.run_soak all [--json]

Workloads:

* ``zlib``: tests/soak/zlib_work.c (linked with -lz): compress2 at several levels, streaming
  deflate/inflate with every strategy, gzip and raw framing, gz file I/O, crc32/adler32;
  deterministic output, exit 1 on any mismatch.
* ``python``: the pyenv CPython 3.11 (its ``python3.11`` links ``libpython3.11.so.1.0``, which
  has a full .symtab, and it ships the ``test`` package; the system /usr/bin/python3.11 is
  linked statically and has no test package) running ``-m test`` on a few modules. Lines with
  timings are dropped before comparing.

Reported: functions in the library (distinct entry addresses), accepted by the site analysis,
placed, refused (by reason class, at analysis or at registration), hit at least once, total hits,
and the times (unprobed run, insertion, probed run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import djprobe
from djprobe.sites import Verdict, _reason_class, analyse_site

HERE = Path(__file__).parent
PYENV_PYTHON = Path("/root/.pyenv/versions/3.11.7/bin/python3.11")
DEFAULT_PY_TESTS = [
    "test_json", "test_bisect", "test_heapq", "test_struct", "test_itertools", "test_collections",
    "test_string", "test_textwrap", "test_base64", "test_binascii", "test_zlib", "test_operator",
]  # fmt: skip


@dataclass
class SoakResult:
    name: str
    library: str
    argv: list[str]
    functions: int = 0
    accepted: int = 0
    placed: int = 0
    refused: dict = field(default_factory=dict)
    hit: int = 0
    total_hits: int = 0
    plain_seconds: float = 0.0
    insert_seconds: float = 0.0
    probed_seconds: float = 0.0
    plain_status: int | None = None
    probed_status: int | None = None
    same_output: bool = False
    diff: str = ""
    top: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.same_output and self.plain_status == self.probed_status and self.placed > 0

    def summary(self) -> str:
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(self.refused.items(), key=lambda kv: -kv[1])) or "none"
        return (
            f"[{self.name}] {self.library}\n"
            f"  functions {self.functions}, accepted {self.accepted}, placed {self.placed}, "
            f"hit {self.hit} ({self.total_hits} hits)\n"
            f"  refused: {refused}\n"
            f"  unprobed run {self.plain_seconds:.1f} s (exit {self.plain_status}); insertion "
            f"{self.insert_seconds:.1f} s; probed run {self.probed_seconds:.1f} s (exit {self.probed_status})\n"
            f"  output identical: {self.same_output}{'' if self.same_output else chr(10) + self.diff}\n"
            f"  {'OK' if self.ok else 'FAILED'}"
        )


def _run_plain(argv: list[str], env: dict | None, timeout: float) -> tuple[str, int, float]:
    t0 = time.monotonic()
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
    return res.stdout, res.returncode, time.monotonic() - t0


def soak(
    name: str,
    argv: list[str],
    library: str,
    *,
    normalize=lambda text: text,
    env: dict | None = None,
    timeout: float = 600.0,
    limit: int | None = None,
) -> SoakResult:
    """Run ``argv`` plain, then spawned with a probe on every accepted function of the module
    ``library`` (a name as ``Symbols.module`` takes it); compare."""
    result = SoakResult(name=name, library=library, argv=list(argv))
    plain_out, result.plain_status, result.plain_seconds = _run_plain(argv, env, timeout)
    with tempfile.TemporaryFile("w+") as out:
        proc = djprobe.spawn(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            module = proc.symbols.module(library)
            result.library = module.path
            refused: Counter = Counter()
            probes = []
            seen = set()
            for func in module.functions():
                if func.address in seen:
                    continue
                seen.add(func.address)
                analysis = analyse_site(proc.symbols, func.address, None, proc.process.memory)
                if analysis.verdict is Verdict.JUMP:
                    probes.append(djprobe.Djprobe(func.address))
                else:
                    refused[_reason_class(analysis.reason)] += 1
            result.functions = len(seen)
            result.accepted = len(probes)
            if limit is not None:
                probes = probes[:limit]
            t0 = time.monotonic()
            errors = proc.register_many(probes)
            result.insert_seconds = time.monotonic() - t0
            for _, exc in errors:
                refused["at registration: " + _reason_class(getattr(exc, "reason", None) or str(exc))] += 1
            bad = {id(d) for d, _ in errors}
            placed = [d for d in probes if id(d) not in bad]
            result.placed = len(placed)
            result.refused = dict(refused)
            t0 = time.monotonic()
            proc.start()
            try:
                result.probed_status = proc.process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.process.popen.kill()
                result.probed_status = proc.process.popen.wait()
            result.probed_seconds = time.monotonic() - t0
            hits = {d.site or hex(d.address or 0): d.hits for d in placed}
        finally:
            proc.close()
        out.seek(0)
        probed_out = out.read()
    result.hit = sum(1 for v in hits.values() if v > 0)
    result.total_hits = sum(hits.values())
    result.top = sorted(hits.items(), key=lambda kv: -kv[1])[:5]
    a, b = normalize(plain_out), normalize(probed_out)
    result.same_output = a == b
    if not result.same_output:
        import difflib

        result.diff = "\n".join(list(difflib.unified_diff(a.splitlines(), b.splitlines(), "unprobed", "probed", lineterm=""))[:40])
    return result


# -- workloads -------------------------------------------------------------------------------------
def zlib_workload(mb: float = 4.0, **kw) -> SoakResult:
    from tests.conftest import compile_c

    exe = compile_c(HERE / "zlib_work.c", "-Wl,--no-as-needed", "-lz", name="zlib_work")
    return soak("zlib", [str(exe), str(mb)], "libz", **kw)


_TIMING = re.compile(r"load avg|duration|\d+(\.\d+)? ?(sec|ms)\b|^\d+:\d+:\d+ ")


def _normalize_regrtest(text: str) -> str:
    keep = []
    for line in text.splitlines():
        line = re.sub(r"^\d+:\d+:\d+ load avg: [\d.]+ ", "", line)
        if _TIMING.search(line) or not line.strip():
            continue
        keep.append(line)
    return "\n".join(keep)


def python_workload(tests: list[str] | None = None, **kw) -> SoakResult:
    if not PYENV_PYTHON.exists():
        raise SystemExit(f"{PYENV_PYTHON} not found (needs a CPython linked with libpython3.11.so and its test package)")
    env = dict(os.environ, PYTHONHASHSEED="0")
    argv = [str(PYENV_PYTHON), "-m", "test", "--timeout", "300", "--randseed", "1", *(tests or DEFAULT_PY_TESTS)]
    return soak("python", argv, "libpython3.11", normalize=_normalize_regrtest, env=env, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.soak.run_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["zlib", "python", "all"])
    parser.add_argument("--mb", type=float, default=4.0, help="zlib: megabytes per round trip")
    parser.add_argument("--tests", nargs="+", help="python: test modules to run")
    parser.add_argument("--limit", type=int, help="probe at most this many functions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    if args.workload in ("zlib", "all"):
        results.append(zlib_workload(args.mb, limit=args.limit))
    if args.workload in ("python", "all"):
        results.append(python_workload(args.tests, limit=args.limit))
    for r in results:
        print(json.dumps(asdict(r)) if args.json else r.summary(), flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
