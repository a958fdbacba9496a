"""Site analysis: which instructions a jump probe at an address displaces, and whether it may.

A jump probe overwrites the first ``size`` (>= 5) bytes of whole instructions at a site with a
``jmp rel32``. That is only safe if no thread can ever *enter* those bytes anywhere but at their
first byte (design Guarantee 2). This module decides that, with a reason a user can act on.

How entries into code are found (all addresses are runtime addresses of one :class:`Module`):

* **direct branches** (``jmp``/``jcc``/``call``/``loop``/``xbegin``, rel8 and rel32) from anywhere
  in the module's executable sections. A fast byte scan (numpy) finds every *possible* encoding
  whose target falls in a range; each candidate is then confirmed by decoding the code region
  that holds it (a candidate that is not a real instruction is dropped). Regions are delimited by
  symbol bounds and by the ``.eh_frame`` FDE ranges, so stripped libraries (static functions and
  ``.cold`` parts without symbols) are decoded in step too. A region that does not decode cleanly
  keeps all its candidates.
* **code addresses taken**: symbol starts, dynamic relocations that produce a code address
  (``R_X86_64_RELATIVE``/``64``/``IRELATIVE``, RELR), ``lea reg, [rip+code]`` (computed goto,
  function pointers), and for non-PIE executables every 32-bit value in the file that falls in
  code. Every indirect ``call`` and every indirect ``jmp`` through a pointer loaded from memory
  (tail calls, PLT, ``jmp [table+i*8]``) can only reach one of these.
* **jump tables** (``lea rT,[rip+T]; movsxd rX,[rT+rI*4]; add rX,rT; jmp rX`` and the ``lea``
  variants of gcc, clang and glibc's assembly): the table bound is found from the guarding
  ``cmp rI, N; ja``/``and rI, N``, the entries are read and their targets are entries.
  An indirect ``jmp reg`` that fits neither the pointer-load nor the jump-table shape has
  *unknown* targets: every site in its region, and in the regions linked to it by direct jumps
  (its cold parts), is refused.
* **landing pads** of the C++/``-fexceptions`` unwinder, from the LSDA call-site tables that the
  FDEs point to.

On top of that a site is refused if it is not an instruction boundary, if the displaced bytes
cross the end of the function, contain a ``call``/``syscall`` that is not the last displaced
instruction (a thread would return into them), an instruction that follows an unconditional
transfer (it can only be reached from elsewhere), or an instruction that cannot be relocated; and,
for a live process, if the bytes there differ from the file (another tool's ``int3`` or ``jmp``:
``busy``, which callers turn into ``EBUSY``).
"""

from __future__ import annotations

import bisect
import enum
import os
import struct
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
from iced_x86 import InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register, RegisterExt

from .errors import InvalidSiteError
from .x86 import (
    DIRECT_FLOWS,
    Flow,
    Insn,
    Relocated,
    RelocationError,
    decode,
    flags_dead_after,
    relocate,
    relocation_problem,
)

if TYPE_CHECKING:
    from .symbols import Module, ResolvedSite, Symbol, Symbols

__all__ = [
    "Verdict",
    "SiteAnalysis",
    "FunctionAnalysis",
    "ModuleIndex",
    "CoverageReport",
    "JUMP_SIZE",
    "analyse_site",
    "analyse_function",
    "coverage",
    "module_index",
]

#: Size of the ``jmp rel32`` written at a site.
JUMP_SIZE = 5

ByteReader = Callable[[int, int], bytes]


class Verdict(enum.Enum):
    """What can be placed at a site."""

    JUMP = "jump"  # a direct-jump probe
    REFUSED = "refused"  # nothing: see the reason


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteAnalysis:
    """The verdict for one site.

    ``size`` is the number of displaced bytes (0 if not even that could be determined);
    ``displaced`` the whole instructions they hold (relocated to the stub); ``padding`` the
    never-executed alignment instructions after a function's last instruction that a jump at the
    end of a very short function also overwrites (``size`` counts them); ``reason`` always says why (for a jump: what
    is displaced). ``busy`` is True when the refusal is because something else already patched
    the bytes (callers raise ``SiteBusyError``/EBUSY for it, ``InvalidSiteError``/EINVAL for the
    other refusals). ``flags_dead``: the arithmetic flags are dead at the site (a probe action
    need not save them). ``at_entry``: the site is the first byte of its function.
    """

    site: str
    address: int
    size: int
    verdict: Verdict
    reason: str
    busy: bool = False
    displaced: tuple[Insn, ...] = ()
    function: "Symbol | None" = None
    flags_dead: bool = False
    at_entry: bool = False
    module: "Module | None" = field(default=None, compare=False, repr=False)
    padding: tuple[Insn, ...] = ()

    @property
    def ok(self) -> bool:
        """True for a jump verdict."""
        return self.verdict is Verdict.JUMP

    @property
    def original(self) -> bytes:
        """The overwritten bytes (as decoded, i.e. as in the file), padding included."""
        return b"".join(i.raw for i in self.displaced) + b"".join(i.raw for i in self.padding)

    def error(self) -> Exception:
        """The exception a caller should raise for a refusal: SiteBusyError or InvalidSiteError."""
        from .errors import SiteBusyError

        if self.busy:
            return SiteBusyError(f"{self.site}: {self.reason}", address=self.address)
        return InvalidSiteError(f"{self.site}: {self.reason}", address=self.address, reason=self.reason)

    def relocate_to(self, stub_address: int, return_to: int | None = None) -> Relocated:
        """The displaced instructions relocated to ``stub_address``, ending with ``jmp return_to``
        (default: ``address + size``).

        Raises InvalidSiteError for a refused site, RelocationError (``out_of_reach`` set) if the
        stub is beyond +-2 GiB of the site or of a RIP-relative/branch target.
        """
        if self.verdict is not Verdict.JUMP:
            raise self.error()
        rel = stub_address - (self.address + JUMP_SIZE)
        if not -(2**31) <= rel < 2**31:
            raise RelocationError(
                f"stub at {stub_address:#x} is beyond the +-2 GiB reach of a jmp rel32 at {self.address:#x}",
                address=self.address,
                out_of_reach=True,
            )
        if return_to is None:
            return_to = self.address + self.size
        return relocate(list(self.displaced), stub_address, return_to)

    def to_json(self) -> dict:
        """A JSON-ready dict: site, address, size, verdict, reason, busy, function, offset,
        module, at_entry, flags_dead, instructions [{address, bytes, text}]."""
        func = self.function
        return {
            "site": self.site,
            "address": f"{self.address:#x}",
            "size": self.size,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "busy": self.busy,
            "module": self.module.path if self.module is not None else None,
            "function": func.name if func is not None else None,
            "offset": (self.address - func.address) if func is not None else None,
            "at_entry": self.at_entry,
            "flags_dead": self.flags_dead,
            "instructions": [
                {"address": f"{i.address:#x}", "bytes": i.raw.hex(), "text": i.text} for i in self.displaced
            ],
            "padding": [
                {"address": f"{i.address:#x}", "bytes": i.raw.hex(), "text": i.text} for i in self.padding
            ],
        }


# ---------------------------------------------------------------------------------------------
# ELF facts the symbol layer does not give: exec sections, FDE ranges, landing pads, pointers
# ---------------------------------------------------------------------------------------------

_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_R_X86_64_64 = 1
_R_X86_64_RELATIVE = 8
_R_X86_64_IRELATIVE = 37
_ET_EXEC = "ET_EXEC"


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if b & 0x40:
                result -= 1 << shift
            return result, pos


_ENC_FMT = {0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q", 0x00: "<Q"}


class _Image:
    """The file's loadable bytes by virtual address (for .eh_frame and table reads)."""

    def __init__(self, data: bytes, loads: list[tuple[int, int, int, int]]) -> None:
        self.data = data
        self.loads = loads  # (vaddr, memsz, offset, filesz)

    def read(self, vaddr: int, size: int) -> bytes:
        for va, memsz, off, filesz in self.loads:
            if va <= vaddr < va + memsz:
                start = vaddr - va
                out = self.data[off + start : off + min(start + size, filesz)] if start < filesz else b""
                return out + b"\0" * (size - len(out))
        raise ValueError(f"vaddr {vaddr:#x} not loaded")

    def enc(self, encoding: int, vaddr: int, data: bytes, pos: int, datarel: int = 0) -> tuple[int | None, int]:
        """Read a DW_EH_PE-encoded value at data[pos] (whose vaddr is ``vaddr``)."""
        if encoding == 0xFF:
            return None, pos
        fmt = encoding & 0x0F
        start = pos
        if fmt == 0x01:
            value, pos = _uleb(data, pos)
        elif fmt == 0x09:
            value, pos = _sleb(data, pos)
        else:
            f = _ENC_FMT.get(fmt)
            if f is None:
                raise ValueError(f"unsupported pointer encoding {encoding:#x}")
            (value,) = struct.unpack_from(f, data, pos)
            pos += struct.calcsize(f)
        app = encoding & 0x70
        if app == 0x10:
            value += vaddr
        elif app == 0x30:
            value += datarel
        del start
        return value & 0xFFFFFFFFFFFFFFFF, pos


class _ElfFacts:
    """Code sections, FDE ranges, landing pads and code pointers of one ELF file (file vaddrs)."""

    def __init__(self, path: str, data: bytes | None = None) -> None:
        from elftools.elf.elffile import ELFFile

        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        import io

        elf = ELFFile(io.BytesIO(data))
        self.is_exec = elf.header["e_type"] == _ET_EXEC
        loads = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                loads.append((seg["p_vaddr"], seg["p_memsz"], seg["p_offset"], seg["p_filesz"]))
        self.image = _Image(data, loads)
        self.exec_sections: list[tuple[int, int]] = []
        sections = {}
        for sec in elf.iter_sections():
            sections[sec.name] = sec
            flags = sec["sh_flags"]
            if flags & _SHF_ALLOC and flags & _SHF_EXECINSTR and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
                self.exec_sections.append((sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]))
        self.exec_sections.sort()
        self.fdes: list[tuple[int, int]] = []
        self.landing_pads: list[int] = []
        self.lsda_error: str | None = None
        hdr = sections.get(".eh_frame_hdr")
        eh = sections.get(".eh_frame")
        if eh is not None and eh["sh_size"]:
            try:
                self._parse_eh_frame(eh["sh_addr"], eh["sh_size"], hdr["sh_addr"] if hdr is not None else 0)
            except (ValueError, IndexError, struct.error) as exc:
                # unparsable unwind info: landing pads unknown -> every site refused (see index)
                self.lsda_error = f".eh_frame could not be parsed ({exc})"
        self.pointers = self._code_pointers(elf, sections, data)

    # -- .eh_frame ---------------------------------------------------------------------------

    def _parse_eh_frame(self, base: int, size: int, hdr_vaddr: int) -> None:
        data = self.image.read(base, size)
        cies: dict[int, tuple[int, int | None, bool]] = {}  # offset -> (fde enc, lsda enc, z)
        pos = 0
        lsdas: list[tuple[int, int, int]] = []
        while pos + 4 <= len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            if length == 0:
                break  # terminator
            hdr_len = 4
            if length == 0xFFFFFFFF:
                (length,) = struct.unpack_from("<Q", data, pos + 4)
                hdr_len = 12
            body = pos + hdr_len
            end = body + length
            (cie_id,) = struct.unpack_from("<I", data, body)
            if cie_id == 0:
                cies[pos] = self._parse_cie(data, body + 4, end)
            else:
                cie_off = body - cie_id
                cie = cies.get(cie_off)
                if cie is None:
                    cie = self._parse_cie_at(data, cie_off)
                    cies[cie_off] = cie
                fde_enc, lsda_enc, z = cie
                p = body + 4
                start, p = self.image.enc(fde_enc, base + p, data, p, hdr_vaddr)
                rng, p = self.image.enc(fde_enc & 0x0F, base + p, data, p)
                if start is not None and rng:
                    self.fdes.append((start, start + rng))
                if z:
                    _auglen, p = _uleb(data, p)
                    if lsda_enc is not None:
                        lsda, p = self.image.enc(lsda_enc, base + p, data, p, hdr_vaddr)
                        if lsda and start is not None:
                            lsdas.append((start, start + rng, lsda))
            pos = end
        for fstart, _fend, lsda in lsdas:
            self._parse_lsda(fstart, lsda)

    def _parse_cie_at(self, data: bytes, off: int) -> tuple[int, int | None, bool]:
        (length,) = struct.unpack_from("<I", data, off)
        hdr_len = 4 if length != 0xFFFFFFFF else 12
        if hdr_len == 12:
            (length,) = struct.unpack_from("<Q", data, off + 4)
        body = off + hdr_len
        return self._parse_cie(data, body + 4, body + length)

    def _parse_cie(self, data: bytes, p: int, end: int) -> tuple[int, int | None, bool]:
        version = data[p]
        p += 1
        nul = data.index(b"\0", p)
        aug = data[p:nul].decode("ascii", "replace")
        p = nul + 1
        if "eh" in aug:
            p += 8
        _, p = _uleb(data, p)  # code alignment
        _, p = _sleb(data, p)  # data alignment
        if version == 1:
            p += 1
        else:
            _, p = _uleb(data, p)
        fde_enc = 0x00
        lsda_enc: int | None = None
        z = aug.startswith("z")
        if z:
            _, p = _uleb(data, p)
            for ch in aug[1:]:
                if ch == "L":
                    lsda_enc = data[p]
                    p += 1
                elif ch == "R":
                    fde_enc = data[p]
                    p += 1
                elif ch == "P":
                    penc = data[p]
                    p += 1
                    _, p = self.image.enc(penc & 0x7F, 0, data, p)
                elif ch in "SBG":
                    pass
                else:
                    break  # unknown augmentation: the rest cannot be interpreted
        return fde_enc, lsda_enc, z

    def _parse_lsda(self, func_start: int, lsda: int) -> None:
        data = self.image.read(lsda, 4096)
        p = 0
        lp_enc = data[p]
        p += 1
        lpstart, p = self.image.enc(lp_enc, lsda + p, data, p)
        if lpstart is None:
            lpstart = func_start
        tt_enc = data[p]
        p += 1
        if tt_enc != 0xFF:
            _, p = _uleb(data, p)
        cs_enc = data[p]
        p += 1
        cs_len, p = _uleb(data, p)
        if p + cs_len > len(data):
            data = self.image.read(lsda, p + cs_len + 16)
        end = p + cs_len
        while p < end:
            _start, p = self.image.enc(cs_enc, lsda + p, data, p)
            _len, p = self.image.enc(cs_enc, lsda + p, data, p)
            lp, p = self.image.enc(cs_enc, lsda + p, data, p)
            _, p = _uleb(data, p)
            if lp:
                self.landing_pads.append((lpstart + lp) & 0xFFFFFFFFFFFFFFFF)

    # -- pointers to code ---------------------------------------------------------------------

    def _code_pointers(self, elf, sections: dict, data: bytes) -> np.ndarray:
        """Every value that the dynamic loader, or the file itself, puts in memory as an address."""
        out: list[np.ndarray] = []
        dynsym_values = None
        dynsym = sections.get(".dynsym")
        if dynsym is not None and dynsym["sh_size"]:
            raw = data[dynsym["sh_offset"] : dynsym["sh_offset"] + dynsym["sh_size"]]
            arr = np.frombuffer(raw[: len(raw) // 24 * 24], dtype=np.dtype(
                [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")]
            ))
            dynsym_values = np.where(arr["shndx"] != 0, arr["value"], 0).astype(np.uint64)
        rela_t = np.dtype([("off", "<u8"), ("info", "<u8"), ("add", "<i8")])
        for sec in sections.values():
            if sec["sh_type"] == "SHT_RELA" and sec["sh_flags"] & _SHF_ALLOC and sec["sh_size"]:
                raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
                r = np.frombuffer(raw[: len(raw) // 24 * 24], dtype=rela_t)
                typ = (r["info"] & 0xFFFFFFFF).astype(np.int64)
                sym = (r["info"] >> np.uint64(32)).astype(np.int64)
                add = r["add"].astype(np.uint64)
                rel = (typ == _R_X86_64_RELATIVE) | (typ == _R_X86_64_IRELATIVE)
                out.append(add[rel])
                if dynsym_values is not None:
                    m = (typ == _R_X86_64_64) & (sym > 0) & (sym < len(dynsym_values))
                    if m.any():
                        vals = dynsym_values[sym[m]]
                        out.append((vals + add[m])[vals != 0])
            elif sec["sh_type"] in ("SHT_RELR", 19) and sec["sh_size"]:
                out.append(self._relr(data, sec))
        if self.is_exec:
            # No relocations tell where addresses are: take every 32-bit value of the file
            # that falls in code (a superset of immediates and pointers).
            for va, memsz, off, filesz in self.image.loads:
                seg = np.frombuffer(data[off : off + filesz], dtype=np.uint8)
                if len(seg) < 4:
                    continue
                words = (
                    seg[:-3].astype(np.uint32)
                    | (seg[1:-2].astype(np.uint32) << 8)
                    | (seg[2:-1].astype(np.uint32) << 16)
                    | (seg[3:].astype(np.uint32) << 24)
                ).astype(np.uint64)
                keep = np.zeros(len(words), dtype=bool)
                for lo, hi in self.exec_sections:
                    keep |= (words >= lo) & (words < hi)
                out.append(words[keep])
        if not out:
            return np.zeros(0, dtype=np.uint64)
        allp = np.unique(np.concatenate(out).astype(np.uint64))
        keep = np.zeros(len(allp), dtype=bool)
        for lo, hi in self.exec_sections:
            keep |= (allp >= lo) & (allp < hi)
        return allp[keep]

    def _relr(self, data: bytes, sec) -> np.ndarray:
        raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
        vals = []
        where = 0
        for (entry,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8]):
            if not entry & 1:
                where = entry
                vals.append(where)
                where += 8
            else:
                bits = entry >> 1
                for i in range(63):
                    if bits >> i & 1:
                        vals.append(where + i * 8)
                where += 63 * 8
        out = []
        for v in vals:
            try:
                out.append(struct.unpack("<Q", self.image.read(v, 8))[0])
            except ValueError:
                pass
        return np.array(out, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# Decoded regions and register slices (jump tables)
# ---------------------------------------------------------------------------------------------


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
_CALLER_SAVED = {Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.RDI, Register.R8,
                 Register.R9, Register.R10, Register.R11}


_WRITE_ACCESS = frozenset({OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE})


def _writes(insn: Insn, reg: int) -> bool:
    """Does ``insn`` (possibly) write the 64-bit register ``reg`` (or a part of it)?"""
    if insn.flow in (Flow.CALL, Flow.INDIRECT_CALL) and reg in _CALLER_SAVED:
        return True
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
    """An abstract register value: ``const`` (an address), ``tload`` (movsxd [base + idx*4 + d]),
    ``add`` (sum of two values), ``ptr`` (a code pointer from memory, a parameter, a call result:
    only an address-taken point), ``arith`` (computed in a way not understood)."""

    kind: str
    value: int = 0
    base: "_Val | None" = None
    other: "_Val | None" = None
    index: int = 0
    disp: int = 0
    at: tuple[int, int] = (0, -1)  # tload: (region start, insn index) of the load


_PTR = _Val("ptr")
_ARITH = _Val("arith")
_LOOP = _Val("loop")  # only reached around a loop: adds nothing
_NO_FALLTHROUGH = frozenset({Flow.JUMP, Flow.INDIRECT_JUMP, Flow.RETURN, Flow.INTERRUPT, Flow.INVALID})
_BUDGET = 400
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
            if r.insns[idx - 1].flow not in _NO_FALLTHROUGH:
                out.append((r, idx - 1, False))
        else:
            prev = self.ix.region_at(addr - 1)
            if prev is not None and prev.insns and prev.insns[-1].end == addr and \
                    prev.insns[-1].flow not in _NO_FALLTHROUGH:
                out.append((prev, len(prev.insns) - 1, False))
        for src in self.ix.branch_sources(addr):
            r2 = self.ix.region_at(src)
            if r2 is None:
                return out, True
            ins = r2.insn_containing(src)
            k2 = r2.index(ins.address) if ins is not None else None
            if k2 is None or ins.flow not in (Flow.JUMP, Flow.COND_JUMP):
                return out, True  # a call into the middle, or an undecodable source
            out.append((r2, k2, True))
        static = self.ix.is_static_entry(addr)
        if not out and not static and not self.bounding:
            # Reached by no direct branch, fall-through or address-taken point: alignment padding,
            # or a case block entered through the jump table being analysed, which carries the
            # values at that jump (a cycle): adds nothing. (Bounds stay strict: see bound().)
            return out, False
        return out, static or not out

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
                    return self._def(ins, reg, pr, pj, seen)
                r, idx = pr, pj
                continue
            vals = [_PTR] if entered else []
            for pr, pj, _ in preds:
                ins = pr.insns[pj]
                if _writes(ins, reg):
                    vals.append(self._def(ins, reg, pr, pj, seen))
                else:
                    vals.append(self.value_before(reg, pr, pj, seen))
            return _merge(vals)

    def _def(self, ins: Insn, reg: int, r: _Region, j: int, seen: set) -> _Val:
        instr = ins.instruction
        mn = instr.mnemonic
        if ins.flow in (Flow.CALL, Flow.INDIRECT_CALL, Flow.SYSCALL):
            return _PTR  # a call result or clobbered: never used as a computed address
        if instr.op_count < 1 or instr.op0_kind != OpKind.REGISTER or _full(instr.op0_register) != reg:
            return _ARITH  # implicit write (xchg, cmpxchg, mul ...)
        dst = instr.op0_register
        if mn == Mnemonic.MOV and instr.op1_kind in _IMM_KINDS | {OpKind.IMMEDIATE64} and _reg_bits(dst) >= 32:
            return _Val("const", value=instr.immediate(1) & (0xFFFFFFFF if _reg_bits(dst) == 32 else -1))
        if dst not in _GPR64:
            return _ARITH  # a 32/16/8-bit write: not a 64-bit address
        if mn == Mnemonic.LEA:
            if ins.rip_relative:
                return _Val("const", value=ins.mem_target)
            b, i = instr.memory_base, instr.memory_index
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
                return _Val("tload", base=self._v(_full(b), r, j, seen), index=_full(i), disp=disp, at=(r.start, j))
            return _ARITH
        if mn == Mnemonic.MOV:
            if instr.op1_kind == OpKind.MEMORY:
                return _PTR
            if instr.op1_kind == OpKind.REGISTER and instr.op1_register in _GPR64:
                return self._v(instr.op1_register, r, j, seen)
            return _ARITH
        if mn == Mnemonic.ADD and instr.op1_kind == OpKind.REGISTER and instr.op1_register in _GPR64:
            return _Val("add", base=self._v(reg, r, j, seen), other=self._v(instr.op1_register, r, j, seen))
        if mn == Mnemonic.POP:
            return _PTR
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
        path must pass a ``cmp idx, N`` with ``ja``/``jae`` (or ``jbe``/``jb`` taken) or an
        ``and idx, N``. None if some path does not."""
        self.bounding = True
        try:
            out = self._bound(index, r, idx, set(), {})
        finally:
            self.bounding = False
        return out if out is not None and out > 0 else None

    def _bound(self, tracked: int, r: _Region, idx: int, seen: set, pending: dict) -> int | None:
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
            if len(results) == 1 and not preds[0][2] and results[0] == -1:
                pass
            return max(results)

    def _bound_from(self, tracked: int, r: _Region, j: int, via_branch: bool, seen: set,
                    pending: dict) -> int | None:
        """``pending``: bounds established (later in the code) on other 32/64-bit registers
        that have not been written since: a copy ``mov tracked32, reg32`` inherits them."""
        ins = r.insns[j]
        instr = ins.instruction
        mn = instr.mnemonic
        if ins.flow is Flow.COND_JUMP:
            rule = _BOUND_JCC.get(mn)
            edge = "taken" if via_branch else "fall"
            if rule is not None and rule[0] == edge and j > 0:
                cmp = r.insns[j - 1].instruction
                if (
                    cmp.mnemonic == Mnemonic.CMP
                    and cmp.op0_kind == OpKind.REGISTER
                    and _reg_bits(cmp.op0_register) >= 32
                    and cmp.op1_kind in _IMM_KINDS
                ):
                    n = cmp.immediate(1)
                    if n < 2**31 and 0 < n + rule[1] <= 4096:
                        if _full(cmp.op0_register) == tracked:
                            return n + rule[1]
                        pending[_full(cmp.op0_register)] = n + rule[1]
            return self._bound(tracked, r, j, seen, pending)
        if mn == Mnemonic.AND and instr.op0_kind == OpKind.REGISTER and _full(instr.op0_register) == tracked \
                and _reg_bits(instr.op0_register) >= 32 and instr.op1_kind in _IMM_KINDS:
            n = instr.immediate(1)
            return n + 1 if 0 <= n < 4096 else None
        if _writes(ins, tracked):
            if (
                mn == Mnemonic.MOV
                and instr.op0_kind == OpKind.REGISTER
                and instr.op1_kind == OpKind.REGISTER
                and _reg_bits(instr.op0_register) == 32
                and _reg_bits(instr.op1_register) == 32
            ):
                src = _full(instr.op1_register)
                if src in pending:
                    return pending[src]
                return self._bound(src, r, j, seen, {})  # zero-extending copy
            return None
        for reg in list(pending):
            if _writes(ins, reg):
                del pending[reg]
        return self._bound(tracked, r, j, seen, pending)


def _merge(vals: list[_Val | None]) -> _Val | None:
    vs = [v for v in vals if v is not None and v.kind != "loop"]
    if not vs:
        return None
    first = vs[0]
    if all(v == first for v in vs):
        return first
    if all(v.kind == "ptr" for v in vs):
        return _PTR
    return _ARITH


def _reg_bits(reg: int) -> int:
    try:
        return RegisterExt.size(reg) * 8
    except Exception:  # noqa: BLE001
        return 0


# ---------------------------------------------------------------------------------------------
# Module index
# ---------------------------------------------------------------------------------------------


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
                insns = decode(code, start) if code else []
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
            else:
                ok = ins.instruction.mnemonic == Mnemonic.LEA and ins.mem_target == tgt
        self._verified[key] = ok
        return ok

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
            if instr.op0_kind != OpKind.REGISTER or instr.op0_register not in _GPR64:
                reg.unknown_jumps.append(ins.address)
                continue
            slicer = _Slicer(self)
            try:
                v = slicer.value_before(instr.op0_register, reg, k, set())
                if v is None or v.kind in ("ptr", "loop"):
                    continue  # a code pointer: lands only on address-taken points
                if v.kind == "const":
                    # jmp to a constant address (lea-taken label, non-PIE immediate): that one
                    if self.in_code(v.value):
                        reg.tables.append((ins.address, v.value, [v.value]))
                    continue
                found = self._table_from(v, slicer, ins)
            except _Budget:
                found = None
            if found is None:
                reg.unknown_jumps.append(ins.address)
            else:
                reg.tables.append(found)

    def _table_from(self, v: _Val, slicer: _Slicer, ins: Insn) -> tuple[int, int, list[int]] | None:
        """Recognise T + movsxd [T' + idx*4 + d] (in either order); read the table."""
        if v.kind != "add" or v.base is None or v.other is None:
            return None
        for const, load in ((v.base, v.other), (v.other, v.base)):
            if not (const.kind == "const" and load.kind == "tload" and load.base is not None
                    and load.base.kind == "const"):
                continue
            base = const.value
            table = load.base.value + load.disp
            lreg = self._regions.get(load.at[0])
            n = slicer.bound(load.index, lreg, load.at[1]) if lreg is not None else None
            if n is not None:
                try:
                    raw = self._read_data(table, 4 * n)
                except Exception:  # noqa: BLE001
                    return None
                targets = [base + e for (e,) in struct.iter_unpack("<i", raw)]
                if not all(self.in_code(t) for t in targets):
                    return None
                return (ins.address, table, sorted(set(targets)))
            # No bound found (glibc's assembly: index from bsf, ...): read entries while they
            # land in the function holding the jump (symbol, its .cold parts, its FDE range).
            # Every real entry lands there, so the real table is a prefix of what is read.
            spans = self._home_spans(ins.address)
            if not spans:
                return None
            targets = []
            for i in range(_MAX_TABLE):
                try:
                    (e,) = struct.unpack("<i", self._read_data(table + 4 * i, 4))
                except Exception:  # noqa: BLE001
                    break
                t = base + e
                if not any(lo <= t < hi for lo, hi in spans):
                    break
                targets.append(t)
            if not targets:
                return None
            return (ins.address, table, sorted(set(targets)))
        return None

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


# ---------------------------------------------------------------------------------------------
# Function analysis
# ---------------------------------------------------------------------------------------------

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
        instruction does not fall through, and every byte up to ``need_end`` is a nop/int3 that
        no symbol, FDE or known entry covers. None if not so."""
        if last.end != self.end or last.flow not in (Flow.JUMP, Flow.INDIRECT_JUMP, Flow.RETURN):
            return None
        reg = self.index.region_at(self.end)
        if reg is None:
            return None
        out = []
        k = reg.index(self.end)
        while k is not None and k < len(reg.insns) and (not out or out[-1].end < need_end):
            ins = reg.insns[k]
            if ins.instruction.mnemonic not in (Mnemonic.NOP, Mnemonic.INT3) or ins.end > reg.end:
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

        flags_dead = base["at_entry"] or flags_dead_after(insns, k)
        reason = f"jump: displaces {len(displaced)} instruction(s), {n} bytes"
        if padding:
            reason += f" (with {len(padding)} padding instruction(s) after the end of {func.name})"
        return SiteAnalysis(size=n, verdict=Verdict.JUMP, reason=reason, displaced=tuple(displaced),
                            flags_dead=flags_dead, padding=padding, **base)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------


def _reason_class(reason: str) -> str:
    """A short class for grouping refusal reasons in a summary."""
    r = reason
    table = [
        ("already patched", "already patched (busy)"),
        ("not the last displaced", "call/syscall not last"),
        ("only be reached from elsewhere", "instruction after a jump/return"),
        ("byte(s) of whole instructions before the end", "too close to the end of the function"),
        ("cross the end", "crosses the end of the function"),
        ("jump table of the jmp", "jump-table case inside"),
        ("unknown targets", "indirect jump with unknown targets"),
        ("landing pad", "exception landing pad inside"),
        ("lands at", "branch target inside"),
        ("code symbol starts", "another symbol starts inside"),
        ("relocated code pointer", "code pointer targets inside"),
        ("is taken at", "address taken inside"),
        ("can only be reached from elsewhere", "instruction after a jump/return"),
        ("int3", "int3/trap displaced"),
        ("traps", "int3/trap displaced"),
        ("cannot be relocated", "cannot be relocated"),
        ("cannot be re-aimed", "cannot be relocated"),
        ("reads its target through rsp", "cannot be relocated"),
        ("does not decode", "undecodable bytes"),
        ("no size", "symbol without size"),
        ("not in an executable", "not in code"),
        ("not an instruction boundary", "not an instruction boundary"),
    ]
    for needle, cls in table:
        if needle in r:
            return cls
    return r.split(":")[0][:50]


@dataclass(frozen=True)
class RefusedEntry:
    """A function entry that cannot take a jump: its site name, address, reason class, reason."""

    site: str
    address: int
    reason_class: str
    reason: str

    def to_json(self) -> dict:
        return {"site": self.site, "address": self.address, "class": self.reason_class, "reason": self.reason}


@dataclass
class CoverageReport:
    """How much of a module a jump probe can reach.

    ``entries``/``entries_jump``: function entries (unique addresses) and how many take a jump;
    ``refused``: refused entries per reason class; ``examples``: one refused site per class;
    ``refused_entries``: every refused entry, in address order.
    With ``all_boundaries``: ``boundaries``/``boundaries_jump`` over every instruction start of
    every function, and ``boundary_refused`` per class.
    """

    module: str
    entries: int = 0
    entries_jump: int = 0
    refused: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    refused_entries: list[RefusedEntry] = field(default_factory=list)
    boundaries: int = 0
    boundaries_jump: int = 0
    boundary_refused: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def entry_ratio(self) -> float:
        return self.entries_jump / self.entries if self.entries else 0.0

    @property
    def boundary_ratio(self) -> float:
        return self.boundaries_jump / self.boundaries if self.boundaries else 0.0

    def to_json(self) -> dict:
        out = {
            "module": self.module,
            "entries": self.entries,
            "entries_jump": self.entries_jump,
            "entries_refused": self.entries - self.entries_jump,
            "entry_ratio": round(self.entry_ratio, 5),
            "refused": dict(self.refused.most_common()),
            "examples": self.examples,
            "refused_sites": [e.to_json() for e in self.refused_entries],
            "seconds": round(self.seconds, 2),
        }
        if self.boundaries:
            out.update(
                boundaries=self.boundaries,
                boundaries_jump=self.boundaries_jump,
                boundary_ratio=round(self.boundary_ratio, 5),
                boundary_refused=dict(self.boundary_refused.most_common()),
            )
        return out


def coverage(module: "Module", memory=None, *, all_boundaries: bool = False) -> CoverageReport:
    """Analyse every function entry of ``module`` (and with ``all_boundaries`` every instruction
    boundary of every function). ``memory`` adds the live "already patched" check."""
    t0 = time.perf_counter()
    rep = CoverageReport(module=module.path)
    reader = memory.read if memory is not None else None
    idx = module_index(module)
    seen: set[int] = set()
    for func in module.functions():
        if func.address in seen:
            continue
        seen.add(func.address)
        fa = FunctionAnalysis(module, func, reader, index=idx)
        res = fa.analyse(func.address, site=f"{module.name}:{func.name}")
        rep.entries += 1
        if res.verdict is Verdict.JUMP:
            rep.entries_jump += 1
        else:
            cls = _reason_class(res.reason)
            rep.refused[cls] += 1
            rep.examples.setdefault(cls, f"{res.site}: {res.reason}")
            rep.refused_entries.append(RefusedEntry(res.site, func.address, cls, res.reason))
        if all_boundaries:
            for a in fa.addrs or [func.address]:
                r = res if a == func.address else fa.analyse(a, site=f"{a:#x}")
                rep.boundaries += 1
                if r.verdict is Verdict.JUMP:
                    rep.boundaries_jump += 1
                else:
                    rep.boundary_refused[_reason_class(r.reason)] += 1
    rep.seconds = time.perf_counter() - t0
    return rep
