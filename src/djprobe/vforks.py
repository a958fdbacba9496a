"""vfork and posix_spawn children count apart: the vfork hooks.

A child made by ``vfork``, or by glibc's ``posix_spawn`` (``__spawni`` uses ``clone(CLONE_VM |
CLONE_VFORK)`` and runs ``__spawni_child`` in the child), shares all of its parent's memory until
it calls ``exec``: its parent's jumps, stubs and counters, and its parent thread's TLS, rseq area
included. It has no rseq registration of its own (the kernel clears it for ``CLONE_VM``), so the
kernel never updates the ``cpu_id`` it reads nor restarts its critical sections: a per-CPU stub's
plain ``inc`` on the shard of the parent's last CPU could race with a parent thread running there
(a lost count), and everything the child calls before its exec (``close``, ``dup2``,
``sigaction``...) would count as the parent's.

Two jump probes of their own kind mark such a child: right after the ``syscall`` of libc's
``__vfork`` when ``rax`` is 0 (in the parent, ``rax`` is the child's PID or an error), and at the entry of ``__spawni_child`` (which runs only in a posix_spawn
child; a static function, found in the symbol table or libc's separate debug file). Each writes
:data:`~djprobe.rseq.VFORK_CPU` into ``cpu_id`` at ``fs:[__rseq_offset + 4]``: every per-CPU stub
then takes its fallback path (``cpu_id`` is beyond its shards), where it finds the marker and only
adds one, with ``lock inc``, to the instance's *apart* counter (:attr:`AreaLayout.apart_shard`,
read by :attr:`Djprobe.vfork_hits`, not part of the hits): no record, no latency pairing. When
the parent returns from the ``vfork`` (its thread was blocked), the kernel writes its real CPU
number into ``cpu_id`` again. The hook itself counts as a count stub would with the mark before
it (a marked child apart, the parent's pass in its hits), so a counting probe at the hook's
address (``'*:*'`` places one at ``vfork`` and at ``__spawni_child``) shares the hook's stub,
whichever came first (:meth:`VforkHook.join_conflict`); ``__vfork``'s syscall is looked for in
the code as it reads without djprobe's own jumps. The hooks are plain code without waits: a dead
tracer changes nothing.

Only where per-CPU counting is used (glibc registered rseq in the process, see
:mod:`djprobe.rseq`): without it there is no ``cpu_id`` to mark and such children's hits count as
the parent's (``lock inc``, no race). In a 64-bit process without ``__spawni_child`` in any
symbol table (no debug file for libc), only ``vfork`` children are marked. In 32-bit processes the hooks' code and sites
are :mod:`djprobe.vforks32`'s (``gs``-based TLS, after ``int 0x80``; posix_spawn children marked
after ``__clone3``'s and ``__clone``'s system call, no ``__spawni_child`` needed), and every 32-bit stub
compares ``cpu_id`` with the marker before its locked count. Stubs without a per-CPU path in a process that has one (string-fetching
stubs, the records of shared stubs) compare ``cpu_id`` with the marker before their locked count.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iced_x86 import Code, Decoder, Instruction, MemoryOperand, Mnemonic, OpKind, Register

from .arch import I386, X86_64
from .errors import DjprobeError, SymbolNotFoundError
from .overlaps import unpatched_memory
from .probes import Djprobe
from .rseq import CPU_ID, CPU_ID_START, VFORK_CPU
from .stubs import RED_ZONE, Stub, _Asm, _finish, _fs

if TYPE_CHECKING:
    from .probes import ProbedProcess
    from .regions import Region
    from .symbols import ResolvedSite
    from .vforks32 import CloneFlagsAt
    from .sites import SiteAnalysis

__all__ = ["VforkHook", "VforkMarks", "find_vfork_site", "find_spawn_child", "vfork_action"]

log = logging.getLogger(__name__)

SYS_VFORK = 58


def unmark_parent(a: _Asm, cpu_id_start: MemoryOperand, cpu_id: MemoryOperand, saved: tuple[Register, Register],
                  push: Code, pop: Code) -> None:
    """Where the hook runs in the parent (back from ``vfork``/``clone``): if ``cpu_id`` still
    holds the child's mark, put the CPU number the kernel last wrote (``cpu_id_start``) back,
    with ``lock cmpxchg`` (a kernel update meanwhile wins). The kernel rewrites ``cpu_id`` when
    the parent was scheduled out while waiting for its child, but not when the child had already
    exec'd before the parent waited (seen once in a CI run: one parent call counted apart). Saves
    the two registers it uses; the flags must be saved by the caller."""
    R = Register
    eax, ecx = (R.EAX, R.ECX)
    for reg in saved:
        a.add(Instruction.create_reg(push, reg))
    a.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, eax, VFORK_CPU))
    a.add(Instruction.create_reg_mem(Code.MOV_R32_RM32, ecx, cpu_id_start))
    cas = Instruction.create_mem_reg(Code.CMPXCHG_RM32_R32, cpu_id, ecx)
    cas.has_lock_prefix = True
    a.add(cas)
    for reg in reversed(saved):
        a.add(Instruction.create_reg(pop, reg))


def vfork_action(counter: int, apart: int, rseq_offset: int, *, child_only_if_rax_zero: bool) -> list[Instruction]:
    """The hook's action: in a child whose thread is registered (``cpu_id`` at ``fs:[rseq_offset
    + 4]`` holds a CPU number), write VFORK_CPU there and ``lock inc`` the apart counter at
    ``apart``; else ``lock inc`` the counter at ``counter`` (the parent returning from ``vfork``,
    or a child of an unregistered thread, which counts as the parent's as in every stub). With
    ``child_only_if_rax_zero`` the child is the side where ``rax`` is 0; without, every pass is
    a child's. So the hook's instance counts as a count stub would with the mark before it: a
    counting probe at the hook's address shares it (:meth:`VforkHook.join_conflict`). Saves the
    flags, steps over the red zone; touches no register."""
    R = Register

    def locked_inc(address: int) -> Instruction:
        inc = Instruction.create_mem(Code.INC_RM64, MemoryOperand(R.RIP, displ=address))
        inc.has_lock_prefix = True
        return inc

    a = _Asm()
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, -RED_ZONE, 1)))
    a.add(Instruction.create(Code.PUSHFQ))
    if child_only_if_rax_zero:
        a.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
        a.branch(Code.JNE_REL32_64, "parent")
    # Only where the parent thread is registered (cpu_id >= 0): the kernel writes its real CPU
    # number back when it returns from vfork; an unregistered thread's -1 (or -2) is left alone
    # (its children then count as the parent's, with lock inc).
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _fs(rseq_offset + CPU_ID), 0))
    a.branch(Code.JL_REL32_64, "parent")
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _fs(rseq_offset + CPU_ID), VFORK_CPU))
    a.add(locked_inc(apart))
    a.branch(Code.JMP_REL32_64, "done")
    a.label("parent")
    unmark_parent(a, _fs(rseq_offset + CPU_ID_START), _fs(rseq_offset + CPU_ID), (R.RAX, R.RCX), Code.PUSH_R64, Code.POP_R64)
    a.add(locked_inc(counter))
    a.label("done")
    a.add(Instruction.create(Code.POPFQ))
    a.add(Instruction.create_reg_mem(Code.LEA_R64_M, R.RSP, MemoryOperand(R.RSP, R.NONE, 1, RED_ZONE, 1)))
    return a.instructions()


class VforkHook(Djprobe):
    """A jump probe that marks a vfork or posix_spawn child (see the module docstring). Its
    :attr:`vfork_hits` count the children it marked; its :attr:`hits` the parent's returns from
    ``vfork`` (after ``__vfork``'s syscall) and the children it could not mark (their thread had
    no rseq registration). A counting probe at the same address shares its stub and gets the
    same figures (see :meth:`join_conflict`)."""

    stub_arches = frozenset({X86_64, I386})  # 32-bit code: djprobe.vforks32

    def __init__(self, address: "int | ResolvedSite", rseq_offset: int, after_syscall: bool,
                 clone_flags: "CloneFlagsAt | None" = None) -> None:
        """``after_syscall``: the child is the side where the system call returned 0;
        ``clone_flags`` (32-bit only, the hooks after ``__clone``'s and ``__clone3``'s ``int
        0x80``: where the flags are): and only where the clone flags there have
        ``CLONE_VM|CLONE_VFORK`` without ``CLONE_SETTLS`` (:func:`djprobe.vforks32.vfork_action32`)."""
        site = address
        super().__init__(site if isinstance(site, int) else site.address, trap=False)  # its own stub or nothing
        if not isinstance(site, int):  # a site no symbol covers, with the function to analyse it in
            self.addr = site  # type: ignore[assignment]
        self.rseq_offset = rseq_offset
        self.after_syscall = after_syscall
        self.clone_flags = clone_flags

    def build_stub(self, target: "ProbedProcess", analysis: "SiteAnalysis", region: "Region", slot: int) -> Stub:
        layout = region.layout
        counter = region.counter_address(slot) + layout.locked_shard_base * layout.shard_stride
        apart = region.counter_address(slot) + layout.apart_offset
        if getattr(target.process, "arch", X86_64) is I386:
            from .stubs32 import finish32
            from .vforks32 import vfork_action32

            action = vfork_action32(counter, apart, self.rseq_offset, child_only_if_eax_zero=self.after_syscall,
                                    clone_flags=self.clone_flags)
            return finish32(analysis, layout, region.slot_address(slot), action)
        if self.clone_flags:
            raise ValueError("the clone-flags vfork hook is built for 32-bit code only")
        action = vfork_action(counter, apart, self.rseq_offset, child_only_if_rax_zero=self.after_syscall)
        return _finish(analysis, layout, region.slot_address(slot), action)

    def join_conflict(self, action: str, strings: int) -> str | None:
        """Why a probe whose stub would be of the kind ``action`` (copying the strings of the
        argument mask ``strings``) cannot share this hook's address, or None:
        the hook counts every pass as a count stub does (the child's apart, once marked), so a
        plain counting probe shares its stub, whichever came first (``ProbedProcess`` swaps a
        count stub for the hook's). Records, latency, string copies and other hooks need a stub
        of their own."""
        if action != "count" or strings:
            return ("djprobe's vfork hook (it marks vfork/posix_spawn children) shares an address "
                    "only with counting probes")
        return None


def find_vfork_site(target: "ProbedProcess") -> int:
    """The instruction after the ``vfork`` system call in libc's ``__vfork``.

    The code is read as it is without djprobe's own jumps: a probe at ``vfork`` (``'*:*'``
    places one) displaces the ``mov eax, 58``. Raises SymbolNotFoundError when there is no
    ``__vfork``/``vfork`` or no ``mov eax, 58; syscall`` in it."""
    for module in target.symbols.modules:
        funcs = [s for name in ("__vfork", "vfork") for s in module.symbols(name) if s.size]
        if not funcs or module.arch is I386:
            continue
        func = funcs[0]
        code = unpatched_memory(target, func.address, func.address + func.size).read(func.address, func.size)
        eax: int | None = None
        for insn in Decoder(64, code, ip=func.address):
            to_eax = insn.op0_kind == OpKind.REGISTER and insn.op0_register in (Register.EAX, Register.RAX)
            if insn.mnemonic == Mnemonic.MOV and to_eax:
                eax = insn.immediate(1) if insn.op1_kind in (OpKind.IMMEDIATE32, OpKind.IMMEDIATE32TO64) else None
            elif insn.mnemonic == Mnemonic.SYSCALL:
                if eax == SYS_VFORK:
                    return insn.next_ip
                eax = None
        raise SymbolNotFoundError(f"no vfork system call found in {module.name}:{func.name}")
    raise SymbolNotFoundError("no __vfork in the process")


def find_spawn_child(target: "ProbedProcess") -> int:
    """The entry of glibc's ``__spawni_child`` (a static function: in ``.symtab`` or libc's debug
    file). Raises SymbolNotFoundError without it."""
    for module in target.symbols.modules:
        funcs = [s for s in module.symbols("__spawni_child") if s.size]
        if funcs and module.arch is not I386:
            return funcs[0].address
    raise SymbolNotFoundError("no __spawni_child symbol (libc without its symbol table or debug file)")


class VforkMarks:
    """The vfork hooks of one process (see the module docstring). ``notes`` says what is not
    covered after :meth:`install`."""

    def __init__(self, target: "ProbedProcess") -> None:
        self.target = target
        self.hooks: list[VforkHook] = []
        self.notes: list[str] = []

    def install(self) -> None:
        """Place the hooks that can go in; what cannot is said in :attr:`notes` (never raises
        for a missing function or rseq area; raises what registering a probe raises otherwise)."""
        i386 = getattr(self.target.process, "arch", X86_64) is I386
        offset = self.target._rseq_offset()
        if offset is None:
            self.notes.append("no usable rseq area in this process (glibc without rseq, glibc.pthread.rseq=0): "
                              "vfork/posix_spawn children count as the parent's")
            return
        finders = ((find_vfork_site, True, None), (find_spawn_child, False, None))
        if i386:  # 32-bit code: djprobe.vforks32 (posix_spawn children marked after clone3's and clone's int 0x80)
            from .vforks32 import CloneFlagsAt, clone3_site32, find_clone_site32, find_vfork_site32

            finders = ((find_vfork_site32, True, None), (clone3_site32, True, CloneFlagsAt.CLONE_ARGS_AT_EBX),
                       (find_clone_site32, True, CloneFlagsAt.EBX))
        for find, after_syscall, clone_flags in finders:
            try:
                site = find(self.target)
            except (SymbolNotFoundError, DjprobeError) as exc:
                self.notes.append(f"{exc}: such children count as the parent's")
                continue
            hook = VforkHook(site, offset, after_syscall, clone_flags)
            try:
                self.target.register(hook)
            except DjprobeError as exc:
                where = site if isinstance(site, int) else site.address
                self.notes.append(f"vfork hook at {where:#x} refused: {exc}")
                continue
            self.hooks.append(hook)
        for note in self.notes:
            log.info("process %d: %s", self.target.pid, note)

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self.hooks:
            if hook.registered:
                try:
                    self.target.unregister(hook)
                except DjprobeError as exc:
                    log.info("removing a vfork hook: %s", exc)
        self.hooks = []
