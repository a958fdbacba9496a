"""The commands' side of pending probes: follow the libraries a command loads and unloads."""

from __future__ import annotations

from typing import Callable

from ..errors import DjprobeError
from ..pending import LibraryFollower, pattern_module
from ..probes import Djprobe, ProbedProcess
from ._output import notice, plural, short_list


def follow_libraries(
    target: ProbedProcess,
    patterns: list[str],
    placed: list[Djprobe],
    pending: list[str],
    new_probe: Callable[[int, bool], Djprobe],
) -> LibraryFollower | None:
    """A follower with its loader hook in place when a pattern names a library (placed now or
    pending), else None. Pending patterns are announced on stderr; refusals of sites in
    libraries loaded later too. A pending pattern in a process without a dynamic loader is an
    error (it could never be applied)."""
    main = target.symbols.modules[0] if target.symbols.modules else None
    named = [p for p in patterns if pattern_module(p) is not None]
    if main is not None:
        named = [p for p in named if p in pending or _names_other_than(target, p, main)]
    if not named:
        return None

    def refused(site: str, reason: str) -> None:
        notice(f"{site}: refused in a library loaded later: {reason}")

    follower = LibraryFollower(target, named, placed, new_probe, on_refused=refused)
    try:
        follower.install()
    except DjprobeError as exc:
        if pending:
            raise DjprobeError(f"cannot wait for {short_list(pending)}: {exc}") from exc
        return None  # a static program: nothing is ever loaded later
    if pending:
        notice(f"pending ({plural(len(pending), 'pattern')}, applied when the library is loaded): {short_list(pending)}")
    return follower


def _names_other_than(target: ProbedProcess, pattern: str, main: object) -> bool:
    try:
        return target.symbols.module(pattern_module(pattern)) is not main  # type: ignore[arg-type]
    except DjprobeError:
        return True
