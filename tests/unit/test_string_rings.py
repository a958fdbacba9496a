"""String records on a synthetic probe area: layout, header round trip, drain and decoding."""

import mmap

import numpy as np
import pytest

from djprobe.area import (
    ARGS_RECORD_SIZE, RING_TAIL, STRING_SLOT_HEADER, AreaHeader, AreaLayout, AreaView, string_record_size,
)  # fmt: skip
from djprobe.events import EVENT_DTYPE, EventBatch, RingReader, ThreadMap, TscClock, decode
from djprobe.fetched import FetchError


def test_layout_of_string_rings():
    lay = AreaLayout(string_size=64, string_ring_slots=16)
    assert string_record_size(64) == 1024 >= ARGS_RECORD_SIZE + 6 * (STRING_SLOT_HEADER + 64)
    assert string_record_size(8) == 512 and string_record_size(4096) == 32768
    assert lay.string_rings_offset >= lay.args_records_offset + lay.ring_count * lay.args_ring_stride
    assert lay.string_records_offset + lay.ring_count * lay.string_ring_stride == lay.rings_offset + lay.rings_size
    assert lay.data_size >= lay.rings_offset + lay.rings_size
    for bad in (0, 12, 4104):
        with pytest.raises(ValueError, match="string_size"):
            AreaLayout(string_size=bad)
    with pytest.raises(ValueError, match="string_ring_slots"):
        AreaLayout(string_ring_slots=3)


def test_header_round_trip_and_a_lying_header():
    lay = AreaLayout(string_size=128, string_ring_slots=64)
    header = AreaHeader(lay, 1, 2, 0x10000, 0x20000)
    assert AreaHeader.unpack(header.pack()) == header
    raw = bytearray(header.pack())
    raw[-8:-4] = (12).to_bytes(4, "little")  # string_size not a multiple of 8
    with pytest.raises(ValueError, match="string_size"):
        AreaHeader.unpack(bytes(raw))


def test_string_records_drain_with_their_strings():
    lay = AreaLayout(max_instances=16, ring_count=2, ring_slots=8, string_size=16, string_ring_slots=4)
    buf = mmap.mmap(-1, lay.data_size)
    view = AreaView(memoryview(buf), lay)
    reader = RingReader(view, 0)
    ring = view.string_records[1]
    texts = [b"one\0", b"a-much-longer-string", b"", None]
    for pos, text in enumerate(texts + texts[:2]):  # 6 records wrap around 4 slots in two drains
        if pos == 4:
            (first,) = reader.drain()
            assert len(first) == 4 and view.string_ring_headers[1, RING_TAIL // 8] == 4
        i = pos % 4
        ring["instance"][i] = 5
        ring["tid"][i] = 100 + pos
        ring["tsc"][i] = 1000 + pos
        ring["args"][i] = [0x7000 + pos, pos, 0, 0, 0, 0]
        ring["mask"][i] = 0b1
        slot = ring["strings"][i][0]
        slot["address"] = 0x7000 + pos
        if text is None:
            slot["result"] = -14
        else:
            data = text[:16]
            slot["data"][: len(data)] = np.frombuffer(data, dtype=np.uint8)
            slot["result"] = 16
        ring["seq"][i] = pos + 1
        view.string_ring_headers[1, 0] = pos + 1
    (second,) = reader.drain()
    fetched = reader.take_fetched()
    assert len(fetched) == 6 and reader.take_fetched() == {}
    events = second.view(EVENT_DTYPE)
    assert events["tid"].tolist() == [104, 105] and events["regs"][:, 8].tolist() == [0x7004, 0x7005]  # rdi
    values = [fetched[k][0] for k in sorted(fetched)]
    assert values[0] == "one" and not values[0].truncated
    assert values[1] == "a-much-longer-st" and values[1].truncated
    assert values[2] == "" and values[3] == FetchError(0x7003, 14)
    assert all(fetched[k][1:] == (None,) * 5 for k in fetched)
    batch = decode([(0, second)], TscClock(), ThreadMap(), None)
    batch.fetched = fetched
    batch.instances = np.array([None, None], dtype=object)
    assert EventBatch.concat([batch, EventBatch.empty()]).fetched == fetched
    assert [batch.fetched_strings(k)[0] for k in range(2)] == ["one", "a-much-longer-st"]
