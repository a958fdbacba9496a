"""The vfork hooks in 32-bit (i386) processes: the i386 counterparts of :mod:`djprobe.vforks`.

glibc 2.35+ registers rseq in i386 processes too: each thread's ``struct rseq`` is at
``gs:[__rseq_offset]`` (``__rseq_offset`` a 4-byte ``ptrdiff_t``, :func:`djprobe.rseq.glibc_rseq_area`),
and a vfork/posix_spawn child reads its parent thread's area. The hook writes
:data:`~djprobe.rseq.VFORK_CPU` into ``cpu_id`` there, and every 32-bit stub built with the
rseq offset (:mod:`djprobe.stubs32`, :mod:`djprobe.latency_stubs32`, :mod:`djprobe.fetch_stubs32`)
compares ``cpu_id`` with the marker before its locked count: a marked child's hit goes to the
instance's apart counter, nothing else.

The i386 ``__vfork`` is ``pop ecx; mov eax, 190; int 0x80; push ecx; cmp eax, -4095; jae error;
ret``: the hook goes after the ``int 0x80`` (the relocated ``push ecx; cmp`` follow its action),
marking only where ``eax`` is 0. posix_spawn children are marked by hooks after the ``int 0x80``
of ``__clone3`` and of ``__clone`` (exported as ``clone``): i386 glibc 2.36's ``__spawni`` makes
its child through ``__clone_internal`` with ``CLONE_VM|CLONE_VFORK``, which tries ``clone3``
first (the only one run on this machine's kernel) and ``__clone`` where that fails with
``ENOSYS``. There the kernel keeps the registers: ``ebx`` holds the flags (``__clone``) or the
``struct clone_args`` whose first word they are (``__clone3``), ``esi`` the function's argument.
The hook marks only where ``eax`` is 0 and the flags have ``CLONE_VM`` and ``CLONE_VFORK`` and
no ``CLONE_SETTLS`` (a child with a TLS of its own does not read its parent's rseq area); at
``__clone3`` a thread of ``pthread_create`` (argument ``esi`` == ``gs:[8]``, its own ``struct
pthread``) is told apart before the flags are read, its creator not being suspended. Every other
pass (the parent's return, an error, a new thread) only counts in the hook's hits, as a count
stub would, and runs the displaced instructions: no TLS write, no wait. These hooks are used for
32-bit processes whether or not the libc names ``__spawni_child`` (a static function; Debian
ships no symbol table nor debug file for ``libc6-i386``): one path everywhere, the one tested
here, which marks the child at its first instruction and covers any
``clone(CLONE_VM|CLONE_VFORK)`` through glibc. The action saves the
flags with ``pushfd`` (the slot below ``esp``: below the saved registers in the parent, below the
new stack's top in the child, both unused), touches no register, never waits.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from iced_x86 import Code, Decoder, Instruction, Mnemonic, OpKind, Register

from .arch import I386
from .errors import SymbolNotFoundError
from .overlaps import unpatched_memory
from .rseq import CPU_ID, CPU_ID_START, VFORK_CPU
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _gs
from .symbols import ResolvedSite, Symbol, SymbolKind

if TYPE_CHECKING:  # pragma: no cover
    from .probes import ProbedProcess

__all__ = ["SYS_VFORK32", "SYS_CLONE32", "CLONE_VM", "CLONE_VFORK", "CLONE_SETTLS", "vfork_action32",
           "CloneFlagsAt", "find_vfork_site32", "find_clone_site32", "find_clone3_site32", "clone3_site32"]

SYS_VFORK32 = 190
SYS_CLONE32 = 120
CLONE_VM = 0x100
CLONE_VFORK = 0x4000
CLONE_SETTLS = 0x80000
SYS_CLONE3_32 = 435
THREAD_SELF32 = 8  #: gs:[8]: the thread's own ``struct pthread`` (``header.self`` of i386 glibc's TCB)


class CloneFlagsAt(enum.Enum):
    """Where a clone hook finds the clone flags after the ``int 0x80``."""

    EBX = "ebx"  #: in ``ebx`` (``__clone``)
    CLONE_ARGS_AT_EBX = "[ebx]"  #: first word of the ``struct clone_args`` at ``ebx`` (``__clone3``)


def vfork_action32(counter: int, apart: int, rseq_offset: int, *, child_only_if_eax_zero: bool,
                   clone_flags: CloneFlagsAt | None = None) -> list[Instruction]:
    """The i386 hook's action (as :func:`djprobe.vforks.vfork_action`): in a child whose thread is
    registered (``cpu_id`` at ``gs:[rseq_offset + 4]`` >= 0), write VFORK_CPU there and add one to
    the 64-bit apart counter at ``apart``; else add one to the counter at ``counter`` (the parent
    returning from ``vfork``, or a child of an unregistered thread). With
    ``child_only_if_eax_zero`` the child is the side where ``eax`` is 0; without, every pass is a
    child's. With ``clone_flags`` (the clone hooks) the child is marked only where the clone
    flags have ``CLONE_VM`` and ``CLONE_VFORK`` and no ``CLONE_SETTLS``: ``EBX``, in ``ebx``
    (after ``__clone``'s ``int 0x80``); ``CLONE_ARGS_AT_EBX``, in the low word of the ``struct clone_args``
    at ``ebx`` (after ``__clone3``'s), read only where ``esi`` (the function's argument) is not
    ``gs:[8]`` (``THREAD_SELF``: a thread of ``pthread_create``, whose argument is its own ``struct
    pthread``; its flags may be overwritten already, its parent not being suspended). Any other
    pass adds to ``counter`` and writes nothing else. Saves the flags; touches no register.
    Raises ValueError for a ``clone_flags`` that is not a :class:`CloneFlagsAt`."""
    from .vforks import unmark_parent

    R = Register
    a = _Asm()
    a.add(Instruction.create(Code.PUSHFD))
    if child_only_if_eax_zero:
        a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
        a.branch(Code.JNE_REL32_32, "parent")
    if clone_flags is not None and not isinstance(clone_flags, CloneFlagsAt):
        raise ValueError(f"clone_flags must be a CloneFlagsAt or None, not {clone_flags!r}")
    if clone_flags is CloneFlagsAt.CLONE_ARGS_AT_EBX:
        a.add(Instruction.create_reg_mem(Code.CMP_R32_RM32, R.ESI, _gs(THREAD_SELF32)))
        a.branch(Code.JE_REL32_32, "parent")
    if clone_flags:  # three tests: no register to spare for an and/cmp
        for flag, not_child in ((CLONE_VM, Code.JE_REL32_32), (CLONE_VFORK, Code.JE_REL32_32),
                                (CLONE_SETTLS, Code.JNE_REL32_32)):
            if clone_flags is CloneFlagsAt.EBX:
                a.add(Instruction.create_reg_u32(Code.TEST_RM32_IMM32, R.EBX, flag))
            else:
                a.add(Instruction.create_mem_u32(Code.TEST_RM32_IMM32, _abs(0, R.EBX), flag))
            a.branch(not_child, "parent")
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _gs(rseq_offset + CPU_ID), 0))
    a.branch(Code.JL_REL32_32, "parent")
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _gs(rseq_offset + CPU_ID), VFORK_CPU))
    _add64(a, _abs(apart), _abs(apart + 4), "apart_counted")
    a.branch(Code.JMP_REL32_32, "done")
    a.label("parent")
    unmark_parent(a, _gs(rseq_offset + CPU_ID_START), _gs(rseq_offset + CPU_ID), (Register.EAX, Register.ECX),
                  Code.PUSH_R32, Code.POP_R32)
    _add64(a, _abs(counter), _abs(counter + 4), "counted")
    a.label("done")
    a.add(Instruction.create(Code.POPFD))
    return _aimed32(a)


def _i386_function(target: "ProbedProcess", names: tuple[str, ...]):
    for module in target.symbols.modules:
        if module.arch is not I386:
            continue
        funcs = [s for name in names for s in module.symbols(name) if s.size]
        if funcs:
            return module, funcs[0]
    return None, None


def find_vfork_site32(target: "ProbedProcess") -> int:
    """The instruction after the ``int 0x80`` of ``vfork`` in the 32-bit libc's ``__vfork``, read
    without djprobe's own jumps (a probe at ``vfork`` displaces the ``mov eax, 190``). Raises
    SymbolNotFoundError when there is no ``__vfork`` or no ``mov eax, 190; int 0x80`` in it."""
    module, func = _i386_function(target, ("__vfork", "vfork"))
    if func is None:
        raise SymbolNotFoundError("no __vfork in the process")
    code = unpatched_memory(target, func.address, func.address + func.size).read(func.address, func.size)
    eax: int | None = None
    for insn in Decoder(32, code, ip=func.address):
        if insn.mnemonic == Mnemonic.MOV and insn.op0_kind == OpKind.REGISTER and insn.op0_register == Register.EAX:
            eax = insn.immediate(1) if insn.op1_kind == OpKind.IMMEDIATE32 else None
        elif insn.mnemonic == Mnemonic.INT and insn.immediate(0) == 0x80:
            if eax == SYS_VFORK32:
                return insn.next_ip
            eax = None
    raise SymbolNotFoundError(f"no vfork system call found in {module.name}:{func.name}")


def find_clone_site32(target: "ProbedProcess") -> int:
    """The instruction after the ``int 0x80`` of the 32-bit libc's ``__clone`` (``clone``), read
    without djprobe's own jumps, where the code has the shape the clone hook relies on: ``eax`` set
    to 120 (``clone``) and ``ebx`` loaded last from the flags argument (``[esp + 0xc]`` at entry,
    pushes counted) before the ``int 0x80``, then ``pop edi; pop esi; pop ebx; test eax, eax``
    (the relocated instructions: ``ebx`` is still the flags at the hook) and a ``jl``. Raises
    SymbolNotFoundError when there is no ``__clone`` or the code has another shape."""
    module, func = _i386_function(target, ("__clone", "clone"))
    if func is None:
        raise SymbolNotFoundError("no __clone in the 32-bit libc")
    code = unpatched_memory(target, func.address, func.address + func.size).read(func.address, func.size)
    insns = list(Decoder(32, code, ip=func.address))
    eax: int | None = None
    ebx_flags = False
    pushes = 0
    for n, insn in enumerate(insns):
        if insn.mnemonic == Mnemonic.PUSH:
            pushes += 1
        elif insn.mnemonic == Mnemonic.POP:
            pushes -= 1
        if insn.op_count and insn.op0_kind == OpKind.REGISTER and insn.mnemonic not in (
                Mnemonic.PUSH, Mnemonic.CMP, Mnemonic.TEST):
            if insn.op0_register == Register.EAX:
                eax = insn.immediate(1) if insn.mnemonic == Mnemonic.MOV and insn.op1_kind == OpKind.IMMEDIATE32 else None
            elif insn.op0_register == Register.EBX:
                ebx_flags = (insn.mnemonic == Mnemonic.MOV and insn.op1_kind == OpKind.MEMORY
                             and insn.memory_base == Register.ESP and insn.memory_index == Register.NONE
                             and insn.memory_displacement == 0xC + 4 * pushes)
        if insn.mnemonic == Mnemonic.INT and insn.immediate(0) == 0x80:
            after = [(i.mnemonic, i.op0_register if i.op_count else None) for i in insns[n + 1:n + 5]]
            shape = [(Mnemonic.POP, Register.EDI), (Mnemonic.POP, Register.ESI), (Mnemonic.POP, Register.EBX),
                     (Mnemonic.TEST, Register.EAX)]
            jl = insns[n + 5].mnemonic if n + 5 < len(insns) else None
            tested = insns[n + 4] if n + 4 < len(insns) else None
            if (eax == SYS_CLONE32 and ebx_flags and after == shape and jl == Mnemonic.JL
                    and tested.op1_kind == OpKind.REGISTER and tested.op1_register == Register.EAX):
                return insn.next_ip
            raise SymbolNotFoundError(f"{module.name}:{func.name} has not the expected shape around its "
                                      "int 0x80 (clone flags in ebx, then pop edi; pop esi; pop ebx; test eax, eax)")
    raise SymbolNotFoundError(f"no int 0x80 found in {module.name}:{func.name}")


def _last_writes(insns: list[Instruction]) -> dict[int, tuple[Instruction, int]]:
    """For the straight-line ``insns``: each register's last writer (a ``mov``/``pop``/...), with
    the number of 4-byte pushes in effect at it (to read ``[esp + d]`` as an argument)."""
    last: dict[int, tuple[Instruction, int]] = {}
    pushes = 0
    for insn in insns:
        if insn.mnemonic == Mnemonic.PUSH:
            pushes += 1
            continue
        if insn.op_count and insn.op0_kind == OpKind.REGISTER and insn.mnemonic not in (Mnemonic.CMP, Mnemonic.TEST):
            last[insn.op0_register] = (insn, pushes)
        if insn.mnemonic == Mnemonic.POP:
            pushes -= 1
    return last


def _is_arg(entry: tuple[Instruction, int] | None, reg: int, arg: int) -> bool:
    """``mov reg, [esp + 4 + 4 * arg + 4 * pushes]``: cdecl argument ``arg`` (0-based)."""
    if entry is None:
        return False
    insn, pushes = entry
    return (insn.mnemonic == Mnemonic.MOV and insn.op0_register == reg and insn.op1_kind == OpKind.MEMORY
            and insn.memory_base == Register.ESP and insn.memory_index == Register.NONE
            and insn.memory_displacement == 4 + 4 * arg + 4 * pushes)


def find_clone3_site32(target: "ProbedProcess") -> int:
    """The address of :func:`clone3_site32`."""
    return clone3_site32(target).address


def clone3_site32(target: "ProbedProcess") -> ResolvedSite:
    """The instruction after the ``int 0x80`` of the 32-bit libc's ``__clone3`` (``int
    __clone3 (struct clone_args *cl_args, size_t size, int (*fn)(void *), void *arg)``, through
    which ``__clone_internal`` makes posix_spawn children and threads where the kernel has
    ``clone3``; a static function without a symbol: found as the one ``mov eax, 435; int 0x80`` in
    the libc's code, its start being the FDE's that holds it), read without djprobe's own jumps,
    where the code has the shape the hook relies on: ``ebx`` = ``cl_args`` (``mov ebx, ecx`` from
    the first argument) and ``esi`` = ``arg`` (the fourth) at the ``int 0x80``, then ``test eax,
    eax; je child; pop esi`` (the relocated instructions; the child's path keeps ``esi``). Raises
    SymbolNotFoundError otherwise.

    The site is returned with the function to analyse it in, named ``__clone3``: from the start
    of the FDE before the ``int 0x80`` to the end of the FDE of the child's path (the ``je``'s
    target). glibc's unwind info leaves the ``int 0x80`` and the parent's return out of both, so no
    symbol of the module covers the hook's address (a user's probe there is refused)."""
    libc = [m for m in target.symbols.modules if m.arch is I386 and m.symbols("__clone")]
    if not libc:
        raise SymbolNotFoundError("no __clone in the 32-bit libc, so no __clone3 looked for")
    module = libc[0]
    pattern = bytes([0xB8]) + SYS_CLONE3_32.to_bytes(4, "little") + b"\xcd\x80"
    hits = []
    for lo, hi in module.executable_ranges():
        code = unpatched_memory(target, lo, hi).read(lo, hi - lo)
        at = code.find(pattern)
        while at >= 0:
            hits.append(lo + at)
            at = code.find(pattern, at + 1)
    if len(hits) != 1:
        raise SymbolNotFoundError(f"{len(hits)} clone3 system calls (mov eax, 435; int 0x80) in {module.name}, not one")
    hit = hits[0]
    starts = [r.start + module.bias for r in module._info.fde_ranges()
              if r.start + module.bias <= hit < r.end + module.bias and not r.signal_frame]
    if not starts:
        raise SymbolNotFoundError(f"no FDE holds the clone3 system call at {hit:#x} in {module.name}")
    start = starts[-1]
    code = unpatched_memory(target, start, hit + 16).read(start, hit + 16 - start)
    insns = list(Decoder(32, code, ip=start))
    ints = [n for n, i in enumerate(insns) if i.ip == hit + 5 and i.mnemonic == Mnemonic.INT]
    if not ints:
        raise SymbolNotFoundError(f"the clone3 system call at {hit:#x} is not on an instruction boundary")
    n = ints[0]
    last = _last_writes(insns[:n])
    ebx, ecx_entry = last.get(Register.EBX), None
    if ebx is not None and ebx[0].mnemonic == Mnemonic.MOV and ebx[0].op1_kind == OpKind.REGISTER \
            and ebx[0].op1_register == Register.ECX:
        ecx_entry = _last_writes(insns[:insns.index(ebx[0])]).get(Register.ECX)
    after = insns[n + 1:n + 4]
    shape = [(i.mnemonic, i.op0_register if i.op_count else None) for i in after]
    if not (_is_arg(ecx_entry, Register.ECX, 0) and _is_arg(last.get(Register.ESI), Register.ESI, 3)
            and shape == [(Mnemonic.TEST, Register.EAX), (Mnemonic.JE, Register.NONE), (Mnemonic.POP, Register.ESI)]
            and after[0].op1_register == Register.EAX):
        raise SymbolNotFoundError(f"the __clone3 at {start:#x} in {module.name} has not the expected shape "
                                  "(cl_args in ebx, arg in esi, then test eax, eax; je; pop esi)")
    je_target = after[1].near_branch_target
    ends = [r.end + module.bias for r in module._info.fde_ranges()
            if r.start + module.bias <= je_target < r.end + module.bias and not r.signal_frame]
    if not ends or je_target <= hit:
        raise SymbolNotFoundError(f"no FDE holds the child's path at {je_target:#x} of the __clone3 in {module.name}")
    function = Symbol(name="__clone3", address=start, size=ends[-1] - start, kind=SymbolKind.FUNC, module=module,
                      binding="LOCAL", from_eh_frame=True)
    site = insns[n].next_ip
    return ResolvedSite(spec=f"{module.name}:__clone3+{site - start:#x}", address=site, module=module,
                        function=function, offset=site - start)
