"""Site verdicts cached on disk, per module build-id: what makes probing a whole process fast.

Analysing a site means indexing every way into its module's code (decoding all of it, reading
jump tables, landing pads, relocations): about 1 ms per site and hundreds of MB for libc and
libpython together. The verdict depends only on the file (its bytes, symbols and ``.eh_frame``),
so it is kept in ``$XDG_CACHE_HOME/djprobe/sites`` (default ``~/.cache/djprobe/sites``;
``DJPROBE_CACHE_DIR`` overrides, ``DJPROBE_NO_CACHE=1`` turns it off), one file per build-id and
*analysis fingerprint* (djprobe's version and a hash of the analysing code: a changed analysis
never reads an old verdict). Only default-size verdicts are cached, never one that depends on the
process (a site someone else patched, unreadable live bytes).

An entry holds, for a site at file vaddr V of a function [F, F+S): for a jump, the displaced
bytes (and how many of them are padding) and whether the flags are dead; for a refusal, its
reason with the module's addresses written as file vaddrs (rebased when read). A cached jump is
used only if its bytes are still those of the file at V, decode into whole instructions and are
the live bytes too (else the site is analysed afresh, which names someone else's patch); the live
bytes are compared again when the jump goes in, with the world stopped.

Files are replaced atomically (written to a temporary file in the same directory, then renamed),
so concurrent tracers never see half a file; the last writer wins and entries it did not know
are merged from the file it replaces. A file that does not parse or does not match its key is
ignored (and replaced at the next write). The directory must belong to the tracer's user and not
be writable by others (verdicts from it decide where jumps are written), else nothing is cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .sites import SiteAnalysis, Verdict, analyse_site
from .verdict_index import VerdictIndex
from .verdict_index import parse as parse_index
from .x86 import Flow, decode
from .x86.packed import PackedInsns

if TYPE_CHECKING:  # pragma: no cover
    from .symbols import Module, ResolvedSite, Symbol, Symbols

log = logging.getLogger(__name__)

FORMAT = 1
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_VADDR = re.compile(r"\{V:(0x[0-9a-f]+)\}")


def cache_directory() -> Path | None:
    """Where cached verdicts live, or None when caching is turned off."""
    if os.environ.get("DJPROBE_NO_CACHE"):
        return None
    explicit = os.environ.get("DJPROBE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "djprobe" / "sites"


_FINGERPRINT: str | None = None


def analysis_fingerprint() -> str:
    """djprobe's version and a hash of the code whose output is cached (site analysis, decoding,
    relocation checks, symbols and FDE bounds, short-jump verdicts)."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        from . import __version__

        root = Path(__file__).parent
        h = hashlib.sha256(f"{FORMAT}:{__version__}".encode())
        for path in sorted([*root.glob("sites/*.py"), *root.glob("x86/*.py"), root / "symbols.py", root / "fde.py",
                               root / "springboard_cache.py"]):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT


def _usable_directory(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
    except OSError as exc:
        log.info("site cache %s not usable: %s", directory, exc)
        return False
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        log.warning("site cache %s ignored: not owned by uid %d or writable by others", directory, os.geteuid())
        return False
    return True


class ModuleVerdicts:
    """The cached verdicts of one module (one build-id)."""

    def __init__(self, module: "Module", path: Path) -> None:
        self.module = module
        self.path = path
        self._key = {"format": FORMAT, "build_id": module.build_id, "fingerprint": analysis_fingerprint()}
        # read on first use (kept as text + arrays, see verdict_index.py), dropped at flush
        self._entries: VerdictIndex | dict[str, list] | None = None
        self._new: dict[str, list] = {}
        self.hits = 0
        self.misses = 0

    @property
    def entries(self) -> VerdictIndex | dict[str, list]:
        """The verdicts known (read from the file on first use): a :class:`VerdictIndex`
        (``get(vaddr)``), or a dict by hex vaddr for a file laid out otherwise."""
        if self._entries is None:
            self._entries = self._load(self.path, indexed=True)
        return self._entries

    def _entry(self, vaddr: int) -> list | None:
        new = self._new.get(_key(vaddr))
        if new is not None:
            return new
        entries = self.entries
        return entries.get(vaddr) if isinstance(entries, VerdictIndex) else entries.get(_key(vaddr))

    def _load(self, path: Path, indexed: bool = False) -> VerdictIndex | dict[str, list]:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            if indexed:
                index = parse_index(raw.decode(), self._key)
                if index is not None:
                    return index
            data = json.loads(raw)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.info("site cache %s unreadable, ignored: %s", path, exc)
            return {}
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self._key.items()):
            log.info("site cache %s does not match its key, ignored", path)
            return {}
        entries = data.get("sites")
        return entries if isinstance(entries, dict) else {}

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, address: int, function: "Symbol | None", name: str) -> SiteAnalysis | None:
        """The cached verdict for a default-size probe at ``address`` (in ``function``, shown as
        ``name``), or None."""
        if function is None:
            return None
        try:
            entry = self._entry(address - self.module.bias)
            analysis = self._rebuild(address, function, name, entry) if entry is not None else None
        except (ValueError, TypeError, IndexError, KeyError):
            analysis = None  # a damaged entry: analyse afresh
        if analysis is None:
            self.misses += 1
        else:
            self.hits += 1
        return analysis

    def _rebuild(self, address: int, function: "Symbol", name: str, entry: list) -> SiteAnalysis | None:
        module = self.module
        bias = module.bias
        kind, fstart, fsize = entry[0], int(entry[1], 16), entry[2]
        if fstart != function.address - bias or fsize != function.size:
            return None  # other bounds (a symbol table that changed): analyse again
        base = dict(site=name, address=address, function=function, at_entry=address == function.address, module=module)
        if kind == "r":
            reason = _VADDR.sub(lambda m: f"{int(m.group(1), 16) + bias:#x}", entry[3])
            return SiteAnalysis(size=0, verdict=Verdict.REFUSED, reason=reason, **base)
        if kind != "j":
            return None
        raw, padding_bytes, flags_dead = bytes.fromhex(entry[3]), int(entry[4]), bool(entry[5])
        n = len(raw)
        if n < 5 or not 0 <= padding_bytes < n or module.read_file(address, n) != raw:
            return None
        body = n - padding_bytes
        bits = module.arch.bits  # a 32-bit module's bytes decode as 32-bit code
        decoded = tuple(decode(raw[:body], address, bits))
        padding = tuple(decode(raw[body:], address + body, bits)) if padding_bytes else ()
        if any(i.flow is Flow.INVALID for i in decoded + padding):
            return None
        # kept as bytes, decoded when asked: 20,000 probes would keep 45,000 decoded instructions
        displaced = PackedInsns(raw[:body], address, bits, len(decoded))
        reason = _jump_reason(len(decoded), n)
        if padding:
            reason += f" (with {len(padding)} padding instruction(s) after the end of {function.name})"
        return SiteAnalysis(size=n, verdict=Verdict.JUMP, reason=reason, displaced=displaced, flags_dead=flags_dead,
                            padding=padding, **base)

    def get(self, key: str) -> list | None:
        """The raw entry under ``key`` (an entry of another kind than a site's verdict, e.g.
        ``springboard_cache.py``'s), or None."""
        entry = self._new.get(key)
        if entry is None:
            entries = self.entries
            entry = entries.get_key(key) if isinstance(entries, VerdictIndex) else entries.get(key)
        return entry if isinstance(entry, list) else None

    def put(self, key: str, entry: list) -> None:
        """Keep a raw entry under ``key`` (written at the next flush, merged like the verdicts)."""
        self._new[key] = entry

    # -- writing ----------------------------------------------------------------------------
    def store(self, analysis: SiteAnalysis) -> None:
        """Remember a freshly computed default-size verdict (those that depend on the process
        itself are not kept)."""
        function, module = analysis.function, self.module
        if function is None or analysis.busy or analysis.reason.startswith("cannot read the live bytes"):
            return
        bias = module.bias
        head = [_key(function.address - bias), function.size]
        if analysis.ok:
            raw = analysis.original
            pad = sum(i.length for i in analysis.padding)
            entry = ["j", *head, raw.hex(), pad, int(analysis.flags_dead)]
        else:
            lo, hi = module.start, module.end
            reason = _HEX.sub(lambda m: f"{{V:{int(m.group(0), 16) - bias:#x}}}" if lo <= int(m.group(0), 16) < hi
                              else m.group(0), analysis.reason)
            entry = ["r", *head, reason]
        self._new[_key(analysis.address - bias)] = entry

    def flush(self) -> None:
        """Write the new verdicts (merged with the file's current ones) atomically, and forget
        the verdicts read (a whole process's take tens of MB; read again when needed)."""
        self._entries = None
        if not self._new:
            return
        merged = self._load(self.path)
        merged.update(self._new)
        text = json.dumps({**self._key, "sites": merged}, separators=(",", ":")).encode()
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            log.info("site cache %s not written: %s", self.path, exc)
        self._new.clear()


@functools.lru_cache(maxsize=256)
def _jump_reason(instructions: int, size: int) -> str:
    """A jump verdict's reason (one string per count and size, not one per site)."""
    return f"jump: displaces {instructions} instruction(s), {size} bytes"


def _key(vaddr: int) -> str:
    return f"{vaddr:#x}"


class SiteCache:
    """Cached verdicts for the modules of one process (see the module docstring)."""

    def __init__(self, directory: Path | None = None, *, enabled: bool = True) -> None:
        self.directory = directory if directory is not None else cache_directory()
        self.enabled = enabled and self.directory is not None and _usable_directory(self.directory)
        self._modules: dict[int, ModuleVerdicts | None] = {}

    def verdicts(self, module: "Module | None") -> ModuleVerdicts | None:
        """The cache of ``module`` (None: no cache, or a module without a build-id)."""
        if not self.enabled or module is None or not module.build_id:
            return None
        key = id(module)
        if key not in self._modules:
            assert self.directory is not None
            name = f"{module.build_id}-{analysis_fingerprint()}.json"
            self._modules[key] = ModuleVerdicts(module, self.directory / name)
        return self._modules[key]

    def analyse(self, symbols: "Symbols", site: "ResolvedSite | int", memory) -> SiteAnalysis:
        """The verdict for a default-size probe at ``site``: cached, or computed by
        :func:`~djprobe.sites.analyse_site` and remembered."""
        if isinstance(site, int):
            address = site
            module = symbols.module_at(address)
            function = module.function_at(address) if module is not None else None
            name = symbols.describe(address) if module is not None else f"{address:#x}"
        else:
            address, module, function, name = site.address, site.module, site.function, site.name
        verdicts = self.verdicts(module)
        if verdicts is not None:
            found = verdicts.lookup(address, function, name)
            if found is not None and found.ok and memory is not None:
                try:
                    live = memory.read(address, found.size)
                except Exception:  # noqa: BLE001 (the analysis says why)
                    live = None
                if live != found.original:
                    found = None  # someone else's patch: the analysis names it, before any stop
            if found is not None:
                return found
        analysis = analyse_site(symbols, site, None, memory)
        if verdicts is not None and analysis.function is function:
            verdicts.store(analysis)
        return analysis

    def flush(self) -> None:
        for verdicts in self._modules.values():
            if verdicts is not None:
                verdicts.flush()

    @property
    def hits(self) -> int:
        return sum(v.hits for v in self._modules.values() if v is not None)

    @property
    def misses(self) -> int:
        return sum(v.misses for v in self._modules.values() if v is not None)
