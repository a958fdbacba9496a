"""Where probe areas go: within rel32 reach of the site in a 64-bit process; in a 32-bit process
anywhere, at an address that reads as a number programs rarely hold."""

from __future__ import annotations

from types import SimpleNamespace

from djprobe.regions import REACH, find_gap_near

EXE32 = [(0x08048000, 0x0804D000), (0x08A23000, 0x08A45000)]  # a non-PIE executable and its heap
LIBS32 = [(0xF5CCE000, 0xF7F42000), (0xFFF00000, 0xFFFFF000)]  # thread stacks, libraries; the stack
SIZE = 0x240000


def _maps(spans):
    return [SimpleNamespace(start=a, end=b) for a, b in spans]


def test_a_32bit_area_goes_where_its_addresses_read_as_rare_numbers():
    places = find_gap_near(_maps(EXE32 + LIBS32), 0x08049000, SIZE, max_address=1 << 32, reach=None)
    first = places[0]
    assert 0x80 <= first >> 24 <= 0xBE and 0x80 <= (first + SIZE - 1) >> 24 <= 0xBE
    assert all(not (a < e and s < a + SIZE) for a in places for s, e in EXE32 + LIBS32)


def test_without_a_rare_place_free_a_32bit_area_avoids_text_and_small_numbers():
    taken = [(0x7F000000, 0xC0000000)]  # the whole rare band, and more, is mapped
    places = find_gap_near(_maps(EXE32 + taken + LIBS32), 0x08049000, SIZE, max_address=1 << 32, reach=None)
    top = places[0] >> 24
    assert not (0x20 <= top <= 0x7E or top in (0x00, 0xFF)), hex(places[0])


def test_a_64bit_area_stays_within_reach_of_its_site():
    site = 0x555555554000
    spans = [(site, site + 0x5000), (0x7FFFF7D00000, 0x7FFFF7FFF000)]
    for a in find_gap_near(_maps(spans), site, SIZE):
        assert abs(a - site) <= REACH and abs(a + SIZE - site) <= REACH
