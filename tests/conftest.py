"""Shared fixtures: C/assembly targets compiled at test time with the machine's gcc."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

TARGETS = Path(__file__).parent / "targets"
_BUILD_DIR = Path(os.environ.get("DJPROBE_TEST_BUILD", "/tmp/djprobe-test-build"))


def compile_c(source: str | Path | list[Path], *flags: str, name: str | None = None) -> Path:
    """Compile C or assembly (a path, several paths, or source text) with gcc; cached by content
    and flags.

    Default flags: -O1 -g0 -pthread; pass extra flags (e.g. "-O2", "-no-pie") after.
    Assembly source text must start with the line "#asm" (it is compiled as a .S file).
    """
    if isinstance(source, list):
        text = "\0".join(p.read_text() for p in source)
        key = hashlib.sha256((text + "\0" + "\0".join(flags)).encode()).hexdigest()[:16]
        _BUILD_DIR.mkdir(parents=True, exist_ok=True)
        out = _BUILD_DIR / f"{name or source[0].stem}-{key}"
        if not out.exists():
            _gcc([str(p) for p in source], flags, out)
        return out
    if isinstance(source, Path):
        text = source.read_text()
        suffix = source.suffix
        stem = name or source.stem
    else:
        text = source
        suffix = ".S" if text.startswith("#asm") else ".c"
        stem = name or "target"
    key = hashlib.sha256((text + "\0" + "\0".join(flags) + suffix).encode()).hexdigest()[:16]
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = _BUILD_DIR / f"{stem}-{key}"
    if not out.exists():
        src = _BUILD_DIR / f"{stem}-{key}{suffix}"
        src.write_text(text)
        _gcc([str(src)], flags, out)
    return out


def _gcc(sources: list[str], flags: tuple[str, ...], out: Path) -> None:
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    libs = [f for f in flags if f.startswith("-l")]  # after the sources, or --as-needed drops them
    others = [f for f in flags if not f.startswith("-l")]
    cmd = ["gcc", "-O1", "-g0", "-pthread", *others, "-o", str(tmp), *sources, *libs]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"gcc failed: {' '.join(cmd)}\n{res.stderr}")
    tmp.rename(out)


@pytest.fixture
def build_c():
    """Fixture form of :func:`compile_c`."""
    return compile_c


class Target:
    """A child process started by a test; always killed (and reaped) at the end."""

    def __init__(self, argv: list[str], **kwargs) -> None:
        self.proc = subprocess.Popen(argv, **kwargs)
        self.pid = self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def start_target():
    """Start target processes that are SIGKILLed and reaped when the test ends."""
    started: list[Target] = []

    def start(argv: list[str], **kwargs) -> Target:
        t = Target([str(a) for a in argv], **kwargs)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


@pytest.fixture
def no_short(monkeypatch):
    """Short jumps off (``DJPROBE_SPRINGBOARDS=0``) for the test, in this process and in the
    djprobe commands it runs: for tests of the trap fallback and of refusals, which short jumps
    (on by default) would otherwise lift."""
    monkeypatch.setenv("DJPROBE_SPRINGBOARDS", "0")
