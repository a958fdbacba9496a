"""Process control on real processes: stop/resume the world, registers, stepping, injection, spawn."""

from __future__ import annotations

import mmap as _mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from djprobe import ProcessGoneError, TracePermissionError
from djprobe._sys import ptrace as pt
from djprobe.process import Process, Registers, TracerStateError

TARGETS = Path(__file__).parent.parent / "targets"
NWORK = 4


# -- helpers ---------------------------------------------------------------------------------------
class Lines:
    """Read lines from a pipe with a deadline (no sleeps)."""

    def __init__(self, f) -> None:
        self.fd = f.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def _fill(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        if not data:
            raise EOFError("target closed its output")
        self.buf += data
        return True

    def readline(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise TimeoutError(f"no line from target within {timeout}s (have {self.buf!r})")
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def nothing_within(self, timeout: float) -> bool:
        """True if no output arrives within ``timeout`` (used to show that something does *not* happen)."""
        if self.buf:
            return False
        try:
            return not self._fill(timeout) or not self.buf
        except EOFError:
            return True


def tasks(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def task_state(pid: int, tid: int) -> str:
    """State letter of a thread, "" if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.rfind(")") + 2]


def tracer_pid(pid: int, tid: int) -> int:
    """TracerPid of a thread (0 if the thread is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    raise AssertionError("no TracerPid")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.fixture
def threads_target(build_c, start_target):
    """The multi-threaded target, started and ready: (target, Lines(stdout), counters address, add3)."""
    exe = build_c(TARGETS / "threads.c")
    target = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = Lines(target.proc.stdout)
    word, pid, counters, add3 = out.readline().split()
    assert word == "ready" and int(pid) == target.pid
    yield target, out, int(counters, 16), int(add3, 16)
    target.proc.stdin.close()


@pytest.fixture
def proc_of():
    """Process objects that are always resumed and closed at test end."""
    made: list[Process] = []

    def make(pid: int) -> Process:
        p = Process(pid)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.close()
        except ProcessGoneError:
            pass


def counters_of(proc: Process, address: int) -> list[int]:
    data = proc.read(address, 8 * NWORK)
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, 8 * NWORK, 8)]


def classify(proc: Process) -> dict[str, list]:
    """Threads by role: 'main' (nanosleep), 'reader' (read), 'workers'."""
    roles: dict[str, list] = {"main": [], "reader": [], "workers": []}
    for t in proc.threads.values():
        r = t.regs()
        if t.tid == proc.pid:
            roles["main"].append(t)
        elif r.signed("orig_rax") == 0:
            roles["reader"].append(t)
        else:
            roles["workers"].append(t)
    assert len(roles["main"]) == 1 and len(roles["reader"]) == 1 and len(roles["workers"]) == NWORK
    return roles


# -- stop / resume -------------------------------------------------------------------------------
def test_stop_freezes_every_thread_and_resume_detaches(threads_target, proc_of):
    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    assert not proc.stopped
    threads = proc.stop()
    assert proc.stopped
    assert set(threads) == tasks(target.pid) and len(threads) == NWORK + 2
    for tid in threads:
        assert task_state(target.pid, tid) == "t"
        assert tracer_pid(target.pid, tid) != 0
    before = counters_of(proc, counters)
    time.sleep(0.05)  # nothing may move while stopped
    assert counters_of(proc, counters) == before
    proc.resume()
    assert not proc.stopped
    for tid in tasks(target.pid):
        assert tracer_pid(target.pid, tid) == 0
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")
    # the reader still works
    target.proc.stdin.write(b"ping\n")
    target.proc.stdin.flush()
    assert out.readline() == "got ping"


def test_stop_resume_50_times(threads_target, proc_of):
    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    expected = tasks(target.pid)
    for _ in range(50):
        threads = proc.stop()
        assert set(threads) == expected
        proc.resume()
        assert proc.is_alive()
    before = counters_of(proc, counters)
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")
    target.proc.stdin.write(b"after\n")
    target.proc.stdin.flush()
    assert out.readline() == "got after"


def test_threads_created_while_stopping_are_collected(build_c, start_target, proc_of):
    exe = build_c(TARGETS / "spawner.c")
    target = start_target([exe], stdout=subprocess.PIPE)
    assert Lines(target.proc.stdout).readline().startswith("ready")
    proc = proc_of(target.pid)
    for _ in range(30):
        threads = proc.stop()
        # every live thread is ours and stopped (threads already inside exit() are not stoppable)
        states = {tid: task_state(target.pid, tid) for tid in tasks(target.pid)}
        live = {tid for tid, st in states.items() if st not in ("", "Z", "X")}
        assert set(threads) == live, states
        assert all(states[tid] == "t" for tid in live), states
        assert proc.syscall(39) == target.pid
        proc.resume()
    assert proc.is_alive()
    for tid in tasks(target.pid):
        assert tracer_pid(target.pid, tid) == 0


def test_signal_sent_while_stopped_is_delivered_after_resume(threads_target, proc_of):
    target, out, _, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    os.kill(target.pid, signal.SIGUSR1)
    assert out.nothing_within(0.1)
    proc.resume()
    assert out.readline() == "usr1"


def test_signal_pending_during_injection_stays_queued(threads_target, proc_of):
    target, out, _, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    main = proc.threads[target.pid]
    os.kill(target.pid, signal.SIGUSR1)  # only the main thread accepts it
    wait_until(lambda: _sig_pending(target.pid, target.pid, signal.SIGUSR1), what="SIGUSR1 pending")
    mask = _sig_blocked(target.pid, target.pid)
    assert proc.syscall(39, thread=main) == target.pid  # runs the main thread with every signal blocked
    main.step()  # likewise
    assert _sig_pending(target.pid, target.pid, signal.SIGUSR1)  # never taken off the queue
    assert _sig_blocked(target.pid, target.pid) == mask  # the thread's own mask is back
    assert out.nothing_within(0.1)
    proc.resume()
    assert out.readline() == "usr1"


def _sig_blocked(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["SigBlk"], 16)


def _sig_pending(pid: int, tid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    mask = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(mask & (1 << (sig - 1)))


# -- registers, stepping, restart positions ------------------------------------------------------
def test_registers_round_trip_and_single_step(threads_target, proc_of):
    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    worker = classify(proc)["workers"][0]
    regs = worker.regs()
    assert isinstance(regs, Registers) and regs.rip and regs.rsp
    changed = regs.copy()
    changed.r15 ^= 0x5A5A
    worker.set_regs(changed)
    assert pt.getregs(worker.tid).r15 == changed.r15
    worker.set_regs(regs)
    assert Registers.from_user_regs(pt.getregs(worker.tid)) == regs
    rip0 = regs.rip
    worker.step()
    rip1 = worker.regs().rip
    assert rip1 != rip0
    exe_maps = [m for m in proc.maps() if m.executable and rip0 in m]
    assert exe_maps and rip1 in exe_maps[0]
    for _ in range(10):
        worker.step()
    before = counters_of(proc, counters)
    proc.resume()
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")


def _in_syscall(pid: int, tid: int, numbers: set[int]) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            field = f.read().split()[0]
    except OSError:
        return False
    return field.lstrip("-").isdigit() and int(field) in numbers


def test_syscall_restart_positions(threads_target, proc_of):
    target, out, _, _ = threads_target
    proc = proc_of(target.pid)
    # "ready" is printed just before the main thread's nanosleep: wait until it is in it
    wait_until(lambda: _in_syscall(target.pid, target.pid, {35, 230}), what="main thread in nanosleep")
    proc.stop()
    roles = classify(proc)
    for t in roles["main"] + roles["reader"]:
        assert t.in_syscall_restart(), t.regs()
        rip = t.regs().rip
        assert t.positions() == (rip, rip - 2)
        assert proc.read(rip - 2, 2) == b"\x0f\x05"
    assert proc.threads_in(roles["reader"][0].positions()[1], roles["reader"][0].positions()[1] + 2)
    for t in roles["workers"]:
        assert not t.in_syscall_restart()
        assert t.positions() == (t.regs().rip,)
    proc.resume()


def test_step_from_other_os_thread_is_refused(threads_target, proc_of):
    target, _, _, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    errors = []

    def other():
        try:
            proc.resume()
        except TracerStateError as exc:
            errors.append(exc)

    th = threading.Thread(target=other)
    th.start()
    th.join(10)
    assert errors and proc.stopped
    proc.resume()


# -- injection -----------------------------------------------------------------------------------
def test_syscall_injection_and_blocked_threads_continue(threads_target, proc_of):
    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    roles = classify(proc)
    reader, main = roles["reader"][0], roles["main"][0]
    saved = {t.tid: t.regs() for t in proc.threads.values()}
    assert proc.syscall(39) == target.pid
    assert proc.syscall(39, thread=reader) == target.pid
    assert proc.syscall(39, thread=main) == target.pid
    assert proc.syscall(39, thread=roles["workers"][1]) == target.pid
    addr = proc.mmap(0, 8192, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS)
    # (the kernel may merge it with an adjacent anonymous mapping)
    assert any(m.start <= addr and addr + 8192 <= m.end and m.perms.startswith("rw") for m in proc.maps())
    proc.write(addr, b"djprobe")
    assert proc.read(addr, 7) == b"djprobe"
    proc.munmap(addr, 8192)
    assert not any(m.start <= addr < m.end for m in proc.maps())
    fd = proc.open_file("/dev/null", os.O_RDONLY)
    assert os.readlink(f"/proc/{target.pid}/fd/{fd}") == "/dev/null"
    proc.close_fd(fd)
    assert not os.path.exists(f"/proc/{target.pid}/fd/{fd}")
    with pytest.raises(Exception) as info:
        proc.open_file("/nonexistent/file", os.O_RDONLY)
    assert getattr(info.value, "errno", None) == 2
    for t in proc.threads.values():  # every register restored exactly (restart state included)
        t._regs = None
        assert t.regs() == saved[t.tid]
    before = counters_of(proc, counters)
    proc.resume()
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")
    target.proc.stdin.write(b"late data\n")  # the interrupted read() completes with data written now
    target.proc.stdin.flush()
    assert out.readline() == "got late data"
    os.kill(target.pid, signal.SIGUSR1)  # the main thread is alive in its (restarted) nanosleep
    assert out.readline() == "usr1"


def test_injection_needs_stopped_world(threads_target, proc_of):
    target, _, _, _ = threads_target
    proc = proc_of(target.pid)
    with pytest.raises(TracerStateError):
        proc.syscall(39)


# -- spawn -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [(), ("-no-pie",), ("-static",)], ids=["pie", "no-pie", "static"])
def test_spawn_holds_before_main(build_c, flags):
    exe = build_c(TARGETS / "hello.c", *flags, name="hello" + "".join(flags))
    proc = Process.spawn([str(exe)], stdout=subprocess.PIPE)
    try:
        assert proc.stopped and list(proc.threads) == [proc.pid]
        out = Lines(proc.popen.stdout)
        assert out.nothing_within(0.1)
        libs = {os.path.basename(m.path) for m in proc.maps() if m.is_file}
        if "-static" in flags:
            assert not any(name.startswith("libc") for name in libs)
        else:
            assert any(name.startswith("libc.so") for name in libs), libs
        assert proc.syscall(39) == proc.pid  # injection works while held
        proc.resume()
        assert out.readline() == "main"
        assert out.readline() == "args 1"
        assert proc.popen.wait(timeout=10) == 7
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(10)
        proc.close()


def test_spawn_keeps_stdio_and_stops_again(build_c, start_target, tmp_path):
    # the child inherits our stdout by default: point it at a file through a sub-interpreter
    exe = build_c(TARGETS / "hello.c")
    out = tmp_path / "out.txt"
    code = (
        "import sys\n"
        "from djprobe.process import Process\n"
        f"p = Process.spawn([{str(exe)!r}])\n"
        "p.resume()\n"
        "sys.exit(p.popen.wait(timeout=10))\n"
    )
    with open(out, "wb") as f:
        res = subprocess.run([sys.executable, "-c", code], stdout=f, timeout=60)
    assert res.returncode == 7
    assert out.read_bytes() == b"main\nargs 1\n"


def test_spawn_missing_command():
    with pytest.raises(FileNotFoundError):
        Process.spawn(["/nonexistent/djprobe-no-such-command"])


# -- errors ----------------------------------------------------------------------------------------
def test_missing_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with pytest.raises(ProcessGoneError, match="no such process"):
        Process(pid_max + 1)


def test_zombie_is_gone(build_c):
    exe = build_c("int main(void) { return 0; }", name="true")
    child = subprocess.Popen([exe])
    wait_until(lambda: task_state(child.pid, child.pid) == "Z", what="zombie")
    try:
        with pytest.raises(ProcessGoneError):
            Process(child.pid)
    finally:
        child.wait(10)


def test_process_exiting_during_stop(build_c, start_target):
    src = """
    #include <pthread.h>
    #include <unistd.h>
    static void *spin(void *a) { for (;;) ; return a; }
    int main(void) { pthread_t t; for (int i = 0; i < 3; i++) pthread_create(&t, 0, spin, 0);
                     usleep(30000); return 0; }
    """
    exe = build_c(src, name="exits")
    for _ in range(5):
        target = start_target([exe])
        gone = False
        deadline = time.monotonic() + 20
        try:
            proc = Process(target.pid)
        except ProcessGoneError:
            continue
        try:
            while time.monotonic() < deadline:
                try:
                    proc.stop()
                except ProcessGoneError:
                    gone = True
                    break
                proc.resume()
        finally:
            proc.close()
        assert gone


def test_exit_right_away(build_c, start_target):
    exe = build_c("int main(void) { return 0; }", name="true")
    for _ in range(20):
        target = start_target([exe])
        try:
            proc = Process(target.pid)
            try:
                proc.stop()
                proc.resume()
            finally:
                proc.close()
        except ProcessGoneError:
            pass


def test_already_traced(threads_target, proc_of):
    target, out, counters, _ = threads_target
    code = (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.ptrace.argtypes = [ctypes.c_long] * 4\n"
        f"r = libc.ptrace(0x4206, {target.pid}, 0, 0)\n"
        "print(r, ctypes.get_errno(), flush=True)\n"
        "time.sleep(60)\n"
    )
    helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert Lines(helper.stdout).readline().split()[0] == "0"
        proc = proc_of(target.pid)
        with pytest.raises(TracePermissionError, match=rf"already traced by PID {helper.pid} \(python"):
            proc.stop()
        assert not proc.stopped
        for tid in tasks(target.pid):
            if tid != target.pid:
                assert tracer_pid(target.pid, tid) == 0  # nothing left attached by us
    finally:
        helper.kill()
        helper.wait(10)
    wait_until(lambda: tracer_pid(target.pid, target.pid) == 0, what="helper's detach")
    threads = proc.stop()
    assert len(threads) == NWORK + 2
    proc.resume()
    before = counters_of(proc, counters)
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")


def test_no_signal_lost_under_stop_resume_and_injection(build_c, start_target, proc_of):
    """20000 queued real-time signals (with values) while we stop, inject and resume repeatedly:
    every one arrives exactly once with its value (a signal-delivery-stop met while stopping is
    delivered at once; injected syscalls run with every signal blocked, so nothing is dequeued)."""
    exe = build_c(TARGETS / "sigstorm.c")
    target = start_target([exe], stdout=subprocess.PIPE)
    out = Lines(target.proc.stdout)
    assert out.readline() == "ready"
    proc = proc_of(target.pid)
    stops = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        threads = proc.stop()
        stops += 1
        for t in list(threads.values()):
            assert proc.syscall(39, thread=t) == target.pid
        proc.resume()
        if not out.nothing_within(0.0):
            break
    n = 20000
    assert out.readline(timeout=30) == f"done {n} {n * (n - 1) // 2}", stops


def test_group_stopped_target_stays_stopped(threads_target, proc_of):
    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    os.kill(target.pid, signal.SIGSTOP)
    wait_until(lambda: all(task_state(target.pid, t) == "T" for t in tasks(target.pid)), what="group stop")
    threads = proc.stop()
    assert set(threads) == tasks(target.pid)
    assert proc.syscall(39) == target.pid
    proc.resume()  # each thread goes back into the group stop (asynchronously)
    wait_until(lambda: all(task_state(target.pid, t) == "T" for t in tasks(target.pid)), what="group stop again")
    before = counters_of(proc, counters)
    time.sleep(0.05)
    assert counters_of(proc, counters) == before
    os.kill(target.pid, signal.SIGCONT)
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")


def test_injected_syscall_timeout_restores_thread(threads_target, proc_of):
    from djprobe.process import TargetTimeoutError

    target, out, counters, _ = threads_target
    proc = proc_of(target.pid)
    proc.stop()
    worker = classify(proc)["workers"][0]
    saved = worker.regs()
    mask = _sig_blocked(target.pid, worker.tid)
    with pytest.raises(TargetTimeoutError):
        proc.syscall(34, thread=worker, timeout=0.3)  # pause(): blocks until interrupted
    worker._regs = None
    assert worker.regs() == saved
    assert _sig_blocked(target.pid, worker.tid) == mask
    assert proc.syscall(39, thread=worker) == target.pid
    before = counters_of(proc, counters)
    proc.resume()
    wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")


def test_target_survives_tracer_death(threads_target):
    target, out, counters, _ = threads_target
    code = (
        "import os, sys\n"
        "from djprobe.process import Process\n"
        f"p = Process({target.pid})\n"
        "p.stop()\n"
        "print(len(p.threads), flush=True)\n"
        "os._exit(0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == str(NWORK + 2), res.stderr
    wait_until(lambda: all(tracer_pid(target.pid, t) == 0 for t in tasks(target.pid)), what="detach")
    proc = Process(target.pid)
    try:
        before = counters_of(proc, counters)
        wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")
        target.proc.stdin.write(b"alive\n")
        target.proc.stdin.flush()
        assert out.readline() == "got alive"
    finally:
        proc.close()


_KILL_DURING_INJECTION = """
import os, signal, sys
from djprobe._sys import ptrace as pt
from djprobe.process import Process
pid, role, kill_at = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
p = Process(pid)
p.stop()
thread = p.threads[pid] if role == "main" else min(p.threads.values(), key=lambda t: t.regs().rip)
real, count = pt.ptrace, [0]
def counting(*args):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
pt.ptrace = counting
print(p.syscall(9, 0, 4096, 3, 0x22, (1 << 64) - 1, 0, thread=thread), flush=True)
print("ops", count[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    "role",
    ["main", pytest.param("worker", marks=pytest.mark.skipif(not os.environ.get("DJPROBE_LONG"), reason="long form"))],
)
def test_tracer_killed_at_every_step_of_an_injected_syscall(threads_target, role):
    """The tracer dies before each ptrace request of an injected mmap (and after the last): the
    thread that ran it resumes where it was, with its own registers and signal mask, whether it
    was in user code or inside an interrupted system call (the main thread sleeps, the reader
    blocks in read)."""
    target, out, counters, _ = threads_target
    blocked = {t: _sig_blocked(target.pid, t) for t in tasks(target.pid)}

    def run(kill_at: int) -> str:
        res = subprocess.run(
            [sys.executable, "-c", _KILL_DURING_INJECTION, str(target.pid), role, str(kill_at)],
            capture_output=True, text=True, timeout=60,
        )
        assert res.returncode == -signal.SIGKILL, res.stderr
        return res.stdout

    completed = 0
    for kill_at in range(1, 40):  # until the injection gets through before the kill (twice)
        out_text = run(kill_at)
        if "ops" in out_text:
            completed += 1
        wait_until(lambda: all(tracer_pid(target.pid, t) == 0 for t in tasks(target.pid)), what="detach")
        proc = Process(target.pid)
        try:
            before = counters_of(proc, counters)
            wait_until(lambda: all(a > b for a, b in zip(counters_of(proc, counters), before)), what="counters to move")
        finally:
            proc.close()
        wait_until(lambda: {t: _sig_blocked(target.pid, t) for t in tasks(target.pid)} == blocked, what="masks back")
        target.proc.stdin.write(f"k{kill_at}\n".encode())
        target.proc.stdin.flush()
        assert out.readline() == f"got k{kill_at}"
        os.kill(target.pid, signal.SIGUSR1)
        assert out.readline() == "usr1"
        if completed == 2:
            break
    assert completed == 2 and kill_at >= 8, kill_at  # every request of the injection was a kill point


def test_zombie_leader_with_live_threads(build_c, start_target, proc_of):
    src = """
    #include <pthread.h>
    #include <stdio.h>
    #include <unistd.h>
    static void *spin(void *a) { for (;;) usleep(1000); return a; }
    int main(void) { pthread_t t; for (int i = 0; i < 3; i++) pthread_create(&t, 0, spin, 0);
                     printf("ready\\n"); fflush(stdout); pthread_exit(0); }
    """
    exe = build_c(src, name="zleader")
    target = start_target([exe], stdout=subprocess.PIPE)
    assert Lines(target.proc.stdout).readline() == "ready"
    wait_until(lambda: task_state(target.pid, target.pid) == "Z", what="leader exit")
    proc = proc_of(target.pid)
    threads = proc.stop()
    assert set(threads) == tasks(target.pid) - {target.pid} and len(threads) == 3
    assert proc.syscall(39) == target.pid
    proc.resume()
    assert proc.is_alive()


def test_spawn_then_resume_then_stop_again(build_c):
    exe = build_c(TARGETS / "threads.c")
    proc = Process.spawn([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        out = Lines(proc.popen.stdout)
        assert out.nothing_within(0.05)
        proc.resume()
        assert out.readline().startswith("ready")
        threads = proc.stop()  # a fresh PTRACE_SEIZE after the PTRACE_TRACEME session
        assert set(threads) == tasks(proc.pid) and len(threads) == NWORK + 2
        proc.resume()
        proc.popen.stdin.write(b"spawned\n")
        proc.popen.stdin.flush()
        assert out.readline() == "got spawned"
    finally:
        proc.close()
        proc.popen.kill()
        proc.popen.wait(10)


_PUSHF_LOOP = r"""
#include <stdio.h>
#include <unistd.h>
/* Spins through pushfq/popfq with a flag-dependent computation; exits 0 if it never saw a wrong
 * value after reading stdin's end, or dies of SIGTRAP if a stepped popf left TF on. */
int main(void) {
    printf("ready\n");
    fflush(stdout);
    volatile long bad = 0;
    for (long i = 0;; i++) {
        long r;
        __asm__ volatile("cmp %2, %1\n\tpushfq\n\tmov $0, %0\n\tpopfq\n\tsetl %b0\n\tmovzx %b0, %0"
                         : "=&r"(r) : "r"(i & 7), "r"(4L) : "cc");
        if (r != ((i & 7) < 4)) bad++;
        if (bad) return 3;
    }
    return 0;
}
"""


def test_step_over_pushf_popf_leaves_no_trap_flag(build_c, start_target):
    """Stepping emulates pushfq/popfq: the target neither sees TF in its flags nor dies of
    SIGTRAP after detach, and its flag-dependent results stay right."""
    exe = build_c(_PUSHF_LOOP, name="pushf_loop")
    t = start_target([exe], stdout=subprocess.PIPE)
    assert t.proc.stdout.readline() == b"ready\n"
    proc = Process(t.pid)
    seen = set()
    try:
        for _ in range(20):
            threads = proc.stop()
            (th,) = threads.values()
            for _ in range(40):
                opcode = proc.read(th.regs().rip, 1)
                seen.add(opcode)
                th.step()
                assert not th.regs().eflags & 0x100
            proc.resume()
            time.sleep(0.01)
        assert {b"\x9c", b"\x9d"} <= seen, "the loop is short: both are stepped over"
        time.sleep(0.2)
        assert t.proc.poll() is None, f"target died: {t.proc.returncode}"
    finally:
        proc.close()
