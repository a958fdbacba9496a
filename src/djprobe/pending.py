"""Probes that follow the libraries of a process: pending patterns, ``dlopen`` and ``dlclose``.

A pattern whose module is not loaded yet (``libsqlite3:sqlite3_step``, ``_json:*``) is *pending*:
:class:`LibraryFollower` places its probes when the dynamic loader maps a matching library,
before any code of it runs (constructors included), through the loader hook (:mod:`.loader`): the
loading thread waits in the hook while the tracer stops the world, reloads the symbols, registers
the probes of every pattern that names the new library, and acknowledges.

A library that is unmapped (``dlclose``) takes its probes with it: they are removed without
writing to the unmapped code (the bytes cannot be read any more, so nothing is written), their
stubs are given back once no thread can be in them, and a later load of the library gets probes
again. Counts add up per site across loads: :class:`SiteTotal` is what reports show, one per
``module:function``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .errors import DjprobeError, InvalidSiteError, SymbolNotFoundError
from .loader import LoaderWatch
from .probes import Djprobe, ProbedProcess
from .prototypes import split_prototype, typed_probe
from .sites import RETURN_SUFFIX, split_return_spec
from .symbols import Module, parse_site_spec

log = logging.getLogger(__name__)

ModuleKey = tuple[str, int]  # (path, load bias): one load of a library


def _key(module: Module) -> ModuleKey:
    return (module.path, module.bias)


@dataclass
class SiteTotal:
    """One probed site (``module:function``) across every load of its library: ``hits`` and
    ``missed`` add up the probes of each load; ``address`` is where it is (or was) last."""

    site: str
    probes: list[Djprobe] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(d.hits for d in self.probes)

    @property
    def vfork_hits(self) -> int:
        """Hits of vfork/posix_spawn children before their exec (see :mod:`djprobe.vforks`)."""
        return sum(d.vfork_hits for d in self.probes)

    @property
    def missed(self) -> int:
        return sum(d.missed for d in self.probes)

    @property
    def address(self) -> int | None:
        return self.probes[-1].address if self.probes else None

    @property
    def mode(self) -> str | None:
        """How its last load's probe fires: "jump" or "trap" (see ``traps.py``)."""
        return self.probes[-1].mode if self.probes else None

    @property
    def no_jump_reason(self) -> str | None:
        return self.probes[-1].no_jump_reason if self.probes else None

    @property
    def loads(self) -> int:
        """How many loads of its library this site was probed in."""
        return len(self.probes)


def pattern_module(pattern: str) -> str | None:
    """The module part of a pattern (``libsqlite3`` of ``libsqlite3:sqlite3_*%return`` or of
    ``libsqlite3:sqlite3_open(char *name, void *db)``), or None."""
    try:
        spec, _ = split_return_spec(split_prototype(pattern)[0])
        return parse_site_spec(spec).module
    except InvalidSiteError:
        return None


def is_missing_module(exc: Exception) -> bool:
    """Whether resolving a pattern failed only because its module is not loaded (yet)."""
    return isinstance(exc, SymbolNotFoundError) and str(getattr(exc, "reason", "")).startswith("no module ")


NewProbe = Callable[[int, bool], Djprobe]  # (address, at_return) -> an unregistered probe
Refused = Callable[[str, str], None]  # (site, reason)


class LibraryFollower:
    """Keep the probes of module-qualified patterns in step with the libraries of ``target``.

    ``patterns`` are every pattern of the run that names a module; ``placed`` the probes already
    registered for them (and the others: they are reported too); ``pending`` the patterns whose
    module is not loaded. ``new_probe(address, at_return)`` makes a probe like the run's others.
    Call :meth:`install` before the target runs, then :meth:`wait` in the polling loop.
    """

    def __init__(
        self,
        target: ProbedProcess,
        patterns: Sequence[str],
        placed: Iterable[Djprobe],
        new_probe: NewProbe,
        *,
        on_refused: Refused | None = None,
    ) -> None:
        self.target = target
        self.patterns = [p for p in patterns if pattern_module(p) is not None]
        self.new_probe = new_probe
        self.on_refused = on_refused
        self.watch = LoaderWatch(target)
        self._sites: dict[str, SiteTotal] = {}
        self._module_of: dict[int, ModuleKey] = {}  # id(djp) -> the load it is in
        self._live: list[Djprobe] = []
        #: Called after each change the loader reported was applied (world running, the
        #: loading thread still waiting): e.g. hooks that need libc placed before it runs.
        self.after_load: list[Callable[[], None]] = []
        self.loads = 0  # libraries whose patterns were applied after start
        self.unloads = 0
        symbols = target.symbols
        self._known = {_key(m) for m in symbols.modules}
        for djp in placed:
            parts = djp._parts or [djp]  # a return probe: where its parts are
            self._adopt(djp, symbols.module_at(parts[0].address or 0) if parts else None)

    @property
    def sites(self) -> list[SiteTotal]:
        """Every site probed so far, one entry per ``module:function`` (in order of first load)."""
        return list(self._sites.values())

    def pending_patterns(self) -> list[str]:
        """The patterns whose module is not loaded now."""
        symbols = self.target.symbols
        missing = []
        for pattern in self.patterns:
            try:
                symbols.module(pattern_module(pattern))  # type: ignore[arg-type]
            except SymbolNotFoundError:
                missing.append(pattern)
            except InvalidSiteError:
                pass  # ambiguous: loaded, and refused when resolved
        return missing

    def _adopt(self, djp: Djprobe, module: Module | None) -> None:
        name = djp.site or hex(djp.address or 0)
        self._sites.setdefault(name, SiteTotal(name)).probes.append(djp)
        if module is not None:
            self._module_of[id(djp)] = _key(module)
        self._live.append(djp)

    def install(self) -> None:
        """Place the loader hook in ld.so and arm it. Raises SymbolNotFoundError for a process
        without a dynamic loader, or what registering a probe raises."""
        self.watch.install()

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the loader to report; handle what it reports."""
        if self.watch.wait(timeout):
            self.service()

    def service(self) -> None:
        """Handle the loader's notifications: probes of unmapped libraries are dropped, patterns
        naming newly mapped ones are applied; then the waiting thread is let go."""
        try:
            self._apply_changes()
            for hook in self.after_load:
                hook()
        finally:
            self.watch.ack()

    def _apply_changes(self) -> None:
        if not self.target.process.is_alive():
            return
        self.target.refresh_symbols()
        symbols = self.target.symbols
        now = {_key(m): m for m in symbols.modules}
        gone = self._known - now.keys()
        new = [m for k, m in now.items() if k not in self._known]
        self._known = set(now)
        if gone:
            dropped = [d for d in self._live if self._module_of.get(id(d)) in gone]
            if dropped:
                self.unloads += len(gone)
                self.target.unregister_many(dropped)
                self._live = [d for d in self._live if d not in dropped]
        if new:
            self._apply_to(new)

    def _apply_to(self, modules: list[Module]) -> None:
        symbols = self.target.symbols
        keys = {_key(m) for m in modules}
        made: dict[tuple[int, bool], tuple[Djprobe, Module]] = {}
        for pattern in self.patterns:
            spec, prototype = split_prototype(pattern)  # 'lib:f(char *s, int n)': typed when recording
            spec, at_return = split_return_spec(spec)
            try:
                module = symbols.module(pattern_module(pattern))  # type: ignore[arg-type]
            except (SymbolNotFoundError, InvalidSiteError):
                continue
            if _key(module) not in keys:
                continue
            try:
                sites = symbols.resolve(spec)
            except DjprobeError as exc:
                self._refuse(pattern, getattr(exc, "reason", None) or str(exc))
                continue
            for site in sites:
                if (site.address, at_return) in made:
                    continue
                djp = self.new_probe(site.address, at_return)
                if prototype is not None and djp.record and not at_return:
                    djp.prototype, djp.strings = typed_probe(prototype, djp.at)
                    djp.registers = "args"
                djp.site = site.name + (RETURN_SUFFIX if at_return else "")
                made[(site.address, at_return)] = (djp, module)
        if not made:
            return
        self.loads += len({_key(m) for _, m in made.values()})
        probes = [d for d, _ in made.values()]
        errors = self.target.register_many(probes)
        bad = {id(d) for d, _ in errors}
        for djp, exc in errors:
            self._refuse(djp.site or hex(djp.address or 0), getattr(exc, "reason", None) or str(exc))
        for djp, module in made.values():
            if id(djp) not in bad:
                self._adopt(djp, module)

    def _refuse(self, site: str, reason: str) -> None:
        log.info("%s: %s", site, reason)
        if self.on_refused is not None:
            self.on_refused(site, reason)

    def live_probes(self) -> list[Djprobe]:
        return [d for d in self._live if d.registered]

    def close(self) -> None:
        """Let any waiting thread go, remove the hook and every probe placed by this follower
        (the probes placed before it are the caller's to remove: they are removed here too)."""
        self.watch.close()
        live = self.live_probes()
        if live and self.target.process.is_alive():
            self.target.unregister_many(live)
