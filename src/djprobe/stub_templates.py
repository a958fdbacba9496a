"""Count stubs from templates: thousands of stubs without an assembler run each.

:func:`djprobe.stubs.build_count_stub` assembles the count action with iced's BlockEncoder and
relocates the displaced instructions with :func:`djprobe.x86.relocate.relocate` (which decodes
its result again to check it): about 100 µs per stub, 2 s for the 20,000 probes of a whole
process. Yet the action's bytes depend on the slot only through the RIP-relative displacements of
the instance's counter: every branch inside it is internal, and the rseq descriptor sits at a
fixed place in the slot. So the action is assembled once per *shape* (area layout, red zone live,
flags live, rseq offset), and each stub is that template with its counter displacements patched.

Displaced instructions that are all plain (fall through, no RIP-relative operand) are copied as
they are, followed by ``jmp rel32`` back, which is what the relocator itself produces for them;
any other instruction (a branch, a call, a RIP-relative operand, ...) goes through the relocator.
The result is the same bytes, address map and rseq descriptor as ``build_count_stub`` (the unit
tests compare them across shapes and sites); exit windows of return probes take
``build_count_stub`` itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iced_x86 import Decoder

from .area import AreaLayout
from .stubs import JMP_REL32_SIZE, RSEQ_CS_SIZE, PerCpu, Relocatable, Stub, assemble, build_count_stub, count_action, rseq_descriptor
from .x86 import Flow, Relocated, RelocationError

__all__ = ["CountTemplate", "TemplateStub", "count_template", "build_count_stub_fast", "relocate_plain"]

_INT32 = struct.Struct("<i")
# Where a template is assembled: any address works (its bytes do not depend on it); the dummy
# counter is far enough from it and from the descriptor that no other operand can be taken for it.
_REF_SLOT = 0x4000_0000
_REF_COUNTER = 0x5000_0000


@dataclass(frozen=True)
class CountTemplate:
    """A count action assembled once: ``code`` with the counter's disp32 at each of ``patches``
    (offset of the disp32, offset of the end of its instruction) to fill in per slot;
    ``rseq_labels`` the offsets of the critical section's start, end and abort handler (per-CPU)."""

    code: bytes
    patches: tuple[tuple[int, int], ...]
    rseq_labels: tuple[int, int, int] | None

    def action_at(self, slot_address: int, counter_address: int) -> bytes:
        """The action's bytes for the stub at ``slot_address`` counting at ``counter_address``.

        Raises RelocationError (``out_of_reach``) if the counter is beyond a disp32 of the slot."""
        code = bytearray(self.code)
        for disp_at, next_ip in self.patches:
            disp = counter_address - (slot_address + next_ip)
            if not -(1 << 31) <= disp < 1 << 31:
                raise RelocationError(
                    f"counter at {counter_address:#x} is out of reach (±2 GiB) of stub at {slot_address:#x}",
                    out_of_reach=True,
                )
            _INT32.pack_into(code, disp_at, disp)
        return bytes(code)


_TEMPLATES: dict[tuple[AreaLayout, bool, bool, int | None], CountTemplate] = {}


def count_template(layout: AreaLayout, *, red_zone_live: bool, flags_live: bool, rseq_offset: int | None) -> CountTemplate:
    """The template of the count action of this shape (built on first use, then kept)."""
    key = (layout, red_zone_live, flags_live, rseq_offset)
    found = _TEMPLATES.get(key)
    if found is not None:
        return found
    descriptor = _REF_SLOT + layout.slot_size - RSEQ_CS_SIZE
    per_cpu = None if rseq_offset is None else PerCpu(rseq_offset, descriptor)
    a = count_action(layout, _REF_COUNTER, red_zone_live=red_zone_live, flags_live=flags_live, per_cpu=per_cpu)
    code = assemble(a.instructions(), _REF_SLOT)
    decoder = Decoder(64, code, ip=_REF_SLOT)
    patches: list[tuple[int, int]] = []
    ips: list[int] = []
    for instruction in decoder:
        ips.append(instruction.ip - _REF_SLOT)
        if instruction.is_ip_rel_memory_operand and instruction.ip_rel_memory_address == _REF_COUNTER:
            offsets = decoder.get_constant_offsets(instruction)
            if not offsets.has_displacement or offsets.displacement_size != 4:
                raise AssertionError("a RIP-relative counter operand without a disp32")
            start = instruction.ip - _REF_SLOT
            patches.append((start + offsets.displacement_offset, start + instruction.len))
    if not patches:
        raise AssertionError("the count action does not address its counter")
    labels = None
    if per_cpu is not None:
        labels = (ips[a.index_of("cs_start")], ips[a.index_of("cs_end")], ips[a.index_of("abort")])
    template = CountTemplate(code, tuple(patches), labels)
    _TEMPLATES[key] = template
    return template


def _plain(displaced: tuple) -> bool:
    """Whether every displaced instruction is copied unchanged by the relocator."""
    return bool(displaced) and all(i.flow is Flow.NEXT and not i.instruction.is_ip_rel_memory_operand for i in displaced)


def relocate_plain(site: Relocatable, stub_address: int) -> Relocated:
    """``site.relocate_to(stub_address, site.address + site.size)`` (a site analysis: its
    ``displaced`` instructions relocated, then a jump back) for a site whose displaced instructions are all plain
    (see :func:`_plain`): their bytes, then ``jmp rel32`` to the end of the site; the same code
    and address map as the relocator's. Anything else goes to the relocator itself.

    Raises RelocationError (``out_of_reach``) as ``relocate_to`` does."""
    displaced = tuple(getattr(site, "displaced", ()))  # decoded once (packed instructions decode on access)
    if not getattr(site, "ok", False) or not _plain(displaced) or displaced[0].bits != 64:
        return site.relocate_to(stub_address, site.address + site.size)
    if not -(1 << 31) <= stub_address - (site.address + JMP_REL32_SIZE) < 1 << 31:
        raise RelocationError(
            f"stub at {stub_address:#x} is beyond the +-2 GiB reach of a jmp rel32 at {site.address:#x}",
            address=site.address,
            out_of_reach=True,
        )
    amap: dict[int, int] = {}
    code = bytearray()
    at = stub_address
    expected = displaced[0].address
    for insn in displaced:
        if insn.address != expected:
            return site.relocate_to(stub_address, site.address + site.size)  # not contiguous: let the relocator say so
        amap[insn.address] = at
        code += insn.raw
        at += insn.length
        expected = insn.end
        amap[insn.end] = at
    return_to = site.address + site.size
    disp = return_to - (at + JMP_REL32_SIZE)
    if not -(1 << 31) <= disp < 1 << 31:
        raise RelocationError(f"jump back to {return_to:#x} is out of reach (±2 GiB) of stub at {stub_address:#x}",
                              out_of_reach=True)
    code += b"\xe9" + _INT32.pack(disp)
    return Relocated(bytes(code), stub_address, amap, at)


def _count_parts(site: Relocatable, layout: AreaLayout, slot_address: int, counter_address: int,
                 rseq_offset: int | None) -> tuple[CountTemplate, bytes, Relocated]:
    template = count_template(layout, red_zone_live=not site.at_entry, flags_live=not site.flags_dead,
                              rseq_offset=rseq_offset)
    action = template.action_at(slot_address, counter_address)
    return template, action, relocate_plain(site, slot_address + len(action))


def build_count_stub_fast(
    site: Relocatable,
    layout: AreaLayout,
    slot_address: int,
    counter_address: int,
    rseq_offset: int | None = None,
    *,
    slot: int | None = None,
    code_address: int | None = None,
) -> "Stub | TemplateStub":
    """What :func:`djprobe.stubs.build_count_stub` builds, from a template (see the module
    docstring); the exit window of a return probe is built by ``build_count_stub`` itself. The
    stub returned is a :class:`TemplateStub`: it keeps what it was built from, not its bytes;
    given the ``slot`` and the area's ``code_address`` the two addresses are, it keeps those
    (shared with the instance and the area) instead of two integers of its own.

    Raises RelocationError if the displaced instructions or the counter cannot be reached from
    this slot, ValueError if the stub does not fit in a slot."""
    if getattr(site, "exit", None) is not None and not getattr(site, "exit_early", False):
        return build_count_stub(site, layout, slot_address, counter_address, rseq_offset)
    template, action, relocated = _count_parts(site, layout, slot_address, counter_address, rseq_offset)
    size = len(action) + len(relocated.code)
    reserve = RSEQ_CS_SIZE if template.rseq_labels is not None else 0
    if size > layout.slot_size - reserve:
        raise ValueError(f"stub of {size} bytes does not fit a {layout.slot_size}-byte slot")
    stub = TemplateStub(site, layout, slot_address, counter_address, rseq_offset, len(action), size,
                        template.rseq_labels is not None, slot=slot, code_address=code_address)
    object.__setattr__(stub, "_unwritten", stub._image_of(template, action, relocated))
    return stub


class TemplateStub:
    """A count stub built by :func:`build_count_stub_fast` that keeps only what it was built
    from (the site analysis, the layout, its slot and counter addresses, the rseq offset) and
    its sizes: ``code``, ``relocated`` and ``trailer`` are built again from them when asked
    (the same bytes: building is deterministic). 20,000 probes would otherwise keep 12 MiB of
    code, relocated copies, address maps and descriptors that are needed only to move a thread
    or to rebuild a shared stub. It has the attributes and methods of a :class:`~djprobe.stubs.Stub`
    without its slots (``action_start``, ``extra_action_ranges`` are class defaults, ``slot_size``
    comes from the layout): 104 bytes instead of 152."""

    __slots__ = ("_base", "_slot", "action_size", "_site", "_layout", "_counter", "_rseq_offset", "_size",
                 "_per_cpu", "_unwritten")
    action_start: int | None = None
    extra_action_ranges: tuple[tuple[int, int], ...] = ()
    action_range = Stub.action_range
    action_ranges = Stub.action_ranges
    in_action = Stub.in_action
    original_address = Stub.original_address

    def __init__(self, site: Relocatable, layout: AreaLayout, address: int, counter_address: int,
                 rseq_offset: int | None, action_size: int, size: int, per_cpu: bool, *,
                 slot: int | None = None, code_address: int | None = None) -> None:
        setattr_ = object.__setattr__
        derived = (slot is not None and code_address is not None
                   and layout.slot_address(code_address, slot) == address
                   and layout.counter_address(code_address + layout.code_size, slot) == counter_address)
        # the addresses from (area, slot) when they are those: no two integers per stub
        setattr_(self, "_base", code_address if derived else address)
        setattr_(self, "_slot", slot if derived else None)
        setattr_(self, "_counter", None if derived else counter_address)
        setattr_(self, "action_size", action_size)
        setattr_(self, "_site", site)
        setattr_(self, "_layout", layout)
        setattr_(self, "_rseq_offset", rseq_offset)
        setattr_(self, "_size", size)
        setattr_(self, "_per_cpu", per_cpu)
        setattr_(self, "_unwritten", None)  # the image built with the stub, until it is asked for once

    @property
    def address(self) -> int:
        """Where the stub is (its slot's address)."""
        if self._slot is None:
            return self._base
        return self._layout.slot_address(self._base, self._slot)

    @property
    def counter_address(self) -> int:
        """Shard 0 of the counter the stub adds to."""
        if self._slot is None:
            return self._counter  # type: ignore[return-value]
        return self._layout.counter_address(self._base + self._layout.code_size, self._slot)

    def _parts(self) -> tuple[CountTemplate, bytes, Relocated]:
        return _count_parts(self._site, self._layout, self.address, self.counter_address, self._rseq_offset)

    @property
    def code(self) -> bytes:
        _, action, relocated = self._parts()
        return action + relocated.code

    @property
    def relocated(self) -> Relocated:
        return self._parts()[2]

    @property
    def trailer(self) -> bytes:
        if not self._per_cpu:
            return b""
        template = self._parts()[0]
        start, end, abort = (self.address + offset for offset in template.rseq_labels)  # type: ignore[union-attr]
        return rseq_descriptor(start, end, abort)

    @property
    def slot_size(self) -> int:
        """Where the trailer ends (a per-CPU stub), else 0 (as ``Stub.slot_size``)."""
        return self._layout.slot_size if self._per_cpu else 0

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a stub is immutable (cannot set {name})")

    @property
    def end(self) -> int:
        return self.address + (self.slot_size if self._per_cpu else self._size)

    def image(self) -> bytes:
        """The bytes to write at ``address``: the first call gives those built with the stub
        (then dropped), a later one builds them again."""
        image = self._unwritten
        if image is not None:
            object.__setattr__(self, "_unwritten", None)
            return image
        return self._image_of(*self._parts())

    def _image_of(self, template: CountTemplate, action: bytes, relocated: Relocated) -> bytes:
        code = action + relocated.code
        if not self._per_cpu:
            return code
        start, end, abort = (self.address + offset for offset in template.rseq_labels)  # type: ignore[union-attr]
        return code + b"\xcc" * (self.slot_size - RSEQ_CS_SIZE - len(code)) + rseq_descriptor(start, end, abort)

    def __reduce__(self) -> tuple:
        return (TemplateStub, (self._site, self._layout, self.address, self.counter_address, self._rseq_offset,
                               self.action_size, self._size, self._per_cpu))
