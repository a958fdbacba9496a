"""The commands' side of children: without --follow, a child never counts as its parent."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..area import AreaLayout
from ..errors import DjprobeError
from ..follow import ChildFollower
from ..forks import ForkGuard
from ..pending import LibraryFollower, pattern_module
from ..probes import ProbedProcess
from ._output import notice


def add_follow_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``-f``/``--follow`` (as strace spells it) for count, trace and latency."""
    parser.add_argument("-f", "--follow", action="store_true",
                        help=f"{what} forked children and the programs they exec too, each apart")


def _count_probe(address: int, at_return: bool):
    from ..probes import Djprobe

    return Djprobe(address, at="return" if at_return else "entry")


@dataclass
class Placement:
    """How a command places its probes in a process it takes in (an image a followed process
    exec'd): the areas' layout, ``make(target, patterns, pending)`` -> (probes, refusals) and
    ``new_probe(address, at_return)`` for libraries loaded later. The default counts."""

    layout: Callable[[], AreaLayout] = AreaLayout.for_counting
    make: Callable | None = None
    new_probe: Callable = _count_probe

    def place(self, target: ProbedProcess, patterns: list[str], pending: list[str]) -> tuple[list, list]:
        from ._target import make_probes

        if self.make is not None:
            return self.make(target, patterns, pending)
        return make_probes(target, patterns, pending=pending)


def guard_children(target: ProbedProcess) -> ForkGuard | None:
    """Place the fork hook (see forks.py); a process where it cannot go is told on stderr."""
    guard = ForkGuard(target)
    try:
        guard.install()
    except DjprobeError as exc:
        notice(f"note: children forked by process {target.pid} would add to its counts: {exc}", wrap=True)
        return None
    return guard


def follow_children(args, target: ProbedProcess, guard: ForkGuard | None, sites: Callable[[], list],
                    placement: Placement | None = None) -> "Family | None":
    """``--follow``: take in forked children and the images they exec (see follow.py, execs.py),
    placing ``args.patterns`` in the images as ``placement`` says (default: counting); None
    where the fork hook is not."""
    if guard is None:
        notice("note: --follow: children cannot be followed without the fork hook")
        return None
    return Family(args, target, guard, sites, placement or Placement())


class _Image:
    """A process image a followed process exec'd, with its own probes and hooks."""

    def __init__(self, target: ProbedProcess, command: str, probes: list, refused: list,
                 follower: LibraryFollower | None, guard: ForkGuard | None) -> None:
        self.target, self.pid, self.command = target, target.pid, command
        self.probes, self.refused, self.follower, self.guard = probes, refused, follower, guard

    def sites(self) -> list:
        return self.follower.sites if self.follower is not None else self.probes

    def close(self, before: Sequence[Callable[["_Image"], None]] = ()) -> None:
        """Remove its probes and hooks; ``before`` callbacks get the image once its probes are
        out, before its areas are unmapped."""
        try:
            if self.follower is not None:
                self.follower.close()
            self.target.unregister_many(self.probes)
            if self.guard is not None:
                self.guard.close()
        except DjprobeError as exc:
            notice(f"process {self.pid}: {exc}")
        finally:
            try:
                for callback in before:
                    callback(self)
            finally:
                self.target.close()


class Family:
    """``--follow``: the process, the children it forks (and theirs) and the images any of them
    exec, each counted apart. ``on_process`` callbacks get each process taken in (a
    ``FollowedChild`` or an ``_Image``); ``before_image_close`` ones get each image once its
    probes are out, before its areas are unmapped (to read its last events)."""

    def __init__(self, args, target: ProbedProcess, guard: ForkGuard, sites: Callable[[], list],
                 placement: Placement | None = None) -> None:
        from ..execs import ExecFollower
        from ..follow import _command

        self.args = args
        self.placement = placement or Placement()
        self.on_process: list[Callable[[object], None]] = []
        self.before_image_close: list[Callable[["_Image"], None]] = []
        self.command = _command(target.pid)
        self.children: list = []  # every process but the first: FollowedChild or _Image
        self.followers: list[ChildFollower] = []
        self.images: list[_Image] = []
        self.execs = ExecFollower(self._setup_image)
        self._follow(target, guard, sites)

    def _follow(self, target: ProbedProcess, guard: ForkGuard, sites: Callable[[], list]) -> None:
        follower = ChildFollower(target, guard, sites, on_child=lambda child: self._on_child(target, child))
        follower.enable()
        self.followers.append(follower)
        try:
            self.execs.install(target)
        except DjprobeError as exc:
            notice(f"note: --follow: images process {target.pid} execs will not be probed: {exc}", wrap=True)

    def _on_child(self, target: ProbedProcess, child) -> None:
        from ..follow import mapping_address

        self.children.append(child)
        index = self.execs.region_index(target)
        if index is not None and index < len(child.views) and child.views[index] is not None:
            self.execs.watch(child.views[index], mapping_address(child.maps[index]))
        for callback in self.on_process:
            callback(child)

    def _setup_image(self, target: ProbedProcess) -> _Image:
        from ..follow import _command

        target.layout = self.placement.layout()
        command = _command(target.pid)
        pending: list[str] = []
        try:
            probes, refused = self.placement.place(target, self.args.patterns, pending)
        except DjprobeError as exc:
            notice(f"process {target.pid} exec'd {command}: no probes: {exc}", wrap=True)
            probes, refused = [], []
        new_probe = self.placement.new_probe

        for r in refused:
            notice(f"process {target.pid} ({command}): {r.site}: refused: {r.reason}")
        named = [p for p in self.args.patterns if pattern_module(p) is not None]
        follower = LibraryFollower(target, named, probes, new_probe)
        image = _Image(target, command, probes, refused, follower, None)
        try:
            follower.install()  # ld.so's first report comes once the libraries are mapped
        except DjprobeError as exc:
            notice(f"process {target.pid} ({command}): its libraries will not be probed: {exc}", wrap=True)
            image.follower = None
        if pending:
            notice(f"process {target.pid} ({command}): pending until loaded: {' '.join(pending)}")

        def with_libc() -> None:  # the fork and exec hooks need libc: placed before it runs
            if image.guard is None and any("libc" in m.name for m in target.symbols.modules):
                image.guard = guard_children(target)
                if image.guard is not None:
                    self._follow(target, image.guard, image.sites)

        if image.follower is not None:
            image.follower.after_load.append(with_libc)
        self.images.append(image)
        self.children.append(image)
        for callback in self.on_process:
            callback(image)
        return image

    def poll(self, seconds: float = 0.0) -> None:
        for image in self.images:
            if image.follower is not None and image.target.process.is_alive():
                image.follower.wait(0.0)
        for follower in self.followers:
            follower.poll()
        self.execs.poll()

    def close(self) -> None:
        self.poll()
        self.execs.close()
        for image in self.images:
            image.close(self.before_image_close)
        for follower in self.followers:
            follower.close()


def idle_with(follower: LibraryFollower | None, children: "Family | None") -> Callable[[float], None] | None:
    """The polling loop's wait: the loader hook's, and taking in children every turn."""
    if follower is None and children is None:
        return None

    def idle(seconds: float) -> None:
        if follower is not None:
            follower.wait(0.01 if children is not None else seconds)
        else:
            time.sleep(0.01)
        if children is not None:
            children.poll()

    return idle


@dataclass
class _Parent:
    pid: int
    command: str
    probes: list
    refused: list

    def sites(self) -> list:
        return self.probes


def report_family(out, args, pid: int, probes: list, refused: list, children: "Family", interval: int,
                  final: bool, status: int | None) -> None:
    """The report of a process and its followed children: totals, then each process."""
    from ._fleet import report

    members = [_Parent(pid, children.command, probes, refused)] + list(children.children)
    report(out, args, members, interval, final, status)
