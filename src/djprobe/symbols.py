"""ELF modules of a process (or of one file), their symbols, load bias, site specs and globs.

What this module answers:

* which ELF files a live process has mapped (``Symbols.from_process``) and where (the load bias),
  or the symbols of one file on disk (``Symbols.from_file``);
* the runtime address, bounds and aliases of every function symbol, from ``.symtab`` and
  ``.dynsym`` merged, plus a separate debug file when the binary is stripped (found by build-id
  or ``.gnu_debuglink`` under ``/usr/lib/debug``, or the embedded MiniDebugInfo ``.gnu_debugdata``);
* function bounds from ``.eh_frame`` FDEs (:mod:`djprobe.fde`) where no symbol covers the code:
  such a function is named ``sub_<file vaddr in hex>`` (``liblzma.so.5:sub_5a30``), as
  disassemblers do, so stripped executables and libraries can be probed at any address an FDE
  covers;
* what a site spec such as ``libc:malloc+0x4``, ``libc:str*`` or ``0x401000`` means
  (``Symbols.resolve``), including IFUNC symbols, which resolve to the implementation the process
  really calls rather than to the resolver;
* the reverse: ``describe(address)`` -> ``"libc.so.6:malloc+0x10"``.

Files are never trusted by path alone: a live process's maps paths are checked against the
device and inode the kernel reports, with ``/proc/PID/map_files`` as the fallback. Parsed symbol
tables are cached per file identity (device, inode, size, mtime), so loading a process whose
libraries were seen before costs little. Symbol tables and relocations are read with ``struct``
from the section data that pyelftools locates (pyelftools' per-symbol objects are too slow for
libc's debug symbol table).

Module names as users write them (``Symbols.module``), in order of precedence:

1. a name containing ``/`` is a path: it matches the module with that path, or the module that
   is the same file (device and inode) as that path;
2. an exact basename: ``libc.so.6``, ``python3.11``, ``[vdso]`` (also ``vdso``);
3. a library stem: ``NAME`` matches a basename ``NAME.so``, ``NAME.so.*`` or ``NAME-<digit>….so*``
   (``libc`` -> ``libc.so.6`` or ``libc-2.31.so``; never ``libcap.so.2`` or ``libcrypt.so.1``;
   ``libpython3.11`` -> ``libpython3.11.so.1.0`` but ``libpython3`` does not).

The first rule that matches decides; two different modules matching there is an error that lists
them.
"""

from __future__ import annotations

import bisect
import enum
import fnmatch
import functools
import gc
import io
import lzma
import os
import re
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ._sys.procfs import MapEntry, ProcessMemory, proc_dir, read_maps
from .arch import ARCHES, X86_64, Arch, check_elf_header, check_target
from .fde import FdeTable, fde_ranges
from .row_columns import RowColumns
from .reloc_table import RelocationTable
from .errors import DjprobeError, InvalidSiteError, SymbolNotFoundError

__all__ = [
    "SymbolKind",
    "Symbol",
    "Module",
    "Symbols",
    "ResolvedSite",
    "SiteSpec",
    "parse_site_spec",
    "clear_cache",
    "DEBUG_DIRS",
]

#: Roots searched for separate debug files (``.build-id/xx/yyyy.debug`` and debuglink names).
DEBUG_DIRS: list[str] = ["/usr/lib/debug"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# ELF constants
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC, _STT_SECTION, _STT_FILE, _STT_COMMON, _STT_TLS = range(7)
_STT_GNU_IFUNC = 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_STB_GNU_UNIQUE = 10
_SHN_UNDEF, _SHN_ABS, _SHN_COMMON, _SHN_XINDEX = 0, 0xFFF1, 0xFFF2, 0xFFFF
_SHF_EXECINSTR = 0x4
_PF_X = 0x1
_VERSYM_HIDDEN = 0x8000

_R_X86_64_64 = 1
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_R_X86_64_IRELATIVE = 37

_EM = {"EM_X86_64": 62, "EM_386": 3}
# IFUNC resolution per machine: the IRELATIVE type; (GOT slot types, the absolute-word type)
_IRELATIVE = {"EM_X86_64": 37, "EM_386": 42}
_GOT_TYPES = {"EM_X86_64": ((6, 7), 1), "EM_386": ((6, 7), 1)}
_AT_PHDR = 3
_AT_SYSINFO_EHDR = 33

_BINDINGS = {_STB_LOCAL: "LOCAL", _STB_GLOBAL: "GLOBAL", _STB_WEAK: "WEAK", _STB_GNU_UNIQUE: "UNIQUE"}


class SymbolKind(enum.Enum):
    FUNC = "func"
    IFUNC = "ifunc"
    OBJECT = "object"
    OTHER = "other"  # NOTYPE (assembly labels), TLS, ...


_CODE_KINDS = (SymbolKind.FUNC, SymbolKind.IFUNC)


def _kind_of(st_type: int) -> SymbolKind:
    if st_type == _STT_FUNC:
        return SymbolKind.FUNC
    if st_type == _STT_GNU_IFUNC:
        return SymbolKind.IFUNC
    if st_type == _STT_OBJECT:
        return SymbolKind.OBJECT
    return SymbolKind.OTHER


@dataclass(frozen=True, slots=True)  # tens of thousands per process: no per-symbol dict
class Symbol:
    """One symbol of a module, at its runtime address (file vaddr + module bias)."""

    name: str  # without version: "memcpy"
    address: int
    size: int
    kind: SymbolKind
    module: "Module" = field(compare=False, repr=False)
    binding: str = "GLOBAL"  # "LOCAL", "GLOBAL", "WEAK", "UNIQUE"
    version: str | None = None  # "GLIBC_2.14" for a versioned dynamic symbol
    version_hidden: bool = False  # True for a non-default version ("memcpy@GLIBC_2.2.5")
    from_eh_frame: bool = False  # no symbol: bounds of an .eh_frame FDE, named sub_<vaddr>

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def vaddr(self) -> int:
        """The address in the ELF file (runtime address - bias)."""
        return self.address - self.module.bias

    @property
    def versioned_name(self) -> str:
        """``memcpy@@GLIBC_2.14`` (default version), ``memcpy@GLIBC_2.2.5`` (other), or the name."""
        if self.version is None:
            return self.name
        return f"{self.name}{'@' if self.version_hidden else '@@'}{self.version}"

    @property
    def _rank(self) -> tuple:
        return _compute_rank(self)  # not cached: a slotted Symbol has no dict to cache it in

    @property
    def display_name(self) -> str:
        """The name a user would write: the plain name, versioned only for a non-default version."""
        return f"{self.name}@{self.version}" if self.version_hidden and self.version else self.name


def _alias_rank(sym: Symbol) -> tuple:
    """Sort key choosing among aliases at one address: the 'public' name first (lower is better).

    Code before data, FUNC before IFUNC (at an IFUNC's address lies its resolver: a FUNC alias
    names that code without suggesting the implementation), global before local, default version
    before hidden, no leading underscore, shorter, then alphabetical (deterministic).
    """
    return sym._rank


def _compute_rank(sym: Symbol) -> tuple:
    return (
        sym.kind not in _CODE_KINDS,
        sym.kind is SymbolKind.IFUNC,
        sym.binding == "LOCAL",
        sym.version_hidden,
        sym.name.startswith("_"),
        len(sym.name),
        sym.name,
    )


# ---------------------------------------------------------------------------------------------
# ELF parsing (bias-independent, cached per file identity)
# ---------------------------------------------------------------------------------------------


_SYMBOL_SETTERS = tuple(getattr(Symbol, name).__set__ for name in (
    "name", "address", "size", "kind", "module", "binding", "version", "version_hidden", "from_eh_frame"))


def _make_symbol(name: str, address: int, size: int, kind: SymbolKind, module: "Module", binding: str,
                 version: str | None, version_hidden: bool, from_eh_frame: bool) -> Symbol:
    """The same as ``Symbol(...)``, without the frozen dataclass's per-field ``__setattr__`` cost
    (the slots are filled through their descriptors)."""
    sym = object.__new__(Symbol)
    for setter, value in zip(_SYMBOL_SETTERS, (name, address, size, kind, module, binding, version, version_hidden,
                                               from_eh_frame)):
        setter(sym, value)
    return sym


@dataclass(frozen=True)
class _Load:
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int


# raw symbol: (name, version, hidden, value, size, st_type, binding, in_exec_section)
_RawSym = tuple
_RAW_SYM_DTYPES = (None, None, "?", "u8", "u8", "u1", "u1", "?")


class _ElfInfo:
    """What one ELF file says, independent of where it is loaded. Shared by all modules of it."""

    def __init__(self, fd: int | None, data: bytes | None, label: str) -> None:
        # Either an open file descriptor (owned) or an in-memory image (the vdso).
        self.fd = fd
        self.label = label
        self._lock = threading.Lock()
        stream = io.BytesIO(data) if data is not None else io.BufferedReader(_FdStream(fd), 1 << 16)
        e = _Elf(stream)
        elf = e.elf
        self.elfclass = elf.elfclass
        self.machine = elf.header["e_machine"]
        #: the mode of its code (x86-64 when the file says something else: callers checked it)
        self.arch: Arch = ARCHES.get((1 if elf.elfclass == 32 else 2, _EM.get(self.machine, 0)), X86_64)
        self.e_type = elf.header["e_type"]
        self.loads: list[_Load] = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                self.loads.append(
                    _Load(seg["p_vaddr"], seg["p_memsz"], seg["p_offset"], seg["p_filesz"], seg["p_flags"])
                )
        self.loads.sort(key=lambda l: l.vaddr)
        self.build_id = _build_id(e)
        self.debug_file: str | None = None
        self.symbols: Sequence[_RawSym] = []
        # dynamic symbol table by index (for relocations): (name, version, hidden, defined)
        self.dynsym: Sequence[tuple[str, str | None, bool, bool]] = []
        self._rela: RelocationTable | None = None  # (r_offset, type, sym index, addend) columns
        self._rela_sections: list[tuple[int, int, int]] = []  # (offset, size, entsize) in the file
        self._rel_sections: list[tuple[int, int, int]] = []  # SHT_REL (i386): the addend in the place
        self._stream = stream if data is not None else None
        self._eh_frame: tuple[int, int, int] | None = None  # (file offset, size, vaddr)
        self._fdes: FdeTable | None = None
        eh = e.by_name.get(".eh_frame")
        if eh is not None and eh["sh_type"] == "SHT_PROGBITS" and eh["sh_addr"]:
            self._eh_frame = (eh["sh_offset"], eh["sh_size"], eh["sh_addr"])
        # PLT stubs have FDEs too, but they are not functions (objdump names them foo@plt)
        self.plt_ranges: list[tuple[int, int]] = [
            (sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]) for sec in e.secs if sec.name.startswith(".plt")
        ]
        #: the whole ELF image when it is not a file (the vDSO): what ``read_file`` reads
        self.image: bytes | None = data

        dyn_syms = self._read_dynsym(e)
        tab_syms: list[_RawSym] = []
        if ".symtab" in e.by_name:
            tab_syms = _read_symtab(e, e.by_name[".symtab"])
        else:
            debug = self._find_debug_elf(e)
            if debug is not None:
                tab_syms = _read_symtab(debug, debug.by_name[".symtab"])
        # Merge: dynsym entries first (they carry versions); a .symtab entry with the same
        # (address, name) is the same symbol.
        seen: set[tuple[int, str]] = set()
        merged: list[_RawSym] = []
        for s in dyn_syms + tab_syms:
            key = (s[3], s[0])
            if key in seen:
                continue
            seen.add(key)
            merged.append(s)
        self.symbols = RowColumns(merged, _RAW_SYM_DTYPES)  # kept for later symbol tables: as columns
        for sec in e.secs:
            if sec["sh_type"] == "SHT_RELA" and sec["sh_flags"] & 0x2:  # SHF_ALLOC
                self._rela_sections.append((sec["sh_offset"], sec["sh_size"], sec["sh_entsize"] or 24))
            elif sec["sh_type"] == "SHT_REL" and sec["sh_flags"] & 0x2 and elf.elfclass == 32:
                self._rel_sections.append((sec["sh_offset"], sec["sh_size"], sec["sh_entsize"] or 8))

    # -- symbol tables ---------------------------------------------------------------------

    def _read_dynsym(self, elf: "_Elf") -> list[_RawSym]:
        sec = elf.by_name.get(".dynsym")
        if sec is None:
            return []
        versions = _dyn_versions(elf)
        out: list[_RawSym] = []
        table = []
        for index, raw in enumerate(_iter_raw_syms(elf, sec)):
            name, value, size, st_type, bind, shndx, exec_sec = raw
            version, hidden = versions.get(index, (None, False))
            defined = shndx != _SHN_UNDEF
            table.append((name, version, hidden, defined))
            if not _wanted(name, st_type, shndx):
                continue
            if "@" in name:
                name, version, hidden = _split_version(name)
            out.append((name, version, hidden, value, size, st_type, bind, exec_sec))
        self.dynsym = RowColumns(table, (None, None, "?", "?"))
        return out

    def _find_debug_elf(self, elf: "_Elf") -> "_Elf | None":
        """A separate debug file (build-id or debuglink) or the MiniDebugInfo, with a .symtab."""
        candidates: list[str] = []
        if self.build_id:
            for root in DEBUG_DIRS:
                candidates.append(os.path.join(root, ".build-id", self.build_id[:2], self.build_id[2:] + ".debug"))
        link = elf.by_name.get(".gnu_debuglink")
        link_name = link_crc = None
        if link is not None:
            data = link.data()
            nul = data.find(b"\0")
            if nul > 0:
                link_name = os.fsdecode(data[:nul])
                crc_at = (nul + 4) & ~3
                if len(data) >= crc_at + 4:
                    (link_crc,) = struct.unpack_from("<I", data, crc_at)
                if self.label.startswith("/"):
                    d = os.path.dirname(os.path.realpath(self.label))
                    candidates += [os.path.join(d, link_name), os.path.join(d, ".debug", link_name)]
                    candidates += [os.path.join(root + d, link_name) for root in DEBUG_DIRS]
        for path in candidates:
            if os.path.realpath(path) == os.path.realpath(self.label):
                continue
            try:
                f = open(path, "rb")
            except OSError:
                continue
            try:
                data = f.read()
            finally:
                f.close()
            try:
                debug = _Elf(io.BytesIO(data))
            except (ELFError, Exception):  # noqa: BLE001 - a broken debug file is just not used
                continue
            bid = _build_id(debug)
            if self.build_id and bid:
                if bid != self.build_id:
                    continue
            elif link_crc is not None and path.endswith(link_name or "\0"):
                if zlib.crc32(data) != link_crc:
                    continue
            else:
                continue
            if ".symtab" not in debug.by_name:
                continue
            self.debug_file = path
            return debug
        gdd = elf.by_name.get(".gnu_debugdata")
        if gdd is not None:
            try:
                mini = _Elf(io.BytesIO(lzma.decompress(gdd.data())))
                if ".symtab" in mini.by_name:
                    self.debug_file = f"{self.label}[.gnu_debugdata]"
                    return mini
            except (lzma.LZMAError, ELFError, Exception):  # noqa: BLE001
                pass
        return None

    # -- .eh_frame function bounds (lazy) ------------------------------------------------

    def fde_ranges(self) -> FdeTable:
        """The code ranges of the FDEs of ``.eh_frame`` (file vaddrs, sorted; empty without one),
        kept as columns (iterated as ``FdeRange`` objects)."""
        with self._lock:
            if self._fdes is None:
                ranges = []
                if self._eh_frame is not None:
                    off, size, vaddr = self._eh_frame
                    data = self._stream_read(off, size)
                    ranges = fde_ranges(data, vaddr)
                self._fdes = FdeTable(ranges)
            return self._fdes

    def _stream_read(self, offset: int, size: int) -> bytes:
        if self.fd is None:
            assert self._stream is not None
            self._stream.seek(offset)
            return self._stream.read(size)
        return os.pread(self.fd, size, offset)

    # -- relocations (lazy: only IFUNC resolution needs them) -----------------------------

    def relocations(self) -> RelocationTable:
        """(r_offset, type, symbol index, addend) of every allocated relocation, as columns."""
        with self._lock:
            if self._rela is None:
                if self.elfclass == 32:  # REL, i386 types: djprobe.symbols32
                    from .symbols32 import rel_relocations

                    self._rela = RelocationTable.from_rows(rel_relocations(self))
                elif self.elfclass == 64:
                    self._rela = RelocationTable.from_rela64(self.read_at(off, size) for off, size, _ in self._rela_sections)
                else:
                    self._rela = RelocationTable.from_rows(())
            return self._rela

    # -- file access ----------------------------------------------------------------------

    def read_at(self, offset: int, size: int) -> bytes:
        if self.fd is None:
            assert self._stream is not None
            with self._lock:
                self._stream.seek(offset)
                return self._stream.read(size)
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _Elf:
    """A pyelftools ELFFile with its section list read once (pyelftools re-parses otherwise)."""

    def __init__(self, stream) -> None:
        self.elf = ELFFile(stream)
        self.secs = list(self.elf.iter_sections())
        self.by_name: dict = {}
        for sec in self.secs:
            self.by_name.setdefault(sec.name, sec)
        self.exec_idx = {i for i, sec in enumerate(self.secs) if sec["sh_flags"] & _SHF_EXECINSTR}


class _FdStream(io.RawIOBase):
    """A seekable read-only stream over a file descriptor (pread; the fd is not consumed)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = os.fstat(self._fd).st_size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:  # type: ignore[override]
        data = os.pread(self._fd, len(b), self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _build_id(elf: "_Elf") -> str | None:
    for sec in elf.secs:
        if sec["sh_type"] == "SHT_NOTE":
            try:
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
            except (ELFError, Exception):  # noqa: BLE001 - NOBITS notes in debug files, odd notes
                continue
    return None


def _wanted(name: str, st_type: int, shndx: int) -> bool:
    if not name or shndx in (_SHN_UNDEF, _SHN_ABS, _SHN_COMMON):
        return False
    return st_type in (_STT_NOTYPE, _STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC, _STT_TLS)


def _split_version(name: str) -> tuple[str, str | None, bool]:
    if "@@" in name:
        base, _, ver = name.partition("@@")
        return base, ver or None, False
    base, _, ver = name.partition("@")
    return base, ver or None, True


def _iter_raw_syms(elf: "_Elf", sec) -> Iterable[tuple[str, int, int, int, int, int, bool]]:
    """(name, value, size, type, bind, shndx, in_exec_section) for every entry of a symbol table."""
    data = sec.data()
    strtab = elf.secs[sec["sh_link"]].data()
    exec_secs = elf.exec_idx
    if elf.elf.elfclass == 64:
        fmt, entsize = "<IBBHQQ", 24
        rows = struct.iter_unpack(fmt, data[: len(data) // entsize * entsize])
        it = ((n, info, shndx, value, size) for n, info, _other, shndx, value, size in rows)
    else:
        fmt, entsize = "<IIIBBH", 16
        rows = struct.iter_unpack(fmt, data[: len(data) // entsize * entsize])
        it = ((n, info, shndx, value, size) for n, value, size, info, _other, shndx in rows)
    cache: dict[int, str] = {}
    for st_name, info, shndx, value, size in it:
        name = cache.get(st_name)
        if name is None:
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name : end if end >= 0 else len(strtab)].decode("utf-8", "replace")
            cache[st_name] = name
        yield name, value, size, info & 0xF, info >> 4, shndx, shndx in exec_secs


def _read_symtab(elf: "_Elf", sec) -> list[_RawSym]:
    out = []
    for name, value, size, st_type, bind, shndx, exec_sec in _iter_raw_syms(elf, sec):
        if not _wanted(name, st_type, shndx):
            continue
        version, hidden = None, False
        if "@" in name:
            name, version, hidden = _split_version(name)
        out.append((name, version, hidden, value, size, st_type, bind, exec_sec))
    return out


def _dyn_versions(elf: "_Elf") -> dict[int, tuple[str, bool]]:
    """dynsym index -> (version name, hidden) from .gnu.version + verdef/verneed."""
    versym = verdef = verneed = None
    for sec in elf.secs:
        t = sec["sh_type"]
        if t == "SHT_GNU_versym":
            versym = sec
        elif t == "SHT_GNU_verdef":
            verdef = sec
        elif t == "SHT_GNU_verneed":
            verneed = sec
    if versym is None:
        return {}
    names: dict[int, str] = {}
    try:
        if verdef is not None:
            for vd, auxes in verdef.iter_versions():
                if vd["vd_flags"] & 0x1:  # VER_FLG_BASE: the file's own name, not a version
                    continue
                for aux in auxes:
                    names[vd["vd_ndx"]] = aux.name
                    break
        if verneed is not None:
            for _vn, auxes in verneed.iter_versions():
                for aux in auxes:
                    names[aux["vna_other"]] = aux.name
    except (ELFError, Exception):  # noqa: BLE001 - malformed version sections: no versions
        return {}
    data = versym.data()
    out: dict[int, tuple[str, bool]] = {}
    for index, (v,) in enumerate(struct.iter_unpack("<H", data[: len(data) // 2 * 2])):
        ndx = v & 0x7FFF
        if ndx >= 2 and ndx in names:
            out[index] = (names[ndx], bool(v & _VERSYM_HIDDEN))
    return out


_CACHE: "OrderedDict[tuple, _ElfInfo]" = OrderedDict()
_CACHE_MAX = 256
_CACHE_LOCK = threading.Lock()


_MODULES: "OrderedDict[tuple, Module]" = OrderedDict()
_MODULES_MAX = 64


def clear_cache() -> None:
    """Forget every parsed ELF file (tests; or to re-read debug files installed meanwhile)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _MODULES.clear()


def _intern_module(m: "Module") -> "Module":
    """The same file at the same bias: reuse the Module (and its built tables) loaded before."""
    if not m.file_backed:
        return m
    key = (id(m._info), m.path, m.bias, m.is_main)  # the cached Module keeps _info (and its id) alive
    with _CACHE_LOCK:
        cached = _MODULES.get(key)
        if cached is not None and cached._info is m._info:
            _MODULES.move_to_end(key)
            return cached
        _MODULES[key] = m
        while len(_MODULES) > _MODULES_MAX:
            _MODULES.popitem(last=False)
        return m


def _elf_info_from_fd(fd: int, label: str) -> _ElfInfo | None:
    """Parse (or take from the cache) the ELF file open at fd. Takes ownership of fd.

    Returns None (and closes fd) if it is not an ELF file this module understands.
    """
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        info = _CACHE.get(key)
        if info is not None:
            _CACHE.move_to_end(key)
    if info is not None:
        os.close(fd)
        return info
    try:
        if os.pread(fd, 4, 0) != b"\x7fELF":
            os.close(fd)
            return None
        info = _ElfInfo(fd, None, label)
    except (ELFError, struct.error, ValueError, OSError, KeyError, AttributeError, TypeError):
        os.close(fd)
        return None
    with _CACHE_LOCK:
        _CACHE[key] = info
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)  # still open while some Module uses it
    return info


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Module:
    """One ELF file loaded at ``bias`` (runtime address = file vaddr + bias)."""

    def __init__(
        self,
        info: _ElfInfo,
        path: str,
        bias: int,
        is_main: bool,
        *,
        file_backed: bool = True,
    ) -> None:
        self._info = info
        self.path = path
        self.name = path if path.startswith("[") else os.path.basename(path)
        self.bias = bias
        self.is_main = is_main
        self.file_backed = file_backed
        self._built = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Module {self.name} bias={self.bias:#x}{' main' if self.is_main else ''}>"

    @property
    def build_id(self) -> str | None:
        return self._info.build_id

    @property
    def arch(self) -> Arch:
        """The mode of the module's code (:data:`djprobe.arch.X86_64` or ``I386``)."""
        return self._info.arch

    @property
    def image(self) -> bytes | None:
        """The ELF image of a module that is not a file (the vDSO), else None."""
        return self._info.image

    @property
    def debug_file(self) -> str | None:
        """The separate debug file whose .symtab was used, if any."""
        return self._info.debug_file

    @property
    def start(self) -> int:
        """Lowest runtime address of the module's PT_LOAD segments (page-aligned)."""
        if not self._info.loads:
            return self.bias
        return (self._info.loads[0].vaddr & ~(_PAGE - 1)) + self.bias

    @property
    def end(self) -> int:
        """End of the highest PT_LOAD segment (runtime, page-rounded)."""
        if not self._info.loads:
            return self.bias
        hi = max(l.vaddr + l.memsz for l in self._info.loads)
        return ((hi + _PAGE - 1) & ~(_PAGE - 1)) + self.bias

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.start <= address < self.end

    # -- tables (built on first use) ------------------------------------------------------

    def _build(self) -> None:
        with self._lock:
            if self._built:
                return
            # tens of thousands of new objects: keep the cyclic GC from scanning the heap meanwhile
            enabled = gc.isenabled()
            gc.disable()
            try:
                self._build_tables()
            finally:
                if enabled:
                    gc.enable()

    def _build_tables(self) -> None:
        bias = self.bias
        exec_ranges = [(l.vaddr, l.vaddr + l.memsz) for l in self._info.loads if l.flags & _PF_X]
        all_syms: list[Symbol] = []
        by_name: dict[str, list[Symbol]] = {}
        funcs: list[Symbol] = []
        objs: list[Symbol] = []
        starts: set[int] = set()
        kinds = {_STT_FUNC: SymbolKind.FUNC, _STT_GNU_IFUNC: SymbolKind.IFUNC, _STT_OBJECT: SymbolKind.OBJECT}
        other = SymbolKind.OTHER
        for name, version, hidden, value, size, st_type, bind, exec_sec in self._info.symbols:
            if st_type == _STT_TLS:
                continue  # a TLS offset, not an address in this module
            kind = kinds.get(st_type, other)
            address = value + bias
            # the same as Symbol(...), without the frozen dataclass's per-field setattr cost
            sym = _make_symbol(name, address, size, kind, self, _BINDINGS.get(bind, "GLOBAL"), version, hidden, False)
            all_syms.append(sym)
            lst = by_name.get(name)
            if lst is None:
                by_name[name] = [sym]
            else:
                lst.append(sym)
            if kind is other:
                if (exec_sec or any(lo <= value < hi for lo, hi in exec_ranges)) and not name.startswith(
                    (".annobin", "$")
                ):
                    starts.add(address)  # assembly label in code
            elif kind is SymbolKind.OBJECT:
                if size > 0:
                    objs.append(sym)
            else:
                starts.add(address)
                if size > 0:
                    funcs.append(sym)
        for lst in by_name.values():
            if len(lst) > 1:
                lst.sort(key=lambda s: (s.version_hidden, s.address, _alias_rank(s)))
        funcs.sort(key=lambda s: s.address)
        funcs = self._with_fde_functions(funcs, sorted(starts), exec_ranges, by_name, all_syms, starts)
        dedup: list[Symbol] = []
        seen: set[tuple[int, str]] = set()
        for s in funcs:
            key = (s.address, s.name)
            if key not in seen:
                seen.add(key)
                dedup.append(s)
        objs.sort(key=lambda s: s.address)
        cold: dict[str, list[Symbol]] = {}
        for s in dedup:
            if ".cold" in s.name:
                m = _COLD_RE.match(s.name)
                if m:
                    cold.setdefault(m.group(1), []).append(s)
        self._all = all_syms
        # a name of one symbol maps to the symbol itself (no one-element list per name: 65,000 of
        # them in a whole python3), several to a tuple; read through _named()
        self._by_name: dict[str, Symbol | tuple[Symbol, ...]] = {
            name: lst[0] if len(lst) == 1 else tuple(lst) for name, lst in by_name.items()}
        self._funcs = dedup
        self._func_starts = [s.address for s in dedup]
        self._func_maxend = _prefix_max_end(dedup)
        self._objs = objs
        self._obj_starts = [s.address for s in objs]
        self._obj_maxend = _prefix_max_end(objs)
        self._starts = sorted(starts)
        self._cold = cold
        self._built = True

    def _with_fde_functions(
        self,
        funcs: list[Symbol],
        sorted_starts: list[int],
        exec_ranges: list[tuple[int, int]],
        by_name: dict[str, list[Symbol]],
        all_syms: list[Symbol],
        starts: set[int],
    ) -> list[Symbol]:
        """``funcs`` (sorted) plus a ``sub_<vaddr>`` function for every FDE whose start no
        function symbol covers; its end is cut at the next code symbol that starts inside."""
        bias = self.bias
        fdes = self._info.fde_ranges()
        if not fdes:
            return funcs
        func_starts = [f.address for f in funcs]
        maxend = _prefix_max_end(funcs)
        added: list[Symbol] = []
        for r in fdes:
            if not any(lo <= r.start < hi for lo, hi in exec_ranges):
                continue
            if r.signal_frame or any(lo <= r.start < hi for lo, hi in self._info.plt_ranges):
                continue
            address = r.start + bias
            if _containing(funcs, func_starts, maxend, address) is not None:
                continue
            end = r.end + bias
            k = bisect.bisect_right(sorted_starts, address)
            if k < len(sorted_starts) and sorted_starts[k] < end:
                end = sorted_starts[k]
            if added and added[-1].end > address:
                continue  # overlapping FDEs: the first one stands
            sym = _make_symbol(f"sub_{r.start:x}", address, end - address, SymbolKind.FUNC, self, "LOCAL", None, False, True)
            added.append(sym)
            by_name.setdefault(sym.name, []).append(sym)
            all_syms.append(sym)
            starts.add(address)
        if not added:
            return funcs
        return sorted(funcs + added, key=lambda s: s.address)

    # -- queries --------------------------------------------------------------------------

    def functions(self) -> list[Symbol]:
        """FUNC and IFUNC symbols with size > 0 (.symtab and .dynsym merged), and ``sub_<vaddr>``
        functions from ``.eh_frame`` where no symbol covers an FDE's code; sorted by address."""
        self._build()
        return list(self._funcs)

    def all_symbols(self) -> list[Symbol]:
        """Every defined symbol (code, data, labels; not TLS), in table order."""
        self._build()
        return list(self._all)

    def symbols(self, name: str) -> list[Symbol]:
        """Symbols named ``name``; ``name@VER`` / ``name@@VER`` select a version (``@@``: default).

        Default-version and unversioned symbols come before hidden versions.
        """
        self._build()
        if "@" in name:
            base, version, hidden = _split_version(name)
            default_only = "@@" in name
            return [
                s
                for s in self._named(base)
                if s.version == version and (not default_only or not s.version_hidden)
            ]
        return list(self._named(name))

    def _named(self, name: str) -> tuple[Symbol, ...]:
        found = self._by_name.get(name)
        if found is None:
            return ()
        return (found,) if isinstance(found, Symbol) else found

    def function_at(self, address: int) -> Symbol | None:
        """The function whose [address, end) contains ``address``: the one starting closest below;
        among several starting there, the preferred alias (public name; see ``_alias_rank``)."""
        self._build()
        return _containing(self._funcs, self._func_starts, self._func_maxend, address)

    def object_at(self, address: int) -> Symbol | None:
        """The data (OBJECT) symbol whose [address, end) contains ``address``."""
        self._build()
        return _containing(self._objs, self._obj_starts, self._obj_maxend, address)

    def symbol_starts(self) -> list[int]:
        """Sorted runtime start addresses of every code symbol: FUNC/IFUNC of any size (aliases,
        size 0) and untyped labels that lie in code."""
        self._build()
        return list(self._starts)

    def cold_parts(self, func: Symbol) -> list[Symbol]:
        """The out-of-line parts gcc split from ``func``: ``<name>.cold`` and ``<name>.cold.N``."""
        self._build()
        return list(self._cold.get(func.name, ()))

    def executable_ranges(self) -> list[tuple[int, int]]:
        """Runtime [start, end) of the PT_LOAD segments with PF_X."""
        return [
            (l.vaddr + self.bias, l.vaddr + l.memsz + self.bias) for l in self._info.loads if l.flags & _PF_X
        ]

    def is_executable(self, address: int) -> bool:
        return any(lo <= address < hi for lo, hi in self.executable_ranges())

    def file_offset(self, address: int, size: int = 1) -> int | None:
        """The file offset of runtime ``address`` if [address, address+size) is file-backed."""
        vaddr = address - self.bias
        for l in self._info.loads:
            if l.vaddr <= vaddr and vaddr + size <= l.vaddr + l.filesz:
                return l.offset + (vaddr - l.vaddr)
        return None

    def read_file(self, address: int, size: int) -> bytes:
        """The bytes at runtime ``address`` as they are in the file on disk; for the vDSO, which
        is no file, as they are in the kernel's image (see :func:`_vdso_reference`)."""
        off = self.file_offset(address, size)
        if off is None or (not self.file_backed and self._info.image is None):
            raise InvalidSiteError(
                f"{address:#x}+{size} is not file-backed in {self.name}", address=address
            )
        data = self._info.read_at(off, size)
        if len(data) != size:
            raise InvalidSiteError(f"short read of {self.path} at offset {off:#x}", address=address)
        return data

    def describe(self, address: int) -> str:
        """``libc.so.6:malloc+0x10``, ``libc.so.6:malloc`` at offset 0, ``libc.so.6:0x1234`` (file
        vaddr) where no function or data symbol covers the address."""
        sym = self.function_at(address) or self.object_at(address)
        if sym is None:
            return f"{self.name}:{address - self.bias:#x}"
        off = address - sym.address
        return f"{self.name}:{sym.display_name}" + (f"+{off:#x}" if off else "")


_COLD_RE = re.compile(r"^(.*)\.cold(?:\.\d+)?$")


def _prefix_max_end(syms: list[Symbol]) -> "array[int]":
    """The largest end of ``syms[:i + 1]`` for every i (an array of words: no integer object per
    symbol kept)."""
    out, m = array("Q"), 0
    for s in syms:
        e = s.address + s.size
        if e > m:
            m = e
        out.append(m)
    return out


def _containing(syms: list[Symbol], starts: list[int], maxend: Sequence[int], address: int) -> Symbol | None:
    i = bisect.bisect_right(starts, address) - 1
    while i >= 0 and maxend[i] > address:
        s = syms[i]
        if s.end > address:
            # several may start at s.address: choose the preferred alias among those containing it
            best = s
            j = i - 1
            while j >= 0 and syms[j].address == s.address:
                if syms[j].end > address and _alias_rank(syms[j]) < _alias_rank(best):
                    best = syms[j]
                j -= 1
            return best
        i -= 1
    return None


# ---------------------------------------------------------------------------------------------
# Site specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """A parsed site spec. Exactly one of ``symbol`` and ``address`` is set.

    ``address`` with ``module`` set is a file virtual address in that module (the form
    ``describe`` prints when no symbol covers an address: ``libc.so.6:0x1234``); without a module
    it is a runtime address.
    """

    module: str | None
    symbol: str | None
    address: int | None
    offset: int = 0

    @property
    def is_glob(self) -> bool:
        return self.symbol is not None and _is_glob(self.symbol)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _parse_number(text: str, what: str) -> int:
    try:
        if text[:2].lower() == "0x":
            if not re.fullmatch(r"[0-9a-fA-F]+(_?[0-9a-fA-F]+)*", text[2:] or "-"):
                raise ValueError
            return int(text[2:], 16)
        if not text.isdigit() or not text.isascii():
            raise ValueError
        return int(text, 10)
    except ValueError:
        raise InvalidSiteError(f"bad {what} {text!r}", reason=f"bad {what} {text!r}") from None


def parse_site_spec(text: str) -> SiteSpec:
    """Parse ``0xADDR``, ``SYMBOL``, ``MODULE:SYMBOL``, ``MODULE:0xVADDR``, each with ``+OFFSET``.

    MODULE may be a path (it may contain ``/``). OFFSET is hex (``0x10``) or decimal (``16``).
    SYMBOL may be a glob (``*``, ``?``, ``[...]``). Errors raise InvalidSiteError saying what is wrong.
    """
    if not isinstance(text, str):
        raise InvalidSiteError(f"a site spec must be a string, not {type(text).__name__}")
    spec = text.strip()

    def bad(why: str) -> InvalidSiteError:
        return InvalidSiteError(f"invalid site {text!r}: {why}", reason=why)

    if not spec:
        raise bad("empty site")
    if any(c.isspace() for c in spec):
        raise bad("white space inside the site")
    module, colon, rest = spec.rpartition(":")
    if colon:
        if not module:
            raise bad("empty module")
    else:
        module = None
    sym, plus, off_text = rest.partition("+")
    offset = 0
    if plus:
        if not off_text:
            raise bad("empty offset after '+'")
        try:
            offset = _parse_number(off_text, "offset")
        except InvalidSiteError as exc:
            raise bad(exc.reason) from None
    if not sym:
        raise bad("empty symbol")
    if sym[:2].lower() == "0x":
        try:
            address = _parse_number(sym, "address")
        except InvalidSiteError as exc:
            raise bad(exc.reason) from None
        return SiteSpec(module, None, address, offset)
    if sym[0].isdigit():
        raise bad(f"bad symbol {sym!r} (addresses are written in hex, e.g. 0x401000)")
    return SiteSpec(module, sym, None, offset)


@dataclass(frozen=True)
class ResolvedSite:
    """One concrete probe site."""

    spec: str  # what the user wrote; for a glob, "module:name" of this match
    address: int  # runtime address
    module: Module | None  # None only for an address in anonymous executable memory (JIT code)
    function: Symbol | None  # the containing function (the implementation for an IFUNC)
    offset: int  # address - function.address (0 without a function)
    via_ifunc: str | None = None  # the IFUNC symbol it came through ("strlen"), if any

    @property
    def name(self) -> str:
        """``libc.so.6:malloc`` or ``libc.so.6:malloc+0x4`` (or the module:vaddr / hex address)."""
        if self.module is None:
            return f"{self.address:#x}"
        if self.function is None:
            return f"{self.module.name}:{self.address - self.module.bias:#x}"
        off = self.address - self.function.address
        return f"{self.module.name}:{self.function.display_name}" + (f"+{off:#x}" if off else "")


# ---------------------------------------------------------------------------------------------
# Symbols of a process or a file
# ---------------------------------------------------------------------------------------------


def _parse_dev(dev: str) -> int | None:
    try:
        major, minor = dev.split(":")
        return os.makedev(int(major, 16), int(minor, 16))
    except (ValueError, AttributeError):
        return None


def _stem_match(base: str, stem: str) -> bool:
    if base == stem + ".so" or base.startswith(stem + ".so."):
        return True
    if base.startswith(stem + ".") and base.endswith(".so") and "." not in stem:
        return True  # a Python extension module: _json.cpython-311-x86_64-linux-gnu.so, x.abi3.so
    rest = base[len(stem) :] if base.startswith(stem + "-") else ""
    return len(rest) > 1 and rest[1].isdigit() and (".so." in rest or rest.endswith(".so"))


class Symbols:
    """The modules of a live process (``from_process``) or of one file (``from_file``)."""

    def __init__(
        self,
        modules: list[Module],
        *,
        pid: int | None = None,
        maps: list[MapEntry] | None = None,
        memory: ProcessMemory | None = None,
        ifunc_resolver: Callable[[Symbol], int | None] | None = None,
    ) -> None:
        self.modules = modules
        self.pid = pid
        self.maps = maps or []
        self.skipped: list[tuple[str, str]] = []  # (path, why) of mapped files not loaded
        self._memory = memory
        self._own_memory = False
        self.ifunc_resolver = ifunc_resolver
        self._sorted = sorted(modules, key=lambda m: m.start)
        self._starts = [m.start for m in self._sorted]
        self._ifunc_cache: dict[tuple[int, int], int] = {}
        #: IFUNC matches of the last glob resolve() that were left out (implementation unknown)
        self.unresolved: list[Symbol] = []

    @property
    def live(self) -> bool:
        return self.pid is not None

    @property
    def main(self) -> Module | None:
        return self.modules[0] if self.modules and self.modules[0].is_main else None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Symbols":
        """One module: the ELF file at ``path``, bias 0, is_main=True.

        Raises SymbolNotFoundError (cannot open), InvalidSiteError (not ELF),
        UnsupportedTargetError (not x86-64 code)."""
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SymbolNotFoundError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            check_elf_header(os.pread(fd, 20, 0), path)
        except BaseException:
            os.close(fd)
            raise
        real = os.path.realpath(path)
        info = _elf_info_from_fd(fd, real)
        if info is None:
            raise InvalidSiteError(f"{path} is not an ELF file")
        return cls([Module(info, real, 0, True)])

    @classmethod
    def from_process(
        cls,
        pid: int,
        memory: ProcessMemory | None = None,
        ifunc_resolver: Callable[[Symbol], int | None] | None = None,
    ) -> "Symbols":
        """Every ELF file mapped in process ``pid`` (with executable code), main executable first.

        Files are opened by their maps path only if that is still the mapped file (same device
        and inode); otherwise through /proc/PID/map_files. ``memory`` (a ProcessMemory) is used
        to read the vdso and IFUNC GOT slots; without it one is opened when first needed.

        Raises ProcessGoneError, TracePermissionError, UnsupportedTargetError (not x86-64 code).
        """
        arch = check_target(pid)
        maps = read_maps(pid)
        self = cls([], pid=pid, maps=maps, memory=memory, ifunc_resolver=ifunc_resolver)  # a loader
        auxv = _read_auxv(pid, arch.auxv_entry)
        modules: list[Module] = []

        # group consecutive mappings of one file; a mapping that does not continue the file's
        # offsets (a second load of it) starts a new group
        groups: list[list[MapEntry]] = []
        last: dict[tuple[str, int, str], list[MapEntry]] = {}
        for e in maps:
            if not e.is_file or e.inode == 0:
                continue
            key = (e.dev, e.inode, e.path)
            g = last.get(key)
            if g is not None and e.offset >= g[-1].offset and e.start >= g[-1].end:
                g.append(e)
            else:
                g = [e]
                groups.append(g)
                last[key] = g
        for g in groups:
            if not any(e.executable for e in g):
                continue
            mod = self._load_group(pid, g)
            if mod is not None:
                modules.append(mod)

        vdso = next((e for e in maps if e.path == "[vdso]"), None)
        if vdso is not None:
            try:
                image = self._mem().read(vdso.start, vdso.end - vdso.start)
                info = _ElfInfo(None, _vdso_reference(image), "[vdso]")
                bias = vdso.start - (info.loads[0].vaddr & ~(_PAGE - 1)) if info.loads else vdso.start
                modules.append(Module(info, "[vdso]", bias, False, file_backed=False))
            except (DjprobeError, ELFError, OSError, ValueError, struct.error) as exc:
                self.skipped.append(("[vdso]", str(exc)))

        main = _find_main(pid, modules, auxv)
        if main is not None:
            main.is_main = True
            modules.remove(main)
            modules.insert(0, main)
        modules = [_intern_module(m) for m in modules]
        result = cls(modules, pid=pid, maps=maps, memory=self._memory, ifunc_resolver=ifunc_resolver)
        result.skipped = self.skipped
        result._own_memory = self._own_memory  # the loader may have opened memory for the vdso
        return result

    def _load_group(self, pid: int, group: list[MapEntry]) -> Module | None:
        first = group[0]
        dev = _parse_dev(first.dev)
        fd = None
        why = ""
        try:
            fd = os.open(first.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if dev is None or st.st_dev != dev or st.st_ino != first.inode:
                os.close(fd)
                fd = None
                why = "the file at that path is not the mapped one"
        except OSError as exc:
            why = exc.strerror or str(exc)
            fd = None
        if fd is None:
            # the kernel's own reference to the mapped file (needs CAP_SYS_ADMIN)
            try:
                fd = os.open(f"{proc_dir(pid)}/map_files/{first.start:x}-{first.end:x}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.skipped.append((first.path, f"{why}; map_files: {exc.strerror}"))
                return None
        info = _elf_info_from_fd(fd, first.path)
        if info is None:
            return None
        bias = None
        for e in group:
            for l in info.loads:
                if (l.offset & ~(_PAGE - 1)) == e.offset:
                    bias = e.start - (l.vaddr & ~(_PAGE - 1))
                    break
            if bias is not None:
                break
        if bias is None:
            self.skipped.append((first.path, "no mapping matches a PT_LOAD segment"))
            return None
        return Module(info, first.path, bias, False)

    def _mem(self) -> ProcessMemory:
        if self._memory is None:
            if self.pid is None:
                raise InvalidSiteError("no live process")
            self._memory = ProcessMemory(self.pid)
            self._own_memory = True
        return self._memory

    def close(self) -> None:
        """Close the memory handle this object opened itself (not one passed in)."""
        if self._own_memory and self._memory is not None:
            self._memory.close()
            self._memory = None
            self._own_memory = False

    def __enter__(self) -> "Symbols":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------------------

    def module(self, name: str) -> Module:
        """The module a user means by ``name`` (see the module docstring for the rules)."""
        if not name:
            raise InvalidSiteError("empty module name")
        found: list[Module] = []
        if "/" in name:
            norm = os.path.normpath(name)
            found = [m for m in self.modules if m.path == name or m.path == norm]
            if not found:
                try:
                    st = os.stat(name)
                    ident = (st.st_dev, st.st_ino)
                except OSError:
                    ident = None
                if ident is not None:
                    for m in self.modules:
                        if m._info.fd is not None and m._info.fd >= 0:
                            try:
                                mst = os.fstat(m._info.fd)
                            except OSError:
                                continue
                            if (mst.st_dev, mst.st_ino) == ident:
                                found.append(m)
        else:
            found = [m for m in self.modules if m.name == name or (m.name == f"[{name}]")]
            if not found:
                found = [m for m in self.modules if not m.name.startswith("[") and _stem_match(m.name, name)]
        if not found:
            loaded = ", ".join(m.name for m in self.modules) or "none"
            raise SymbolNotFoundError(
                f"no module {name!r} (loaded: {loaded})", reason=f"no module {name!r}"
            )
        if len(found) > 1:
            cands = ", ".join(f"{m.path} (at {m.start:#x})" for m in found)
            raise InvalidSiteError(f"module name {name!r} is ambiguous: {cands}", reason="ambiguous module")
        return found[0]

    def module_at(self, address: int) -> Module | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._sorted[i].end:
            return self._sorted[i]
        return None

    def function_at(self, address: int) -> Symbol | None:
        m = self.module_at(address)
        return m.function_at(address) if m is not None else None

    def describe(self, address: int) -> str:
        """``module:symbol+0xoff`` for any runtime address (``0x…`` outside every module)."""
        m = self.module_at(address)
        return m.describe(address) if m is not None else f"{address:#x}"

    def is_executable(self, address: int) -> bool:
        """In executable memory: a live process's executable mappings, or a file's PF_X segments."""
        if self.live:
            return any(e.start <= address < e.end and e.executable for e in self.maps)
        return any(m.is_executable(address) for m in self.modules)

    # -- IFUNC ----------------------------------------------------------------------------

    def ifunc_target(self, sym: Symbol) -> int | None:
        """The implementation address the process uses for IFUNC ``sym``, or None if unknown.

        1. an R_X86_64_IRELATIVE relocation of its module with addend == the resolver's vaddr:
           the relocated GOT slot in process memory holds the implementation;
        2. a GLOB_DAT / JUMP_SLOT / 64 relocation of that name (and version) in any module whose
           slot already points into the symbol's module (lazy slots still point at a PLT: skipped);
        3. ``ifunc_resolver(sym)`` if given (e.g. calls the resolver inside the target).
        """
        key = (id(sym.module), sym.address)
        if key in self._ifunc_cache:
            return self._ifunc_cache[key]
        target = None
        if self.live:
            target = self._ifunc_from_irelative(sym)
            if target is None:
                target = self._ifunc_from_got(sym)
        if target is None and self.ifunc_resolver is not None:
            target = self.ifunc_resolver(sym)
        if target is not None:
            self._ifunc_cache[key] = target
        return target

    def _read_u64(self, address: int, arch: Arch = X86_64) -> int | None:
        """A machine word of ``arch`` (8 bytes, or 4 in an i386 module) in process memory."""
        try:
            return struct.unpack(arch.word_format, self._mem().read(address, arch.word))[0]
        except (DjprobeError, OSError):
            return None

    def _plausible_impl(self, sym: Symbol, value: int | None, own_module: bool) -> bool:
        if value is None or value == sym.address:
            return False
        if own_module:
            return sym.module.is_executable(value)
        return self.is_executable(value)

    def _ifunc_from_irelative(self, sym: Symbol) -> int | None:
        m = sym.module
        if m._info.machine not in _IRELATIVE:
            return None
        vaddr = sym.address - m.bias
        table = m._info.relocations()
        for r_offset, r_type, _idx, addend in table.rows((table.types == _IRELATIVE[m._info.machine]) & (table.addends == vaddr)):
            if r_type == _IRELATIVE[m._info.machine] and addend == vaddr:
                value = self._read_u64(r_offset + m.bias, m.arch)
                if self._plausible_impl(sym, value, own_module=False):
                    return value
        return None

    def _ifunc_from_got(self, sym: Symbol) -> int | None:
        for m in self.modules:
            if m._info.machine not in _IRELATIVE or not m.file_backed:
                continue
            table = m._info.dynsym
            slot_types, absolute = _GOT_TYPES[m._info.machine]
            relocs = m._info.relocations()
            # the rows the test below can accept, grouped by the name of their symbol (in order)
            named = relocs.by_symbol_name((*slot_types, absolute), table)
            for r_offset, r_type, idx, addend in named.get(sym.name, ()):
                # GLOB_DAT/JUMP_SLOT take no addend (an i386 REL place holds the lazy PLT address)
                if not (r_type in slot_types and (addend == 0 or m.arch.elfclass == 1)) and not (r_type == absolute and addend == 0):
                    continue
                if idx >= len(table):
                    continue
                name, version, hidden, defined = table[idx]
                if name != sym.name:
                    continue
                if version is not None and sym.version is not None and version != sym.version:
                    continue
                if version is None and sym.version_hidden:
                    continue
                value = self._read_u64(r_offset + m.bias, m.arch)
                if self._plausible_impl(sym, value, own_module=True):
                    return value
        return None

    # -- resolving site specs ---------------------------------------------------------------

    def resolve(self, spec: str) -> list[ResolvedSite]:
        """The sites a spec names (see ``parse_site_spec``); a glob may name several, sorted by
        address. Raises SymbolNotFoundError (nothing matches) or InvalidSiteError (data symbol,
        offset outside the symbol, not executable memory, unknown IFUNC implementation, ...)."""
        parsed = parse_site_spec(spec)
        text = spec.strip()
        if parsed.address is not None:
            return [self._resolve_address(text, parsed)]
        assert parsed.symbol is not None
        if parsed.is_glob:
            return self._resolve_glob(text, parsed)
        return self._resolve_exact(text, parsed)

    def _site_at(self, text: str, address: int, via: str | None = None, func: Symbol | None = None) -> ResolvedSite:
        module = self.module_at(address)
        if func is None and module is not None:
            func = module.function_at(address)
        offset = address - func.address if func is not None else 0
        return ResolvedSite(text, address, module, func, offset, via)

    def _resolve_address(self, text: str, p: SiteSpec) -> ResolvedSite:
        assert p.address is not None
        if p.module is not None:
            m = self.module(p.module)
            address = p.address + m.bias + p.offset
        else:
            address = p.address + p.offset
        if not self.is_executable(address):
            raise InvalidSiteError(f"{address:#x} is not in executable memory", address=address)
        return self._site_at(text, address)

    def _code_candidates(self, m: Module, name: str) -> tuple[list[Symbol], list[Symbol]]:
        """(code symbols, data symbols) named ``name`` in ``m``: hidden versions dropped when a
        default or unversioned one exists, local symbols dropped when a global one exists."""
        syms = m.symbols(name)
        if "@" not in name and any(not s.version_hidden for s in syms):
            syms = [s for s in syms if not s.version_hidden]
        code = [s for s in syms if s.kind in _CODE_KINDS or (s.kind is SymbolKind.OTHER and m.is_executable(s.address))]
        data = [s for s in syms if s not in code]
        public = [s for s in code if s.binding != "LOCAL"]
        if public:
            # a global definition is what the name means; local (static) namesakes elsewhere in
            # the module are other functions, reachable by glob or address
            public_addrs = {s.address for s in public}
            code = [s for s in code if s.binding != "LOCAL" or s.address in public_addrs]
        return code, data

    def _resolve_exact(self, text: str, p: SiteSpec) -> list[ResolvedSite]:
        name = p.symbol
        assert name is not None
        data_seen: list[Symbol] = []
        if p.module is not None:
            m = self.module(p.module)
            code, data = self._code_candidates(m, name)
            data_seen += data
        else:
            code = []
            order = ([self.modules[0]] if self.modules and self.modules[0].is_main else [])
            order += [m for m in self.modules if m not in order]
            main = order[0] if order and order[0].is_main else None
            if main is not None:
                code, data = self._code_candidates(main, name)
                data_seen += data
            if not code:
                per_module: list[list[Symbol]] = []
                for m in order:
                    if m is main:
                        continue
                    c, d = self._code_candidates(m, name)
                    data_seen += d
                    if c:
                        per_module.append(c)
                if len(per_module) > 1:
                    public = [c for c in per_module if any(s.binding != "LOCAL" for s in c)]
                    if len(public) == 1:
                        per_module = public
                if len(per_module) > 1:
                    cands = ", ".join(f"{c[0].module.name}:{name}" for c in per_module)
                    raise InvalidSiteError(
                        f"{name!r} is defined in several modules ({cands}); say which one",
                        reason="ambiguous symbol",
                    )
                code = per_module[0] if per_module else []
        if not code:
            if data_seen:
                raise InvalidSiteError(f"{text} is a data symbol, not code", reason="data symbol")
            where = f"module {self.module(p.module).name}" if p.module else "any module"
            raise SymbolNotFoundError(f"no symbol {name!r} in {where}", reason="no such symbol")
        # aliases at one address give one site
        by_addr: dict[int, Symbol] = {}
        for s in code:
            cur = by_addr.get(s.address)
            if cur is None or _alias_rank(s) < _alias_rank(cur) or (cur.size == 0 and s.size > 0):
                by_addr[s.address] = s
        return [self._site_for_symbol(text, s, p.offset) for s in sorted(by_addr.values(), key=lambda s: s.address)]

    def _site_for_symbol(self, text: str, sym: Symbol, offset: int) -> ResolvedSite:
        via = None
        func: Symbol | None = sym
        base = sym.address
        if sym.kind is SymbolKind.IFUNC:
            impl = self.ifunc_target(sym)
            if impl is None:
                if self.live:
                    why = (
                        f"{text} is an IFUNC; its implementation cannot be known without a live "
                        f"process that has relocated it (no resolved IRELATIVE or GOT slot found, and "
                        f"no resolver call available); the resolver is at {sym.address:#x}"
                    )
                else:
                    why = (
                        f"{text} is an IFUNC; its implementation cannot be known without a live "
                        f"process (it is chosen at load time by the resolver at {sym.address:#x})"
                    )
                raise InvalidSiteError(why, address=sym.address, reason="unresolved IFUNC")
            via = sym.display_name
            base = impl
            m = self.module_at(impl)
            func = m.function_at(impl) if m is not None else None
            if func is not None and func.address != impl:
                func = None  # the implementation does not start a known function
        elif sym.size == 0 or sym.kind is SymbolKind.OTHER:
            # a label or a function of unknown size: the containing function, if any
            m = sym.module
            cover = m.function_at(sym.address)
            if cover is not None and cover.address == sym.address:
                func = cover
        size = func.size if func is not None and func.address == base else 0
        if offset:
            if size == 0:
                raise InvalidSiteError(
                    f"{text}: cannot check offset {offset:#x}: the size of {sym.display_name} is unknown",
                    address=base,
                    reason="offset without size",
                )
            if offset >= size:
                raise InvalidSiteError(
                    f"{text}: offset {offset:#x} is beyond the end of {func.display_name} (size {size:#x})",
                    address=base + offset,
                    reason="offset beyond the symbol",
                )
        address = base + offset if offset else base  # the symbol's own integer: one per site, not two
        module = self.module_at(address) or sym.module
        if func is not None and not (func.address <= address < max(func.end, func.address + 1)):
            func = None
        return ResolvedSite(text, address, module, func, address - func.address if func else 0, via)

    def _resolve_glob(self, text: str, p: SiteSpec) -> list[ResolvedSite]:
        pattern = p.symbol
        assert pattern is not None
        if p.module is not None:
            m = self.module(p.module)
            prefix = p.module
        else:
            if not self.modules or not self.modules[0].is_main:
                raise SymbolNotFoundError(f"no main executable to match {pattern!r} in", reason="no main")
            m = self.modules[0]
            prefix = m.name
        matched = [s for s in m.functions() if fnmatch.fnmatchcase(s.name, pattern)]
        if not matched:
            raise SymbolNotFoundError(
                f"pattern {pattern!r} matches no function in {m.name}", reason="pattern matches nothing"
            )
        # aliases at one address: one site, named by the preferred matching name
        groups: dict[tuple[int, bool], Symbol] = {}
        for s in matched:
            k = (s.address, s.kind is SymbolKind.IFUNC)
            cur = groups.get(k)
            if cur is None or _alias_rank(s) < _alias_rank(cur):
                groups[k] = s
        sites: dict[int, ResolvedSite] = {}
        unresolved: list[Symbol] = []
        # direct functions first so that an IFUNC landing on a matched function keeps that name
        for (addr, is_ifunc), s in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            try:
                site = self._site_for_symbol(f"{prefix}:{s.display_name}", s, p.offset)
            except InvalidSiteError:
                if is_ifunc or p.offset:
                    unresolved.append(s)
                    continue
                raise
            if site.address not in sites:
                sites[site.address] = site
        if not sites:
            raise InvalidSiteError(
                f"{text}: every match is an IFUNC whose implementation is unknown, or the offset is "
                f"beyond every match ({', '.join(s.name for s in unresolved[:10])})",
                reason="no usable match",
            )
        self.unresolved = unresolved  # for callers that want to report skipped matches
        return [sites[a] for a in sorted(sites)]


@functools.lru_cache(maxsize=1)
def _own_vdso() -> bytes | None:
    """This process's vDSO image (the kernel's; never patched here), or None."""
    try:
        vdso = next((e for e in read_maps(os.getpid()) if e.path == "[vdso]"), None)
    except DjprobeError:
        return None
    if vdso is None:
        return None
    import ctypes

    return ctypes.string_at(vdso.start, vdso.end - vdso.start)


def _vdso_reference(image: bytes) -> bytes:
    """The unpatched bytes of a target's vDSO, read from its memory as ``image``. The kernel maps
    one image into every 64-bit process, so this process's own copy is the reference, as a file
    on disk is for a library (someone's breakpoint in the target's vDSO then shows as a
    difference). A target whose vDSO is another (a different size or ELF identity) keeps its own.
    """
    own = _own_vdso()
    if own is not None and len(own) == len(image) and own[:64] == image[:64]:
        return own
    return image


def _read_auxv(pid: int, entry: int = 16) -> dict[int, int]:
    try:
        with open(f"{proc_dir(pid)}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    out = {}
    fmt = "<QQ" if entry == 16 else "<II"  # Arch.auxv_entry: 8 bytes in a 32-bit process
    for key, value in struct.iter_unpack(fmt, data[: len(data) // entry * entry]):
        if key == 0:
            break
        out[key] = value
    return out


def _find_main(pid: int, modules: list[Module], auxv: dict[int, int]) -> Module | None:
    phdr = auxv.get(_AT_PHDR)
    if phdr:
        for m in modules:
            if m.file_backed and m.start <= phdr < m.end:
                return m
    try:
        st = os.stat(f"{proc_dir(pid)}/exe")
    except OSError:
        return modules[0] if modules else None
    for m in modules:
        if m.file_backed and m._info.fd is not None and m._info.fd >= 0:
            mst = os.fstat(m._info.fd)
            if (mst.st_dev, mst.st_ino) == (st.st_dev, st.st_ino):
                return m
    return None
