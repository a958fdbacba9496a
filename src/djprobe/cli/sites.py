"""``djprobe sites``: what a jump probe at a site would displace, and whether it may.

    djprobe sites [-p PID] [--size N] [--json] SITE...
    djprobe sites [-p PID] --all MODULE [--boundaries] [--json]

Without ``-p`` a site names a file: ``PATH:SYMBOL[+OFF]``, ``PATH:0xVADDR`` or a library name
found in this process's own maps or in ``ldconfig -p`` (``libc:malloc``). With ``-p`` sites are
resolved in the live process and the bytes there are compared with the file (another tool's
``int3`` or ``jmp`` makes the site busy).

``--json`` prints JSON lines: one object per site (keys site, address, size, verdict, reason,
busy, module, function, offset, at_entry, flags_dead, instructions, padding); for ``SITE%return``
(a function's return side) keys site, address, verdict, reason, module, function and exits (one
site object per exit window, with exit_kind, exit_address, exit_text); with ``--all`` one object
with the coverage counts, the file the module name resolved to (``module``) and every refused
function entry (``refused_sites``); ``--all --json --each`` prints before it one object per site
(every function entry, or with ``--boundaries`` every instruction boundary: address, verdict,
size, reason, class, function, offset). The text form of ``--all`` names the file, and lists the
refused functions per reason (the first few; ``-v`` every one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import textwrap
from typing import TextIO

from ..errors import InvalidSiteError, SymbolNotFoundError
from ..sites import ExitAnalysis, SiteAnalysis, Verdict, analyse_exits, analyse_site, coverage, split_return_spec
from ..sites.coverage import site_short_jump, site_trap_refusal
from ._output import add_output_argument, report_stream
from ._returns import format_exits

EPILOG = """examples:
  djprobe sites libc:malloc            what a probe at malloc's entry displaces
  djprobe sites /bin/ls:main+0x10      a site inside a function of a file
  djprobe sites -p 1234 libc:free --json
  djprobe sites 'libc:malloc%return'   the exits of malloc and the window at each
  djprobe sites --all libc --boundaries   coverage of every function of libc
"""

WIDTH = 79


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sites",
        help="show what a jump probe at a site would displace, and whether it may",
        description="Disassemble probe sites: the displaced instructions, the verdict (jump or "
        "refused) and the reason. --json prints one JSON object per line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--pid", type=int, help="resolve and check sites in this live process")
    parser.add_argument("--size", type=int, help="displace exactly SIZE bytes (default: the fewest "
                        "whole instructions covering 5 bytes)")
    parser.add_argument("--json", action="store_true", help="JSON lines output")
    add_output_argument(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --all: list every refused function, not only the first few per reason")
    parser.add_argument("--all", metavar="MODULE", help="summarise the coverage of every function of MODULE")
    parser.add_argument("--boundaries", action="store_true",
                        help="with --all: also every instruction boundary, not only function entries")
    parser.add_argument("--each", action="store_true",
                        help="with --all --json: one JSON object per site (address, verdict, reason, size) "
                        "before the coverage object, so every verdict can be audited")
    parser.add_argument("--springboards", action="store_true",
                        help="with --all: also count refused sites where a short jump (jmp rel8 to a "
                        "springboard in dead padding between functions) would fit; count, trace and latency "
                        "place them unless --no-short")
    parser.add_argument("sites", nargs="*", metavar="SITE",
                        help="MODULE:SYMBOL[+OFF], MODULE:0xVADDR, MODULE:sub_VADDR (code no symbol covers, bounds from .eh_frame), or an address with -p")
    parser.set_defaults(run=run)


# -- resolution ---------------------------------------------------------------------------------


def _own_library(name: str) -> str | None:
    """Path of a library called ``name`` (libc, libc.so.6) mapped here, or listed by ldconfig."""
    from ..symbols import Symbols

    try:
        with Symbols.from_process(os.getpid()) as own:
            return own.module(name).path
    except Exception:  # noqa: BLE001 - fall back to ldconfig
        pass
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        line = line.strip()
        if "=>" not in line or "x86-64" not in line:
            continue
        lib, path = line.split(" (", 1)[0].strip(), line.split("=>", 1)[1].strip()
        if lib == name or lib.startswith(name + ".so"):
            return path
    return None


def _file_symbols(module_name: str):
    from ..symbols import Symbols

    if "/" in module_name or os.path.exists(module_name):
        return Symbols.from_file(module_name)
    path = _own_library(module_name)
    if path is None:
        raise SymbolNotFoundError(
            f"no file or library named {module_name!r} (give a path, or -p PID for a live process)"
        )
    return Symbols.from_file(path)


def _split_module(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise InvalidSiteError(f"{spec!r}: without -p a site is MODULE:SYMBOL[+OFF] or MODULE:0xVADDR")
    module, rest = spec.rsplit(":", 1)
    if not module or not rest:
        raise InvalidSiteError(f"{spec!r}: expected MODULE:SYMBOL[+OFF]")
    return module, rest


def _one(symbols, site, size: int | None, at_return: bool) -> SiteAnalysis | ExitAnalysis:
    return analyse_exits(symbols, site) if at_return else analyse_site(symbols, site, size)


def _analyse(args: argparse.Namespace, resolved: dict[str, str]) -> list[SiteAnalysis | ExitAnalysis]:
    """The analyses of the SITEs; ``resolved`` gets the file each module name named."""
    results: list[SiteAnalysis | ExitAnalysis] = []
    if args.pid is not None:
        from ..symbols import Symbols

        with Symbols.from_process(args.pid) as symbols:
            for spec in args.sites:
                spec, at_return = split_return_spec(spec)
                for site in _resolve(symbols, spec):
                    if site is not None and not isinstance(site, int) and site.module is not None and ":" in spec:
                        resolved.setdefault(spec.rsplit(":", 1)[0], site.module.path)
                    results.append(_one(symbols, site, args.size, at_return))
        return results
    opened: dict[str, object] = {}
    for spec in args.sites:
        spec, at_return = split_return_spec(spec)
        module, rest = _split_module(spec)
        symbols = opened.get(module)
        if symbols is None:
            symbols = opened[module] = _file_symbols(module)
        mod = symbols.modules[0]
        resolved.setdefault(module, mod.path)
        try:
            sites = _resolve(symbols, f"{mod.path}:{rest}")
        except InvalidSiteError as exc:
            if "IFUNC" not in str(exc):
                raise
            sites = _resolve(symbols, f"{mod.path}:{_own_ifunc_choice(mod.path, rest, exc)}")
        for site in sites:
            results.append(_one(symbols, site, args.size, at_return))
    return results


def _own_ifunc_choice(path: str, name: str, error: InvalidSiteError) -> str:
    """The implementation this machine selects for IFUNC ``name`` of the library at ``path``,
    as resolved in this very process (which maps the same file), or re-raise ``error``."""
    from ..symbols import Symbols

    base, plus, offset = name.partition("+")
    try:
        with Symbols.from_process(os.getpid()) as own:
            mine = [m for m in own.modules if os.path.realpath(m.path) == os.path.realpath(path)]
            if not mine:
                raise error
            (site,) = own.resolve(f"{mine[0].path}:{base}")
            if site.function is None:
                raise error
            return site.function.name + plus + offset
    except InvalidSiteError:
        raise error from None


def _resolve(symbols, spec: str):
    if spec.lower().startswith("0x") and symbols.live:
        return [int(spec, 16)]
    return symbols.resolve(spec)


# -- output -------------------------------------------------------------------------------------


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def format_site(res: SiteAnalysis, size_asked: int | None = None) -> str:
    """The human form of one analysis (lines under 80 columns); the short jump a probe would
    take where no jmp rel32 fits, unless a size was asked for."""
    lines = []
    head = res.site
    if res.module is not None and res.function is not None:
        off = res.address - res.function.address
        where = f"{res.module.name}:{res.function.name}" + (f"+{off:#x}" if off else "")
        if where != head:
            head += f" ({where})"
    lines.append(_wrap(f"{head} at {res.address:#x}", ""))
    for ins in res.displaced:
        lines.append(_insn_line(ins.address, ins.raw, ins.text, ""))
    for ins in res.padding:
        lines.append(_insn_line(ins.address, ins.raw, ins.text, "  (padding)"))
    verdict = "JUMP" if res.verdict is Verdict.JUMP else ("BUSY" if res.busy else "REFUSED")
    extra = []
    if res.verdict is Verdict.JUMP:
        if res.at_entry:
            extra.append("function entry")
        extra.append("flags dead" if res.flags_dead else "flags live")
    lines.append(f"  size {res.size}: {verdict}" + (f" ({', '.join(extra)})" if extra else ""))
    if res.verdict is not Verdict.JUMP:
        lines.append(_wrap(res.reason, "  "))
        short = site_short_jump(res) if size_asked is None else None
        if short is not None:
            lines.append(_wrap(f"{short.window.reason} (count, trace and latency place it unless --no-short)", "  "))
        if res.exit is None:
            why = site_trap_refusal(res)
            lines.append(_wrap("trap: a kernel uprobe can go here (count/trace place one unless --no-trap)"
                               if why is None else f"no trap either: {why}", "  "))
    return "\n".join(lines)


def _insn_line(address: int, raw: bytes, text: str, suffix: str) -> str:
    hexb = raw.hex(" ")
    if len(hexb) > 23:
        hexb = hexb[:20] + "..."
    line = f"  {address:#014x}  {hexb:<23}  {text}{suffix}"
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


# Refused functions shown per reason class in text output without -v.
EXAMPLES_PER_REASON = 3


def format_coverage(rep, *, name: str | None = None, verbose: bool = False) -> str:
    """The human form of a coverage report: the file a module name resolved to, the counts, and
    the refused functions grouped by reason (the first few per reason, every one when
    ``verbose``)."""
    path = rep.module
    lines = []
    if name is not None and name != path:
        lines.append(f"module {name}: {path}")
    base = os.path.basename(path)
    lines.append(_wrap(f"{base}: {rep.entries} function entries, {rep.entries_jump} take a jump "
                       f"({100 * rep.entry_ratio:.2f}%), {rep.entries - rep.entries_jump} refused "
                       f"[{rep.seconds:.1f}s]", ""))
    by_class: dict[str, list] = {}
    for entry in rep.refused_entries:
        by_class.setdefault(entry.reason_class, []).append(entry)
    lines.append(_wrap(f"reachable at all (jump or trap): {rep.entries_jump + rep.entries_trap} "
                       f"({100 * rep.reachable_ratio:.2f}%): {rep.entries_trap} of the refused take a trap "
                       f"(kernel uprobe), {sum(rep.entries_neither.values())} neither", ""))
    for why, n in rep.entries_neither.most_common():
        lines.append(f"  {n:7d}  neither: {why}")
    for cls, n in rep.refused.most_common():
        lines.append(f"  {n:7d}  {cls}")
        entries = by_class.get(cls, [])
        shown = entries if verbose else entries[:EXAMPLES_PER_REASON]
        for entry in shown:
            lines.append(_wrap(f"{entry.site} ({entry.address:#x}): {entry.reason}", " " * 11))
        if len(entries) > len(shown):
            lines.append(f"{'':11}... and {len(entries) - len(shown)} more (-v lists every one)")
    if rep.returns:
        lines.append(_wrap(f"return side: {rep.returns_jump} of {rep.functions} functions take a jump at every "
                           f"exit ({100 * rep.return_ratio:.2f}%); entry and every exit: {rep.both_jump} "
                           f"({100 * rep.both_ratio:.2f}%)", ""))
        for cls, n in rep.both_refused.most_common():
            lines.append(f"  {n:7d}  {cls}")
    if rep.boundaries:
        lines.append(_wrap(f"all instruction boundaries: {rep.boundaries}, {rep.boundaries_jump} take a jump "
                           f"({100 * rep.boundary_ratio:.2f}%); jump or trap: "
                           f"{rep.boundaries_jump + rep.boundaries_trap} ({100 * rep.boundary_reachable_ratio:.2f}%), "
                           f"neither: {sum(rep.boundaries_neither.values())}", ""))
        for why, n in rep.boundaries_neither.most_common():
            lines.append(f"  {n:7d}  neither: {why}")
        for cls, n in rep.boundary_refused.most_common():
            lines.append(f"  {n:7d}  {cls}")
        if rep.springboards:
            lines.append(_wrap(f"with short jumps through springboards (placed unless --no-short): "
                               f"{rep.boundaries_jump + rep.boundaries_short} ({100 * rep.boundary_short_ratio:.2f}%); "
                               f"{rep.boundaries_short} of the refused, by reason:", ""))
            for cls, n in rep.boundary_short_by.most_common():
                lines.append(f"  {n:7d}  {cls}")
    return "\n".join(lines)


def _each_printer(out: TextIO):
    """The ``--each`` callback: one JSON line per analysed site."""
    from ..sites import _reason_class

    def each(res: SiteAnalysis) -> None:
        func = res.function
        obj = {
            "address": f"{res.address:#x}",
            "verdict": res.verdict.value,
            "size": res.size,
            "reason": res.reason,
            "class": None if res.ok else _reason_class(res.reason),
            "function": func.name if func is not None else None,
            "offset": (res.address - func.address) if func is not None else None,
        }
        if res.springboard is not None:
            obj["springboard"] = f"{res.springboard:#x}"
        print(json.dumps(obj), file=out)

    return each


def run(args: argparse.Namespace) -> int:
    with report_stream(args) as out:
        return _run(args, out)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.all:
        if args.sites:
            raise InvalidSiteError("give either --all MODULE or SITEs, not both")
        if args.each and not args.json:
            raise InvalidSiteError("--each goes with --all MODULE --json")
        each = _each_printer(out) if args.each else None
        if args.pid is not None:
            from ..symbols import Symbols

            with Symbols.from_process(args.pid) as symbols:
                module = symbols.module(args.all)
                rep = coverage(module, symbols._mem(), all_boundaries=args.boundaries, each=each,
                               springboards=args.springboards)
        else:
            module = _file_symbols(args.all).modules[0]
            rep = coverage(module, all_boundaries=args.boundaries, each=each, springboards=args.springboards)
        if args.json:
            obj = rep.to_json()
            obj["module_name"] = args.all
            print(json.dumps(obj), file=out)
        else:
            print(format_coverage(rep, name=args.all, verbose=args.verbose), file=out)
        return 0
    if args.boundaries or args.each or args.springboards:
        raise InvalidSiteError("--boundaries, --each and --springboards go with --all MODULE")
    if not args.sites:
        raise InvalidSiteError("no site given (SITE... or --all MODULE)")
    resolved: dict[str, str] = {}
    results = _analyse(args, resolved)
    if not args.json:
        for name, path in resolved.items():
            if name != path:
                print(f"module {name}: {path}", file=out)
    for i, res in enumerate(results):
        if args.json:
            obj = res.to_json()
            if isinstance(res, SiteAnalysis) and not res.ok and res.exit is None:
                why = site_trap_refusal(res)
                obj.update(trap=why is None, trap_refusal=why)
                short = site_short_jump(res) if args.size is None else None
                obj.update(short_jump=None if short is None else {
                    "size": short.window.size, "springboard": short.springboard, "reason": short.window.reason})
            print(json.dumps(obj), file=out)
        else:
            if i:
                print(file=out)
            print(format_exits(res) if isinstance(res, ExitAnalysis) else format_site(res, args.size), file=out)
    return 0 if all(r.verdict is Verdict.JUMP for r in results) else 1
