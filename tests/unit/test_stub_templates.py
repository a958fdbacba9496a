"""Count stubs from templates (djprobe.stub_templates) are the stubs build_count_stub assembles:
same bytes, address map, jump back and rseq descriptor, for every shape (entry or mid-function,
flags live or dead, per-CPU or locked, two layouts) over every site of a real library."""

from __future__ import annotations

import dataclasses
import os

import pytest

from djprobe.area import AreaLayout
from djprobe.sites import analyse_site
from djprobe.stub_templates import _plain, build_count_stub_fast, count_template
from djprobe.stubs import build_count_stub
from djprobe.symbols import Symbols
from djprobe.x86 import RelocationError
from djprobe.x86.packed import PackedInsns

LIBZ = "/lib/x86_64-linux-gnu/libz.so.1"


@pytest.fixture(scope="module")
def sites():
    if not os.path.exists(LIBZ):
        pytest.skip("no libz")
    symbols = Symbols.from_file(LIBZ)
    out = []
    for s in symbols.resolve(f"{LIBZ}:*"):
        entry = analyse_site(symbols, s)
        if not entry.ok:
            continue
        out.append(entry)
        mid = analyse_site(symbols, s.address + entry.displaced[0].length)  # a mid-function site
        if mid.ok:
            out.append(mid)
    return out


def _same(a, b):
    assert a.code == b.code
    assert a.image() == b.image()
    assert a.image() == b.image()  # a template stub: built with it, then built again
    assert (a.address, a.action_size, a.trailer, a.slot_size, a.action_start) == (
        b.address, b.action_size, b.trailer, b.slot_size, b.action_start)
    assert a.relocated.code == b.relocated.code
    assert a.relocated.address_map == b.relocated.address_map
    assert a.relocated.return_jump == b.relocated.return_jump
    assert a.end == b.end
    assert a.action_ranges == b.action_ranges


@pytest.mark.parametrize("layout", [AreaLayout(), AreaLayout.for_counting()], ids=["default", "counting"])
@pytest.mark.parametrize("rseq_offset", [None, -0x60], ids=["locked", "per-cpu"])
def test_template_stubs_equal_assembled_ones(sites, layout, rseq_offset):
    shapes = set()
    kinds = set()
    for n, site in enumerate(sites):
        slot_index = (n * 37) % layout.max_instances
        code_address = site.address + 0x40_0000 if n % 2 else site.address + 0x7000_0000
        slot = code_address + slot_index * layout.slot_size
        counter = slot + 0x123_4568 + 8 * slot_index
        fast = build_count_stub_fast(site, layout, slot, counter, rseq_offset)
        _same(fast, build_count_stub(site, layout, slot, counter, rseq_offset))
        shapes.add((site.at_entry, site.flags_dead))
        kinds.add(_plain(site.displaced))
    assert len(shapes) >= 3  # entry and mid-function sites, flags live and dead
    assert kinds == {True, False}  # copied as they are, and through the relocator


def test_stubs_of_packed_instructions_equal_assembled_ones(sites):
    """A cached verdict keeps its displaced instructions packed (decoded on access): the stub built
    from it is the one assembled from the decoded instructions."""
    layout = AreaLayout.for_counting()
    packed = 0
    for n, site in enumerate(sites[:400]):
        lean = dataclasses.replace(site, displaced=PackedInsns.of(site.displaced))
        packed += isinstance(lean.displaced, PackedInsns)
        assert lean.original == site.original
        slot = site.address + 0x40_0000 + (n % 64) * layout.slot_size
        counter = slot + 0x123_4568
        _same(build_count_stub_fast(lean, layout, slot, counter, -0x60),
              build_count_stub(site, layout, slot, counter, -0x60))
    assert packed == min(400, len(sites))


def test_template_is_built_once_per_shape():
    layout = AreaLayout()
    a = count_template(layout, red_zone_live=True, flags_live=True, rseq_offset=-0x60)
    assert count_template(layout, red_zone_live=True, flags_live=True, rseq_offset=-0x60) is a
    assert count_template(layout, red_zone_live=False, flags_live=True, rseq_offset=-0x60) is not a
    assert len(a.patches) == 3 and a.rseq_labels is not None  # the per-CPU, the vfork child's and the locked increment
    locked = count_template(layout, red_zone_live=True, flags_live=True, rseq_offset=None)
    assert len(locked.patches) == 1 and locked.rseq_labels is None


def test_out_of_reach_is_refused_like_the_assembler(sites):
    layout = AreaLayout()
    site = next(s for s in sites if _plain(s.displaced))
    far = site.address + (3 << 30)
    with pytest.raises(RelocationError) as fast:
        build_count_stub_fast(site, layout, far, far + 0x1000, None)
    assert fast.value.out_of_reach
    near = site.address + 0x10000
    with pytest.raises(RelocationError) as counter:
        build_count_stub_fast(site, layout, near, near + (3 << 30), None)
    assert counter.value.out_of_reach


def test_template_stub_has_every_attribute_of_a_stub(sites):
    """A TemplateStub is not a Stub subclass (no unused slots): it still answers everything a
    Stub does, with the same values as the assembled stub."""
    from djprobe.stub_templates import TemplateStub
    from djprobe.stubs import Stub

    layout = AreaLayout.for_counting()
    site = sites[0]
    code_address = site.address + 0x40_0000
    slot = 3
    slot_address = layout.slot_address(code_address, slot)
    counter = layout.counter_address(code_address + layout.code_size, slot)
    fast = build_count_stub_fast(site, layout, slot_address, counter, 0x20, slot=slot, code_address=code_address)
    ref = build_count_stub(site, layout, slot_address, counter, 0x20)
    assert isinstance(fast, TemplateStub)
    public = [k for k in vars(Stub) if not k.startswith("_")]
    for name in public:
        assert hasattr(fast, name), name
    assert (fast.address, fast.end, fast.action_ranges, fast.counter_address) == (ref.address, ref.end, ref.action_ranges, counter)
    inside = next(iter(ref.relocated.address_map.values()))
    assert fast.original_address(inside) == ref.original_address(inside)
    assert fast.in_action(fast.address) and not fast.in_action(fast.end)
    with pytest.raises(AttributeError):
        fast.address = 0  # type: ignore[misc]
