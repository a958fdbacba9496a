"""What the stopped threads' stacks hold: every code address a thread may return or resume into.

A thread can come back to an address other than through its ``rip``: a return address, or the
``rip`` saved in a signal frame (the kernel's ``rt_sigframe``; ``sigreturn`` resumes there). Before
a jump overwrites displaced bytes, or before a stub's memory is freed, no thread may hold such an
address there. :meth:`StackWords.of` reads, for every stopped thread, its *whole used stack*: from
``rsp`` (aligned down to 8) to the end of the mapping that contains ``rsp``, in chunks, with no
fixed cap (a signal handler that ``alloca``\\ s 128 KiB does not hide its frame); unreadable parts
are skipped. The main thread's stack is read up to its initial stack pointer (``startstack`` in
``/proc/PID/stat``, the address of ``argc``) only: above it lie ``argv``, the environment, the
auxiliary vector and their strings, never a frame, and four characters of a 32-bit process's
environment (``"DK_V"`` = 0x565f4b44) read as an address inside its PIE executable.

**Alternate signal stacks.** A handler running on a ``sigaltstack`` has its ``rsp`` there, and its
signal frame (with the interrupted ``rip``) above ``rsp`` on that stack: the scan above covers it.
The thread's *own* stack then holds the interrupted code's return addresses and maybe older
signal frames, but no register points into it; the signal frame does (its saved ``rsp``). So
signal frames are recognised in the words read (a return address to a ``rt_sigreturn`` restorer,
``mov $15, %rax; syscall``, followed by a small ``uc_flags`` and ``uc_link`` == 0) and the stack their
saved ``rsp`` points into is scanned too, from that ``rsp`` to the end of its mapping; and so on
through nested frames.

Only words that may be code addresses are kept (every address asked about is code: displaced
bytes, or a stub): those between the lowest start and the highest end of the executable mappings
present at the scan, and not inside the (non-executable) stack being read, whose saved frame
pointers and pointers to locals are most of a deep stack. A mapping created after the scan cannot
be referenced by any thread's stack.

Cost: one read of each thread's used stack per stop of the world, about 0.6 ns per byte here
(16 threads with 1 MiB each: about 10 ms; a few shallow threads: under 1 ms); callers cache the
result for the stop (no thread runs while the world is stopped). ``bench/insertion.py`` (``run_deep``) measures it. The mapping
that contains ``rsp`` is read to its end whatever its size: a stack inside a larger mapping (a
runtime's heap arena, a thread stack merged with an adjacent anonymous mapping) costs that
mapping's size above ``rsp``.

Not covered: contexts saved outside any stack (``swapcontext``/``setjmp`` buffers of coroutines in
the heap, a garbage-collected runtime's own stack bookkeeping).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ._sys.procfs import MapEntry, start_stack
from .errors import DjprobeError, ProcessGoneError

if TYPE_CHECKING:
    from .process import Process

__all__ = ["StackWords", "CHUNK_BYTES"]

#: Bytes read at a time (at most; a read stops at an unreadable page, which is skipped).
CHUNK_BYTES = 1 << 20
PAGE = 4096
#: Frames followed out of one thread's first stack (nested signals across stacks); a bound
#: against cycles of stale frames.
MAX_STACKS = 16
#: ``rt_sigreturn`` restorers: glibc's and musl's ``__restore_rt`` and Go's ``sigreturn``
#: (``mov $15, %rax; syscall``), and the ``mov $15, %eax`` form.
RESTORERS = (bytes.fromhex("48c7c00f0000000f05"), bytes.fromhex("b80f0000000f05"))

# rt_sigframe, in 8-byte words from its first word (pretcode, the restorer address):
# uc_flags 1, uc_link 2, uc_stack 3..5, uc_mcontext 6.. (r8..r15, rdi, rsi, rbp, rbx, rdx, rax,
# rcx, rsp, rip): rsp at 6 + 15, rip at 6 + 16.
_FRAME_FLAGS = 1
_FRAME_LINK = 2
_FRAME_RSP = 21
_FRAME_RIP = 22
_FRAME_WORDS = _FRAME_RIP + 1
_UC_FLAGS_MAX = 0xFF  # today at most 7: UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS

_EMPTY = np.empty(0, dtype=np.uint64)


def sorted_unique(words: np.ndarray) -> np.ndarray:
    """``np.unique`` by sort and compare (numpy 2's ``np.unique`` is ~50x slower on 1 M words)."""
    if len(words) < 2:
        return words.copy()
    s = np.sort(words)
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass
class StackWords:
    """For each stopped thread, the sorted unique code-like words of its used stack(s)."""

    words: dict[int, np.ndarray] = field(default_factory=dict)  # tid -> sorted unique uint64
    regs: dict[int, object] = field(default_factory=dict)  # tid -> its registers at the scan
    bytes_scanned: int = 0
    seconds: float = 0.0
    frames: int = 0  # signal frames recognised (their saved rsp is followed)
    _index: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, process: "Process") -> "StackWords":
        """Scan the stacks of every stopped thread of ``process`` (world stopped)."""
        t0 = time.perf_counter()
        result = cls()
        maps = [m for m in process.maps() if m.readable]
        executable = [m for m in maps if m.executable]
        if not executable:
            return result
        scanner_class = _Scanner
        if getattr(getattr(process, "arch", None), "bits", 64) == 32:
            from .stacks32 import Scanner32 as scanner_class  # 4-byte words, i386 signal frames
        scanner = scanner_class(process, maps, min(m.start for m in executable), max(m.end for m in executable))
        pid = getattr(process, "pid", None)
        scanner.ceiling = start_stack(pid) if isinstance(pid, int) else 0
        for thread in list(process.threads.values()):
            if thread.gone:
                continue
            try:
                regs = thread.regs()
            except ProcessGoneError:
                if thread.gone:
                    continue  # this thread exited meanwhile: nothing of it can resume
                raise
            result.regs[thread.tid] = regs
            result.words[thread.tid] = scanner.thread_words(regs.rsp)
        result.bytes_scanned = scanner.bytes_scanned
        result.frames = scanner.frames
        result.seconds = time.perf_counter() - t0
        return result

    def first_in(self, start: int, end: int) -> tuple[int, int] | None:
        """A (tid, word) with ``start <= word < end`` on that thread's stack, or None."""
        return self._first(start, end, "left")

    def first_inside(self, start: int, end: int) -> tuple[int, int] | None:
        """A (tid, word) with ``start < word < end`` (strictly inside) on its stack, or None."""
        return self._first(start, end, "right")

    def first_in_stubs(
        self, start: int, end: int, slot_size: int, read: Callable[[int, int], bytes]
    ) -> tuple[int, int] | None:
        """A (tid, word) with ``start <= word < end`` that a thread may resume at in the stub
        code of [start, end) (a code part of ``slot_size`` slots, read through ``read``), or None.

        A stub is written from the start of its slot, and its last instruction is a jump or a
        return, whose opcode byte is not zero; the rest of a slot is never written (zeros, as
        mapped). So a place to resume at ``word`` has a non-zero byte at or after ``word`` in its
        slot: a word followed only by zeros there is a number that happens to fall in the code
        part (a count or a duration of the program: in a 32-bit process the whole address space is
        such numbers), not a return address or a saved ``eip``. A slot that cannot be read counts
        as referenced."""
        for tid, word in self._all(start, end):
            slot_end = start + ((word - start) // slot_size + 1) * slot_size
            try:
                tail = read(word, min(slot_end, end) - word)
            except DjprobeError:
                return tid, word
            if tail.count(0) != len(tail):
                return tid, word
        return None

    def _all(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        values, owners = self._sorted()
        i = int(np.searchsorted(values, np.uint64(start), side="left"))  # type: ignore[call-overload]
        while i < len(values) and int(values[i]) < end:
            yield int(owners[i]), int(values[i])
            i += 1

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:  # every thread's words in one sorted array: one search per query
            tids = [np.full(len(w), tid, dtype=np.int64) for tid, w in self.words.items()]
            values = np.concatenate([_EMPTY, *self.words.values()])
            order = np.argsort(values, kind="stable")
            self._index = (values[order], np.concatenate([np.empty(0, np.int64), *tids])[order])
        return self._index

    def _first(self, start: int, end: int, side: str) -> tuple[int, int] | None:
        if not 0 <= start < 1 << 64:
            return None
        values, owners = self._sorted()
        i = int(np.searchsorted(values, np.uint64(start), side=side))  # type: ignore[call-overload]
        if i < len(values) and int(values[i]) < end:
            return int(owners[i]), int(values[i])
        return None


class _Scanner:
    WORD = 8  # bytes of a stack word
    FRAME_WORDS = _FRAME_WORDS  # words of a signal frame up to its saved instruction pointer

    def __init__(self, process: "Process", maps: list[MapEntry], lo: int, hi: int) -> None:
        self.process = process
        self.maps = sorted(maps, key=lambda m: m.start)
        self._starts = [m.start for m in self.maps]
        self.lo = np.uint64(lo)
        self.hi = np.uint64(hi)
        self.bytes_scanned = 0
        self.frames = 0
        self.ceiling = 0  # the main thread's initial stack pointer: nothing above it is read (0: unknown)
        self._restorer: dict[int, bool] = {}
        # Buffers reused for every chunk: fresh 1 MiB arrays per chunk cost page faults that
        # doubled the time of a scan.
        n = CHUNK_BYTES // 8
        self._buf = np.empty(n, dtype=np.uint64)
        self._tmp = np.empty(n, dtype=np.uint64)
        self._keep = np.empty(n, dtype=bool)
        self._other = np.empty(n, dtype=bool)
        self._read_into = getattr(getattr(process, "memory", None), "read_into", None)

    def mapping(self, address: int) -> MapEntry | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.maps[i].end:
            return self.maps[i]
        return None

    def thread_words(self, rsp: int) -> np.ndarray:
        """The code-like words from ``rsp`` up, following signal frames to other stacks."""
        scanned: dict[int, int] = {}  # mapping start -> lowest address scanned in it
        parts: list[np.ndarray] = []
        todo = [rsp & ~(self.WORD - 1)]
        while todo and len(scanned) <= MAX_STACKS:
            start = todo.pop()
            m = self.mapping(start)
            if m is None or not m.writable:
                continue  # a stack is readable and writable
            end = scanned.get(m.start, m.end)
            if m.start <= self.ceiling < end:
                end = self.ceiling  # argv, the environment and the auxiliary vector: no frames
            if start >= end:
                continue  # already scanned from lower down
            scanned[m.start] = start
            for saved_rsp in self._scan(m, start, end, parts):
                todo.append(saved_rsp & ~(self.WORD - 1))
        if not parts:
            return _EMPTY
        return sorted_unique(np.concatenate(parts))

    def _scan(self, m: MapEntry, start: int, end: int, parts: list[np.ndarray]) -> list[int]:
        """Append the code-like words of [start, end) (in mapping ``m``) to ``parts``; return the
        saved rsp of every signal frame found there."""
        # Code-like: inside [lo, hi), and not inside this (non-executable) stack itself: saved
        # frame pointers and pointers to locals are most of a deep stack. Both tests as one
        # unsigned compare each: (w - a) < n  <=>  a <= w < a + n.
        own_start = np.uint64(m.start)
        own_size = np.uint64(0 if m.executable else m.end - m.start)
        span = self.hi - self.lo
        saved: list[int] = []
        tail, tail_end = _EMPTY, -1  # a frame may straddle two reads: keep the last words
        for at, words in self._pieces(start, end):
            n = len(words)
            self.bytes_scanned += self.WORD * n
            tmp, keep, other = self._tmp[:n], self._keep[:n], self._other[:n]
            np.less(np.subtract(words, self.lo, out=tmp), span, out=keep)
            keep &= np.greater_equal(np.subtract(words, own_start, out=tmp), own_size, out=other)
            parts.append(words[keep])
            joined = at == tail_end
            if joined:  # frames that start in the previous read's last words
                saved.extend(self._frames(np.concatenate([tail, words[: self.FRAME_WORDS - 1]]), len(tail)))
            saved.extend(self._frames(words, n))
            last = np.concatenate([tail, words]) if joined and n < self.FRAME_WORDS else words
            tail, tail_end = last[-(self.FRAME_WORDS - 1) :].copy(), at + self.WORD * n  # the buffer is reused
        return saved

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, np.ndarray]]:
        """The readable parts of [start, end), in order, as (address, words), in chunks of at
        most CHUNK_BYTES; unreadable pages are skipped. An array is valid until the next."""
        if self._read_into is None:  # a process without ProcessMemory.read_into
            for chunk_start in range(start, end, CHUNK_BYTES):
                for at, data in self._read_bytes(chunk_start, min(CHUNK_BYTES, end - chunk_start)):
                    yield at, np.frombuffer(data, dtype=np.uint64)
            return
        view = memoryview(self._buf).cast("B")
        at = start
        while at < end:
            try:
                got = self._read_into(at, view[: min(CHUNK_BYTES, end - at)]) & ~7
            except DjprobeError:
                got = 0
            if got <= 0:
                at = (at // PAGE + 1) * PAGE  # stopped by an unreadable page: skip it
                continue
            yield at, self._buf[: got // 8]
            at += got

    def _read_bytes(self, address: int, size: int) -> list[tuple[int, bytes]]:
        try:
            return [(address, self.process.read(address, size))]
        except DjprobeError:
            pass
        out = []
        for page in range(address, address + size, PAGE):
            n = min(PAGE - page % PAGE, address + size - page)
            try:
                out.append((page, self.process.read(page, n)))
            except DjprobeError:
                continue
        return out

    def _frames(self, words: np.ndarray, starts: int) -> list[int]:
        """Saved rsp of the signal frames wholly in ``words`` that start in its first ``starts``
        words."""
        n = min(starts, len(words) - _FRAME_WORDS + 1)
        if n <= 0:
            return []
        zero = np.equal(words[_FRAME_LINK : _FRAME_LINK + n], 0, out=self._other[:n])
        at = np.flatnonzero(zero)  # uc_link == 0: few words pass
        at = at[(words[at + _FRAME_FLAGS] <= _UC_FLAGS_MAX) & ((words[at] - self.lo) < self.hi - self.lo)]
        out = []
        for i in at.tolist():
            if self._is_restorer(int(words[i])):
                self.frames += 1
                out.append(int(words[i + _FRAME_RSP]))
        return out

    def _is_restorer(self, address: int) -> bool:
        known = self._restorer.get(address)
        if known is None:
            known = False
            m = self.mapping(address)
            if m is not None and m.executable:
                for pattern in RESTORERS:
                    try:
                        if self.process.read(address, len(pattern)) == pattern:
                            known = True
                            break
                    except DjprobeError:
                        pass
            self._restorer[address] = known
        return known
