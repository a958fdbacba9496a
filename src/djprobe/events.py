"""The consumer side of the event rings: batch decoding with numpy, handler dispatch.

Records are read straight from the tracer's mapping of each probe area. A ring is drained in
two passes: first the sequence numbers of the slots between the consumer's tail and the
producers' head (a slot is committed when its ``seq`` is its position + 1, written last by the
stub), then a copy of the committed prefix; only then is the tail advanced, which frees the
slots for the producers. x86 does not reorder loads with loads, so a record seen committed is
read whole.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np
from iced_x86 import Mnemonic

from .area import ARG_REGISTERS, RECORD_DTYPE, REGISTER_NAMES, RING_TAIL, STRING_CLAIM_OFFSET, AreaView
from .fetched import Args, Fetched, decode_records, typed_values

if TYPE_CHECKING:
    from .process import Process

ARG_NAMES = ARG_REGISTERS
_ARG_INDEX = [REGISTER_NAMES.index(n) for n in ARG_NAMES]

# An event is a ring record viewed in place (no field-by-field copy), with the record's spare
# bytes holding what the consumer adds: the time in ns, the region, and for an event of a string
# record the key of its fetched strings in ``EventBatch.fetched`` (0: none). ``tid`` is 0 if unknown.
_REGS_END = RECORD_DTYPE.fields["regs"][1] + RECORD_DTYPE.fields["regs"][0].itemsize
EVENT_DTYPE = np.dtype(
    {
        "names": ["instance", "tid", "thread", "tsc", "regs", "time_ns", "region", "fetch"],
        "formats": [np.uint32, np.uint32, np.uint64, np.uint64, (np.uint64, len(REGISTER_NAMES)), np.int64, np.uint32,
                    np.int64],
        "offsets": [8, 12, 16, 24, 32, _REGS_END, _REGS_END + 8, _REGS_END + 16],
        "itemsize": RECORD_DTYPE.itemsize,
    }
)


def _make_rdtsc() -> "ctypes._CFuncPtr":
    code = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl rdx,32; or rax,rdx; ret
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    buf.write(code)
    # Re-map read+execute: never writable and executable at once.
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(addr), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed for the TSC reader")
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._keep = buf  # type: ignore[attr-defined]
    return fn


class TscClock:
    """Converts TSC values (as the stubs read them) to CLOCK_MONOTONIC nanoseconds.

    The TSC is constant-rate on this kind of machine (``constant_tsc``); the rate is measured
    from pairs of (TSC, CLOCK_MONOTONIC) readings taken as far apart as possible.
    """

    def __init__(self) -> None:
        self.rdtsc = _make_rdtsc()
        self._first = self._pair()
        time.sleep(0.01)
        self._last = self._pair()

    def _pair(self) -> tuple[int, int]:
        best = None
        for _ in range(5):
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            tsc = self.rdtsc()
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, tsc, (t0 + t1) // 2)
        assert best is not None
        return best[1], best[2]

    def refresh(self) -> None:
        self._last = self._pair()

    @property
    def ns_per_tick(self) -> float:
        (tsc0, ns0), (tsc1, ns1) = self._first, self._last
        return (ns1 - ns0) / max(1, tsc1 - tsc0)

    def now_tsc(self) -> int:
        return int(self.rdtsc())

    def from_ns(self, ns: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_ns`: TSC values for CLOCK_MONOTONIC times (trap samples)."""
        tsc0, ns0 = self._first
        delta = ns.astype(np.int64) - np.int64(ns0)
        return (np.int64(tsc0) + (delta / self.ns_per_tick).astype(np.int64)).astype(np.uint64)

    def to_ns(self, tsc: np.ndarray) -> np.ndarray:
        tsc0, ns0 = self._first
        delta = tsc.astype(np.int64) - np.int64(tsc0)
        return ns0 + (delta * self.ns_per_tick).astype(np.int64)


class ThreadMap:
    """Maps thread pointers (``fs:[0]``, as the stubs record them) to TIDs.

    Learned from the registers of every thread at each stop of the world; a thread started
    later is looked up by reading the TID from its thread control block, at the offset found
    by matching known threads.
    """

    def __init__(self) -> None:
        self.by_pointer: dict[int, int] = {}
        self.tid_offset: int | None = None

    def learn(self, process: "Process") -> None:
        pairs = []
        for thread in process.threads.values():
            regs = thread.regs()
            pointer = regs.fs_base or regs.gs_base  # a 32-bit thread's TCB is at gs_base
            if pointer:
                self.by_pointer[pointer] = thread.tid
                pairs.append((pointer, thread.tid))
        if self.tid_offset is None and pairs:
            self.tid_offset = self._find_offset(process, pairs)

    @staticmethod
    def _find_offset(process: "Process", pairs: list[tuple[int, int]]) -> int | None:
        candidates: set[int] | None = None
        for pointer, tid in pairs[:8]:
            try:
                block = np.frombuffer(process.read(pointer, 4096), dtype=np.uint32)
            except Exception:  # noqa: BLE001 - the TCB may end its mapping (i386): its page only
                try:
                    block = np.frombuffer(process.read(pointer, (4096 - pointer % 4096) & ~3), dtype=np.uint32)
                except Exception:  # noqa: BLE001 - a TCB we cannot read tells us nothing
                    continue
            offsets = {int(i) * 4 for i in np.nonzero(block == tid)[0]}
            candidates = offsets if candidates is None else candidates & offsets
        return min(candidates) if candidates else None

    def resolve(self, pointers: np.ndarray, process: "Process | None") -> np.ndarray:
        out = np.empty(len(pointers), dtype=np.int64)
        unique, inverse = np.unique(pointers, return_inverse=True)
        values = []
        for pointer in unique.tolist():
            tid = self.by_pointer.get(pointer)
            if tid is None and process is not None and self.tid_offset is not None:
                try:
                    tid = int.from_bytes(process.read(pointer + self.tid_offset, 4), "little")
                    self.by_pointer[pointer] = tid
                except Exception:  # noqa: BLE001 - thread gone: TID unknown
                    tid = None
            values.append(-1 if tid is None else tid)
        out[:] = np.asarray(values, dtype=np.int64)[inverse]
        return out


class RingReader:
    """Drains the event rings of one probe area: rings of full records, then rings of
    argument-only records (widened to full records with the other registers 0)."""

    def __init__(self, view: AreaView, region_index: int) -> None:
        self.view = view
        self.region_index = region_index
        self.tails = [int(view.ring_headers[r, RING_TAIL // 8]) for r in range(2 * view.layout.ring_count)]
        self.string_tails = [int(view.string_ring_headers[r, RING_TAIL // 8]) for r in range(view.layout.ring_count)]
        #: Strings of the string records drained since the last take_fetched(), by fetch key.
        self.fetched: dict[int, Fetched] = {}

    def drain(self, limit: int | None = None, cutoff_tsc: int | None = None, hole_patience: int | None = None) -> list[np.ndarray]:
        """Committed records of every ring (RECORD_DTYPE arrays), oldest first per ring.

        With ``cutoff_tsc``, only records stamped before it are taken (a ring's prefix stops at
        the first later one; the rest waits for the next drain), and, in the other rings, none
        stamped after a committed record that still waits behind an uncommitted slot (a producer
        preempted between its ``cmpxchg`` and its commit in a locked ring) younger than
        ``hole_patience`` ticks: records of one thread can sit in several rings (it moved
        between CPUs, between a CPU with a ring of its own and one without, or escaped its own
        uncommitted slot), and this keeps each thread's events in order from one drain to the
        next. Per-CPU rings have no such slots (a record is reserved, written and committed in
        one rseq critical section). The last 8 bytes of every slot drained (the claim of a
        lossless producer in a locked ring, see stubs.py) are zeroed before the tail moves."""
        n_full = self.view.layout.ring_count
        rings = [self.view.records[r] if r < n_full else self.view.args_records[r - n_full] for r in range(2 * n_full)]
        scans = [self._scan(r, rings[r], limit) for r in range(2 * n_full)]
        behind: list[tuple[int, int]] = []  # (ring, stamp) of records waiting behind a hole
        if cutoff_tsc is not None:
            behind = [
                (r, scan[3]) for r, scan in enumerate(scans)
                if scan is not None and scan[3] is not None
                and (hole_patience is None or cutoff_tsc - scan[3] < hole_patience)
            ]
        out = []
        for r, scan in enumerate(scans):
            if scan is None:
                continue
            # a hole holds back the other rings only: before it, its own ring is in order already
            cutoff = min([cutoff_tsc, *(t for s, t in behind if s != r)]) if cutoff_tsc is not None else None
            got = self._take(r, rings[r], scan, cutoff)
            if got is not None:
                out.append(got if r < n_full else _widen(got))
        for r in range(n_full):  # rings of string records (fetch_stubs.py), reserved with a lock
            ring = self.view.string_records[r]
            scan = self._scan(r, ring, limit, strings=True)
            got = self._take(r, ring, scan, cutoff_tsc, strings=True) if scan is not None else None
            if got is not None:
                out.append(self._widen_strings(got))
        return out

    def take_fetched(self) -> dict[int, Fetched]:
        """The strings of the records drained since the last call (by fetch key), forgotten here."""
        fetched, self.fetched = self.fetched, {}
        return fetched

    def _widen_strings(self, records: np.ndarray) -> np.ndarray:
        full = _widen(records)
        end = _next_keys(len(records))
        keys = np.arange(end - len(records) + 1, end + 1, dtype=np.int64)
        full.view(EVENT_DTYPE)["fetch"] = keys
        self.fetched.update(zip(keys.tolist(), decode_records(records["mask"], records["strings"])))
        return full

    def _ring_state(self, strings: bool) -> tuple[np.ndarray, list[int]]:
        return (self.view.string_ring_headers, self.string_tails) if strings else (self.view.ring_headers, self.tails)

    def _scan(self, r: int, ring: np.ndarray, limit: int | None, strings: bool = False) -> tuple | None:
        """(tail, pieces, committed prefix length, stamp of the oldest committed record behind
        an uncommitted slot or None) of ring ``r``, or None when it holds nothing committed."""
        headers, tails = self._ring_state(strings)
        slots = len(ring)
        head = int(headers[r, 0])
        tail = tails[r]
        n = head - tail
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return None
        first = tail % slots
        pieces = [(first, min(slots, first + n))]
        if first + n > slots:
            pieces.append((0, first + n - slots))
        seqs = np.concatenate([ring["seq"][a:b] for a, b in pieces])
        expected = np.arange(tail + 1, tail + n + 1, dtype=np.uint64)
        committed = seqs == expected
        if committed.all():
            return tail, pieces, n, None
        k = int(np.argmin(committed))
        behind = None
        if committed[k:].any():
            tscs = np.concatenate([ring["tsc"][a:b] for a, b in pieces])[k:][committed[k:]]
            behind = int(tscs.min())
        return (tail, pieces, k, behind) if k or behind is not None else None

    def _take(self, r: int, ring: np.ndarray, scan: tuple, cutoff_tsc: int | None, strings: bool = False) -> np.ndarray | None:
        headers, tails = self._ring_state(strings)
        tail, pieces, k, _ = scan
        if k and cutoff_tsc is not None:
            tscs = np.concatenate([ring["tsc"][a:b] for a, b in pieces])[:k]
            late = tscs >= np.uint64(max(0, cutoff_tsc))
            if late.any():
                k = int(np.argmax(late))
        if k == 0:
            return None
        opaque = np.dtype((np.void, ring.dtype.itemsize))
        parts, left = [], k
        for a, b in pieces:
            take = min(left, b - a)
            if take:
                parts.append(ring[a : a + take].view(opaque).copy())
            left -= take
        records = (parts[0] if len(parts) == 1 else np.concatenate(parts)).view(ring.dtype)
        # give back the slots' claims (stubs.py, fetch_stubs.py) before the tail frees them
        words = ring.view(np.uint64).reshape(len(ring), -1)
        claim = STRING_CLAIM_OFFSET // 8 if strings else -1
        left = k
        for a, b in pieces:
            take = min(left, b - a)
            words[a : a + take, claim] = 0
            left -= take
        tails[r] = tail + k
        headers[r, RING_TAIL // 8] = tail + k
        return records


_keys_used = 0


def _next_keys(n: int) -> int:
    """Reserve ``n`` fetch keys (process-wide, never 0); returns the end of the range."""
    global _keys_used
    _keys_used += n
    return _keys_used


def _widen(args_records: np.ndarray) -> np.ndarray:
    """Argument records as full records (rax too; the registers not recorded are 0)."""
    full = np.zeros(len(args_records), dtype=RECORD_DTYPE)
    for name in ("seq", "instance", "tid", "thread", "tsc"):
        full[name] = args_records[name]
    full["regs"][:, _ARG_INDEX] = args_records["args"]
    full["regs"][:, REGISTER_NAMES.index("rax")] = args_records["rax"]
    return full


_RET = Mnemonic.RET


@dataclass
class EventBatch:
    """A batch of events as a numpy structured array (``EVENT_DTYPE``), ordered by time.

    ``events["regs"]`` is an (N, 17) array in the order of :data:`djprobe.area.REGISTER_NAMES`;
    :meth:`register` and :meth:`args` give columns by name. ``instances[i]`` is the probe
    instance event ``i`` came from (None if it was removed meanwhile).
    """

    events: np.ndarray
    instances: list = field(default_factory=list)
    #: Strings fetched at the hit, by the event's ``fetch`` key (see :meth:`values`).
    fetched: dict = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "EventBatch":
        return cls(np.empty(0, dtype=EVENT_DTYPE), np.empty(0, dtype=object))

    @classmethod
    def concat(cls, batches: list["EventBatch"]) -> "EventBatch":
        if len(batches) == 1:
            return batches[0]
        events = np.concatenate([b.events for b in batches])
        instances = np.concatenate([np.asarray(b.instances, dtype=object) for b in batches])
        order = np.argsort(events["tsc"], kind="stable")
        fetched = {k: v for b in batches for k, v in b.fetched.items()}
        return cls(events[order], instances[order], fetched)

    def probes(self, index: int) -> list:
        """The probes that event ``index`` belongs to (a return probe for its exits' events)."""
        instance = self.instances[index]
        if instance is None:
            return []
        return [p._parent or p for p in instance.probes]

    def site(self, index: int) -> str:
        """``module:symbol+off`` of the probe event ``index`` came from."""
        instance = self.instances[index]
        return instance.analysis.site if instance is not None else "?"

    def __len__(self) -> int:
        return len(self.events)

    def register(self, name: str) -> np.ndarray:
        return self.events["regs"][:, REGISTER_NAMES.index(name)]

    def args(self) -> np.ndarray:
        """The six SysV argument registers, an (N, 6) array."""
        return self.events["regs"][:, _ARG_INDEX]

    def prototype(self, index: int):
        """The prototype of the probe event ``index`` came from (the first of its probes that has
        one), or None."""
        instance = self.instances[index]
        if instance is None:
            return None
        for p in instance.probes:
            owner = p._parent or p
            if owner.prototype is not None:
                return owner.prototype
        return None

    def fetched_strings(self, index: int) -> Fetched | None:
        """The six string slots of event ``index`` (None: its probe copies no string)."""
        return self.fetched.get(int(self.events["fetch"][index]))

    def values(self, index: int, prototype=None) -> dict | None:
        """``{name: value}`` of event ``index`` by its probe's prototype (or ``prototype``): typed
        integers, pointers, and strings as they were at the hit (``FetchedString``, or a
        ``FetchError`` for a bad pointer). None when no prototype is known. At a return probe's
        exits the arguments are gone: only ``retval`` is meaningful there."""
        prototype = prototype or self.prototype(index)
        if prototype is None:
            return None
        row = self.events["regs"][index, _ARG_INDEX].tolist()
        return typed_values(prototype, row, self.fetched_strings(index))

    def column(self, name: str) -> np.ndarray:
        """Parameter ``name`` of every event, as an object array (None where the event's probe
        has no such parameter)."""
        out = np.empty(len(self), dtype=object)
        for k in range(len(self)):
            values = None if self.is_return(k) else self.values(k)
            out[k] = None if values is None else values.get(name)
        return out

    def retval(self) -> np.ndarray:
        """``rax`` of every event: the value returned, for the events of a return probe."""
        return self.register("rax")

    def is_return(self, index: int) -> bool:
        """Whether event ``index`` comes from an exit of a return probe."""
        instance = self.instances[index]
        return instance is not None and instance.analysis.exit is not None

    def is_tail_call(self, index: int) -> bool:
        """Whether event ``index`` comes from a tail-call exit (a ``jmp`` to another function):
        there ``rax`` is not yet the value returned (the callee sets it)."""
        instance = self.instances[index]
        return instance is not None and instance.analysis.exit is not None and \
            instance.analysis.exit.instruction.mnemonic != _RET


def decode(records: Iterable[tuple[int, np.ndarray]], clock: TscClock, threads: ThreadMap, process: "Process | None") -> EventBatch:
    """Turn raw records (with their region index) into one time-ordered EventBatch."""
    parts = []
    for region_index, raw in records:
        ev = raw.view(EVENT_DTYPE)
        ev["region"] = region_index
        unknown = ev["tid"] == 0
        if unknown.any():
            found = threads.resolve(ev["thread"][unknown], process)
            ev["tid"][unknown] = np.where(found < 0, 0, found).astype(np.uint32)
        parts.append(ev)
    if not parts:
        return EventBatch(np.empty(0, dtype=EVENT_DTYPE))
    # Whole-record copies through an opaque view: numpy copies structured dtypes with holes
    # field by field, several times slower.
    opaque = np.dtype((np.void, EVENT_DTYPE.itemsize))
    events = parts[0] if len(parts) == 1 else np.concatenate([p.view(opaque) for p in parts]).view(EVENT_DTYPE)
    tsc = events["tsc"]
    if len(tsc) > 1 and not bool(np.all(tsc[1:] >= tsc[:-1])):
        events = events.view(opaque)[np.argsort(tsc, kind="stable")].view(EVENT_DTYPE)
    events["time_ns"] = clock.to_ns(events["tsc"])
    return EventBatch(events)


class Regs:
    """The seed's ``pt_regs`` for a handler: registers at the probe point, no instruction pointer.

    Attributes: ``rax`` ... ``r15``, ``rflags``, ``rsp``, ``arg0`` ... ``arg5`` (SysV ABI), ``tid``
    and ``time_ns``; ``retval`` is ``rax`` (at a return probe: the value returned). Use ``djp.addr`` / ``djp.address`` for where the probe is. ``rflags`` holds
    the arithmetic flags (CF PF AF ZF SF OF) and IF. Registers are read from the event batch
    when asked for (a handler pays only for those it uses).
    """

    __slots__ = ("_regs", "_k", "tid", "time_ns", "_fetched", "prototype")

    def __init__(self, regs: np.ndarray, k: int, tid: int, time_ns: int, fetched: Fetched | None = None, prototype=None) -> None:
        self._regs = regs
        self._k = k
        self.tid = tid
        self.time_ns = time_ns
        self._fetched = fetched
        #: The probe's prototype (None: ``args`` has no names).
        self.prototype = prototype

    @property
    def args(self) -> Args:
        """The six argument registers (a tuple); with a prototype, also the parameters by name,
        typed, strings as they were at the hit: ``regs.args.path``."""
        row = self._regs[self._k]
        raw = tuple(int(row[i]) for i in _ARG_INDEX)
        values = typed_values(self.prototype, raw, self._fetched) if self.prototype is not None else None
        return Args(raw, values)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(REGISTER_NAMES, self._regs[self._k].tolist()))

    @property
    def retval(self) -> int:
        """``rax``: at a return probe, the value the function returns."""
        return self.rax  # type: ignore[attr-defined]

    @property
    def flags(self) -> int:
        return self.rflags  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        regs = " ".join(f"{n}={v:#x}" for n, v in self.as_dict().items())
        return f"<Regs tid={self.tid} {regs}>"


def _register_property(index: int) -> property:
    return property(lambda self: int(self._regs[self._k, index]))


for _i, _name in enumerate(REGISTER_NAMES):
    setattr(Regs, _name, _register_property(_i))
for _i, _name in enumerate(ARG_NAMES):
    setattr(Regs, f"arg{_i}", _register_property(REGISTER_NAMES.index(_name)))
