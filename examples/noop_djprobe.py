#!/usr/bin/env python3
"""The seed's noop_djprobe, in user space: place a probe, let it count, report, remove it.

    python3 examples/noop_djprobe.py -p PID SITE [--size N] [--seconds S]
    python3 examples/noop_djprobe.py SITE -- COMMAND [ARG...]

SITE is `symbol`, `module:symbol`, `0xADDR`, each with an optional `+offset`.
"""

from __future__ import annotations

import argparse
import sys
import time

import djprobe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site")
    parser.add_argument("-p", "--pid", type=int)
    parser.add_argument("--size", type=int, help="bytes to displace (computed when left out)")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long to count (attach mode)")
    args = parser.parse_args(argv)
    if (args.pid is None) == (not command):
        parser.error("give -p PID or -- COMMAND")

    proc = djprobe.attach(args.pid) if args.pid is not None else djprobe.spawn(command)
    with proc:
        djp = djprobe.Djprobe(args.site, size=args.size)
        try:
            djprobe.register_djprobe(proc, djp)
        except djprobe.DjprobeError as exc:
            print(f"register_djprobe failed: errno {exc.errno}: {exc}", file=sys.stderr)
            return 1
        print(f"djprobe at {djp.address:#x} ({djp.site}) size={djp.analysis.size}", flush=True)
        proc.start()
        if command:
            proc.process.popen.wait()
        else:
            time.sleep(args.seconds)
        djprobe.unregister_djprobe(proc, djp)
        print(f"hits={djp.hits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
