"""Is a process or an ELF file x86-64 code? Checked before anything touches a target.

djprobe decodes, relocates and injects 64-bit x86 code only. A 32-bit (i386) process given a
64-bit ``syscall`` dies of SIGILL, and 32-bit code decoded as 64-bit gives wrong verdicts, so a
process whose executable (``/proc/PID/exe``) or a file whose ELF header is not ELFCLASS64 +
EM_X86_64 is refused up front with :class:`UnsupportedTargetError` (x32, ELFCLASS32 + EM_X86_64,
is refused too). Reading the header needs no ptrace request.
"""

from __future__ import annotations

import errno
import os

from ._sys.procfs import proc_dir
from .errors import ProcessGoneError, TracePermissionError, UnsupportedTargetError

__all__ = ["check_target", "check_elf", "check_elf_header", "elf_machine"]

_ELFCLASS32, _ELFCLASS64 = 1, 2
_EM_X86_64 = 62
#: e_machine values a user may meet, by name (the rest are shown as numbers).
MACHINES = {
    2: "sparc",
    3: "i386",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390",
    40: "arm",
    43: "sparcv9",
    50: "ia64",
    62: "x86-64",
    183: "aarch64",
    243: "riscv",
    258: "loongarch",
}


def elf_machine(header: bytes) -> tuple[int, str] | None:
    """(ELF class, machine name) from the first 20 bytes of an ELF file, None if not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "little" if header[5] == 1 else "big"
    machine = int.from_bytes(header[18:20], order)
    return header[4], MACHINES.get(machine, f"machine {machine}")


def check_elf_header(header: bytes, what: str) -> None:
    """Raise UnsupportedTargetError unless ``header`` (the start of an ELF file) is x86-64
    64-bit code. ``what`` names the process or file in the message ("process 123 (prog)",
    "/bin/prog"). Data that is not ELF passes: the caller reports that in its own terms."""
    found = elf_machine(header)
    if found is None:
        return
    elfclass, machine = found
    kind = "process" if what.startswith("process ") else "ELF file"
    if elfclass == _ELFCLASS64 and machine == "x86-64":
        return
    if machine == "x86-64":  # ELFCLASS32 + EM_X86_64
        raise UnsupportedTargetError(f"{what}: x32 (32-bit x86-64 ABI) {kind}: not supported", machine="x32")
    if machine == "i386":
        raise UnsupportedTargetError(f"{what}: 32-bit (i386) {kind}: not supported yet", machine=machine)
    bits = {_ELFCLASS32: "32-bit ", _ELFCLASS64: "64-bit "}.get(elfclass, "")
    raise UnsupportedTargetError(
        f"{what}: {bits}{machine} {kind}: not supported (djprobe handles x86-64 code only)", machine=machine
    )


def check_elf(path: str | os.PathLike) -> None:
    """Raise UnsupportedTargetError if the ELF file at ``path`` is not x86-64 64-bit code.

    Raises OSError if it cannot be read."""
    with open(path, "rb") as f:
        check_elf_header(f.read(20), os.fspath(path))


def check_target(pid: int) -> None:
    """Raise UnsupportedTargetError if process ``pid`` does not run x86-64 64-bit code, judged
    by the ELF header of its executable. Makes no ptrace request.

    Raises ProcessGoneError, TracePermissionError (the executable may not be read),
    UnsupportedTargetError.
    """
    base = proc_dir(pid)
    try:
        with open(f"{base}/exe", "rb") as f:
            header = f.read(20)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise TracePermissionError(f"cannot read the executable of process {pid}: {exc.strerror}") from exc
        if _is_kernel_thread(pid):
            raise UnsupportedTargetError(f"process {pid} ({_comm(pid)}) is a kernel thread", machine="") from exc
        raise ProcessGoneError(f"no such process: {pid} (it exited)") from exc
    check_elf_header(header, f"process {pid} ({_comm(pid)})")


_PF_KTHREAD = 0x00200000


def _is_kernel_thread(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return False
    fields = text[text.rfind(")") + 2 :].split()
    return len(fields) > 6 and int(fields[6]) & _PF_KTHREAD != 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
