"""Where the commands write: the report on stdout or ``-o FILE``, djprobe's own banner and
notices on stderr (so they never mix with a spawned command's output or with the report).

Also the wording shared by the commands: plurals, the "Tracing N functions" banner, refusals.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import textwrap
from typing import Iterable, Iterator, TextIO

# A banner lists at most this many patterns, then "and N more".
BANNER_PATTERNS = 5
# ... and stays within this many characters for the pattern list.
BANNER_WIDTH = 60


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """The ``-o FILE`` option of every command that prints a report."""
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the report to FILE instead of standard output (notices stay on stderr)",
    )


@contextlib.contextmanager
def report_stream(args: argparse.Namespace) -> Iterator[TextIO]:
    """The stream the report goes to: ``-o FILE`` (created or truncated now, so a bad path fails
    before anything is probed) or stdout. Raises OSError when FILE cannot be opened."""
    path = getattr(args, "output", None)
    if path is None or path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as out:
        yield out


# Where notices go instead of a direct write to stderr while a command's loop runs: an
# OutputQueue over stderr (cli/_writer.py), so a stderr nobody reads never blocks the loop.
_notice_queue: list = []


def set_notice_queue(queue: object | None) -> None:
    """Send notices through ``queue`` (an OutputQueue over stderr; written with ``keep=True``),
    or again straight to stderr (None)."""
    _notice_queue[:] = [queue] if queue is not None else []


def notice(text: str, *, wrap: bool = False) -> None:
    """A message from djprobe itself (banner, refusals, hints): always on stderr; ``wrap`` folds
    a long note under 80 columns."""
    if wrap:
        text = textwrap.fill(text, 79, subsequent_indent="  ", break_on_hyphens=False)
    if _notice_queue:
        _notice_queue[0].write(text + "\n", keep=True)
        return
    print(text, file=sys.stderr, flush=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 function``, ``2 functions`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def short_list(items: list[str], limit: int = BANNER_PATTERNS, width: int = BANNER_WIDTH) -> str:
    """``a b c`` or, for a long list, its first few items and ``and N more``."""
    shown: list[str] = []
    used = 0
    for item in items[:limit]:
        if shown and used + 1 + len(item) > width:
            break
        shown.append(item)
        used += len(item) + (1 if used else 0)
    rest = len(items) - len(shown)
    text = " ".join(shown)
    return f"{text} and {rest} more" if rest else text


def banner(n_probes: int, patterns: list[str]) -> str:
    """BCC's banner: ``Tracing 3 functions for "libc:*alloc libc:free"... Hit Ctrl-C to end.``"""
    return f'Tracing {plural(n_probes, "function")} for "{short_list(patterns)}"... Hit Ctrl-C to end.'


# A site as the library names it at the start of a message: `libc.so.6:malloc+0x4`, `0x401000`.
_SITE_PREFIX = re.compile(r"^(?:[^\s:]*:[^\s]+|0x[0-9a-fA-F]+): ")


def refusal_reason(site: str, message: str) -> str:
    """The reason of a refusal without the site names the library put in front of it (an error's
    message is ``SITE: reason``; the CLI prints the site once itself)."""
    reason = message
    while True:
        if reason.startswith(site + ": "):
            reason = reason[len(site) + 2 :]
            continue
        m = _SITE_PREFIX.match(reason)
        if m is None:
            return reason
        reason = reason[m.end() :]


def print_traps(probes: Iterable) -> None:
    """Probes placed as traps (kernel uprobes: no jump fits there), with the reason, as notices."""
    rows = [d for d in probes if getattr(d, "mode", None) == "trap"]
    if not rows:
        return
    notice(f"{plural(len(rows), 'site')} traced by a trap (kernel uprobe; --no-trap refuses them):")
    for d in rows:
        notice(f"  {d.site}: no jump: {refusal_reason(d.site or '', d.no_jump_reason or '')}")


def print_refusals(refused: Iterable[tuple[str, str]]) -> None:
    """Sites that could not take a probe, with their reasons, as notices."""
    rows = list(refused)
    if not rows:
        return
    notice(f"{plural(len(rows), 'site')} refused:")
    for site, reason in rows:
        notice(f"  {site}: {reason}")


def vfork_lines(rows: list[tuple[str, int]]) -> list[str]:
    """The hits of vfork/posix_spawn children before their exec (not in the counts above; see
    djprobe.vforks), where there are any."""
    rows = [(site, n) for site, n in rows if n]
    if not rows:
        return []
    width = max([len("FUNC")] + [len(site) for site, _ in rows])
    return ["", "vfork/posix_spawn children, before their exec (not counted above):",
            f"{'FUNC':<{width}}  {'COUNT':>12}"] + [f"{site:<{width}}  {n:>12}" for site, n in rows]
