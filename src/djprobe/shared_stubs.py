"""Stubs shared by overlapping probes: one jump, one stub, an action at each probed instruction.

A probe whose site lies inside the displaced bytes of another probe's window (on one of its
instruction boundaries) cannot have a jump of its own: it *joins* the window's stub. The shared
stub runs, for each displaced instruction in order, the action of the probe placed at that
instruction (if any) and then the instruction, relocated, and ends with the jump back::

    action A, insn 1, action B, insn 2, insn 3, action C, insn 4, jmp back

Each probe keeps its own counter (and ring records): an action increments the counter of the
probe's own instance slot, so a point's count and events are its own. The address map sends each
original instruction to its relocated copy (after the action before it: a thread moved into the
stub at an instruction does not count a hit there), and ``Stub.action_ranges`` lists every action
(a thread inside one is left to run out by itself, as with any stub).

The window of a return probe's exit takes part like any other: the exit's action is the point
before its exit instruction (the last displaced), so one window can hold an entry probe's action,
mid-function probes and an exit's (``mov eax, 1; ret``: entry action, ``mov``, exit action,
``ret``). Path windows (see ``stubs.py``) are not shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from iced_x86 import Code, Decoder, Instruction

from .area import AreaLayout
from .sites import SiteAnalysis
from .stubs import (
    RSEQ_CS_SIZE, PerCpu, RecordTargets, Stub, assemble, count_action, encode_exact, near_branch_to, record_action,
    rseq_descriptor,
)  # fmt: skip
from .x86 import Flow
from .x86.relocate import Relocated, relocate


class StubTooLargeError(ValueError):
    """The actions of a shared stub do not fit one stub slot."""


@dataclass(frozen=True)
class ActionPoint:
    """The action to run before the displaced instruction at ``address``: a count (into
    ``counter``) or, with ``record`` set, an event record written to those targets."""

    address: int
    counter: int
    record: RecordTargets | None = None
    registers: str = "all"
    flags_dead: bool = False  # the arithmetic flags are dead at ``address`` (need not be saved)


@dataclass(frozen=True)
class PathPoint:
    """The exit of a return probe reached through a *path window* inside the shared window (see
    ``SiteAnalysis.exit_path``): the branches of ``window`` into its block are aimed at a copy of
    the block placed after the jump back, with the action before its exit instruction."""

    window: SiteAnalysis
    counter: int
    record: RecordTargets | None = None
    registers: str = "all"


def build_shared_stub(
    site: SiteAnalysis,
    layout: AreaLayout,
    slot_address: int,
    points: Sequence[ActionPoint],
    rseq_offset: int | None = None,
    paths: Sequence[PathPoint] = (),
) -> Stub:
    """The stub of the window ``site`` with the actions of ``points`` at their instructions, and
    a copy of each path exit's block (``paths``) after the jump back.

    Count actions are per-CPU (rseq, see ``stubs.count_action``) when ``rseq_offset`` is given:
    each has its own rseq descriptor, 32 bytes each at the end of the slot. Raises ValueError if a
    point is not at an instruction boundary of the window or the stub does not fit its slot, and
    RelocationError (from the relocator) if the instructions cannot reach their targets."""
    if site.exit_path:
        raise ValueError(f"{site.site}: the path window of a return probe cannot be shared")
    displaced = list(site.displaced)
    by_address = {p.address: p for p in points}
    if len(by_address) != len(points):
        raise ValueError("two action points at one address")
    boundaries = {insn.address for insn in displaced}
    for p in points:
        if p.address not in boundaries:
            raise ValueError(f"{p.address:#x} is not an instruction boundary of the window at {site.address:#x}")
    redirects: dict[int, int] = {}  # a branch of the window -> the index of the path it enters
    for k, path in enumerate(paths):
        copies = _copies(path.window)
        ways = [i for i in path.window.displaced if i.flow in (Flow.JUMP, Flow.COND_JUMP) and i.target in copies]
        if not ways or any(i.address not in boundaries or i.address in redirects for i in ways):
            raise ValueError(f"the path window at {path.window.address:#x} does not enter its block from this window")
        for i in ways:
            redirects[i.address] = k
    layout_pass = _emit(site, layout, slot_address, displaced, by_address, paths, redirects, rseq_offset, None)
    code, address_map, ranges, descriptors, return_jump, _ = _emit(
        site, layout, slot_address, displaced, by_address, paths, redirects, rseq_offset, layout_pass[5])
    reserve = RSEQ_CS_SIZE * len(descriptors)
    if len(code) > layout.slot_size - reserve:
        raise StubTooLargeError(
            f"the probes in this window need a shared stub of {len(code) + reserve} bytes, more than a "
            f"{layout.slot_size}-byte slot holds (it takes any number of count probes, but only a few "
            "recording ones)"
        )
    if descriptors:
        code += b"\xcc" * (layout.slot_size - reserve - len(code))
        for descriptor in reversed(descriptors):  # descriptor k at slot end - 32 * (k + 1)
            code += descriptor
    relocated = Relocated(bytes(code), slot_address, address_map, return_jump)
    first = ranges[0] if ranges else (slot_address, slot_address)
    return Stub(
        address=slot_address,
        code=bytes(code),
        action_size=first[1] - first[0],
        relocated=relocated,
        action_start=first[0],
        extra_action_ranges=tuple(ranges[1:]),
    )


def _copies(window: SiteAnalysis) -> set[int]:
    """The original addresses whose branches are aimed at the copy of a path window's block."""
    via = window.exit_via or window.exit_path[0].address
    return {i.address for i in window.exit_path} | {via}


def _emit(site, layout, slot_address, displaced, by_address, paths, redirects, rseq_offset, blocks):
    """Lay out the shared stub. ``blocks``: for each path, {original: copy address} from the first
    pass (None in the first pass: branches aimed at placeholders of the same size). Returns code,
    address map, action ranges, rseq descriptors, return jump, and the block maps."""
    code = bytearray()
    address_map: dict[int, int] = {}
    ranges: list[tuple[int, int]] = []
    descriptors: list[bytes] = []
    at = slot_address
    return_jump = None

    def action(point, at):
        piece, descriptor = _action_code(site, layout, slot_address, point, at, rseq_offset, len(descriptors))
        if descriptor is not None:
            descriptors.append(descriptor)
        ranges.append((at, at + len(piece)))
        return piece

    for index, insn in enumerate(displaced):
        point = by_address.get(insn.address)
        if point is not None:
            piece = action(point, at)
            code += piece
            at += len(piece)
        last = index == len(displaced) - 1
        return_to = site.address + site.size if last else None
        if insn.address in redirects:
            k = redirects[insn.address]
            to = at if blocks is None else blocks[k][insn.target]
            address_map[insn.address] = at
            piece = near_branch_to(insn, at, to)
            if return_to is not None and insn.flow is Flow.COND_JUMP:
                return_jump = at + len(piece)
                piece += encode_exact(Instruction.create_branch(Code.JMP_REL32_64, return_to), at + len(piece))
            address_map[insn.end] = at + len(piece)
        else:
            rel = relocate([insn], at, return_to)
            address_map.update(rel.address_map)
            if rel.return_jump is not None:
                return_jump = rel.return_jump
            piece = rel.code
        code += piece
        at += len(piece)
    maps = []
    for k, path in enumerate(paths):
        block = list(path.window.exit_path)
        via = path.window.exit_via or block[0].address
        copy: dict[int, int] = {}
        for insn in block[:-1]:
            copy[insn.address] = at
            if insn.flow in (Flow.JUMP, Flow.COND_JUMP) and insn.target in _copies(path.window):
                piece = near_branch_to(insn, at, at if blocks is None else blocks[k][insn.target])
            else:
                piece = relocate([insn], at, None).code
            code += piece
            at += len(piece)
        point = ActionPoint(block[-1].address, path.counter, path.record, path.registers, flags_dead=True)
        copy[block[-1].address] = at
        copy.setdefault(via, copy[block[0].address] if len(block) > 1 else at)
        piece = action(point, at)
        code += piece
        at += len(piece)
        piece = relocate([block[-1]], at, None).code
        code += piece
        at += len(piece)
        maps.append(copy)
    return code, address_map, ranges, descriptors, return_jump, maps


def _action_code(
    site: SiteAnalysis,
    layout: AreaLayout,
    slot_address: int,
    point: ActionPoint,
    at: int,
    rseq_offset: int | None,
    n_descriptors: int,
) -> tuple[bytes, bytes | None]:
    """The encoded action of ``point`` placed at ``at``, and its rseq descriptor if it has one."""
    at_entry = site.at_entry and point.address == site.address
    if point.record is not None:
        return assemble(record_action(layout, point.record, point.registers), at), None
    per_cpu = None
    if rseq_offset is not None:
        per_cpu = PerCpu(rseq_offset, slot_address + layout.slot_size - RSEQ_CS_SIZE * (n_descriptors + 1))
    asm = count_action(
        layout,
        point.counter,
        red_zone_live=not at_entry,
        flags_live=not (at_entry or point.flags_dead),
        per_cpu=per_cpu,
    )
    piece = assemble(asm.instructions(), at)
    if per_cpu is None:
        return piece, None
    ips = [insn.ip for insn in Decoder(64, piece, ip=at)]
    start, end, abort = (ips[asm.index_of(name)] for name in ("cs_start", "cs_end", "abort"))
    return piece, rseq_descriptor(start, end, abort)
