"""The on-disk site verdict cache: same verdicts as a fresh analysis, damaged or foreign files
ignored, concurrent writers merged, nothing cached without a private directory."""

from __future__ import annotations

import json
import os
import threading

import pytest

from djprobe.sites import analyse_site
from djprobe.sites_cache import SiteCache
from djprobe.symbols import Symbols

LIBZ = "/lib/x86_64-linux-gnu/libz.so.1"


@pytest.fixture(scope="module")
def libz():
    if not os.path.exists(LIBZ):
        pytest.skip("no libz")
    symbols = Symbols.from_file(LIBZ)
    return symbols, symbols.resolve(f"{LIBZ}:*")


def _same(a, b):
    """The same verdict (a cached refusal keeps its reason, not the bytes it looked at)."""
    if not a.ok or not b.ok:
        return (a.ok, a.reason, a.site, a.at_entry, a.busy) == (b.ok, b.reason, b.site, b.at_entry, b.busy)
    return (a.size, a.original, a.flags_dead, a.at_entry, a.reason, a.site) == (
        b.size, b.original, b.flags_dead, b.at_entry, b.reason, b.site)


def test_cached_verdicts_equal_fresh_ones(tmp_path, libz):
    symbols, sites = libz
    first = SiteCache(tmp_path)
    fresh = [first.analyse(symbols, s, None) for s in sites]
    first.flush()
    assert any(not v.ok for v in fresh) and any(v.ok for v in fresh)
    second = SiteCache(tmp_path)
    cached = [second.analyse(symbols, s, None) for s in sites]
    assert second.hits == len(sites) and second.misses == 0
    for f, c, s in zip(fresh, cached, sites):
        assert _same(f, c), s.name
        assert _same(c, analyse_site(symbols, s))
        if c.ok:
            assert c.relocate_to(s.address + 0x10000).code == f.relocate_to(s.address + 0x10000).code


def _cache_file(tmp_path):
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    return path


@pytest.mark.parametrize("damage", ["truncated", "not json", "other key", "bad entries"])
def test_damaged_file_is_ignored_and_replaced(tmp_path, libz, damage):
    symbols, sites = libz
    cache = SiteCache(tmp_path)
    for s in sites:
        cache.analyse(symbols, s, None)
    cache.flush()
    path = _cache_file(tmp_path)
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        path.write_bytes(os.urandom(200))
    elif damage == "other key":
        path.write_text(text.replace('"fingerprint":"', '"fingerprint":"x'))
    else:
        doc = json.loads(text)
        doc["sites"] = {k: ["j", "0x0", 1, "zz", "a", None] for k in doc["sites"]}
        path.write_text(json.dumps(doc))
    again = SiteCache(tmp_path)
    verdicts = [again.analyse(symbols, s, None) for s in sites]
    assert again.hits == 0  # nothing trusted from the damaged file
    assert all(_same(v, analyse_site(symbols, s)) for v, s in zip(verdicts, sites))
    again.flush()
    json.loads(_cache_file(tmp_path).read_text())  # whole again


def test_concurrent_writers_merge(tmp_path, libz):
    symbols, sites = libz
    halves = [sites[::2], sites[1::2]]
    caches = [SiteCache(tmp_path) for _ in halves]
    for cache, half in zip(caches, halves):
        for s in half:
            cache.analyse(symbols, s, None)
    threads = [threading.Thread(target=c.flush) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = SiteCache(tmp_path)
    for s in sites:
        merged.analyse(symbols, s, None)
    # the last writer read the other's file before replacing it, unless both read before either
    # wrote: then the rest is analysed again, never wrong
    assert merged.hits >= len(halves[1]) or merged.hits >= len(halves[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_directory_writable_by_others_is_not_used(tmp_path, libz):
    symbols, sites = libz
    os.chmod(tmp_path, 0o777)
    cache = SiteCache(tmp_path)
    assert not cache.enabled
    os.chmod(tmp_path, 0o700)
    assert SiteCache(tmp_path).enabled
