"""Trap probes: where no jump can be placed, a kernel uprobe counts (and records) the hits.

A trap probe is a tracefs uprobe (``uprobe_events``: ``p:djprobe_TRACER_TARGET/aADDR
/proc/TARGET/map_files/...:0xOFFSET``) that is placed in the target only through perf events
opened on its id for the target's threads: the kernel writes its ``int3`` into that process alone,
single-steps the displaced instruction out of line, and removes the ``int3`` when the last perf
event is closed (so when the tracer dies: its fds close). The definition itself outlives a
killed tracer, unused; ``djprobe cleanup --stale`` (and any later tracer) deletes those whose
tracer is gone (:func:`remove_stale_uprobes`).

Coverage of every thread: the perf events are opened with the world stopped, one per existing
thread (and per CPU when sampling), with ``inherit`` + ``inherit_thread``: every thread created
later gets a child event from its creator, and the counts of exited threads are folded into their
parent event, so ``read()`` of the events is the exact count for the process (forked processes are
not counted: ``inherit_thread``; an ``exec`` removes the events: ``remove_on_exec``).
(The kernel's ``uprobe`` perf PMU is not used: an inherited PMU event copies the user pointer to
the file path and the kernel reads it again in the *target* at ``clone``, which then fails with
EFAULT: ``pthread_create`` returned 14 in the probed program.)

Recording: sampling events (``sample_period=1``, ``REGS_USER`` with the argument registers or all
of them, TID, ``CLOCK_MONOTONIC`` time) per existing thread and per CPU (``perf_mmap`` refuses
inherited per-thread events), each CPU's events writing into one ring; drained into the same
``EventBatch`` form as the jump probes' records.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ._sys import perf, tracefs
from .arch import I386
from .area import ARG_REGISTERS, REGISTER_NAMES
from .errors import DjprobeError, InvalidSiteError, NoRoomError, SiteBusyError
from .events import EVENT_DTYPE, EventBatch
from .sites import SiteAnalysis
from .sites.coverage import site_trap_refusal
from .traps32 import STACK_BYTES, regs_mask32, row32

if TYPE_CHECKING:
    from .probes import Djprobe, ProbedProcess

log = logging.getLogger(__name__)

GROUP_PREFIX = "djprobe_"
#: Data pages of each per-CPU sample ring (a power of two).
RING_PAGES = 128


def group_name(tracer: int, target: int) -> str:
    return f"{GROUP_PREFIX}{tracer}_{target}"


def parse_group(group: str) -> tuple[int, int] | None:
    """(tracer PID, target PID) of a group named by :func:`group_name`, else None."""
    if not group.startswith(GROUP_PREFIX):
        return None
    parts = group[len(GROUP_PREFIX) :].split("_")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def trap_uprobes(target: int) -> list[dict]:
    """The trap uprobe definitions of any djprobe tracer for ``target``: name, address, file
    offset, tracer PID and whether that tracer still runs."""
    try:
        root = tracefs.tracefs_root(mount=False)
    except OSError:
        return []
    out = []
    for ev in tracefs.list_uprobes(root):
        ids = parse_group(ev.group)
        if ids is None or ids[1] != target:
            continue
        address = int(ev.name[1:], 16) if ev.name.startswith("a") else None
        out.append({"uprobe": f"{ev.group}/{ev.name}", "address": address, "offset": ev.offset,
                    "tracer": ids[0], "tracer_alive": os.path.exists(f"/proc/{ids[0]}")})
    return out


def remove_stale_uprobes(target: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Delete the uprobe definitions of djprobe tracers that are gone (of ``target`` only, if
    given). Returns (deleted ``GROUP/NAME``s, [(``GROUP/NAME``, why not)]). One in use by a perf
    event is never deleted (the kernel says EBUSY)."""
    try:
        root = tracefs.tracefs_root(mount=False)
    except OSError:
        return [], []
    deleted, failed = [], []
    for ev in tracefs.list_uprobes(root):
        ids = parse_group(ev.group)
        if ids is None or (target is not None and ids[1] != target):
            continue
        if ids[0] == os.getpid() or os.path.exists(f"/proc/{ids[0]}"):
            continue  # its tracer runs (or its PID was reused: it stays until that one ends)
        try:
            tracefs.delete_uprobe(root, ev.group, ev.name)
            deleted.append(f"{ev.group}/{ev.name}")
        except OSError as exc:
            failed.append((f"{ev.group}/{ev.name}", exc.strerror or str(exc)))
    return deleted, failed


def _regs_mask(registers: str) -> tuple[int, list[int]]:
    """perf's ``sample_regs_user`` mask and, in sample order, the REGISTER_NAMES index of each."""
    names = (*ARG_REGISTERS, "rax") if registers == "args" else REGISTER_NAMES
    bits = sorted(perf.PERF_REGS[n] for n in names)
    by_bit = {perf.PERF_REGS[n]: REGISTER_NAMES.index(n) for n in names}
    return sum(1 << b for b in bits), [by_bit[b] for b in bits]


@dataclass
class TrapInstance:
    """The trap at one address, shared by the probes placed there (as ``probes.Instance``)."""

    analysis: SiteAnalysis  # the refused jump verdict: site, address, reason
    group: str
    name: str
    event_id: int = 0  # of the tracefs uprobe (the perf tracepoint config)
    action: str = "count"
    registers: str = "args"
    count_fds: list[int] = field(default_factory=list)
    sample_fds: list[int] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)
    probes: list["Djprobe"] = field(default_factory=list)
    carried_hits: int = 0  # from count events replaced by sampling events
    delivered: int = 0
    final: int | None = None
    removed: bool = False
    mode = "trap"

    @property
    def address(self) -> int:
        return self.analysis.address

    @property
    def size(self) -> int:
        return 1

    def count(self) -> int:
        if self.final is not None:
            return self.final
        return self.carried_hits + sum(perf.read_count(fd) for fd in self.count_fds + self.sample_fds)

    def apart(self) -> int:
        """Hits of vfork/posix_spawn children before their exec: none are told apart by a trap
        (such a child is not a thread of the process: ``inherit_thread`` gives it no event, so
        its hits are not counted at all, neither here nor in :meth:`count`)."""
        return 0

    def drops(self) -> int:
        """Samples lost in full rings; exact once removed and drained (hits minus delivered)."""
        if self.action != "record":
            return 0
        return max(0, self.count() - self.delivered) if self.removed else 0


class TrapSet:
    """The trap probes of one ProbedProcess: placing, counting, draining, removing."""

    def __init__(self, proc: "ProbedProcess") -> None:
        self.proc = proc
        self.instances: dict[int, TrapInstance] = {}
        self.rings: dict[int, tuple[int, perf.Ring]] = {}  # cpu -> (dummy event owning the ring, ring)
        self._by_id: dict[int, TrapInstance] = {}
        self._root: Path | None = None
        self._group = group_name(os.getpid(), proc.pid)
        self._stale_checked = False

    # -- placing -------------------------------------------------------------------------------
    def wants(self, djp: "Djprobe", analysis: SiteAnalysis | None, exc: DjprobeError) -> bool:
        """Whether ``djp``, refused a jump with ``exc``, should get a trap instead."""
        allowed = djp.trap if djp.trap is not None else self.proc.trap_fallback
        if not allowed or djp.at != "entry" or djp._parent is not None or djp._preset is not None:
            return False
        if analysis is not None and analysis.address in self.instances:
            return True  # joins our trap there (the jump analysis saw its int3)
        return isinstance(exc, (InvalidSiteError, NoRoomError)) and exc.address is not None

    def place(self, djp: "Djprobe", analysis: SiteAnalysis | None, jump_error: DjprobeError) -> None:
        """Place a trap for ``djp`` (world stopped by the caller). Raises the jump's error, with
        why no trap fits either, if none can go there."""
        address = analysis.address if analysis is not None else jump_error.address
        why_no_jump = getattr(jump_error, "reason", None) or str(jump_error)
        site = analysis.site if analysis is not None else f"{address:#x}"
        try:
            existing = self.instances.get(address)
            if existing is None and (analysis is None or analysis.busy):
                raise DjprobeError("its bytes are not the file's (someone else's patch)")
            created = existing is None
            if existing is None:
                existing = self._new_instance(analysis)
            try:
                if djp.record and existing.action != "record":
                    self._start_sampling(existing, djp.registers)
                elif djp.record and djp.registers == "all" and existing.registers != "all":
                    raise DjprobeError("a trap recording only the argument registers is already there")
            except BaseException:
                if created:
                    self._finish(existing)  # no probe uses it: take it out again
                raise
        except (DjprobeError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            reason = f"{why_no_jump}; no trap either: {why}"
            cls = SiteBusyError if isinstance(jump_error, SiteBusyError) else InvalidSiteError
            kwargs = {"reason": reason} if cls is InvalidSiteError else {}
            raise cls(f"{site}: {reason}", address=address, **kwargs) from exc
        djp.address = address
        djp.site = existing.analysis.site
        djp.analysis = existing.analysis
        djp.mode = "trap"
        djp.no_jump_reason = why_no_jump
        djp._baseline = existing.count()
        djp._drop_baseline = 0
        djp._join_tsc = self.proc.clock.now_tsc() if djp.record else 0
        djp._final_hits = None
        djp._final_missed = None
        djp._instance = existing  # type: ignore[assignment]
        existing.probes.append(djp)

    @property
    def _mode32(self) -> bool:
        """A 32-bit process: samples take the stack words and the i386 registers (traps32)."""
        return getattr(self.proc.process, "arch", None) is I386

    def _tracefs(self) -> Path:
        if self._root is None:
            self._root = tracefs.tracefs_root()
        if not self._stale_checked:
            self._stale_checked = True
            remove_stale_uprobes()
        return self._root

    def _new_instance(self, analysis: SiteAnalysis) -> TrapInstance:
        address = analysis.address
        if self.proc._overlapping(address, 1) is not None:
            raise DjprobeError("it lies inside the displaced bytes of a jump probe")
        refusal = site_trap_refusal(analysis)  # a boundary of its function, the kernel's rules
        if refusal is not None:
            raise DjprobeError(refusal)
        entry = next((m for m in self.proc.process.maps() if address in m), None)
        if entry is None or not entry.is_file or not entry.executable:
            raise DjprobeError("not in an executable file mapping (a uprobe needs a file)")
        path = f"/proc/{self.proc.pid}/map_files/{entry.start:x}-{entry.end:x}"
        offset = address - entry.start + entry.offset
        root = self._tracefs()
        name = f"a{address:x}"
        event = tracefs.add_uprobe(root, self._group, name, path, offset)
        inst = TrapInstance(analysis, self._group, name, event)
        try:
            self._open_counting(inst)
        except BaseException:
            self._close_instance(inst)
            raise
        self.instances[address] = inst
        return inst

    def _attr(self, inst: TrapInstance, sampling: bool) -> perf.Attr:
        flags = perf.FLAG_INHERIT | perf.FLAG_INHERIT_THREAD | perf.FLAG_REMOVE_ON_EXEC
        if not sampling:
            return perf.Attr(type=perf.PERF_TYPE_TRACEPOINT, config=inst.event_id, flags=flags)
        mask, _ = _regs_mask(inst.registers)
        sample_type = perf.PERF_SAMPLE_IDENTIFIER | perf.PERF_SAMPLE_TID | perf.PERF_SAMPLE_TIME | perf.PERF_SAMPLE_REGS_USER
        stack = 0
        if self._mode32:  # cdecl arguments are on the stack: djprobe.traps32
            mask, stack = regs_mask32(), STACK_BYTES
            sample_type |= perf.PERF_SAMPLE_STACK_USER
        return perf.Attr(
            type=perf.PERF_TYPE_TRACEPOINT,
            config=inst.event_id,
            flags=flags | perf.FLAG_USE_CLOCKID | perf.FLAG_WATERMARK,
            sample_period=1,
            sample_type=sample_type,
            sample_regs_user=mask,
            sample_stack_user=stack,
            clockid=perf.CLOCK_MONOTONIC,
            wakeup=RING_PAGES * 4096 // 2,
        )

    def _tids(self) -> list[int]:
        with self.proc.stopped() as threads:  # already stopped by the caller: no thread starts now
            return sorted(threads)

    def _open_counting(self, inst: TrapInstance) -> None:
        _raise_fd_limit(len(self._tids()))
        attr = self._attr(inst, sampling=False)
        for tid in self._tids():
            fd = _open_for_thread(attr, tid, -1)
            if fd is not None:
                inst.count_fds.append(fd)

    def _start_sampling(self, inst: TrapInstance, registers: str) -> None:
        """Replace counting events by sampling ones (world stopped: the count carries over)."""
        inst.registers = registers
        inst.action = "record"
        tids = self._tids()
        cpus = perf.online_cpus()
        _raise_fd_limit(len(tids) * len(cpus) + len(cpus))
        attr = self._attr(inst, sampling=True)
        fds: list[int] = []
        try:
            for cpu in cpus:
                if cpu not in self.rings:
                    owner = perf.perf_event_open(perf.ring_owner_attr(), -1, cpu)
                    try:
                        self.rings[cpu] = (owner, perf.Ring(owner, RING_PAGES))
                    except BaseException:
                        os.close(owner)
                        raise
                for tid in tids:
                    fd = _open_for_thread(attr, tid, cpu)
                    if fd is None:
                        continue
                    fds.append(fd)
                    perf.set_output(fd, self.rings[cpu][0])
                    eid = perf.event_id(fd)
                    inst.ids.add(eid)
                    self._by_id[eid] = inst
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        inst.carried_hits += sum(perf.read_count(fd) for fd in inst.count_fds)
        for fd in inst.count_fds:
            os.close(fd)
        inst.count_fds = []
        inst.sample_fds = fds

    # -- events --------------------------------------------------------------------------------
    def drain(self) -> EventBatch | None:
        """The samples in the rings as one EventBatch (None if there are none)."""
        if not self.rings:
            return None
        tids, times, regs, owners = [], [], [], []
        layouts: dict[str, list[int]] = {}
        for _cpu, (_fd, ring) in sorted(self.rings.items()):
            for rtype, _misc, body in ring.records():
                if rtype != perf.PERF_RECORD_SAMPLE:
                    continue
                eid, _pid, tid, when, abi = struct.unpack_from("<QIIQQ", body)
                inst = self._by_id.get(eid)
                if inst is None:
                    continue
                order = layouts.get(inst.registers)
                if order is None:
                    order = layouts[inst.registers] = _regs_mask(inst.registers)[1]
                row = [0] * len(REGISTER_NAMES)
                if self._mode32:
                    row = row32(body, 24)
                elif abi:
                    values = struct.unpack_from(f"<{len(order)}Q", body, 32)
                    for k, v in zip(order, values):
                        row[k] = v
                inst.delivered += 1
                tids.append(tid)
                times.append(when)
                regs.append(row)
                owners.append(inst)
        if not tids:
            return None
        events = np.zeros(len(tids), dtype=EVENT_DTYPE)
        events["tid"] = tids
        events["time_ns"] = times
        events["regs"] = np.asarray(regs, dtype=np.uint64)
        events["tsc"] = self.proc.clock.from_ns(events["time_ns"])
        order = np.argsort(events["time_ns"], kind="stable")
        instances = np.empty(len(tids), dtype=object)
        instances[:] = owners
        return EventBatch(events[order], instances[order])

    # -- removal -------------------------------------------------------------------------------
    def unregister(self, djps: Iterable["Djprobe"]) -> list["Djprobe"]:
        """Remove the trap probes among ``djps``; returns the others (jump probes)."""
        rest = []
        for djp in djps:
            inst = djp._instance
            if not isinstance(inst, TrapInstance):
                rest.append(djp)
                continue
            if len(inst.probes) == 1:
                self._finish(inst)
            djp._final_hits = inst.count() - djp._baseline
            djp._final_missed = inst.drops() if inst.removed else 0
            djp._instance = None
            inst.probes.remove(djp)
        return rest

    def _finish(self, inst: TrapInstance) -> None:
        """Freeze the count, deliver what is in the rings, close the events, delete the uprobe."""
        for fd in inst.count_fds + inst.sample_fds:
            try:
                perf.ioctl(fd, perf.PERF_EVENT_IOC_DISABLE)
            except OSError:
                pass
        inst.final = inst.count()
        if inst.action == "record":
            self.proc._drain()  # its samples are delivered while its ids are known
        inst.removed = True
        self.instances.pop(inst.address, None)
        self._close_instance(inst)

    def _close_instance(self, inst: TrapInstance) -> None:
        for fd in inst.count_fds + inst.sample_fds:
            os.close(fd)
        for eid in inst.ids:
            self._by_id.pop(eid, None)
        inst.count_fds, inst.sample_fds, inst.ids = [], [], set()
        if not any(i.action == "record" for i in self.instances.values()):
            self._close_rings()
        self._delete_unused()

    def _close_rings(self) -> None:
        for fd, ring in self.rings.values():
            ring.close()
            os.close(fd)
        self.rings = {}

    def _delete_unused(self) -> None:
        """Delete the definitions of traps that are gone and whose events are all closed."""
        if self._root is None:
            return
        live_names = {i.name for i in self.instances.values()}
        for ev in tracefs.list_uprobes(self._root):
            if ev.group != self._group or ev.name in live_names:
                continue
            try:
                tracefs.delete_uprobe(self._root, ev.group, ev.name)
            except OSError as exc:
                log.warning("could not delete uprobe %s/%s: %s", ev.group, ev.name, exc)

    def probes(self) -> list["Djprobe"]:
        return [p for inst in self.instances.values() for p in inst.probes]

    def forget(self, djp: "Djprobe") -> None:
        """The target is gone: keep the final count, drop the events."""
        inst = djp._instance
        if isinstance(inst, TrapInstance):
            if inst in self.instances.values():
                self._finish(inst)
            djp._final_hits = inst.count() - djp._baseline
            djp._final_missed = inst.drops()
            djp._instance = None
            if djp in inst.probes:
                inst.probes.remove(djp)

    def close(self) -> None:
        """Close every event and delete every definition of this tracer for this target."""
        for inst in list(self.instances.values()):
            try:
                self._finish(inst)
            except (OSError, DjprobeError):
                log.exception("closing trap %s", inst.name)
        self._close_rings()
        self._delete_unused()


def _open_for_thread(attr: perf.Attr, tid: int, cpu: int) -> int | None:
    """An event for thread ``tid``; None if the thread is gone (killed while the world was
    stopped: it runs no more code)."""
    try:
        return perf.perf_event_open(attr, tid, cpu)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft limit on open files towards the hard one when many events are needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + needed + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else min(hard, max(want, soft)), hard))
