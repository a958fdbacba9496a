"""The bounded writer of the CLI's event output (cli/_writer.py) over a real pipe: the bound, the
drops counted line by line, a summary kept beyond the bound, close waiting for a slow reader and
giving up after its grace once told to, EPIPE surfacing as BrokenPipeError."""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time

import pytest

from djprobe.cli._writer import OutputQueue, loss_note

pytestmark = pytest.mark.timeout(60)

LINE = "x" * 15  # 16 bytes with its "\n"


def _wait(cond, what: str, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


class _Pipe:
    """A pipe whose write end the queue writes to (through a file object, as stdout is)."""

    def __init__(self) -> None:
        self.r, w = os.pipe()
        self.capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        self.out = os.fdopen(w, "w")

    def full(self) -> bool:
        p = select.poll()
        p.register(self.out.fileno(), select.POLLOUT)
        return not p.poll(0)

    def fill(self) -> int:
        """Fill the pipe with whole 16-byte lines; returns how many."""
        os.set_blocking(self.out.fileno(), False)
        n = 0
        try:
            while True:
                os.write(self.out.fileno(), (LINE + "\n").encode())
                n += 1
        except BlockingIOError:
            pass
        os.set_blocking(self.out.fileno(), True)
        return n

    def read_all(self) -> bytes:
        os.set_blocking(self.r, False)
        chunks = []
        try:
            while True:
                data = os.read(self.r, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        except BlockingIOError:
            pass
        return b"".join(chunks)

    def close(self) -> None:
        for f in (lambda: self.out.close(), lambda: os.close(self.r)):
            try:
                f()
            except OSError:
                pass


@pytest.fixture
def pipe():
    p = _Pipe()
    yield p
    p.close()


def test_lines_beyond_the_bound_are_dropped_and_counted(pipe):
    prefill = pipe.fill()
    q = OutputQueue(pipe.out, limit=100 * 16)
    first = [f"{i:014d}a" for i in range(100)]  # one chunk (< CHUNK): taken by the writer, blocked
    q.write_lines(first)
    _wait(lambda: q.queued_bytes == 0, "the writer to take the first chunk")
    rest = [f"{i:014d}b" for i in range(250)]
    q.write_lines(rest[:40])
    q.write("\n".join(rest[40:]) + "\n")  # the TextIO way: dropped line by line too
    assert q.dropped == 150 and q.queued_bytes == 100 * 16
    q.write("summary\n", keep=True)  # kept beyond the bound
    assert q.dropped == 150
    reader_out: list[bytes] = []
    reader = threading.Thread(target=lambda: reader_out.append(_read_until_eof(pipe.r)))
    reader.start()
    loss = q.close(give_up=lambda: False)
    pipe.out.close()
    reader.join(10)
    lines = reader_out[0].decode().splitlines()
    assert lines == [LINE] * prefill + first + rest[:100] + ["summary"]
    assert (loss.lines, loss.dropped, loss.unwritten) == (100 + 250 + 1, 150, 0)
    assert loss_note(loss).startswith("djprobe: 150 of 351 output lines not written")


def _read_until_eof(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_writes_never_wait_for_the_reader(pipe):
    prefill = pipe.fill()
    q = OutputQueue(pipe.out, limit=1 << 20)
    started = time.monotonic()
    for i in range(2000):
        q.write_lines([f"{i:015d}"])
        q.flush()
    assert time.monotonic() - started < 5  # not a timing assertion of speed: blocked would be forever
    assert q.dropped == 0 and pipe.full()
    q.close(give_up=lambda: True, grace=0.0)
    assert len(pipe.read_all()) == prefill * 16


def test_close_gives_up_after_its_grace_and_counts_what_is_left(pipe):
    prefill = pipe.fill()
    q = OutputQueue(pipe.out, limit=1 << 20)
    q.write_lines(f"{i:015d}" for i in range(1000))
    q.write("partial")  # a line not ended: ended at close, and counted
    asked = threading.Event()
    threading.Timer(0.2, asked.set).start()
    started = time.monotonic()
    loss = q.close(give_up=asked.is_set, grace=0.3)
    took = time.monotonic() - started
    assert 0.45 <= took < 3.0  # 0.2 s before giving up, then its grace of 0.3 s
    assert (loss.lines, loss.dropped, loss.unwritten) == (1001, 0, 1001)
    assert pipe.read_all() == (LINE + "\n").encode() * prefill  # nothing more was written
    assert q.close() == loss


def test_close_waits_for_a_slow_reader_without_a_limit(pipe):
    prefill = pipe.fill()
    q = OutputQueue(pipe.out, limit=1 << 20)
    print("first", file=q)
    print("second", end="", file=q)
    q.write_lines(f"{i:015d}" for i in range(3000))
    got: list[bytes] = []

    def late_reader() -> None:
        time.sleep(0.5)  # the reader comes late; close must still write everything
        got.append(_read_until_eof(pipe.r))

    reader = threading.Thread(target=late_reader)
    reader.start()
    loss = q.close(give_up=lambda: False)
    pipe.out.close()
    reader.join(10)
    assert loss.lost == 0 and loss.lines == 3001
    lines = got[0].decode().split("\n")
    assert lines[prefill:] == ["first", "second" + "000000000000000"] + [f"{i:015d}" for i in range(1, 3000)] + [""]


def test_a_reader_gone_raises_broken_pipe_in_the_writer_of_lines(pipe):
    q = OutputQueue(pipe.out, limit=1 << 20)
    os.close(pipe.r)
    with pytest.raises(BrokenPipeError):
        for _ in range(1000):
            q.write_lines(["line"])
            time.sleep(0.001)
    assert q.broken
    loss = q.close(give_up=lambda: True, grace=0.1)
    assert loss.lines >= 1 and loss.dropped == 0


def test_bad_bound_is_refused(pipe):
    with pytest.raises(ValueError, match="0 bytes"):
        OutputQueue(pipe.out, limit=0)


def test_a_record_is_queued_whole_or_dropped_whole(pipe):
    prefill = pipe.fill()
    q = OutputQueue(pipe.out, limit=10 * 16)
    q.write_lines([LINE])
    _wait(lambda: q.queued_bytes == 0, "the writer to take the first line")
    with q.record():
        print("\n".join(f"{i:015d}" for i in range(6)), file=q)  # 6 lines: fit
    with q.record():
        q.write("\n".join(f"{i:014d}b" for i in range(6)) + "\n")  # 6 more: 12 > 10, all dropped
    assert q.dropped == 6 and q.queued_bytes == 6 * 16
    with q.record(keep=True):  # a final report: whatever the bound
        q.write("final\nreport\n")
    assert q.dropped == 6
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_read_until_eof(pipe.r)))
    reader.start()
    loss = q.close()
    pipe.out.close()
    reader.join(10)
    assert got[0].decode().splitlines() == [LINE] * (prefill + 1) + [f"{i:015d}" for i in range(6)] + ["final", "report"]
    assert (loss.lines, loss.dropped, loss.unwritten) == (15, 6, 0)


def test_long_lines_and_big_writes_arrive_whole_and_in_order(pipe):
    q = OutputQueue(pipe.out, limit=1 << 22)
    long_line = "L" * (3 * 4096 + 17)  # longer than PIPE_BUF: written alone, in pieces
    batch = [f"{i:07d} " + "y" * (i % 300) for i in range(5000)]
    q.write_lines(batch[:2500])
    q.write_lines([long_line])
    q.write("\n".join(batch[2500:]) + "\n")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_read_until_eof(pipe.r)))
    reader.start()
    loss = q.close()
    pipe.out.close()
    reader.join(10)
    assert got[0].decode().splitlines() == batch[:2500] + [long_line] + batch[2500:]
    assert (loss.lines, loss.lost) == (5001, 0) and q.written == 5001
