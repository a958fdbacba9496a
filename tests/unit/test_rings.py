"""The ring consumer on a synthetic probe area: wrap-around, commit order, tail publication."""

import mmap

import numpy as np

from djprobe.area import RING_TAIL, AreaLayout, AreaView
from djprobe.events import RingReader, ThreadMap, TscClock, decode


def _area(slots=8):
    lay = AreaLayout(max_instances=16, ring_count=2, ring_slots=slots)
    buf = mmap.mmap(-1, lay.data_size)
    return AreaView(memoryview(buf), lay), buf


def _produce(view, ring, positions, commit=True):
    rec = view.records[ring]
    for pos in positions:
        i = pos % view.layout.ring_slots
        rec["instance"][i] = 3
        rec["tid"][i] = 1000 + pos
        rec["tsc"][i] = 10 * pos
        rec["regs"][i] = np.arange(17) + pos
        if commit:
            rec["seq"][i] = pos + 1
    view.ring_headers[ring, 0] = max(positions) + 1


def test_drain_wraps_and_publishes_tail():
    view, _buf = _area()
    reader = RingReader(view, 0)
    _produce(view, 0, range(0, 6))
    (first,) = reader.drain()
    assert first["tid"].tolist() == [1000 + p for p in range(6)]
    assert view.ring_headers[0, RING_TAIL // 8] == 6
    _produce(view, 0, range(6, 13))  # wraps around the 8-slot ring
    (second,) = reader.drain()
    assert second["tsc"].tolist() == [10 * p for p in range(6, 13)]
    assert np.array_equal(second["regs"][:, 0], np.arange(6, 13))
    assert reader.drain() == []


def test_uncommitted_slot_stops_the_batch():
    view, _buf = _area()
    reader = RingReader(view, 0)
    _produce(view, 0, range(0, 3))
    _produce(view, 0, [3], commit=False)  # reserved, not yet written
    _produce(view, 0, [4])
    (got,) = reader.drain()
    assert got["tid"].tolist() == [1000, 1001, 1002]
    view.records[0]["seq"][3] = 4  # the producer commits
    (rest,) = reader.drain()
    assert rest["tid"].tolist() == [1003, 1004]


def test_decode_orders_by_time_and_converts():
    view, _buf = _area()
    reader = RingReader(view, 5)
    _produce(view, 0, range(3))
    _produce(view, 1, range(2))
    view.records[0]["tsc"][:3] = [0, 20, 40]  # interleaved in time across the two rings
    view.records[1]["tsc"][:2] = [10, 30]
    clock = TscClock()
    batch = decode([(5, part) for part in reader.drain()], clock, ThreadMap(), None)
    assert batch.events["tsc"].tolist() == [0, 10, 20, 30, 40]
    assert set(batch.events["region"].tolist()) == {5}
    assert np.all(np.diff(batch.events["time_ns"]) >= 0)
    assert batch.args().shape == (5, 6)


def test_argument_records_have_rings_of_their_own_and_are_widened():
    """Records of the six argument registers (two cache lines) wrap in their own rings and come
    out as full records with the argument registers in place and the others 0."""
    from djprobe.area import ARG_REGISTERS, ARGS_RECORD_SIZE, REGISTER_NAMES

    view, _buf = _area()
    lay = view.layout
    assert view.args_records.dtype.itemsize == ARGS_RECORD_SIZE == 128
    assert lay.args_records_offset + lay.ring_count * lay.args_ring_stride <= lay.data_size
    reader = RingReader(view, 0)
    ring = view.args_records[1]
    header_row = lay.ring_count + 1
    got = []
    for pos in range(0, 13):  # wraps around the 8-slot ring
        i = pos % lay.ring_slots
        ring["instance"][i] = 5
        ring["tid"][i] = 2000 + pos
        ring["tsc"][i] = pos
        ring["args"][i] = [pos * 10 + k for k in range(6)]
        ring["seq"][i] = pos + 1
        view.ring_headers[header_row, 0] = pos + 1
        if pos in (5, 12):
            got += reader.drain()
    records = np.concatenate(got)
    assert records["tid"].tolist() == [2000 + p for p in range(13)]
    assert view.ring_headers[header_row, RING_TAIL // 8] == 13
    regs = records["regs"]
    for k, name in enumerate(ARG_REGISTERS):
        assert regs[:, REGISTER_NAMES.index(name)].tolist() == [p * 10 + k for p in range(13)]
    others = [REGISTER_NAMES.index(n) for n in REGISTER_NAMES if n not in ARG_REGISTERS + ("rax",)]
    assert not regs[:, others].any()
