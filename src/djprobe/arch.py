"""The target's architecture: which one a process or an ELF file is, and what differs per mode.

:class:`Arch` is the one interface through which the rest of djprobe learns what depends on the
mode: word size, decoder bitness, register names and where arguments are, system call numbers and
instruction, auxv entry size, ELF class. :data:`X86_64` and :data:`I386` are its instances;
:func:`check_elf_header` / :func:`check_elf` / :func:`check_target` return the one a file or a
process is, and refuse everything else up front with :class:`UnsupportedTargetError` (x32,
ELFCLASS32 + EM_X86_64, and other machines). A process whose mode is not in :data:`LIVE_ARCHES`
(files only for now) is refused too. Reading the header needs no ptrace request.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from ._sys.procfs import proc_dir
from .errors import ProcessGoneError, TracePermissionError, UnsupportedTargetError

__all__ = ["Arch", "X86_64", "I386", "ARCHES", "LIVE_ARCHES", "PROCESS_ARCHES", "check_target", "check_elf", "check_elf_header", "elf_machine"]

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


@dataclass(frozen=True)
class Arch:
    """What djprobe needs to know about one processor mode (x86-64 or i386).

    Everything mode-dependent is read from here, not decided by branches in other modules; an
    aarch64 port would be one more instance plus its decoder/relocator/stub modules (see
    docs/internals.md).
    """

    name: str  #: "x86-64", "i386"
    elfclass: int  #: ELF class of its files (1: ELFCLASS32, 2: ELFCLASS64)
    e_machine: int  #: ELF e_machine
    bits: int  #: decoder/encoder bitness (iced-x86 ``Decoder(bits, ...)``)
    word: int  #: bytes of a pointer / machine word
    auxv_entry: int  #: bytes of one auxv entry (key + value)
    syscall_insn: bytes  #: the system call instruction (``syscall`` or ``int 0x80``)
    syscalls: dict = field(repr=False, compare=False)  #: name -> number
    #: general-purpose registers in the order the handler's ``regs`` shows them
    registers: tuple = field(repr=False, compare=False)
    #: where argument i of a function is at its first instruction: a register name, or
    #: ("stack", offset from the stack pointer) for cdecl arguments
    arguments: tuple = field(repr=False, compare=False)
    stack_pointer: str = "rsp"
    return_register: str = "rax"
    red_zone: int = 0  #: bytes below the stack pointer a leaf function may use (128 on x86-64)
    #: probe areas go below this address (the end of the user address space)
    address_limit: int = 0x7FFFFFFFF000
    #: how far a probe's ``jmp rel32`` reaches (None: everywhere, the 32-bit wrap)
    jump_reach: int | None = (1 << 31) - (1 << 24)

    @property
    def word_mask(self) -> int:
        return (1 << (8 * self.word)) - 1

    @property
    def word_format(self) -> str:
        """struct format of one little-endian word ("<Q" or "<I")."""
        return "<Q" if self.word == 8 else "<I"

    def __str__(self) -> str:
        return self.name


X86_64 = Arch(
    name="x86-64",
    elfclass=2,
    e_machine=62,
    bits=64,
    word=8,
    auxv_entry=16,
    syscall_insn=b"\x0f\x05",
    syscalls={"mmap": 9, "munmap": 11, "mprotect": 10, "openat": 257, "close": 3, "madvise": 28,
              "rt_sigprocmask": 14, "getpid": 39, "gettid": 186},
    registers=("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
               "r14", "r15", "rflags"),
    arguments=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
    stack_pointer="rsp",
    return_register="rax",
    red_zone=128,
)

I386 = Arch(
    name="i386",
    elfclass=1,
    e_machine=3,
    bits=32,
    word=4,
    auxv_entry=8,
    syscall_insn=b"\xcd\x80",
    # mmap is mmap2 (offset in pages); openat, madvise ... have their own i386 numbers
    syscalls={"mmap": 192, "munmap": 91, "mprotect": 125, "openat": 295, "close": 6, "madvise": 219,
              "rt_sigprocmask": 175, "getpid": 20, "gettid": 224},
    registers=("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eflags"),
    arguments=(("stack", 4), ("stack", 8), ("stack", 12), ("stack", 16), ("stack", 20), ("stack", 24)),
    stack_pointer="esp",
    return_register="eax",
    red_zone=0,
    address_limit=0xFFFFE000,  # TASK_SIZE of a 32-bit task on x86-64 (the vDSO page above)
    jump_reach=None,
)

#: every mode djprobe knows, by (ELF class, e_machine)
ARCHES = {(a.elfclass, a.e_machine): a for a in (X86_64, I386)}
#: modes whose processes djprobe probes (and so attaches to by default): the others, files only
LIVE_ARCHES = frozenset({X86_64, I386})
#: modes the process layer handles (attach, spawn, injected system calls): ``Process(pid,
#: arches=PROCESS_ARCHES)``
PROCESS_ARCHES = frozenset({X86_64, I386})


def elf_machine(header: bytes) -> tuple[int, str] | None:
    """(ELF class, machine name) from the first 20 bytes of an ELF file, None if not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "little" if header[5] == 1 else "big"
    machine = int.from_bytes(header[18:20], order)
    return header[4], MACHINES.get(machine, f"machine {machine}")


def check_elf_header(header: bytes, what: str, arches: frozenset = LIVE_ARCHES) -> Arch | None:
    """The :class:`Arch` of ``header`` (the start of an ELF file); UnsupportedTargetError unless
    it is x86-64 or i386 code. ``what`` names the process or file in the message ("process 123
    (prog)", "/bin/prog"). Data that is not ELF gives None: the caller reports that in its own
    terms."""
    found = elf_machine(header)
    if found is None:
        return None
    elfclass, machine = found
    kind = "process" if what.startswith("process ") else "ELF file"
    order = "little" if header[5] == 1 else "big"
    arch = ARCHES.get((elfclass, int.from_bytes(header[18:20], order)))
    if arch is not None and order == "little":
        if kind == "process" and arch not in arches:
            raise UnsupportedTargetError(f"{what}: 32-bit ({arch.name}) {kind}: not supported yet", machine=machine)
        return arch
    if machine == "x86-64":  # ELFCLASS32 + EM_X86_64
        raise UnsupportedTargetError(f"{what}: x32 (32-bit x86-64 ABI) {kind}: not supported", machine="x32")
    bits = {_ELFCLASS32: "32-bit ", _ELFCLASS64: "64-bit "}.get(elfclass, "")
    raise UnsupportedTargetError(
        f"{what}: {bits}{machine} {kind}: not supported (djprobe handles x86-64 and i386 code only)", machine=machine
    )


def check_elf(path: str | os.PathLike) -> Arch | None:
    """The :class:`Arch` of the ELF file at ``path`` (None if it is not ELF); UnsupportedTargetError
    if it is neither x86-64 nor i386 code.

    Raises OSError if it cannot be read."""
    with open(path, "rb") as f:
        return check_elf_header(f.read(20), os.fspath(path))


def check_target(pid: int, arches: frozenset = LIVE_ARCHES) -> Arch:
    """The :class:`Arch` of process ``pid``, judged by the ELF header of its executable;
    UnsupportedTargetError if it is not one of ``arches`` (default: the modes djprobe can probe).
    Makes no ptrace request.

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
    arch = check_elf_header(header, f"process {pid} ({_comm(pid)})", arches)
    if arch is None:
        raise UnsupportedTargetError(f"process {pid} ({_comm(pid)}): its executable is not an ELF file", machine="")
    return arch


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
