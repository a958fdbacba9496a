"""StackWords on a synthetic address space: whole used stacks, chunks, unreadable pages, frames."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest

from djprobe import stacks
from djprobe._sys.procfs import MapEntry
from djprobe.errors import ProcessGoneError, TargetFaultError
from djprobe.stacks import CHUNK_BYTES, RESTORERS, StackWords, sorted_unique

CODE = 0x400000  # r-x: a "site" at CODE + 0x100 (8 bytes), a restorer at CODE + 0x800
SITE = CODE + 0x100
RESTORER = CODE + 0x800
NOT_RESTORER = CODE + 0x900
STACK = 0x7F0000000000  # rw-: thread stacks, 4 MiB each
ALT = 0x7E0000000000  # rw-: an alternate signal stack
MIB = 1 << 20


class FakeThread:
    def __init__(self, tid: int, rsp: int) -> None:
        self.tid, self.rsp, self.gone = tid, rsp, False

    def regs(self):
        return SimpleNamespace(rsp=self.rsp)


class FakeProcess:
    """Mappings backed by bytearrays; reads fail on pages listed in ``unreadable``."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.perms: dict[int, str] = {}
        self.threads: dict[int, FakeThread] = {}
        self.unreadable: set[int] = set()
        self.reads = 0
        self.map(CODE, 0x1000, "r-xp")
        self.mem[CODE][0x800 : 0x800 + len(RESTORERS[0])] = RESTORERS[0]
        self.mem[CODE][0x900:0x909] = b"\x90" * 9

    def map(self, start: int, size: int, perms: str = "rw-p") -> None:
        self.mem[start] = bytearray(size)
        self.perms[start] = perms

    def maps(self) -> list[MapEntry]:
        return [MapEntry(s, s + len(b), self.perms[s], 0, "00:00", 0, "") for s, b in sorted(self.mem.items())]

    def put(self, address: int, *words: int) -> None:
        for start, buf in self.mem.items():
            if start <= address < start + len(buf):
                buf[address - start : address - start + 8 * len(words)] = struct.pack(f"<{len(words)}Q", *words)
                return
        raise AssertionError(f"{address:#x} is not mapped")

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        if any(address <= p < address + size for p in self.unreadable):
            raise TargetFaultError("unreadable", address=address)
        for start, buf in self.mem.items():
            if start <= address and address + size <= start + len(buf):
                return bytes(buf[address - start : address - start + size])
        raise TargetFaultError("not mapped", address=address)

    def thread(self, tid: int, rsp: int) -> FakeThread:
        self.threads[tid] = FakeThread(tid, rsp)
        return self.threads[tid]


class FakeMemory:
    """ProcessMemory.read_into: reads up to the first unreadable page, as /proc/PID/mem does."""

    def __init__(self, process: FakeProcess) -> None:
        self.process = process

    def read_into(self, address: int, buffer: memoryview) -> int:
        p = self.process
        p.reads += 1
        size = len(buffer)
        bad = [q for q in p.unreadable if address <= q + 4095 and q < address + size]
        if bad:
            size = max(0, min(bad) - address)
        for start, buf in p.mem.items():
            if start <= address < start + len(buf):
                size = min(size, start + len(buf) - address)
                buffer[:size] = buf[address - start : address - start + size]
                return size
        return 0


def frame(saved_rsp: int, saved_rip: int, restorer: int = RESTORER) -> list[int]:
    """The first 23 words of an rt_sigframe: pretcode, uc_flags, uc_link, uc_stack (3 words),
    r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip."""
    return [restorer, 7, 0, ALT, 0, MIB] + [0x11] * 15 + [saved_rsp, saved_rip]


@pytest.fixture(params=["read_into", "read"])
def proc(request):
    """With ProcessMemory.read_into (reads into one buffer), and with only Process.read."""
    p = FakeProcess()
    if request.param == "read_into":
        p.memory = FakeMemory(p)
    p.map(STACK, 4 * MIB)
    return p


def test_a_word_far_above_rsp_is_found(proc):
    rsp = STACK + 100_003  # aligned down to 8
    proc.thread(1, rsp)
    proc.put(STACK + 4 * MIB - 64, SITE + 4)  # 4 MiB - 100 KiB above rsp: several chunks
    sw = StackWords.of(proc)
    assert sw.first_inside(SITE, SITE + 8) == (1, SITE + 4)
    assert sw.first_in(SITE + 4, SITE + 5) == (1, SITE + 4)
    assert sw.first_inside(SITE + 4, SITE + 8) is None  # strictly inside: the start is excluded
    assert sw.first_in(SITE + 5, SITE + 8) is None
    assert sw.bytes_scanned == STACK + 4 * MIB - (rsp & ~7)
    assert proc.reads >= 4  # in chunks


def test_words_below_rsp_are_not_taken(proc):
    proc.thread(1, STACK + 2 * MIB)
    proc.put(STACK + 2 * MIB - 8, SITE + 4)  # dead stack
    assert StackWords.of(proc).first_in(SITE, SITE + 8) is None


def test_only_code_like_words_are_kept(proc):
    proc.thread(1, STACK + 3 * MIB)
    proc.put(STACK + 3 * MIB, 5, STACK + 3 * MIB + 64, ALT + 8, SITE, 0)
    words = StackWords.of(proc).words[1]
    assert words.tolist() == [SITE]  # small numbers, own-stack pointers and data pointers dropped


def test_unreadable_pages_are_skipped(proc):
    rsp = STACK + MIB
    proc.thread(1, rsp)
    proc.unreadable = {rsp + 8192, rsp + CHUNK_BYTES + 3 * 4096}
    proc.put(rsp + 4096, SITE + 4)  # same chunk as an unreadable page
    proc.put(rsp + CHUNK_BYTES + 5 * 4096, SITE + 5)
    sw = StackWords.of(proc)
    assert sw.words[1].tolist() == [SITE + 4, SITE + 5]
    assert sw.bytes_scanned == STACK + 4 * MIB - rsp - 2 * 4096


@pytest.mark.parametrize("where", ["inside", "across a chunk", "across pages read one by one"])
def test_a_signal_frame_leads_to_the_stack_it_interrupted(proc, where):
    """The handler runs on the alternate stack; the thread's own stack holds the resume point."""
    proc.map(ALT, 2 * MIB)
    rsp = ALT + 4096
    proc.thread(7, rsp)
    interrupted = STACK + 3 * MIB
    proc.put(interrupted + 256, SITE + 4)  # e.g. an older signal frame's rip, on the own stack
    at = {"inside": ALT + MIB, "across a chunk": rsp + CHUNK_BYTES - 5 * 8, "across pages read one by one": ALT + 3 * 4096 - 40}[where]
    if where == "across pages read one by one":
        proc.unreadable = {ALT + 6 * 4096}  # the first chunk is read page by page
    proc.put(at, *frame(interrupted, SITE + 0x40))
    sw = StackWords.of(proc)
    assert sw.frames == 1
    assert sw.first_inside(SITE, SITE + 8) == (7, SITE + 4)
    assert sw.first_in(SITE + 0x40, SITE + 0x41) == (7, SITE + 0x40)  # the frame's own rip


def test_a_frame_whose_restorer_is_not_one_is_not_followed(proc):
    proc.map(ALT, MIB)
    proc.thread(7, ALT + 64)
    proc.put(STACK + 3 * MIB, SITE + 4)
    proc.put(ALT + 1024, *frame(STACK + 3 * MIB, SITE + 0x40, restorer=NOT_RESTORER))
    sw = StackWords.of(proc)
    assert sw.frames == 0
    assert sw.first_inside(SITE, SITE + 8) is None


def test_nested_frames_across_stacks_and_a_cycle(proc):
    """Frames that point at each other's stacks (stale frames can) end; each stack once."""
    proc.map(ALT, MIB)
    proc.thread(7, ALT + 64)
    proc.put(ALT + 512, *frame(STACK + 2 * MIB, SITE + 0x40))
    proc.put(STACK + 2 * MIB + 512, *frame(ALT + 32, SITE + 0x41))  # below ALT's rsp: scanned too
    proc.put(ALT + 32, SITE + 4)
    sw = StackWords.of(proc)
    assert sw.first_inside(SITE, SITE + 8) == (7, SITE + 4)


def test_threads_each_and_gone(proc):
    proc.thread(1, STACK + MIB)
    proc.map(STACK + 8 * MIB, MIB)
    proc.thread(2, STACK + 8 * MIB + 4096)
    proc.put(STACK + 8 * MIB + 8192, SITE + 3)
    proc.thread(3, STACK + 2 * MIB).gone = True
    sw = StackWords.of(proc)
    assert set(sw.words) == {1, 2}
    assert sw.first_in(SITE, SITE + 8) == (2, SITE + 3)


def test_a_thread_that_exits_during_the_scan_is_skipped(proc):
    proc.thread(1, STACK + MIB)
    t = proc.thread(2, STACK + MIB)

    def regs():
        t.gone = True
        raise ProcessGoneError("exited")

    t.regs = regs
    assert set(StackWords.of(proc).words) == {1}


def test_sorted_unique_matches_numpy():
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 1000):
        w = rng.integers(0, 50, n).astype(np.uint64)
        assert sorted_unique(w).tolist() == np.unique(w).tolist()


def test_frame_layout_constants():
    # rsp and rip of uc_mcontext: 8 (pretcode) + 40 (uc_flags, uc_link, uc_stack) + 15/16 * 8
    assert stacks._FRAME_RSP * 8 == 8 + 40 + 15 * 8
    assert stacks._FRAME_RIP * 8 == 8 + 40 + 16 * 8




def test_nothing_above_the_main_threads_initial_stack_pointer_is_read(proc, monkeypatch):
    """argv, the environment and the auxiliary vector lie above ``startstack``: never frames."""
    ceiling = STACK + 4 * MIB - 4096
    proc.pid = 4242
    monkeypatch.setattr(stacks, "start_stack", lambda pid: ceiling if pid == 4242 else 0)
    proc.thread(1, STACK + 3 * MIB)
    proc.put(ceiling - 8, SITE + 2)  # the last word below: a frame's
    proc.put(ceiling, SITE + 4)  # argc's place and above: not
    proc.put(ceiling + 512, SITE + 6)
    sw = StackWords.of(proc)
    assert sw.first_inside(SITE, SITE + 8) == (1, SITE + 2)
    assert sw.first_in(SITE + 3, SITE + 8) is None
    assert sw.bytes_scanned == ceiling - STACK - 3 * MIB


def test_a_number_where_no_stub_was_written_is_not_a_place_to_resume(proc):
    """first_in_stubs: a word in a slot whose bytes from it on are all zero is a number."""
    part, slot = CODE + 0x400, 0x100  # a code part of four slots: a stub in the first
    proc.mem[CODE][0x400:0x420] = b"\x90" * 31 + b"\xc3"  # ... ending with a ret
    proc.thread(1, STACK + MIB)
    proc.put(STACK + MIB + 64, part + 0x380)  # in the fourth slot, never written
    proc.put(STACK + MIB + 128, part + 0x120)  # in the second slot, never written
    sw = StackWords.of(proc)
    assert sw.first_in(part, part + 0x400) == (1, part + 0x120)  # the plain test takes any word
    assert sw.first_in_stubs(part, part + 0x400, slot, proc.read) is None
    proc.put(STACK + MIB + 192, part + 0x1F)  # the stub's last instruction: a place to resume
    sw = StackWords.of(proc)
    assert sw.first_in_stubs(part, part + 0x400, slot, proc.read) == (1, part + 0x1F)
    proc.put(STACK + MIB + 192, part + 0x20)  # just after it: zeros to the slot's end
    assert StackWords.of(proc).first_in_stubs(part, part + 0x400, slot, proc.read) is None
    proc.unreadable.add(part + 0x390)  # a slot that cannot be read counts as referenced
    assert StackWords.of(proc).first_in_stubs(part, part + 0x400, slot, proc.read) == (1, part + 0x380)
