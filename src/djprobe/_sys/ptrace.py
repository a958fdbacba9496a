"""Raw ptrace(2) for x86-64 Linux through ctypes. Policy-free: no state, no retries.

Every function raises ``OSError`` (with ``errno`` set) when the system call fails; callers
decide what an ``ESRCH`` or ``EPERM`` means. ptrace requests for a tracee must all come from
the one OS thread that attached to it: that rule is enforced one layer up (``process.py``).
"""

from __future__ import annotations

import ctypes
import os
import signal

from . import faults

# --- requests (linux/ptrace.h, asm/ptrace-abi.h) ---
PTRACE_TRACEME = 0
PTRACE_PEEKTEXT = 1
PTRACE_PEEKDATA = 2
PTRACE_PEEKUSER = 3
PTRACE_POKETEXT = 4
PTRACE_POKEDATA = 5
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_SETFPREGS = 15
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

# --- options ---
PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000
PTRACE_O_SUSPEND_SECCOMP = 0x200000

# --- events (status >> 16) ---
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

# --- waitpid ---
WNOHANG = os.WNOHANG
WUNTRACED = os.WUNTRACED
__WNOTHREAD = 0x20000000
__WALL = 0x40000000
__WCLONE = 0x80000000
WALL = __WALL

# --- siginfo si_code values used to recognise traps ---
SI_USER = 0
SI_KERNEL = 0x80
SI_QUEUE = -1
SI_TKILL = -6
TRAP_BRKPT = 1
TRAP_TRACE = 2
TRAP_BRANCH = 3
TRAP_HWBKPT = 4

# --- syscall numbers (x86-64) used here ---
SYS_tgkill = 234
SYS_rt_tgsigqueueinfo = 297

STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class UserRegs(ctypes.Structure):
    """struct user_regs_struct (sys/user.h), x86-64."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
            "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
            "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
        )
    ]  # fmt: skip


REG_NAMES: tuple[str, ...] = tuple(f[0] for f in UserRegs._fields_)


class SigInfo(ctypes.Structure):
    """siginfo_t (128 bytes) with the common header decoded."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("_union", ctypes.c_ubyte * 112),
    ]

    @property
    def si_pid(self) -> int:
        return int.from_bytes(bytes(self._union[0:4]), "little", signed=True)

    @property
    def si_addr(self) -> int:
        return int.from_bytes(bytes(self._union[0:8]), "little")

    def copy(self) -> "SigInfo":
        other = SigInfo()
        ctypes.memmove(ctypes.byref(other), ctypes.byref(self), ctypes.sizeof(SigInfo))
        return other


assert ctypes.sizeof(UserRegs) == 27 * 8
assert ctypes.sizeof(SigInfo) == 128


def _arg(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    return ctypes.addressof(value)  # a ctypes object: pass a pointer to it


def ptrace(request: int, pid: int, addr: object = 0, data: object = 0) -> int:
    """Raw ptrace(request, pid, addr, data). ``addr``/``data`` may be ints or ctypes objects
    (passed by address). Returns the result; raises OSError on failure."""
    if faults.enabled: faults.tick("ptrace", request, pid)  # fmt: skip
    ctypes.set_errno(0)
    res = _ptrace(request, pid, _arg(addr), _arg(data))
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({request:#x}, {pid}): {os.strerror(err)}")
    return res


def traceme() -> None:
    ptrace(PTRACE_TRACEME, 0)


def seize(tid: int, options: int = 0) -> None:
    ptrace(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    ptrace(PTRACE_INTERRUPT, tid)


def setoptions(tid: int, options: int) -> None:
    ptrace(PTRACE_SETOPTIONS, tid, 0, options)


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_DETACH, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def syscall_step(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: resume until the next system-call entry or exit (or signal)."""
    ptrace(PTRACE_SYSCALL, tid, 0, sig)


def getsigmask(tid: int) -> int:
    """The thread's blocked-signal mask (bit ``sig - 1`` for each signal)."""
    mask = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, 8, mask)
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    """Set the thread's blocked-signal mask (the kernel never blocks SIGKILL or SIGSTOP)."""
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.c_uint64(mask & ((1 << 64) - 1)))


class RseqConfiguration(ctypes.Structure):
    """``struct ptrace_rseq_configuration``: where a thread registered its rseq area."""

    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def get_rseq_configuration(tid: int) -> RseqConfiguration:
    """The rseq registration of a stopped thread (pointer 0: none). Linux 5.13+."""
    config = RseqConfiguration()
    ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(config), config)
    return config


def getregs(tid: int) -> UserRegs:
    regs = UserRegs()
    ptrace(PTRACE_GETREGS, tid, 0, regs)
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, regs)


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, msg)
    return msg.value


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    ptrace(PTRACE_GETSIGINFO, tid, 0, info)
    return info


def setsiginfo(tid: int, info: SigInfo) -> None:
    ptrace(PTRACE_SETSIGINFO, tid, 0, info)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``tgid``."""
    if faults.enabled: faults.tick("tgkill", tgid, tid, sig)  # fmt: skip
    ctypes.set_errno(0)
    if _syscall(ctypes.c_long(SYS_tgkill), ctypes.c_long(tgid), ctypes.c_long(tid), ctypes.c_long(sig)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def tgsigqueueinfo(tgid: int, tid: int, sig: int, info: SigInfo) -> None:
    """rt_tgsigqueueinfo: queue ``sig`` with ``info`` to a thread (the kernel refuses si_code >= 0
    and SI_TKILL when the sender is another process: EPERM)."""
    if faults.enabled: faults.tick("tgsigqueueinfo", tgid, tid, sig)  # fmt: skip
    ctypes.set_errno(0)
    res = _syscall(
        ctypes.c_long(SYS_rt_tgsigqueueinfo),
        ctypes.c_long(tgid),
        ctypes.c_long(tid),
        ctypes.c_long(sig),
        ctypes.c_void_p(ctypes.addressof(info)),
    )
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def waitpid(pid: int, options: int) -> tuple[int, int]:
    """os.waitpid (retries EINTR). Add ``WALL`` to wait for threads; ``WNOHANG`` returns (0, 0)."""
    return os.waitpid(pid, options)


# --- status decoding ---
def is_stopped(status: int) -> bool:
    return os.WIFSTOPPED(status)


def stop_signal(status: int) -> int:
    return os.WSTOPSIG(status)


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* of a stop (0 for none)."""
    return (status >> 16) & 0xFF


def is_exited(status: int) -> bool:
    return os.WIFEXITED(status)


def exit_status(status: int) -> int:
    return os.WEXITSTATUS(status)


def is_signaled(status: int) -> bool:
    return os.WIFSIGNALED(status)


def term_signal(status: int) -> int:
    return os.WTERMSIG(status)


def is_gone(status: int) -> bool:
    """The thread or process is dead (exited or killed)."""
    return os.WIFEXITED(status) or os.WIFSIGNALED(status)


def describe_status(status: int) -> str:
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"killed by {_signame(os.WTERMSIG(status))}"
    if os.WIFSTOPPED(status):
        ev = stop_event(status)
        return f"stopped by {_signame(os.WSTOPSIG(status))}" + (f" event {ev}" if ev else "")
    return f"status {status:#x}"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
