"""Decoded regions and backward register slices: enough value analysis to recognise jump-table
idioms and their bounds, and to tell a code pointer from an address computed by arithmetic."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iced_x86 import InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register, RegisterExt

from ..x86 import Flow, Insn

if TYPE_CHECKING:
    from .index import ModuleIndex


class _Region:
    """A stretch of code decoded by one linear sweep from a known instruction start."""

    __slots__ = ("start", "end", "insns", "addrs", "bad", "tables", "unknown_jumps", "index_of")

    def __init__(self, start: int, end: int, insns: list[Insn]) -> None:
        self.start = start
        self.end = end
        self.insns = insns
        self.addrs = [i.address for i in insns]
        self.bad = next((i for i in insns if i.flow is Flow.INVALID), None)
        if insns and insns[-1].end > end:
            self.bad = self.bad or insns[-1]
        self.tables: list[tuple[int, int, list[int]]] = []  # (jmp address, table address, targets)
        self.unknown_jumps: list[int] = []
        self.index_of: dict[int, int] | None = None

    def insn_containing(self, address: int) -> Insn | None:
        i = bisect.bisect_right(self.addrs, address) - 1
        if i >= 0 and self.insns[i].address <= address < self.insns[i].end:
            return self.insns[i]
        return None

    def index(self, address: int) -> int | None:
        if self.index_of is None:
            self.index_of = {a: k for k, a in enumerate(self.addrs)}
        return self.index_of.get(address)


def _full(reg: int) -> int:
    """The 64-bit register of a general-purpose register (al, eax, ax -> rax)."""
    try:
        return RegisterExt.full_register(reg)
    except Exception:  # noqa: BLE001 - not a GPR
        return reg


_GPR64 = {
    Register.RAX, Register.RBX, Register.RCX, Register.RDX, Register.RSI, Register.RDI, Register.RBP,
    Register.RSP, Register.R8, Register.R9, Register.R10, Register.R11, Register.R12, Register.R13,
    Register.R14, Register.R15,
}
#: the general-purpose registers of i386 code (value analysis names them by their 64-bit register)
_GPR32 = {
    Register.EAX, Register.EBX, Register.ECX, Register.EDX, Register.ESI, Register.EDI, Register.EBP, Register.ESP,
}
_CALLEE_SAVED = frozenset({Register.RBX, Register.RBP, Register.R12, Register.R13, Register.R14, Register.R15})
_CALLER_SAVED = {Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.RDI, Register.R8,
                 Register.R9, Register.R10, Register.R11}


_WRITE_ACCESS = frozenset({OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE})


def _writes(insn: Insn, reg: int) -> bool:
    """Does ``insn`` (possibly) write the 64-bit register ``reg`` (or a part of it)?"""
    if insn.flow in (Flow.CALL, Flow.INDIRECT_CALL) and (reg in _CALLER_SAVED or insn.bits == 32):
        return True  # i386: the callee may be __x86.get_pc_thunk.REG, which sets any register
    info = _info_factory().info(insn.instruction)
    return any(_full(ur.register) == reg and ur.access in _WRITE_ACCESS for ur in info.used_registers())


_factory: InstructionInfoFactory | None = None


def _info_factory() -> InstructionInfoFactory:
    global _factory
    if _factory is None:
        _factory = InstructionInfoFactory()
    return _factory


@dataclass(frozen=True)
class _Val:
    """An abstract register value: ``const`` (an address), ``tload`` (movsxd [base + idx*4 + d],
    or a single movsxd [rip + d]: ``index`` 0), ``add`` (sum of two values), ``ptr`` (a code
    pointer from memory, a parameter, a call result: only an address-taken point), ``data`` (null
    or a stack address: never the base of a jump into code, so a path that brings it to an
    indirect jump cannot be taken), ``set`` (one of ``alts``, by path), ``arith`` (computed in a
    way not understood)."""

    kind: str
    value: int = 0
    base: "_Val | None" = None
    other: "_Val | None" = None
    index: int = 0
    disp: int = 0
    at: tuple[int, int] = (0, -1)  # tload: (region start, insn index) of the load
    alts: frozenset = frozenset()


_PTR = _Val("ptr")
_ARITH = _Val("arith")
_LOOP = _Val("loop")  # only reached around a loop: adds nothing
_DATA = _Val("data")
_MAX_ALTS = 8
_NO_FALLTHROUGH = frozenset({Flow.JUMP, Flow.INDIRECT_JUMP, Flow.RETURN, Flow.INTERRUPT, Flow.INVALID})
_BUDGET = 20000
_MAX_TABLE = 1024
_PTR_OPS = frozenset({Mnemonic.ROR, Mnemonic.ROL, Mnemonic.XOR})  # glibc PTR_DEMANGLE
_BOUND_JCC = {  # mnemonic -> (edge that bounds: "fall"/"taken", bound from imm N)
    Mnemonic.JA: ("fall", 1),
    Mnemonic.JAE: ("fall", 0),
    Mnemonic.JBE: ("taken", 1),
    Mnemonic.JB: ("taken", 0),
}
_IMM_KINDS = frozenset({OpKind.IMMEDIATE8, OpKind.IMMEDIATE8TO32, OpKind.IMMEDIATE8TO64, OpKind.IMMEDIATE32,
                        OpKind.IMMEDIATE32TO64})


class _Budget(Exception):
    pass


class _Slicer:
    """Backward value analysis over decoded regions, following every predecessor (fall-through
    and verified direct branches), enough for jump-table idioms and for telling a code pointer
    (loaded, passed in, returned, demangled) from an address computed by arithmetic."""

    def __init__(self, index: "ModuleIndex") -> None:
        self.ix = index
        self.steps = 0
        self.bounding = False
        self.gprs = _GPR32 if getattr(index, "bits", 64) == 32 else _GPR64  # full-width registers

    def _tick(self) -> None:
        self.steps += 1
        if self.steps > _BUDGET:
            raise _Budget()

    def preds(self, r: _Region, idx: int) -> tuple[list[tuple[_Region, int, bool]], bool]:
        """Instructions that may run right before r.insns[idx]: (region, index, via_branch);
        and whether the address is also entered from elsewhere (symbol, pointer, table, pad)."""
        out: list[tuple[_Region, int, bool]] = []
        addr = r.insns[idx].address
        if idx > 0:
            if self._falls_through(r.insns[idx - 1]):
                out.append((r, idx - 1, False))
        else:
            prev = self.ix.region_at(addr - 1)
            if prev is not None and prev.insns and prev.insns[-1].end == addr and \
                    self._falls_through(prev.insns[-1]):
                out.append((prev, len(prev.insns) - 1, False))
        other = False  # entered by a call, or from code that does not decode
        for src in self.ix.branch_sources(addr):
            r2 = self.ix.region_at(src)
            if r2 is None:
                other = True
                continue
            ins = r2.insn_containing(src)
            k2 = r2.index(ins.address) if ins is not None else None
            if k2 is None or ins.flow not in (Flow.JUMP, Flow.COND_JUMP):
                other = True  # a call into the middle, or an undecodable source
                continue
            out.append((r2, k2, True))
        if other:
            return out, True  # every other way in still counts
        static = self.ix.is_static_entry(addr)
        if not out and not static and not self.bounding:
            # Reached by no direct branch, fall-through or address-taken point: alignment padding,
            # or a case block entered through the jump table being analysed, which carries the
            # values at that jump (a cycle): adds nothing. (Bounds stay strict: see bound().)
            return out, False
        return out, static or not out

    def _entry_value(self, reg: int, address: int) -> _Val:
        """The value of ``reg`` where control enters from elsewhere: at a function's first byte
        a callee-saved register holds the caller's value, which the function only saves and
        restores (never a base for a jump: ``data``); anything else may be a code pointer."""
        if reg in _CALLEE_SAVED and self.ix.is_function_start(address):
            return _DATA
        return _PTR

    def _dead(self, r: _Region, idx: int) -> bool:
        """Is r.insns[idx] in a block that only a call of a function that never returns would
        fall into (no branch, table, pointer or symbol leads there)?"""
        while True:
            self._tick()
            preds, entered = self.preds(r, idx)
            if entered or preds and (len(preds) > 1 or preds[0][2]):
                return False
            if preds:
                r, idx = preds[0][0], preds[0][1]
                continue
            ins = r.insns[idx]
            if idx > 0:
                prev = r.insns[idx - 1]
            else:
                pr = self.ix.region_at(ins.address - 1)
                prev = pr.insns[-1] if pr is not None and pr.insns else None
            return prev is not None and prev.end == ins.address and prev.flow is Flow.CALL and \
                not self._falls_through(prev)

    def _same_address(self, tracked: tuple, other: tuple, r: _Region, at: int) -> bool:
        """Does memory operand ``tracked`` (valid at r.insns[at]) name the same address as
        ``other`` there, given the straight-line code before it: its index was set by
        ``lea index, [reg + d]`` and ``reg`` is unchanged since (``[rdx + rsi*4]`` after ``lea rsi,
        [rax + 4]`` is ``[rdx + rax*4 + 16]``: ast2obj_expr)?"""
        base, index, scale, disp, size = tracked
        if index == Register.NONE or other[0] != base or other[2] != scale or other[4] != size:
            return False
        written: list[Insn] = []
        idx = at
        for _ in range(32):
            self._tick()
            preds, entered = self.preds(r, idx)
            if entered or len(preds) != 1 or preds[0][2]:
                return False
            r, idx = preds[0][0], preds[0][1]
            ins = r.insns[idx]
            if _writes(ins, index):
                found = _lea_index(ins, index)
                if found is None:
                    return False
                reg, d = found
                if any(_writes(w, reg) for w in written):
                    return False
                return (other[1] == reg and
                        (disp + d * scale) & 0xFFFFFFFFFFFFFFFF == other[3] & 0xFFFFFFFFFFFFFFFF)
            written.append(ins)
        return False

    def _falls_through(self, ins: Insn) -> bool:
        """May execution continue after ``ins``? Not after a jmp/ret, nor after a direct call
        of a function of this module that never returns (``__assert_fail``, ``abort``...)."""
        if ins.flow in _NO_FALLTHROUGH:
            return False
        if ins.flow is Flow.CALL and ins.target is not None and self.ix.never_returns(ins.target):
            return False
        return True

    # -- values -------------------------------------------------------------------------------

    def value_before(self, reg: int, r: _Region, idx: int, seen: set) -> _Val | None:
        """Value of 64-bit ``reg`` just before r.insns[idx] (None: only through a loop)."""
        while True:
            self._tick()
            key = (r.start, idx, reg)
            if key in seen:
                return None
            seen.add(key)
            preds, entered = self.preds(r, idx)
            if len(preds) == 1 and not entered and not preds[0][2]:
                pr, pj, _ = preds[0]
                ins = pr.insns[pj]
                if _writes(ins, reg):
                    return None if self._dead(pr, pj) else self._def(ins, reg, pr, pj, seen)
                r, idx = pr, pj
                continue
            vals = [self._entry_value(reg, r.insns[idx].address)] if entered else []
            for pr, pj, _ in preds:
                ins = pr.insns[pj]
                if _writes(ins, reg):
                    vals.append(None if self._dead(pr, pj) else self._def(ins, reg, pr, pj, seen))
                else:
                    vals.append(self.value_before(reg, pr, pj, seen))
            return _merge(vals)

    def _def(self, ins: Insn, reg: int, r: _Region, j: int, seen: set) -> _Val:
        instr = ins.instruction
        mn = instr.mnemonic
        if ins.bits == 32:
            known = _def32(self, ins, reg, r, j, seen)
            if known is not None:
                return known
        if ins.flow in (Flow.CALL, Flow.INDIRECT_CALL, Flow.SYSCALL):
            return _PTR  # a call result or clobbered: never used as a computed address
        if instr.op_count < 1 or instr.op0_kind != OpKind.REGISTER or _full(instr.op0_register) != reg:
            return _ARITH  # implicit write (xchg, cmpxchg, mul ...)
        dst = instr.op0_register
        if mn in (Mnemonic.XOR, Mnemonic.SUB) and instr.op1_kind == OpKind.REGISTER \
                and instr.op1_register == dst and _reg_bits(dst) >= 32:
            return _DATA  # zeroed: null
        if mn == Mnemonic.MOV and instr.op1_kind in _IMM_KINDS | {OpKind.IMMEDIATE64} and _reg_bits(dst) >= 32:
            return _Val("const", value=instr.immediate(1) & (0xFFFFFFFF if _reg_bits(dst) == 32 else -1))
        if dst not in self.gprs:
            return _ARITH  # a 32/16/8-bit write: not a 64-bit address
        if mn == Mnemonic.LEA:
            if ins.rip_relative:
                return _Val("const", value=ins.mem_target)
            b, i = instr.memory_base, instr.memory_index
            d = instr.memory_displacement
            if i == Register.NONE and (b == Register.RSP or b == Register.RBP and d >= 2**63):
                return _DATA  # a stack address (below the frame pointer: rbp may be a plain register)
            if b != Register.NONE and i != Register.NONE and instr.memory_index_scale == 1 \
                    and instr.memory_displacement == 0:
                return _Val("add", base=self._v(_full(b), r, j, seen), other=self._v(_full(i), r, j, seen))
            return _ARITH
        if mn == Mnemonic.MOVSXD and instr.op1_kind == OpKind.MEMORY:
            b, i = instr.memory_base, instr.memory_index
            if b not in (Register.NONE, Register.RIP) and i != Register.NONE and instr.memory_index_scale == 4:
                disp = instr.memory_displacement
                if disp >= 2**63:
                    disp -= 2**64
                base = self._v(_full(b), r, j, seen)
                if base.kind == "set":
                    return _set(_Val("tload", base=a, index=_full(i), disp=disp, at=(r.start, j)) for a in base.alts)
                return _Val("tload", base=base, index=_full(i), disp=disp, at=(r.start, j))
            if ins.rip_relative:
                # one entry: movsxd reg, [rip + d] (a table of one case)
                return _Val("tload", base=_Val("const", value=ins.mem_target), index=0, disp=0, at=(r.start, j))
            return _ARITH
        if mn == Mnemonic.MOV:
            if instr.op1_kind == OpKind.MEMORY:
                return _PTR
            if instr.op1_kind == OpKind.REGISTER and instr.op1_register in self.gprs:
                return self._v(_full(instr.op1_register), r, j, seen)
            return _ARITH
        if mn == Mnemonic.ADD and instr.op1_kind == OpKind.REGISTER and instr.op1_register in _GPR64:
            a, b = self._v(reg, r, j, seen), self._v(instr.op1_register, r, j, seen)
            if a.kind == "set" or b.kind == "set":
                aa = a.alts if a.kind == "set" else (a,)
                bb = b.alts if b.kind == "set" else (b,)
                if len(aa) * len(bb) > _MAX_ALTS:
                    return _ARITH
                return _set(_Val("add", base=x, other=y) for x in aa for y in bb)
            return _Val("add", base=a, other=b)
        if mn == Mnemonic.POP:
            return _PTR
        if Mnemonic.CMOVA <= mn <= Mnemonic.CMOVS and instr.op1_kind == OpKind.REGISTER \
                and instr.op1_register in _GPR64:
            # either the value it had or the source's
            return _merge([self._v(reg, r, j, seen), self._v(instr.op1_register, r, j, seen)]) or _LOOP
        if mn in _PTR_OPS and (instr.op1_kind in _IMM_KINDS or instr.op1_kind == OpKind.MEMORY):
            # glibc PTR_DEMANGLE: ror reg, 0x11; xor reg, fs:[0x30] of a mangled stored pointer
            inner = self._v(reg, r, j, seen)
            return _PTR if inner.kind == "ptr" else _ARITH
        return _ARITH

    def _v(self, reg: int, r: _Region, j: int, seen: set) -> _Val:
        v = self.value_before(reg, r, j, set(seen))
        return v if v is not None else _LOOP

    # -- bounds -------------------------------------------------------------------------------

    def bound(self, index: int, r: _Region, idx: int) -> int | None:  # noqa: D417
        """How many table entries the index register may select just before r.insns[idx]: every
        path must pass a guard: ``cmp idx, N`` with ``ja``/``jae`` (or ``jbe``/``jb`` taken) on
        the index, on the register it was copied or zero-extended from, or on the memory it was
        loaded from (``cmpl $5, 0x50(%rdx); ja; mov 0x50(%rdx), %ecx``, with no store or change
        of ``rdx`` between), or an ``and idx, N``. None if some path has none."""
        self.bounding = True
        try:
            out = self._bound(("r", index, 32), r, idx, set(), {})
        finally:
            self.bounding = False
        return out if out is not None and out > 0 else None

    def _bound(self, tracked: tuple, r: _Region, idx: int, seen: set, pending: dict) -> int | None:
        while True:
            self._tick()
            key = (r.start, idx, tracked)
            if key in seen:
                return 0  # a loop back here adds nothing new
            seen.add(key)
            preds, entered = self.preds(r, idx)
            if entered or not preds:
                return None
            results = []
            for pr, pj, via_branch in preds:
                res = self._bound_from(tracked, pr, pj, via_branch, seen, dict(pending))
                if res is None:
                    return None
                results.append(res)
            return max(results)

    def _bound_from(self, tracked: tuple, r: _Region, j: int, via_branch: bool, seen: set,
                    pending: dict) -> int | None:
        """``tracked``: ("r", 64-bit register, low bits that matter) or ("m", base, index, scale,
        displacement, size) of a load. ``pending``: bounds established (later in the code) on
        other 32/64-bit registers that have not been written since: a copy
        ``mov tracked32, reg32`` inherits them."""
        ins = r.insns[j]
        instr = ins.instruction
        mn = instr.mnemonic
        if ins.flow is Flow.COND_JUMP:
            rule = _BOUND_JCC.get(mn)
            edge = "taken" if via_branch else "fall"
            if rule is not None and rule[0] == edge and j > 0:
                cmp = r.insns[j - 1].instruction
                if cmp.mnemonic == Mnemonic.CMP and cmp.op1_kind in _IMM_KINDS:
                    n = cmp.immediate(1)
                    if n < 2**31 and 0 < n + rule[1] <= 4096:
                        if cmp.op0_kind == OpKind.REGISTER:
                            creg = cmp.op0_register
                            bits = _reg_bits(creg)
                            if tracked[0] == "r" and _full(creg) == tracked[1] and bits >= tracked[2] \
                                    and creg not in _HIGH8:
                                return n + rule[1]
                            if bits >= 32:
                                pending[_full(creg)] = n + rule[1]
                        elif cmp.op0_kind == OpKind.MEMORY and tracked[0] == "m" and (
                            _mem_key(cmp) == tracked[1:] or self._same_address(tracked[1:], _mem_key(cmp), r, j - 1)
                        ):
                            return n + rule[1]
            return self._bound(tracked, r, j, seen, pending)
        if tracked[0] == "m":
            _, base, index, _, _, _ = tracked
            if ins.flow in (Flow.CALL, Flow.INDIRECT_CALL, Flow.SYSCALL) or _writes_memory(ins) or \
                    (base != Register.NONE and _writes(ins, base)) or (index != Register.NONE and _writes(ins, index)):
                return None
            return self._bound(tracked, r, j, seen, pending)
        reg, width = tracked[1], tracked[2]
        if mn == Mnemonic.AND and instr.op0_kind == OpKind.REGISTER and _full(instr.op0_register) == reg \
                and _reg_bits(instr.op0_register) >= max(width, 32) and instr.op1_kind in _IMM_KINDS:
            n = instr.immediate(1)
            return n + 1 if 0 <= n < 4096 else None
        if _writes(ins, reg):
            if instr.op_count != 2 or instr.op0_kind != OpKind.REGISTER or _full(instr.op0_register) != reg:
                return None
            dbits = _reg_bits(instr.op0_register)
            if mn == Mnemonic.MOV and dbits == 32 and instr.op1_kind == OpKind.REGISTER \
                    and _reg_bits(instr.op1_register) == 32:
                src = _full(instr.op1_register)
                if src in pending:
                    return pending[src]
                return self._bound(("r", src, 32), r, j, seen, {})  # zero-extending copy
            if mn == Mnemonic.MOVZX and dbits >= 32 and instr.op1_kind == OpKind.REGISTER \
                    and instr.op1_register not in _HIGH8:
                return self._bound(("r", _full(instr.op1_register), _reg_bits(instr.op1_register)), r, j, seen, {})
            if instr.op1_kind == OpKind.MEMORY and instr.memory_base != Register.RIP and (
                (mn == Mnemonic.MOV and dbits == 32) or (mn == Mnemonic.MOVZX and dbits >= 32)
            ):
                return self._bound(("m", *_mem_key(instr)), r, j, seen, {})  # loaded: its guard may be on memory
            return None
        for preg in list(pending):
            if _writes(ins, preg):
                del pending[preg]
        return self._bound(tracked, r, j, seen, pending)


_HIGH8 = frozenset({Register.AH, Register.BH, Register.CH, Register.DH})
#: registers an i386 callee keeps (cdecl), by their 64-bit names as the slicer tracks them
_CALLEE_SAVED32 = frozenset({Register.RBX, Register.RSI, Register.RDI, Register.RBP})


def _def32(slicer: _Slicer, ins: Insn, reg: int, r: _Region, j: int, seen: set) -> _Val | None:
    """What i386 PIC code computes that x86-64 code does not (None: as for x86-64): the PC thunk
    (``call __x86.get_pc_thunk.bx`` sets ebx to the address after the call), a callee-saved
    register kept across any other direct call, ``add reg, imm`` and ``lea reg, [reg + d]`` of
    a known address (the GOT, ``T@GOTOFF``), ``lea reg, [d]``."""
    from .pic32 import pc_thunk_register

    instr = ins.instruction
    mn = instr.mnemonic
    if ins.flow is Flow.CALL and ins.target is not None:
        thunk = pc_thunk_register(slicer.ix, ins.target)
        if thunk is not None and _full(thunk) == reg:
            return _Val("const", value=ins.end)
        if reg in _CALLEE_SAVED32 and thunk is None:
            return slicer._v(reg, r, j, seen)  # kept by the callee
        return None
    if instr.op_count < 2 or instr.op0_kind != OpKind.REGISTER or instr.op0_register not in _GPR32 \
            or _full(instr.op0_register) != reg:
        return None
    if mn == Mnemonic.ADD and instr.op1_kind in _IMM_KINDS:
        inner = slicer._v(reg, r, j, seen)
        return _Val("const", value=(inner.value + instr.immediate(1)) & 0xFFFFFFFF) if inner.kind == "const" else None
    if mn == Mnemonic.LEA and instr.memory_index == Register.NONE:
        d = instr.memory_displacement & 0xFFFFFFFF
        if instr.memory_base == Register.NONE:
            return _Val("const", value=d)
        if instr.memory_base in _GPR32 and instr.memory_base != Register.ESP:
            inner = slicer._v(_full(instr.memory_base), r, j, seen)
            return _Val("const", value=(inner.value + d) & 0xFFFFFFFF) if inner.kind == "const" else None
    return None


def _lea_index(ins: Insn, index: int) -> tuple[int, int] | None:
    """(register, displacement) if ``ins`` is ``lea index, [register + displacement]``."""
    instr = ins.instruction
    if instr.mnemonic != Mnemonic.LEA or instr.op0_register != index or instr.memory_index != Register.NONE:
        return None
    b = instr.memory_base
    if b not in _GPR64 or b == Register.RSP:
        return None
    d = instr.memory_displacement
    return b, d - 2**64 if d >= 2**63 else d


def _mem_key(instr) -> tuple:
    """(base, index, scale, displacement, size) of an instruction's memory operand."""
    return (instr.memory_base, instr.memory_index, instr.memory_index_scale, instr.memory_displacement,
            instr.memory_size)


def _writes_memory(insn: Insn) -> bool:
    info = _info_factory().info(insn.instruction)
    return any(m.access in _WRITE_ACCESS for m in info.used_memory())


def _merge(vals: list[_Val | None]) -> _Val | None:
    """The value at a join: the same on every path, or one of several (a ``set``). A ``data``
    value (null, a stack address) is dropped when another path brings something else: no
    compiler bases a jump into code on it, so that path does not reach the jump."""
    vs = [v for v in vals if v is not None and v.kind != "loop"]
    if not vs:
        return None
    if any(v.kind != "data" for v in vs):
        vs = [v for v in vs if v.kind != "data"]
    first = vs[0]
    if all(v == first for v in vs):
        return first
    if all(v.kind == "ptr" for v in vs):
        return _PTR
    return _set(vs)


def _set(vals) -> _Val:
    """One of ``vals`` (flattened; ``arith`` if any is, or if there are too many)."""
    alts: set[_Val] = set()
    for v in vals:
        for a in v.alts if v.kind == "set" else (v,):
            if a.kind == "arith":
                return _ARITH
            alts.add(a)
    if len(alts) > _MAX_ALTS:
        return _ARITH
    if len(alts) == 1:
        return next(iter(alts))
    return _Val("set", alts=frozenset(alts))


def _reg_bits(reg: int) -> int:
    try:
        return RegisterExt.size(reg) * 8
    except Exception:  # noqa: BLE001
        return 0
