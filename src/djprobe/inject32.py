"""System calls injected into a stopped 32-bit (i386) thread: the i386 form of :mod:`djprobe.inject`.

The same protocol as the x86-64 injector (frame on the thread's stack, a trampoline in dead bytes of
an executable file mapping, every signal blocked, ``PTRACE_SYSCALL`` entry and exit stops, no
single-step, the thread restores itself if the tracer dies), with what differs in 32-bit code:
the trampoline is 32-bit code entered with ``int 0x80`` and i386 call numbers, arguments go in
``ebx, ecx, edx, esi, edi, ebp``, the frame holds 4-byte words, and the jump back is ``jmp [abs32]``
(no RIP-relative operand). A 64-bit tracer sees a 32-bit tracee's registers in the 64-bit
``user_regs_struct`` (upper halves zero), which is what is saved and restored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._sys import ptrace as pt
from .arch import I386


if TYPE_CHECKING:  # pragma: no cover
    from .inject import Injector
    from .process import Thread

__all__ = ["FRAME_REGS32", "FRAME_SIZE32", "trampoline32", "build_frame32", "restart_state32", "syscall32"]

_U32 = 0xFFFFFFFF
SYS_restart_syscall32 = 0
SIG_SETMASK = 2
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = -512, -513, -514, -516
_ERESTART = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})
_TRAP_FLAG = 0x100
#: the argument registers of ``int 0x80``, by their names in the 64-bit user_regs_struct
ARG_REGS32 = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp")

#: Registers in the frame, lowest address first (the trampoline pops them in this order), then
#: eflags, esp and the 8-byte signal mask.
FRAME_REGS32 = ("rdi", "rsi", "rbp", "rbx", "rdx", "rcx", "rax")
_FLAGS_AT = 4 * len(FRAME_REGS32)
_ESP_AT = _FLAGS_AT + 4
_MASK_AT = _ESP_AT + 4
FRAME_SIZE32 = _MASK_AT + 8
_POP32 = {"rdi": b"\x5f", "rsi": b"\x5e", "rbp": b"\x5d", "rbx": b"\x5b", "rdx": b"\x5a", "rcx": b"\x59", "rax": b"\x58"}

_BODY = b"".join(
    [
        b"\xcd\x80",  # int 0x80                      the injected call
        b"\xb8" + I386.syscalls["rt_sigprocmask"].to_bytes(4, "little"),  # mov eax, 175 (only if the tracer died)
        b"\xbb" + SIG_SETMASK.to_bytes(4, "little"),  # mov ebx, SIG_SETMASK
        b"\x8d\x8c\x24" + _MASK_AT.to_bytes(4, "little"),  # lea ecx, [esp + mask]
        b"\x31\xd2",  # xor edx, edx
        b"\xbe\x08\x00\x00\x00",  # mov esi, 8
        b"\xcd\x80",  # int 0x80                      rt_sigprocmask(SIG_SETMASK, &mask, 0, 8)
        *(_POP32[name] for name in FRAME_REGS32),  # pop edi ... pop eax
        b"\x9d",  # popfd
        b"\x5c",  # pop esp                       the thread's own stack pointer
    ]
)
TRAMPOLINE32_SIZE = len(_BODY) + 6 + 4


def trampoline32(address: int, resume_at: int) -> bytes:
    """The trampoline placed at ``address``, jumping back to ``resume_at`` (``jmp [abs32]`` to a
    literal right after it)."""
    literal = (address + len(_BODY) + 6) & _U32
    return _BODY + b"\xff\x25" + literal.to_bytes(4, "little") + (resume_at & _U32).to_bytes(4, "little")


def _signed32(v: int) -> int:
    v &= _U32
    return v - (1 << 32) if v >> 31 else v


def restart_state32(regs: "object") -> tuple[int, int]:
    """(eip, eax) with which a 32-bit thread stopped with ``regs`` resumes when nothing else runs
    it (see :func:`djprobe.inject.restart_state`; ``int 0x80`` is 2 bytes like ``syscall``, and a
    ``sysenter`` in the vDSO restarts at the ``int 0x80`` before its return point)."""
    orig = regs.orig_rax & _U32  # type: ignore[attr-defined]
    rax = _signed32(regs.rax)  # type: ignore[attr-defined]
    if orig != _U32 and rax in _ERESTART:
        nr = SYS_restart_syscall32 if rax == ERESTART_RESTARTBLOCK else orig
        return (regs.rip - 2) & _U32, nr  # type: ignore[attr-defined]
    return regs.rip & _U32, regs.rax & _U32  # type: ignore[attr-defined]


def build_frame32(regs: "object", sigmask: int) -> bytes:
    """The frame the 32-bit trampoline restores a thread from."""
    _, eax = restart_state32(regs)
    values = [eax if name == "rax" else getattr(regs, name) & _U32 for name in FRAME_REGS32]
    values += [(regs.eflags & ~_TRAP_FLAG) & _U32, regs.rsp & _U32]  # type: ignore[attr-defined]
    return b"".join(v.to_bytes(4, "little") for v in values) + (sigmask & ((1 << 64) - 1)).to_bytes(8, "little")


def syscall32(injector: "Injector", thread: "Thread", nr: int, args: Sequence[object], *, data: bytes, timeout: float) -> int:
    """:meth:`djprobe.inject.Injector.syscall` for a thread of a 32-bit process: system call
    ``nr`` (an i386 number) run with ``int 0x80``; returns -errno, or the 32-bit result unsigned."""
    from .inject import DATA, TRAMPOLINE_SIZE, _NoRoom

    assert TRAMPOLINE32_SIZE <= TRAMPOLINE_SIZE  # it goes in the same dead bytes
    process = injector.process
    saved = thread.regs()
    esp = saved.rsp & _U32
    top = (esp - 256 - len(data)) & ~0xF
    frame_at = (top - FRAME_SIZE32) & ~0xF
    data_at = frame_at + FRAME_SIZE32 + 16
    for m in process.maps():
        if m.start <= esp < m.end:
            if not ((m.path == "[stack]" or (m.path == "" and m.writable and m.readable)) and frame_at - 4096 >= m.start):
                raise _NoRoom(f"thread {thread.tid}: no room on its stack for the frame")
            break
    else:
        raise _NoRoom(f"thread {thread.tid}: its stack pointer is in no mapping")
    tid = thread.tid
    try:
        mask = pt.getsigmask(tid)
    except OSError as exc:
        raise process._thread_error(thread, exc) from exc
    resume_at, _ = restart_state32(saved)
    blob = build_frame32(saved, mask)
    if data:
        blob = blob + bytes(data_at - frame_at - FRAME_SIZE32) + data
    process.write(frame_at, blob)
    tramp = injector._write_trampoline(resume_at, trampoline32)
    regs = saved.copy()
    regs.rip = tramp
    regs.rsp = frame_at
    regs.rax = nr
    regs.orig_rax = -1 & ((1 << 64) - 1)  # leaving this stop must not restart an interrupted call
    regs.eflags &= ~_TRAP_FLAG
    for name, value in zip(ARG_REGS32, args):
        setattr(regs, name, data_at if value is DATA else int(value) & _U32)  # type: ignore[call-overload]
    thread.set_regs(regs)
    try:
        try:
            pt.setsigmask(tid, (1 << 64) - 1)
        except OSError as exc:
            raise process._thread_error(thread, exc) from exc
        injector._run_call(thread, nr, tramp, timeout)
        result = _signed32(thread.regs().rax)
        return result if -4096 < result < 0 else result & _U32  # -errno, else an unsigned value (an address)
    finally:
        if not thread.gone:
            try:
                pt.setsigmask(tid, mask)
            except OSError:
                pass
            thread.set_regs(saved)



