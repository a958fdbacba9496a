"""Following ``exec`` (``--follow``): the image a followed process ``exec``s is probed too.

An untraced process gives no stop at ``exec``, so the exec hook, a jump probe of its own kind at
the entry of libc's ``execve`` (which ``execv*``, ``system`` and ``posix_spawn``'s child all
call), asks for one: when ``FORK_FOLLOW`` is set it publishes the thread's TID (``EXEC_TIDS``,
``EXEC_SEQ``), wakes the tracer and waits, at most ``EXEC_WAIT`` seconds, until ``EXEC_ACK`` holds
its TID. The tracer seizes that one thread with ``PTRACE_O_TRACEEXEC`` (no stop), acknowledges,
and waits for the exec stop (signals on the way are delivered as they come). At that stop the new
image has one thread, only its executable, ld.so and the vDSO are mapped, and nothing of it has
run: the caller places the probes of the main executable, the loader hook (the libraries'
patterns are pending until ld.so has mapped them: its first ``RT_CONSISTENT``, before any
constructor) and the fork and exec hooks, then lets it run untraced. An ``execve`` that fails
gives no exec stop: the thread is let go after ``EXEC_WAIT``. A tracer that dies leaves at most a
seized thread, which the kernel detaches, and a wait of ``EXEC_WAIT``.

In a 32-bit process the hook's action is i386 code (:mod:`.execs32`). The held image's
:class:`~djprobe.process.Process` reads its architecture from the new executable, so an exec
into a program of the other architecture (64 -> 32 or 32 -> 64) is probed in its own mode.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import time
from typing import TYPE_CHECKING, Callable

from iced_x86 import Code, Instruction, MemoryOperand, Register

from ._sys import ptrace as pt
from .arch import I386, X86_64
from .area import EXEC_ACK, EXEC_SEQ, EXEC_TIDS, EXEC_TIDS_MAX, FORK_FOLLOW, LOADER_REQUEST, AreaView
from .errors import DjprobeError, SymbolNotFoundError
from .execs32 import exec_action32
from .loader import FUTEX_WAKE, _futex
from .probes import Djprobe
from .stubs import Stub, _Asm, _finish, _rdtsc
from .stubs32 import finish32

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .regions import Region
    from .sites import SiteAnalysis

log = logging.getLogger(__name__)

EXEC_WAIT = 2.0
SYS_GETTID, SYS_FUTEX = 186, 202


def _rip(address: int) -> MemoryOperand:
    return MemoryOperand(Register.RIP, displ=address)


def exec_action(counter: int, words: int, wait_cycles: int) -> list[Instruction]:
    """At the entry of ``execve`` (red zone and flags dead): count; if following, publish the
    TID, wake the tracer, wait for ``EXEC_ACK == TID`` (10 ms futex waits, ``wait_cycles`` at
    most). Every register it uses is saved."""
    R = Register
    a = _Asm()
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11, R.RBX, R.R12)
    for reg in saved:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    inc = Instruction.create_mem(Code.INC_RM64, _rip(counter))
    inc.has_lock_prefix = True
    a.add(inc)
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _rip(words + FORK_FOLLOW), 0))
    a.branch(Code.JE_REL32_64, "done")
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_GETTID))
    a.add(Instruction.create(Code.SYSCALL))
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EBX, R.EAX))  # ebx = TID
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _rip(words + EXEC_SEQ), R.ECX)
    xadd.has_lock_prefix = True
    a.add(xadd)
    a.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, R.ECX, EXEC_TIDS_MAX - 1))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDX, _rip(words + EXEC_TIDS)))
    a.add(Instruction.create_mem_reg(Code.MOV_RM32_R32, MemoryOperand(R.RDX, R.RCX, 4, 0, 0), R.EBX))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(words + LOADER_REQUEST)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, FUTEX_WAKE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_FUTEX))
    a.add(Instruction.create(Code.SYSCALL))
    _rdtsc(a)
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R12, wait_cycles))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R12, R.RAX))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM32, 10_000_000))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM8, 0))
    a.label("wait")
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _rip(words + EXEC_ACK)))
    a.add(Instruction.create_reg_reg(Code.CMP_RM32_R32, R.EDX, R.EBX))
    a.branch(Code.JE_REL32_64, "waited")
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R8D, R.EDX))
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.R12))
    a.branch(Code.JAE_REL32_64, "waited")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(words + EXEC_ACK)))
    a.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, R.ESI, R.ESI))  # FUTEX_WAIT
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EDX, R.R8D))
    a.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, R.R10, R.RSP))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_FUTEX))
    a.add(Instruction.create(Code.SYSCALL))
    a.branch(Code.JMP_REL32_64, "wait")
    a.label("waited")
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, 16, 1)))
    a.label("done")
    for reg in reversed(saved):
        a.add(Instruction.create_reg(Code.POP_R64, reg))
    return a.instructions()


class ExecHook(Djprobe):
    """The jump probe at the entry of libc's ``execve`` (see the module docstring). Its stub is
    x86-64 or i386 code (:mod:`djprobe.execs32`) as the process is."""

    #: the modes whose processes this custom stub is written for (``ProbedProcess._prepare``)
    stub_arches = frozenset({X86_64, I386})

    def build_stub(self, target: "ProbedProcess", analysis: "SiteAnalysis", region: "Region", slot: int) -> Stub:
        if not analysis.at_entry:
            raise DjprobeError(f"{analysis.site}: the exec hook must be at the function's entry")
        counter = region.counter_address(slot) + region.layout.locked_shard_base * region.layout.shard_stride
        cycles = int(EXEC_WAIT * 1e9 / target.clock.ns_per_tick)
        if getattr(target.process, "arch", X86_64) is I386:  # 32-bit code: djprobe.execs32
            action = exec_action32(counter, region.data_address, cycles)
            return finish32(analysis, region.layout, region.slot_address(slot), action)
        return _finish(analysis, region.layout, region.slot_address(slot), exec_action(counter, region.data_address, cycles))


def find_exec_site(target: "ProbedProcess") -> int:
    """The entry of libc's ``execve`` (SymbolNotFoundError if there is none)."""
    for module in target.symbols.modules:
        if "libc" not in module.name:
            continue
        for sym in module.symbols("execve"):
            if sym.size:
                return sym.address
    raise SymbolNotFoundError("no libc execve in the process")


def exec_requests(view: AreaView, seen: int) -> tuple[int, list[int]]:
    """The TIDs that announced an exec in ``view`` since sequence ``seen``; the new sequence."""
    now = struct.unpack_from("<I", view.buffer, EXEC_SEQ)[0]
    tids = []
    while seen != now:
        tids.append(struct.unpack_from("<I", view.buffer, EXEC_TIDS + 4 * (seen % EXEC_TIDS_MAX))[0])
        seen = (seen + 1) & 0xFFFFFFFF
    return now, tids


def release(view: AreaView, tid: int, address: int) -> None:
    """Let thread ``tid`` waiting in the exec hook go on (``address``: the tracer's address of
    the view's first byte, for the wake)."""
    view.buffer[EXEC_ACK : EXEC_ACK + 4] = struct.pack("<I", tid)
    _futex(address + EXEC_ACK, FUTEX_WAKE, 1 << 30)


def seize_for_exec(tid: int, let_go: Callable[[], None], timeout: float = EXEC_WAIT + 1.0) -> int | None:
    """Seize thread ``tid`` (waiting in the exec hook) with PTRACE_O_TRACEEXEC, call ``let_go()``
    and wait for its exec stop. Returns the PID of the new image, stopped at its first
    instruction (still seized), or None if the exec did not happen (the thread is let go)."""
    try:
        pt.seize(tid, pt.PTRACE_O_TRACEEXEC)
    except OSError as exc:
        let_go()
        if exc.errno in (errno.ESRCH, errno.EPERM):
            return None
        raise
    let_go()
    deadline = time.monotonic() + timeout
    waited = tid
    while time.monotonic() < deadline:
        got, status = pt.waitpid(-1 if waited is None else waited, os.WNOHANG | pt.WALL)
        if not got:
            time.sleep(0.0005)
            continue
        if pt.is_gone(status):
            return None
        if pt.stop_event(status) == pt.PTRACE_EVENT_EXEC:
            return got  # after exec the thread has the PID of the process
        sig = pt.stop_signal(status)
        pt.cont(got, 0 if pt.stop_event(status) or sig == signal.SIGTRAP else sig)
    # no exec (it failed, or took too long): let the thread go
    try:
        pt.interrupt(tid)
        for _ in range(1000):
            got, status = pt.waitpid(tid, os.WNOHANG | pt.WALL)
            if got:
                if pt.is_gone(status):
                    return None
                if pt.stop_event(status) == pt.PTRACE_EVENT_EXEC:
                    return got
                sig = pt.stop_signal(status)
                if pt.stop_event(status) == 0 and sig != signal.SIGTRAP:
                    pt.detach(tid, sig)  # a signal-delivery stop: deliver it as we leave
                else:
                    pt.detach(tid, 0)
                return None
            time.sleep(0.001)
    except OSError:
        pass
    return None


def held_image(pid: int) -> "ProbedProcess":
    """A ``ProbedProcess`` for the new image of ``pid``, seized by :func:`seize_for_exec` and
    stopped at its exec stop: its world is stopped (one thread) until ``start()``."""
    import threading

    from .probes import ProbedProcess
    from .process import Process, Thread

    from .process import SEIZE_OPTIONS

    pt.setoptions(pid, SEIZE_OPTIONS)  # system-call stops as the injector knows them
    # the exec stop comes before execve returns: run to its system-call exit first, so that the
    # thread stands at the new image's first instruction with no system call under way
    pt.syscall_step(pid, 0)
    deadline = time.monotonic() + 5.0
    while True:
        got, status = pt.waitpid(pid, os.WNOHANG | pt.WALL)
        if got:
            if pt.is_gone(status):
                raise DjprobeError(f"process {pid} ended at its exec")
            if pt.stop_signal(status) == (signal.SIGTRAP | 0x80):
                break
            pt.syscall_step(pid, 0 if pt.stop_event(status) else pt.stop_signal(status))
        elif time.monotonic() > deadline:
            raise DjprobeError(f"process {pid}: no system-call exit after its exec")
        else:
            time.sleep(0.0005)
    process = Process(pid)
    process._owner = threading.get_ident()
    process._seized = True
    process.threads = {pid: Thread(process, pid)}
    return ProbedProcess(process)


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


class ExecFollower:
    """Probe the images that followed processes ``exec`` (see the module docstring).

    ``setup(target)`` is called with each new image held at its exec stop; it places what it
    wants and returns what to keep (the image is started right after)."""

    def __init__(self, setup: Callable[["ProbedProcess"], object]) -> None:
        self.setup = setup
        self.images: list[object] = []
        self._sources: list[list] = []  # [view, tracer address of the view, seen sequence]
        self.hooks: list[tuple["ProbedProcess", ExecHook]] = []

    def install(self, target: "ProbedProcess") -> None:
        """Place the exec hook in ``target`` and watch it (its areas must have FORK_FOLLOW set
        for the hook to act). Raises SymbolNotFoundError without libc's ``execve``."""
        import ctypes

        hook = ExecHook(find_exec_site(target), trap=False)  # its own stub or nothing
        target.register(hook)
        self.hooks.append((target, hook))
        region = hook._instance.region  # type: ignore[union-attr]
        holder = ctypes.c_char.from_buffer(region._mmap)
        address = ctypes.addressof(holder)
        del holder
        self.watch(region.view, address)

    def region_index(self, target: "ProbedProcess") -> int | None:
        for owner, hook in self.hooks:
            if owner is target and hook._instance is not None:
                return target._regions.index(hook._instance.region)
        return None

    def watch(self, view: AreaView, address: int) -> None:
        """Also serve the exec hook whose area (a followed child's copy) is ``view``."""
        seen = struct.unpack_from("<I", view.buffer, EXEC_SEQ)[0]
        self._sources.append([view, address, seen])

    def poll(self) -> None:
        for source in self._sources:
            view, address, seen = source
            try:
                source[2], tids = exec_requests(view, seen)
            except (ValueError, TypeError):  # released
                continue
            for tid in tids:
                tgid = _tgid(tid)
                pid = seize_for_exec(tid, lambda: release(view, tid, address))
                if pid is None:
                    continue
                try:
                    target = held_image(pid if pid == tgid else tgid)
                except DjprobeError as exc:
                    log.info("exec of %d not followed: %s", tid, exc)
                    _detach(pid)
                    continue
                try:
                    self.images.append(self.setup(target))
                finally:
                    target.start()

    def close(self) -> None:
        for target, hook in self.hooks:
            if hook.registered:
                try:
                    target.unregister(hook)
                except DjprobeError as exc:
                    log.info("removing the exec hook: %s", exc)


def _detach(pid: int) -> None:
    try:
        pt.detach(pid, 0)
    except OSError:
        pass
