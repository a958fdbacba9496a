"""verdict_index: a site-cache file read as text + arrays gives, for every site, the entry that
json.loads gives; files laid out otherwise are left to json.loads."""

from __future__ import annotations

import json
import random

import pytest

from djprobe.verdict_index import parse

KEY = {"format": 1, "build_id": "ab12", "fingerprint": "0123456789abcdef"}


def _text(sites: dict, key: dict = KEY, **dumps) -> str:
    """As sites_cache.ModuleVerdicts.flush writes a file."""
    return json.dumps({**key, "sites": sites}, **({"separators": (",", ":")} | dumps))


def test_every_entry_as_json_reads_it():
    rng = random.Random(7)
    sites = {}
    for _ in range(3000):
        vaddr = rng.randrange(0x1000, 0x400000)
        if rng.random() < 0.7:
            sites[f"{vaddr:#x}"] = ["j", f"{vaddr & ~0xF:#x}", rng.randrange(5, 900), rng.randbytes(7).hex(), 0, 1]
        else:  # a refusal whose reason quotes things that look like keys
            reason = f'cannot: "{{V:{vaddr:#x}}}" ,"0x{vaddr:x}":["j"] and \\ {{"x":1}}'
            sites[f"{vaddr:#x}"] = ["r", f"{vaddr:#x}", 12, reason]
    text = _text(sites)
    index = parse(text, KEY)
    assert index is not None and len(index) == len(sites)
    expected = json.loads(text)["sites"]
    for key, entry in expected.items():
        assert index.get(int(key, 16)) == entry
    present = {int(k, 16) for k in sites}
    for vaddr in (0, 0xFFF, 0x400001, *(v + 1 for v in list(present)[:200])):
        if vaddr not in present:
            assert index.get(vaddr) is None


def test_empty_sites():
    index = parse(_text({}), KEY)
    assert index is not None and len(index) == 0 and index.get(0x1000) is None


@pytest.mark.parametrize("case", ["other key", "spaces", "truncated", "key twice", "not an object"])
def test_other_layouts_are_left_to_json(case):
    sites = {"0x10": ["j", "0x10", 9, "c3", 0, 1], "0x20": ["r", "0x20", 9, "no"]}
    text = _text(sites)
    if case == "other key":
        text = _text(sites, dict(KEY, fingerprint="x"))
    elif case == "spaces":
        text = _text(sites, separators=(", ", ": "))
    elif case == "truncated":
        text = text[: len(text) // 2]
    elif case == "key twice":
        text = text[:-2] + ',"0x10":["r","0x10",9,"again"]}}'
    else:
        text = _text(sites)[:-1] + "]"
    assert parse(text, KEY) is None


def test_entries_of_other_kinds_by_their_text_key():
    """springboard_cache.py keeps short-jump verdicts under ``s<vaddr>`` keys in the same file:
    found by their key, never taken for a site's verdict, and a site's verdict by its text key."""
    sites = {
        "0x1100": ["j", "0x1100", 40, "554889e5", 0, 1],
        "s0x11b4": ["s", "0x11a0", 60, "eb0390", 1, [[4576, 4590, 0]]],
        "0x11b4": ["r", "0x11a0", 60, 'a reason naming ,"s0x1100":["x"] in quotes'],
        "s0x1200": ["n", "0x11f0", 30],
    }
    index = parse(_text(sites), KEY)
    assert index is not None and len(index) == 2  # the sites' verdicts
    for key, entry in sites.items():
        assert index.get_key(key) == entry
    assert index.get(0x1200) is None and index.get_key("s0x1100") is None
    only_other = parse(_text({"s0x1200": ["n", "0x11f0", 30]}), KEY)
    assert only_other is not None and only_other.get_key("s0x1200") == ["n", "0x11f0", 30]
