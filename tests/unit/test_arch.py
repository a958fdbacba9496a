"""arch: which ELF headers are x86-64 code (real files written here, real headers read)."""

from __future__ import annotations

import errno
import sys

import pytest

from djprobe import UnsupportedTargetError
from djprobe.arch import check_elf, check_target
from djprobe.symbols import Symbols


def _header(elfclass: int, machine: int) -> bytes:
    ident = b"\x7fELF" + bytes([elfclass, 1, 1, 0]) + bytes(8)
    return ident + (2).to_bytes(2, "little") + machine.to_bytes(2, "little") + (1).to_bytes(4, "little") + bytes(40)


@pytest.mark.parametrize(
    "elfclass, machine, words",
    [
        (1, 3, "32-bit (i386) ELF file: not supported yet"),
        (1, 62, "x32"),
        (2, 183, "64-bit aarch64 ELF file: not supported"),
        (1, 40, "32-bit arm ELF file"),
        (2, 0x9999, "machine 39321"),
    ],
)
def test_non_x86_64_headers_are_refused_with_what_they_are(tmp_path, elfclass, machine, words):
    path = tmp_path / "prog"
    path.write_bytes(_header(elfclass, machine))
    with pytest.raises(UnsupportedTargetError) as info:
        check_elf(path)
    assert words in str(info.value) and str(path) in str(info.value)
    assert info.value.errno == errno.ENOEXEC
    with pytest.raises(UnsupportedTargetError):
        Symbols.from_file(path)  # `djprobe sites FILE:sym` goes through here


def test_x86_64_passes(tmp_path):
    check_elf(sys.executable)
    check_target(__import__("os").getpid())
    path = tmp_path / "prog"
    path.write_bytes(_header(2, 62))
    check_elf(path)


def test_kernel_thread_and_missing_process():
    import os

    from djprobe import ProcessGoneError, attach

    kthread = None
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            if int(text[text.rfind(")") + 2 :].split()[6]) & 0x00200000:
                kthread = int(name)
                break
    if kthread is None:
        pytest.skip("no kernel thread visible in this pid namespace")
    with pytest.raises(UnsupportedTargetError, match="is a kernel thread"):
        attach(kthread)
    with pytest.raises(ProcessGoneError):
        check_target(999_999_999)
