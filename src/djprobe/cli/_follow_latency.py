"""``latency --follow``: the figures of the process, of the children it forks (and theirs) and of
the images any of them exec, as ``count --follow`` takes them in (see _children.Family).

A forked child's calls are measured in its own copies of the probe areas (child_data.ChildLatency
reads them); an exec'd image has latency probes of its own. Reports give each function's figures
over every process (histograms added bucket by bucket), then each process's; with ``-i`` every
process's figures start again from zero after each report, as the process's own do.
``latency -p A,B`` and ``--name`` (_fleet_latency.py) read each process of the fleet through a
``LatencyFamily`` of its own (without a ``Family`` when not ``--follow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..area import HIST_BUCKETS
from ..child_data import ChildLatency, site_probes, sum_figures
from ..follow import FollowedChild
from ..latency import LatencyFigures
from ..probes import ProbedProcess
from ._children import Family


def _zero() -> LatencyFigures:
    return LatencyFigures(np.zeros(HIST_BUCKETS, dtype=np.uint64), 0, 0, 0, 0)


def _minus(a: LatencyFigures, b: LatencyFigures) -> LatencyFigures:
    return LatencyFigures(a.histogram.astype(np.uint64) - b.histogram.astype(np.uint64), a.calls - b.calls,
                          a.total_ns - b.total_ns, a.collisions - b.collisions, a.unpaired - b.unpaired)


@dataclass
class SiteFigures:
    """One function in one process: ``read()`` since the last ``reset``."""

    site: str
    address: int | None
    raw: Callable[[], LatencyFigures]
    base: LatencyFigures

    def read(self) -> LatencyFigures:
        return _minus(self.raw(), self.base)

    def reset(self, reported: LatencyFigures) -> None:
        self.base = sum_figures([self.base, reported])


def _probe_figures(site) -> SiteFigures:
    def raw() -> LatencyFigures:
        return sum_figures([d.latency.read() for d in site_probes(site) if getattr(d, "latency", None) is not None])

    return SiteFigures(site.site, site.address, raw, _zero())


def growing(sites: Callable[[], list]) -> Callable[[], list[SiteFigures]]:
    """The figures of ``sites()``, a list that grows as libraries are loaded (a ``SiteTotal``
    keeps adding every load's probe of its site), each site's kept from its first appearance."""
    known: dict[str, SiteFigures] = {}

    def current() -> list[SiteFigures]:
        for s in sites():
            if s.site not in known:
                known[s.site] = _probe_figures(s)
        return list(known.values())

    return current


@dataclass
class Member:
    pid: int
    command: str
    sites: Callable[[], list[SiteFigures]]


class LatencyFamily:
    """The processes ``latency --follow`` reads figures from (see the module docstring):
    ``target`` (named ``command``, else as ``family`` names it) and, when ``family`` is given,
    everyone it took in."""

    def __init__(self, family: Family | None, target: ProbedProcess, sites: Callable[[], list],
                 command: str | None = None) -> None:
        self.family = family
        name = command if command is not None else family.command if family is not None else "?"
        self.members: list[Member] = [Member(target.pid, name, growing(sites))]
        if family is not None:
            family.on_process.append(self._add)

    def _add(self, process: object) -> None:
        if isinstance(process, FollowedChild) and self.family is not None:
            sources = [f.sites for f in self.family.followers if f.target is process.source]
            sites = sources[0]() if sources else []
            figures = [self._child_figures(process, s) for s in sites]
            self.members.append(Member(process.pid, process.command, lambda: figures))
        else:  # an exec'd image: its sites grow as its libraries are loaded
            self.members.append(Member(process.pid, process.command, growing(process.sites)))  # type: ignore[attr-defined]

    @staticmethod
    def _child_figures(child: FollowedChild, site) -> SiteFigures:
        reader = ChildLatency(child, site)
        return SiteFigures(site.site, site.address, reader.read, _zero())

    @property
    def several(self) -> bool:
        return len(self.members) > 1

    def read(self) -> list[tuple[Member, list[tuple[SiteFigures, LatencyFigures]]]]:
        """Every process's figures now (each function's since the last reset)."""
        return [(m, [(s, s.read()) for s in sorted(m.sites(), key=lambda s: s.site or "")]) for m in self.members]

    @staticmethod
    def reset(readings: list[tuple[Member, list[tuple[SiteFigures, LatencyFigures]]]]) -> None:
        """Start again from zero after the figures in ``readings`` (``latency -i``)."""
        for _, rows in readings:
            for s, figures in rows:
                s.reset(figures)

    @staticmethod
    def totals(readings) -> list[tuple[SiteFigures, LatencyFigures]]:
        """Each function's figures over every process."""
        by_site: dict[str, list] = {}
        for _, rows in readings:
            for s, figures in rows:
                entry = by_site.setdefault(s.site, [s, []])
                if entry[0].address != s.address:  # at different addresses (ASLR): no one address
                    entry[0] = SiteFigures(s.site, None, s.raw, s.base)
                entry[1].append(figures)
        return [(s, sum_figures(f)) for _, (s, f) in sorted(by_site.items())]
