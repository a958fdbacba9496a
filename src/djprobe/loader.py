"""The loader hook: a jump probe at ld.so's ``_dl_debug_state`` that tells the tracer when the
dynamic loader has mapped or unmapped libraries, and holds the loading thread until the tracer
has placed the probes that wait for them.

``_dl_debug_state`` is the function debuggers break on (the ``r_brk`` of ``r_debug``). glibc
calls it with ``_r_debug.r_state`` set to ``RT_ADD`` before mapping the objects of a ``dlopen``
and to ``RT_CONSISTENT`` once they are mapped, *before* they are relocated and their
constructors run (``elf/dl-open.c``: ``dl_open_worker_begin``); ``dlclose`` calls it with
``RT_DELETE`` before unmapping and ``RT_CONSISTENT`` after. The target runs untraced between
operations, so the notification comes from inside the target: the hook's stub (a stub of its own
kind, see :func:`build_loader_stub`) counts the call and, when the tracer *armed* it and the
state is ``RT_CONSISTENT``, adds one to the REQUEST word of its probe area (a futex word in the
shared data part), wakes the tracer, and waits on the ACK word until the tracer has handled that
request. The wait is bounded twice: by the tracer's heartbeat (a TSC written by a thread of the
tracer every ``BEAT`` seconds; older than ``STALE`` and the stub gives up at once) and by a total
``MAX_WAIT``. A dead, stopped or slow tracer therefore costs a ``dlopen`` at most ``STALE``
seconds (``MAX_WAIT`` for a live but slow one); the request stays counted, so a tracer that comes
back still handles the library, late.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import TYPE_CHECKING

import numpy as np
from iced_x86 import Code, Instruction, MemoryOperand, Register

from .arch import I386, X86_64
from .area import LOADER_ACK, LOADER_ARMED, LOADER_HEARTBEAT, LOADER_REQUEST
from .errors import DjprobeError, SymbolNotFoundError
from .probes import Djprobe
from .loader32 import loader_action32
from .stubs import Stub, _Asm, _finish, _rdtsc
from .stubs32 import finish32

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .regions import Region
    from .sites import SiteAnalysis

log = logging.getLogger(__name__)

RT_CONSISTENT = 0
SYS_FUTEX = 202
FUTEX_WAIT, FUTEX_WAKE = 0, 1
POLL_NS = 10_000_000  # the stub's futex wait is re-checked every 10 ms
BEAT = 0.1  # seconds between two heartbeats of the tracer
STALE = 1.0  # a heartbeat older than this: the tracer is taken as gone, the stub does not wait
MAX_WAIT = 30.0  # the longest a loading thread ever waits for a live tracer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _futex(address: int, op: int, value: int, timeout_s: float | None = None) -> int:
    ts = None
    if timeout_s is not None:
        sec = int(timeout_s)
        ts = (ctypes.c_long * 2)(sec, int((timeout_s - sec) * 1e9))
    return _libc.syscall(
        ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(op), ctypes.c_int(value),
        ts, ctypes.c_void_p(0), ctypes.c_int(0),
    )  # fmt: skip


def _rip(address: int, size: int = 8) -> MemoryOperand:
    """``[rip + ...]`` naming the absolute ``address`` (the block encoder makes it relative)."""
    del size  # the operand size comes from the instruction
    return MemoryOperand(Register.RIP, displ=address)


def loader_action(
    counter: int, words: int, r_state: int, stale_cycles: int, max_cycles: int
) -> list[Instruction]:
    """The hook's action, at the entry of ``_dl_debug_state`` (red zone and flags dead there):
    count the call; if armed and ``*r_state == RT_CONSISTENT``: REQUEST += 1, wake the tracer, and
    while ACK is behind this request, the heartbeat is fresh and ``max_cycles`` have not passed,
    ``futex(ACK, FUTEX_WAIT, ack, 10 ms)``. Every register it uses is saved and restored (a
    ``syscall`` clobbers rax, rcx and r11)."""
    R = Register
    a = _Asm()
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11, R.RBX, R.RBP, R.R12)
    for reg in saved:
        a.add(Instruction.create_reg(Code.PUSH_R64, reg))
    inc = Instruction.create_mem(Code.INC_RM64, _rip(counter))
    inc.has_lock_prefix = True
    a.add(inc)
    armed, request, ack, beat = (words + off for off in (LOADER_ARMED, LOADER_REQUEST, LOADER_ACK, LOADER_HEARTBEAT))
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _rip(armed, 4), 0))
    a.branch(Code.JE_REL32_64, "done")
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, r_state))
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, MemoryOperand(R.RAX, R.NONE, 1, 0, 0), RT_CONSISTENT))
    a.branch(Code.JNE_REL32_64, "done")
    # ebx = this request's number
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, 1))
    xadd = Instruction.create_mem_reg(Code.XADD_RM32_R32, _rip(request, 4), R.EBX)
    xadd.has_lock_prefix = True
    a.add(xadd)
    a.add(Instruction.create_reg(Code.INC_RM32, R.EBX))
    # futex(REQUEST, FUTEX_WAKE, 1): the tracer may be waiting on it
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(request)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, FUTEX_WAKE))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, SYS_FUTEX))
    a.add(Instruction.create(Code.SYSCALL))
    # r12 = the deadline (TSC), rbp = the staleness bound; a timespec {0, POLL_NS} on the stack
    _rdtsc(a)
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.R12, max_cycles))
    a.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, R.R12, R.RAX))
    a.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RBP, stale_cycles))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM32, POLL_NS))
    a.add(Instruction.create_i32(Code.PUSHQ_IMM8, 0))
    a.label("wait")
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EDX, _rip(ack, 4)))  # the value waited on
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EDX))
    a.add(Instruction.create_reg_reg(Code.SUB_R32_RM32, R.EAX, R.EBX))
    a.branch(Code.JNS_REL32_64, "waited")  # ACK has reached this request
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _rip(armed, 4), 0))
    a.branch(Code.JE_REL32_64, "waited")  # disarmed: the tracer is leaving
    a.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.R8D, R.EDX))
    _rdtsc(a)
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.R12))
    a.branch(Code.JAE_REL32_64, "waited")  # MAX_WAIT passed
    a.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _rip(beat)))
    a.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.RBP))
    a.branch(Code.JG_REL32_64, "waited")  # no heartbeat for STALE: the tracer is gone
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RDI, _rip(ack)))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, FUTEX_WAIT))
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


class LoaderHook(Djprobe):
    """The jump probe at ``_dl_debug_state`` (see the module docstring). Registered by
    :class:`LoaderWatch`; its ``hits`` count every call of ``_dl_debug_state``. Its stub is
    x86-64 or i386 code (:mod:`djprobe.loader32`) as the process is."""

    #: the modes whose processes this custom stub is written for (``ProbedProcess._prepare``)
    stub_arches = frozenset({X86_64, I386})

    def __init__(self, site: int, r_state: int) -> None:
        super().__init__(site, trap=False)  # its own stub or nothing: never a uprobe
        self.r_state = r_state

    def build_stub(self, target: "ProbedProcess", analysis: "SiteAnalysis", region: "Region", slot: int) -> Stub:
        if not analysis.at_entry:
            raise DjprobeError(f"{analysis.site}: the loader hook must be at the function's entry")
        ns_per_tick = target.clock.ns_per_tick
        args = (
            region.counter_address(slot) + region.layout.locked_shard_base * region.layout.shard_stride,
            region.data_address,
            self.r_state,
            int(STALE * 1e9 / ns_per_tick),
            int(MAX_WAIT * 1e9 / ns_per_tick),
        )
        if getattr(target.process, "arch", X86_64) is I386:  # 32-bit code: djprobe.loader32
            action = loader_action32(*args, POLL_NS)
            return finish32(analysis, region.layout, region.slot_address(slot), action)
        return _finish(analysis, region.layout, region.slot_address(slot), loader_action(*args))


class LoaderWatch:
    """The tracer's side of the loader hook in one process: place it, arm it, keep the heartbeat,
    wait for a notification, acknowledge it.

    ``wait(timeout)`` returns True when a request is waiting to be handled (``pending``); the
    caller handles it (world stopped, probes placed) and calls ``ack()``.
    """

    def __init__(self, target: "ProbedProcess") -> None:
        self.target = target
        self.hook: LoaderHook | None = None
        self._words: np.ndarray | None = None
        self._address = 0  # the tracer's address of the data part's first byte
        self._acked = 0
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    @staticmethod
    def find_site(target: "ProbedProcess") -> tuple[int, int]:
        """``_dl_debug_state`` and the address of ``_r_debug.r_state`` in the target's ld.so.

        Raises SymbolNotFoundError if no module has both (a static program has no loader)."""
        for module in target.symbols.modules:
            funcs = [s for s in module.symbols("_dl_debug_state")]
            r_debug = [s for s in module.symbols("_r_debug")]
            if funcs and r_debug:  # r_state follows an int and two pointers: 24 or 12 (i386)
                return funcs[0].address, r_debug[0].address + 3 * module.arch.word
        raise SymbolNotFoundError("no dynamic loader with _dl_debug_state and _r_debug in the process")

    def install(self) -> None:
        """Place the hook and arm it (raises what registration raises)."""
        site, r_state = self.find_site(self.target)
        hook = LoaderHook(site, r_state)
        self.target.register(hook)
        self.hook = hook
        region = hook._instance.region  # type: ignore[union-attr]
        view = region.view
        self._words = np.frombuffer(view.buffer, dtype=np.uint32, count=8, offset=LOADER_ARMED)
        holder = ctypes.c_char.from_buffer(region._mmap)
        self._address = ctypes.addressof(holder)
        del holder
        self._acked = int(self._words[1])
        self._beat()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="djprobe-heartbeat", daemon=True)
        self._beat_thread.start()
        self._words[0] = 1  # armed
        self.target.close_hooks.append(self.release)

    def _beat(self) -> None:
        if self._words is not None:
            self._words[4:6].view(np.uint64)[0] = self.target.clock.now_tsc()

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(BEAT):
            try:
                self._beat()
            except (ValueError, TypeError):  # the view was released meanwhile
                return

    @property
    def request(self) -> int:
        return int(self._words[1]) if self._words is not None else 0

    @property
    def pending(self) -> bool:
        """Whether a notification came that is not acknowledged yet."""
        return self._words is not None and self.request != self._acked

    def wait(self, timeout: float) -> bool:
        """Sleep until the hook reports something or ``timeout`` passes; True if it did."""
        if self._words is None:
            return False
        seen = self.request
        if seen != self._acked:
            return True
        _futex(self._address + LOADER_REQUEST, FUTEX_WAIT, seen, timeout)
        return self.pending

    def ack(self) -> None:
        """The request seen last is handled: let the waiting thread go on."""
        if self._words is None:
            return
        self._acked = self.request
        self._words[2] = self._acked
        _futex(self._address + LOADER_ACK, FUTEX_WAKE, 1 << 30)

    def release(self) -> None:
        """Disarm and let any waiting thread go on; stop the heartbeat."""
        if self._words is not None:
            self._words[0] = 0
            self.ack()
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
            self._beat_thread = None
        self._words = None  # the tracer's view of the area can be released now

    def close(self) -> None:
        """Disarm, release any waiting thread, stop the heartbeat and remove the hook."""
        self.release()
        if self.hook is not None and self.hook.registered:
            try:
                self.target.unregister(self.hook)
            except DjprobeError as exc:
                log.info("removing the loader hook: %s", exc)
