"""Bad input catalogue: every misuse gives a clear error and leaves the target untouched (its
code bytes equal to the file, still running, still computing right)."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import djprobe
from djprobe import recovery
from djprobe._sys.procfs import read_maps
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


@pytest.fixture(scope="module")
def sites_exe():
    return compile_c(TARGETS / "sites.S")


def _start_loop(start_target, exe, *args):
    t = start_target([exe, "loop", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = t.proc.stdout.readline()
    assert line.startswith("ready"), line
    return t


def _finish(t) -> list[str]:
    t.proc.stdin.close()
    line = t.proc.stdout.readline().split()
    assert t.proc.wait(timeout=20) == 0
    return line


def _code_matches_file(pid: int, names=("work_a", "work_b"), size: int = 32) -> None:
    """Every named function's first bytes in the live process equal the file's."""
    with Symbols.from_process(pid) as syms:
        mod = syms.modules[0]
        for name in names:
            sym = mod.symbols(name)[0]
            assert syms._mem().read(sym.address, size) == mod.read_file(sym.address, size), name
        assert not recovery.find_areas(pid) or all(
            i.code != "patched" for a in recovery.find_areas(pid) for i in a.instances
        )


def _not_stopped(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        assert stat[stat.rfind(")") + 2] not in "tT", f"thread {tid} left stopped"
    with open(f"/proc/{pid}/status") as f:
        assert "TracerPid:\t0" in f.read()


def _untouched(t, names=("work_a", "work_b")) -> None:
    assert t.proc.poll() is None
    _not_stopped(t.pid)
    _code_matches_file(t.pid, names)


def djprobe_cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "djprobe", *args], capture_output=True, text=True, timeout=timeout, **kw)


# -- processes ------------------------------------------------------------------------------------
def test_missing_pid():
    with pytest.raises(djprobe.ProcessGoneError) as info:
        djprobe.attach(999_999_999)
    assert info.value.errno == errno.ESRCH
    assert isinstance(info.value, ProcessLookupError)


def test_dead_pid_zombie(counts_exe):
    p = subprocess.Popen([str(counts_exe), "run", "10"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it is a zombie, without reaping it
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        with pytest.raises(djprobe.ProcessGoneError) as info:
            djprobe.attach(p.pid)
        assert info.value.errno == errno.ESRCH
    finally:
        p.wait(timeout=10)
    with pytest.raises(djprobe.ProcessGoneError):
        djprobe.attach(p.pid)  # reaped: gone


def test_pid_exits_after_attach(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    proc = djprobe.attach(t.pid)
    try:
        t.kill()
        with pytest.raises(djprobe.ProcessGoneError) as info:
            proc.register(djprobe.Djprobe("work_a"))
        assert info.value.errno == errno.ESRCH
    finally:
        proc.close()


_SEIZER = textwrap.dedent(
    """
    import sys, time
    from djprobe._sys import ptrace as pt
    pt.seize(int(sys.argv[1]))
    print("seized", flush=True)
    time.sleep(60)
    """
)


def test_pid_traced_by_another_tracer(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    worker = max(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))  # not the leader: we seize some first
    other = subprocess.Popen([sys.executable, "-c", _SEIZER, str(worker)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "seized"
        with djprobe.attach(t.pid) as proc:
            with pytest.raises(djprobe.TracePermissionError) as info:
                proc.register(djprobe.Djprobe("work_a"))
        assert info.value.errno == errno.EPERM
        assert f"PID {other.pid}" in str(info.value), str(info.value)
        assert t.proc.poll() is None
        for tid in os.listdir(f"/proc/{t.pid}/task"):  # none left stopped by us
            with open(f"/proc/{t.pid}/task/{tid}/status") as f:
                status = f.read()
            if int(tid) != worker:
                assert "TracerPid:\t0" in status, tid
        _code_matches_file(t.pid)
    finally:
        other.kill()
        other.wait(timeout=10)
    time.sleep(0.1)
    _untouched(t)
    assert _finish(t)[-1] == "0"


def test_cli_count_pid_traced_by_another_tracer(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    other = subprocess.Popen([sys.executable, "-c", _SEIZER, str(t.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "seized"
        res = djprobe_cli("count", "-p", str(t.pid), "-d", "0.1", "work_a")
        assert "Traceback" not in res.stderr
        assert "already traced by PID" in res.stderr
        assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    finally:
        other.kill()
        other.wait(timeout=10)
    time.sleep(0.1)
    _untouched(t)
    assert _finish(t)[-1] == "0"


# -- sites ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, words",
    [
        ("nolib:work_a", "no module 'nolib'"),
        ("no_such_function", "no_such_function"),
        ("MAIN:no_such_function", "no_such_function"),
        ("libc:no_such_function", "no_such_function"),
        ("zzz_nothing_*", "match"),
        ("calls_a", "data"),
        ("0x10", "not"),
        ("", ""),
    ],
)
def test_bad_site_specs(start_target, counts_exe, spec, words):
    t = _start_loop(start_target, counts_exe)
    spec = spec.replace("MAIN", counts_exe.name)
    with djprobe.attach(t.pid) as proc:
        with pytest.raises(djprobe.InvalidSiteError) as info:
            proc.register(djprobe.Djprobe(spec))
        assert info.value.errno == errno.EINVAL
        assert words in str(info.value), str(info.value)
        assert proc.probes == []
    _untouched(t)
    assert _finish(t)[-1] == "0"


def test_bad_addresses_and_sizes(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        mod = proc.symbols.modules[0]
        work_a = proc.analyse(djprobe.Djprobe("work_a"))
        insns = work_a.displaced
        data = mod.symbols("calls_a")[0].address
        stack = next(m for m in read_maps(t.pid) if m.path == "[stack]")
        cases = [
            djprobe.Djprobe(data),  # data symbol by address
            djprobe.Djprobe(stack.start + 64),  # not executable
            djprobe.Djprobe(0x1000),  # unmapped
            djprobe.Djprobe(insns[0].address + 1),  # mid-instruction
        ]
        # a size that ends inside an instruction
        boundaries = {i.address - work_a.address for i in insns} | {work_a.size}
        split = next(n for n in range(5, 24) if n not in boundaries and n < work_a.size + 4)
        cases.append(djprobe.Djprobe("work_a", size=split))
        for djp in cases:
            with pytest.raises(djprobe.InvalidSiteError) as info:
                proc.register(djp)
            assert info.value.errno == errno.EINVAL
            assert str(info.value)
            assert not djp.registered
        for bad_size in (0, 3, 4, 25, -5, "6", 5.0):
            with pytest.raises(djprobe.InvalidSiteError):
                djprobe.Djprobe("work_a", size=bad_size)
        for bad_addr in (None, 1.5, b"work_a", True):
            with pytest.raises(djprobe.InvalidSiteError):
                djprobe.Djprobe(bad_addr)
        # register_many reports each refusal and places the good one
        good = djprobe.Djprobe("work_b")
        refused = proc.register_many([djprobe.Djprobe(data), good, djprobe.Djprobe("nosuch")])
        assert [type(e) for _, e in refused] == [djprobe.InvalidSiteError, djprobe.SymbolNotFoundError]
        assert good.registered
        proc.unregister(good)
    _untouched(t)
    assert _finish(t)[-1] == "0"


def test_refused_site_branch_into_displaced_bytes(start_target, sites_exe):
    """The refusals of a jmp rel32, short jumps off (on, each of these sites would take a jmp
    rel8 to a springboard in the padding: tests/live/test_springboards_*.py)."""
    t = start_target([sites_exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        proc.springboards = False
        for site, words in [("f_loop", "lands at"), ("f_syscall+5", "not the last"), ("f_icall", "not the last")]:
            with pytest.raises(djprobe.InvalidSiteError) as info:
                proc.register(djprobe.Djprobe(site))
            assert words in info.value.reason, info.value.reason
    _untouched(t, ("f_loop", "f_syscall", "f_icall", "f_rip"))
    t.proc.stdin.close()
    assert t.proc.wait(timeout=10) == 0


def test_site_already_patched_by_int3(start_target, sites_exe):
    """f_rip runs only after stdin closes: an int3 there is safe to leave while we try."""
    t = start_target([sites_exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        addr = proc.symbols.modules[0].symbols("f_rip")[0].address
        orig = proc.read(addr, 1)
        proc.process.write(addr, b"\xcc")
        try:
            with pytest.raises(djprobe.SiteBusyError) as info:
                proc.register(djprobe.Djprobe("f_rip"))
            assert info.value.errno == errno.EBUSY
            assert proc.read(addr, 1) == b"\xcc"  # not touched by the refusal
        finally:
            proc.process.write(addr, orig)
    _untouched(t, ("f_rip",))
    t.proc.stdin.close()
    assert t.proc.wait(timeout=10) == 0


def test_same_site_twice_and_overlap(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        a = proc.register(djprobe.Djprobe("work_a"))
        with pytest.raises(djprobe.InvalidSiteError):
            proc.register(a)  # already registered
        inside = a.analysis.displaced[1].address if len(a.analysis.displaced) > 1 else None
        if inside is not None:
            with pytest.raises((djprobe.SiteBusyError, djprobe.InvalidSiteError)):
                proc.register(djprobe.Djprobe(inside))
        with pytest.raises(djprobe.SiteBusyError):
            proc.register(djprobe.Djprobe("work_a", size=a.analysis.size + 1 if a.analysis.size < 24 else 5))
        proc.unregister(a)
        proc.unregister(a)  # twice: no-op
    _untouched(t)
    assert _finish(t)[-1] == "0"


# -- the target does things while probed -----------------------------------------------------------
def test_target_exits_during_insertion(counts_exe):
    """Short-lived targets attached at random moments: a clean error or success, never a hang
    or a stray exception; the process ends normally either way."""
    rng = random.Random(7)
    outcomes = {"placed": 0, "gone": 0}
    for i in range(25):
        p = subprocess.Popen([str(counts_exe), "run", str(rng.choice((300000, 3000000)))], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(rng.uniform(0, 0.05))
            t0 = time.monotonic()
            try:
                with djprobe.attach(p.pid) as proc:
                    refused = proc.register_many([djprobe.Djprobe("work_a"), djprobe.Djprobe("work_b")])
                    if refused:
                        assert all(isinstance(e, djprobe.DjprobeError) for _, e in refused), refused
                        kinds = {type(e).__name__ for _, e in refused}
                        outcomes["gone"] += 1
                        outcomes.setdefault("kinds", set()).update(kinds)
                    else:
                        outcomes["placed"] += 1
            except djprobe.ProcessGoneError:
                outcomes["gone"] += 1
            assert time.monotonic() - t0 < 15
            out, _ = p.communicate(timeout=20)
            assert p.returncode == 0 and out.strip().endswith("bad=0"), (p.returncode, out)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outcomes["placed"] + outcomes["gone"] == 25
    print(outcomes)


def test_target_exited_before_register_is_process_gone(counts_exe):
    p = subprocess.Popen([str(counts_exe), "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("ready")
        proc = djprobe.attach(p.pid)
        p.stdin.close()  # it exits; we do not reap it yet
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # every thread has exited; the zombie is not reaped
            states = []
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                try:
                    with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    pass
            if all(state in ("Z", "X") for state in states):
                break
            time.sleep(0.01)
        try:
            for spec in ("work_a", 0x401000):
                with pytest.raises(djprobe.ProcessGoneError):
                    proc.register(djprobe.Djprobe(spec))
        finally:
            proc.close()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_target_forks_while_probed(start_target, tmp_path):
    exe = compile_c(TARGETS / "forker.c", name="forker")
    t = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        a = proc.register(djprobe.Djprobe("work_a"))
        b = proc.register(djprobe.Djprobe("work_b"))
        t.proc.stdin.write("f\n")
        t.proc.stdin.flush()
        line = t.proc.stdout.readline().split()
        assert line[0] == "child" and line[1] == "0", line  # exit status 0: no wrong result in the child
        assert t.proc.poll() is None
        assert a.hits > int(line[2]) and b.hits > 0
        proc.unregister_many([a, b])
    _untouched(t)
    assert _finish(t)[-1] == "0"


def test_forked_child_outlives_tracer_then_cleanup(start_target):
    """A child forked while probes are in keeps the jumps and the area; once the tracer is
    gone, `djprobe cleanup` restores the child too."""
    src = (TARGETS / "forker.c").read_text().replace(
        "#define CHILD_CALLS 2000000L", "#define CHILD_CALLS 2000000000L"
    )
    exe = compile_c(src, name="forker_long")
    t = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        proc.register(djprobe.Djprobe("work_a"))
        t.proc.stdin.write("f\n")
        t.proc.stdin.flush()
        deadline = time.monotonic() + 10
        child = None
        while child is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{t.pid}/task/{t.pid}/children") as f:
                    kids = f.read().split()
                child = int(kids[0]) if kids else None
            except OSError:
                pass
            time.sleep(0.01)
        assert child is not None
        time.sleep(0.2)
    try:
        _code_matches_file(t.pid, ("work_a",))  # the parent is clean
        with Symbols.from_process(child) as syms:
            addr = syms.modules[0].symbols("work_a")[0].address
            assert syms._mem().read(addr, 1) == b"\xe9"  # the child still has the jump
        report = recovery.cleanup(child)
        assert report.ok, report.to_json()
        assert report.restored or report.orphans, report.to_json()
        _code_matches_file(child, ("work_a", "work_b"))
        assert [m for m in read_maps(child) if recovery.AREA_PATH_RE.match(m.path)] == []
        assert os.path.exists(f"/proc/{child}")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    line = t.proc.stdout.readline().split()
    assert line[:2] == ["child", "9"], line  # killed by us, not crashed
    assert _finish(t)[-1] == "0"


def test_target_execs_while_probed(start_target):
    """After exec the probes vanish with the old image; removing them must not write into the
    new one (two non-PIE images: the old sites are mapped code in the new image)."""
    old = compile_c(TARGETS / "forker.c", "-no-pie", name="forker_nopie")
    new = compile_c(TARGETS / "forker.c", "-no-pie", "-DPAD", name="forker_nopie_pad")
    t = start_target([old], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    with djprobe.attach(t.pid) as proc:
        a = proc.register(djprobe.Djprobe("work_a"))
        b = proc.register(djprobe.Djprobe("work_b"))
        sites = [(a.address, a.size), (b.address, b.size)]
        t.proc.stdin.write(f"e {new}\n")
        t.proc.stdin.flush()
        assert t.proc.stdout.readline().startswith("ready")  # the new image runs
        time.sleep(0.1)
        new_mod = Symbols.from_file(str(new)).modules[0]
        for addr, size in sites:  # the old sites are code of the new image
            assert new_mod.is_executable(addr)
        try:
            proc.close()  # must not write anything into the new image
        except djprobe.DjprobeError:
            pass  # an error is acceptable; corrupting the new image is not
        time.sleep(0.1)
    assert t.proc.poll() is None
    with Symbols.from_process(t.pid) as syms:
        mod = syms.modules[0]
        for addr, size in sites:
            assert syms._mem().read(addr, 24) == mod.read_file(addr, 24), hex(addr)
    _untouched(t)
    assert _finish(t)[-1] == "0"


def test_signal_handler_calls_probed_function():
    exe = compile_c(TARGETS / "sigcall.c", name="sigcall")
    n = 30_000_000
    plain = subprocess.run([str(exe), str(n)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0
    read_fd, write_fd = os.pipe()
    with djprobe.spawn([str(exe), str(n)], stdout=write_fd) as proc:
        os.close(write_fd)
        djp = proc.register(djprobe.Djprobe("work_s"))
        handler = proc.register(djprobe.Djprobe("on_alarm"))
        proc.start()
        with os.fdopen(read_fd) as out:
            output = out.read()
        status = proc.process.popen.wait(timeout=60)
    words = output.split()
    assert status == 0 and words[0] == "main" and words[-1] == "0", output
    main_calls, handler_calls = int(words[1]), int(words[3])
    assert handler_calls > 100
    assert handler.hits == handler_calls
    assert djp.hits == main_calls + handler_calls


# -- signals to the command line tool ----------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_count_interrupted(start_target, counts_exe, sig):
    t = _start_loop(start_target, counts_exe)
    cli = subprocess.Popen(
        [sys.executable, "-m", "djprobe", "count", "-p", str(t.pid), "work_a", "work_b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stderr.readline().startswith("Tracing 2 functions")
        time.sleep(0.3)
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, err
    assert "Traceback" not in err
    rows = {line.split()[0].split(":")[-1]: int(line.split()[-1]) for line in out.splitlines()[1:] if line.strip()}
    assert rows["work_a"] > 0 and rows["work_b"] > 0
    _untouched(t)
    assert _finish(t)[-1] == "0"


def _startup_seconds(pid: int) -> float:
    """How long `djprobe count -p PID` takes to print its banner (probes in) here."""
    t0 = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-m", "djprobe", "count", "-p", str(pid), "work_a"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert cli.stderr.readline().startswith("Tracing")
        elapsed = time.monotonic() - t0
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    return elapsed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_count_interrupted_at_random_moments(start_target, counts_exe, sig):
    """The signal may land during attach or insertion: the target must end up unpatched, and
    djprobe must not die with a traceback once its own code runs (a KeyboardInterrupt while
    the interpreter is still importing is Python's, not ours)."""
    t = _start_loop(start_target, counts_exe)
    banner = _startup_seconds(t.pid)
    rng = random.Random(int(sig))
    problems = []
    for i in range(12):
        cli = subprocess.Popen(
            [sys.executable, "-m", "djprobe", "count", "-p", str(t.pid), "work_a", "work_b"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(rng.uniform(0.6, 1.1) * banner)
            cli.send_signal(sig)
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        ours = "Traceback" in err and re.search(r'cli/\w+\.py", line \d+, in (main|_main|run)\b', err)
        if ours or cli.returncode not in (0, 1, 130, -sig):
            problems.append((cli.returncode, err[-600:]))
        assert t.proc.poll() is None, f"target died after iteration {i}: {err}"
        try:
            _not_stopped(t.pid)
            _code_matches_file(t.pid)
        except AssertionError as exc:
            problems.append(("target left patched/stopped", str(exc), err[-600:]))
            recovery.cleanup(t.pid, force=True)
    assert problems == []
    assert _finish(t)[-1] == "0"


# -- command line argument errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["count"],
        ["count", "-p", "PID"],
        ["count", "-p", "abc", "work_a"],
        ["count", "-p", "999999999", "work_a"],
        ["count", "-p", "0", "work_a"],
        ["count", "-p", "PID", "nosuch"],
        ["count", "-p", "PID", "zzz*"],
        ["count", "-p", "PID", "nolib:foo"],
        ["count", "-p", "PID", "calls_a"],
        ["count", "-p", "PID", "0x10"],
        ["count", "-p", "PID", "work_a", "--", "/bin/true"],
        ["count", "work_a", "--", "/nonexistent/program"],
        ["count", "work_a", "--", "/etc/passwd"],
        ["count", "work_a"],
        ["status"],
        ["status", "-p", "999999999"],
        ["cleanup", "-p", "-3"],
        ["nosuchcommand"],
    ],
)
def test_cli_bad_arguments(start_target, counts_exe, args):
    t = _start_loop(start_target, counts_exe)
    args = [str(t.pid) if a == "PID" else a for a in args]
    res = djprobe_cli(*args, timeout=30)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1], res.stderr
    # argparse prefixes its one error line with the usage; our own errors are one line
    assert len(lines) == 1 or lines[0].startswith("usage:"), res.stderr
    assert res.stdout == ""
    _untouched(t)
    assert _finish(t)[-1] == "0"
