"""The target's life (issues 9.1, 9.6, 13.1, 16): 32-bit processes counted, what they cannot take refused untouched, a process
whose main thread has exited, the vDSO, no probe area left behind, spawn mode's signals and
commands that will not be traced."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import djprobe
from djprobe import UnsupportedTargetError
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
DJPROBE = [sys.executable, "-m", "djprobe"]
SOURCE = TARGETS / "life.c"


class Lines:
    """Lines of a pipe, read with a deadline (never a bare blocking read)."""

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def next(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not r:
                raise AssertionError(f"no line within {timeout} s (have {self.buf!r})")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise AssertionError(f"end of output (have {self.buf!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def until(self, predicate, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.1, deadline - time.monotonic()))
            if predicate(line):
                return line


def run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, **kw)


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    raise AssertionError("no TracerPid")


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rfind(")") + 2]


@pytest.fixture(scope="module")
def life(tmp_path_factory):
    """The target, copied where only this module runs it (tests look for leftover processes)."""
    built = compile_c(SOURCE, name="life")
    copy = tmp_path_factory.mktemp("life") / built.name
    shutil.copy2(built, copy)
    return copy


@pytest.fixture(scope="module")
def life32():
    try:
        return compile_c(SOURCE, "-m32", name="life32")
    except RuntimeError as exc:
        pytest.skip(f"gcc -m32 cannot build a 32-bit program here (install gcc-multilib): {exc}")


# -- 9.1: 32-bit and other machines ----------------------------------------------------------------


def test_32bit_process_probed_and_left_untouched_x32_refused(start_target, life32, tmp_path):
    """Issue 16: a 32-bit process is traced and counted (attached and spawned) and left as it was;
    a machine djprobe does not know (x32) is refused before anything runs."""
    n = 5000
    t = start_target([life32, "wait", n], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(t.proc.stdout)
    assert out.next() == f"ready {t.pid}"

    res = run(DJPROBE + ["trace", "-p", t.pid, "-d", "0.5", "f_add%return"])
    assert res.returncode == 0 and "refused" not in res.stderr, res.stderr
    assert tracer_pid(t.pid) == 0 and state(t.pid) == "S"
    res = run(DJPROBE + ["sites", "-p", t.pid, "f_add"])
    assert res.returncode == 0 and "JUMP" in res.stdout, res.stderr
    res = run(DJPROBE + ["cleanup", "-p", t.pid])
    assert res.returncode == 0 and "nothing to clean up" in res.stdout
    assert tracer_pid(t.pid) == 0 and state(t.pid) == "S"
    res = run(DJPROBE + ["sites", f"{life32}:f_add"])
    assert res.returncode == 0 and "JUMP" in res.stdout, res.stderr

    # spawned: counted from before main, exactly; its output unchanged
    res = run(DJPROBE + ["count", "--json", "f_add", "--", life32, "wait", "10"], input="\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == [f"ready {json.loads(lines[-1])['pid']}", "sum=45", "done"]
    assert [p["hits"] for p in json.loads(lines[-1])["probes"]] == [10]

    # the attached-to target never noticed: it finishes with its normal output
    t.proc.stdin.write(b"go\n")
    t.proc.stdin.flush()
    assert out.next() == f"sum={n * (n - 1) // 2}"
    assert out.next() == "done"

    # x32 (a machine the kernel here cannot even run): refused before it is started
    try:
        x32 = compile_c("int main(void) { return 0; }\n", "-mx32", name="x32")
    except RuntimeError:
        return
    for argv in (["count", "main", "--", x32], ["sites", f"{x32}:main"]):
        res = run(DJPROBE + argv)
        assert res.returncode == 1 and res.stderr.strip() == f"djprobe: error: {x32}: x32 (32-bit x86-64 ABI) ELF file: not supported", argv
    assert t.proc.wait(timeout=20) == 0


# -- 9.6a: the main thread has called pthread_exit -------------------------------------------------


def test_leader_exited_count_status_cleanup(start_target, life):
    rounds = 1000
    t = start_target([life, "leader", rounds], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(t.proc.stdout)
    assert sorted(out.next() for _ in range(3)) == ["w0 ready", "w1 ready", "w2 ready"]
    deadline = time.monotonic() + 10
    while state(t.pid) != "Z":  # the leader has exited; the workers run on
        assert time.monotonic() < deadline, "leader did not exit"
        time.sleep(0.01)

    def go(times: int) -> None:
        for _ in range(times):
            t.proc.stdin.write(b"go\n")
            t.proc.stdin.flush()
            done = sorted(out.next() for _ in range(3))
            assert done == [f"w{i} did {rounds}" for i in range(3)]

    counter = subprocess.Popen(
        DJPROBE + ["count", "--json", "-p", str(t.pid), "f_add"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        Lines(counter.stderr).until(lambda line: line.startswith("Tracing 1 function"))
        go(2)
        status = json.loads(run(DJPROBE + ["status", "--json", "-p", t.pid]).stdout)
        # (the fork hook after libc's _Fork is an instance too, in libc's area)
        found = [(a, i) for a in status["areas"] for i in a["instances"] if "f_add" in i["name"]]
        ((area, inst),) = found
        assert inst["hits"] == 2 * 3 * rounds and area["tracer_alive"]
        counter.send_signal(signal.SIGINT)
        report = json.loads(counter.communicate(timeout=30)[0].decode().strip().splitlines()[-1])
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    assert [p["hits"] for p in report["probes"]] == [2 * 3 * rounds]
    assert run(DJPROBE + ["status", "-p", t.pid]).stdout.strip() == f"process {t.pid}: no djprobe probe areas"

    # a tracer killed with its probe in: status sees it, cleanup restores the code
    killed = subprocess.Popen(
        DJPROBE + ["count", "--json", "-p", str(t.pid), "f_add"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        Lines(killed.stderr).until(lambda line: line.startswith("Tracing 1 function"))
    finally:
        killed.kill()
        killed.communicate(timeout=30)
    go(1)
    status = json.loads(run(DJPROBE + ["status", "--json", "-p", t.pid]).stdout)
    # the banner comes once the hooks are in: the loader's and the fork hooks may have areas too
    (area,) = [a for a in status["areas"] if any(i["site"].endswith(":f_add") for i in a["instances"])]
    assert not area["tracer_alive"]
    assert [i["hits"] for i in area["instances"] if i["site"].endswith(":f_add")] == [3 * rounds]
    res = run(DJPROBE + ["cleanup", "-p", t.pid])
    assert res.returncode == 0, res.stderr
    assert run(DJPROBE + ["status", "-p", t.pid]).stdout.strip() == f"process {t.pid}: no djprobe probe areas"
    from djprobe.symbols import Symbols

    with Symbols.from_process(t.pid) as symbols:
        (site,) = symbols.resolve(f"{life.name}:f_add")
        mod = symbols.module_at(site.address)
        assert symbols._mem().read(site.address, 16) == mod.read_file(site.address, 16)
    go(1)
    t.proc.stdin.write(b"quit\n")
    t.proc.stdin.flush()
    assert t.proc.wait(timeout=20) == 0


# -- 13.1 and 9.6d: spawn mode ---------------------------------------------------------------------


def _no_process_running(exe) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/exe") == str(exe):
                    return False
            except OSError:
                continue
    return True


@pytest.mark.parametrize(
    "command, patterns, reason",
    [
        ("trace", ["nosuchfn"], "pattern 'nosuchfn' matches nothing"),
        ("count", ["f_add", "libc:nosuchfn"], "pattern 'libc:nosuchfn' matches nothing"),
        ("count", ["f_add+1"], "no site took a probe: "),
        ("count", ["0x10"], "0x10 is not in executable memory"),
    ],
)
def test_command_that_will_not_be_traced_never_runs(tmp_path, life, command, patterns, reason):
    marker = tmp_path / "ran"
    if any(p.startswith("f_add") for p in patterns):  # sites of the life program: it says when it runs
        cmd = [str(life), "wait", "10"]
    else:
        cmd = ["sh", "-c", f"echo ran > {marker}"]
    res = run(DJPROBE + [command, *patterns, "--", *cmd], input="go\n")
    assert res.returncode == 1
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"djprobe: error: {os.path.basename(cmd[0])}: not started: {reason}"), res.stderr
    assert not marker.exists()
    assert "ready" not in res.stdout and "sum=" not in res.stdout
    assert _no_process_running(life)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_signal_while_placing_probes_command_never_runs(tmp_path):
    """SIGTERM while the probes go in (libc:* takes seconds): the held command is not started."""
    marker = tmp_path / "ran"
    dj = subprocess.Popen(
        DJPROBE + ["count", "libc:*", "--", "sh", "-c", f"echo ran > {marker}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(state(c) == "t" for c in _children(dj.pid)):  # held before main
            assert time.monotonic() < deadline and dj.poll() is None
            time.sleep(0.01)
        (child,) = _children(dj.pid)
        dj.send_signal(signal.SIGTERM)
        _, err = dj.communicate(timeout=60)
    finally:
        if dj.poll() is None:
            dj.kill()
            dj.wait()
    assert dj.returncode == 1
    assert err.strip().splitlines()[-1] == "djprobe: error: sh: not started: djprobe got SIGTERM before it started"
    assert not marker.exists() and not os.path.exists(f"/proc/{child}")


@pytest.mark.parametrize(
    "command, sig",
    [("count", signal.SIGTERM), ("count", signal.SIGHUP), ("count", signal.SIGINT), ("trace", signal.SIGTERM)],
)
def test_signal_to_djprobe_reaches_the_command_after_the_probes_are_out(life, command, sig):
    from djprobe.symbols import Symbols

    with Symbols.from_file(life) as symbols:
        (site,) = symbols.resolve(f"{life}:f_add")
        original = symbols.modules[0].read_file(site.address, 5).hex()
    dj = subprocess.Popen(
        DJPROBE + [command, "--json", "f_add", "--", str(life), "term"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # no terminal: nothing sends the command the signal but djprobe
    )
    child = None
    try:
        out = Lines(dj.stdout)
        ready = out.until(lambda line: line.startswith("ready "))
        child = int(ready.split()[1])
        with open(f"/proc/{child}/maps") as f:
            assert "/dev/shm/djprobe-" in f.read(), "the probe is in while the command runs"
        dj.send_signal(sig)
        got = out.until(lambda line: line.startswith("got signal"))
        # the handler read f_add's first bytes: the jump was already gone
        assert got == f"got signal {int(sig)} f_add={original}"
        rest, err = dj.communicate(timeout=30)
        assert dj.returncode == 100 + sig, err
        report = json.loads((out.buf + rest).decode().strip().splitlines()[-1])
        if command == "count":
            assert report["exit_status"] == 100 + sig and [p["hits"] for p in report["probes"]] == [0]
        else:
            assert [p["hits"] for p in report["summary"]] == [0]
        assert _no_process_running(life)
    finally:
        if dj.poll() is None:
            dj.kill()
            dj.wait()
        if child is not None and not _no_process_running(life):
            os.kill(child, signal.SIGKILL)  # djprobe failed to end it: do not leave it behind


def test_ctrl_c_in_a_terminal_reaches_the_command_once(life):
    """Ctrl-C in a terminal goes to the whole foreground group, the command included: djprobe
    removes its probes and waits, without sending the command a second SIGINT."""
    import pty

    pid, master = pty.fork()
    if pid == 0:  # the child: djprobe on the terminal, as a user runs it
        try:
            os.execv(sys.executable, DJPROBE + ["count", "--json", "f_add", "--", str(life), "slowterm"])
        finally:
            os._exit(127)

    class Master:
        def fileno(self) -> int:
            return master

    seen: list[str] = []
    try:
        out = Lines(Master())
        seen.append(out.until(lambda line: line.strip().startswith("ready ")))
        os.write(master, b"\x03")
        seen.append(out.until(lambda line: "got signal" in line))
        assert seen[-1].strip().endswith("got signal 2 #1")  # after the echoed ^C
        deadline = time.monotonic() + 30
        while True:  # the rest of the output, until djprobe exits
            try:
                seen.append(out.next(max(0.1, deadline - time.monotonic())))
            except (AssertionError, OSError):  # EIO once the terminal has no writer
                break
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    assert not any("#2" in line for line in seen), seen
    assert os.waitstatus_to_exitcode(status) == 102, seen
    assert _no_process_running(life)


# -- 9.6b: the vDSO ------------------------------------------------------------------------------


def test_vdso_sites_verdicts_and_foreign_patch(start_target, life):
    t = start_target([life, "vdso", "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert Lines(t.proc.stdout).next() == f"ready {t.pid}"
    res = run(DJPROBE + ["sites", "--json", "-p", t.pid, "[vdso]:*"])
    assert res.returncode == 0, res.stderr
    verdicts = {r["function"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert "clock_gettime" in verdicts and "gettimeofday" in verdicts
    cg = verdicts["clock_gettime"]
    assert cg["verdict"] == "jump" and cg["at_entry"], cg
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        for ins in cg["instructions"]:  # decoded from the bytes really there
            mem.seek(int(ins["address"], 16))
            assert mem.read(len(ins["bytes"]) // 2).hex() == ins["bytes"]
    # someone else's breakpoint in the target's vDSO: seen, the site refused as busy
    address = int(cg["address"], 16)
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        saved = mem.read(1)
        mem.seek(address)
        mem.write(b"\xcc")
        try:
            res = run(DJPROBE + ["sites", "--json", "-p", t.pid, "[vdso]:clock_gettime"])
        finally:
            mem.seek(address)
            mem.write(saved)
    (busy,) = map(json.loads, res.stdout.splitlines())
    assert busy["verdict"] == "refused" and busy["busy"] and "already patched" in busy["reason"], busy


def test_vdso_clock_gettime_counted_exactly(start_target, life):
    n = 4321
    t = start_target([life, "vdso", n], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(t.proc.stdout)
    assert out.next() == f"ready {t.pid}"
    with open(f"/proc/{t.pid}/maps") as f:
        vdso = next(line for line in f if line.rstrip().endswith("[vdso]"))
    lo, hi = (int(x, 16) for x in vdso.split()[0].split("-"))

    def vdso_bytes() -> bytes:
        with open(f"/proc/{t.pid}/mem", "rb") as mem:
            mem.seek(lo)
            return mem.read(hi - lo)

    before = vdso_bytes()
    dj = subprocess.Popen(
        DJPROBE + ["count", "--json", "-p", str(t.pid), "[vdso]:clock_gettime"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        Lines(dj.stderr).until(lambda line: line.startswith("Tracing 1 function"))
        assert vdso_bytes() != before, "the jump is in the vDSO"
        t.proc.stdin.write(b"go\n")
        t.proc.stdin.flush()
        assert out.next() == f"vdso did {n}"
        dj.send_signal(signal.SIGINT)
        report = json.loads(dj.communicate(timeout=30)[0].decode().strip().splitlines()[-1])
    finally:
        if dj.poll() is None:
            dj.kill()
            dj.wait()
    assert [(p["site"], p["hits"]) for p in report["probes"]] == [("[vdso]:clock_gettime", n)]
    assert vdso_bytes() == before

    # a tracer killed with its jump in the vDSO: status names it, cleanup restores it
    killed = subprocess.Popen(
        DJPROBE + ["count", "--json", "-p", str(t.pid), "[vdso]:clock_gettime"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        Lines(killed.stderr).until(lambda line: line.startswith("Tracing 1 function"))
    finally:
        killed.kill()
        killed.communicate(timeout=30)
    assert vdso_bytes() != before
    instances = [i for a in json.loads(run(DJPROBE + ["status", "--json", "-p", t.pid]).stdout)["areas"]
                 for i in a["instances"] if i["site"].startswith("[vdso]")]  # (and the hooks, placed before the banner)
    assert [(i["site"], i["valid"], i["code"]) for i in instances] == [("[vdso]:clock_gettime", True, "patched")]
    res = run(DJPROBE + ["cleanup", "-p", t.pid])
    assert res.returncode == 0 and "restored" in res.stdout and "[vdso]:clock_gettime" in res.stdout, res.stdout + res.stderr
    assert vdso_bytes() == before and _areas_in(t.pid) == []
    t.proc.stdin.write(b"end\n")
    t.proc.stdin.flush()
    assert t.proc.wait(timeout=20) == 0


# -- 9.6c: no probe area left behind ---------------------------------------------------------------


def _areas_in(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if "/dev/shm/djprobe-" in line]


def _anon_code(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line.split()[0] for line in f if line.split()[1] == "r-xp" and len(line.split()) == 5]


def test_area_whose_slot_was_retired_is_unmapped_at_close(start_target, life):
    """A slot is retired when a signal frame on a thread's stack points into its stub at removal;
    once that thread has left the stub, close unmaps the area (it used to stay mapped)."""
    from djprobe.recovery import find_areas

    t = start_target([life, "blockread"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(t.proc.stdout)

    def line(text: bytes) -> None:
        t.proc.stdin.write(text)
        t.proc.stdin.flush()

    assert out.next() == f"ready {t.pid}"
    deadline = time.monotonic() + 10
    while open(f"/proc/{t.pid}/syscall").read().split()[0] != "0":  # blocked in read(2)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc = djprobe.attach(t.pid)
    try:
        # the thread blocked in the displaced syscall is moved into the stub's copy of it
        djp = proc.register(djprobe.Djprobe(f"{life.name}:raw_read"))
        assert djp.analysis.size == 6  # xor, mov, syscall: the syscall is displaced
        os.kill(t.pid, signal.SIGUSR1)  # interrupts the read in the stub: a frame returns there
        assert out.next() == "in handler"
        proc.unregister(djp)
        (area,) = find_areas(t.pid)
        assert [i.state for i in area.instances] == ["RETIRED"]
        line(b"a\n")
        assert out.next() == "handler got 2"  # back in the stub, reading again
        line(b"bc\n")
        assert out.next() == "got 3"  # out of the stub, back in the original code
    finally:
        proc.close()
    assert _areas_in(t.pid) == [] and _anon_code(t.pid) == [], open(f"/proc/{t.pid}/maps").read()
    line(b"four\n")
    assert out.next() == "got 5"
    t.proc.stdin.close()
    assert t.proc.wait(timeout=20) == 0


def test_area_the_target_cannot_open_leaves_nothing_mapped(start_target, life):
    """A target in its own mount namespace cannot open the area file in /dev/shm: the probe is
    refused with the reason, and the code part mapped just before is unmapped."""
    script = f"mount -t tmpfs none /dev/shm && exec {life} wait 100"
    t = start_target(["unshare", "-m", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(t.proc.stdout)
    ready = out.next()
    if not ready.startswith("ready"):
        pytest.skip(f"cannot make a mount namespace here: {ready}")
    before = open(f"/proc/{t.pid}/maps").read()
    proc = djprobe.attach(t.pid)
    try:
        with pytest.raises(djprobe.RemoteSyscallError) as info:
            proc.register(djprobe.Djprobe(f"{life.name}:f_add"))
        assert "/dev/shm/djprobe-" in str(info.value) and "No such file or directory" in str(info.value)
    finally:
        proc.close()
    assert open(f"/proc/{t.pid}/maps").read() == before
    assert tracer_pid(t.pid) == 0
    t.proc.stdin.write(b"go\n")
    t.proc.stdin.flush()
    assert out.next() == "sum=4950" and out.next() == "done"
    assert t.proc.wait(timeout=20) == 0
