"""The public API: what __all__ promises exists, is documented, and carries the seed's errnos."""

import errno
import inspect

import pytest

import djprobe


def test_all_names_exist_and_are_documented():
    for name in djprobe.__all__:
        obj = getattr(djprobe, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_seed_errnos():
    assert djprobe.InvalidSiteError("x").errno == errno.EINVAL
    assert djprobe.NoRoomError("x").errno == errno.ENOMEM
    assert djprobe.SiteBusyError("x").errno == errno.EBUSY
    assert djprobe.ProcessGoneError("x").errno == errno.ESRCH
    assert djprobe.TracePermissionError("x").errno == errno.EPERM
    assert issubclass(djprobe.InvalidSiteError, ValueError)
    assert issubclass(djprobe.ProcessGoneError, ProcessLookupError)
    assert issubclass(djprobe.TracePermissionError, PermissionError)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"addr": 1.5}, "int or a site spec"),
        ({"addr": "f", "size": 4}, "size"),
        ({"addr": "f", "size": 30}, "size"),
        ({"addr": "f", "handler": 3}, "callable"),
        ({"addr": "f", "registers": "some"}, "registers"),
    ],
)
def test_djprobe_rejects_bad_values(kwargs, words):
    with pytest.raises(djprobe.InvalidSiteError) as info:
        djprobe.Djprobe(**kwargs)
    assert words in str(info.value)


def test_unregistered_probe_state():
    djp = djprobe.Djprobe("libc:malloc")
    assert not djp.registered and djp.hits == 0 and djp.missed == 0
    assert "unregistered" in repr(djp)
