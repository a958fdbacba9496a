"""The ``djprobe`` command line: a thin shell over the library. The only layer that prints."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import DjprobeError

# Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``.
SUBCOMMANDS = ["sites", "count", "trace", "latency", "status", "cleanup"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="djprobe",
        description="Direct-jump probes for live x86-64 Linux processes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, parsing): nothing to undo
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command to run under probes.
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_argv = command
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output closed (e.g. `| head`): silence the interpreter's flush error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except DjprobeError as exc:
        if args.debug:
            raise
        print(f"djprobe: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the command after -- cannot be run
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"djprobe: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
