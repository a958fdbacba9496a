"""instance.Instance: the rare attributes are class defaults, kept per instance only when set,
and the probes of an instance are a tuple."""

from __future__ import annotations

from djprobe.instance import Instance
from djprobe.probes import Djprobe


def _plain() -> Instance:
    return Instance(analysis=None, region=None, slot=5, stub=None, original=b"\x55", patched=b"\xe9")  # type: ignore[arg-type]


def test_plain_count_instance_keeps_no_dict():
    inst = _plain()
    assert (inst.action, inst.registers, inst.lossless, inst.strings, inst.host, inst.springboard) == (
        "count", "all", False, 0, None, None)
    assert (inst.old_slots, inst.drained, inst.guests, inst.removed, inst.carried_hits) == ((), (), (), False, 0)
    assert inst.probes == ()
    # nothing was stored beside the slots (reading __dict__ would create it: look at the referents)
    import gc

    assert not any(isinstance(r, dict) for r in gc.get_referents(inst))


def test_rare_attributes_are_per_instance():
    a, b = _plain(), _plain()
    a.removed = True
    a.old_slots += ((None, 1, None),)
    rec = Instance(None, None, 1, None, b"", b"", "record", "args", True, 3, springboard=0x1234)  # type: ignore[arg-type]
    assert a.removed and not b.removed and b.old_slots == () and len(a.old_slots) == 1
    assert (rec.action, rec.registers, rec.lossless, rec.strings, rec.springboard) == ("record", "args", True, 3, 0x1234)
    assert _plain().action == "count"


def test_serves():
    count = _plain()
    rec = Instance(None, None, 1, None, b"", b"", "record", "args")  # type: ignore[arg-type]
    assert count.serves(Djprobe(0x1000)) and not count.serves(Djprobe(0x1000, record=True))
    assert rec.serves(Djprobe(0x1000, record=True, registers="args"))
    assert not rec.serves(Djprobe(0x1000, record=True))  # all registers wanted, args recorded


def test_count_probe_defaults_are_not_stored():
    """Djprobe's constructor arguments left at their defaults are class defaults (no dict)."""
    import gc

    plain = Djprobe(0x1000)
    assert not any(isinstance(r, dict) for r in gc.get_referents(plain))
    assert (plain.size, plain.record, plain.registers, plain.lossless, plain.at, plain.no_jump_reason) == (
        None, False, "all", False, "entry", None)
    other = Djprobe(0x1000, 8, record=True, registers="args", lossless=True)
    assert (other.size, other.record, other.registers, other.lossless) == (8, True, "args", True)
    assert Djprobe(0x1000).size is None
