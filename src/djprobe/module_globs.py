"""Patterns over several modules: ``*:*`` (every function of every module of a process),
``lib*:str*``, ``*.cpython-*:*``. The module part is a glob matched against each loaded module's
name (``libc.so.6``) and against its stem as users write it (``libc``); the symbol part is a
function glob or name, as in ``Symbols.resolve``.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from .errors import InvalidSiteError, SymbolNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from .symbols import Module, ResolvedSite, Symbols

__all__ = ["ALL_FUNCTIONS", "has_module_glob", "matching_modules", "resolve_pattern"]

#: The pattern ``--all-modules`` stands for.
ALL_FUNCTIONS = "*:*"
_GLOB_CHARS = frozenset("*?[")


def has_module_glob(spec: str) -> bool:
    """Whether ``spec`` is ``MODULE:SYMBOL`` with a glob in MODULE (a path never is one)."""
    module, colon, _ = spec.strip().rpartition(":")
    if module in ("[vdso]", "[vsyscall]"):  # the kernel's names for its images, not character classes
        return False
    return bool(colon) and "/" not in module and any(c in _GLOB_CHARS for c in module)


def matching_modules(symbols: "Symbols", glob: str) -> list["Module"]:
    """The loaded modules whose name, or name without its version suffixes (``libc`` for
    ``libc.so.6``, ``libpython3.11`` for ``libpython3.11.so.1.0``), matches ``glob``."""
    out = []
    for m in symbols.modules:
        stem = m.name.split(".so", 1)[0] if ".so" in m.name else m.name
        if fnmatch.fnmatchcase(m.name, glob) or fnmatch.fnmatchcase(stem, glob):
            out.append(m)
    return out


def resolve_pattern(symbols: "Symbols", spec: str) -> list["ResolvedSite"]:
    """The sites ``spec`` names: :meth:`Symbols.resolve`, extended to module globs (each matching
    module contributes what the symbol part matches in it; a module where it matches nothing
    contributes nothing). Raises SymbolNotFoundError if nothing matches at all."""
    if not has_module_glob(spec):
        return symbols.resolve(spec)
    module_glob, _, symbol = spec.strip().rpartition(":")
    modules = matching_modules(symbols, module_glob)
    if not modules:
        loaded = ", ".join(m.name for m in symbols.modules) or "none"
        raise SymbolNotFoundError(f"no module matches {module_glob!r} (loaded: {loaded})", reason="no module")
    sites: dict[int, "ResolvedSite"] = {}
    for m in modules:
        try:
            found = symbols.resolve(f"{m.path}:{symbol}")
        except (SymbolNotFoundError, InvalidSiteError):
            continue  # nothing usable matches in this module
        for site in found:
            sites.setdefault(site.address, site)
    if not sites:
        raise SymbolNotFoundError(f"{symbol!r} matches no function in the modules matching {module_glob!r}",
                                  reason="pattern matches nothing")
    return [sites[a] for a in sorted(sites)]
