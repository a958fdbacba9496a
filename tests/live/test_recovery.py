"""Recovery after the tracer dies: `djprobe status` finds the probes, `djprobe cleanup` restores
every original byte (checked against the ELF file) and unmaps the probe areas."""

from __future__ import annotations

import json
import os
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

SITES = ("work_a", "work_b")


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


def _start_loop(start_target, exe):
    t = start_target([exe, "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = t.proc.stdout.readline()
    assert line.startswith("ready"), line
    return t


def _finish(t) -> str:
    """Close the loop target's stdin; return its final line (``calls_a N bad M``)."""
    t.proc.stdin.close()
    line = t.proc.stdout.readline()
    assert t.proc.wait(timeout=20) == 0
    return line


def djprobe_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "djprobe", *args], capture_output=True, text=True, timeout=timeout
    )


def _file_bytes(exe, site: str, size: int = 16) -> tuple[int, bytes]:
    mod = Symbols.from_file(str(exe)).modules[0]
    sym = mod.symbols(site)[0]
    return sym.address, mod.read_file(sym.address, size)


def _live_bytes(pid: int, site: str, size: int = 16) -> bytes:
    with Symbols.from_process(pid) as syms:
        addr = syms.modules[0].symbols(site)[0].address
        return syms._mem().read(addr, size)


def _area_maps(pid: int) -> list:
    return [m for m in read_maps(pid) if recovery.AREA_PATH_RE.match(m.path)]


def _kill_tracer_with_probes(pid: int, sites=SITES) -> None:
    """A separate tracer process places probes, then dies by SIGKILL."""
    script = textwrap.dedent(
        f"""
        import time, djprobe
        proc = djprobe.attach({pid})
        for s in {list(sites)!r}:
            proc.register(djprobe.Djprobe(s))
        print("placed", flush=True)
        time.sleep(60)
        """
    )
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "placed"
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)


def test_tracer_killed_status_then_cleanup(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    _kill_tracer_with_probes(t.pid)
    time.sleep(0.3)
    assert t.proc.poll() is None
    # the jumps are still in
    for s in SITES:
        assert _live_bytes(t.pid, s, 1) == b"\xe9"

    res = djprobe_cli("status", "-p", str(t.pid), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    instances = [i for a in info["areas"] for i in a["instances"]]
    assert len(instances) == 2
    assert {i["site"].split(":", 1)[1] for i in instances} == set(SITES)
    assert all(i["hits"] > 0 and i["state"] == "INSERTED" and i["code"] == "patched" for i in instances)
    assert all(a["valid"] and not a["tracer_alive"] for a in info["areas"])
    text = djprobe_cli("status", "-p", str(t.pid))
    assert text.returncode == 0 and "work_a" in text.stdout and "gone" in text.stdout

    res = djprobe_cli("cleanup", "-p", str(t.pid), "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads(res.stdout)
    assert report["ok"] and len(report["restored"]) == 2 and report["left_mapped"] == []
    for s in SITES:
        _, want = _file_bytes(counts_exe, s)
        assert _live_bytes(t.pid, s) == want, s
    assert _area_maps(t.pid) == []
    with open(f"/proc/{t.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()
    assert t.proc.poll() is None
    time.sleep(0.2)
    # a second cleanup has nothing to do
    again = djprobe_cli("cleanup", "-p", str(t.pid))
    assert again.returncode == 0 and "nothing to clean up" in again.stdout
    assert _finish(t).split()[-1] == "0"


def test_cleanup_without_probes(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    res = djprobe_cli("cleanup", "-p", str(t.pid))
    assert res.returncode == 0, res.stderr
    assert "no djprobe probe areas" in res.stdout
    res = djprobe_cli("status", "-p", str(t.pid), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["areas"] == []
    assert _finish(t).split()[-1] == "0"


def test_cleanup_after_normal_close(start_target, counts_exe):
    """A tracer that ended normally leaves no jump behind (and no area, or only empty ones)."""
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        proc.register(djprobe.Djprobe("work_a"))
        time.sleep(0.05)
    areas = recovery.status(t.pid)
    assert all(i.code == "original" for a in areas for i in a.instances)
    assert all(not a.orphans for a in areas)
    report = recovery.cleanup(t.pid)
    assert report.ok and not report.restored and not report.orphans
    assert len(report.unmapped) == len(areas)
    assert _area_maps(t.pid) == []
    assert _finish(t).split()[-1] == "0"


def test_cleanup_refuses_while_tracer_alive(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        djp = proc.register(djprobe.Djprobe("work_a"))
        areas = recovery.status(t.pid)
        assert [a.tracer_alive for a in areas] == [True]
        report = recovery.cleanup(t.pid)
        assert not report.ok and report.refused_areas and not report.restored
        assert _live_bytes(t.pid, "work_a", 1) == b"\xe9"
        res = djprobe_cli("cleanup", "-p", str(t.pid))
        assert res.returncode == 1 and "alive" in res.stderr
        assert djp.hits > 0
    assert _finish(t).split()[-1] == "0"


def test_cleanup_refuses_tampered_original_bytes(start_target, counts_exe):
    """The instance table is target-controlled: a recorded 'original' that is not the file's
    bytes is never written."""
    t = _start_loop(start_target, counts_exe)
    _kill_tracer_with_probes(t.pid, ["work_b"])
    (area,) = recovery.find_areas(t.pid)
    (inst,) = area.instances
    assert inst.valid and inst.code == "patched"
    from djprobe.area import ENTRY_SIZE
    from djprobe._sys.procfs import ProcessMemory

    entry_at = area.data_address + area.layout.table_offset + inst.index * ENTRY_SIZE
    original_at = entry_at + 24  # address, stub, state+size+action+pad, then original bytes
    with ProcessMemory(t.pid) as mem:
        raw = bytearray(mem.read(original_at, 24))
        assert bytes(raw[: inst.size]) == inst.original
        raw[inst.size - 1] ^= 0xFF
        mem.write(original_at, bytes(raw))
    (area,) = recovery.find_areas(t.pid)
    (inst,) = area.instances
    assert inst.problem or inst.size == 5  # a 5-byte site has no tail to disagree with
    # the tampered record is never written; the jump goes anyway, replaced by the FILE's bytes
    report = recovery.cleanup(t.pid, force=True)
    assert report.ok, report.to_json()
    _, want = _file_bytes(counts_exe, "work_b")
    assert _live_bytes(t.pid, "work_b") == want
    assert [o.address for o in report.orphans] == [inst.address] or (
        not inst.problem and not report.restored and report.skipped
    )
    assert _area_maps(t.pid) == []
    assert _finish(t).split()[-1] == "0"


def test_orphan_jump_without_table_entry(start_target, counts_exe):
    """A jump whose table entry was wiped (as a forked child sees it once the parent's tracer
    freed the shared entry) is found by comparing the code with the file, and removed."""
    t = _start_loop(start_target, counts_exe)
    _kill_tracer_with_probes(t.pid, ["work_a", "work_b"])
    (area,) = recovery.find_areas(t.pid)
    from djprobe._sys.procfs import ProcessMemory
    from djprobe.area import ENTRY_SIZE

    wiped = area.instances[0]
    with ProcessMemory(t.pid) as mem:
        mem.write(area.data_address + area.layout.table_offset + wiped.index * ENTRY_SIZE, bytes(ENTRY_SIZE))
    (area,) = recovery.status(t.pid)
    assert len(area.instances) == 1 and [o.address for o in area.orphans] == [wiped.address]
    res = djprobe_cli("status", "-p", str(t.pid))
    assert "orphan jump" in res.stdout
    report = recovery.cleanup(t.pid)
    assert report.ok and len(report.restored) == 1 and [o.address for o in report.orphans] == [wiped.address]
    for s in SITES:
        _, want = _file_bytes(counts_exe, s)
        assert _live_bytes(t.pid, s) == want, s
    assert _area_maps(t.pid) == []
    assert _finish(t).split()[-1] == "0"


def test_status_rejects_forged_area(start_target, counts_exe, tmp_path):
    """A /dev/shm/djprobe-* mapping with a bad header is reported invalid, never acted on."""
    src = textwrap.dedent(
        r"""
        #include <fcntl.h>
        #include <stdio.h>
        #include <string.h>
        #include <sys/mman.h>
        #include <unistd.h>
        int main(void) {
            char path[64];
            snprintf(path, sizeof path, "/dev/shm/djprobe-%d-forged%d", getpid(), 0);
            /* a name that matches the pattern: hex digits only */
            snprintf(path, sizeof path, "/dev/shm/djprobe-%d-abcdef", getpid());
            int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
            ftruncate(fd, 1 << 20);
            char *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            memcpy(p, "DJPROBE\x01", 8);
            memset(p + 8, 0xff, 200);      /* garbage sizes */
            unlink(path);
            printf("ready\n"); fflush(stdout);
            char c; while (read(0, &c, 1) > 0) {}
            printf("bad 0\n");
            return 0;
        }
        """
    )
    exe = compile_c(src, name="forged_area")
    t = start_target([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.proc.stdout.readline().startswith("ready")
    (area,) = recovery.find_areas(t.pid)
    assert not area.valid and "version" in area.problem or "bounds" in area.problem
    report = recovery.cleanup(t.pid, force=True)
    assert not report.ok and report.refused_areas and not report.unmapped
    assert len(_area_maps(t.pid)) == 1
    res = djprobe_cli("status", "-p", str(t.pid))
    assert res.returncode == 0 and "INVALID" in res.stdout
    t.proc.stdin.close()
    assert t.proc.stdout.readline().strip() == "bad 0"
    assert t.proc.wait(timeout=10) == 0


def test_cleanup_dead_pid():
    res = djprobe_cli("cleanup", "-p", "999999999")
    assert res.returncode == 1 and res.stderr.startswith("djprobe: error:") and "Traceback" not in res.stderr
    res = djprobe_cli("status", "-p", "999999999")
    assert res.returncode == 1 and "no such process" in res.stderr


def test_stale_entry_of_a_kept_area_does_not_fail_a_later_cleanup(start_target, counts_exe):
    """An area kept mapped after its jump was restored (cleanup keeps one a stack still points
    into) holds an entry whose site a later probe now patches into another area: a cleanup after
    that later tracer dies restores the site once and is ok (found by the tracer-death sweep)."""
    t = _start_loop(start_target, counts_exe)
    _kill_tracer_with_probes(t.pid, ["work_a"])
    (first,) = recovery.find_areas(t.pid)
    addr, original = _file_bytes(counts_exe, "work_a")
    (inst,) = first.instances
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:  # what cleanup does, area kept
        mem.seek(inst.address)
        mem.write(inst.original)
    _kill_tracer_with_probes(t.pid, ["work_a"])  # a later probe at the same site, another area
    assert len(recovery.find_areas(t.pid)) == 2
    res = djprobe_cli("cleanup", "-p", str(t.pid), "--json")
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["ok"], res.stdout
    assert len(report["restored"]) == 1 and len(report["untouched"]) == 1
    assert _live_bytes(t.pid, "work_a", len(original)) == original
    assert not _area_maps(t.pid)
    assert _finish(t).split()[-1] == "0"


def test_cleanup_closes_an_area_file_a_killed_tracer_left_open(start_target, counts_exe, tmp_path):
    """Killed between the injected open of an area file and its close: the fd stays open in the
    target; cleanup closes it (and only fds of area files made for this target)."""
    t = _start_loop(start_target, counts_exe)
    path = f"/dev/shm/djprobe-{t.pid}-1-feedface0001"
    other = f"/dev/shm/djprobe-{t.pid + 1}-1-feedface0002"  # made for another process: not ours
    for p in (path, other):
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
    script = textwrap.dedent(
        f"""
        import os
        from djprobe.process import Process
        p = Process({t.pid})
        p.stop()
        print(p.open_file({path!r}, os.O_RDWR), p.open_file({other!r}, os.O_RDONLY), flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        fd, other_fd = map(int, res.stdout.split())
        assert os.readlink(f"/proc/{t.pid}/fd/{fd}") == path
        report = json.loads(djprobe_cli("cleanup", "-p", str(t.pid), "--json").stdout)
        assert report["closed_fds"] == [fd] and report["ok"]
        assert not os.path.exists(f"/proc/{t.pid}/fd/{fd}")
        assert os.readlink(f"/proc/{t.pid}/fd/{other_fd}") == other
    finally:
        for p in (path, other):
            os.unlink(p)
    assert _finish(t).split()[-1] == "0"
