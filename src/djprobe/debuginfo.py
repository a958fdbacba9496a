"""Prototypes from DWARF debug information: parameter names and types of a function, so that a
probe without a written prototype can still show ``path="/etc/hostname"``.

The DWARF comes from the module itself or from its separate debug file
(``/usr/lib/debug/.build-id/xx/yyyy.debug``, found through the ``NT_GNU_BUILD_ID`` note; libc's
comes from ``libc6-dbg``). Only what is needed is parsed: ``.debug_aranges`` names the
compilation unit that holds an address, and only that unit's DIEs are read (libc's
``.debug_info`` is 6 MiB; one unit takes milliseconds). Files, units and prototypes are cached.

A parameter list is cut at the first parameter whose registers djprobe cannot know (a structure
or union passed by value); floating-point parameters take no integer register and are left out.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .prototypes import CType, Param, Prototype

if TYPE_CHECKING:
    from .symbols import Module

log = logging.getLogger(__name__)

_DW_ATE_BOOLEAN = 0x02
_DW_ATE_FLOAT = 0x04
_DW_ATE_SIGNED = 0x05
_DW_ATE_SIGNED_CHAR = 0x06
_DW_ATE_UNSIGNED = 0x07
_DW_ATE_UNSIGNED_CHAR = 0x08
_CV = ("DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type", "DW_TAG_atomic_type")


class _Unsupported(Exception):
    """A parameter whose registers are unknown (a structure passed by value)."""


@dataclass
class _DwarfFile:
    """One file's DWARF: its address ranges and the units read so far."""

    path: str
    dwarf: object
    aranges: object | None
    units: dict[int, dict[int, object]] = field(default_factory=dict)  # CU offset -> low_pc -> DIE
    prototypes: dict[int, Prototype | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_files: dict[str, _DwarfFile | None] = {}
_files_lock = threading.Lock()


def debug_file_candidates(module: "Module") -> list[str]:
    """Where ``module``'s DWARF may be: its separate debug file by build ID, then the file."""
    from .symbols import DEBUG_DIRS

    out = []
    if module.build_id:
        bid = module.build_id
        out += [os.path.join(root, ".build-id", bid[:2], bid[2:] + ".debug") for root in DEBUG_DIRS]
    if module.debug_file and not module.debug_file.endswith("]"):
        out.append(module.debug_file)
    if module.file_backed and not module.path.startswith("["):
        out.append(module.path)
    return out


def _open(path: str) -> _DwarfFile | None:
    with _files_lock:
        if path in _files:
            return _files[path]
        found = None
        try:
            from elftools.elf.elffile import ELFFile

            elf = ELFFile(open(path, "rb"))  # kept open: units are read on demand
            if elf.get_section_by_name(".debug_info") is not None:
                dwarf = elf.get_dwarf_info()
                aranges = dwarf.get_aranges() if elf.get_section_by_name(".debug_aranges") is not None else None
                found = _DwarfFile(path, dwarf, aranges)
        except Exception as exc:  # noqa: BLE001 - a missing or broken file just has no prototypes
            log.debug("no DWARF from %s: %s", path, exc)
        _files[path] = found
        return found


def clear_cache() -> None:
    """Forget the DWARF files read so far."""
    with _files_lock:
        _files.clear()


def prototype_at(module: "Module", address: int) -> Prototype | None:
    """The prototype of the function starting at runtime ``address`` in ``module`` from its DWARF,
    or None (no debug information, no function there, or one djprobe cannot describe)."""
    vaddr = address - module.bias
    for path in debug_file_candidates(module):
        dw = _open(path)
        if dw is None:
            continue
        with dw.lock:
            if vaddr not in dw.prototypes:
                dw.prototypes[vaddr] = _lookup(dw, vaddr)
            return dw.prototypes[vaddr]
    return None


def _lookup(dw: _DwarfFile, vaddr: int) -> Prototype | None:
    offsets = []
    if dw.aranges is not None:
        try:
            offset = dw.aranges.cu_offset_at_addr(vaddr)
            if offset is not None:
                offsets.append(offset)
        except Exception:  # noqa: BLE001 - an address no range covers
            pass
    if not offsets:  # no .debug_aranges entry: every unit (slow on big files, cached after)
        offsets = [cu.cu_offset for cu in dw.dwarf.iter_CUs()]
    for offset in offsets:
        die = _unit(dw, offset).get(vaddr)
        if die is not None:
            try:
                found = _prototype(die)
                # no parameter at all: often a declaration-less stub (assembly): raw registers then
                return found if found.params or found.variadic else None
            except Exception as exc:  # noqa: BLE001 - DWARF we do not understand: no prototype
                log.debug("DWARF of %#x in %s: %s", vaddr, dw.path, exc)
                return None
    return None


def _unit(dw: _DwarfFile, offset: int) -> dict[int, object]:
    """Subprograms of the unit at ``offset`` by their entry address."""
    if offset not in dw.units:
        cu = dw.dwarf.get_CU_at(offset)
        found: dict[int, object] = {}
        for die in cu.iter_DIEs():
            if die.tag == "DW_TAG_subprogram" and "DW_AT_low_pc" in die.attributes:
                found.setdefault(die.attributes["DW_AT_low_pc"].value, die)
        dw.units[offset] = found
    return dw.units[offset]


def _origin(die):
    """The DIE holding the declaration of ``die`` (its abstract origin or specification)."""
    seen = 0
    while seen < 8:
        for attr in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if attr in die.attributes:
                die = die.get_DIE_from_attribute(attr)
                break
        else:
            return die
        seen += 1
    return die


def _attr(die, name: str):
    value = die.attributes.get(name)
    if value is None:
        origin = _origin(die)
        value = origin.attributes.get(name) if origin is not die else None
    return value


def _prototype(func) -> Prototype:
    params: list[Param] = []
    variadic = False
    children = list(func.iter_children())
    if not any(c.tag == "DW_TAG_formal_parameter" for c in children):
        origin = _origin(func)
        if origin is not func:
            children = list(origin.iter_children())
    for child in children:
        if child.tag == "DW_TAG_unspecified_parameters":
            variadic = True
            continue
        if child.tag != "DW_TAG_formal_parameter":
            continue
        name_attr = _attr(child, "DW_AT_name")
        name = name_attr.value.decode(errors="replace") if name_attr is not None else f"arg{len(params)}"
        decl = _origin(child)
        try:
            ctype = _ctype(decl if "DW_AT_type" in decl.attributes else child)
        except _Unsupported:
            break  # the registers of this and later parameters are unknown
        if ctype is None:
            continue  # floating point: an xmm register
        params.append(Param(name, ctype))
    return Prototype(tuple(params), variadic)


def _strip(die):
    """The type DIE named by ``die``'s DW_AT_type, without typedefs and qualifiers (None: void)."""
    t = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    while t is not None and (t.tag in _CV or t.tag == "DW_TAG_typedef"):
        t = t.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in t.attributes else None
    return t


def _ctype(param) -> CType | None:
    spelling = _spell(param)
    t = _strip(param)
    if t is None:
        raise _Unsupported("void parameter")
    if t.tag == "DW_TAG_pointer_type" or t.tag == "DW_TAG_reference_type":
        pointee = _strip(t)
        if (
            pointee is not None
            and pointee.tag == "DW_TAG_base_type"
            and pointee.attributes["DW_AT_byte_size"].value == 1
            and pointee.attributes["DW_AT_encoding"].value in (_DW_ATE_SIGNED_CHAR, _DW_ATE_UNSIGNED_CHAR)
        ):
            return CType("string", 64, spelling)
        return CType("pointer", 64, spelling)
    if t.tag == "DW_TAG_base_type":
        encoding = t.attributes["DW_AT_encoding"].value
        bits = 8 * t.attributes["DW_AT_byte_size"].value
        if encoding == _DW_ATE_FLOAT:
            return None
        if encoding == _DW_ATE_BOOLEAN:
            return CType("bool", 8, spelling)
        if bits > 64:
            raise _Unsupported("a 128-bit integer")
        kind = "int" if encoding in (_DW_ATE_SIGNED, _DW_ATE_SIGNED_CHAR) else "uint"
        return CType(kind, bits, spelling)
    if t.tag == "DW_TAG_enumeration_type":
        return CType("int", 8 * t.attributes["DW_AT_byte_size"].value, spelling)
    raise _Unsupported(t.tag)


def _spell(die, depth: int = 0) -> str:
    """The C spelling of ``die``'s type (``const char *``)."""
    if depth > 16 or "DW_AT_type" not in die.attributes:
        return "void"
    t = die.get_DIE_from_attribute("DW_AT_type")
    name = t.attributes.get("DW_AT_name")
    text = name.value.decode(errors="replace") if name is not None else ""
    if t.tag in ("DW_TAG_typedef", "DW_TAG_base_type"):
        return text
    if t.tag == "DW_TAG_pointer_type":
        return _spell(t, depth + 1) + " *"
    if t.tag == "DW_TAG_const_type":
        return "const " + _spell(t, depth + 1)
    if t.tag in _CV:
        return _spell(t, depth + 1)
    if t.tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        keyword = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}.get(t.tag, "enum")
        return f"{keyword} {text or '<anonymous>'}"
    return text or t.tag[7:]


def prototype_of(proc, spec: str) -> Prototype | None:
    """The DWARF prototype of the function a site spec names in a process (``proc`` a
    :class:`~djprobe.ProbedProcess` or its ``symbols``), e.g. for
    ``Djprobe("libc:open", prototype=prototype_of(proc, "libc:open"))``; None without debug
    information. Raises SymbolNotFoundError/InvalidSiteError as resolving the spec does."""
    symbols = getattr(proc, "symbols", proc)
    site = symbols.resolve(spec)[0]
    if site.module is None or site.function is None or site.offset:
        return None
    return prototype_at(site.module, site.address)
