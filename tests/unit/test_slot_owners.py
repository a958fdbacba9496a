"""slot_owners.SlotOwners: the (region, slot) -> instance mapping of a probed process."""

from __future__ import annotations

import pytest

from djprobe.slot_owners import SlotOwners


def test_set_get_delete_like_a_dict():
    owners: SlotOwners[str] = SlotOwners()
    reference: dict[tuple[int, int], str] = {}
    for key in [(0, 0), (0, 1023), (3, 7), (1, 0), (3, 8)]:
        owners[key] = reference[key] = f"owner{key}"
    assert len(owners) == len(reference) == 5
    for key in [(0, 0), (0, 1), (2, 5), (3, 7), (9, 9), (0, 5000)]:
        assert owners.get(key) == reference.get(key)
        assert (key in owners) == (key in reference)
    owners[(3, 7)] = reference[(3, 7)] = "again"  # replacing does not count twice
    assert len(owners) == 5 and owners[(3, 7)] == "again"
    del owners[(0, 1023)], reference[(0, 1023)]
    assert len(owners) == 4 and owners.get((0, 1023)) is None
    assert dict(owners.items()) == reference and sorted(owners.values()) == sorted(reference.values())
    with pytest.raises(KeyError):
        del owners[(0, 1023)]
    with pytest.raises(KeyError):
        owners[(5, 5)]
    with pytest.raises(KeyError):
        owners[(-1, 0)] = "x"
    with pytest.raises(ValueError):
        owners[(0, 0)] = None  # type: ignore[assignment]


def test_copy_is_independent():
    owners: SlotOwners[str] = SlotOwners()
    owners[(1, 2)] = "a"
    copy = owners.copy()
    copy[(1, 3)] = "b"
    del copy[(1, 2)]
    assert owners.get((1, 2)) == "a" and owners.get((1, 3)) is None and len(owners) == 1
    assert copy.get((1, 3)) == "b" and len(copy) == 1
