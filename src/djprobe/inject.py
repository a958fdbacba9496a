"""System calls run inside a stopped target, safe if the tracer dies at any instant.

The tracer never leaves a thread pointing at injected state that only the tracer can undo. To run
a system call in a stopped thread it:

1. writes a *frame* on the thread's stack, below the red zone: the thread's general-purpose
   registers, flags, stack pointer and signal mask, as the thread must resume;
2. writes a small *trampoline* into dead bytes of an executable file mapping (the tail of the last
   page of an executable ``PT_LOAD`` segment, past the segment's end: mapped, never executed or
   read by the program): ``syscall``, then code that restores the signal mask
   (``rt_sigprocmask``), pops every register from the frame, restores flags and ``rsp`` and jumps
   back to where the thread was (the address is kept in the trampoline itself);
3. points the thread at the trampoline with the call's number and arguments, blocks every signal
   in it (``PTRACE_SETSIGMASK``: nothing is taken off the signal queues while it runs, so no signal
   is ever lost or re-sent), and resumes it with ``PTRACE_SYSCALL``: it stops at the entry and at
   the exit of the call, never single-stepped (a dead tracer would leave the trap flag set);
4. at the exit stop reads the result, then puts back the mask and the registers itself.

If the tracer dies before step 4, the kernel detaches the thread, which runs the rest of the
trampoline: the call completes, the registers, flags and mask come back from the frame and the
thread continues where it was. A thread that was stopped inside an interrupted system call
resumes, in that case, as the kernel would resume it without a handler to run: at the ``syscall``
instruction again with the call number restored (``restart_syscall`` for
``ERESTART_RESTARTBLOCK``), so the call is restarted. If it dies after step 4, the thread is as it
was. The dead bytes are given back before the world is resumed (:meth:`Injector.restore`).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from elftools.elf.elffile import ELFFile

from ._sys import ptrace as pt
from .errors import DjprobeError, TargetFaultError

if TYPE_CHECKING:  # pragma: no cover
    from .process import Process, Thread

__all__ = ["Injector", "TRAMPOLINE", "FRAME_REGS", "FRAME_SIZE", "RED_ZONE", "restart_state"]

_MASK64 = (1 << 64) - 1
SYS_rt_sigprocmask = 14
SYS_restart_syscall = 219
SIG_SETMASK = 2
RED_ZONE = 128
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = -512, -513, -514, -516
_ERESTART = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})
_TRAP_FLAG = 0x100

#: Registers in the frame, lowest address first (the trampoline pops them in this order), then
#: rflags, rsp and the signal mask.
FRAME_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi")
_FLAGS_AT = 8 * len(FRAME_REGS)
_RSP_AT = _FLAGS_AT + 8
_MASK_AT = _RSP_AT + 8
FRAME_SIZE = _MASK_AT + 8

_POP = {
    "r15": b"\x41\x5f", "r14": b"\x41\x5e", "r13": b"\x41\x5d", "r12": b"\x41\x5c", "rbp": b"\x5d",
    "rbx": b"\x5b", "r11": b"\x41\x5b", "r10": b"\x41\x5a", "r9": b"\x41\x59", "r8": b"\x41\x58",
    "rax": b"\x58", "rcx": b"\x59", "rdx": b"\x5a", "rsi": b"\x5e", "rdi": b"\x5f",
}

#: The trampoline without its last 8 bytes (the address to jump back to). rsp points at the frame.
TRAMPOLINE = b"".join(
    [
        b"\x0f\x05",  # syscall                      the injected call
        b"\xb8" + SYS_rt_sigprocmask.to_bytes(4, "little"),  # mov eax, 14   (only if the tracer died)
        b"\xbf" + SIG_SETMASK.to_bytes(4, "little"),  # mov edi, SIG_SETMASK
        b"\x48\x8d\xb4\x24" + _MASK_AT.to_bytes(4, "little"),  # lea rsi, [rsp + mask]
        b"\x31\xd2",  # xor edx, edx
        b"\x41\xba\x08\x00\x00\x00",  # mov r10d, 8
        b"\x0f\x05",  # syscall                      rt_sigprocmask(SIG_SETMASK, &mask, 0, 8)
        *(_POP[name] for name in FRAME_REGS),  # pop r15 ... pop rdi
        b"\x9d",  # popfq
        b"\x5c",  # pop rsp                       the thread's own stack pointer
        b"\xff\x25\x00\x00\x00\x00",  # jmp [rip + 0]   to the address that follows
    ]
)
TRAMPOLINE_SIZE = len(TRAMPOLINE) + 8
#: Where the thread stops when the injected call has returned (its syscall-exit stop shows this rip).
_AFTER_SYSCALL = 2

_SIGNALS_ALL = _MASK64
_SYSCALL_TRAP = signal.SIGTRAP | 0x80


def restart_state(regs: "object") -> tuple[int, int]:
    """(rip, rax) with which a thread stopped with registers ``regs`` resumes when nothing else
    runs it: inside an interrupted, restartable system call the kernel moves rip back onto the
    ``syscall`` instruction and restores the call number (``restart_syscall`` for
    ``ERESTART_RESTARTBLOCK``); otherwise rip and rax as they are."""
    orig = regs.orig_rax & _MASK64  # type: ignore[attr-defined]
    rax = regs.rax & _MASK64  # type: ignore[attr-defined]
    signed_rax = rax - (1 << 64) if rax >> 63 else rax
    if orig >> 63 == 0 and signed_rax in _ERESTART:
        nr = SYS_restart_syscall if signed_rax == ERESTART_RESTARTBLOCK else orig
        return (regs.rip - 2) & _MASK64, nr  # type: ignore[attr-defined]
    return regs.rip, rax  # type: ignore[attr-defined]


def build_frame(regs: "object", sigmask: int) -> bytes:
    """The frame the trampoline restores a thread from, for a thread stopped with ``regs``."""
    _, rax = restart_state(regs)
    values = [rax if name == "rax" else getattr(regs, name) & _MASK64 for name in FRAME_REGS]
    values += [(regs.eflags & ~_TRAP_FLAG) & _MASK64, regs.rsp & _MASK64, sigmask & _MASK64]  # type: ignore[attr-defined]
    return b"".join(v.to_bytes(8, "little") for v in values)


@dataclass
class _DeadSpace:
    address: int
    mapping: object  # the MapEntry it lies in: the place is trusted only while that mapping is there
    original: bytes | None = None  # the bytes under the trampoline while it is written


def dead_code_space(pid: int, maps: Sequence, size: int) -> list[tuple[int, object]]:
    """(address, mapping) of at least ``size`` bytes in executable file mappings of ``pid`` that
    the program never executes or reads: past the end of the executable ``PT_LOAD`` segment, up
    to the end of the mapping's last page, outside every other segment. Dynamic loader first."""
    found = []
    for m in maps:
        if not (m.executable and m.readable and m.is_file):
            continue
        try:
            with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
                elf = ELFFile(f)
                loads = [s.header for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        except Exception:  # noqa: BLE001 - not an ELF file we can read: skip it
            continue
        segment = next(
            (s for s in loads if s.p_flags & 1 and s.p_offset <= m.offset < s.p_offset + s.p_filesz),
            None,
        )
        if segment is None or not loads:
            continue
        bias = m.start - (segment.p_vaddr - (segment.p_offset - m.offset))
        start = bias + segment.p_vaddr + max(segment.p_filesz, segment.p_memsz)
        start = (start + 15) & ~15
        end = m.end
        if any(s is not segment and bias + s.p_vaddr < end and start < bias + s.p_vaddr + s.p_memsz for s in loads):
            continue
        if start < m.start or end - start < size:
            continue
        found.append((0 if "ld-linux" in m.path or "/ld-" in m.path else 1, start, m))
    return [(address, m) for _, address, m in sorted(found, key=lambda f: f[:2])]


class Injector:
    """Runs system calls in the threads of one stopped :class:`Process` (see the module doc)."""

    def __init__(self, process: "Process") -> None:
        self.process = process
        self._space: _DeadSpace | None = None

    # -- the trampoline's place ---------------------------------------------------------------
    def find_space(self) -> int:
        """Where the trampoline goes (looked for once, checked against the maps at each call;
        reads only /proc and the mapped files, so it may run while the target runs)."""
        return self._space_address()

    def _space_address(self) -> int:
        space = self._space
        maps = self.process.maps()
        if space is not None and space.mapping in maps:
            return space.address
        # First use, or the mapping is gone (an exec, a dlclose): look again, never write blindly.
        candidates = dead_code_space(self.process._proc_tid, maps, TRAMPOLINE_SIZE)
        if not candidates:
            raise DjprobeError(
                f"process {self.process.pid}: no unused bytes in its executable mappings to run a "
                "system call from safely; nothing was changed"
            )
        address, mapping = candidates[0]
        self._space = _DeadSpace(address, mapping)
        return address

    def _write_trampoline(self, resume_at: int, build=None) -> int:
        """Write the trampoline (``build(address, resume_at)`` gives its bytes: the i386 one)."""
        address = self._space_address()
        space = self._space
        assert space is not None
        if space.original is None:
            space.original = self.process.read(address, TRAMPOLINE_SIZE)
        code = build(address, resume_at) if build is not None else TRAMPOLINE + (resume_at & _MASK64).to_bytes(8, "little")
        self.process.write(address, code)
        return address

    def restore(self) -> None:
        """Give back the bytes under the trampoline (world stopped, no thread in it)."""
        space = self._space
        if space is None or space.original is None:
            return
        end = space.address + TRAMPOLINE_SIZE
        for thread in self.process.threads.values():
            if not thread.gone and space.address <= thread.regs().rip < end:
                return  # cannot happen on the normal path; leaving it is harmless
        try:
            self.process.write(space.address, space.original)
        except DjprobeError:
            pass
        space.original = None

    # -- running a call -----------------------------------------------------------------------
    def _frame_address(self, thread: "Thread", rsp: int, data_size: int) -> int:
        """Where the frame (and ``data_size`` bytes above it) go: below the red zone, inside the
        mapping of the thread's stack, leaving a page above the mapping's start."""
        top = (rsp - RED_ZONE - 128 - data_size) & ~0xF
        frame = (top - FRAME_SIZE) & ~0xF
        for m in self.process.maps():
            if m.start <= rsp < m.end:
                stacky = m.path == "[stack]" or (m.path == "" and m.writable and m.readable)
                if stacky and frame - 4096 >= m.start:
                    return frame
                break
        raise _NoRoom(f"thread {thread.tid}: no room on its stack for the frame")

    def syscall(
        self,
        thread: "Thread",
        nr: int,
        args: Sequence[int],
        *,
        data: bytes = b"",
        timeout: float,
    ) -> int:
        """Run system call ``nr`` in ``thread`` (stopped) and return the raw result (signed,
        -errno on failure). ``data`` is copied onto the thread's stack first; an argument equal to
        :data:`DATA` is replaced by its address. Registers and signal mask are exactly restored.

        Raises ProcessGoneError, TargetTimeoutError, TargetFaultError, DjprobeError.
        """
        if self.process.arch.bits == 32:  # int 0x80 from 32-bit code: djprobe.inject32
            from .inject32 import syscall32

            return syscall32(self, thread, nr, args, data=data, timeout=timeout)
        process = self.process
        saved = thread.regs()
        frame_at = self._frame_address(thread, saved.rsp, len(data))
        data_at = frame_at + FRAME_SIZE + 16
        tid = thread.tid
        try:
            mask = pt.getsigmask(tid)
        except OSError as exc:
            raise process._thread_error(thread, exc) from exc
        resume_at, _ = restart_state(saved)
        blob = build_frame(saved, mask)
        if data:
            blob = blob + bytes(data_at - frame_at - FRAME_SIZE) + data
        process.write(frame_at, blob)
        tramp = self._write_trampoline(resume_at)
        regs = saved.copy()
        regs.rip = tramp
        regs.rsp = frame_at
        regs.rax = nr
        regs.orig_rax = -1  # leaving this stop must not restart an interrupted call
        regs.eflags &= ~_TRAP_FLAG
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, data_at if value is DATA else value)
        thread.set_regs(regs)
        try:
            try:
                pt.setsigmask(tid, _SIGNALS_ALL)
            except OSError as exc:
                raise process._thread_error(thread, exc) from exc
            self._run_call(thread, nr, tramp, timeout)
            return thread.regs().signed("rax")
        finally:
            if not thread.gone:
                try:
                    pt.setsigmask(tid, mask)
                except OSError:
                    pass
                thread.set_regs(saved)

    def _run_call(self, thread: "Thread", nr: int, tramp: int, timeout: float) -> None:
        """Resume ``thread`` with PTRACE_SYSCALL until the exit stop of its call."""
        process = self.process
        tid = thread.tid
        deadline = time.monotonic() + timeout
        entered = False
        sig = 0
        while True:
            event, stop_sig = process._resume_until_stop(thread, pt.syscall_step, sig, deadline, f"system call {nr}", timeout)
            sig = 0
            if event:
                continue  # a group stop or an interrupt: go on with the call
            if stop_sig == _SYSCALL_TRAP:
                regs = thread.regs()
                if regs.rip != tramp + _AFTER_SYSCALL:
                    raise DjprobeError(f"process {process.pid}: injected system call {nr} stopped at {regs.rip:#x}")
                if entered:
                    return
                entered = True
                continue
            info = process._siginfo(tid)
            if stop_sig == signal.SIGSTOP:
                sig = stop_sig  # job control from outside (never blocked): let it take effect
                continue
            if 0 < info.si_code < pt.SI_KERNEL:  # raised by the instruction itself
                raise TargetFaultError(
                    f"process {process.pid} thread {tid}: {_signame(stop_sig)} during system call {nr}",
                    address=info.si_addr,
                )
            # Any other signal here was sent despite the mask (SIGKILL is never reported): the
            # kernel queued it for us, so passing it on keeps it pending for the thread.
            sig = stop_sig


class _NoRoom(DjprobeError):
    pass


class _Data:
    def __repr__(self) -> str:
        return "DATA"


#: Placeholder argument: the address of the ``data`` bytes copied to the target's stack.
DATA = _Data()


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
