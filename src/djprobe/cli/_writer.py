"""A bounded writer for the report of the commands that print events: the tracer's loop never
waits for its standard output.

``trace`` (one process, ``--follow``, a fleet) drains the rings and takes in new children in one
loop; a write to a pipe nobody reads (``djprobe trace -f ... | (sleep 60)``) or to a slow terminal
would block that loop, so children waiting for the tracer (2 s at most) would go on without
probes and the rings would fill. The loop hands its lines to an :class:`OutputQueue` instead:
they are kept in memory, up to a bound in bytes, and written by a thread of their own. When the
bound is reached, further lines are dropped and counted, as perf and bpftrace count lost events;
the command reports the count (summary, stderr at exit).

The writer thread never sets ``O_NONBLOCK`` on the stream (the file description is shared with
the command djprobe started, whose writes would fail with EAGAIN): it waits with ``poll`` for room
and writes at most ``PIPE_BUF`` bytes of whole lines at a time, which a pipe takes whole or not
at all. At the end, :meth:`OutputQueue.close` waits for the queue to be written, without a limit
while nothing asks djprobe to end (a slow reader gets everything, as with any program writing to
a pipe), and at most ``grace`` seconds once a signal did; lines left then are counted as not
written.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TextIO

from ._output import notice, plural, report_stream, set_notice_queue

# Bytes of output kept in memory while the output is not read (the default of --output-queue).
DEFAULT_LIMIT = 8 << 20
# Bytes written at once: a pipe takes a write of at most PIPE_BUF bytes whole or not at all.
CHUNK = select.PIPE_BUF
# Seconds the writer waits for room at a time before looking whether it must stop.
_POLL_S = 0.05
# Seconds djprobe goes on writing its queue once a signal asked it to end.
GRACE_S = 1.0


@dataclass(frozen=True)
class OutputLoss:
    """What an :class:`OutputQueue` could not write: ``dropped`` lines refused while the queue was
    full, ``unwritten`` lines still queued (or cut) when it was closed, of ``lines`` in all."""

    lines: int
    dropped: int
    unwritten: int

    @property
    def lost(self) -> int:
        """Every line not written."""
        return self.dropped + self.unwritten


class OutputQueue:
    """A text stream whose writes never block: complete lines are queued (at most ``limit`` bytes)
    and written to ``out``'s file descriptor by a thread; a line that does not fit is dropped and
    counted. ``write`` and ``flush`` follow ``TextIO`` so ``print(..., file=queue)`` works; a
    partial line waits for its end.

    Raises ValueError for a ``limit`` below 1, and OSError when ``out`` has no file descriptor.
    Once the reader has gone (EPIPE), ``write`` and ``flush`` raise BrokenPipeError, as a write
    to ``out`` would have.
    """

    def __init__(self, out: TextIO, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"an output queue of {limit} bytes: at least 1 byte is needed")
        out.flush()  # what was written to the stream before goes first
        self.fd = out.fileno()
        self.limit = limit
        self._lock = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()  # encoded whole lines, by write
        self._head = 0  # bytes of _queue[0] already taken by the writer
        self._queued = 0  # bytes in _queue not taken yet
        self._partial = ""  # the start of a line not ended yet
        self._group: list[str] | None = None  # the lines of a record being written
        self._lines = 0  # lines given to the queue (kept or dropped)
        self._dropped = 0  # lines dropped while the queue was full
        self._in_flight = 0  # lines taken by the writer, not written yet
        self._written = 0
        self._stop = False  # close: write nothing more
        self._writing = False  # the thread is inside os.write
        self._closing = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="djprobe-output", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Lines dropped so far because the queue was full."""
        return self._dropped

    @property
    def written(self) -> int:
        """Lines written to the stream so far."""
        return self._written

    @property
    def broken(self) -> bool:
        """Whether the reader has gone (a write failed with EPIPE)."""
        return self._error is not None and self._error.errno == errno.EPIPE

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the queue."""
        return self._queued

    def write_lines(self, lines: Iterable[str], *, keep: bool = False) -> None:
        """Queue ``lines`` (each without its ``"\\n"``): as many of the first ones as the bound
        leaves room for, the others dropped and counted, unless ``keep`` (a summary: queued
        whatever the bound).
        Raises BrokenPipeError once the reader has gone, ValueError after ``close``."""
        lines = list(lines)
        if not lines:
            return
        text, self._partial = self._partial + "\n".join(lines) + "\n", ""  # after a partial line of write()
        self._queue_text(text, keep)

    @contextlib.contextmanager
    def record(self, *, keep: bool = False) -> Iterator[None]:
        """Everything written inside is one record, queued whole or dropped whole (a report of
        ``count -i``: never half a table), or queued whatever the bound when ``keep``."""
        if self._group is not None:
            raise ValueError("records do not nest")
        self._group = []
        try:
            yield
        finally:
            group, self._group = self._group, None
            if group:
                self._queue_text("".join(group), keep, whole=True)

    def _queue_text(self, text: str, keep: bool, whole: bool = False) -> None:
        """Queue ``text``, whole lines: as much of it as fits (whole lines, the first ones), all
        of it when ``keep``, all of it or nothing when ``whole``."""
        if self._group is not None:
            self._group.append(text)
            return
        data = text.encode("utf-8", "backslashreplace")
        n = data.count(b"\n")
        with self._lock:
            self._check()
            self._lines += n
            room = self.limit - self._queued
            if not keep and len(data) > room:
                cut = 0 if whole or room <= 0 else data.rfind(b"\n", 0, room) + 1
                self._dropped += n - data.count(b"\n", 0, cut)
                data = data[:cut]
            if data:
                self._queue.append(data)
                self._queued += len(data)
                self._lock.notify_all()

    def write(self, text: str, *, keep: bool = False) -> int:
        """``TextIO.write``: the complete lines of ``text`` (after what is left of an earlier
        partial line) are queued as :meth:`write_lines` does. Returns ``len(text)``."""
        head, newline, tail = text.rpartition("\n")
        if not newline:
            self._partial += text
            with self._lock:
                self._check()
            return len(text)
        whole, self._partial = self._partial + head + "\n", tail
        self._queue_text(whole, keep)
        return len(text)

    def flush(self) -> None:
        """Nothing to do (the thread writes as soon as it can); raises BrokenPipeError once the
        reader has gone."""
        with self._lock:
            self._check()

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def _check(self) -> None:
        if self._error is not None:
            if self._error.errno == errno.EPIPE:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            raise self._error
        if self._closing:
            raise ValueError("write to a closed output queue")

    def close(self, give_up: Callable[[], bool] = lambda: False, grace: float = GRACE_S) -> OutputLoss:
        """Write what is queued (a partial line ended first) and end the thread: without a time
        limit while ``give_up()`` is false, then for at most ``grace`` seconds; lines left are
        counted as not written. Returns what was lost. A second call returns the same."""
        if self._partial:
            partial, self._partial = self._partial, ""
            try:
                self.write_lines([partial], keep=True)
            except (OSError, ValueError):
                pass
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        deadline = None
        while self._thread.is_alive():
            if deadline is None and give_up():
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._thread.join(_POLL_S)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
            end = time.monotonic() + _POLL_S * 10
            while self._writing and time.monotonic() < end:  # a write that saw room ends now
                self._lock.wait(_POLL_S)
        self._thread.join(_POLL_S)
        with self._lock:
            # Lines still queued, or taken by a write that did not finish (a thread still
            # blocked in write() is abandoned: a daemon, it ends with djprobe).
            unwritten = sum(e.count(b"\n") for e in self._queue) + self._in_flight
            if self._queue:
                unwritten -= self._queue[0].count(b"\n", 0, self._head)
            if self._error is not None:  # EPIPE: the reader has gone, nothing more is written
                unwritten = self._lines - self._dropped - self._written
            return OutputLoss(self._lines, self._dropped, unwritten)

    # -- the writer thread ------------------------------------------------------------------

    def _take(self) -> bytes | None:
        """Whole lines of at most CHUNK bytes (one longer line alone), or None when done."""
        with self._lock:
            while not self._queue and not self._closing and not self._stop:
                self._lock.wait()
            if self._stop or not self._queue:
                return None
            pieces: list[bytes] = []
            size = 0
            while self._queue:
                entry, start = self._queue[0], self._head
                end = start + CHUNK - size
                if end >= len(entry):  # the rest of this write fits
                    pieces.append(entry[start:] if start else entry)
                    size += len(entry) - start
                    self._queue.popleft()
                    self._head = 0
                    continue
                cut = entry.rfind(b"\n", start, end) + 1
                if cut <= start:  # not one whole line fits the room left
                    if pieces:
                        break
                    cut = entry.find(b"\n", start) + 1  # a line longer than CHUNK, alone
                pieces.append(entry[start:cut])
                size += cut - start
                if cut == len(entry):
                    self._queue.popleft()
                    self._head = 0
                else:
                    self._head = cut
                break
            taken = b"".join(pieces)
            self._queued -= len(taken)
            self._in_flight = taken.count(b"\n")
            return taken

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            taken = self._take()
            if taken is None:
                return
            data = memoryview(taken)
            try:
                while data:
                    if not poller.poll(_POLL_S * 1000) and not self._stop:
                        continue
                    with self._lock:
                        if self._stop:  # close decides what was written: nothing after that
                            return
                        self._writing = True
                    try:
                        n = os.write(self.fd, data[:CHUNK])  # room was seen: does not wait
                    finally:
                        with self._lock:
                            self._writing = False
                            self._lock.notify_all()
                    data = data[n:]
            except OSError as exc:
                with self._lock:
                    self._error = exc
                    self._in_flight = 0
                return
            with self._lock:
                self._written += self._in_flight
                self._in_flight = 0


def add_queue_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--output-queue BYTES`` option of the commands that print through an OutputQueue."""
    parser.add_argument(
        "--output-queue",
        type=_byte_count,
        default=DEFAULT_LIMIT,
        metavar="BYTES",
        help="output kept in memory while it is not read (default 8M; K and M suffixes); "
        "lines beyond it are dropped and counted",
    )


def _byte_count(text: str) -> int:
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        n = int(text[:-1] if scale > 1 else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return n * scale


def loss_note(loss: OutputLoss) -> str | None:
    """The notice for what the output lost, or None when nothing was."""
    if not loss.lost:
        return None
    why = []
    if loss.dropped:
        why.append(f"{loss.dropped} dropped while the output queue was full")
    if loss.unwritten:
        why.append(f"{loss.unwritten} still queued when djprobe ended")
    return (f"djprobe: {loss.lost} of {plural(loss.lines, 'output line')} not written "
            f"(the output was not read fast enough): {', '.join(why)}")


@contextlib.contextmanager
def queued_report(args: argparse.Namespace, give_up: Callable[[], str | None]) -> Iterator[OutputQueue]:
    """The command's report stream (``-o FILE`` or stdout, as ``report_stream``) behind an
    :class:`OutputQueue` of ``args.output_queue`` bytes, and notices through one over stderr
    (never dropped). At the end the queues are written out: for as long as it takes while
    ``give_up()`` is false and no SIGINT, SIGTERM or SIGHUP comes, then for at most GRACE_S
    seconds; what the report could not write is said on stderr. A reader that has gone
    (``| head``) is not reported. A stream without a file descriptor is used as it is."""
    with report_stream(args) as out:
        try:
            queue = OutputQueue(out, getattr(args, "output_queue", DEFAULT_LIMIT))
        except OSError:  # io.UnsupportedOperation: no file descriptor (a test's StringIO)
            yield out
            return
        try:
            notices: OutputQueue | None = OutputQueue(sys.stderr, DEFAULT_LIMIT)
        except (OSError, AttributeError):
            notices = None
        set_notice_queue(notices)
        signalled: list[int] = []
        try:
            yield queue
        finally:
            previous = {}
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    previous[sig] = signal.signal(sig, lambda signum, frame: signalled.append(signum))
            except ValueError:  # not the main thread: no handlers, give_up() alone
                pass
            stop = lambda: bool(signalled) or give_up() is not None  # noqa: E731
            try:
                loss = queue.close(stop)
                note = None if queue.broken else loss_note(loss)
                if note is not None:
                    try:
                        notice(note)
                    except (OSError, ValueError):  # stderr's reader gone too
                        pass
                set_notice_queue(None)
                if notices is not None:
                    notices.close(stop)
            finally:
                set_notice_queue(None)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


def write_kept(out: TextIO, text: str) -> None:
    """Write ``text`` (whole lines) to ``out``; through an OutputQueue, whatever its bound (the
    summary that reports the drops is never dropped itself)."""
    if isinstance(out, OutputQueue):
        out.write(text, keep=True)
    else:
        out.write(text)
        out.flush()


def dropped_lines(out: TextIO) -> int:
    """Lines ``out`` dropped so far (0 for a plain stream)."""
    return out.dropped if isinstance(out, OutputQueue) else 0


def output_note(dropped: int) -> str | None:
    """The summary's line for event lines the queue dropped, or None when it dropped none."""
    if not dropped:
        return None
    return f"{plural(dropped, 'output line')} dropped: the output was not read fast enough"


def report_record(out: TextIO, *, keep: bool = False) -> contextlib.AbstractContextManager:
    """``out.record(keep=...)`` for an OutputQueue (one report queued or dropped whole), nothing
    for a plain stream."""
    return out.record(keep=keep) if isinstance(out, OutputQueue) else contextlib.nullcontext()


def interval_note(out: TextIO) -> str:
    """What an interval report's header adds once the queue dropped lines: `` (N output lines
    dropped)``, else nothing."""
    n = dropped_lines(out)
    return f" ({plural(n, 'output line')} dropped)" if n else ""
