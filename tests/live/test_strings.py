"""Typed arguments and strings copied in the target at the hit (prototypes, fetch stubs, debug
info), through the Python API and `djprobe trace` (text, JSON, Perfetto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

import djprobe
from djprobe.area import AreaLayout
from djprobe.events import EventBatch
from djprobe.fetched import FetchedString, FetchError
from tests.conftest import TARGETS, compile_c

pytestmark = pytest.mark.timeout(120)
DJPROBE = [sys.executable, "-m", "djprobe"]
THREADS, CALLS = 3, 2000
PROTO = "const char *s, long n"


@pytest.fixture(scope="module")
def strings_exe():
    return compile_c(TARGETS / "strings.c", name="strings")


def _unprobed(exe, *args) -> str:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60, check=True).stdout


def _spawn(argv, register, layout=None):
    """Spawn, register, run to the end; (proc, probe, batch of every event, the target's stdout)."""
    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(a) for a in argv], stdout=write_fd)
    os.close(write_fd)
    if layout is not None:
        proc.layout = layout
    # strings are the subject here, not the timeout: a consumer held up for more than the default
    # 0.5 s on a loaded machine (seen in CI: every event after the first ring dropped) must not drop
    proc.wait_timeout = 5.0
    djp = register(proc)
    proc.start()
    batches = list(proc.events(timeout=60))
    with os.fdopen(read_fd) as out:
        output = out.read()
    assert proc.process.popen.wait(timeout=30) == 0
    batches.append(proc.read_events())
    return proc, djp, EventBatch.concat([b for b in batches if len(b)] or [batches[-1]]), output


def _check_specials(by_n: dict[int, object], string_size: int) -> None:
    """The main thread's calls: bad pointers, the page edge, the long string."""
    for n, address in ((-1, 0), (-2, 1)):
        assert by_n[n] == FetchError(address, 14), by_n[n]  # EFAULT, the target unharmed
    assert isinstance(by_n[-3], FetchError) and by_n[-3].error == "EFAULT" and by_n[-3].address > 0
    assert by_n[-4] == "xyz" and by_n[-4].truncated  # no NUL before the unmapped page
    assert by_n[-5] == "ab" and not by_n[-5].truncated  # its NUL is the page's last byte
    assert by_n[-6] == "b" * string_size and by_n[-6].truncated


def test_strings_at_the_hit_every_thread_every_call(strings_exe):
    """The buffer is overwritten right after each call: only a copy taken at the hit shows
    ``t<thread>-<i>``. Every event, per-thread order, exact values, output unchanged."""
    expected_out = _unprobed(strings_exe, THREADS, CALLS)
    proc, djp, batch, out = _spawn(
        [strings_exe, THREADS, CALLS], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO, lossless=True))
    )
    with proc:
        assert out == expected_out
        assert djp.hits == THREADS * CALLS + 6 and djp.missed == 0 and len(batch) == djp.hits
        s, n = batch.column("s"), batch.column("n")
        per_thread: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for tid, text, value in zip(batch.events["tid"].tolist(), s, n):
            per_thread[tid].append((text, value))
        workers = [calls for calls in per_thread.values() if len(calls) == CALLS]
        assert len(workers) == THREADS
        seen = set()
        for calls in workers:
            t = calls[0][0].split("-")[0]
            assert [c for c in calls] == [(f"{t}-{i}", i) for i in range(CALLS)]  # order and content
            assert all(isinstance(text, FetchedString) and not text.truncated for text, _ in calls)
            seen.add(t)
        assert seen == {f"t{t}" for t in range(THREADS)}
        (main,) = [calls for calls in per_thread.values() if len(calls) == 6]
        _check_specials({value: text for text, value in main}, AreaLayout.string_size)


def test_handler_sees_named_arguments_and_a_larger_string_size(strings_exe):
    seen = []

    def handler(djp, regs):
        seen.append((regs.args.n, regs.args.s, regs.args[1]))

    read_fd, write_fd = os.pipe()
    proc = djprobe.spawn([str(strings_exe), "1", "50"], stdout=write_fd)
    os.close(write_fd)
    with proc:
        proc.layout = AreaLayout(string_size=256)
        proc.register(djprobe.Djprobe("ev_str", handler=handler, prototype=PROTO))
        proc.start()
        while proc.process.is_alive():
            proc.poll(0.2)
        proc.poll(0.0)
        with os.fdopen(read_fd) as out:
            assert out.read() == _unprobed(strings_exe, 1, 50)
        assert proc.process.popen.wait(timeout=30) == 0
    assert len(seen) == 56
    assert [(n, str(s)) for n, s, _ in seen[:50]] == [(i, f"t0-{i}") for i in range(50)]
    assert all(raw == n % 2**64 for n, _, raw in seen)  # the raw register next to the typed value
    _check_specials({n: s for n, s, _ in seen[50:]}, 256)


def test_forked_child_reads_its_own_memory(strings_exe):
    """The stub names the process by the TID in the thread control block, which glibc updates in
    a forked child: the child's call shows the child's buffer, not the parent's."""
    proc, djp, batch, out = _spawn(
        [strings_exe, 1, 1, "fork"], lambda p: p.register(djprobe.Djprobe("ev_str", prototype=PROTO))
    )
    with proc:
        assert out == _unprobed(strings_exe, 1, 1, "fork")
        by_n = {int(n): (s, tid) for n, s, tid in zip(batch.column("n"), batch.column("s"), batch.events["tid"].tolist())}
        assert by_n[100][0] == "child-side" and by_n[200][0] == "parent-side"
        assert by_n[100][1] != by_n[200][1]  # the child's own TID
        assert djp.hits == len(batch) == 9  # the child's stub counts in the data part it shares


def test_prototype_errors_name_the_problem():
    with pytest.raises(djprobe.InvalidSiteError, match="parameter 2.*floating-point"):
        djprobe.Djprobe("ev_str", prototype="char *s, double d")
    with pytest.raises(djprobe.InvalidSiteError, match="prototype must be a string"):
        djprobe.Djprobe("ev_str", prototype=42)


def _trace(*args, **kw):
    return subprocess.run([*DJPROBE, "trace", *map(str, args)], capture_output=True, text=True, timeout=90, **kw)


def test_trace_text_and_json_with_a_prototype(strings_exe, tmp_path):
    expected_out = _unprobed(strings_exe, 2, 20)
    report = tmp_path / "report.txt"
    res = _trace("-o", report, f"ev_str({PROTO})", "--", strings_exe, 2, 20)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected_out  # the target's output, unchanged and apart from the report
    lines = report.read_text().splitlines()
    hits = [line for line in lines if ":ev_str s=" in line]
    assert len(hits) == 46
    assert sum(line.endswith(f' s="t1-{i}" n={i}') for line in hits for i in range(20)) == 20
    assert any(line.endswith(" s=0x1<EFAULT> n=-2") for line in hits)
    assert any(line.endswith(' s="' + "b" * 64 + '"... n=-6') for line in hits)

    res = _trace("--json", "--string-size", "10", f"ev_str({PROTO})", "--", strings_exe, 1, 3)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    by_n = {e["args"]["n"]: e for e in events}
    assert by_n[2]["args"] == {"s": "t0-2", "n": 2} and "truncated" not in by_n[2]
    assert by_n[-1]["args"]["s"] == {"address": 0, "error": "EFAULT"}
    assert by_n[-6]["args"]["s"] == "b" * 16 and by_n[-6]["truncated"] == ["s"]  # 10 rounded up to 16


def test_trace_without_a_prototype_keeps_the_six_registers(strings_exe):
    res = _trace("--json", "--no-debuginfo", "ev_str", "--", strings_exe, 1, 2)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert len(events) == 8 and all(isinstance(e["args"], list) and len(e["args"]) == 6 for e in events)
    assert [e["args"][1] for e in events[:2]] == [0, 1]


def test_libc_open_shows_the_path_by_name_from_debug_info():
    res = _trace("libc:open*", "--", "cat", "/etc/hostname")
    assert res.returncode == 0, res.stderr
    assert any('file="/etc/hostname"' in line for line in res.stdout.splitlines()), res.stdout
    res = _trace("--json", "libc:open*", "--", "cat", "/etc/hostname")
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"time_ns"')]
    assert any(e["args"].get("file") == "/etc/hostname" for e in events if isinstance(e["args"], dict)), events


def _perfetto_trace(strings_exe, path):
    res = _trace("--perfetto", path, f"ev_str({PROTO})", "ev_str%return", "--", strings_exe, 2, 5)
    assert res.returncode == 0, res.stderr
    assert "perfetto trace written" in res.stderr
    return res


def test_perfetto_file_has_a_slice_per_call(strings_exe, tmp_path):
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

    path = tmp_path / "t.pftrace"
    _perfetto_trace(strings_exe, path)
    trace = Trace()
    trace.ParseFromString(path.read_bytes())
    threads = {p.track_descriptor.uuid: p.track_descriptor.thread.tid for p in trace.packet
               if p.HasField("track_descriptor") and p.track_descriptor.HasField("thread")}
    assert len(threads) == 3  # two workers and the main thread
    stacks: dict[int, list] = defaultdict(list)
    calls = []
    for p in trace.packet:
        if not p.HasField("track_event"):
            continue
        e = p.track_event
        args = {a.name: (a.string_value if a.HasField("string_value") else a.int_value) for a in e.debug_annotations}
        assert e.track_uuid in threads
        if e.type == TrackEvent.TYPE_SLICE_BEGIN:
            stacks[e.track_uuid].append((e.name, args, p.timestamp))
        elif e.type == TrackEvent.TYPE_SLICE_END:
            name, begin_args, start = stacks[e.track_uuid].pop()
            assert p.timestamp >= start
            calls.append((name, begin_args, args))
        else:
            pytest.fail(f"unexpected instant {e.name}")
    assert not any(stacks.values())
    assert len(calls) == 16 and all(name == "ev_str" for name, _, _ in calls)
    worker = sorted((b["n"], b["s"]) for _, b, _ in calls if b["n"] >= 0)
    assert worker == sorted((i, f"t{t}-{i}") for t in range(2) for i in range(5))
    assert {b["s"] for _, b, _ in calls if b["n"] == -2} == {"0x1<EFAULT>"}
    assert all("retval" in r for _, _, r in calls)


def test_perfetto_file_loads_in_trace_processor(strings_exe, tmp_path):
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    path = tmp_path / "t.pftrace"
    _perfetto_trace(strings_exe, path)
    binary = os.environ.get("DJPROBE_TRACE_PROCESSOR")
    try:
        tp = TraceProcessor(trace=str(path), config=TraceProcessorConfig(bin_path=binary, load_timeout=20))
    except Exception as exc:  # noqa: BLE001 - the binary is downloaded on first use
        pytest.skip(
            "trace_processor_shell is not shipped by the perfetto package; its first use downloads it from "
            f"commondatastorage.googleapis.com, not reachable here, and apt has no package of it "
            f"(set DJPROBE_TRACE_PROCESSOR to a binary): {type(exc).__name__}"
        )
    with tp:
        rows = list(tp.query("select s.name, s.dur, t.tid from slice s join thread_track tt on s.track_id = tt.id "
                             "join thread t using(utid)"))
        assert len(rows) == 16 and {r.name for r in rows} == {"ev_str"} and all(r.dur >= 0 for r in rows)
        args = list(tp.query("select key, display_value from args where key like 'debug.%'"))
        assert {"debug.s", "debug.n", "debug.retval"} <= {a.key for a in args}


def test_api_prototype_from_debug_info_as_a_column():
    proc = djprobe.spawn(["cat", "/etc/hostname"], stdout=subprocess.DEVNULL)
    with proc:
        proto = djprobe.prototype_of(proc, "libc:open")
        assert str(proto) == "const char *file, int oflag, ..."
        djp = proc.register(djprobe.Djprobe("libc:open", prototype=proto))
        proc.start()
        assert proc.process.popen.wait(timeout=30) == 0
        batch = proc.read_events()  # a few events: the rings hold them all
        files = [str(f) for f in batch.column("file")]
        assert "/etc/hostname" in files and djp.hits == len(files)
        assert batch.column("oflag").tolist()[files.index("/etc/hostname")] == os.O_RDONLY


def test_tracer_killed_with_string_probes_status_and_cleanup(start_target):
    """A string probe on a function whose argument is no pointer (every copy fails: EFAULT), its
    tracer SIGKILLed: the target runs on unharmed and exact; status finds the probe in the
    version-3 area; cleanup restores the bytes."""
    from tests.live.test_recovery import _area_maps, _file_bytes, _finish, _live_bytes, _start_loop, djprobe_cli

    exe = compile_c(TARGETS / "counts.c", name="counts")
    t = _start_loop(start_target, exe)
    script = (
        "import time, djprobe\n"
        f"proc = djprobe.attach({t.pid})\n"
        "djp = proc.register(djprobe.Djprobe('work_a', prototype='char *s', lossless=True))\n"
        "batch = proc.events(timeout=5)\n"
        "first = next(batch)\n"
        "print('seen', first.values(0)['s'].error, flush=True)\n"
        "time.sleep(60)\n"
    )
    tracer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "seen EFAULT"
        tracer.send_signal(9)
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)
    res = djprobe_cli("status", "-p", str(t.pid), "--json")
    assert res.returncode == 0, res.stderr
    instances = [i for a in json.loads(res.stdout)["areas"] for i in a["instances"]]
    assert [i["site"].split(":", 1)[1] for i in instances] == ["work_a"] and instances[0]["hits"] > 0
    res = djprobe_cli("cleanup", "-p", str(t.pid), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stderr + res.stdout
    assert _live_bytes(t.pid, "work_a") == _file_bytes(exe, "work_a")[1]
    assert _area_maps(t.pid) == []
    assert _finish(t).split()[-1] == "0"  # bad=0: every call computed right
