"""What the CLI's output queue (``djprobe.cli._writer.OutputQueue``) costs the tracer's loop: lines
per second handed to it, and written through it into a pipe that ``cat > /dev/null`` drains,
next to plain ``TextIO`` writes of the same batches into the same kind of pipe.

    python3 -m bench.output_queue [--lines N] [--batch N] [--reps N]

Each rep writes N trace-like lines (about 60 bytes) in batches of ``--batch`` (a drained ring's
worth), as ``write_events`` does: one ``write`` of the joined batch. Prints medians; no timing is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

from djprobe.cli._writer import OutputQueue


def _lines(n: int) -> list[str]:
    return [f"{i / 1e6:<15.6f} {1000 + i % 7:<7} prog:fc_work 0x{i:x} 0x{2 * i:x} 0x0" for i in range(n)]


def _sink() -> tuple[subprocess.Popen, object]:
    r, w = os.pipe()
    cat = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
    os.close(r)
    return cat, os.fdopen(w, "w")


def _direct(batches: list[str]) -> float:
    cat, out = _sink()
    start = time.perf_counter()
    for text in batches:
        out.write(text)
        out.flush()
    out.close()
    took = time.perf_counter() - start
    cat.wait(60)
    return took


def _queued(batches: list[str], limit: int) -> tuple[float, float, int]:
    """(seconds handing the batches over, seconds until written, lines dropped)."""
    cat, out = _sink()
    queue = OutputQueue(out, limit)
    start = time.perf_counter()
    for text in batches:
        queue.write(text)
    handed = time.perf_counter() - start
    loss = queue.close()
    written = time.perf_counter() - start
    out.close()
    cat.wait(60)
    return handed, written, loss.lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    lines = _lines(args.lines)
    batches = ["\n".join(lines[i:i + args.batch]) + "\n" for i in range(0, len(lines), args.batch)]
    size = sum(map(len, batches))
    direct = [_direct(batches) for _ in range(args.reps)]
    queued = [_queued(batches, 1 << 30) for _ in range(args.reps)]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}; {args.lines} lines ({size / 1e6:.1f} MB), batches of {args.batch}, "
          f"{args.reps} reps, medians")
    d = statistics.median(direct)
    h = statistics.median(q[0] for q in queued)
    w = statistics.median(q[1] for q in queued)
    print(f"direct writes into the pipe:        {d:.3f} s  {args.lines / d / 1e6:.2f} M lines/s")
    print(f"queued, handed over (the loop's):   {h:.3f} s  {args.lines / h / 1e6:.2f} M lines/s")
    print(f"queued, until written by the thread: {w:.3f} s  {args.lines / w / 1e6:.2f} M lines/s")
    print(f"lines lost: {max(q[2] for q in queued)}")


if __name__ == "__main__":
    main()
