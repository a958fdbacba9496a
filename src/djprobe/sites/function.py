"""Function analysis: one function decoded once, the verdict for any site in it; the entry points
:func:`analyse_site` and :func:`analyse_function`."""

from __future__ import annotations

import bisect
import weakref
from typing import TYPE_CHECKING, Sequence

from iced_x86 import Mnemonic

from ..x86 import Flow, Insn, flags_dead_after, flags_effect, relocation_problem
from ..x86.filler import is_filler
from .index import _INDEX_LOCK, ModuleIndex, module_index
from .result import JUMP_SIZE, ByteReader, SiteAnalysis, Verdict
from .slices import _NO_FALLTHROUGH

if TYPE_CHECKING:
    from ..symbols import Module, ResolvedSite, Symbol, Symbols


_SWITCHING = frozenset({Flow.CALL, Flow.INDIRECT_CALL, Flow.SYSCALL})


class FunctionAnalysis:
    """One function decoded once; answers any number of sites in it.

    ``code_reader`` reads the live bytes (``ProcessMemory.read``) to detect sites patched by
    someone else; without it (a file) that check is skipped. The code itself is always decoded
    from the file, so a jump already placed elsewhere in the function cannot desynchronise it.
    """

    def __init__(
        self,
        module: "Module",
        function: "Symbol",
        code_reader: ByteReader | None = None,
        *,
        index: ModuleIndex | None = None,
    ) -> None:
        self.module = module
        self.function = function
        self.code_reader = code_reader
        self.index = index or module_index(module)
        self.start = function.address
        self.end = function.address + function.size
        idx = self.index
        self.problem: str | None = None
        self.insns: list[Insn] = []
        if function.size <= 0:
            self.problem = f"{function.name} has no size in its symbol table; its bounds are unknown"
        elif not idx.in_code(self.start) or not idx.in_code(self.end - 1):
            self.problem = f"{function.name} at {self.start:#x} is not in an executable section of {module.name}"
        else:
            a = self.start
            while a < self.end:
                reg = idx.region_at(a)
                if reg is None:
                    self.problem = f"{a:#x} in {function.name} is not in code"
                    break
                if reg.bad is not None and reg.bad.address < self.end:
                    self.problem = (
                        f"{function.name} does not decode cleanly (bytes at {reg.bad.address:#x}: "
                        f"{reg.bad.raw.hex(' ')}); cannot check branch targets"
                    )
                for ins in reg.insns:
                    if a <= ins.address < self.end:
                        self.insns.append(ins)
                a = reg.end
        self.addrs = [i.address for i in self.insns]
        self._pos = {x: k for k, x in enumerate(self.addrs)}
        self._entries: list[tuple[int, str, int]] | None = None
        self._entry_tgts: list[int] = []
        self._reloc: dict[int, str | None] = {}
        self._taint: int | None | bool = False

    # -- cached facts -----------------------------------------------------------------------

    def _entries_inside(self) -> None:
        if self._entries is None:
            ents = self.index.entries_between(self.start, self.end + 1)
            self._entries = ents
            self._entry_tgts = [e[0] for e in ents]

    def _reloc_problem(self, k: int) -> str | None:
        if k not in self._reloc:
            self._reloc[k] = relocation_problem(self.insns[k])
        return self._reloc[k]

    def _tainted_by(self, address: int) -> int | None:
        reg = self.index.region_at(address)
        return self.index.tainted(reg) if reg is not None else None

    def boundaries(self) -> list[int]:
        """Every instruction start of the function."""
        return list(self.addrs)

    # -- the verdict ------------------------------------------------------------------------

    def analyse(self, address: int, size: int | None = None, *, site: str | None = None) -> SiteAnalysis:
        """The verdict for a probe at ``address`` displacing ``size`` bytes (None: the fewest
        whole instructions covering 5 bytes). Never raises for a bad site: it is refused."""
        func = self.function
        site = site or self.module.describe(address)
        at_entry = address == self.start
        base = dict(site=site, address=address, function=func, at_entry=at_entry, module=self.module)

        def refuse(reason: str, size_: int = 0, displaced: Sequence[Insn] = (), busy: bool = False) -> SiteAnalysis:
            return SiteAnalysis(size=size_, verdict=Verdict.REFUSED, reason=reason, busy=busy,
                                displaced=tuple(displaced), **base)

        if not self.start <= address < self.end:
            return refuse(f"{address:#x} is outside {func.name} [{self.start:#x}, {self.end:#x})")
        if self.problem is not None:
            return refuse(self.problem)
        k = self._pos.get(address)
        if k is None:
            i = bisect.bisect_right(self.addrs, address) - 1
            ins = self.insns[i] if i >= 0 else None
            inside = f" (inside '{ins.text}' at {ins.address:#x})" if ins is not None else ""
            return refuse(f"{address:#x} is not an instruction boundary{inside}")

        # choose the displaced instructions
        insns = self.insns
        j = k
        if size is None:
            while j < len(insns) and insns[j].end - address < JUMP_SIZE and insns[j].end <= self.end:
                if j + 1 < len(insns) and insns[j + 1].address != insns[j].end:
                    break
                j += 1
            if j >= len(insns) or insns[j].end - address < JUMP_SIZE:
                jl = min(j, len(insns) - 1)
                pad = self._padding(insns[jl], address + JUMP_SIZE)
                if pad is not None:
                    return self._finish(address, k, jl, pad, base)
                last_end = insns[jl].end
                return refuse(
                    f"only {min(last_end, self.end) - address} byte(s) of whole instructions before the end of "
                    f"{func.name} at {self.end:#x}; a jump needs {JUMP_SIZE}",
                    0, insns[k:j + 1],
                )
        else:
            if size < JUMP_SIZE:
                return refuse(f"size {size} is less than the {JUMP_SIZE} bytes of a jmp rel32")
            end = address + size
            while j < len(insns) and insns[j].end < end:
                j += 1
            if j >= len(insns) or insns[j].end != end:
                ins = insns[j] if j < len(insns) else None
                if ins is not None and ins.address < end < ins.end:
                    return refuse(f"size {size} ends inside '{ins.text}' at {ins.address:#x}; "
                                  f"whole instructions are needed", size, insns[k:j + 1])
                return refuse(f"the {size} displaced bytes cross the end of {func.name} at {self.end:#x}",
                              size, insns[k:j + 1])
        return self._finish(address, k, j, (), base)

    def _padding(self, last: Insn, need_end: int) -> tuple[Insn, ...] | None:
        """Alignment padding after the function that a jump may overwrite: the function's last
        instruction does not fall through, and every byte up to ``need_end`` is filler (nop, int3,
        i386 gas's no-op lea/mov: ``x86/filler.py``) that no symbol, FDE or known entry covers.
        None if not so."""
        if last.end != self.end or last.flow not in (Flow.JUMP, Flow.INDIRECT_JUMP, Flow.RETURN):
            return None
        reg = self.index.region_at(self.end)
        if reg is None:
            return None
        out = []
        k = reg.index(self.end)
        while k is not None and k < len(reg.insns) and (not out or out[-1].end < need_end):
            ins = reg.insns[k]
            if not is_filler(ins) or ins.end > reg.end:
                return None
            out.append(ins)
            k += 1
        if not out or out[-1].end < need_end:
            return None
        lo, hi = self.end, out[-1].end
        if self.module.function_at(lo) is not None or self.module.function_at(hi - 1) is not None:
            return None
        f = self.index.facts
        if f is not None and any(a < hi - self.index.bias and lo - self.index.bias < b for a, b in f.fdes):
            return None
        if self.index.entries_between(lo - 1, hi):
            return None
        return tuple(out)

    def _finish(self, address: int, k: int, j: int, padding: tuple[Insn, ...], base: dict) -> SiteAnalysis:
        insns = self.insns
        func = self.function
        n = (padding[-1].end if padding else insns[j].end) - address

        def refuse(reason: str, size_: int = 0, displaced: Sequence[Insn] = (), busy: bool = False) -> SiteAnalysis:
            return SiteAnalysis(size=size_, verdict=Verdict.REFUSED, reason=reason, busy=busy,
                                displaced=tuple(displaced), padding=padding, **base)

        displaced = insns[k : j + 1]
        end = address + n
        fend = insns[j].end  # the displaced instructions end here; padding may follow
        if fend > self.end:
            return refuse(f"the displaced bytes [{address:#x}, {end:#x}) cross the end of {func.name} at "
                          f"{self.end:#x}", n, displaced)

        # someone else's patch (live process)
        if self.code_reader is not None:
            try:
                live = self.code_reader(address, n)
            except Exception as exc:  # noqa: BLE001
                return refuse(f"cannot read the live bytes at {address:#x}: {exc}", n, displaced)
            orig = b"".join(i.raw for i in displaced) + b"".join(i.raw for i in padding)
            if live != orig:
                for off, (lb, ob) in enumerate(zip(live, orig)):
                    if lb != ob and lb in (0xCC, 0xE9):
                        what = "an int3 (breakpoint: a debugger or uprobe)" if lb == 0xCC else "a jmp rel32"
                        return refuse(f"already patched: {what} at {address + off:#x} that is not in the file; "
                                      f"remove the other tool's probe first", n, displaced, busy=True)
                first = next(o for o, (a, b) in enumerate(zip(live, orig)) if a != b)
                return refuse(f"already patched: live bytes at {address + first:#x} differ from the file "
                              f"(live {live.hex(' ')}, file {orig.hex(' ')})", n, displaced, busy=True)

        # each displaced instruction
        for m in range(k, j + 1):
            ins = insns[m]
            prob = self._reloc_problem(m)
            if prob is not None:
                return refuse(prob, n, displaced)
            if m < j and ins.flow in _SWITCHING:
                kind = "syscall" if ins.flow is Flow.SYSCALL else "call"
                return refuse(f"'{ins.text}' at {ins.address:#x} is not the last displaced instruction: a thread "
                              f"would {'return from the ' + kind} into the displaced bytes", n, displaced)

        # ways in from elsewhere
        self._entries_inside()
        i0 = bisect.bisect_right(self._entry_tgts, address)
        if i0 < len(self._entry_tgts) and self._entry_tgts[i0] < fend:
            assert self._entries is not None
            return refuse(self.index.describe_entry(self._entries[i0]), n, displaced)
        jmp = self._tainted_by(address)
        if jmp is not None:
            return refuse(f"indirect jump at {jmp:#x} ({self.module.describe(jmp)}) with unknown targets "
                          "(not a recognised jump table): any of these bytes may be a target", n, displaced)
        eh = self.index.eh_problem
        if eh is not None:
            return refuse(f"{eh}: exception landing pads unknown", n, displaced)
        for m in range(k, j):
            ins = insns[m]
            if ins.flow in _NO_FALLTHROUGH and any(
                x.instruction.mnemonic != Mnemonic.NOP for x in insns[m + 1 : j + 1]
            ):
                # alignment nops after a ret/jmp are dead; real code there must come from
                # somewhere we do not know of: refuse rather than guess
                return refuse(f"'{insns[m + 1].text}' at {insns[m + 1].address:#x} follows '{ins.text}' in the "
                              f"displaced bytes: it can only be reached from elsewhere", n, displaced)

        # dead at a function entry by the ABI, unless its first instruction reads them (a hand-written
        # entry that branches on the caller's flags: the stub must then keep them)
        flags_dead = (base["at_entry"] and not flags_effect(insns[k])[0]) or flags_dead_after(insns, k)
        reason = f"jump: displaces {len(displaced)} instruction(s), {n} bytes"
        if padding:
            reason += f" (with {len(padding)} padding instruction(s) after the end of {func.name})"
        return SiteAnalysis(size=n, verdict=Verdict.JUMP, reason=reason, displaced=tuple(displaced),
                            flags_dead=flags_dead, padding=padding, **base)


def analyse_function(module: "Module", function: "Symbol", memory=None) -> FunctionAnalysis:
    """A :class:`FunctionAnalysis` for ``function``, checking live bytes through ``memory``
    (a ProcessMemory or anything with ``read(addr, n)``) if given."""
    reader = memory.read if memory is not None else None
    return FunctionAnalysis(module, function, reader)


def analyse_site(
    symbols: "Symbols",
    site: "ResolvedSite | int",
    size: int | None = None,
    memory=None,
) -> SiteAnalysis:
    """The verdict for one site: a :class:`ResolvedSite` (from ``Symbols.resolve``) or an address.

    ``memory`` (ProcessMemory) enables the "already patched" check against the file; for a live
    ``symbols`` without it, the symbols' own memory is used when it has one. Never raises for an
    unsuitable site (it is refused with a reason); raises TargetFaultError and the like only
    when reading the target fails in ways that are not about the site.
    """
    if isinstance(site, int):
        address = site
        module = symbols.module_at(address)
        function = module.function_at(address) if module is not None else None
        name = symbols.describe(address) if module is not None else f"{address:#x}"
    else:
        address = site.address
        module = site.module
        function = site.function
        name = site.name
    if memory is None and getattr(symbols, "live", False):
        mem = getattr(symbols, "_memory", None)
        if mem is None and hasattr(symbols, "_mem"):
            try:
                mem = symbols._mem()
            except Exception:  # noqa: BLE001
                mem = None
        memory = mem

    def refuse(reason: str) -> SiteAnalysis:
        return SiteAnalysis(site=name, address=address, size=0, verdict=Verdict.REFUSED, reason=reason,
                            function=function, module=module)

    if module is None:
        return refuse(f"{address:#x} is not in a mapped ELF module; cannot check branch targets")
    idx = module_index(module)
    if not idx.in_code(address):
        return refuse(f"{address:#x} is not in executable code of {module.name}")
    if function is None or not function.address <= address < function.address + function.size:
        return refuse(f"no symbol covers {address:#x}; cannot check branch targets")
    fa = _function_analysis(module, function, memory)
    return fa.analyse(address, size, site=name)


_FA_CACHE: "weakref.WeakKeyDictionary[Module, dict]" = weakref.WeakKeyDictionary()


def _function_analysis(module: "Module", function: "Symbol", memory) -> FunctionAnalysis:
    reader = memory.read if memory is not None else None
    with _INDEX_LOCK:
        per = _FA_CACHE.setdefault(module, {})
    key = (function.address, function.size, id(memory) if memory is not None else None)
    fa = per.get(key)
    if fa is None or fa.code_reader is not reader and memory is not None:
        fa = FunctionAnalysis(module, function, reader)
        if len(per) > 4096:
            per.clear()
        per[key] = fa
    return fa
