"""Exit analysis: every way a function returns, and the jump-probe window that ends at each.

A return probe (DTrace's pid ``return``) fires at the function's exits, never touching a return
address: each ``ret``/``ret imm16`` and each tail call (a direct ``jmp`` out of the function, an
indirect ``jmp`` that is not a jump table). The function is decoded with its out-of-line parts
(``f.cold`` symbols, and in stripped files the unnamed code that only ``f`` jumps to).

For each exit the displaced *window* is the fewest whole instructions that end with the exit and
cover at least 5 bytes (or the exit and the alignment padding after it, when it is the last
instruction). The window may begin at a branch target but never contain one strictly inside,
and follows every rule of :meth:`FunctionAnalysis.analyse` (relocatable, no call except last, no
landing pad or symbol inside, bytes equal to the file). The probe's action runs in the stub right
before the relocated exit instruction, so ``rax`` is the return value and ``rsp`` points at the
return address, as at the entry.

The return side of a function is accepted only if every exit takes a jump (a probe that misses
some returns would be wrong, not partial); otherwise it is refused with the reason naming the
first exit that cannot, or the reason the exits cannot be known (a conditional tail call, code
that falls through the end of the function, another function jumping into its middle).
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from iced_x86 import Mnemonic, Register

from ..errors import InvalidSiteError
from ..x86 import Flow, Insn, relocation_problem
from .function import FunctionAnalysis
from .index import ModuleIndex, _Entry, module_index
from .result import JUMP_SIZE, SiteAnalysis, Verdict
from .slices import _NO_FALLTHROUGH, _writes

if TYPE_CHECKING:
    from ..symbols import Module, ResolvedSite, Symbol, Symbols

__all__ = ["ExitKind", "Exit", "ExitAnalysis", "RETURN_SUFFIX", "analyse_exits", "function_exits", "split_return_spec"]

#: The suffix of a return-probe site spec, as ``perf probe`` writes it: ``libc:malloc%return``.
RETURN_SUFFIX = "%return"


def split_return_spec(spec: str) -> tuple[str, bool]:
    """``("libc:malloc", True)`` for ``"libc:malloc%return"``; ``(spec, False)`` otherwise.

    Raises InvalidSiteError for another ``%`` suffix (``%entry`` is accepted and means the entry).
    """
    text = spec.strip()
    if "%" not in text:
        return text, False
    base, _, suffix = text.rpartition("%")
    if suffix == "return":
        return base, True
    if suffix == "entry":
        return base, False
    raise InvalidSiteError(f"site {spec!r}: unknown suffix '%{suffix}' (only %return and %entry exist)")


class ExitKind(enum.Enum):
    """How control leaves a function at an exit."""

    RETURN = "return"  # ret / ret imm16
    TAIL_CALL = "tail_call"  # direct jmp to another function
    INDIRECT_TAIL_CALL = "indirect_tail_call"  # jmp reg / jmp [mem] that is not a jump table


@dataclass(frozen=True)
class Exit:
    """One exit of a function: the instruction, its kind, and the window (verdict) ending at it.

    When the exit's block begins at a branch target too close to it, ``window`` is refused and
    ``paths`` holds one *path window* per way into that block (each branch to it, and the
    instruction falling into it): together they catch every return through this exit.
    """

    insn: Insn
    kind: ExitKind
    window: SiteAnalysis
    paths: tuple[SiteAnalysis, ...] = ()

    @property
    def ok(self) -> bool:
        return self.window.ok or (bool(self.paths) and all(p.ok for p in self.paths))

    @property
    def windows(self) -> tuple[SiteAnalysis, ...]:
        """The windows that catch this exit: its own, or its path windows."""
        return (self.window,) if self.window.ok or not self.paths else self.paths

    def to_json(self) -> dict:
        out = self.window.to_json()
        out["exit_kind"] = self.kind.value
        out["exit_address"] = f"{self.insn.address:#x}"
        out["exit_text"] = self.insn.text
        if self.paths:
            out["paths"] = [p.to_json() for p in self.paths]
        return out


@dataclass(frozen=True)
class ExitAnalysis:
    """The return side of one function: every exit and its window, and the overall verdict.

    ``verdict`` is JUMP only if every exit's window is; ``reason`` says which exit (address,
    instruction) cannot take a jump, or why the exits cannot be known.
    """

    site: str  # "module:function%return"
    address: int  # the function's address
    function: "Symbol | None"
    module: "Module | None"
    exits: tuple[Exit, ...]
    verdict: Verdict
    reason: str

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.JUMP

    @property
    def windows(self) -> list[SiteAnalysis]:
        """The windows of every exit (all JUMP when ``ok``), path windows included."""
        return [w for e in self.exits for w in e.windows]

    def error(self) -> InvalidSiteError:
        """The exception for a refusal (InvalidSiteError, EINVAL, with the reason)."""
        return InvalidSiteError(f"{self.site}: {self.reason}", address=self.address, reason=self.reason)

    def to_json(self) -> dict:
        func = self.function
        return {
            "site": self.site,
            "address": f"{self.address:#x}",
            "verdict": self.verdict.value,
            "reason": self.reason,
            "module": self.module.path if self.module is not None else None,
            "function": func.name if func is not None else None,
            "exits": [e.to_json() for e in self.exits],
        }


class _Parts:
    """The function and its out-of-line parts, each as a FunctionAnalysis over [start, end)."""

    def __init__(self, module: "Module", function: "Symbol", reader, index: ModuleIndex) -> None:
        self.module = module
        self.index = index
        self.reader = reader
        self.analyses: list[FunctionAnalysis] = [FunctionAnalysis(module, function, reader, index=index)]
        for cold in module.cold_parts(function):
            if cold.address != function.address:
                self.analyses.append(FunctionAnalysis(module, cold, reader, index=index))

    def spans(self) -> list[tuple[int, int]]:
        return [(fa.start, fa.end) for fa in self.analyses]

    def holds(self, address: int) -> bool:
        return any(lo <= address < hi for lo, hi in self.spans())

    def add_unnamed(self, target: int, function: "Symbol") -> bool:
        """Take the unnamed code region at ``target`` (no symbol covers it) as a part if every
        way into it comes from the parts we have (a ``.cold`` part of a stripped file): its exits
        are then exits of this function. False if it is entered from elsewhere."""
        reg = self.index.region_at(target)
        if reg is None or self.module.function_at(target) is not None:
            return False
        lo, hi = reg.start, reg.end
        sources = _region_sources(self.index, lo, hi)
        if sources is None:
            return False  # a symbol, a code pointer or a call goes there: another function
        if not all(self.holds(src) or lo <= src < hi for src in sources):
            return False  # code elsewhere jumps there too
        from ..symbols import Symbol, SymbolKind

        sym = Symbol(name=f"{function.name}.cold@{lo:#x}", address=lo, size=hi - lo, kind=SymbolKind.FUNC,
                     module=self.module, binding="LOCAL")
        self.analyses.append(FunctionAnalysis(self.module, sym, self.reader, index=self.index))
        return True

    def locate(self, address: int) -> tuple[FunctionAnalysis, int] | None:
        """The part and index of the instruction starting at ``address``."""
        for fa in self.analyses:
            if fa.start <= address < fa.end:
                k = fa._pos.get(address)
                return (fa, k) if k is not None else None
        return None



def _walk(fa: FunctionAnalysis, j: int) -> tuple[int, str]:
    """Index of the first instruction of the fewest whole instructions ending with ``fa.insns[j]``
    that cover 5 bytes, and "" ; or where the walk back had to stop (and why) before that."""
    insns = fa.insns
    fa._entries_inside()
    entries = set(fa._entry_tgts)
    k = j
    while insns[j].end - insns[k].address < JUMP_SIZE:
        if k == 0:
            return k, f"the start of {fa.function.name}"
        if insns[k].address in entries:
            return k, f"a branch target at {insns[k].address:#x}"
        prev = insns[k - 1]
        if prev.end != insns[k].address or prev.flow in _NO_FALLTHROUGH:
            return k, f"'{prev.text}' at {prev.address:#x}, after which nothing falls through"
        k -= 1
    return k, ""


_SOURCES: "weakref.WeakKeyDictionary[ModuleIndex, dict[int, list[int] | None]]" = weakref.WeakKeyDictionary()


def _region_sources(idx: ModuleIndex, lo: int, hi: int) -> list[int] | None:
    """Where the jumps into the unnamed region [lo, hi) come from; None if it is also entered as a
    function (a symbol, a code pointer, a call) and so is nobody's cold part. Cached per module."""
    per = _SOURCES.setdefault(idx, {})
    if lo in per:
        return per[lo]
    out: list[int] | None = []
    for _tgt, kind, src in idx.entries_between(lo - 1, hi):
        if kind == _Entry.LANDING:
            continue  # entered by the unwinder, within a call of the function it belongs to
        if kind in (_Entry.TABLE, _Entry.LEA) or (kind == _Entry.BRANCH and _is_jump(idx, src)):
            out.append(src)  # type: ignore[union-attr]
            continue
        out = None
        break
    per[lo] = out
    return out


def _is_jump(idx: ModuleIndex, src: int) -> bool:
    r = idx.region_at(src)
    ins = r.insn_containing(src) if r is not None else None
    return ins is not None and ins.flow in (Flow.JUMP, Flow.COND_JUMP)


def _window(fa: FunctionAnalysis, j: int, site: str,
            parts: "_Parts | None" = None) -> SiteAnalysis | tuple[SiteAnalysis, list[SiteAnalysis]]:
    """The window of the exit ``fa.insns[j]``: whole instructions ending with it, >= 5 bytes; or
    (its refused window, the path windows that replace it)."""
    insns = fa.insns
    exit_ins = insns[j]
    if j == len(insns) - 1 and exit_ins.flow is not Flow.INDIRECT_JUMP:
        # the last exit and the alignment padding after it: the window touches nothing else
        # (no branch target, and no overlap with the entry window of a short function)
        res = fa.analyse(exit_ins.address, site=site)
        if res.ok and res.displaced == (exit_ins,) and res.padding:
            return replace(res, exit=exit_ins)
    k, why = _walk(fa, j)
    start = insns[k].address
    if why:
        if j == len(insns) - 1:
            res = fa.analyse(start, site=site)  # the exit and the alignment padding after it
            if res.ok and res.displaced and res.displaced[-1] is exit_ins:
                return replace(res, exit=exit_ins)
        reason = (f"only {exit_ins.end - start} byte(s) from {why} to the end of '{exit_ins.text}' at "
                  f"{exit_ins.address:#x}; a jump needs {JUMP_SIZE}")
        refused = SiteAnalysis(site=site, address=start, size=0, verdict=Verdict.REFUSED, reason=reason,
                               displaced=tuple(insns[k:j + 1]), function=fa.function, module=fa.module,
                               exit=exit_ins)
        if parts is not None and why.startswith("a branch target"):
            paths, problem = _paths(parts, fa, k, j, site)
            if problem is None:
                return refused, paths
            refused = replace(refused, reason=f"{reason}, and {problem}")
        return refused
    res = fa.analyse(start, exit_ins.end - start, site=site)
    if res.ok and exit_ins.flow is Flow.INDIRECT_JUMP and _reads_stack(exit_ins):
        return replace(res, verdict=Verdict.REFUSED, exit=exit_ins,
                       reason=f"'{exit_ins.text}' at {exit_ins.address:#x} reads its target through rsp; "
                              "the probe's action uses the stack below rsp")
    return replace(res, exit=exit_ins)


def _conditional_tail_call(fa: FunctionAnalysis, j: int, site: str) -> Exit | str:
    """The exit of a conditional tail call (``jcc other_function``): a path window ending with the
    jcc, whose taken branch goes through the stub (the action, then ``jmp other_function``) and
    whose fall-through goes back. The exit instruction is that ``jmp``, made up at the target's
    address (so it is the "block" the jcc branches to). A reason string if it cannot be caught."""
    ins = fa.insns[j]
    tail = _made_up_jump(ins.target)
    s, why = _walk(fa, j)
    if why:
        return (f"'{ins.text}' at {ins.address:#x} is a conditional tail call with only "
                f"{ins.end - fa.insns[s].address} byte(s) after {why}; a jump needs {JUMP_SIZE}")
    res = fa.analyse(fa.insns[s].address, ins.end - fa.insns[s].address, site=site)
    if res.ok and relocation_problem(tail) is not None:
        res = replace(res, verdict=Verdict.REFUSED, reason=relocation_problem(tail))
    window = replace(res, exit=tail, exit_path=(tail,), exit_via=ins.target)
    if not res.ok:
        return (f"exit '{ins.text}' at {ins.address:#x} (a conditional tail call) cannot take a jump: "
                f"{res.reason}")
    return Exit(ins, ExitKind.TAIL_CALL, window)


def _made_up_jump(target: int) -> Insn:
    """``jmp target`` decoded just before ``target`` (``e9 00000000``): the exit a conditional
    tail call takes; only ever relocated (its own address is never patched)."""
    from ..x86 import decode_one

    return decode_one(b"\xe9\0\0\0\0", target - 5)


_NOT_IN_BLOCK = frozenset({Flow.CALL, Flow.INDIRECT_CALL, Flow.SYSCALL, Flow.RETURN, Flow.JUMP,
                           Flow.INDIRECT_JUMP, Flow.INTERRUPT, Flow.INVALID})


_MAX_CHAIN = 2  # how many blocks a path may copy: the exit's, and one leading into it


def _paths(parts: "_Parts", fa: FunctionAnalysis, k: int, j: int, site: str) -> tuple[list[SiteAnalysis], str | None]:
    """Path windows for the exit ``fa.insns[j]`` whose block begins at the branch target
    ``fa.insns[k]``: one window ending with each way into the block. ([], why not) if some way in
    cannot take one."""
    block = tuple(fa.insns[k:j + 1])
    problem = _copyable(block[:-1], block)
    if problem is not None:
        return [], problem
    return _ways_in(parts, fa, k, block, site, 1)


def _copyable(insns: Sequence[Insn], block: Sequence[Insn]) -> str | None:
    """Why ``insns`` (part of the copied ``block``) cannot run from a stub, or None."""
    lo, hi = block[0].address, block[-1].end
    for ins in insns:
        if ins.flow in _NOT_IN_BLOCK or relocation_problem(ins) is not None:
            return f"'{ins.text}' at {ins.address:#x} between {lo:#x} and the exit cannot be copied"
        if ins.flow is Flow.COND_JUMP and any(b.address == ins.target for b in block):
            return f"'{ins.text}' at {ins.address:#x} loops back into the block at {lo:#x}"
    del hi
    return None


def _dead_padding(fa: FunctionAnalysis, i: int) -> bool:
    """Is ``fa.insns[i]`` alignment padding that nothing reaches: nops back to an instruction
    that does not fall through, none of them a branch target?"""
    fa._entries_inside()
    entries = set(fa._entry_tgts)
    insns = fa.insns
    while i >= 0 and insns[i].instruction.mnemonic == Mnemonic.NOP:
        if insns[i].address in entries or i == 0 or insns[i - 1].end != insns[i].address:
            return False
        i -= 1
        if insns[i].flow in _NO_FALLTHROUGH:
            return True
    return False


def _ways_in(parts: "_Parts", fa: FunctionAnalysis, k: int, block: tuple[Insn, ...], site: str,
             depth: int) -> tuple[list[SiteAnalysis], str | None]:
    """Windows ending with each way into ``block`` (copied from ``fa.insns[k]`` on, ending with the
    exit): each jump to it, and the instruction falling into it. A way in whose own window would
    start too close after another branch target is followed back once more, its block (ending
    with a ``jmp`` to ``block`` or falling into it) copied too."""
    insns = fa.insns
    target = insns[k].address
    exit_ins = block[-1]
    preds: list[tuple[FunctionAnalysis, int]] = []
    idx = fa.index
    for tgt, kind, src in idx.entries_between(target - 1, target + 1):
        if tgt != target:
            continue
        if kind != _Entry.BRANCH:
            return [], f"{target:#x} is also entered by {kind} ({idx.describe_entry((tgt, kind, src))})"
        where = parts.locate(src)
        if where is None or where[0].insns[where[1]].flow not in (Flow.JUMP, Flow.COND_JUMP):
            return [], f"{target:#x} is entered from {src:#x} ({fa.module.describe(src)}), not by a jump of this function"
        if any(b.address <= src < b.end for b in block):
            return [], f"the jump at {src:#x} into the block at {target:#x} is inside it"
        preds.append(where)
    if k > 0 and insns[k - 1].end == target and insns[k - 1].flow not in _NO_FALLTHROUGH \
            and not _dead_padding(fa, k - 1):
        prev = insns[k - 1]
        if prev.flow in (Flow.CALL, Flow.INDIRECT_CALL):
            return [], f"'{prev.text}' at {prev.address:#x} returns to {target:#x}, outside any window"
        if not any(pfa is fa and p == k - 1 for pfa, p in preds):
            preds.append((fa, k - 1))
    out: list[SiteAnalysis] = []
    fallthrough = [(pfa, p) for pfa, p in preds if pfa is fa and p == k - 1]
    for pfa, p in fallthrough + [x for x in preds if x not in fallthrough]:
        pins = pfa.insns[p]
        if any(w.address <= pins.address < w.address + w.size for w in out):
            continue  # inside a path window already: its branch to the block is redirected there
        s, why = _walk(pfa, p)
        if why:
            chained = None
            if depth < _MAX_CHAIN and why.startswith("a branch target") and (
                    pins.flow is Flow.JUMP or (pins.flow is Flow.NEXT and pins.end == target)):
                segment = tuple(pfa.insns[s:p + 1])
                longer = segment + block
                problem = _copyable(segment[:-1], longer) or (
                    relocation_problem(pins) if pins.flow is Flow.NEXT else None)
                if problem is None:
                    chained = _ways_in(parts, pfa, s, longer, site, depth + 1)
                    if chained[1] is None:
                        out.extend(chained[0])
                        continue
            detail = f": {chained[1]}" if chained is not None else ""
            return [], (f"the way in by '{pins.text}' at {pins.address:#x} has only {pins.end - pfa.insns[s].address} "
                        f"byte(s) after {why}{detail}")
        res = pfa.analyse(pfa.insns[s].address, pins.end - pfa.insns[s].address, site=site)
        if not res.ok:
            return [], f"the way in by '{pins.text}' at {pins.address:#x} cannot take a jump: {res.reason}"
        out.append(replace(res, exit=exit_ins, exit_path=block, exit_via=target))
    if not out:
        return [], f"no way into {target:#x} was found"
    return out, None


def _reads_stack(insn: Insn) -> bool:
    from iced_x86 import OpKind, Register

    instr = insn.instruction
    return any(instr.op_kind(i) == OpKind.MEMORY for i in range(instr.op_count)) and Register.RSP in (
        instr.memory_base, instr.memory_index)


def function_exits(module: "Module", function: "Symbol", memory=None, *, index: ModuleIndex | None = None,
                   site: str | None = None) -> ExitAnalysis:
    """The :class:`ExitAnalysis` of ``function`` in ``module`` (live bytes checked through
    ``memory``, a ProcessMemory, if given). Never raises for an unsuitable function: it is refused
    with the reason."""
    reader = memory.read if memory is not None else None
    idx = index or module_index(module)
    site = site or f"{module.name}:{function.name}{RETURN_SUFFIX}"

    def result(exits: list[Exit], reason: str | None) -> ExitAnalysis:
        if reason is None:
            bad = next((e for e in exits if not e.ok), None)
            if bad is not None:
                reason = (f"exit '{bad.insn.text}' at {bad.insn.address:#x} ({module.describe(bad.insn.address)}) "
                          f"cannot take a jump: {bad.window.reason}")
        if reason is not None:
            return ExitAnalysis(site, function.address, function, module, tuple(exits), Verdict.REFUSED, reason)
        n = len(exits)
        why = f"jump at each of {n} exit(s)" if n else f"{function.name} has no exit: it never returns (no window)"
        npaths = sum(len(e.paths) for e in exits if not e.window.ok)
        if npaths:
            why += f" ({npaths} path window(s) into exits at branch targets)"
        return ExitAnalysis(site, function.address, function, module, tuple(exits), Verdict.JUMP, why)

    parts = _Parts(module, function, reader, idx)
    main = parts.analyses[0]
    if main.problem is not None:
        return result([], main.problem)
    exits: list[Exit] = []
    done = 0
    while done < len(parts.analyses):
        fa = parts.analyses[done]
        done += 1
        if fa.problem is not None:
            return result(exits, f"part {fa.function.name}: {fa.problem}")
        for j, ins in enumerate(fa.insns):
            flow = ins.flow
            kind: ExitKind | None = None
            if flow is Flow.RETURN:
                if ins.instruction.mnemonic != Mnemonic.RET:
                    return result(exits, f"'{ins.text}' at {ins.address:#x} is a far or interrupt return")
                kind = ExitKind.RETURN
            elif flow in (Flow.JUMP, Flow.COND_JUMP):
                t = ins.target
                if t is None or (parts.holds(t) and t != function.address):
                    continue  # inside the function (a jump to its own start is a new call: an exit)
                if parts.add_unnamed(t, function):
                    continue
                if flow is Flow.COND_JUMP:
                    ex = _conditional_tail_call(fa, j, site)
                    if isinstance(ex, str):
                        return result(exits, ex)
                    exits.append(ex)
                    continue
                kind = ExitKind.TAIL_CALL
            elif flow is Flow.INDIRECT_JUMP:
                known = idx.jump_targets(ins.address)
                if known is not None:
                    targets, pointer_too = known
                    inside = [parts.holds(t) and t != function.address for t in targets]
                    if all(inside) and not pointer_too:
                        continue  # a jump table: stays in the function
                    if any(inside):
                        return result(exits, f"'{ins.text}' at {ins.address:#x} may both stay in {function.name} "
                                             "(jump table) and leave it (tail call): a window there would count "
                                             "both")
                kind = ExitKind.INDIRECT_TAIL_CALL
            elif j == len(fa.insns) - 1 and flow in (Flow.NEXT, Flow.COND_JUMP, Flow.SYSCALL) and ins.end >= fa.end:
                return result(exits, f"'{ins.text}' at {ins.address:#x} falls through the end of "
                                     f"{fa.function.name} into {module.describe(fa.end)}")
            if kind is not None:
                w = _window(fa, j, site, parts)
                exits.append(Exit(ins, kind, w[0], tuple(w[1])) if isinstance(w, tuple) else Exit(ins, kind, w))
    # ways into the middle of the function from other code: their returns would count as ours
    main._entries_inside()
    for tgt, kind, src in main._entries or []:
        if tgt >= main.end:
            continue
        if kind == _Entry.SYMBOL and tgt != function.address:
            other = module.function_at(tgt)
            if other is not None and other.address == tgt and other.address != function.address:
                return result(exits, f"another function, {other.name}, starts inside {function.name} at {tgt:#x}: "
                                     "its returns would be counted as returns of this one")
        if kind in (_Entry.BRANCH, _Entry.TABLE) and not parts.holds(src):
            return result(exits, f"code at {src:#x} ({module.describe(src)}) jumps into {function.name} at {tgt:#x}: "
                                 "its returns would be counted as returns of this one")
    exits = _early_tail_calls(main, exits, site)
    if all(e.ok for e in exits):
        spans = sorted((w.address, w.address + w.size, e.insn.address) for e in exits for w in e.windows)
        for (a0, a1, e0), (b0, _b1, e1) in zip(spans, spans[1:]):
            if b0 < a1:
                return result(exits, f"the windows of the exits at {e0:#x} and {e1:#x} overlap at {b0:#x}")
    return result(exits, None)


def _early_tail_calls(main: FunctionAnalysis, exits: list[Exit], site: str) -> list[Exit]:
    """A tail call that the function's entry window ends with, reached by straight-line code that
    leaves rsp alone (``xor esi,esi; jmp f``), takes the entry window itself, acting at its first
    byte: its own window would overlap the entry window, and an entry probe could not go in."""
    # from the file: in a live process our own entry probe may already be there (they share it)
    entry = FunctionAnalysis(main.module, main.function, None, index=main.index).analyse(main.start)
    if not entry.ok or not entry.displaced:
        return exits
    last = entry.displaced[-1]
    lo, hi = entry.address, entry.address + entry.size
    out = []
    for e in exits:
        w = e.window
        if (e.insn == last and e.kind is not ExitKind.RETURN and (w.ok or w.busy) and not w.exit_path
                and w.address < hi and lo < w.address + w.size and w.address != lo
                and all(i.flow is Flow.NEXT and not _writes(i, Register.RSP) for i in entry.displaced[:-1])):
            e = Exit(e.insn, e.kind, replace(entry, site=site, exit=e.insn, exit_early=True), e.paths)
        out.append(e)
    return out


def analyse_exits(symbols: "Symbols", site: "ResolvedSite | int", memory=None) -> ExitAnalysis:
    """The :class:`ExitAnalysis` of the function at a resolved site (its start) or address.

    ``memory`` (ProcessMemory) enables the "already patched" check; for live ``symbols`` their own
    memory is used. Never raises for an unsuitable function: it is refused with the reason.
    """
    if isinstance(site, int):
        address = site
        module = symbols.module_at(address)
        function = module.function_at(address) if module is not None else None
        name = f"{symbols.describe(address) if module is not None else hex(address)}{RETURN_SUFFIX}"
    else:
        address, module, function = site.address, site.module, site.function
        name = f"{site.name}{RETURN_SUFFIX}"
    if memory is None and getattr(symbols, "live", False):
        memory = getattr(symbols, "_memory", None)
        if memory is None and hasattr(symbols, "_mem"):
            try:
                memory = symbols._mem()
            except Exception:  # noqa: BLE001 - no live check then, as analyse_site does
                memory = None
    if module is None or function is None:
        return ExitAnalysis(name, address, function, module, (), Verdict.REFUSED,
                            f"no function symbol covers {address:#x}; its exits cannot be found")
    if address != function.address:
        return ExitAnalysis(name, address, function, module, (), Verdict.REFUSED,
                            f"{address:#x} is not the start of {function.name} ({function.address:#x}): "
                            "a return probe is placed on a function")
    return function_exits(module, function, memory, site=name)
