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
marking only where ``eax`` is 0. ``__spawni_child`` is a static function: only found where the
32-bit libc has a symbol table or a debug file (Debian ships neither for ``libc6-i386``: there,
posix_spawn children of 32-bit processes count as the parent's, with a note). The action saves
the flags with ``pushfd`` (the slot below ``esp`` is the one ``push ecx`` writes next), touches no
register, never waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import Code, Decoder, Instruction, Mnemonic, OpKind, Register

from .arch import I386
from .errors import SymbolNotFoundError
from .overlaps import unpatched_memory
from .rseq import CPU_ID, VFORK_CPU
from .stubs import _Asm
from .stubs32 import _abs, _add64, _aimed32, _gs

if TYPE_CHECKING:  # pragma: no cover
    from .probes import ProbedProcess

__all__ = ["SYS_VFORK32", "vfork_action32", "find_vfork_site32", "find_spawn_child32"]

SYS_VFORK32 = 190


def vfork_action32(counter: int, apart: int, rseq_offset: int, *, child_only_if_eax_zero: bool) -> list[Instruction]:
    """The i386 hook's action (as :func:`djprobe.vforks.vfork_action`): in a child whose thread is
    registered (``cpu_id`` at ``gs:[rseq_offset + 4]`` >= 0), write VFORK_CPU there and add one to
    the 64-bit apart counter at ``apart``; else add one to the counter at ``counter`` (the parent
    returning from ``vfork``, or a child of an unregistered thread). With
    ``child_only_if_eax_zero`` the child is the side where ``eax`` is 0; without, every pass is a
    child's. Saves the flags; touches no register."""
    R = Register
    a = _Asm()
    a.add(Instruction.create(Code.PUSHFD))
    if child_only_if_eax_zero:
        a.add(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
        a.branch(Code.JNE_REL32_32, "parent")
    a.add(Instruction.create_mem_u32(Code.CMP_RM32_IMM8, _gs(rseq_offset + CPU_ID), 0))
    a.branch(Code.JL_REL32_32, "parent")
    a.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _gs(rseq_offset + CPU_ID), VFORK_CPU))
    _add64(a, _abs(apart), _abs(apart + 4), "apart_counted")
    a.branch(Code.JMP_REL32_32, "done")
    a.label("parent")
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


def find_spawn_child32(target: "ProbedProcess") -> int:
    """The entry of the 32-bit libc's ``__spawni_child`` (in ``.symtab`` or a debug file only).
    Raises SymbolNotFoundError without it."""
    _, func = _i386_function(target, ("__spawni_child",))
    if func is None:
        raise SymbolNotFoundError("no __spawni_child symbol in the 32-bit libc (no symbol table or debug file)")
    return func.address
