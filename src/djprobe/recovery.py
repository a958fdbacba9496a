"""Recovery: find the probe areas a (possibly dead) tracer left in a process, report them, and
remove every jump they serve (design Guarantee 5).

A probe area is a pair of adjacent mappings (see :mod:`djprobe.area`): an anonymous r-x code part
followed by a shared data part mapped from an unlinked ``/dev/shm/djprobe-TARGET-TRACER-xxxx`` file. The
data part starts with a header and an instance table that records, for every patched site, the
original and patched bytes. Everything in there is *target-controlled* data: the target (or a
stray write) may have changed it, so nothing is trusted blindly:

* the header must carry the magic and version, describe a sane layout whose sizes match the
  mappings actually present, and record ``data_address`` equal to where it is mapped;
* an entry must name a site inside an executable file-backed mapping (or the vDSO), a stub in
  its own slot, and patched bytes that are exactly the ``jmp`` to that stub followed by the
  original tail;
* before writing, the recorded original bytes must equal the bytes of the ELF file on disk (the
  mapped file; for the vDSO, the kernel's image) at that address, and the bytes in memory must
  be the recorded patched ones (or ``force``). Nothing else is ever written into the target's
  code.

Then the areas themselves are unmapped, but only when no thread is in a stub or holds a stub
address on its stack; otherwise the area stays mapped (harmless: nothing jumps there any more).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import area as _area
from . import orphan_short
from ._sys.procfs import MapEntry, ProcessMemory, find_mapping, read_maps
from .area import ENTRY_SIZE, HEADER_SIZE, MAX_DISPLACED, AreaHeader, AreaLayout, InstanceState
from .errors import DjprobeError, ProcessGoneError, TargetFaultError
from .process import Process
from .stacks import StackWords
from .stubs32 import jump_bytes32
from .stubs import jump_bytes, jump_target
from .shmfiles import AREA_PATH_RE as _AREA_PATH_RE
from .symbols import Symbols

__all__ = ["FoundArea", "FoundInstance", "CleanupReport", "find_areas", "status", "cleanup", "AREA_PATH_RE"]

#: The data part of a probe area as /proc/PID/maps shows it (procfs strips " (deleted)"); the
#: names are made and parsed by :mod:`djprobe.shmfiles`.
AREA_PATH_RE = _AREA_PATH_RE

#: How often cleanup lets the world run for a moment so that threads leave stubs by themselves.
SETTLE_TRIES = 20

_STATE_NAMES = {int(s): s.name for s in InstanceState}


@dataclass
class FoundInstance:
    """One non-free entry of an instance table, checked against the target."""

    index: int
    address: int
    stub_address: int
    size: int
    state: str  # PREPARED, INSERTED, RETIRED, or "0x.." for a value we do not know
    original: bytes
    patched: bytes
    name: str  # the name hint the tracer stored
    site: str = ""  # module:symbol+off, from the target's symbols
    hits: int = 0
    code: str = "?"  # what the site holds now: "patched", "original", "other", "unreadable"
    problem: str | None = None  # why this entry is not trusted (None: valid)
    kind: int = 0  # 0: a jmp rel32 at the site; ENTRY_SHORT: a jmp rel8 to a springboard
    springboard: int | None = None  # for a short jump: where its rel8 leads (a jmp rel32 in padding)

    @property
    def valid(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "address": self.address,
            "site": self.site,
            "name": self.name,
            "size": self.size,
            "state": self.state,
            "code": self.code,
            "hits": self.hits,
            "stub": self.stub_address,
            "original": self.original.hex(),
            "patched": self.patched.hex(),
            "valid": self.valid,
            "problem": self.problem,
            **({"springboard": self.springboard} if self.springboard is not None else {}),
        }


@dataclass
class FoundArea:
    """A probe area found in a process (valid or not: see ``problem``)."""

    pid: int
    path: str
    data_address: int
    data_end: int
    inode: int
    dev: str
    code_address: int = 0
    code_size: int = 0
    data_size: int = 0
    layout: AreaLayout | None = None
    tracer_pid: int = 0
    target_pid: int = 0
    tracer_alive: bool = False
    code_mapped: bool = False
    instances: list[FoundInstance] = field(default_factory=list)
    orphans: list["OrphanJump"] = field(default_factory=list)  # jumps here with no table entry
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    def slot_start(self, address: int) -> bool:
        """Whether ``address`` is the start of a stub slot of this area's code part."""
        return (
            self.layout is not None
            and self.code_address <= address < self.code_end
            and (address - self.code_address) % self.layout.slot_size == 0
        )

    @property
    def code_end(self) -> int:
        return self.code_address + self.code_size

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "data_address": self.data_address,
            "data_size": self.data_size or self.data_end - self.data_address,
            "code_address": self.code_address,
            "code_size": self.code_size,
            "code_mapped": self.code_mapped,
            "tracer_pid": self.tracer_pid,
            "tracer_alive": self.tracer_alive,
            "target_pid": self.target_pid,
            "valid": self.valid,
            "problem": self.problem,
            "instances": [i.to_json() for i in self.instances],
            "orphans": [o.to_json() for o in self.orphans],
        }


@dataclass
class OrphanJump:
    """A ``jmp`` into a stub slot of an area found in the code (memory differs from the file)
    that no table entry accounts for: e.g. in a child forked while probed, after the parent's
    tracer freed the (shared) entry. Its original bytes are the file's."""

    address: int
    target: int
    original: bytes
    site: str = ""

    def to_json(self) -> dict:
        return {"address": self.address, "target": self.target, "site": self.site, "original": self.original.hex()}


# -- finding areas --------------------------------------------------------------------------------
def _is_area_mapping(m: MapEntry) -> bool:
    return bool(AREA_PATH_RE.match(m.path))


def _parse_header(raw: bytes, mapping: MapEntry) -> AreaHeader:
    """The header, checked against where it is mapped; ValueError with the reason if it
    cannot be trusted."""
    header = AreaHeader.unpack(raw)
    layout = header.layout
    if header.data_address != mapping.start:
        raise ValueError(
            f"header data_address {header.data_address:#x} is not where it is mapped ({mapping.start:#x})"
        )
    if mapping.end - mapping.start != layout.data_size or mapping.offset != 0:
        raise ValueError(
            f"mapping {mapping.start:#x}-{mapping.end:#x} (offset {mapping.offset:#x}) does not match "
            f"the data size {layout.data_size:#x}"
        )
    if header.code_address != mapping.start - layout.code_size:
        raise ValueError(f"header code_address {header.code_address:#x} is not just below the data part")
    return header


def _tracer_alive(tracer_pid: int, mapping: MapEntry) -> bool:
    """Whether ``tracer_pid`` is a live process that maps the same area file (not a reused pid)."""
    if tracer_pid <= 0:
        return False
    try:
        with open(f"/proc/{tracer_pid}/stat") as f:
            stat = f.read()
        if stat[stat.rfind(")") + 2 :][:1] in ("Z", "X"):
            return False
        maps = read_maps(tracer_pid)
    except (ProcessGoneError, FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, DjprobeError):
        return True  # it exists but we cannot look: assume it still uses the area
    return any(m.inode == mapping.inode and m.dev == mapping.dev and _is_area_mapping(m) for m in maps)


def _probeable_code(m: MapEntry) -> bool:
    """Code a probe may patch: an executable mapping of an ELF file, or the vDSO (whose
    reference bytes are the kernel's image, see ``symbols._vdso_reference``)."""
    if not m.executable or _is_area_mapping(m):
        return False
    return bool(m.is_file and m.inode) or m.path == "[vdso]"


def _code_state(memory: ProcessMemory, inst: FoundInstance) -> str:
    try:
        now = memory.read(inst.address, inst.size)
    except TargetFaultError:
        return "unreadable"
    if now == inst.patched:
        return "patched"
    if now == inst.original:
        return "original"
    return "other"


def _check_entry(inst: FoundInstance, area: FoundArea, maps: list[MapEntry], raw_state: int) -> str | None:
    assert area.layout is not None
    if raw_state not in _STATE_NAMES:
        return f"unknown state {raw_state}"
    if inst.kind == _area.ENTRY_SHORT:
        return _check_short_entry(inst, area, maps)
    if inst.kind != 0:
        return f"unknown kind {inst.kind}"
    problem, _ = _check_window(inst, area, maps, 5)
    if problem is not None:
        return problem
    try:
        jump = jump_bytes(inst.address, inst.stub_address)
    except ValueError:
        jump = jump_bytes32(inst.address, inst.stub_address)  # an i386 process: a rel32 wraps its 4 GiB
        if inst.address >> 32 or inst.stub_address >> 32:
            return f"stub {inst.stub_address:#x} is out of reach of {inst.address:#x}"
    if inst.patched[:5] != jump or inst.patched[5:] != inst.original[5:]:
        return "recorded patched bytes are not the jump to its stub followed by the original bytes"
    return None


def _check_window(inst: FoundInstance, area: FoundArea, maps: list[MapEntry], smallest: int) -> tuple[str | None, MapEntry | None]:
    """The checks every entry's window passes (at least ``smallest`` bytes, in probeable code,
    inside one mapping, its stub in its own slot): (the problem or None, the site's mapping)."""
    assert area.layout is not None
    if not smallest <= inst.size <= MAX_DISPLACED:
        return f"size {inst.size} is out of bounds", None
    m = find_mapping(maps, inst.address)
    if m is None or not _probeable_code(m):
        return f"{inst.address:#x} is not in an executable file-backed mapping (or the vDSO)", None
    if inst.address + inst.size > m.end:
        return f"{inst.address:#x}+{inst.size} crosses the end of its mapping", m
    slot = area.layout.slot_address(area.code_address, inst.index)
    if inst.stub_address != slot:
        return f"stub address {inst.stub_address:#x} is not slot {inst.index} ({slot:#x})", m
    return None, m


def _check_short_entry(inst: FoundInstance, area: FoundArea, maps: list[MapEntry]) -> str | None:
    """The checks of a short-jump entry (``springboards.py``): a window of 2 or more bytes in
    probeable code whose patched bytes are ``EB rel8`` and the original tail, the rel8 landing
    outside the window, its 5 springboard bytes in the same mapping; the stub in its own slot."""
    problem, m = _check_window(inst, area, maps, 2)
    if problem is not None:
        return problem
    assert m is not None
    if inst.patched[:1] != b"\xeb" or inst.patched[2:] != inst.original[2:]:
        return "recorded patched bytes are not a jmp rel8 followed by the original bytes"
    sb = inst.address + 2 + int.from_bytes(inst.patched[1:2], "little", signed=True)
    if sb < inst.address + inst.size and inst.address < sb + 5:
        return f"the springboard {sb:#x} overlaps the window"
    if not (m.start <= sb and sb + 5 <= m.end):
        return f"the springboard {sb:#x} is not in the site's mapping"
    inst.springboard = sb
    return None


def _restore_springboard(process: Process, symbols: Symbols, inst: FoundInstance,
                         areas: list[FoundArea]) -> str | None:
    """Put the padding bytes back at the springboard of a short-jump entry once its site holds
    its original bytes; a thread standing at the springboard goes on at the stub it leads to.
    None if done or nothing to do, else why it stays (then it is left in place: the rel8 may
    still need it)."""
    sb = inst.springboard
    assert sb is not None
    memory = process.memory
    try:
        site = memory.read(inst.address, inst.size)
        now = memory.read(sb, 5)
    except TargetFaultError as exc:
        return f"cannot read the springboard at {sb:#x}: {exc}"
    module = symbols.module_at(sb)
    if module is None:
        return f"no ELF module is mapped at the springboard {sb:#x}"
    try:
        file_bytes = module.read_file(sb, 5)
    except (DjprobeError, OSError) as exc:
        return f"cannot read the file bytes at the springboard {sb:#x}: {exc}"
    if now == file_bytes:
        return None
    target = jump_target(now, sb)
    if target is None or not any(a.slot_start(target) for a in areas):
        return None  # not ours (any more): nothing of ours to undo
    if site != inst.original:
        return f"the springboard at {sb:#x} stays: its site {inst.address:#x} still holds {site.hex()}"
    if any(b not in (0x90, 0xCC) for b in file_bytes) and not _all_nops(file_bytes, sb):
        return f"the file's bytes at the springboard {sb:#x} ({file_bytes.hex()}) are not padding; left alone"
    for thread in process.threads.values():
        if thread.gone:
            continue
        regs = thread.regs()
        if sb <= regs.rip < sb + 5:
            regs = regs.copy()
            regs.rip = target
            thread.set_regs(regs)
    memory.write(sb, file_bytes)
    return None


def _all_nops(code: bytes, at: int) -> bool:
    """Whether ``code`` (maybe cut inside its last instruction) is made of nops and int3."""
    from iced_x86 import Decoder, Mnemonic

    dec = Decoder(64, code, ip=at)
    for ins in dec:
        if ins.mnemonic not in (Mnemonic.NOP, Mnemonic.INT3) and not (ins.is_invalid and ins.ip + ins.len > at + len(code)):
            return False
    return True


def _rel8_into(memory: ProcessMemory, module, address: int) -> bool:
    """Whether a patched ``jmp rel8`` (not in the file) lands at ``address``: the jmp rel32 there
    is then a springboard whose site was not undone, and must stay."""
    lo = max(address - 129, 0)
    try:
        now = memory.read(lo, address + 126 - lo)
        disk = module.read_file(lo, address + 126 - lo)
    except (DjprobeError, OSError):
        return True  # cannot tell: keep it
    for p in range(len(now) - 1):
        if now[p] == 0xEB and now[p:p + 2] != disk[p:p + 2] and \
                lo + p + 2 + int.from_bytes(now[p + 1:p + 2], "little", signed=True) == address:
            return True
    return False


def _read_area(pid: int, memory: ProcessMemory, m: MapEntry, maps: list[MapEntry]) -> FoundArea:
    area = FoundArea(pid=pid, path=m.path, data_address=m.start, data_end=m.end, inode=m.inode, dev=m.dev)
    if not m.readable or m.perms[3] != "s":
        area.problem = f"mapping {m.start:#x}-{m.end:#x} is {m.perms}, not a shared readable mapping"
        return area
    if m.end - m.start < HEADER_SIZE:
        area.problem = "mapping too small for a header"
        return area
    try:
        raw = memory.read(m.start, HEADER_SIZE)
        header = _parse_header(raw, m)
    except (ValueError, struct.error, TargetFaultError) as exc:
        area.problem = str(exc)
        return area
    layout = header.layout
    area.layout = layout
    area.code_address = header.code_address
    area.code_size = layout.code_size
    area.data_size = layout.data_size
    area.tracer_pid = header.tracer_pid
    area.target_pid = header.target_pid
    area.tracer_alive = _tracer_alive(area.tracer_pid, m)
    code = find_mapping(maps, area.code_address)
    area.code_mapped = (
        code is not None
        and code.end >= area.code_end
        and code.executable
        and not code.writable
        and not code.is_file
        and code.inode == 0
    )
    try:
        table = memory.read(m.start + layout.table_offset, layout.max_instances * ENTRY_SIZE)
        counters = np.frombuffer(
            memory.read(m.start + layout.counters_offset, layout.n_shards * layout.shard_stride), dtype=np.uint64
        ).reshape(layout.n_shards, layout.max_instances)
    except TargetFaultError as exc:
        area.problem = f"cannot read the instance table: {exc}"
        return area
    hits = counters.sum(axis=0, dtype=np.uint64)
    for i in range(layout.max_instances):
        off = i * ENTRY_SIZE
        address, stub, state, size, _action, kind, orig, patched, _gen, name = _area._ENTRY.unpack_from(table, off)
        if state == InstanceState.FREE:
            continue
        n = min(size, MAX_DISPLACED)
        inst = FoundInstance(
            index=i,
            address=address,
            stub_address=stub,
            size=size,
            state=_STATE_NAMES.get(state, f"{state:#x}"),
            original=orig[:n],
            patched=patched[:n],
            name=name.rstrip(b"\0").decode(errors="replace"),
            hits=int(hits[i]),
            kind=kind,
        )
        inst.problem = _check_entry(inst, area, maps, state)
        if inst.valid:
            inst.code = _code_state(memory, inst)
        area.instances.append(inst)
    return area


def find_areas(pid: int, memory: ProcessMemory | None = None) -> list[FoundArea]:
    """Every probe area mapped in process ``pid``, each with its instance table checked.

    Raises ProcessGoneError, TracePermissionError.
    """
    maps = read_maps(pid)
    candidates = [m for m in maps if _is_area_mapping(m)]
    if not candidates:
        return []
    own = memory is None
    mem = memory or ProcessMemory(pid)
    try:
        return [_read_area(pid, mem, m, maps) for m in candidates]
    finally:
        if own:
            mem.close()


def _describe_sites(pid: int, areas: list[FoundArea], memory: ProcessMemory | None = None) -> None:
    if not any(a.instances for a in areas):
        return
    try:
        symbols = Symbols.from_process(pid, memory)
    except DjprobeError:
        return
    try:
        for a in areas:
            for inst in a.instances:
                inst.site = symbols.describe(inst.address)
    finally:
        symbols.close()


def changed_code(
    memory: ProcessMemory, maps: list[MapEntry], symbols: Symbols, min_size: int
) -> Iterator[tuple[int, bytes, bytes, np.ndarray]]:
    """Each executable range of probeable code (at least ``min_size`` bytes) that differs from
    its file: ``(start, bytes now, bytes in the file, offsets of the differing bytes)``.
    Ranges that cannot be read are skipped."""
    for m in maps:
        if not _probeable_code(m):
            continue
        module = symbols.module_at(m.start)
        if module is None:
            continue
        for lo, hi in module.executable_ranges():
            lo, hi = max(lo, m.start), min(hi, m.end)
            if hi - lo < min_size:
                continue
            try:
                now = memory.read(lo, hi - lo)
                disk = module.read_file(lo, hi - lo)
            except (DjprobeError, OSError):
                continue
            diff = np.flatnonzero(np.frombuffer(now, dtype=np.uint8) != np.frombuffer(disk, dtype=np.uint8))
            if len(diff):
                yield lo, now, disk, diff


def find_orphans(
    memory: ProcessMemory,
    maps: list[MapEntry],
    symbols: Symbols,
    areas: list[FoundArea],
    known: set[int] | None = None,
) -> list[tuple[FoundArea, OrphanJump]]:
    """Jumps into a stub slot of one of ``areas`` that are not the ``patched`` bytes of one of
    their valid table entries (or of ``known``): found by comparing every executable
    file-backed mapping with its file. Only 5-byte ``jmp rel32`` whose target is a slot start,
    and whose differing bytes all lie within those 5, count."""
    if known is None:
        known = {i.address for a in areas for i in a.instances if i.valid and i.code == "patched"}
    live = [a for a in areas if a.valid and a.layout is not None]
    if not live:
        return []
    found: list[tuple[FoundArea, OrphanJump]] = []
    for lo, now, disk, diff in changed_code(memory, maps, symbols, 5):
        starts = sorted({int(p) for d in diff for p in range(max(0, d - 4), d + 1) if now[p] == 0xE9})
        claimed_end = -1
        for p in starts:
            if p < claimed_end or p + 5 > len(now) or lo + p in known:
                continue
            target = lo + p + 5 + int.from_bytes(now[p + 1 : p + 5], "little", signed=True)
            owner = next((a for a in live if a.slot_start(target)), None)
            if owner is None:
                continue
            near = diff[(diff >= p - 8) & (diff < p + 13)]
            if not all(p <= d < p + 5 for d in near.tolist()):
                continue  # other changes around: not just our jump
            found.append((owner, OrphanJump(lo + p, target, disk[p : p + 5], symbols.describe(lo + p))))
            claimed_end = p + 5
    return found


def status(pid: int) -> list[FoundArea]:
    """The probe areas of ``pid`` with their instances, named sites and hit counts, and any
    orphan jumps into them."""
    maps = read_maps(pid)
    with ProcessMemory(pid) as memory:
        areas = find_areas(pid, memory)
        if not areas:
            return areas
        try:
            symbols = Symbols.from_process(pid, memory)
        except DjprobeError:
            return areas
        try:
            for a in areas:
                for inst in a.instances:
                    inst.site = symbols.describe(inst.address)
            for owner, orphan in find_orphans(memory, maps, symbols, areas):
                owner.orphans.append(orphan)
        finally:
            symbols.close()
    return areas


# -- cleanup -------------------------------------------------------------------------------------
@dataclass
class CleanupReport:
    pid: int
    areas: list[FoundArea] = field(default_factory=list)
    restored: list[FoundInstance] = field(default_factory=list)  # jump removed now
    untouched: list[FoundInstance] = field(default_factory=list)  # nothing to do (already original)
    skipped: list[tuple[FoundInstance, str]] = field(default_factory=list)  # jump left in, with why
    refused_areas: list[tuple[FoundArea, str]] = field(default_factory=list)  # not touched at all
    unmapped: list[FoundArea] = field(default_factory=list)
    left_mapped: list[tuple[FoundArea, str]] = field(default_factory=list)  # jumps removed, area kept
    waited_out: int = 0  # threads that were inside a stub and left it by themselves
    orphans: list[OrphanJump] = field(default_factory=list)  # jumps without a table entry, removed
    closed_fds: list[int] = field(default_factory=list)  # the target's fds of area files a killed tracer left open

    @property
    def ok(self) -> bool:
        """No jump was left in place."""
        return not self.skipped and not self.refused_areas

    def to_json(self) -> dict:
        def inst(i: FoundInstance) -> dict:
            return {"address": i.address, "site": i.site, "size": i.size, "state": i.state}

        return {
            "pid": self.pid,
            "areas": len(self.areas),
            "restored": [inst(i) for i in self.restored],
            "untouched": [inst(i) for i in self.untouched],
            "skipped": [dict(inst(i), reason=r) for i, r in self.skipped],
            "refused_areas": [{"path": a.path, "data_address": a.data_address, "reason": r} for a, r in self.refused_areas],
            "unmapped": [{"path": a.path, "code_address": a.code_address, "data_address": a.data_address} for a in self.unmapped],
            "left_mapped": [{"path": a.path, "data_address": a.data_address, "reason": r} for a, r in self.left_mapped],
            "threads_waited_out": self.waited_out,
            "orphans": [o.to_json() for o in self.orphans],
            "closed_fds": self.closed_fds,
            "ok": self.ok,
        }


def _leaked_area_fds(pid: int) -> list[int]:
    """The target's fds open on probe-area files made for it (``djprobe-PID-...``)."""
    fds = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        m = AREA_PATH_RE.match(link.removesuffix(" (deleted)"))
        if m is not None and int(m.group(1)) == pid:
            fds.append(int(name))
    return sorted(fds)


def _select(report: CleanupReport, areas: list[FoundArea], force: bool) -> list[FoundArea]:
    chosen = []
    for a in areas:
        if not a.valid:
            report.refused_areas.append((a, f"not a valid probe area: {a.problem}"))
        elif a.tracer_alive and not force:
            report.refused_areas.append(
                (a, f"its tracer (PID {a.tracer_pid}) is alive and still uses it; use --force to clean up anyway")
            )
        else:
            chosen.append(a)
    return chosen


def _placed_others(memory: ProcessMemory, inst: FoundInstance, areas: list[FoundArea], lo: int, hi: int):
    """The other valid entries whose window overlaps [lo, hi) and whose patched bytes are in
    place at their own site."""
    for area in areas:
        for other in area.instances:
            if other is inst or not other.valid or not (other.address < hi and lo < other.address + other.size):
                continue
            try:
                if memory.read(other.address, other.size) == other.patched:
                    yield other
            except TargetFaultError:
                continue


def _inside_placed_window(memory: ProcessMemory, inst: FoundInstance, areas: list[FoundArea]) -> bool:
    """Whether ``inst``'s site lies inside the window of another valid entry whose jump is in
    place (a window that took it over: see ``overlaps.py``, re-anchoring)."""
    return next(_placed_others(memory, inst, areas, inst.address, inst.address + 1), None) is not None


def _others_in_place(memory: ProcessMemory, inst: FoundInstance, areas: list[FoundArea], now: bytes) -> bool:
    """Whether ``now`` (the bytes at ``inst``'s window) is its original bytes with the jumps of
    other valid entries, each in place at its own site, over parts of them. This is a window the
    tracer recorded (PREPARED) but died before writing, while re-anchoring a window over the
    probes it was to take in (see ``overlaps.py``): the old jumps are still there, and restoring
    each of those entries leaves the original bytes."""
    expected = bytearray(inst.original)
    covered = False
    end = inst.address + inst.size
    for other in _placed_others(memory, inst, areas, inst.address, end):
        lo, hi = max(inst.address, other.address), min(end, other.address + other.size)
        expected[lo - inst.address : hi - inst.address] = other.patched[lo - other.address : hi - other.address]
        covered = True
    return covered and bytes(expected) == now


def _restore(
    process: Process, symbols: Symbols, inst: FoundInstance, force: bool, areas: list[FoundArea]
) -> str | None:
    """Put the original bytes back at one site; None if done, "" if there is nothing to do, else
    why not."""
    memory = process.memory
    try:
        now = memory.read(inst.address, inst.size)
    except TargetFaultError as exc:
        return f"cannot read the site: {exc}"
    if now == inst.original:
        return ""  # nothing to do
    target = jump_target(now, inst.address)
    if now != inst.patched and target is not None and any(a.code_mapped and a.code_address <= target < a.code_end for a in areas):
        return ""  # a stale entry: the site belongs to a later probe now (its own area's entry)
    if now != inst.patched and _inside_placed_window(memory, inst, areas):
        return ""  # a stale entry: its bytes belong to the window of a probe sharing a stub now
    if now != inst.patched and _others_in_place(memory, inst, areas, now):
        return ""  # a window never written: its old occupants' jumps are still there, theirs to undo
    if now != inst.patched and not force:
        return (
            f"bytes at the site ({now.hex()}) are neither the recorded patched ({inst.patched.hex()}) "
            "nor the original bytes; use --force to restore the original anyway"
        )
    module = symbols.module_at(inst.address)
    if module is None:
        return "no ELF module is mapped at the site"
    try:
        file_bytes = module.read_file(inst.address, inst.size)
    except (DjprobeError, OSError) as exc:
        return f"cannot read the file bytes: {exc}"
    if file_bytes != inst.original:
        return (
            f"recorded original bytes ({inst.original.hex()}) differ from {module.path} ({file_bytes.hex()}); "
            "refusing to write them"
        )
    memory.write(inst.address, inst.original)
    if memory.read(inst.address, inst.size) != inst.original:
        return "the write did not take"
    return None


def _leave_stubs(process: Process, areas: list[FoundArea], report: CleanupReport) -> None:
    """Let threads that are inside a stub (its jump is already gone) run out of it by
    themselves: the world runs for a moment and is stopped again, a bounded number of times.
    Nothing is single-stepped (a tracer killed during a step would leave the trap flag set)."""
    inside = _threads_in_code(process, areas)
    seen = set(inside)
    for _ in range(SETTLE_TRIES):
        if not inside:
            break
        process.resume()
        time.sleep(0.002)
        process.stop()
        inside = _threads_in_code(process, areas)
        seen |= inside
    report.waited_out = len(seen - inside)


def _threads_in_code(process: Process, areas: list[FoundArea]) -> set[int]:
    """Stopped threads that may execute next an address in the code part of one of ``areas``."""
    return {
        t.tid
        for t in process.threads.values()
        if not t.gone and any(a.code_mapped and a.code_address <= p < a.code_end for a in areas for p in t.positions())
    }


def _references(process: Process, areas: list[FoundArea], busy: dict[int, str]) -> None:
    """Mark areas whose code part a thread may still execute or return into (the whole used
    stack of every thread is searched, see :mod:`djprobe.stacks`)."""
    for thread in list(process.threads.values()):
        if thread.gone:
            continue
        positions = thread.positions()
        for a in areas:
            if a.data_address not in busy and a.code_mapped and any(a.code_address <= p < a.code_end for p in positions):
                busy[a.data_address] = f"thread {thread.tid} is inside a stub"
    stacks = StackWords.of(process)
    for a in areas:
        if a.data_address in busy or not a.code_mapped:
            continue
        if a.layout is None:
            found = stacks.first_in(a.code_address, a.code_end)
        else:  # a number that falls where no stub was ever written keeps nothing mapped
            found = stacks.first_in_stubs(a.code_address, a.code_end, a.layout.slot_size, process.read)
        if found is not None:
            tid, word = found
            busy[a.data_address] = (
                f"thread {tid} holds stub address {word:#x} on its stack (a signal frame or saved pointer)"
            )


def cleanup(pid: int, *, force: bool = False) -> CleanupReport:
    """Remove every jump of the probe areas left in ``pid`` and unmap the areas where safe.

    Areas whose tracer is still alive are left alone unless ``force``. The target is stopped
    for the duration and resumed (detached) afterwards.

    Raises ProcessGoneError, TracePermissionError (e.g. traced by someone else right now).
    """
    report = CleanupReport(pid)
    areas = find_areas(pid)
    report.areas = areas
    if not _select(CleanupReport(pid), areas, force) and not _leaked_area_fds(pid):
        # nothing we may touch: report without stopping the target
        _describe_sites(pid, areas)
        _select(report, areas, force)
        return report
    process = Process(pid)
    try:
        process.stop()
        # look again with the world stopped: this is what we act on
        areas = find_areas(pid, process.memory)
        report.areas = areas
        chosen = _select(report, areas, force)
        symbols = Symbols.from_process(pid, process.memory)
        try:
            for a in areas:
                for inst in a.instances:
                    inst.site = symbols.describe(inst.address)
            for a in chosen:
                for inst in a.instances:
                    if not inst.valid:
                        report.skipped.append((inst, f"entry not trusted: {inst.problem}"))
                        continue
                    why = _restore(process, symbols, inst, force, areas)
                    if why is None:
                        report.restored.append(inst)
                        inst.code = "original"
                    elif why == "":
                        report.untouched.append(inst)
                    else:
                        report.skipped.append((inst, why))
            # the springboards of short jumps, once their sites are undone
            kept: set[int] = set()
            held: dict[int, str] = {}  # areas a springboard left in place still leads into
            for a in chosen:
                for inst in a.instances:
                    if inst.valid and inst.springboard is not None:
                        why = _restore_springboard(process, symbols, inst, chosen)
                        if why is not None:
                            kept.add(inst.springboard)
                            report.skipped.append((inst, why))
            # whatever jump into these areas is left (no entry, an untrusted entry, or one whose
            # record disagrees with the file) goes too, replaced by the file's bytes; but not a
            # springboard that a jmp rel8 still in place leads to
            # short jumps with no trusted entry (orphan_short.py): their rel8s, then their springboards
            entries = {i.address for a in areas for i in a.instances if i.valid}
            shorts, stay = orphan_short.find(process.memory, process.maps(), symbols, chosen, entries)
            for owner, why in stay:
                held.setdefault(owner.data_address, f"a short jump is still in place: {why}")  # type: ignore[attr-defined]
            left = {o.springboard for o, _ in orphan_short.restore(process, shorts)}
            for o in shorts:
                jumps = [OrphanJump(o.site, o.springboard, o.site_original, symbols.describe(o.site))]
                if o.springboard not in left and not any(j.address == o.springboard for j in report.orphans):
                    jumps.append(OrphanJump(o.springboard, o.target, o.board_original, symbols.describe(o.springboard)))
                for jump in jumps:
                    o.area.orphans.append(jump)  # type: ignore[attr-defined]
                    report.orphans.append(jump)
            for owner, orphan in find_orphans(process.memory, process.maps(), symbols, chosen, known=kept):
                module = symbols.module_at(orphan.address)
                if module is None or _rel8_into(process.memory, module, orphan.address):
                    held.setdefault(owner.data_address, f"the jump at {orphan.address:#x} is still in place "
                                    "(a jmp rel8 leads to it)")
                    continue
                process.write(orphan.address, orphan.original)
                owner.orphans.append(orphan)
                report.orphans.append(orphan)
        finally:
            symbols.close()
        # an untrusted entry whose jump the file comparison removed is done with
        gone = {o.address for o in report.orphans}
        report.skipped = [(i, why) for i, why in report.skipped if i.address not in gone]
        busy: dict[int, str] = dict(held)
        for inst, _ in report.skipped:
            for a in chosen:
                if inst in a.instances:
                    busy.setdefault(a.data_address, f"the jump at {inst.address:#x} is still in place")
        _leave_stubs(process, chosen, report)
        _references(process, chosen, busy)
        for a in chosen:
            if a.data_address in busy:
                report.left_mapped.append((a, busy[a.data_address]))
                continue
            if a.code_mapped:
                process.munmap(a.code_address, a.code_size)
            process.munmap(a.data_address, a.data_size)
            report.unmapped.append(a)
        # A tracer killed between the injected open of an area file and its close left the fd
        # open in the target. While we hold the target no live tracer is inside an operation on
        # it (ptrace has one tracer), so every such fd is a leak.
        for fd in _leaked_area_fds(pid):
            process.close_fd(fd)
            report.closed_fds.append(fd)
    finally:
        try:
            process.resume()
        finally:
            process.close()
    return report
