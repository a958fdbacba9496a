"""A traced process: stop and resume the world, threads, registers, single-step, injection.

The tracer is *not* attached while the target runs normally. Every operation that changes the
target stops the world first (:meth:`Process.stop`: ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` of
every thread, threads created meanwhile collected through ``PTRACE_O_TRACECLONE``), does its work,
and then detaches every thread (:meth:`Process.resume`) so that the target runs untraced at full
speed. If the tracer dies, the kernel detaches and the target keeps running (no ``EXITKILL``).

ptrace belongs to the OS thread that attached: every request made while the world is stopped must
come from that thread (:class:`TracerStateError` otherwise).

Signals are never taken off a queue by the tracer, so none is lost or re-sent. A thread that
dequeued a signal just as it was seized (a signal-delivery-stop) is let go with that signal at
once, exactly as the kernel would deliver it, and stopped again by the pending interrupt. A thread
that the tracer runs for its own purposes (:meth:`Process.syscall`, :meth:`Thread.step`) has every
signal blocked meanwhile (``PTRACE_SETSIGMASK``), so pending signals stay queued; its mask is put
back before the world is resumed. Signals sent while the world is stopped stay pending and are
delivered after :meth:`Process.resume`.

Dying tracer. At every instant of every operation, a tracer killed there leaves each thread able
to go on as it was: no thread is left pointing at injected state (:mod:`.inject` runs system calls
through a trampoline that restores the thread by itself), nothing is single-stepped by the library
(a dead tracer would leave the trap flag set), and a jump being written is undone by
``djprobe cleanup``.
"""

from __future__ import annotations

import errno as _errno
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from ._sys import ptrace as pt
from ._sys.procfs import MapEntry, ProcessMemory, read_maps
from .arch import LIVE_ARCHES, Arch, check_elf_header, check_target
from .inject import DATA, Injector, _NoRoom
from .errors import (
    DjprobeError,
    ProcessGoneError,
    RemoteSyscallError,
    TargetFaultError,
    TargetTimeoutError,
    TracePermissionError,
    TracerStateError,
)

__all__ = [
    "Registers",
    "Thread",
    "Process",
    "TracerStateError",
    "TargetTimeoutError",
    "RemoteSyscallError",
]

#: Options for every seized thread. No PTRACE_O_EXITKILL: if the tracer dies the target lives on.
#: TRACESYSGOOD marks the system-call stops of injected calls.
SEIZE_OPTIONS = pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACESYSGOOD

_MASK64 = (1 << 64) - 1
_ERESTART = frozenset({-512, -513, -514, -516})  # ERESTARTSYS NOINTR NOHAND RESTART_RESTARTBLOCK
_ALL_SIGNALS = _MASK64
_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
_STEP_CODES = frozenset({pt.TRAP_BRKPT, pt.TRAP_TRACE, pt.TRAP_HWBKPT})

SYS_read = 0
SYS_close = 3
SYS_mmap = 9
SYS_munmap = 11
SYS_getpid = 39
SYS_openat = 257
AT_FDCWD = -100
AT_ENTRY = 9

DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_STEP_TIMEOUT = 5.0
#: One attempt to stop every thread lasts at most this long; a thread that has not stopped by
#: then (uninterruptible sleep, a vfork parent) lets the others run again before the next attempt.
STOP_ATTEMPT_SECONDS = 0.02


TRAP_FLAG = 0x100
# Flags popfq restores in user mode: CF PF AF ZF SF DF OF AC ID (never TF, IF, IOPL, VM, RF here).
POPF_MASK = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x40000 | 0x200000


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass
class Registers:
    """A snapshot of ``struct user_regs_struct``, each field an unsigned 64-bit Python int.

    Values may be set negative (e.g. ``orig_rax = -1``); they are truncated to 64 bits when
    written to the thread.
    """

    r15: int = 0
    r14: int = 0
    r13: int = 0
    r12: int = 0
    rbp: int = 0
    rbx: int = 0
    r11: int = 0
    r10: int = 0
    r9: int = 0
    r8: int = 0
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    orig_rax: int = 0
    rip: int = 0
    cs: int = 0
    eflags: int = 0
    rsp: int = 0
    ss: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0

    def copy(self) -> "Registers":
        new = object.__new__(Registers)
        new.__dict__.update(self.__dict__)
        return new

    @classmethod
    def from_user_regs(cls, regs: pt.UserRegs) -> "Registers":
        return cls(**{name: getattr(regs, name) for name in pt.REG_NAMES})

    def to_user_regs(self) -> pt.UserRegs:
        regs = pt.UserRegs()
        for name in pt.REG_NAMES:
            setattr(regs, name, getattr(self, name) & _MASK64)
        return regs

    def signed(self, name: str) -> int:
        """The register ``name`` as a signed 64-bit value (``signed("rax") == -4`` for -EINTR)."""
        return _signed(getattr(self, name))


class Thread:
    """One thread of a stopped process. Valid until :meth:`Process.resume`."""

    def __init__(self, process: "Process", tid: int) -> None:
        self.process = process
        self.tid = tid
        self._regs: Registers | None = None
        self.gone = False

    def __repr__(self) -> str:
        return f"<Thread {self.tid} of {self.process.pid}>"

    # -- state ---------------------------------------------------------------------------------
    def _check(self) -> None:
        self.process._check_owner()
        if self.gone:
            raise ProcessGoneError(f"thread {self.tid} of process {self.process.pid} has exited")
        if self.process.threads.get(self.tid) is not self:
            raise TracerStateError(f"thread {self.tid} is not stopped (the world was resumed)")

    def regs(self) -> Registers:
        """The thread's registers (a copy; read once per stop and cached)."""
        self._check()
        if self._regs is None:
            try:
                self._regs = Registers.from_user_regs(pt.getregs(self.tid))
            except OSError as exc:
                raise self.process._thread_error(self, exc) from exc
        return self._regs.copy()

    def set_regs(self, regs: Registers) -> None:
        """Write all registers of the thread."""
        self._check()
        try:
            pt.setregs(self.tid, regs.to_user_regs())
        except OSError as exc:
            raise self.process._thread_error(self, exc) from exc
        self._regs = regs.copy()

    def in_syscall_restart(self) -> bool:
        """Stopped inside an interrupted system call that the kernel restarts on resume by
        moving rip back 2 bytes onto the ``syscall`` instruction."""
        r = self.regs()
        return r.signed("orig_rax") >= 0 and r.signed("rax") in _ERESTART

    def positions(self) -> tuple[int, ...]:
        """The addresses this thread may execute next: (rip,) or (rip, rip - 2) when the kernel
        may restart an interrupted system call."""
        rip = self.regs().rip
        if self.in_syscall_restart():
            return (rip, rip - 2)
        return (rip,)

    # -- running -------------------------------------------------------------------------------
    def step(self, timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        """Execute one instruction, with every signal blocked meanwhile (pending signals stay
        queued). If the instruction faults (or is an ``int3``), TargetFaultError is raised and the
        thread stays at the faulting instruction, the fault not delivered: it is raised again
        when the instruction runs after resume. A thread stopped in a restartable system call
        (:meth:`in_syscall_restart`) re-enters that call when stepped and may block in it until
        ``timeout``.

        For tests and debugging only: the library never single-steps a target, because a tracer
        killed during a step leaves the trap flag set and the target dies of SIGTRAP.

        ``pushfq`` and ``popfq`` are emulated, not stepped: stepped for real they move the trap
        flag the kernel sets for stepping into the target's own flags (pushed on its stack, or
        left on by popf), and the target dies of SIGTRAP once detached.

        Raises ProcessGoneError, TargetTimeoutError.
        """
        self._check()
        regs = self.regs()
        opcode = self.process.read(regs.rip, 1)
        if opcode == b"\x9c":  # pushfq
            regs.rsp -= 8
            self.process.write(regs.rsp, (regs.eflags & ~TRAP_FLAG).to_bytes(8, "little"))
            regs.rip += 1
            self.set_regs(regs)
            return
        if opcode == b"\x9d":  # popfq
            value = int.from_bytes(self.process.read(regs.rsp, 8), "little")
            regs.eflags = (regs.eflags & ~POPF_MASK) | (value & POPF_MASK)
            regs.rsp += 8
            regs.rip += 1
            self.set_regs(regs)
            return
        try:
            mask = pt.getsigmask(self.tid)
            pt.setsigmask(self.tid, _ALL_SIGNALS)
        except OSError as exc:
            raise self.process._thread_error(self, exc) from exc
        try:
            self.process._run(self, pt.singlestep, _is_step_trap, timeout, "single-step")
        finally:
            if not self.gone:
                try:
                    pt.setsigmask(self.tid, mask)
                except OSError:
                    pass

    def stack_top(self, size: int = 64 * 1024) -> bytes:
        """Up to ``size`` bytes of the stack from the stack pointer up (less where the stack
        mapping ends sooner)."""
        rsp = self.regs().rsp & ~7
        for m in self.process.maps():
            if m.start <= rsp < m.end:
                size = min(size, m.end - rsp)
                break
        else:
            return b""
        try:
            return self.process.read(rsp, size)
        except DjprobeError:
            return b""



def _is_step_trap(sig: int, info: pt.SigInfo) -> bool:
    return sig == signal.SIGTRAP and info.si_code in _STEP_CODES


def _is_fault(sig: int, info: pt.SigInfo) -> bool:
    """A synchronous fault raised by the instruction at rip (raised again if re-executed)."""
    return sig in _FAULT_SIGNALS and 0 < info.si_code < pt.SI_KERNEL


class Process:
    """A process under control. Not attached until :meth:`stop` (or :meth:`spawn`)."""

    popen: subprocess.Popen | None

    def __init__(self, pid: int, *, arches: frozenset = LIVE_ARCHES) -> None:
        """Check that ``pid`` exists, is not a zombie and runs code of one of ``arches`` (default:
        what djprobe probes; ``djprobe.arch.PROCESS_ARCHES`` adds i386); does not attach.

        Raises ProcessGoneError, TracePermissionError, UnsupportedTargetError.
        """
        status = _read_status(pid)
        if status is None:
            raise ProcessGoneError(f"no such process: {pid}")
        if not _process_alive(pid, status):
            raise ProcessGoneError(f"no such process: {pid} (zombie)")
        tgid = int(status.get("Tgid", pid))
        if tgid == os.getpid():
            raise TracePermissionError(f"cannot trace process {pid}: it is the tracer itself")
        self.arch: Arch = check_target(tgid, arches)  # another machine: refused before any ptrace request
        self.pid = tgid
        # /proc/PID/{mem,maps} are empty once the leader has exited (a zombie leader with live
        # threads); /proc/TID/... of a live thread shows the same address space.
        self._proc_tid = tgid if _task_alive(tgid, tgid) else _live_tid(tgid)
        self.memory = ProcessMemory(self._proc_tid)
        self.popen = None
        self.threads: dict[int, Thread] = {}
        self._owner: int | None = None  # threading.get_ident() of the tracer thread
        self._seized = True  # False while held after spawn (PTRACE_TRACEME attach)
        self._injector = Injector(self)
        self.exit_status: int | None = None  # wait status if we reaped the process
        self._attached_tids: set[int] = set()  # seized, stop not yet seen
        self._stragglers: set[int] = set()  # seized, never stopped, to detach when they do

    def __repr__(self) -> str:
        return f"<Process {self.pid} {'stopped' if self.stopped else 'running'}>"

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- spawn ---------------------------------------------------------------------------------
    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stdin=None,
        stdout=None,
        stderr=None,
        timeout: float = 30.0,
        arches: frozenset = LIVE_ARCHES,
    ) -> "Process":
        """Start ``argv`` (a program of one of ``arches``) and hold it, world stopped, at its ELF entry point (``AT_ENTRY``): the
        dynamic loader has mapped the libraries and run their initialisers; ``main`` has not run.
        Works for PIE, non-PIE and static executables. ``proc.popen`` is the Popen object (wait
        for the exit status with it after :meth:`resume`). The child keeps the caller's stdio
        unless told otherwise.

        Raises FileNotFoundError/PermissionError (from exec), ProcessGoneError (exited before
        its entry point), UnsupportedTargetError (not x86-64 code: the child is killed at its
        exec stop, before it runs), TargetTimeoutError.
        """
        _check_program(argv[0], env, cwd)  # x32, aarch64...: refused before it is started
        popen = subprocess.Popen(
            [os.fspath(a) for a in argv],
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=pt.traceme,
        )
        pid = popen.pid
        try:
            self = cls.__new__(cls)
            self.pid = pid
            self.popen = popen
            self.threads = {}
            self._owner = threading.get_ident()
            self._seized = False
            self._injector = Injector(self)
            self.exit_status = None
            self._attached_tids = set()
            self._stragglers = set()
            deadline = time.monotonic() + timeout
            # 1. the SIGTRAP that follows a successful execve under PTRACE_TRACEME
            while True:
                status = self._wait_one(pid, deadline)
                if status is None or pt.is_gone(status):
                    raise ProcessGoneError(f"{argv[0]}: exited before its entry point")
                if pt.stop_signal(status) == signal.SIGTRAP:
                    break
                pt.cont(pid, pt.stop_signal(status) if pt.stop_event(status) == 0 else 0)
            self.arch = check_target(pid, arches)  # refused: killed below before it runs an instruction of its own
            self._proc_tid = pid
            self.memory = ProcessMemory(pid)
            # Until start() detaches it, the command has run none of its own code: if the tracer
            # dies meanwhile it must not run at all (untraced, or stopped at our breakpoint).
            pt.setoptions(pid, SEIZE_OPTIONS | pt.PTRACE_O_EXITKILL)
            thread = Thread(self, pid)
            self.threads[pid] = thread
            # 2. a breakpoint at AT_ENTRY
            entry = _auxv(pid, self.arch.auxv_entry).get(AT_ENTRY)
            if not entry:
                raise DjprobeError(f"{argv[0]}: no AT_ENTRY in /proc/{pid}/auxv")
            original = self.memory.read(entry, 1)
            self.memory.write(entry, b"\xcc")
            try:
                self._run(
                    thread,
                    pt.cont,
                    lambda sig, info: sig == signal.SIGTRAP and pt.getregs(pid).rip == entry + 1,
                    max(0.0, deadline - time.monotonic()),
                    "run to the entry point",
                    pass_signals=True,
                )
            finally:
                if self.is_alive():
                    self.memory.write(entry, original)
            regs = thread.regs()
            regs.rip = entry
            thread.set_regs(regs)
            return self
        except BaseException:
            if popen.poll() is None:
                popen.kill()
            try:
                popen.wait(timeout=10)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
            raise

    # -- stop / resume -------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return bool(self.threads)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[int, Thread]:
        """Stop the world: seize and interrupt every thread, collect threads created meanwhile,
        until the thread list is stable. Returns ``{tid: Thread}`` (also ``self.threads``).
        Does nothing if already stopped.

        No thread is held long for another that cannot stop (uninterruptible sleep, a parent
        waiting in ``vfork``): an attempt lasts at most :data:`STOP_ATTEMPT_SECONDS` (doubling up
        to 0.5 s); when it runs out, every stopped thread runs again and the next attempt starts a
        little later, until ``timeout``.

        Raises ProcessGoneError, TracePermissionError (with the reason), TargetTimeoutError
        (nothing was changed; the threads that could stop were never held longer than one attempt).
        """
        if self.threads:
            self._check_owner()
            return self.threads
        self._owner = threading.get_ident()
        self._seized = True
        self._collect_stragglers()
        deadline = time.monotonic() + timeout
        budget = STOP_ATTEMPT_SECONDS
        attempts = 0
        while True:
            attempts += 1
            try:
                self._stop_all(min(deadline, time.monotonic() + budget))
                break
            except TargetTimeoutError as exc:
                self._release_all(wait=0.0)  # the others run while the laggard is busy
                now = time.monotonic()
                if now >= deadline:
                    raise TargetTimeoutError(
                        f"{exc}; gave up after {attempts} attempts in {timeout:g}s (each thread that "
                        f"stopped was held at most {budget:g}s at a time; nothing was changed)"
                    ) from None
                time.sleep(min(budget, max(0.0, deadline - now)))
                budget = min(budget * 2, 0.5)
            except BaseException:
                self._release_all()
                raise
        if not self.threads:
            self._release_all()
            raise ProcessGoneError(f"no such process: {self.pid} (exited while being stopped)")
        return self.threads

    def _stop_all(self, deadline: float) -> None:
        seen: set[int] = set()
        pending: set[int] = set()
        # A thread in uninterruptible sleep (a parent waiting in vfork, I/O) would not stop for a
        # while: fail this attempt before seizing anything, so that no thread is held for it and
        # none is left seized with an interrupt pending.
        for tid in self._list_tasks():
            if tid not in self._stragglers and _task_state(self.pid, tid) == "D":
                raise TargetTimeoutError(
                    f"process {self.pid}: thread {tid} is in uninterruptible sleep (state D"
                    f"{', waiting for a vfork child' if _in_vfork(self.pid, tid) else ''}) and cannot stop now"
                )
        while True:
            new = [tid for tid in self._list_tasks() if tid not in seen]
            if not new and not pending:
                for tid in [t for t in self.threads if not os.path.exists(f"/proc/{self.pid}/task/{t}")]:
                    self._abandon(self.threads.pop(tid).tid)  # a clone outside our thread group
                return
            for tid in new:
                seen.add(tid)
                if self._attach_thread(tid):
                    pending.add(tid)
                    self._attached_tids.add(tid)
            while pending:
                tid, status = self._wait_any(pending, deadline, "stop")
                pending.discard(tid)
                if status is None or pt.is_gone(status):
                    self._note_gone(tid, status)
                    continue
                ev = pt.stop_event(status)
                if ev == pt.PTRACE_EVENT_STOP:  # interrupt, group-stop, or a new thread's first stop
                    self.threads[tid] = Thread(self, tid)
                    self._stragglers.discard(tid)
                    self._attached_tids.discard(tid)
                elif ev == 0:
                    # A signal-delivery-stop: the thread dequeued a signal as it was seized. It is
                    # delivered now, as the kernel would have, and the pending interrupt stops the
                    # thread right after (at its handler, if it has one). Nothing is requeued.
                    try:
                        pt.interrupt(tid)
                        pt.cont(tid, pt.stop_signal(status))
                    except OSError as exc:
                        if exc.errno != _errno.ESRCH:
                            raise
                    pending.add(tid)
                else:  # clone/exec/... event before the interrupt landed: on to the interrupt stop
                    if ev in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK):
                        child = pt.geteventmsg(tid)
                        if child not in seen:
                            seen.add(child)
                            pending.add(child)  # auto-attached; reports its first stop
                            self._attached_tids.add(child)
                    try:
                        pt.interrupt(tid)
                        pt.cont(tid, 0)
                        pending.add(tid)
                    except OSError as exc:
                        if exc.errno != _errno.ESRCH:
                            raise
                        pending.add(tid)  # dying: waitpid reports the exit

    def _attach_thread(self, tid: int) -> bool:
        """Seize and interrupt one thread. False if it is gone."""
        try:
            pt.seize(tid, SEIZE_OPTIONS)
        except OSError as exc:
            if exc.errno == _errno.ESRCH:
                return False
            if exc.errno != _errno.EPERM:
                raise
            try:  # auto-attached through PTRACE_O_TRACECLONE already? then it is ours
                pt.interrupt(tid)
                return True
            except OSError:
                pass
            if not _task_alive(self.pid, tid):
                return False
            raise self._permission_error(tid, exc) from exc
        try:
            pt.interrupt(tid)
        except OSError as exc:
            if exc.errno != _errno.ESRCH:
                raise
        return True

    def resume(self) -> None:
        """Detach every thread, each with the signals it is owed: the target runs untraced.
        Threads that exited meanwhile are reaped. A dead process is not an error here."""
        if not self.threads:
            return
        self._check_owner()
        self._release_all()

    def _release_all(self, wait: float = 1.0) -> None:
        if self.threads:
            self._injector.restore()
        for thread in list(self.threads.values()):
            self._release(thread)
        self.threads = {}
        # Seized threads that never reported their stop (a failed stop()): detach them as soon
        # as they stop, or they would hang in their interrupt stop as long as the tracer lives.
        for tid in list(self._attached_tids):
            self._abandon(tid, wait)
        self._attached_tids.clear()
        if not self._stragglers:
            self._owner = None

    def _abandon(self, tid: int, wait: float = 1.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                pt.detach(tid, 0)
                self._stragglers.discard(tid)
                return
            except OSError as exc:
                if exc.errno != _errno.ESRCH:
                    return
            try:
                got, status = os.waitpid(tid, os.WNOHANG | pt.WALL)
            except ChildProcessError:
                self._stragglers.discard(tid)
                return
            if got and pt.is_gone(status):
                self._note_gone(tid, status)
                self._stragglers.discard(tid)
                return
            if time.monotonic() > deadline:
                self._stragglers.add(tid)
                return
            time.sleep(1e-3)

    def _collect_stragglers(self) -> None:
        for tid in list(self._stragglers):
            self._abandon(tid, wait=0.0)

    def _release(self, thread: Thread) -> None:
        tid = thread.tid
        try:
            pt.detach(tid, 0)
        except OSError as exc:
            if exc.errno != _errno.ESRCH:
                raise
            self._reap(tid)

    # -- threads -------------------------------------------------------------------------------
    def threads_in(self, start: int, end: int) -> list[Thread]:
        """Stopped threads that may execute next an address in ``[start, end)``."""
        return [
            t
            for t in self.threads.values()
            if not t.gone and any(start <= p < end for p in t.positions())
        ]

    def _list_tasks(self) -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError:
            raise ProcessGoneError(f"no such process: {self.pid}") from None

    def _pick_thread(self) -> Thread:
        self._check_stopped()
        live = [t for t in self.threads.values() if not t.gone]
        if not live:
            raise ProcessGoneError(f"no such process: {self.pid}")
        live.sort(key=lambda t: (t.tid != self.pid, t.tid))
        return live[0]

    def _adopt(self, tid: int, deadline: float) -> None:
        """A thread created (and auto-attached) while we ran one: wait for its first stop."""
        if tid in self.threads:
            return
        while True:
            status = self._wait_one(tid, deadline)
            if status is None or pt.is_gone(status):
                return
            ev, sig = pt.stop_event(status), pt.stop_signal(status)
            if ev == pt.PTRACE_EVENT_STOP or (ev == 0 and sig == signal.SIGSTOP and not self._seized):
                break  # its attach stop (the SIGSTOP of a non-seized attach is swallowed)
            pt.cont(tid, sig if ev == 0 else 0)  # a real signal first: deliver it, wait for the attach stop
        if not os.path.exists(f"/proc/{self.pid}/task/{tid}"):
            try:  # a new process (clone without CLONE_THREAD): not ours to hold
                pt.detach(tid, 0)
            except OSError:
                pass
            self.threads.pop(tid, None)
            return
        self.threads.setdefault(tid, Thread(self, tid))

    # -- running one thread --------------------------------------------------------------------
    def _run(self, thread, request, done, timeout: float, what: str, pass_signals: bool = False) -> None:
        """Resume ``thread`` with ``request`` (cont or singlestep) until ``done(sig, siginfo)`` is
        true for one of its signal-delivery-stops. Other signals are kept for later (or passed on
        if ``pass_signals``); ptrace event stops are handled and the thread resumed again."""
        tid = thread.tid
        deadline = time.monotonic() + timeout
        thread._regs = None
        sig_to_pass = 0
        while True:
            ev, sig = self._resume_until_stop(thread, request, sig_to_pass, deadline, what, timeout)
            sig_to_pass = 0
            if ev:
                if ev in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK):
                    self._adopt(pt.geteventmsg(tid), deadline)
                continue  # PTRACE_EVENT_STOP (pending interrupt, group-stop) and others: go on
            info = self._siginfo(tid)
            if done(sig, info):
                return
            if pass_signals or not (_is_fault(sig, info) or (sig == signal.SIGTRAP and info.si_code == pt.SI_KERNEL)):
                # Passed on: a signal blocked by the thread's mask goes back to its queue (the
                # kernel requeues it), job control takes effect.
                sig_to_pass = sig
            else:
                # Raised by the instruction itself: not delivered now; it is raised again when
                # the instruction runs after resume.
                raise TargetFaultError(
                    f"process {self.pid} thread {tid}: {_signame(sig)} during {what}",
                    address=info.si_addr,
                )

    def _resume_until_stop(self, thread, request, sig: int, deadline: float, what: str, timeout: float) -> tuple[int, int]:
        """Resume ``thread`` with ``request`` (cont, singlestep, syscall_step), passing ``sig``,
        and wait for its next stop: (ptrace event, signal).

        Raises ProcessGoneError, TargetTimeoutError (the thread is stopped again first)."""
        tid = thread.tid
        try:
            request(tid, sig)
        except OSError as exc:
            raise self._thread_error(thread, exc) from exc
        try:
            status = self._wait_one(tid, deadline)
        except TargetTimeoutError:
            self._force_stop(thread)
            raise TargetTimeoutError(f"process {self.pid} thread {tid}: {what} timed out after {timeout}s") from None
        thread._regs = None
        if status is None or pt.is_gone(status):
            self._note_gone(tid, status)
            raise ProcessGoneError(
                f"no such process: {self.pid} (thread {tid} "
                f"{pt.describe_status(status) if status is not None else 'vanished'} during {what})"
            )
        return pt.stop_event(status), pt.stop_signal(status)

    def _force_stop(self, thread: Thread) -> None:
        """Bring back a thread that runs too long (after a timeout)."""
        tid = thread.tid
        try:
            if self._seized:
                pt.interrupt(tid)
            else:
                pt.tgkill(self.pid, tid, signal.SIGSTOP)
            deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT
            while True:
                status = self._wait_one(tid, deadline)
                if status is None or pt.is_gone(status):
                    self._note_gone(tid, status)
                    return
                ev, sig = pt.stop_event(status), pt.stop_signal(status)
                if ev == pt.PTRACE_EVENT_STOP or (ev == 0 and sig == signal.SIGSTOP and not self._seized):
                    thread._regs = None
                    return
                pt.cont(tid, sig if ev == 0 else 0)
        except (OSError, TargetTimeoutError):
            pass

    # -- waiting -------------------------------------------------------------------------------
    def _wait_any(self, tids: Iterable[int], deadline: float, what: str = "wait") -> tuple[int, int | None]:
        """Wait until one of ``tids`` changes state; (tid, status), status None if not ours/gone."""
        tids = list(tids)
        spins = 0
        delay = 20e-6
        while True:
            for tid in tids:
                try:
                    got, status = os.waitpid(tid, os.WNOHANG | pt.WALL)
                except ChildProcessError:
                    return tid, None
                if got:
                    return tid, status
            if time.monotonic() > deadline:
                raise TargetTimeoutError(
                    f"process {self.pid}: threads {tids} did not {what} in time "
                    f"(state {[_task_state(self.pid, t) for t in tids]})"
                )
            if spins < 20:
                spins += 1
                os.sched_yield()
            else:
                time.sleep(delay)
                delay = min(delay * 2, 2e-3)

    def _wait_one(self, tid: int, deadline: float) -> int | None:
        return self._wait_any((tid,), deadline)[1]

    def _note_gone(self, tid: int, status: int | None) -> None:
        self._attached_tids.discard(tid)
        thread = self.threads.pop(tid, None)
        if thread is not None:
            thread.gone = True
        if tid == self.pid and status is not None and pt.is_gone(status) and _read_status(self.pid) is None:
            self._record_exit(status)  # we reaped the whole process

    def _reap(self, tid: int) -> None:
        try:
            got, status = os.waitpid(tid, os.WNOHANG | pt.WALL)
        except ChildProcessError:
            return
        if got and tid == self.pid and pt.is_gone(status) and _read_status(self.pid) is None:
            self._record_exit(status)

    def _record_exit(self, status: int) -> None:
        """We reaped the process (it was our child as well as our tracee): keep the status and
        hand it to the Popen object, so that ``popen.wait()`` still reports it."""
        self.exit_status = status
        if self.popen is not None and self.popen.returncode is None:
            self.popen.returncode = os.waitstatus_to_exitcode(status)

    def _siginfo(self, tid: int) -> pt.SigInfo:
        try:
            return pt.getsiginfo(tid)
        except OSError:
            return pt.SigInfo()

    # -- checks and errors ---------------------------------------------------------------------
    def _check_owner(self) -> None:
        if self._owner is not None and self._owner != threading.get_ident():
            raise TracerStateError(
                f"process {self.pid} is traced by another thread of this program "
                f"(ident {self._owner}); ptrace requests must come from that thread"
            )

    def _check_stopped(self) -> None:
        self._check_owner()
        if not self.threads:
            raise TracerStateError(f"process {self.pid} is not stopped: call stop() first")

    def _thread_error(self, thread: Thread, exc: OSError) -> Exception:
        if exc.errno == _errno.ESRCH:
            if not _task_alive(self.pid, thread.tid):
                thread.gone = True
                self.threads.pop(thread.tid, None)
                return ProcessGoneError(f"no such process: {self.pid} (thread {thread.tid} exited)")
            return TracerStateError(f"thread {thread.tid} of process {self.pid} is not stopped")
        return exc

    def _permission_error(self, tid: int, exc: OSError) -> TracePermissionError:
        status = _read_status(self.pid, tid) or {}
        tracer = int(status.get("TracerPid", "0") or 0)
        if tracer:
            return TracePermissionError(
                f"cannot trace process {self.pid}: already traced by PID {tracer} ({_comm(tracer)})"
            )
        reasons = []
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                scope = f.read().strip()
            if scope != "0":
                reasons.append(f"kernel.yama.ptrace_scope = {scope}")
        except OSError:
            pass
        reasons.append("tracing needs CAP_SYS_PTRACE or the same user id as the target")
        return TracePermissionError(f"cannot trace process {self.pid}: {exc.strerror} ({'; '.join(reasons)})")

    # -- injection -----------------------------------------------------------------------------
    def prepare_syscalls(self) -> None:
        """Find the place of the injection trampoline now, while the target may run (reading
        the mapped ELF files' headers takes tens of ms): the first injected call in a stop then
        only checks that its mapping is still there. Failing here is not an error."""
        try:
            self._injector.find_space()
        except DjprobeError:
            pass

    def syscall(
        self,
        nr: int,
        *args: object,
        thread: Thread | None = None,
        data: bytes = b"",
        timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> int:
        """Run system call ``nr`` with up to 6 arguments in a thread of the stopped target and
        return its raw result as a signed int (-errno on failure). ``data`` is copied onto that
        thread's stack below the red zone; an argument given as :data:`djprobe.inject.DATA` is
        replaced by its address. Registers and signal mask are restored exactly, including an
        interrupted system call's restart state; if the tracer dies at any instant meanwhile,
        the thread restores itself (see :mod:`djprobe.inject`). Without ``thread``, the first
        stopped thread with room on its stack is used.

        Raises TracerStateError, ProcessGoneError, TargetTimeoutError, DjprobeError.
        """
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        if thread is not None:
            thread._check()
            candidates = [thread]
        else:
            self._pick_thread()  # raises if not stopped or nothing is left
            candidates = sorted(
                (t for t in self.threads.values() if not t.gone), key=lambda t: (t.tid != self.pid, t.tid)
            )
        reasons = []
        for candidate in candidates:
            try:
                return self._injector.syscall(candidate, nr, args, data=data, timeout=timeout)  # type: ignore[arg-type]
            except _NoRoom as exc:
                reasons.append(str(exc))
        raise DjprobeError(f"process {self.pid}: cannot run system call {nr}: {'; '.join(reasons)}")

    def _check_syscall(self, name: str, result: int) -> int:
        if -4096 < result < 0:
            raise RemoteSyscallError(
                f"{name} in process {self.pid} failed: {os.strerror(-result)}", errno=-result
            )
        return result

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        """mmap in the target; returns the address. Raises RemoteSyscallError."""
        if self.arch.bits == 32:  # mmap2: the offset in pages
            return self._check_syscall("mmap", self.syscall(self.arch.syscalls["mmap"], addr, length, prot, flags, fd, offset // 4096))
        return self._check_syscall("mmap", self.syscall(SYS_mmap, addr, length, prot, flags, fd & _MASK64, offset))

    def munmap(self, addr: int, length: int) -> None:
        self._check_syscall("munmap", self.syscall(self.arch.syscalls["munmap"], addr, length))

    def open_file(self, path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
        """openat(AT_FDCWD, path, flags, mode) in the target; returns the target's fd. The path is
        copied onto the stack, below the red zone, of the thread used.

        Raises RemoteSyscallError."""
        data = os.fsencode(path) + b"\0"
        result = self.syscall(self.arch.syscalls["openat"], AT_FDCWD & _MASK64, DATA, flags, mode, data=data)
        return self._check_syscall(f"open {os.fsdecode(path)!r}", result)

    def close_fd(self, fd: int) -> None:
        self._check_syscall("close", self.syscall(self.arch.syscalls["close"], fd))

    # -- memory, maps, life --------------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        self.memory.write(address, data)

    def maps(self) -> list[MapEntry]:
        """The target's memory map. Raises ProcessGoneError."""
        try:
            return read_maps(self._proc_tid)
        except ProcessGoneError:
            if self._proc_tid == self.pid and _task_alive(self.pid, self.pid):
                raise
            self._proc_tid = _live_tid(self.pid)
            return read_maps(self._proc_tid)

    def is_alive(self) -> bool:
        if self.exit_status is not None:
            return False
        return _process_alive(self.pid)

    def close(self) -> None:
        """Resume (if stopped) and close file descriptors."""
        try:
            if self.threads:
                self.resume()
            if self._stragglers:
                self._collect_stragglers()
        finally:
            memory = getattr(self, "memory", None)
            if memory is not None:
                memory.close()


# -- /proc helpers -------------------------------------------------------------------------------
def _read_status(pid: int, tid: int | None = None) -> dict[str, str] | None:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _process_alive(pid: int, status: dict[str, str] | None = None) -> bool:
    """The process exists and is not a zombie (a zombie leader with live threads is alive)."""
    status = status or _read_status(pid)
    if status is None:
        return False
    if status.get("State", "?")[:1] not in ("Z", "X"):
        return True
    try:
        return any(_task_alive(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def _live_tid(pid: int) -> int:
    """A live thread of process ``pid``. Raises ProcessGoneError."""
    try:
        for name in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            if _task_alive(pid, int(name)):
                return int(name)
    except OSError:
        pass
    raise ProcessGoneError(f"no such process: {pid}")


def _task_state(pid: int, tid: int) -> str:
    """The state letter of a thread ('R', 'S', 't', 'Z', ...), or '' if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.rfind(")") + 2 :][:1]


def _in_vfork(pid: int, tid: int) -> bool:
    """Whether the thread waits for a vfork child to exec or exit (from its wait channel)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return "vfork" in f.read()
    except OSError:
        return False


def _task_alive(pid: int, tid: int) -> bool:
    return _task_state(pid, tid) not in ("", "Z", "X")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _check_program(program: str | os.PathLike, env: dict[str, str] | None, cwd: str | os.PathLike | None = None) -> None:
    """UnsupportedTargetError if ``program`` (found as exec would find it) is an ELF file of a
    machine djprobe knows nothing of (x32, aarch64...): the kernel would say only "Exec format
    error", or run it under an emulator. Anything else is left to exec."""
    name = os.fspath(program)
    if cwd is not None and "/" in name and not os.path.isabs(name):
        name = os.path.join(os.fspath(cwd), name)
    path = shutil.which(name, path=(env or os.environ).get("PATH"))
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return
    check_elf_header(header, os.fspath(program))


def _auxv(pid: int, entry: int = 16) -> dict[int, int]:
    """/proc/PID/auxv: ``entry`` bytes an entry (``Arch.auxv_entry``: 8 in a 32-bit process)."""
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    out = {}
    half = entry // 2
    for i in range(0, len(data) - entry + 1, entry):
        key = int.from_bytes(data[i : i + half], "little")
        value = int.from_bytes(data[i + half : i + entry], "little")
        if key == 0:
            break
        out[key] = value
    return out
