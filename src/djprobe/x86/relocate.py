"""Relocation of displaced instructions to a stub address.

Each displaced instruction becomes one *piece* of the relocated code, laid out in order:

=====================  ==========================================================================
instruction            relocated form
=====================  ==========================================================================
ordinary               the original bytes
RIP-relative operand   the original bytes with the disp32 re-aimed at the same absolute address
jmp rel8/rel32         ``jmp rel32`` (iced re-encodes the near form)
jcc rel8/rel32         ``jcc rel32``
xbegin rel32           ``xbegin rel32``
loop*/jrcxz/jecxz      ``loop +2 ; jmp short +5 ; jmp rel32 target`` (no near form exists)
call rel32             ``push qword [rip+L] ; jmp rel32 target ; L: dq return_address``
call r/m64             ``push qword [rip+L] ; jmp r/m64 (same operand) ; L: dq return_address``
call rel32 (i386)      ``push imm32 return_address ; jmp rel32 target``
call r/m32 (i386)      ``push imm32 return_address ; jmp r/m32 (same operand)``
=====================  ==========================================================================

32-bit (i386) code is relocated by the same rules, with the forms of :mod:`.mode`: it has no
RIP-relative operands, and a ``jmp rel32`` reaches every address (the 4 GiB wrap). A call keeps
its original return address, so ``call __x86.get_pc_thunk.bx`` at a PIC function's entry makes the
thunk read the original address of the next instruction, as it expects.

followed, if the last instruction can fall through, by ``jmp rel32 return_to``. Every piece has a
size that does not depend on where it is placed, so the layout is computed first and the pieces
are then encoded at their final addresses. The result is decoded again and checked against the
original before it is returned.

Branch targets inside the displaced range are redirected to the relocated copy (except those the
caller names ``external``: a probe's own site); all other targets (and RIP-relative operands) keep
their absolute address. A call keeps its original
return address, so callees return into the original code and the stack holds exactly what it
would have held.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from iced_x86 import Code, Decoder, Encoder, Instruction, MemoryOperand, MemorySizeExt, Mnemonic, OpKind, Register

from .decode import FALLS_THROUGH, Flow, Insn, decode
from .mode import MODE64, MODES, Mode

__all__ = ["RelocationError", "Relocated", "relocate", "relocation_problem", "max_relocated_size"]

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_U64 = (1 << 64) - 1

_JMP_REL32_SIZE = 5
_PUSH_RIP_SIZE = 6  # ff 35 disp32
_QWORD = 8
_JMP_SHORT_SIZE = 2

_XBEGIN_OK = frozenset({Code.XBEGIN_REL32})
_STACK_REGS = frozenset({Register.RSP, Register.ESP, Register.SP, Register.SPL})


class RelocationError(Exception):
    """The instructions cannot be moved to the requested address.

    ``reason`` is a sentence a user can act on; ``address`` is the original address of the
    offending instruction (or None); ``out_of_reach`` is True when the only problem is the
    distance between the stub and a target (a stub placed closer may work).
    """

    def __init__(self, reason: str, *, address: int | None = None, out_of_reach: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address
        self.out_of_reach = out_of_reach


@dataclass(frozen=True, slots=True)
class Relocated:
    """Relocated instructions.

    ``address_map`` maps the original start of every displaced instruction to the start of its
    relocated form, and the original end of every instruction to the address right after its
    relocated form (for the last one: the appended ``jmp return_to``, or the end of ``code``).
    Exception: the end of a call, which is the call's return address in the original code, maps
    to itself (the relocated call returns there).
    ``return_jump`` is the address of the appended ``jmp return_to`` (None if none was added).
    """

    code: bytes
    address: int
    address_map: dict[int, int] = field(hash=False)
    return_jump: int | None = None

    @property
    def end(self) -> int:
        return self.address + len(self.code)


def _fits32(v: int) -> bool:
    return _INT32_MIN <= v <= _INT32_MAX


def _encode(instr: Instruction, rip: int, bits: int = 64) -> bytes:
    enc = Encoder(bits)
    enc.encode(instr, rip)
    return enc.take_buffer()


def _uses_stack_pointer(instr: Instruction) -> bool:
    """Does the (single) operand of an indirect call read rsp?"""
    for i in range(instr.op_count):
        kind = instr.op_kind(i)
        if kind == OpKind.REGISTER and instr.op_register(i) in _STACK_REGS:
            return True
        if kind == OpKind.MEMORY and (
            instr.memory_base in _STACK_REGS or instr.memory_index in _STACK_REGS
        ):
            return True
    return False


def _where(insn: Insn) -> str:
    return f"'{insn.text}' at {insn.address:#x}"


def relocation_problem(insn: Insn) -> str | None:
    """None if ``insn`` can be moved to another address, else a sentence saying why not.

    This judges the instruction alone; :func:`relocate` adds the checks that depend on the
    neighbours (a call must be last, no branch into the middle of an instruction) and on the
    new address (reach).
    """
    flow = insn.flow
    instr = insn.instruction
    if flow is Flow.INVALID:
        return f"bytes at {insn.address:#x} ({insn.raw.hex(' ')}) do not decode as an x86-64 instruction"
    if flow is Flow.INTERRUPT:
        if instr.code == Code.INT3:
            return (
                f"int3 at {insn.address:#x}: site already patched (a breakpoint by a debugger or "
                "uprobe) or a trap; remove the breakpoint or choose another site"
            )
        return f"{_where(insn)} traps or stops the thread; it cannot be displaced, choose another site"
    code = instr.code
    mode = MODES[insn.bits]
    if flow is Flow.JUMP and code not in mode.jmp_codes:
        return f"{_where(insn)} is an unusual jump form (operand-size prefix) that cannot be relocated"
    if flow is Flow.COND_JUMP:
        if instr.mnemonic == Mnemonic.XBEGIN:
            if code not in _XBEGIN_OK:
                return f"{_where(insn)} is a 16-bit xbegin form that cannot be relocated"
        elif not (instr.is_jcc_short_or_near or code in mode.loop_codes):
            return f"{_where(insn)} is an unusual conditional branch form that cannot be relocated"
    if flow is Flow.CALL and code != mode.call_rel32:
        return f"{_where(insn)} is an unusual call form (operand-size prefix) that cannot be relocated"
    if flow is Flow.INDIRECT_CALL:
        if code != mode.call_rm:
            return f"{_where(insn)} is a far or 16-bit call that cannot be relocated"
        if _uses_stack_pointer(instr):
            return (
                f"{_where(insn)} reads its target through rsp; the relocated call pushes the "
                "return address first, so the operand would change"
            )
    if insn.rip_relative and flow not in (Flow.INDIRECT_CALL,):
        if _disp_offset(insn) is None:
            return f"{_where(insn)} has a RIP-relative operand that cannot be re-aimed"
    return None


def _disp_offset(insn: Insn) -> int | None:
    """Offset of the RIP-relative disp32 inside ``insn.raw`` (None if not found)."""
    raw = insn.raw
    dec = Decoder(64, raw, ip=insn.address)
    instr = dec.decode()
    offs = dec.get_constant_offsets(instr)
    if not offs.has_displacement or offs.displacement_size != 4:
        return None
    off = offs.displacement_offset
    (disp,) = struct.unpack_from("<i", raw, off)
    if (insn.end + disp) & _U64 != insn.mem_target:
        return None
    return off


class _Piece:
    __slots__ = ("insn", "kind", "size", "start")

    def __init__(self, insn: Insn, kind: str, size: int) -> None:
        self.insn = insn
        self.kind = kind
        self.size = size
        self.start = 0


def _near_copy(insn: Insn, target: int) -> Instruction:
    c = insn.instruction.copy()
    c.as_near_branch()
    _set_target(c, target)
    return c


def _set_target(c: Instruction, target: int) -> None:
    if c.op0_kind == OpKind.NEAR_BRANCH32:
        c.near_branch32 = target & 0xFFFFFFFF
    else:
        c.near_branch64 = target


def _jmp_copy(insn: Insn) -> Instruction:
    c = insn.instruction.copy()
    c.code = MODES[insn.bits].jmp_rm
    return c


def _kind_and_size(insn: Insn) -> _Piece:
    flow = insn.flow
    instr = insn.instruction
    mode = MODES[insn.bits]
    call_extra = mode.push_return_size + mode.return_literal_size
    if flow is Flow.CALL:
        return _Piece(insn, "call", call_extra + _JMP_REL32_SIZE)
    if flow is Flow.INDIRECT_CALL:
        # the encoded length of `jmp r/m` does not depend on where it is placed
        jmp = _encode(_jmp_copy(insn), insn.address, mode.bits)
        return _Piece(insn, "icall", call_extra + len(jmp))
    if flow in (Flow.JUMP, Flow.COND_JUMP):
        if instr.code in mode.loop_codes:
            c = instr.copy()
            _set_target(c, insn.address + 16)
            loop_len = len(_encode(c, insn.address, mode.bits))
            return _Piece(insn, "loop", loop_len + _JMP_SHORT_SIZE + _JMP_REL32_SIZE)
        n = len(_encode(_near_copy(insn, insn.target), insn.address, mode.bits))
        return _Piece(insn, "near", n)
    if insn.rip_relative:
        return _Piece(insn, "riprel", insn.length)
    return _Piece(insn, "raw", insn.length)


def max_relocated_size(insns: Sequence[Insn]) -> int:
    """An upper bound on ``len(relocate(insns, ...).code)`` (including the jump back)."""
    total = _JMP_REL32_SIZE
    for insn in insns:
        try:
            if relocation_problem(insn) is not None:
                raise ValueError
            total += _kind_and_size(insn).size
        except (ValueError, RuntimeError):
            total += _PUSH_RIP_SIZE + 15 + _QWORD
    return total


def _mode_of(insns: Sequence[Insn]) -> Mode:
    if not insns:
        return MODE64
    bits = {i.bits for i in insns}
    if len(bits) != 1:
        raise ValueError("instructions decoded in different modes")
    return MODES[bits.pop()]


def _out_of_reach(insn: Insn | None, what: str, target: int, new_address: int) -> RelocationError:
    who = f"{_where(insn)}: " if insn is not None else ""
    return RelocationError(
        f"{who}{what} {target:#x} is out of reach (±2 GiB) of stub at {new_address:#x}",
        address=insn.address if insn is not None else None,
        out_of_reach=True,
    )


def relocate(insns: Sequence[Insn], new_address: int, return_to: int | None, *,
             external: Collection[int] = ()) -> Relocated:
    """Encode the displaced instructions ``insns`` (contiguous, in order) to run at ``new_address``.

    If ``return_to`` is not None and the last instruction can fall through, ``jmp return_to`` is
    appended. A branch to an address in ``external`` keeps that address even inside the displaced
    range (a probe's site: a loop back to it goes through the jump there, so the probe's action
    runs on every turn). Raises :class:`RelocationError` if that cannot be done faithfully.
    """
    insns = list(insns)
    mode = _mode_of(insns)
    bits = mode.bits
    for a, b in zip(insns, insns[1:]):
        if a.end != b.address:
            raise ValueError(f"instructions are not contiguous: {a.end:#x} != {b.address:#x}")
    for insn in insns:
        problem = relocation_problem(insn)
        if problem is not None:
            raise RelocationError(problem, address=insn.address)
    for insn in insns[:-1]:
        if insn.flow in (Flow.CALL, Flow.INDIRECT_CALL):
            raise RelocationError(
                f"{_where(insn)} is a call in the middle of the displaced instructions: the callee "
                "would return into patched bytes; choose a site where the call is the last "
                "displaced instruction",
                address=insn.address,
            )

    lo = insns[0].address if insns else 0
    hi = insns[-1].end if insns else 0
    for insn in insns:
        if insn.rip_relative:
            t = insn.mem_target
            size = max(1, MemorySizeExt.size(insn.instruction.memory_size))
            if insn.instruction.mnemonic != Mnemonic.LEA and t < hi and t + size > lo:
                raise RelocationError(
                    f"{_where(insn)} accesses memory at {t:#x}, inside the displaced bytes that "
                    "the probe overwrites; choose another site",
                    address=insn.address,
                )

    # layout
    pieces = [_kind_and_size(insn) for insn in insns]
    pos = new_address
    for p in pieces:
        p.start = pos
        pos += p.size
    end_of_pieces = pos
    add_jump = bool(insns) and return_to is not None and insns[-1].flow in FALLS_THROUGH
    if not insns and return_to is not None:
        add_jump = True

    new_start = {p.insn.address: p.start for p in pieces}

    def resolve(insn: Insn, target: int) -> int:
        if lo <= target < hi and target not in external:
            if target not in new_start:
                raise RelocationError(
                    f"{_where(insn)} branches to {target:#x}, into the middle of a displaced "
                    "instruction (overlapping code); choose another site",
                    address=insn.address,
                )
            return new_start[target]
        return target

    def rel32(insn: Insn | None, what: str, target: int, next_ip: int) -> int:
        d = target - next_ip
        if mode.rel32_reaches_all:
            return ((d + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
        if not _fits32(d):
            raise _out_of_reach(insn, what, target, new_address)
        return d

    out = bytearray()
    for p in pieces:
        insn, at = p.insn, p.start
        if p.kind == "raw":
            b = insn.raw
        elif p.kind == "riprel":
            off = _disp_offset(insn)
            assert off is not None  # relocation_problem checked it
            d = rel32(insn, "its memory operand", insn.mem_target, at + insn.length)
            b = bytearray(insn.raw)
            struct.pack_into("<i", b, off, d)
            b = bytes(b)
        elif p.kind == "near":
            tgt = resolve(insn, insn.target)
            rel32(insn, "branch target", tgt, at + p.size)
            b = _encode(_near_copy(insn, tgt), at, bits)
        elif p.kind == "loop":
            tgt = resolve(insn, insn.target)
            loop_len = p.size - _JMP_SHORT_SIZE - _JMP_REL32_SIZE
            far_jmp = at + loop_len + _JMP_SHORT_SIZE
            c = insn.instruction.copy()
            _set_target(c, far_jmp)  # loop +2 -> the jmp rel32
            b = _encode(c, at, bits)
            b += _encode(Instruction.create_branch(mode.jmp_rel8, at + p.size), at + loop_len, bits)
            rel32(insn, "branch target", tgt, at + p.size)
            b += _encode(Instruction.create_branch(mode.jmp_rel32, tgt), far_jmp, bits)
        elif p.kind in ("call", "icall"):
            lit = at + p.size - mode.return_literal_size
            jmp_at = at + mode.push_return_size
            if p.kind == "call":
                tgt = resolve(insn, insn.target)
                rel32(insn, "call target", tgt, jmp_at + _JMP_REL32_SIZE)
                jmp = _encode(Instruction.create_branch(mode.jmp_rel32, tgt), jmp_at, bits)
            else:
                if insn.rip_relative:
                    rel32(insn, "its memory operand", insn.mem_target, lit)
                jmp = _encode(_jmp_copy(insn), jmp_at, bits)
            if bits == 64:
                push = _encode(
                    Instruction.create_mem(Code.PUSH_RM64, MemoryOperand(Register.RIP, displ=lit)), at
                )
                b = push + jmp + struct.pack("<Q", insn.end & _U64)
            else:  # push imm32: the 4-byte return address itself
                b = b"\x68" + struct.pack("<I", insn.end & 0xFFFFFFFF) + jmp
        else:  # pragma: no cover
            raise AssertionError(p.kind)
        if len(b) != p.size:
            raise RelocationError(
                f"{_where(insn)}: re-encoding changed its size ({len(b)} != {p.size}); cannot relocate",
                address=insn.address,
            )
        out += b

    return_jump = None
    if add_jump:
        assert return_to is not None
        return_jump = end_of_pieces
        rel32(None, "jump back to", return_to, return_jump + _JMP_REL32_SIZE)
        out += _encode(Instruction.create_branch(mode.jmp_rel32, return_to), return_jump, bits)

    amap: dict[int, int] = {}
    for p in pieces:
        amap[p.insn.address] = p.start
    for i, p in enumerate(pieces):
        if i + 1 < len(pieces):
            amap[p.insn.end] = pieces[i + 1].start
        elif p.kind in ("call", "icall"):
            amap[p.insn.end] = p.insn.end
        else:
            amap[p.insn.end] = end_of_pieces

    rel = Relocated(bytes(out), new_address, amap, return_jump)
    _verify(pieces, rel, resolve, return_to if add_jump else None, mode)
    return rel


def _verify(pieces: list[_Piece], rel: Relocated, resolve, return_to: int | None, mode: Mode = MODE64) -> None:
    """Decode the result and check it against the original; RelocationError on mismatch."""
    got = {i.address: i for i in decode(rel.code, rel.address, mode.bits)}

    def fail(insn: Insn, what: str) -> RelocationError:
        return RelocationError(
            f"{_where(insn)}: relocated form does not check out ({what}); cannot relocate",
            address=insn.address,
        )

    for p in pieces:
        insn = p.insn
        new = got.get(p.start)
        if new is None or new.flow is Flow.INVALID:
            raise fail(insn, "undecodable")
        if p.kind in ("raw", "riprel"):
            if new.length != insn.length or new.instruction.code != insn.instruction.code:
                raise fail(insn, "different instruction")
            if new.mem_target != insn.mem_target:
                raise fail(insn, "memory operand moved")
        elif p.kind == "near":
            if new.flow is not insn.flow or new.target != resolve(insn, insn.target):
                raise fail(insn, "branch target moved")
            if new.instruction.condition_code != insn.instruction.condition_code:
                raise fail(insn, "condition changed")
        elif p.kind == "loop":
            if new.instruction.code != insn.instruction.code:
                raise fail(insn, "different instruction")
            far = got.get(new.target)
            if far is None or far.target != resolve(insn, insn.target):
                raise fail(insn, "branch target moved")
        else:
            if mode.bits == 64:
                lit = p.start + p.size - _QWORD
                if new.mem_target != lit or struct.unpack_from("<Q", rel.code, lit - rel.address)[0] != insn.end:
                    raise fail(insn, "return address")
            elif new.instruction.code != Code.PUSHD_IMM32 or new.instruction.immediate32 != insn.end & 0xFFFFFFFF:
                raise fail(insn, "return address")
            jmp = got.get(new.end)
            if jmp is None:
                raise fail(insn, "undecodable")
            if p.kind == "call":
                if jmp.flow is not Flow.JUMP or jmp.target != resolve(insn, insn.target):
                    raise fail(insn, "call target moved")
            elif jmp.flow is not Flow.INDIRECT_JUMP or jmp.mem_target != insn.mem_target:
                raise fail(insn, "call operand changed")
    if return_to is not None:
        j = got.get(rel.return_jump)
        if j is None or j.flow is not Flow.JUMP or j.target != return_to:
            raise RelocationError("the jump back to the original code does not check out")
