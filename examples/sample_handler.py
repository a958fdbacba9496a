#!/usr/bin/env python3
"""The seed's sample code (its section 5): register a probe whose handler prints
`Probing(0x...)`, let it fire, unregister it.

    python3 examples/sample_handler.py SITE -- COMMAND [ARG...]
    python3 examples/sample_handler.py -p PID SITE [--seconds S]
"""

from __future__ import annotations

import argparse
import sys

import djprobe


def probe_func(djp: djprobe.Djprobe, regs) -> None:
    # The seed: printk("Probing(0x%p)\n", djp->addr); regs has no instruction pointer.
    print(f"Probing({djp.address:#x}) arg0={regs.arg0:#x} tid={regs.tid}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site")
    parser.add_argument("-p", "--pid", type=int)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if (args.pid is None) == (not command):
        parser.error("give -p PID or -- COMMAND")

    proc = djprobe.attach(args.pid) if args.pid is not None else djprobe.spawn(command)
    with proc:
        djp = djprobe.Djprobe(args.site, handler=probe_func)
        # --register--
        try:
            djprobe.register_djprobe(proc, djp)
        except djprobe.DjprobeError as exc:  # /* error */
            print(f"register_djprobe: errno {exc.errno}: {exc}", file=sys.stderr)
            return 1
        proc.start()  # /* success */
        # --probing--: handlers run in this process as events arrive
        if command:
            while proc.process.is_alive():
                proc.poll(0.05)
        else:
            proc.poll(args.seconds)
        proc.poll(0)  # what was recorded before the end, while the handler is still registered
        # --unregister--
        djprobe.unregister_djprobe(proc, djp)
        print(f"hits={djp.hits} missed={djp.missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
