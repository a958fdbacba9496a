"""x86 decoding (64-bit, or 32-bit for i386) into :class:`Insn` records (iced-x86 underneath).

Only what the rest of djprobe needs: instruction boundaries, a flow-control kind, direct branch
targets and RIP-relative operand targets. Everything that is not needed by a linear sweep
(text, raw bytes, branch and memory targets) is computed on first access, so that
:func:`iter_decode` over a whole library stays fast.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import iced_x86
from iced_x86 import Code, CodeSize, Decoder, FlowControl, Formatter, FormatterSyntax

__all__ = ["Flow", "Insn", "decode", "decode_one", "iter_decode", "format_instruction"]


class Flow(enum.Enum):
    """How control leaves an instruction."""

    NEXT = "next"  # falls through (ordinary instruction)
    JUMP = "jump"  # unconditional direct jmp (rel8/rel32)
    COND_JUMP = "cond_jump"  # jcc, loop*, jrcxz/jecxz, xbegin (direct, conditional)
    CALL = "call"  # direct call rel32
    INDIRECT_JUMP = "indirect_jump"  # jmp reg / jmp [mem] (incl. notrack, far)
    INDIRECT_CALL = "indirect_call"  # call reg / call [mem] (incl. far)
    RETURN = "return"  # ret, retf, iret
    SYSCALL = "syscall"  # syscall, sysenter, int 0x80
    INTERRUPT = "interrupt"  # int3, int n, int1, ud0/ud1/ud2, hlt, privileged instructions
    INVALID = "invalid"  # bytes that do not decode


#: Flow kinds that carry a direct target (``Insn.target``).
DIRECT_FLOWS = frozenset({Flow.JUMP, Flow.COND_JUMP, Flow.CALL})
#: Flow kinds after which execution may continue at ``Insn.end``.
FALLS_THROUGH = frozenset({Flow.NEXT, Flow.COND_JUMP, Flow.SYSCALL})

_NEXT = Flow.NEXT
_INVALID = Flow.INVALID
_INTERRUPT = Flow.INTERRUPT
_SYSCALL = Flow.SYSCALL
_CALL = Flow.CALL

_FC_MAP = {
    FlowControl.NEXT: Flow.NEXT,
    FlowControl.UNCONDITIONAL_BRANCH: Flow.JUMP,
    FlowControl.CONDITIONAL_BRANCH: Flow.COND_JUMP,
    FlowControl.INDIRECT_BRANCH: Flow.INDIRECT_JUMP,
    FlowControl.INDIRECT_CALL: Flow.INDIRECT_CALL,
    FlowControl.RETURN: Flow.RETURN,
    FlowControl.INTERRUPT: Flow.INTERRUPT,
    FlowControl.EXCEPTION: Flow.INTERRUPT,
    # CALL and XBEGIN_XABORT_XEND are resolved by _slow_flow
}
_FC_NEXT = FlowControl.NEXT
_CODE_INVALID = Code.INVALID
_CODE32 = CodeSize.CODE32
_CODE_INT_IMM8 = Code.INT_IMM8
_CODE_XBEGIN = frozenset({Code.XBEGIN_REL16, Code.XBEGIN_REL32})
_CODE_SYSCALL = frozenset({Code.SYSCALL, Code.SYSENTER})
_CODE_NEAR_CALL = frozenset({Code.CALL_REL32_64, Code.CALL_REL16, Code.CALL_REL32_32})


def _slow_flow(instr: iced_x86.Instruction, fc: int) -> Flow:
    code = instr.code
    if code == _CODE_INVALID:
        return _INVALID
    if fc == _FC_NEXT:
        return _INTERRUPT if instr.is_privileged else _NEXT
    if fc == FlowControl.CALL:
        if code in _CODE_NEAR_CALL:
            return _CALL
        if code in _CODE_SYSCALL:
            return _SYSCALL
        return _INTERRUPT  # vmcall and friends
    if fc == FlowControl.XBEGIN_XABORT_XEND:
        return Flow.COND_JUMP if code in _CODE_XBEGIN else _NEXT
    if fc == FlowControl.INTERRUPT and code == _CODE_INT_IMM8 and instr.immediate8 == 0x80:
        return _SYSCALL
    if fc == FlowControl.RETURN and instr.is_privileged:
        return _INTERRUPT  # sysret, sysexit
    return _FC_MAP[fc]


_formatter: Formatter | None = None


def format_instruction(instr: iced_x86.Instruction) -> str:
    """Intel syntax with 0x hex numbers and absolute RIP-relative/branch targets."""
    global _formatter
    f = _formatter
    if f is None:
        f = Formatter(FormatterSyntax.INTEL)
        f.hex_prefix = "0x"
        f.hex_suffix = ""
        f.uppercase_hex = False
        f.leading_zeros = False
        f.branch_leading_zeros = False
        f.displacement_leading_zeros = False
        f.add_leading_zero_to_hex_numbers = False
        f.space_after_operand_separator = False
        f.rip_relative_addresses = False  # show [0x7f..] rather than [rip+0x..]
        _formatter = f
    return f.format(instr)


class Insn:
    """One decoded instruction. Treat as immutable.

    ``address``, ``length``, ``flow`` and ``instruction`` are plain attributes; ``raw``, ``text``,
    ``target``, ``rip_relative`` and ``mem_target`` are computed on access. Equality and hashing
    use (address, raw bytes).
    """

    __slots__ = ("address", "length", "flow", "instruction", "_buf", "_off", "_text")

    def __init__(
        self,
        address: int,
        length: int,
        flow: Flow,
        instruction: iced_x86.Instruction,
        buf: bytes,
        off: int = 0,
    ) -> None:
        self.address = address
        self.length = length
        self.flow = flow
        self.instruction = instruction
        self._buf = buf
        self._off = off
        self._text = None

    @property
    def end(self) -> int:
        return self.address + self.length

    @property
    def raw(self) -> bytes:
        buf = self._buf
        if self._off == 0 and len(buf) == self.length:
            return buf
        return buf[self._off : self._off + self.length]

    @property
    def text(self) -> str:
        t = self._text
        if t is None:
            t = "(bad)" if self.flow is _INVALID else format_instruction(self.instruction)
            self._text = t
        return t

    @property
    def target(self) -> int | None:
        """Direct branch/call target for JUMP, COND_JUMP, CALL, else None."""
        if self.flow in DIRECT_FLOWS:
            return self.instruction.near_branch_target
        return None

    @property
    def rip_relative(self) -> bool:
        return self.flow is not _INVALID and self.instruction.is_ip_rel_memory_operand

    @property
    def mem_target(self) -> int | None:
        """Absolute address of the RIP-relative memory operand, else None."""
        if self.rip_relative:
            return self.instruction.ip_rel_memory_address
        return None

    @property
    def bits(self) -> int:
        """The mode it was decoded in: 64 or 32."""
        return 32 if self.instruction.code_size == _CODE32 else 64

    @property
    def falls_through(self) -> bool:
        """Can execution continue at ``end`` after this instruction?"""
        return self.flow in FALLS_THROUGH

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Insn):
            return NotImplemented
        return self.address == other.address and self.raw == other.raw

    def __hash__(self) -> int:
        return hash((self.address, self.raw))

    def __repr__(self) -> str:
        return f"Insn({self.address:#x}, {self.raw.hex(' ')!r}, {self.text!r}, {self.flow.name})"


def iter_decode(code: bytes, address: int, bits: int = 64) -> Iterator[Insn]:
    """Linear sweep over all of ``code`` placed at ``address``, in ``bits``-bit mode (64 or 32:
    ``Arch.bits``).

    Bytes that do not decode (including a truncated instruction at the end) give an
    ``Insn(flow=INVALID, length=1)`` and decoding resumes at the next byte.
    """
    buf = bytes(code)
    n = len(buf)
    if n == 0:
        return
    dec = Decoder(bits, buf, ip=address)
    fc_next = _FC_NEXT
    slow = _slow_flow
    new = Insn.__new__
    pos = 0
    for instr in dec:
        ln = instr.len
        fc = instr.flow_control
        if fc == fc_next:
            # hlt, cli, in/out, rdmsr ...: they trap (#GP) in user mode
            flow = _INTERRUPT if instr.is_privileged else _NEXT
        else:
            flow = slow(instr, fc)
        if flow is _INVALID:
            insn = new(Insn)
            insn.address = address + pos
            insn.length = 1
            insn.flow = _INVALID
            insn.instruction = instr
            insn._buf = buf
            insn._off = pos
            insn._text = None
            yield insn
            pos += 1
            if pos >= n:
                return
            dec.position = pos
            dec.ip = address + pos
            continue
        insn = new(Insn)
        insn.address = address + pos
        insn.length = ln
        insn.flow = flow
        insn.instruction = instr
        insn._buf = buf
        insn._off = pos
        insn._text = None
        yield insn
        pos += ln


def decode(code: bytes, address: int, bits: int = 64) -> list[Insn]:
    """Linear sweep over all of ``code`` (see :func:`iter_decode`)."""
    return list(iter_decode(code, address, bits))


def decode_one(code: bytes, address: int, bits: int = 64) -> Insn:
    """Decode the first instruction of ``code`` (INVALID with length 1 if it does not decode)."""
    buf = bytes(code[:15])
    if not buf:
        raise ValueError("decode_one: no bytes")
    for insn in iter_decode(buf, address, bits):
        insn._buf = buf[: insn.length]
        insn._off = 0
        return insn
    raise AssertionError("unreachable")
