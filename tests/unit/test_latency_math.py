"""Pure parts of latency probes: bucket math, percentiles from buckets, the pairing key and its
table index, the latency block of the area layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djprobe.area import (HIST_BUCKETS, HIST_WORDS, LATENCY_ENTRY_SIZE, AreaHeader, AreaLayout, AreaView)
from djprobe.latency import bucket_bounds, bucket_of, percentile
from djprobe.latency_stubs import GOLDEN, LatencyTargets, latency_key, table_index


def test_bucket_bounds_are_powers_of_two():
    assert bucket_bounds(0) == (0, 1)
    assert bucket_bounds(1) == (1, 2)
    assert bucket_bounds(13) == (4096, 8192)
    for b in range(1, HIST_BUCKETS):
        lo, hi = bucket_bounds(b)
        assert hi == 2 * lo and lo == bucket_bounds(b - 1)[1]
    with pytest.raises(ValueError):
        bucket_bounds(HIST_BUCKETS)


@given(st.integers(min_value=0, max_value=(1 << 62) - 1))
def test_every_duration_lies_in_its_bucket(ns):
    lo, hi = bucket_bounds(bucket_of(ns))
    assert lo <= ns < hi


def test_bucket_of_matches_the_stub_formula():
    # the exit stub computes bsr(2 * ns + 1)
    for ns in [0, 1, 2, 3, 4, 5, 4095, 4096, 5000, 8191, 8192, 40000, 10**9, 2**40 + 7]:
        assert bucket_of(ns) == (2 * ns + 1).bit_length() - 1
    assert bucket_of(-5) == 0


def test_percentile_of_one_bucket_interpolates():
    hist = np.zeros(64, dtype=np.uint64)
    hist[13] = 100  # [4096, 8192)
    assert percentile(hist, 0) == 4096
    assert percentile(hist, 50) == pytest.approx(4096 + 2048)
    assert percentile(hist, 100) == 8192
    assert percentile(np.zeros(64), 50) is None
    with pytest.raises(ValueError):
        percentile(hist, 101)


def test_percentile_across_buckets():
    hist = np.zeros(64, dtype=np.uint64)
    hist[3] = 98  # [4, 8)
    hist[20] = 2  # [524288, 1048576)
    assert 4 <= percentile(hist, 50) < 8
    assert 4 <= percentile(hist, 98) <= 8
    assert 524288 <= percentile(hist, 99) < 1048576


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=1, max_size=300),
       st.floats(min_value=0, max_value=100))
def test_percentile_lies_in_the_bucket_of_the_true_one(values, q):
    """The interpolated percentile lies in the bucket holding the exact percentile (by rank)."""
    hist = np.zeros(64, dtype=np.uint64)
    for v in values:
        hist[bucket_of(v)] += 1
    got = percentile(hist, q)
    ordered = sorted(values)
    rank = q / 100 * len(values)
    k = min(len(values) - 1, max(0, int(np.ceil(rank)) - 1))
    lo, hi = bucket_bounds(bucket_of(ordered[k]))
    assert lo <= got <= hi
    assert percentile(hist, 0) <= got <= percentile(hist, 100)


def test_key_keeps_tags_and_stacks_apart():
    rsp = 0x7FFD_1234_5678
    assert latency_key(rsp, 1) != latency_key(rsp, 2)  # a function and the one it tail-calls
    assert latency_key(rsp, 1) != latency_key(rsp - 48, 1)  # recursion
    assert latency_key(rsp, 1) >> 48 == 1 and latency_key(rsp, 1) & ((1 << 48) - 1) == rsp
    assert latency_key(rsp, 7) != 0


def test_table_index_spreads_threads_at_the_same_depth():
    """Threads calling at the same depth have rsp that differ only in their stack's base: the
    multiplicative hash must still spread them over the table."""
    slots = 4096
    indexes = {table_index(latency_key(0x7F00_0000_0000 + k * 0x80_1000 + 0xE58, 3), slots) for k in range(256)}
    assert len(indexes) > 240
    assert all(0 <= i < slots for i in indexes)
    key = latency_key(0x7FFD_0000_0018, 9)
    assert table_index(key, slots) == ((key * GOLDEN) & (2**64 - 1)) >> 52


def test_layout_latency_block_and_header_round_trip():
    lay = AreaLayout.for_latency()
    assert lay.latency_offset % 4096 == 0 and lay.latency_offset >= lay.rings_offset + lay.rings_size
    assert lay.hist_offset >= lay.latency_misc_offset + lay.latency_functions * 64
    assert lay.data_size >= lay.latency_offset + lay.latency_size
    buf = bytearray(lay.data_size)
    view = AreaView(buf, lay)
    header = AreaHeader(layout=lay, tracer_pid=1, target_pid=2, code_address=0x1000, data_address=0x200000)
    view.write_header(header)
    assert view.header() == header
    assert view.latency_table.shape == (lay.latency_slots, 2)
    assert view.histograms.shape == (lay.latency_shards, lay.latency_functions, HIST_WORDS)
    t = LatencyTargets.of(lay, 0x200000, 5, 17, 0.5)
    assert t.table == 0x200000 + lay.latency_offset and t.table % (2 * LATENCY_ENTRY_SIZE) == 0
    assert t.hist == 0x200000 + lay.hist_offset + 5 * HIST_WORDS * 8
    assert t.mul == 1 << 31  # 0.5 ns per tick
    with pytest.raises(ValueError):
        LatencyTargets.of(lay, 0x200000, 5, 0x10000, 0.5)
    raw = bytearray(header.pack())
    raw[-4:] = (3).to_bytes(4, "little")  # latency_shards: not a power of two
    with pytest.raises(ValueError, match="latency_shards"):
        AreaHeader.unpack(bytes(raw))
