"""arch: which ELF headers are x86-64 code (real files written here, real headers read)."""

from __future__ import annotations

import errno
import sys

import pytest

from djprobe import UnsupportedTargetError
from djprobe.arch import I386, X86_64, check_elf, check_target
from djprobe.symbols import Symbols


def _header(elfclass: int, machine: int) -> bytes:
    ident = b"\x7fELF" + bytes([elfclass, 1, 1, 0]) + bytes(8)
    return ident + (2).to_bytes(2, "little") + machine.to_bytes(2, "little") + (1).to_bytes(4, "little") + bytes(40)


@pytest.mark.parametrize(
    "elfclass, machine, words",
    [
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


def test_x86_64_and_i386_files_pass_with_their_arch(tmp_path):
    assert check_elf(sys.executable) is X86_64
    assert check_target(__import__("os").getpid()) is X86_64
    path = tmp_path / "prog"
    path.write_bytes(_header(2, 62))
    assert check_elf(path) is X86_64
    path.write_bytes(_header(1, 3))
    arch = check_elf(path)
    assert arch is I386 and (arch.bits, arch.word, arch.auxv_entry, arch.syscall_insn) == (32, 4, 8, b"\xcd\x80")
    assert arch.syscalls["mmap"] == 192  # mmap2: the offset in pages
    assert arch.arguments[0] == ("stack", 4) and arch.red_zone == 0


def test_big_endian_i386_header_is_refused(tmp_path):
    path = tmp_path / "prog"
    header = bytearray(_header(1, 3))
    header[5] = 2  # ELFDATA2MSB
    header[18:20] = (3).to_bytes(2, "big")
    path.write_bytes(bytes(header))
    with pytest.raises(UnsupportedTargetError):
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
