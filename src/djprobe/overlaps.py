"""Overlapping probes: a probe inside another probe's displaced bytes joins its stub.

The instance that owns the jump is the *host*; a probe placed at one of the other instruction
boundaries of its window is a *guest*: an :class:`~djprobe.probes.Instance` of its own (its own
slot in the host's area, for its counter, drops and events) whose action runs inside the host's
stub, right before its instruction (see ``shared_stubs.py``). Adding, upgrading (count to record)
or removing any member rebuilds the host's stub into a new slot with the world stopped: the jump is
pointed at the new stub, threads standing in the old stub's relocated instructions are moved to the
same instruction in the new one, and the old slot is retired until no thread can be in it (a thread
inside an action runs out by itself; its hit is counted).

A host whose own probes are all gone stays as an *anchor* (jump and stub, no action of its own)
while guests remain; it is removed with the last of them. Guests have no instance table entry of
their own in the target (``djprobe cleanup`` restores the bytes through the host's entry).

:class:`~djprobe.probes.ProbedProcess` calls the hooks here with the world stopped.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Sequence

from . import springboards
from .area import MAX_DISPLACED, InstanceEntry, InstanceState
from .errors import NoRoomError, SiteBusyError
from .shared_stubs import ActionPoint, PathPoint, StubTooLargeError, build_shared_stub
from .sites import SiteAnalysis
from .sites.sharing import way_in
from .sites.springboards import SHORT_JUMP_SIZE
from .stubs import jump_bytes
from .x86 import Flow
from .x86.relocate import RelocationError

if TYPE_CHECKING:
    from .probes import Djprobe, Instance, ProbedProcess

__all__ = ["PlanWindows", "host_for", "joins", "order_plans", "insert_guest", "join_member", "remove_member", "forget_member", "reanchor", "unpatched_analysis", "unpatched_memory", "shared"]


def reserved_slots(layout) -> int:
    """Slots of a probe area that new windows leave to the windows already there: a guest's
    counter and every rebuild of a shared stub take a slot in the host's area (1/16 of it)."""
    return layout.max_instances // 16


def _shares(instance: "Instance") -> bool:
    """Whether ``instance``'s action can be one of a shared stub's (counts and records can; a
    latency probe's stub serves it alone, see ``latency.py``)."""
    return instance.action in ("count", "record") and not instance.strings


def can_share(proc: "ProbedProcess", djp: "Djprobe") -> bool:
    """Whether ``djp``'s action can be one of a shared stub's: a count or a record without
    strings copied at the hit (those stubs, like latency and loader hooks, serve one site)."""
    return proc._action_for(djp)[0] in ("count", "record") and not djp.strings


def _shareable(analysis: SiteAnalysis) -> bool:
    """A window that can hold several actions: an entry or mid-function window, or the plain
    window of an exit (not a path window, whose stub runs a copy of a block)."""
    return analysis.ok and not analysis.exit_path


def _at_exit(analysis: SiteAnalysis) -> bool:
    return analysis.exit is not None and not analysis.exit_early


def point_of(member: "Instance") -> int | None:
    """Where the action of ``member`` runs: before its exit instruction for the window of an exit,
    else at its address (None for a path exit: in the copy of its block)."""
    if member.analysis.exit_path:
        return None
    exit_insn = member.analysis.exit
    return exit_insn.address if exit_insn is not None and not member.analysis.exit_early else member.address


def _inside(window: SiteAnalysis, address: int) -> bool:
    """Whether ``address`` is an instruction boundary strictly inside ``window``."""
    return window.address < address < window.address + window.size and any(
        i.address == address for i in window.displaced
    )


def _mode32(proc: "ProbedProcess") -> bool:
    """A 32-bit (i386) process: shared stubs are x86-64 code, not built for it (its probes whose
    windows overlap are refused as before)."""
    return getattr(getattr(proc.process, "arch", None), "bits", 64) == 32


def host_for(proc: "ProbedProcess", address: int) -> "Instance | None":
    """The host instance whose window has ``address`` as an instruction boundary (not its first
    byte), if there is one and its stub can be shared."""
    if _mode32(proc):
        return None
    other = proc._overlapping(address, 1)
    if other is None:
        return None
    host = other.host or other
    if not _shares(host) or not _shareable(host.analysis) or not _inside(host.analysis, address) or address == point_of(host):
        return None
    return host


def shared(instance: "Instance") -> bool:
    """Whether ``instance`` is a host with guests or a guest."""
    return getattr(instance, "host", None) is not None or bool(getattr(instance, "guests", ()))  # traps have neither


class PlanWindows:
    """The shareable windows of a batch of registration plans (``[djp, analysis, ...]``),
    indexed by address: which planned window has an address strictly inside it."""

    def __init__(self, plans: Sequence[list]) -> None:
        windows = sorted((p[1] for p in plans if _shareable(p[1])), key=lambda a: a.address)
        self._starts = [w.address for w in windows]
        self._windows = windows

    def add(self, window: SiteAnalysis) -> None:
        """One more planned window (a short jump's, planned after the batch was indexed)."""
        i = bisect.bisect_left(self._starts, window.address)
        self._starts.insert(i, window.address)
        self._windows.insert(i, window)

    def around(self, address: int, exclude: SiteAnalysis | None = None) -> SiteAnalysis | None:
        """The planned window (not ``exclude``) with ``address`` as an inner instruction boundary."""
        i = bisect.bisect_left(self._starts, address) - 1
        while i >= 0 and self._starts[i] > address - MAX_WINDOW:
            window = self._windows[i]
            if window is not exclude and _inside(window, address):
                return window
            i -= 1
        return None


MAX_WINDOW = MAX_DISPLACED  # no window is longer (what an instance table entry can restore)


def order_plans(plans: list[list], windows: PlanWindows) -> None:
    """Sort registration plans (stably) so that a probe whose site lies inside the window of
    another planned probe comes after it (it joins that stub)."""
    plans.sort(key=lambda plan: plan[0]._preset is None and windows.around(plan[1].address, plan[1]) is not None)


def joins(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis, windows: PlanWindows) -> bool:
    """Whether the entry probe ``djp`` will join the stub of another probe: its site is inside the
    window of a placed probe or of another planned one."""
    if djp._preset is not None or djp.size is not None or not can_share(proc, djp) or _mode32(proc):
        return False
    return host_for(proc, analysis.address) is not None or windows.around(analysis.address, analysis) is not None


def guest_analysis(host: "Instance", address: int, site: str, exit=None) -> SiteAnalysis:
    """The analysis of a guest at ``address`` in the window of ``host``: the rest of the window
    (``exit``: the guest is the exit of a return probe, acting right before that instruction)."""
    window = host.analysis
    return dataclasses.replace(
        window,
        site=site,
        address=address,
        size=window.address + window.size - address,
        displaced=tuple(i for i in window.displaced if i.address >= address),
        at_entry=False,
        flags_dead=exit is not None,  # the ABI keeps no flags across a return or a call
        exit=exit,
        exit_early=False,
        exit_path=(),
        reason=f"inside the window of the probe at {window.address:#x}: shares its stub",
    )


def _rederived(host: "Instance", guest: "Instance") -> SiteAnalysis:
    """A guest's analysis after its host's window changed (a path exit keeps its own window)."""
    if guest.analysis.exit_path:
        return guest.analysis
    return guest_analysis(host, guest.address, guest.analysis.site,
                          guest.analysis.exit if _at_exit(guest.analysis) else None)


def insert_guest(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis, host: "Instance",
                 key: int | None = None) -> None:
    """Place ``djp`` (whose site is ``analysis``) at its address (or ``key``: an exit's
    instruction, a path exit's branch into its block) inside the window of ``host`` (world
    stopped)."""
    from .probes import Instance

    address, site = (analysis.address if key is None else key), analysis.site
    slot = host.region.take_slot()
    if slot is None:
        raise NoRoomError(f"{site}: no free slot in the probe area of the probe at {host.address:#x}", address=address)
    action, registers, lossless = proc._action_for(djp)
    exit_insn = analysis.exit if _at_exit(analysis) else None
    if analysis.exit_path:  # known by its branch into the block, the rest of its window
        own = dataclasses.replace(analysis, address=address, size=analysis.address + analysis.size - address)
    else:
        own = guest_analysis(host, address, site, exit_insn)
    guest = Instance(own, host.region, slot, host.stub, b"", b"", action, registers, lossless, host=host)
    host.guests += (guest,)
    proc._join(djp, guest, guest.analysis)
    try:
        rebuild(proc, host)
    except BaseException:
        host.guests = tuple(g for g in host.guests if g is not guest)
        djp._instance = None
        host.region.give_back(slot)
        raise
    proc._instances[address] = guest
    bisect.insort(proc._addresses, address)
    proc._by_slot[(proc._regions.index(host.region), slot)] = guest


def place_exit(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis, prepared: tuple | None) -> bool:
    """The exit window ``analysis`` of a return probe part ``djp`` overlaps a placed window: its
    exit instruction becomes a guest point of that window (grown to the exit instruction's end if
    it ends before it), so the entry probe and the exit share one stub (world stopped). Returns
    False (nothing changed) where that does not apply; raises the grown window's refusal."""
    from .sites import analyse_site

    if djp._preset is None or not _at_exit(analysis) or not can_share(proc, djp) or _mode32(proc):
        return False
    exit_insn = analysis.exit
    path = bool(analysis.exit_path)  # its block is copied into the stub; its window's branches lead there
    key = way_in(analysis) if path else exit_insn.address
    if key is None:
        return False
    other = proc._instances.get(analysis.address) or proc._overlapping(analysis.address, analysis.size)
    if other is None:
        return False
    host = other.host or other
    if not _shares(host) or not _shareable(host.analysis) or _at_exit(host.analysis) or analysis.address < host.address:
        return False
    if key in proc._instances or key == point_of(host) or key == host.address:
        return False
    end = max(host.address + host.size, analysis.address + analysis.size if path else exit_insn.end)
    window = host.analysis
    if end > host.address + host.size:  # grow the host's window to the end of the exit
        if end - host.address > MAX_WINDOW or window.padding:
            return False
        for address in proc._addresses:
            inst = proc._instances[address]
            if host.address <= address < end and inst is not host and inst.host is not host:
                return False
        window = analyse_site(proc.symbols, host.address, end - host.address, _Unpatched(proc.process.memory, [host]))
        if not window.ok:
            raise window.error()
        window = dataclasses.replace(window, site=host.analysis.site)
    boundaries = {i.address for i in window.displaced}
    if key not in boundaries or any(g.address not in boundaries for g in host.guests):
        return False
    if prepared is not None:
        prepared[0].give_back(prepared[1])
    before = (host.analysis, host.original, [g.analysis for g in host.guests])
    if window is not host.analysis:
        original = _Unpatched(proc.process.memory, [host]).read(host.address, window.size)
        host.analysis, host.original = window, original
        for guest in host.guests:
            guest.analysis = _rederived(host, guest)
    try:
        insert_guest(proc, djp, analysis, host, key)
    except BaseException:
        host.analysis, host.original = before[0], before[1]
        for guest, a in zip(host.guests, before[2]):
            guest.analysis = a
        raise
    return True


def join_member(proc: "ProbedProcess", djp: "Djprobe", member: "Instance", analysis: SiteAnalysis) -> None:
    """``djp`` joins ``member`` (a guest, or a host that has guests) at its address: its action
    is upgraded if it needs one it lacks (count to record) or is absent (an anchor)."""
    if member.drained and not member.removed:
        member.finish_drained()
    needs_stub = not member.probes or not member.serves(djp)
    if not member.serves(djp):
        member.registers = "all" if "all" in (djp.registers, member.registers if member.action == "record" else "args") else "args"
        member.lossless = djp.lossless or (member.lossless and member.action == "record")
        member.action = "record"
    if not member.probes:  # an anchor taking an action again: its own action starts from zero
        member.action, member.registers, member.lossless = proc._action_for(djp)
    proc._join(djp, member, analysis)
    if needs_stub:
        try:
            rebuild(proc, member.host or member)
        except BaseException:
            member.probes = tuple(p for p in member.probes if p is not djp)
            djp._instance = None
            raise


def remove_member(proc: "ProbedProcess", member: "Instance", departing: "Djprobe") -> None:
    """The last probe of ``member`` (a guest, or a host with guests) is leaving (world stopped)."""
    host = member.host or member
    if member.host is not None:  # a guest: its action leaves the host's stub
        host.guests = tuple(g for g in host.guests if g is not member)
        old = host.stub
        del proc._instances[member.address]
        proc._addresses.remove(member.address)
        if not host.guests and not host.probes:
            proc._remove_instance(host)  # the anchor goes with its last guest
        else:
            rebuild(proc, host, leaving=(member,))
        member.old_slots += ((member.region, member.slot, old),)
        member.removed = True
        member.drained = (departing,)
        departing._draining = member
        proc._give_back_or_retire(member, member.region, member.slot, old)
        return
    # a host with guests: it stays as an anchor, without an action of its own
    departing._draining = member
    member.drained += (departing,)
    rebuild(proc, host, leaving=(departing,))


def _points(proc: "ProbedProcess", host: "Instance", region, leaving: Sequence = (),
            host_slot: int | None = None) -> tuple[list[ActionPoint], list[PathPoint]]:
    """The actions of the members of ``host`` that have probes (not ``leaving``): points in the
    window, and path exits; the host's own counter in ``host_slot`` (its new stub's slot)."""
    points, paths = [], []
    for member in [host, *sorted(host.guests, key=lambda g: g.address)]:
        if not [p for p in member.probes if p not in leaving] or any(member is m for m in leaving):
            continue
        slot = host_slot if member is host and host_slot is not None else member.slot
        record = None
        if member.action == "record":
            proc._populate_rings(region)
            record = region.record_targets(slot, proc._thread_map.tid_offset, proc._wait_cycles(member.lossless))
            # locked records; the rseq offset only to tell a vfork child (djprobe.vforks): counted apart
            record = dataclasses.replace(record, rseq_offset=proc._rseq_offset())
        if member.analysis.exit_path:
            paths.append(PathPoint(member.analysis, region.counter_address(slot), record, member.registers))
            continue
        points.append(ActionPoint(
            address=point_of(member),
            counter=region.counter_address(slot),
            record=record,
            registers=member.registers,
            flags_dead=(member is host and host.analysis.flags_dead) or _at_exit(member.analysis),
        ))
    return points, paths


def rebuild(proc: "ProbedProcess", host: "Instance", leaving: Sequence = ()) -> None:
    """Give ``host`` a new shared stub with the actions of its members (world stopped): write it
    into a new slot, point the jump at it, move the threads, retire the old slot."""
    region = host.region
    slot = region.take_slot()
    if slot is None:
        raise NoRoomError(f"{host.analysis.site}: no free slot for the shared stub", address=host.address)
    # The host's own counter moves with its stub slot; a guest's counter stays in its slot.
    old_slot = host.slot
    try:
        points, paths = _points(proc, host, region, leaving, host_slot=slot)
        stub = build_shared_stub(host.analysis, region.layout, region.slot_address(slot), points,
                                 proc._rseq_offset(), paths)
    except StubTooLargeError as exc:
        region.give_back(slot)
        raise NoRoomError(f"{host.analysis.site}: {exc}", address=host.address) from exc
    except (RelocationError, ValueError) as exc:
        region.give_back(slot)
        raise SiteBusyError(f"{host.analysis.site}: cannot build the shared stub: {exc}", address=host.address) from exc
    except BaseException:
        region.give_back(slot)
        raise
    proc.process.write(stub.address, stub.code)
    short = host.springboard is not None  # a short jump: its rel8 stays, the springboard moves
    patched = host.patched[:SHORT_JUMP_SIZE] if short else jump_bytes(host.address, stub.address)
    entry = region.view.entry(old_slot)
    entry.stub_address = stub.address
    entry.size, entry.original = host.size, host.original  # a window grown to an exit's end
    entry.patched = patched + host.original[len(patched):]
    entry.state = InstanceState.INSERTED
    region.view.set_entry(slot, entry)
    springboards.patch_for(proc, host, stub)
    old_stub = host.stub
    proc._move_threads_out_of_stub(old_stub, onto=stub)
    host.old_slots += ((region, old_slot, old_stub),)
    host.slot, host.stub, host.patched = slot, stub, entry.patched
    for guest in host.guests:
        guest.stub = stub
    proc._by_slot[(proc._regions.index(region), slot)] = host
    proc._give_back_or_retire(host, region, old_slot, old_stub)


def forget_member(proc: "ProbedProcess", instance: "Instance") -> None:
    """``instance`` (a guest, or a host with guests) lost its last probe in a target that exited
    or exec'd: drop it, and its anchor if nothing else holds it (nothing to write back)."""
    host = instance.host
    if host is not None:
        host.guests = tuple(g for g in host.guests if g is not instance)
        if proc._instances.get(instance.address) is instance:
            del proc._instances[instance.address]
            proc._addresses.remove(instance.address)
        instance = host
    if not instance.probes and not instance.guests and proc._instances.get(instance.address) is instance:
        del proc._instances[instance.address]
        proc._addresses.remove(instance.address)


class _Unpatched:
    """Target memory as it would read without our own patches (for analysing a window that
    covers a placed probe's jump)."""

    def __init__(self, memory, patches: Sequence["Instance"]) -> None:
        self._memory = memory
        self._patches = patches

    def read(self, address: int, size: int) -> bytes:
        data = bytearray(self._memory.read(address, size))
        for inst in self._patches:
            lo, hi = max(address, inst.address), min(address + size, inst.address + len(inst.original))
            if lo < hi:
                data[lo - address:hi - address] = inst.original[lo - inst.address:hi - inst.address]
        return bytes(data)


def unpatched_memory(proc: "ProbedProcess", start: int, end: int):
    """The target's memory as read without our own jumps in [start, end) (the memory itself if
    there are none): for analysing sites next to or over our probes."""
    lo = bisect.bisect_left(proc._addresses, start - MAX_WINDOW)
    hi = bisect.bisect_left(proc._addresses, end)
    near = [proc._instances[a] for a in proc._addresses[lo:hi]]
    near = [i for i in near if i.original and i.address + len(i.original) > start]
    return _Unpatched(proc.process.memory, near) if near else proc.process.memory


def unpatched_analysis(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis) -> SiteAnalysis | None:
    """For an entry probe refused because its window covers the jump of one of our probes: the
    analysis of that window as if our jump were not there (``reanchor`` then merges the two), or
    None."""
    if djp._preset is not None or djp.size is not None or not analysis.busy:
        return None
    from .sites import analyse_site

    memory = unpatched_memory(proc, analysis.address, analysis.address + MAX_WINDOW)
    if memory is proc.process.memory:
        return None
    again = analyse_site(proc.symbols, analysis.address, None, memory)
    return dataclasses.replace(again, site=analysis.site) if again.ok else None


def reanchor(proc: "ProbedProcess", djp: "Djprobe", analysis: SiteAnalysis, other: "Instance",
             prepared: tuple | None) -> bool:
    """``djp``'s window (``analysis``, placed before ``other``'s host) covers the jump of a placed
    probe: make one window from ``djp``'s site to the end of both, owned by a new host, with the
    old host and its guests as its guests (world stopped). Returns False (nothing changed) if the
    windows cannot be merged that way; raises the merged window's refusal if it is refused."""
    from .probes import Instance
    from .sites import analyse_site

    old = other.host or other
    start = analysis.address
    if djp._preset is not None or djp.size is not None or not _shareable(analysis) or not old.analysis.ok \
            or _mode32(proc):
        return False
    if not _shares(old) or not can_share(proc, djp):
        return False
    old_path = bool(old.analysis.exit_path)  # a path exit: its window's branches lead to a copied block
    old_exit = old.analysis.exit if _at_exit(old.analysis) and not old_path else None
    if not (start < old.address or (start == old.address and (old_exit is not None or old_path))):
        return False
    if old.address not in {i.address for i in analysis.displaced} | {analysis.address + analysis.size}:
        return False
    old_address, old_end = old.address, old.address + old.size
    old_original = old.original
    # an exit window's padding (never run) is not taken into the merged window: written back below
    end = max(start + analysis.size, old_exit.end if old_exit is not None else old_end)
    if end - start > MAX_WINDOW:
        return False
    for address in proc._addresses:  # nothing else may lie in the merged window
        inst = proc._instances[address]
        if start <= address < end and inst is not old and inst.host is not old:
            return False
    merged = analyse_site(proc.symbols, start, end - start, _Unpatched(proc.process.memory, [old]))
    if not merged.ok:
        raise merged.error()
    merged = dataclasses.replace(merged, site=analysis.site)
    boundaries = {i.address for i in merged.displaced}
    old_point = way_in(old.analysis) if old_path else point_of(old)
    if old_point is None or old_point == start:
        return False
    if old_point not in boundaries or any(g.address not in boundaries for g in old.guests):
        return False
    if old_point != old_address and old_point in proc._instances:
        return False
    blocker = proc._return_into(start, end)
    if blocker:
        raise SiteBusyError(f"{analysis.site}: {blocker}", address=start)
    if prepared is not None:
        prepared[0].give_back(prepared[1])
    region = old.region
    host_slot, old_slot_new = region.take_slot(), region.take_slot()
    if host_slot is None or old_slot_new is None:
        for s in (host_slot, old_slot_new):
            if s is not None:
                region.give_back(s)
        raise NoRoomError(f"{analysis.site}: no free slot for the merged window", address=start)
    original = _Unpatched(proc.process.memory, [old]).read(start, end - start)
    action, registers, lossless = proc._action_for(djp)
    host = Instance(merged, region, host_slot, old.stub, original, b"", action, registers, lossless)
    # The old host becomes a guest with a fresh counter slot; its old slot (stub and counts) is
    # kept among its old slots until no thread can be in that stub.
    old_stub, old_slot = old.stub, old.slot
    analyses = {id(m): m.analysis for m in (old, *old.guests)}
    old.old_slots += ((region, old_slot, old_stub),)
    old.slot = old_slot_new
    old.host = host
    if old_path:
        old.analysis = dataclasses.replace(old.analysis, address=old_point, size=old_end - old_point)
    else:
        old.analysis = guest_analysis(host, old_point, old.analysis.site, old_exit)
    host.guests = (old, *old.guests)
    for guest in old.guests:
        guest.host = host
        guest.analysis = _rederived(host, guest)
    old.guests = ()
    proc._join(djp, host, merged)
    try:
        points, paths = _points(proc, host, region)
        stub = build_shared_stub(merged, region.layout, region.slot_address(host_slot), points, proc._rseq_offset(), paths)
    except BaseException as exc:  # undo: the old host is as it was
        host.probes = tuple(p for p in host.probes if p is not djp)
        djp._instance = None
        old.guests = tuple(g for g in host.guests if g is not old)
        for member in (old, *old.guests):
            member.host = old if member is not old else None
            member.analysis = analyses[id(member)]
        old.slot = old_slot
        old.old_slots = old.old_slots[:-1]
        region.give_back(host_slot)
        region.give_back(old_slot_new)
        if isinstance(exc, StubTooLargeError):
            raise NoRoomError(f"{analysis.site}: {exc}", address=start) from exc
        raise
    proc.process.write(stub.address, stub.code)
    patched = jump_bytes(start, stub.address) + original[5:]
    entry = InstanceEntry(address=start, stub_address=stub.address, state=InstanceState.PREPARED,
                          size=merged.size, original=original, patched=patched, name=merged.site[:48])
    region.view.set_entry(host_slot, entry)
    proc._move_threads_into_stub(merged, stub)
    proc.process.write(start, patched)
    if old_end > end:  # the rest of the old exit window (its padding) gets its bytes back
        proc.process.write(end, old_original[end - old_address:])
    entry.state = InstanceState.INSERTED
    region.view.set_entry(host_slot, entry)
    host.stub, host.patched = stub, patched
    proc._move_threads_out_of_stub(old_stub, onto=stub)
    for guest in host.guests:
        guest.stub = stub
    old.original = old.patched = b""
    if old_point != old_address:  # an exit: the guest is known by its exit instruction
        if proc._instances.get(old_address) is old:
            del proc._instances[old_address]
            proc._addresses.remove(old_address)
        proc._instances[old_point] = old
        bisect.insort(proc._addresses, old_point)
    index = proc._regions.index(region)
    proc._by_slot[(index, host_slot)] = host
    proc._by_slot[(index, old_slot_new)] = old
    proc._instances[start] = host
    bisect.insort(proc._addresses, start)
    proc._give_back_or_retire(old, region, old_slot, old_stub)
    return True
