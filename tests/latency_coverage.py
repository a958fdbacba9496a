"""How many functions of a module take a latency probe (entry + every exit, as
``djprobe latency`` places them): ``python3 -m tests.latency_coverage FILE [--show N]``.

Counts each function address once (aliases share it; ``sub_*`` FDE-only functions are left out),
and says why the others are refused: the return side (some exit has no window), the entry, or an
entry window that overlaps the exit windows in a way one stub cannot serve."""

from __future__ import annotations

import argparse
import collections

from djprobe.latency import entry_plan
from djprobe.sites import analyse_exits, analyse_site
from djprobe.symbols import Symbols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--show", type=int, default=0, help="print the first N overlap refusals")
    args = ap.parse_args()
    symbols = Symbols.from_file(args.file)
    module = symbols.modules[0]
    seen: set[int] = set()
    refused: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    total = shown = 0
    for f in module.functions():
        if f.address in seen or f.name.startswith("sub_"):
            continue
        seen.add(f.address)
        total += 1
        exits = analyse_exits(symbols, f.address)
        if not exits.ok:
            refused["return side"] += 1
            continue
        entry = analyse_site(symbols, f.address)
        if not entry.ok:
            refused["entry"] += 1
            continue
        used, both, why = entry_plan(entry, exits.windows, lambda size: analyse_site(symbols, f.address, size))
        if why is not None:
            refused["overlap"] += 1
            if shown < args.show:
                shown += 1
                print(f"{f.name}: {why}")
            continue
        if both is not None:
            kinds["one stub, way into an exit block" if both.exit_path else "one stub, entry window ends at an exit"] += 1
            if used is not entry:
                kinds["of which the entry window grew"] += 1
    took = total - sum(refused.values())
    print(f"{args.file}: {took}/{total} functions ({100 * took / total:.2f}%) take a latency probe")
    print(f"  refused: {dict(refused)}")
    print(f"  entry and exit in one stub: {dict(kinds)}")


if __name__ == "__main__":
    main()
