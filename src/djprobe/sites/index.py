"""The module index: every way control can enter the code of one module (direct branches found by
a byte scan and confirmed by decoding, symbol starts, code pointers, ``lea``-taken addresses,
jump-table cases, landing pads), and indirect jumps whose targets are unknown."""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from typing import TYPE_CHECKING, Iterable

import numpy as np
from iced_x86 import Mnemonic, OpKind

from ..x86 import DIRECT_FLOWS, Flow, decode
from .elf import _ElfFacts
from .pic32 import lea_candidates32, lea_reaches32
from .result import ByteReader
from .noreturn import never_returns
from .slices import _GPR64, _Budget, _Region, _Slicer
from .tables import targets_of
from .tables32 import pic_table32

if TYPE_CHECKING:
    from ..symbols import Module


class _Entry:
    """Ways into code found by the index: kind and where from (for the reason text)."""

    BRANCH = "branch"
    SYMBOL = "symbol"
    POINTER = "pointer"
    LEA = "lea"
    TABLE = "table"
    LANDING = "landing"


class ModuleIndex:
    """Everything known about how control can enter the code of one module.

    Built from the file (never from live memory: patched bytes must not change what we believe
    the code is). Cheap to create; each part is computed on first use and cached.
    """

    def __init__(self, module: "Module", read: ByteReader | None = None) -> None:
        self.module = module
        self.bias = module.bias
        self.bits = getattr(getattr(module, "arch", None), "bits", 64)  # 32: an i386 module
        self._read = read or module.read_file
        self._lock = threading.RLock()
        self._facts: _ElfFacts | None = None
        self._facts_done = False
        self._regions: dict[int, _Region] = {}
        self._region_starts: list[int] | None = None
        self._region_ends: list[int] = []
        self._scan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._static: tuple[list[int], list[tuple[str, int]]] | None = None
        self._tables_done = False
        self._table_targets: list[tuple[int, int, int]] = []  # (target, jmp address, table address)
        self._table_tgts: list[int] = []
        self._tainted: set[int] | None = None  # region starts
        self._unknown_jumps: dict[int, int] = {}  # region start -> jmp address
        self._verified: dict[tuple[int, int, int], bool] = {}
        self._labels: tuple[np.ndarray, np.ndarray] | None = None
        self._noreturn: dict[int, bool] = {}
        self._pointer_too: set[int] = set()  # table jumps that may also go through a code pointer

    # -- ELF ------------------------------------------------------------------------------

    @property
    def facts(self) -> _ElfFacts | None:
        with self._lock:
            if not self._facts_done:
                self._facts_done = True
                path = self.module.path
                image = getattr(self.module, "image", None)  # the vDSO: no file, an image
                if image is not None or (
                    getattr(self.module, "file_backed", True) and path.startswith("/") and os.path.exists(path)
                ):
                    try:
                        self._facts = _ElfFacts(path, image)
                    except Exception:  # noqa: BLE001 - no facts: handled conservatively
                        self._facts = None
            return self._facts

    def code_ranges(self) -> list[tuple[int, int]]:
        """Runtime [start, end) of the executable sections (PT_LOAD X segments without them)."""
        f = self.facts
        if f is not None and f.exec_sections:
            return [(lo + self.bias, hi + self.bias) for lo, hi in f.exec_sections]
        return list(self.module.executable_ranges())

    def in_code(self, address: int) -> bool:
        return any(lo <= address < hi for lo, hi in self.code_ranges())

    # -- regions ----------------------------------------------------------------------------

    def _build_regions(self) -> None:
        if self._region_starts is not None:
            return
        ranges = self.code_ranges()
        points: set[int] = set()
        for s in self.module.functions():
            points.add(s.address)
            points.add(s.end)
        points.update(self.module.symbol_starts())
        f = self.facts
        if f is not None:
            for lo, hi in f.fdes:
                points.add(lo + self.bias)
                points.add(hi + self.bias)
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in ranges:
            inner = sorted(p for p in points if lo < p < hi)
            bounds = [lo, *inner, hi]
            for a, b in zip(bounds, bounds[1:]):
                starts.append(a)
                ends.append(b)
        self._region_starts = starts
        self._region_ends = ends

    def region_at(self, address: int) -> _Region | None:
        """The decoded region holding ``address`` (None outside code)."""
        with self._lock:
            self._build_regions()
            assert self._region_starts is not None
            i = bisect.bisect_right(self._region_starts, address) - 1
            if i < 0 or address >= self._region_ends[i]:
                return None
            start = self._region_starts[i]
            reg = self._regions.get(start)
            if reg is None:
                end = self._region_ends[i]
                try:
                    code = self._read(start, end - start)
                except Exception:  # noqa: BLE001
                    code = b""
                insns = decode(code, start, self.bits) if code else []
                reg = _Region(start, end, insns)
                if not insns:
                    reg.bad = reg.bad  # empty: nothing to say
                self._regions[start] = reg
            return reg

    def regions(self) -> Iterable[_Region]:
        self._build_regions()
        assert self._region_starts is not None
        for s in list(self._region_starts):
            r = self.region_at(s)
            if r is not None:
                yield r

    # -- byte scan of possible branch / lea encodings -----------------------------------------

    def _scan_code(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(targets sorted, sources, kinds) of every byte position that may encode a direct
        branch or a rip-relative lea with a target in code."""
        if self._scan is not None:
            return self._scan
        tg: list[np.ndarray] = []
        sr: list[np.ndarray] = []
        kd: list[np.ndarray] = []
        ranges = self.code_ranges()
        lo_all = np.array([lo for lo, _ in ranges], dtype=np.int64)
        hi_all = np.array([hi for _, hi in ranges], dtype=np.int64)

        def in_code(t: np.ndarray) -> np.ndarray:
            m = np.zeros(len(t), dtype=bool)
            for lo, hi in zip(lo_all, hi_all):
                m |= (t >= lo) & (t < hi)
            return m

        for lo, hi in ranges:
            try:
                buf = self._read(lo, hi - lo)
            except Exception:  # noqa: BLE001
                continue
            a = np.frombuffer(buf, dtype=np.uint8)
            n = len(a)
            if n < 2:
                continue
            pad = np.concatenate([a, np.zeros(8, dtype=np.uint8)])
            pos = np.arange(n, dtype=np.int64)
            addr = pos + lo

            def rel32(at: np.ndarray) -> np.ndarray:
                return (
                    pad[at].astype(np.int64)
                    | (pad[at + 1].astype(np.int64) << 8)
                    | (pad[at + 2].astype(np.int64) << 16)
                    | (pad[at + 3].astype(np.int64) << 24)
                ).astype(np.uint32).astype(np.int32).astype(np.int64)

            # rel32: e8/e9 (call/jmp), 0f 80..8f (jcc), c7 f8 (xbegin)
            p = pos[(a == 0xE8) | (a == 0xE9)]
            t = addr[p] + 5 + rel32(p + 1)
            self._add(tg, sr, kd, t, addr[p], 0, in_code)
            p = pos[(a[:] == 0x0F) & ((pad[1 : n + 1] & 0xF0) == 0x80)]
            t = addr[p] + 6 + rel32(p + 2)
            self._add(tg, sr, kd, t, addr[p], 0, in_code)
            p = pos[(a == 0xC7) & (pad[1 : n + 1] == 0xF8)]
            t = addr[p] + 6 + rel32(p + 2)
            self._add(tg, sr, kd, t, addr[p], 0, in_code)
            # rel8: 70..7f (jcc), eb (jmp), e0..e3 (loop*, jrcxz)
            p = pos[((a & 0xF0) == 0x70) | (a == 0xEB) | ((a >= 0xE0) & (a <= 0xE3))]
            t = addr[p] + 2 + pad[p + 1].astype(np.int8).astype(np.int64)
            self._add(tg, sr, kd, t, addr[p], 1, in_code)
            if self.bits == 32:  # no RIP-relative lea: absolute and GOT-relative forms
                t, src = lea_candidates32(a, pad, addr, self._got())
                self._add(tg, sr, kd, t, src, 2, in_code)
                continue
            # lea r, [rip+disp32]: [REX] 8d modrm(mod=00, rm=101)
            p = pos[(a == 0x8D) & ((pad[1 : n + 1] & 0xC7) == 0x05)]
            t = addr[p] + 6 + rel32(p + 2)
            self._add(tg, sr, kd, t, addr[p], 2, in_code)  # same end with or without REX
        if tg:
            t = np.concatenate(tg)
            s = np.concatenate(sr)
            k = np.concatenate(kd)
            order = np.argsort(t, kind="stable")
            self._scan = (t[order], s[order], k[order])
        else:
            z = np.zeros(0, dtype=np.int64)
            self._scan = (z, z, z.astype(np.int8))
        return self._scan

    @staticmethod
    def _add(tg, sr, kd, t, s, kind, in_code) -> None:
        m = in_code(t)
        tg.append(t[m])
        sr.append(s[m])
        kd.append(np.full(int(m.sum()), kind, dtype=np.int8))

    def _verify(self, src: int, tgt: int, kind: int) -> bool:
        """Is the candidate at ``src`` a real instruction reaching ``tgt``?"""
        key = (src, tgt, kind)
        hit = self._verified.get(key)
        if hit is not None:
            return hit
        reg = self.region_at(src)
        if reg is None:
            ok = True
        elif reg.bad is not None and reg.bad.address <= src + 8:
            ok = True  # cannot tell: keep it
        else:
            ins = reg.insn_containing(src)
            if ins is None:
                ok = reg.bad is not None
            elif kind in (0, 1):
                ok = ins.flow in DIRECT_FLOWS and ins.target == tgt
            elif self.bits == 32:
                ok = lea_reaches32(ins, tgt, self._got())
            else:
                ok = ins.instruction.mnemonic == Mnemonic.LEA and ins.mem_target == tgt
        self._verified[key] = ok
        return ok

    def _got(self) -> int | None:
        """Runtime address of the GOT of an i386 module (None if unknown)."""
        f = self.facts
        got = getattr(f, "got", None)
        return got + self.bias if got is not None else None

    # -- exact entries --------------------------------------------------------------------------

    def _static_entries(self) -> tuple[list[int], list[tuple[str, int]]]:
        """Sorted addresses entered from outside the code flow: symbol starts, code pointers,
        landing pads; with (kind, detail) per address."""
        if self._static is not None:
            return self._static
        items: dict[int, tuple[str, int]] = {}
        f = self.facts
        if f is not None:
            for p in f.pointers.tolist():
                items.setdefault(int(p) + self.bias, (_Entry.POINTER, 0))
            for lp in f.landing_pads:
                items[lp + self.bias] = (_Entry.LANDING, 0)
        for s in self.module.symbol_starts():
            items[s] = (_Entry.SYMBOL, 0)
        keys = sorted(items)
        self._static = (keys, [items[k] for k in keys])
        return self._static

    @property
    def eh_problem(self) -> str | None:
        f = self.facts
        return f.lsda_error if f is not None else None

    # -- jump tables ------------------------------------------------------------------------------

    def _analyse_tables(self) -> None:
        """Find every register-indirect jmp of the module and classify it."""
        if self._tables_done:
            return
        with self._lock:
            if self._tables_done:
                return
            seen_regions: set[int] = set()
            for lo, hi in self.code_ranges():
                try:
                    buf = self._read(lo, hi - lo)
                except Exception:  # noqa: BLE001
                    continue
                a = np.frombuffer(buf, dtype=np.uint8)
                if len(a) < 2:
                    continue
                cand = np.nonzero((a[:-1] == 0xFF) & ((a[1:] & 0xF8) == 0xE0))[0]
                for p in cand.tolist():
                    reg = self.region_at(lo + p)
                    if reg is None or reg.start in seen_regions:
                        continue
                    seen_regions.add(reg.start)
                    self._classify_region(reg)
            tt = []
            for start in seen_regions:
                reg = self._regions[start]
                for jmp, table, targets in reg.tables:
                    for t in targets:
                        tt.append((t, jmp, table))
                for j in reg.unknown_jumps:
                    self._unknown_jumps.setdefault(reg.start, j)
            tt.sort()
            self._table_targets = tt
            self._table_tgts = [t[0] for t in tt]
            self._tables_done = True

    def _classify_region(self, reg: _Region) -> None:
        if reg.bad is not None:
            # undecodable: any ff e0 in it may be a jump with unknown targets
            reg.unknown_jumps.append(reg.bad.address)
            return
        for k, ins in enumerate(reg.insns):
            if ins.flow is not Flow.INDIRECT_JUMP:
                continue
            instr = ins.instruction
            if instr.op0_kind == OpKind.MEMORY:
                continue  # jmp [mem]: a code pointer from memory (tail call, PLT, absolute table)
            if instr.op0_kind == OpKind.REGISTER and self.bits == 32:  # i386: PIC jump tables only
                found = pic_table32(self, reg, k, ins)
                if found is None:
                    reg.unknown_jumps.append(ins.address)
                elif found[2]:
                    reg.tables.append(found)
                continue
            if instr.op0_kind != OpKind.REGISTER or instr.op0_register not in _GPR64:
                reg.unknown_jumps.append(ins.address)
                continue
            slicer = _Slicer(self)
            try:
                v = slicer.value_before(instr.op0_register, reg, k, set())
                found = targets_of(self, v, slicer, ins) if v is not None else (ins.address, 0, [])
                if found is not None and found[2] and any(a.kind == "ptr" for a in (v.alts if v.kind == "set" else (v,))):
                    self._pointer_too.add(ins.address)  # also a tail call through a code pointer
            except _Budget:
                found = None
            if found is None:
                reg.unknown_jumps.append(ins.address)
            elif found[2]:
                reg.tables.append(found)

    def jump_targets(self, jmp: int) -> tuple[list[int], bool] | None:
        """For the register-indirect jmp at ``jmp``: its known targets (table cases, constant
        addresses) and whether it may also go through a code pointer (a tail call); None if it
        only goes through code pointers, or its targets are unknown."""
        self._analyse_tables()
        reg = self.region_at(jmp)
        if reg is None:
            return None
        for j, _table, targets in reg.tables:
            if j == jmp:
                return list(targets), jmp in self._pointer_too
        return None

    def never_returns(self, address: int) -> bool:
        """Is ``address`` the start of a function of this module that never returns? (See
        :func:`.noreturn.never_returns`.)"""
        return never_returns(self, address)

    def _home_spans(self, address: int) -> list[tuple[int, int]]:
        spans = []
        func = self.module.function_at(address)
        if func is not None:
            spans.append((func.address, func.address + func.size))
            for c in self.module.cold_parts(func):
                spans.append((c.address, c.address + c.size))
        f = self.facts
        if f is not None:
            a = address - self.bias
            for lo, hi in f.fdes:
                if lo <= a < hi:
                    spans.append((lo + self.bias, hi + self.bias))
        return spans

    def branch_sources(self, address: int) -> list[int]:
        """Verified direct branches (jmp, jcc, call, loop, xbegin) that land at ``address``."""
        t, s, k = self._scan_code()
        i0 = int(np.searchsorted(t, address, side="left"))
        i1 = int(np.searchsorted(t, address, side="right"))
        return [int(s[i]) for i in range(i0, i1) if k[i] != 2 and self._verify(int(s[i]), address, int(k[i]))]

    def is_function_start(self, address: int) -> bool:
        """Is ``address`` the first byte of a function (and no exception landing pad, where the
        unwinder restores the callee-saved registers)?"""
        func = self.module.function_at(address)
        if func is None or func.address != address:
            return False
        keys, kinds = self._static_entries()
        j = bisect.bisect_left(keys, address)
        return not (j < len(keys) and keys[j] == address and kinds[j][0] == _Entry.LANDING)

    def is_static_entry(self, address: int) -> bool:
        """Is ``address`` a symbol start, a code pointer target, a lea-taken address or a pad?"""
        keys = self._static_entries()[0]
        j = bisect.bisect_left(keys, address)
        if j < len(keys) and keys[j] == address:
            return True
        t, s, k = self._scan_code()
        i0 = int(np.searchsorted(t, address, side="left"))
        i1 = int(np.searchsorted(t, address, side="right"))
        return any(k[i] == 2 and self._verify(int(s[i]), address, 2) for i in range(i0, i1))

    def _read_data(self, address: int, size: int) -> bytes:
        try:
            return self.module.read_file(address, size)
        except Exception:  # noqa: BLE001
            f = self.facts
            if f is None:
                raise
            return f.image.read(address - self.bias, size)

    def tainted(self, region: _Region) -> int | None:
        """The address of an indirect jump with unknown targets whose targets may include
        ``region`` (same region, or a region linked to it by direct jumps), else None."""
        self._analyse_tables()
        with self._lock:
            if self._tainted is None:
                tainted: dict[int, int] = {}
                for start, jmp in self._unknown_jumps.items():
                    tainted[start] = jmp
                    src = self.region_at(start)
                    if src is None:
                        continue
                    for linked in self._linked_regions(src):
                        tainted.setdefault(linked, jmp)
                self._tainted = tainted  # type: ignore[assignment]
            return self._tainted.get(region.start)  # type: ignore[union-attr]

    def _linked_regions(self, reg: _Region) -> set[int]:
        out: set[int] = set()
        for ins in reg.insns:
            if ins.flow in (Flow.JUMP, Flow.COND_JUMP):
                r = self.region_at(ins.target)
                if r is not None and r.start != reg.start:
                    out.add(r.start)
        t, s, k = self._scan_code()
        i0 = np.searchsorted(t, reg.start)
        i1 = np.searchsorted(t, reg.end)
        for i in range(i0, i1):
            src = int(s[i])
            if reg.start <= src < reg.end or k[i] == 2:
                continue
            if self._verify(src, int(t[i]), int(k[i])):
                r = self.region_at(src)
                if r is not None:
                    ins = r.insn_containing(src)
                    if ins is None or ins.flow in (Flow.JUMP, Flow.COND_JUMP):
                        out.add(r.start)
        return out

    # -- the question ------------------------------------------------------------------------------

    def entries_between(self, lo: int, hi: int) -> list[tuple[int, str, int]]:
        """Every known way into the code at an address strictly between ``lo`` and ``hi``:
        (target, kind, source) sorted by target. Kinds: branch, lea, symbol, pointer, table,
        landing."""
        out: list[tuple[int, str, int]] = []
        t, s, k = self._scan_code()
        i0 = int(np.searchsorted(t, lo, side="right"))
        i1 = int(np.searchsorted(t, hi, side="left"))
        for i in range(i0, i1):
            tgt, src, kind = int(t[i]), int(s[i]), int(k[i])
            if self._verify(src, tgt, kind):
                out.append((tgt, _Entry.LEA if kind == 2 else _Entry.BRANCH, src))
        keys, kinds = self._static_entries()
        for j in range(bisect.bisect_right(keys, lo), bisect.bisect_left(keys, hi)):
            out.append((keys[j], kinds[j][0], kinds[j][1]))
        self._analyse_tables()
        for j in range(bisect.bisect_right(self._table_tgts, lo), bisect.bisect_left(self._table_tgts, hi)):
            tgt, jmp, table = self._table_targets[j]
            out.append((tgt, _Entry.TABLE, jmp))
        out.sort()
        return out

    def describe_entry(self, entry: tuple[int, str, int]) -> str:
        tgt, kind, src = entry
        where = self.module.describe
        if kind == _Entry.BRANCH:
            ins = None
            r = self.region_at(src)
            if r is not None:
                ins = r.insn_containing(src)
            what = f"'{ins.text}'" if ins is not None else "a branch"
            return f"{what} at {src:#x} ({where(src)}) lands at {tgt:#x}, inside the displaced bytes"
        if kind == _Entry.LEA:
            return (f"the address {tgt:#x} inside the displaced bytes is taken at {src:#x} ({where(src)}) "
                    "(computed goto or function pointer)")
        if kind == _Entry.SYMBOL:
            return f"a code symbol starts at {tgt:#x} ({where(tgt)}), inside the displaced bytes"
        if kind == _Entry.POINTER:
            return f"a relocated code pointer targets {tgt:#x}, inside the displaced bytes"
        if kind == _Entry.TABLE:
            return f"jump table of the jmp at {src:#x} ({where(src)}) has a case at {tgt:#x}, inside the displaced bytes"
        if kind == _Entry.LANDING:
            return f"an exception landing pad is at {tgt:#x}, inside the displaced bytes"
        return f"code at {tgt:#x} is entered from elsewhere"


_INDEX_CACHE: "weakref.WeakKeyDictionary[Module, ModuleIndex]" = weakref.WeakKeyDictionary()
_INDEX_LOCK = threading.Lock()


def module_index(module: "Module") -> ModuleIndex:
    """The (cached) :class:`ModuleIndex` of ``module``."""
    with _INDEX_LOCK:
        idx = _INDEX_CACHE.get(module)
        if idx is None:
            idx = ModuleIndex(module)
            _INDEX_CACHE[module] = idx
        return idx
