"""An area's place is chosen before the stop (regions.area_candidates) and mapped inside it; if
the target mapped those places in the meantime, the area goes where its maps of now leave room,
and probes placed after it count exactly."""

from __future__ import annotations

import time

import pytest

import djprobe
from djprobe._sys.procfs import read_maps
from djprobe.regions import area_candidates, create_region, unmap_region
from tests.conftest import TARGETS, compile_c
from tests.live.test_probes import _calls_a, _start_loop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def counts_exe():
    return compile_c(TARGETS / "counts.c", name="counts")


def test_stale_candidates_fall_back_to_the_maps_of_now(start_target, counts_exe):
    t = _start_loop(start_target, counts_exe)
    with djprobe.attach(t.pid) as proc:
        site = proc.symbols.resolve("work_a")[0].address
        fresh = area_candidates(proc.process, site, proc.layout)
        assert fresh and all(abs(c - site) < 1 << 31 for c in fresh)
        # places taken by the target's own mappings (as if it mapped them after they were read)
        taken = [m.start for m in read_maps(t.pid) if abs(m.start - site) < 1 << 30][:8]
        with proc.stopped():
            region = create_region(proc.process, site, proc.layout, candidates=taken)
        try:
            assert region.code_address not in taken and region.reaches(site)
            starts = {m.start for m in read_maps(t.pid)}
            assert region.code_address in starts and region.data_address in starts
        finally:
            with proc.stopped():
                unmap_region(proc.process, region)
            region.close_tracer_side()
        starts = {m.start for m in read_maps(t.pid)}
        assert region.code_address not in starts and region.data_address not in starts
        # the ordinary path (candidates read before the stop) places a probe that counts
        djp = djprobe.Djprobe("work_a")
        with proc.stopped():
            proc.register(djp)
            before = _calls_a(proc)
        time.sleep(0.3)
        with proc.stopped():
            proc.unregister(djp)
            after = _calls_a(proc)
    assert abs(djp.hits - (after - before)) <= 4  # a thread between the probe and its own increment
    assert djp.hits > 1000
