"""Issue 9 item 4: killing the tracer at any instant never harms the target.

The tracer (``djprobe count -p PID -d 0.3 'f_*'``) is killed with SIGKILL before its Nth
operation on the target (every ptrace request, signal and ``/proc/PID/mem`` read or write counts:
``DJPROBE_KILL_AT_OP``, see ``djprobe._sys.faults``), for N over the operations of one whole run
(insertion, counting, removal). After each kill ``djprobe cleanup -p PID --json`` runs, and the
target (tests/targets/killsweep.c: 5 busy threads, one in nanosleep, one signalling, the main
thread in read, every result checked) must be alive, running, untraced, have every f_* function
byte equal to the file, no probe area left that cleanup could have removed, no wrong result, and
finally stop with ``ok``.

Short form (CI): the first 5 and last 5 operations and every k-th in between (about 28 runs).
Long form (DJPROBE_LONG=1): every operation (with DJPROBE_KILL_KIND=mem-write, say, every
operation of that kind and only those: the numbering of the others varies between runs). A second sweep does the same for a
register/unregister cycle of entry and mid-function probes made through the Python API in a
child Python process.
"""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from djprobe import recovery
from djprobe._sys import faults
from djprobe._sys.procfs import ProcessMemory, read_maps
from djprobe.sites import Verdict, analyse_function
from djprobe.symbols import Symbols
from tests.conftest import TARGETS, compile_c

LONG = os.environ.get("DJPROBE_LONG") == "1"
KILL_KIND = os.environ.get(faults.KIND_VAR, "")  # kill only before operations of this kind
FUNCS = ("f_add", "f_mul", "f_flags", "f_red", "f_call")
SAMPLE_EDGE = 5  # the first and last operations always tried
SAMPLE_SIZE = 28  # about this many runs in the short form (about 2 s each: ~60 s a sweep)

pytestmark = pytest.mark.timeout(3600 if LONG else 300)


# --------------------------------------------------------------------------------------------
# the target


@dataclass
class FuncBytes:
    """The file's bytes of every probed function, by file address."""

    exe: Path
    add_vaddr: int
    funcs: dict[str, tuple[int, bytes]]  # name -> (file address, bytes)

    @classmethod
    def of(cls, exe: Path) -> "FuncBytes":
        mod = Symbols.from_file(str(exe)).modules[0]
        funcs = {}
        for name in FUNCS:
            sym = mod.symbols(name)[0]
            funcs[name] = (sym.address, mod.read_file(sym.address, sym.size))
        return cls(exe, funcs["f_add"][0], funcs)

    def describe(self, address: int, bias: int) -> str:
        """``f_mul+0x5`` for an address in a probed function, else the address."""
        for name, (vaddr, code) in self.funcs.items():
            if vaddr + bias <= address < vaddr + bias + len(code):
                return f"{name}+{address - vaddr - bias:#x}"
        return f"{address:#x} (outside the f_* functions)"


class SweepTarget:
    """A running killsweep target: started niced (the tracer gets the CPU it needs while the
    target's 8 threads keep running), always killed and reaped by :meth:`kill`."""

    def __init__(self, exe: Path, code: FuncBytes) -> None:
        self.code = code
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(19)
        )
        self.pid = self.proc.pid
        self.iters = 0
        self.unexpected = ""  # what came instead of a status line
        line = self.readline(20.0)
        if not line.startswith("ready "):
            self.kill()
            raise AssertionError(f"target did not start: {line!r}")
        self.bias = int(line.split()[1], 16) - code.add_vaddr
        self.maps_at_start = {(m.start, m.end) for m in read_maps(self.pid)}

    def readline(self, timeout: float) -> str:
        """One line of the target's output ("" at EOF or after ``timeout`` seconds)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode(errors="replace").strip() if ready else ""

    def status(self, timeout: float = 10.0) -> tuple[int, int] | None:
        """Ask for ``status <iterations> <wrong>``; None if the target does not answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"s")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        line = self.readline(timeout)
        if not line.startswith("status "):
            self.unexpected = line or f"nothing in {timeout} s"
            return None
        _, iters, bad = line.split()
        return int(iters), int(bad)

    def progress(self, since: int, timeout: float = 10.0) -> tuple[int, int] | None:
        """Poll the status until the iteration count passes ``since`` (the workers run) or
        ``timeout`` seconds pass; the last status (None if the target did not answer)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st is None or st[0] > since or time.monotonic() > deadline:
                return st
            time.sleep(0.01)

    def finish(self, timeout: float = 20.0) -> tuple[int | None, str]:
        """Stop the target; its exit status (None if it did not exit) and remaining output."""
        if self.proc.stdin is None or self.proc.stdin.closed:  # already killed
            self.kill()
            return self.proc.returncode, "killed earlier"
        try:
            out, _ = self.proc.communicate(input=b"q", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None, "did not exit"
        remove_shm_files(self.pid)
        return self.proc.returncode, out.decode(errors="replace").strip()

    def death(self) -> str | None:
        """How the target died (``killed by SIGSEGV``, ``fault SIGTRAP at f_add+0x3``...), or
        None if it runs."""
        if self.proc.poll() is None and self.unexpected.startswith("fault "):
            try:  # it is dying: the fault handler prints, then exits
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            return None
        assert self.proc.stdout is not None
        out = self.unexpected + "\n" + self.proc.stdout.read().decode(errors="replace")
        rc = self.proc.returncode
        for line in out.splitlines():
            if line.startswith("fault "):  # fault SIG rip RIP addr ADDR tid TID
                parts = line.split()
                sig = signal.Signals(int(parts[1])).name
                rip = int(parts[3], 16)
                return f"fault {sig} at {self.code.describe(rip, self.bias)} (addr {parts[5]}, tid {parts[7]})"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with {rc}: {out.strip()[-200:]!r}"

    def kill(self) -> None:
        """SIGKILL (a stopped process dies too), reap, close the pipes."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        remove_shm_files(self.pid)


def remove_shm_files(pid: int) -> None:
    """A killed tracer cannot unlink the probe-area files it made for ``pid``: remove them."""
    for path in shm_files(pid):
        try:
            os.unlink(path)
        except OSError:
            pass


def shm_files(pid: int) -> list[str]:
    """Probe-area files left in /dev/shm for target ``pid`` (a tracer killed between creating and
    unlinking one)."""
    return glob.glob(f"/dev/shm/djprobe-{pid}-*")


def thread_states(pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (state letter, TracerPid)} of every thread of a live process."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{name}/status") as f:
                tracer = next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(name)] = (state, tracer)
    return out


def describe_threads(pid: int) -> str:
    """Every thread's state, tracer, kernel wait channel and system call, for a message."""
    parts = []
    for tid, (state, tracer) in sorted(thread_states(pid).items()):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except OSError:
            wchan, nr = "?", "?"
        parts.append(f"{tid} {state} tracer={tracer} {wchan or '-'} sys={nr}")
    return ", ".join(parts)


def area_fds(pid: int) -> list[str]:
    """The target's file descriptors open on a probe-area file (``fd -> path``)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/dev/shm/djprobe-" in link:
            out.append(f"{fd} -> {link}")
    return out


# --------------------------------------------------------------------------------------------
# one kill


@dataclass
class Outcome:
    """What one tracer kill did."""

    n: int
    what: str = ""  # the operation the tracer was killed before
    tracer: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        s = f"N={self.n} [{self.what or '-'}] tracer {self.tracer}"
        if self.problems:
            s += ": " + "; ".join(self.problems)
        if self.notes:
            s += " (" + "; ".join(self.notes) + ")"
        return s


def tracer_env(**extra: str) -> dict[str, str]:
    """This environment without the fault variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in (faults.KILL_VAR, faults.COUNT_VAR, faults.KIND_VAR)}
    env.update(extra)
    return env


def count_command(pid: int) -> list[str]:
    """The CLI run swept: insertion, 0.3 s of counting, removal."""
    return [sys.executable, "-m", "djprobe", "count", "-p", str(pid), "-d", "0.3", "f_*"]


API_SCRIPT = textwrap.dedent(
    """
    import sys, djprobe
    pid, sites = int(sys.argv[1]), [int(a, 0) for a in sys.argv[2:]]
    with djprobe.attach(pid) as proc:
        probes = [djprobe.Djprobe(a) for a in sites]
        refused = proc.register_many(probes)  # a site may be busy now (EBUSY): fine
        proc.poll(timeout=0.2)
        proc.unregister_many(probes)  # the registered ones
        print("placed", len(probes) - len(refused), "hits", sum(p.hits for p in probes), flush=True)
    """
)


def api_command(pid: int, sites: list[int]) -> list[str]:
    """A child Python that registers probes at ``sites`` (runtime addresses) and removes them."""
    return [sys.executable, "-c", API_SCRIPT, str(pid), *(hex(a) for a in sites)]


def run_tracer(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a tracer to its end (or its kill); a tracer still running at ``timeout`` is killed."""
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills it
        return subprocess.CompletedProcess(argv, -999, exc.stdout or "", f"timed out after {timeout} s")


TracerArgv = Callable[["SweepTarget"], list[str]]
"""The tracer's command line for a target."""


def measure(exe: Path, code: FuncBytes, argv_for: TracerArgv, tmp: Path, kind: str = KILL_KIND) -> list[str]:
    """The operations of one whole tracer run (DJPROBE_COUNT_OPS; with ``kind``, only those of
    the kind the sweep kills at), on a fresh target."""
    target = SweepTarget(exe, code)
    try:
        log = tmp / "ops-measure"
        res = run_tracer(argv_for(target), tracer_env(**{faults.COUNT_VAR: str(log), faults.KIND_VAR: kind}))
        assert res.returncode == 0, res.stderr
        n, whats = faults.read_log(str(log))
        assert n == len(whats) > 0
        assert target.death() is None
        rc, out = target.finish()
        assert rc == 0 and out.startswith("ok "), (rc, out)
        return whats
    finally:
        target.kill()


def sample(total: int) -> list[int]:
    """Operation numbers to kill at: all in the long form; else the first and last
    SAMPLE_EDGE and every k-th in between (about SAMPLE_SIZE in all)."""
    if LONG or total <= SAMPLE_SIZE:
        return list(range(1, total + 1))
    edge = set(range(1, SAMPLE_EDGE + 1)) | set(range(total - SAMPLE_EDGE + 1, total + 1))
    k = max(1, (total - 2 * SAMPLE_EDGE) // (SAMPLE_SIZE - 2 * SAMPLE_EDGE))
    return sorted(edge | set(range(SAMPLE_EDGE + k, total - SAMPLE_EDGE + 1, k)))


def kill_once(target: SweepTarget, n: int, argv: list[str], tmp: Path, kind: str = KILL_KIND) -> Outcome:
    """Kill the tracer before its nth operation, clean up, check the target. The target is
    left running if every check passed (and killed otherwise)."""
    out = Outcome(n)
    log = tmp / f"ops-{n}"
    log.unlink(missing_ok=True)
    res = run_tracer(argv, tracer_env(**{faults.KILL_VAR: str(n), faults.COUNT_VAR: str(log), faults.KIND_VAR: kind}))
    if res.returncode == -signal.SIGKILL:
        out.tracer = "killed"
        try:
            _, whats = faults.read_log(str(log))
            out.what = whats[n - 1]
        except (OSError, ValueError, IndexError):
            out.what = "?"
    elif res.returncode == 0:
        out.tracer = "finished (fewer operations this run)"
    else:
        out.tracer = f"exit {res.returncode}"
        if res.stderr.strip():
            out.notes.append("tracer stderr: " + res.stderr.strip().splitlines()[-1][:200])

    died = target.death()
    if died:
        out.problems.append(f"target died before cleanup: {died}")
        return out
    before = thread_states(target.pid)
    stopped = {t: s for t, (s, _) in before.items() if s in "tT"}
    if stopped:
        out.notes.append(f"threads stopped after the kill: {stopped}")

    res = run_tracer([sys.executable, "-m", "djprobe", "cleanup", "-p", str(target.pid), "--json"], tracer_env())
    report: dict = {}
    try:
        report = json.loads(res.stdout)
    except ValueError:
        out.problems.append(f"cleanup failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    if report and not report.get("ok"):
        out.problems.append(f"cleanup not ok: {json.dumps({k: report[k] for k in ('skipped', 'refused_areas')})}")
    if report.get("restored") or report.get("orphans"):
        out.notes.append(f"cleanup restored {len(report['restored']) + len(report['orphans'])} site(s)")

    for a in report.get("left_mapped", []):
        out.notes.append(f"cleanup left area {a['data_address']:#x} mapped: {a['reason']}")
    died = target.death()
    if died:
        out.problems.append(f"target died: {died}")
        return out
    states = thread_states(target.pid)
    bad_states = {t: s for t, s in states.items() if s[0] not in "RSD" or s[1] != 0}
    if bad_states:
        out.problems.append(f"threads not running untraced (tid: (state, TracerPid)): {bad_states}")

    with ProcessMemory(target.pid) as mem:
        for name, (vaddr, want) in target.code.funcs.items():
            have = mem.read(vaddr + target.bias, len(want))
            if have != want:
                diff = next(i for i in range(len(want)) if have[i] != want[i])
                out.problems.append(f"{name} differs from the file at +{diff:#x}: {have[diff:diff + 5].hex()}")
    kept = {a["data_address"] for a in report.get("left_mapped", []) + report.get("refused_areas", [])}
    maps = read_maps(target.pid)
    for m in maps:
        if recovery.AREA_PATH_RE.match(m.path) and m.start not in kept:
            out.problems.append(f"probe area {m.start:#x} {m.path} left mapped by cleanup")
    # not failures (cleanup has no way to find them), but worth knowing: an anonymous executable
    # mapping that is no kept area's code part, and a probe-area file the target still holds open
    kept_code = {a.code_address for a in recovery.find_areas(target.pid)}
    new_exec = [
        m for m in maps
        if m.executable and not m.path and (m.start, m.end) not in target.maps_at_start and m.start not in kept_code
    ]  # fmt: skip
    if new_exec:
        out.notes.append(f"unidentifiable anonymous executable mapping(s) left: {[hex(m.start) for m in new_exec]}")
    open_areas = area_fds(target.pid)
    if open_areas:
        out.notes.append(f"probe-area file(s) left open in the target: {open_areas}")
    left_files = shm_files(target.pid)
    if left_files:
        out.notes.append(f"probe-area file(s) left in /dev/shm: {left_files}")

    st = target.progress(target.iters)
    if st is None:
        died = target.death()
        if died:
            out.problems.append(f"target died: {died}")
        else:
            out.problems.append(f"target does not answer ({target.unexpected!r}); threads: {describe_threads(target.pid)}")
    else:
        iters, bad = st
        if bad:
            out.problems.append(f"{bad} wrong result(s)")
        if iters <= target.iters:
            out.problems.append(f"workers made no progress ({iters} iterations)")
        target.iters = iters
    if out.problems:
        target.kill()
    return out


def sweep(
    exe: Path, code: FuncBytes, argv_for: TracerArgv, tmp: Path, kind: str = KILL_KIND, every: bool = LONG
) -> tuple[int, list[Outcome]]:
    """Measure the operations (of ``kind``: every kind if empty) of one run, then kill at each
    sampled N (each N with ``every``). Returns the measured count and the outcomes of the kills
    that harmed the target (or the final stop)."""
    whats = measure(exe, code, argv_for, tmp, kind)
    outcomes: list[Outcome] = []
    target: SweepTarget | None = None
    try:
        for n in range(1, len(whats) + 1) if every else sample(len(whats)):
            if target is None or target.proc.poll() is not None:
                target = SweepTarget(exe, code)
            out = kill_once(target, n, argv_for(target), tmp, kind)
            outcomes.append(out)
            if out.problems:
                target.kill()
                target = None
            else:
                # a survivor is reused; a target is also stopped and checked every 10 kills
                if len(outcomes) % 10 == 0:
                    rc, text = target.finish()
                    if rc != 0 or not text.startswith("ok "):
                        out.problems.append(f"target's final check: exit {rc}: {text!r}")
                    target = None
        if target is not None:
            rc, text = target.finish()
            if rc != 0 or not text.startswith("ok "):
                outcomes[-1].problems.append(f"target's final check: exit {rc}: {text!r}")
    finally:
        if target is not None:
            target.kill()
    return len(whats), outcomes


def report(title: str, total: int, outcomes: list[Outcome], everything: bool = False) -> str:
    """The harmful kills (with ``everything``: every kill), one line each."""
    harmed = [o for o in outcomes if o.problems]
    lines = [f"{title}: {total} operations in a run, {len(outcomes)} kills, {len(harmed)} harmed the target"]
    lines += ["  " + o.line() for o in (outcomes if everything else harmed)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture
def log_dir():
    """A private directory for the operation logs (pytest's numbered tmp_path directories can be
    removed by another pytest run on the same machine while a long sweep runs)."""
    with tempfile.TemporaryDirectory(prefix="djprobe-killsweep-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def sweep_exe() -> Path:
    return compile_c([TARGETS / "killsweep.c", TARGETS / "killsweep_funcs.c"], name="killsweep")


@pytest.fixture(scope="module")
def sweep_code(sweep_exe) -> FuncBytes:
    return FuncBytes.of(sweep_exe)


def test_target_checks_itself(sweep_exe, sweep_code):
    """The target runs, answers, counts and stops with ok; a fault is reported with its place."""
    t = SweepTarget(sweep_exe, sweep_code)
    try:
        first = t.status()
        assert first is not None and first[1] == 0
        states = thread_states(t.pid)
        assert len(states) == 8 and all(s[1] == 0 for s in states.values())
        second = t.progress(first[0])
        assert second is not None and second[0] > first[0]
        rc, out = t.finish()
        assert rc == 0 and out.startswith("ok ") and int(out.split()[1]) >= second[0]
    finally:
        t.kill()
    t = SweepTarget(sweep_exe, sweep_code)
    try:
        os.kill(t.pid, signal.SIGSEGV)
        t.proc.wait(timeout=10)
        assert (t.death() or "").startswith("fault SIGSEGV at ")
    finally:
        t.kill()


def test_kill_point_log_covers_a_whole_run(sweep_exe, sweep_code, log_dir):
    """The measured run inserts, counts and removes: jump writes and restores are logged."""
    whats = measure(sweep_exe, sweep_code, lambda t: count_command(t.pid), log_dir, kind="")
    writes = [w for w in whats if w.startswith("mem-write")]
    assert any(w.startswith("ptrace SEIZE") for w in whats)
    assert any(w.startswith("ptrace DETACH") for w in whats)
    assert len(writes) >= 2 * len(FUNCS), "stubs, jumps in and original bytes back"


def test_kill_tracer_at_every_operation_of_count(sweep_exe, sweep_code, log_dir):
    total, outcomes = sweep(sweep_exe, sweep_code, lambda t: count_command(t.pid), log_dir)
    print(report("djprobe count -p PID -d 0.3 'f_*'", total, outcomes, everything=True))  # shown with -s
    harmed = [o for o in outcomes if o.problems]
    assert not harmed, report("djprobe count -p PID -d 0.3 'f_*'", total, outcomes)


def api_sites(exe: Path) -> list[int]:
    """File addresses of entry and mid-function sites that take a jump, not overlapping."""
    mod = Symbols.from_file(str(exe)).modules[0]
    out = []
    for name in FUNCS:
        fa = analyse_function(mod, mod.symbols(name)[0])
        end = 0
        for a in fa.boundaries():
            if a < end:
                continue
            res = fa.analyse(a)
            if res.verdict is Verdict.JUMP:
                out.append(a)
                end = a + res.size
    return out


def test_kill_tracer_at_every_operation_of_api_cycle(sweep_exe, sweep_code, log_dir):
    sites = api_sites(sweep_exe)
    assert len(sites) > len(FUNCS), "mid-function sites too"
    total, outcomes = sweep(
        sweep_exe, sweep_code, lambda t: api_command(t.pid, [a + t.bias for a in sites]), log_dir
    )
    print(report("register_many/unregister_many", total, outcomes, everything=True))  # shown with -s
    harmed = [o for o in outcomes if o.problems]
    assert not harmed, report("register_many/unregister_many (entries and middles)", total, outcomes)


SHARED_SCRIPT = textwrap.dedent(
    """
    import sys, djprobe
    pid, specs = int(sys.argv[1]), sys.argv[2:]
    with djprobe.attach(pid) as proc:
        probes = []
        for spec in specs:  # one at a time: later sites first, so windows re-anchor and grow
            probe = djprobe.Djprobe(int(spec, 0) if spec.startswith("0x") else spec)
            if not proc.register_many([probe]):
                probes.append(probe)
        proc.poll(timeout=0.2)
        proc.unregister_many(probes[::2])
        proc.unregister_many(probes[1::2])
        print("placed", len(probes), "hits", sum(p.hits for p in probes), flush=True)
    """
)


def shared_specs(exe: Path, bias: int) -> list[str]:
    """Every instruction boundary of each function's entry window, last first, then its return
    probe: probes that share one stub, placed so that every way of joining one happens."""
    mod = Symbols.from_file(str(exe)).modules[0]
    specs = []
    for name in FUNCS:
        fa = analyse_function(mod, mod.symbols(name)[0])
        entry = fa.analyse(fa.function.address)
        if entry.verdict is Verdict.JUMP:
            specs += [hex(i.address + bias) for i in reversed(entry.displaced)]
        specs.append(f"{name}%return")
    return specs


@pytest.mark.parametrize("kind", ["", "mem-write"], ids=["sampled", "every-write"])
def test_kill_tracer_at_every_operation_of_shared_stubs(sweep_exe, sweep_code, log_dir, kind):
    """The same sweep over probes that share stubs (overlaps.py): guests joining, windows
    re-anchored and grown to an exit, shared stubs rebuilt and removed. The second form kills
    before every write to the target (about 60), the instants where a window has been recorded
    but not yet written (a window re-anchored over placed probes harmed the target once)."""
    total, outcomes = sweep(
        sweep_exe, sweep_code,
        lambda t: [sys.executable, "-c", SHARED_SCRIPT, str(t.pid), *shared_specs(sweep_exe, t.bias)], log_dir,
        kind=kind or KILL_KIND, every=LONG or bool(kind),
    )
    print(report("shared stubs", total, outcomes, everything=True))
    harmed = [o for o in outcomes if o.problems]
    assert not harmed, report("shared stubs (guests, re-anchoring, exits)", total, outcomes)
