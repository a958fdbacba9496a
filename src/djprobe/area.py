"""Layout of a probe area: the memory shared by the tracer and the target.

A probe area serves one *region* of the target's address space (all sites within reach of a rel32
jump). It is a pair of adjacent mappings in the target:

* the **code** part: anonymous, private, read+execute in the target (never writable there); the
  tracer writes stubs into it through ``/proc/PID/mem``. It is cut into fixed-size stub slots.
* the **data** part: a shared file mapping, read-write in the target, mapped by the tracer too.
  It holds a header, the instance table (enough to restore every patched byte even if the tracer
  dies), and the hit counters.

Instance ``i`` owns stub slot ``i``, table entry ``i`` and counter column ``i``. Counters are
sharded so that threads on different CPUs rarely share a cache line: the stub picks a shard from
its stack pointer (threads have distinct stacks), so the count of instance ``i`` is the sum of
column ``i`` over all shards. One more row after the shards, the *apart* row, counts (with ``lock
inc``) the hits of ``vfork``/``posix_spawn`` children before their ``exec`` (see
:mod:`djprobe.vforks`); it is not part of the hits. This module is the one definition of that layout, used by the stub
builder, the probe lifecycle and the consumer.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"DJPROBE\x01"
VERSION = 5  # 5: the "apart" counter row (vfork children, see vforks.py); 4: latency block and rings of string records; 3: one of them; 2: per-CPU counter shards, stub slots of the size in the header, rings of argument-only records
PAGE = 4096

HEADER_SIZE = PAGE
ENTRY_SIZE = 128
RING_HEADER_SIZE = 128  # head at +0, consumer's tail at +64
RING_WAITED = 8  # producers add the TSC cycles they waited for room (lossless probes)
RING_TAIL = 64
RING_HEARTBEAT = 72  # the consumer's TSC at its last drain: a lossless probe waits only if recent
RECORD_SIZE = 256
# Words of the loader hook (see loader.py), in the header page after the header itself.
LOADER_ARMED = 2048  # u32: the tracer wants to hear of libraries mapped and unmapped
LOADER_REQUEST = 2052  # u32 futex word: the hook adds one per notification and wakes the tracer
LOADER_ACK = 2056  # u32 futex word: the tracer writes the request it has handled and wakes the hook
LOADER_HEARTBEAT = 2064  # u64: the tracer's TSC, written every LOADER_BEAT seconds while it listens
# The fork hook's table (see forks.py): u32 count, then (u64 address, u64 size) of each probe
# area's data part, this area's own first; a child replaces them with fresh memory, last first.
FORK_TABLE = 2304
FORK_TABLE_ENTRIES = 2312
FORK_TABLE_MAX = 64
# --follow (follow.py): the tracer sets FORK_FOLLOW; a child adds one to FORK_SEQ (in the
# parent's area) and writes its PID at FORK_PIDS[seq % FORK_PIDS_MAX], gives itself data parts of
# its own in memfd files (header and instance table copied), and waits, bounded, until the tracer
# has mapped them and written FORK_ACK in its copy.
FORK_FOLLOW = 3344
FORK_SEQ = 3348
FORK_ACK = 3352
FORK_PIDS = 3360
FORK_PIDS_MAX = 64
FORK_NAME = 3632  # "djprobe\0": the name of a child's memfd files
# --follow across exec (execs.py): a thread entering execve adds one to EXEC_SEQ, writes its TID
# at EXEC_TIDS[seq % EXEC_TIDS_MAX], wakes the tracer and waits until EXEC_ACK holds its TID.
EXEC_SEQ = 3640
EXEC_ACK = 3644
EXEC_TIDS = 3648
EXEC_TIDS_MAX = 16

# One event record. `seq` is written last (pos + 1) and commits the record.
REGISTER_NAMES = (
    "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8",
    "rdi", "rsi", "rbp", "rbx", "rdx", "rcx", "rax", "rflags", "rsp",
)  # fmt: skip
RECORD_DTYPE = np.dtype(
    {
        "names": ["seq", "instance", "tid", "thread", "tsc", "regs"],
        "formats": [np.uint64, np.uint32, np.uint32, np.uint64, np.uint64, (np.uint64, len(REGISTER_NAMES))],
        "offsets": [0, 8, 12, 16, 24, 32],
        "itemsize": RECORD_SIZE,
    }
)
#: A record of the six argument registers and rax only (``registers="args"``): two cache lines.
ARGS_RECORD_SIZE = 128
ARG_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
ARGS_RECORD_DTYPE = np.dtype(
    {
        "names": ["seq", "instance", "tid", "thread", "tsc", "args", "rax"],
        "formats": [np.uint64, np.uint32, np.uint32, np.uint64, np.uint64, (np.uint64, len(ARG_REGISTERS)), np.uint64],
        "offsets": [0, 8, 12, 16, 24, 32, 32 + 8 * len(ARG_REGISTERS)],
        "itemsize": ARGS_RECORD_SIZE,
    }
)
#: The last 8 bytes of a slot of a ring of full or argument records: the claim of the lossless
#: producer that reserves it in a locked ring (its thread pointer, set with ``lock cmpxchg``
#: from 0 before the head moves: a signal handler of that thread, waiting for room, must not
#: wait for it; see stubs.py). The consumer zeroes it when it drains the slot.
SLOT_CLAIM_FROM_END = 8
#: The same claim in a string record (``fetch_stubs.py``): the last 8 bytes of its first 128
#: (after the mask at +88, before the string slots).
STRING_CLAIM_OFFSET = 120
#: The latency block: a table entry is {key, start TSC}; a histogram block is 64 log2 buckets of
#: nanoseconds ([0, 1), [1, 2), [2, 4), ... [2**62, 2**63)), each {count, sum of nanoseconds}
#: (16 bytes: a per-CPU stub commits both with one store).
LATENCY_ENTRY_SIZE = 16
HIST_BUCKETS = 64
HIST_WORDS = 2 * HIST_BUCKETS  # 16 cache lines
LATENCY_MISC_WORDS = 8  # per function: collisions at 0, unpaired exits at 1
MISC_COLLISIONS = 0
MISC_UNPAIRED = 1
#: A string record (``djprobe.fetch_stubs``): an argument record's first 128 bytes, then one
#: string slot per argument register: the address (8 bytes), what ``process_vm_readv`` returned
#: (8 bytes: the bytes copied, or -errno) and ``string_size`` bytes copied at the hit.
STRING_SLOT_HEADER = 16
STRING_MASK_OFFSET = 88  # u32 in the record: the argument registers whose slots the stub filled
MAX_STRING_SIZE = 4096


def string_record_size(string_size: int) -> int:
    """Bytes of a string record holding six strings of ``string_size`` bytes (a power of two)."""
    need = ARGS_RECORD_SIZE + len(ARG_REGISTERS) * (STRING_SLOT_HEADER + string_size)
    return 1 << (need - 1).bit_length()


def string_record_dtype(string_size: int) -> np.dtype:
    """The dtype of a string record (``strings`` holds the six slots of ``string_slot_dtype``)."""
    slot = string_slot_dtype(string_size)
    return np.dtype(
        {
            "names": ["seq", "instance", "tid", "thread", "tsc", "args", "rax", "mask", "strings"],
            "formats": [np.uint64, np.uint32, np.uint32, np.uint64, np.uint64, (np.uint64, len(ARG_REGISTERS)), np.uint64,
                        np.uint32, (slot, len(ARG_REGISTERS))],
            "offsets": [0, 8, 12, 16, 24, 32, 32 + 8 * len(ARG_REGISTERS), STRING_MASK_OFFSET, ARGS_RECORD_SIZE],
            "itemsize": string_record_size(string_size),
        }
    )


def string_slot_dtype(string_size: int) -> np.dtype:
    """One string slot: ``address``, ``result`` (bytes copied or -errno), ``data``."""
    return np.dtype({"names": ["address", "result", "data"], "formats": [np.uint64, np.int64, (np.uint8, string_size)],
                     "offsets": [0, 8, STRING_SLOT_HEADER], "itemsize": STRING_SLOT_HEADER + string_size})


MAX_DISPLACED = 24  # room for the original bytes of the displaced instructions (5 + 14 + slack)


class InstanceState(enum.IntEnum):
    """State of an instance table entry (stored in the target, read by later tracers)."""

    FREE = 0
    PREPARED = 1  # stub written, jump not (yet) written
    INSERTED = 2  # jump written at `address`
    RETIRED = 3  # jump removed; stub slot kept because a thread might still reference it


# Header: magic, version, sizes and addresses. Little-endian, fixed offsets.
_HEADER = struct.Struct("<8sIIIIIIIIQQQQQQQQQIIQQIIIII")
_HEADER_FIELDS = (
    "magic",
    "version",
    "header_size",
    "tracer_pid",
    "target_pid",
    "max_instances",
    "n_shards",
    "shard_shift",
    "slot_size",
    "code_address",
    "code_size",
    "data_address",
    "data_size",
    "table_offset",
    "counters_offset",
    "rings_offset",
    "rings_size",
    "reserved",
    "ring_count",
    "ring_slots",
    "drops_offset",
    "latency_offset",
    "latency_functions",
    "latency_slots",
    "latency_shards",
    "string_size",
    "string_ring_slots",
)

# Instance entry: address, stub, state, size, action, kind, original bytes, patched bytes, a name
# hint. Kind 0: a jmp rel32 at ``address``; ENTRY_SHORT: a jmp rel8 there to a springboard jmp
# rel32 in dead padding (its address is where the rel8 leads; see springboards.py).
_ENTRY = struct.Struct(f"<QQIBBH{MAX_DISPLACED}s{MAX_DISPLACED}sQ48s")
assert _ENTRY.size <= ENTRY_SIZE
ENTRY_SHORT = 1


@dataclass(frozen=True)
class AreaLayout:
    """Sizes and offsets of one probe area; a pure function of its parameters."""

    max_instances: int = 1024
    n_shards: int = 128  # shards [0, n/2): one per CPU (plain inc, rseq); [n/2, n): lock inc by rsp
    slot_size: int = 2048  # a per-CPU record stub with every register and a lossless wait takes ~1 KiB
    shard_shift: int = 21  # shard = (rsp >> shard_shift) % n_shards; thread stacks are >= 2 MiB apart
    ring_count: int = 8  # event rings, chosen like counter shards
    ring_slots: int = 4096  # records per ring
    latency_functions: int = 64  # latency probes an area can serve at once (histogram blocks)
    latency_slots: int = 4096  # entries of the table of calls in flight (16 bytes each)
    latency_shards: int = 16  # histogram shards: [0, n/2) one per CPU (rseq), [n/2, n) lock-added by rsp
    string_size: int = 64  # bytes copied per string argument (a multiple of 8)
    string_ring_slots: int = 256  # records per ring of string records

    @classmethod
    def for_counting(cls) -> "AreaLayout":
        """A layout for areas that serve only count probes: one minimal ring instead of 8 MiB of
        them (a record probe can still be placed there, its events then mostly dropped) and a small
        latency block (8 latency probes)."""
        return cls(ring_count=1, ring_slots=1, slot_size=1024, string_ring_slots=1, latency_functions=8, latency_slots=1024)

    @classmethod
    def for_latency(cls) -> "AreaLayout":
        """A layout for areas that serve latency probes (``djprobe latency``): no rings, room for
        512 functions' histograms and 16,384 calls in flight (pages are touched as used)."""
        return cls(ring_count=1, ring_slots=1, string_ring_slots=1, latency_functions=512, latency_slots=16384)

    def __post_init__(self) -> None:
        if not 8 <= self.string_size <= MAX_STRING_SIZE or self.string_size % 8:
            raise ValueError(f"string_size must be a multiple of 8 from 8 to {MAX_STRING_SIZE}, not {self.string_size}")
        for name in ("max_instances", "n_shards", "slot_size", "ring_count", "ring_slots", "string_ring_slots",
                     "latency_functions", "latency_slots", "latency_shards"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, not {value}")
        if self.n_shards < 2:
            raise ValueError("n_shards must be at least 2 (per-CPU and locked halves)")
        if self.n_shards > 512 or self.ring_count > 256:  # stubs.stack_hash gives 8 bits to mask
            raise ValueError(f"n_shards ({self.n_shards}) must be at most 512 and ring_count ({self.ring_count}) at most 256")

    @property
    def table_offset(self) -> int:
        return HEADER_SIZE

    @property
    def counters_offset(self) -> int:
        return _page_align(self.table_offset + self.max_instances * ENTRY_SIZE)

    @property
    def cpu_shards(self) -> int:
        """Shards 0 .. cpu_shards-1 belong to one CPU each (plain increments inside an rseq
        critical section); a CPU number beyond takes the locked shards."""
        return self.n_shards // 2

    @property
    def locked_shard_base(self) -> int:
        """First of the shards incremented with ``lock inc`` (chosen by the stack pointer)."""
        return self.n_shards // 2

    @property
    def locked_shards(self) -> int:
        return self.n_shards - self.n_shards // 2

    @property
    def apart_shard(self) -> int:
        """The row after the shards: hits of vfork/posix_spawn children before their exec (lock inc)."""
        return self.n_shards

    @property
    def apart_offset(self) -> int:
        """Bytes from an instance's shard 0 to its apart counter."""
        return self.apart_shard * self.shard_stride

    @property
    def shard_stride(self) -> int:
        """Bytes between two shards of the same counter (a power of two)."""
        return self.max_instances * 8

    @property
    def drops_offset(self) -> int:
        """Per-instance count of events dropped because a ring was full."""
        return _page_align(self.counters_offset + (self.n_shards + 1) * self.shard_stride)  # + the apart row

    @property
    def rings_offset(self) -> int:
        """Ring headers (one 128-byte block each: head on one cache line, tail on the next):
        ``ring_count`` rings of full records, then ``ring_count`` rings of argument records."""
        return _page_align(self.drops_offset + self.max_instances * 8)

    @property
    def ring_stride(self) -> int:
        """Bytes of records of one ring of full records (a power of two)."""
        return self.ring_slots * RECORD_SIZE

    @property
    def args_ring_stride(self) -> int:
        """Bytes of records of one ring of argument-only records (a power of two)."""
        return self.ring_slots * ARGS_RECORD_SIZE

    @property
    def records_offset(self) -> int:
        return _page_align(self.rings_offset + 2 * self.ring_count * RING_HEADER_SIZE)

    @property
    def args_records_offset(self) -> int:
        return self.records_offset + self.ring_count * self.ring_stride

    @property
    def string_record_size(self) -> int:
        return string_record_size(self.string_size)

    @property
    def string_ring_stride(self) -> int:
        """Bytes of records of one ring of string records (a power of two)."""
        return self.string_ring_slots * self.string_record_size

    @property
    def string_rings_offset(self) -> int:
        """Headers of the ``ring_count`` rings of string records (after the argument records)."""
        return _page_align(self.args_records_offset + self.ring_count * self.args_ring_stride)

    @property
    def string_records_offset(self) -> int:
        return _page_align(self.string_rings_offset + self.ring_count * RING_HEADER_SIZE)

    @property
    def rings_size(self) -> int:
        return self.string_records_offset + self.ring_count * self.string_ring_stride - self.rings_offset

    @property
    def latency_offset(self) -> int:
        """The latency block (see :mod:`djprobe.latency`): the table of calls in flight
        (``latency_slots`` entries of {key, start TSC}, 16-byte aligned: written and read whole),
        then the per-function counters (collisions, unpaired exits: ``LATENCY_MISC_WORDS`` each),
        then the histograms: ``latency_shards`` shards of ``latency_functions`` blocks of
        ``HIST_WORDS`` words (64 log2 buckets of nanoseconds, each {count, sum}). Shards
        [0, n/2) belong to one CPU each (a plain 16-byte commit inside an rseq critical
        section), [n/2, n) take ``lock`` adds, chosen by ``rsp``."""
        return _page_align(self.rings_offset + self.rings_size)

    @property
    def latency_misc_offset(self) -> int:
        return self.latency_offset + self.latency_slots * LATENCY_ENTRY_SIZE

    @property
    def hist_offset(self) -> int:
        return _page_align(self.latency_misc_offset + self.latency_functions * LATENCY_MISC_WORDS * 8)

    @property
    def hist_shard_stride(self) -> int:
        """Bytes between two shards of the same function's histogram."""
        return self.latency_functions * HIST_WORDS * 8

    @property
    def latency_size(self) -> int:
        return self.hist_offset + self.latency_shards * self.hist_shard_stride - self.latency_offset

    @property
    def data_size(self) -> int:
        return _page_align(self.latency_offset + self.latency_size)

    @property
    def code_size(self) -> int:
        return _page_align(self.max_instances * self.slot_size)

    @property
    def total_size(self) -> int:
        """Address space taken in the target: code part followed by data part."""
        return self.code_size + self.data_size

    def slot_address(self, code_address: int, index: int) -> int:
        return code_address + index * self.slot_size

    def counter_address(self, data_address: int, index: int) -> int:
        """Target address of shard 0 of the counter of instance ``index``."""
        return data_address + self.counters_offset + index * 8


def _page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass
class InstanceEntry:
    """One entry of the instance table."""

    address: int = 0
    stub_address: int = 0
    state: InstanceState = InstanceState.FREE
    size: int = 0
    action: int = 0
    original: bytes = b""
    patched: bytes = b""
    generation: int = 0
    name: str = ""
    kind: int = 0  # 0: jmp rel32 at the site; ENTRY_SHORT: jmp rel8 to a springboard

    def pack(self) -> bytes:
        if len(self.original) > MAX_DISPLACED or len(self.patched) > MAX_DISPLACED:
            raise ValueError("displaced bytes too long for the instance table")
        return _ENTRY.pack(
            self.address,
            self.stub_address,
            int(self.state),
            self.size,
            self.action,
            self.kind,
            self.original.ljust(MAX_DISPLACED, b"\0"),
            self.patched.ljust(MAX_DISPLACED, b"\0"),
            self.generation,
            self.name.encode()[:48],
        ).ljust(ENTRY_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> "InstanceEntry":
        address, stub, state, size, action, kind, orig, patched, gen, name = _ENTRY.unpack_from(raw)
        return cls(
            address=address,
            stub_address=stub,
            state=InstanceState(state) if state in InstanceState._value2member_map_ else InstanceState.FREE,
            size=size,
            action=action,
            original=orig[:size],
            patched=patched[:size],
            generation=gen,
            name=name.rstrip(b"\0").decode(errors="replace"),
            kind=kind,
        )


@dataclass(frozen=True)
class AreaHeader:
    """The header of a probe area's data part."""

    layout: AreaLayout
    tracer_pid: int
    target_pid: int
    code_address: int
    data_address: int

    def pack(self) -> bytes:
        lay = self.layout
        values = (
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self.tracer_pid,
            self.target_pid,
            lay.max_instances,
            lay.n_shards,
            lay.shard_shift,
            lay.slot_size,
            self.code_address,
            lay.code_size,
            self.data_address,
            lay.data_size,
            lay.table_offset,
            lay.counters_offset,
            lay.rings_offset,
            lay.rings_size,
            0,
            lay.ring_count,
            lay.ring_slots,
            lay.drops_offset,
            lay.latency_offset,
            lay.latency_functions,
            lay.latency_slots,
            lay.latency_shards,
            lay.string_size,
            lay.string_ring_slots,
        )
        return _HEADER.pack(*values)

    @classmethod
    def unpack(cls, raw: bytes) -> "AreaHeader":
        """Parse a header read from a target, trusting nothing in it.

        Raises ValueError with the reason if ``raw`` is not a djprobe area of this version, or if
        any size or offset is out of bounds or does not follow from the layout it claims.
        """
        if len(raw) < _HEADER.size:
            raise ValueError("too short for a probe area header")
        fields = dict(zip(_HEADER_FIELDS, _HEADER.unpack_from(raw)))
        if fields["magic"] != MAGIC:
            raise ValueError("bad magic: not a djprobe probe area")
        if fields["version"] != VERSION:
            raise ValueError(f"probe area version {fields['version']} is not supported (expected {VERSION})")
        if fields["header_size"] != HEADER_SIZE:
            raise ValueError(f"header size {fields['header_size']} is not {HEADER_SIZE}")
        for name, bound in _BOUNDS.items():
            value = fields[name]
            if value <= 0 or value & (value - 1) or value > bound:
                raise ValueError(f"{name} = {value} is out of bounds")
        if not 8 <= fields["string_size"] <= MAX_STRING_SIZE or fields["string_size"] % 8:
            raise ValueError(f"string_size = {fields['string_size']} is out of bounds")
        if not 12 <= fields["shard_shift"] < 48:
            raise ValueError(f"shard_shift = {fields['shard_shift']} is out of bounds")
        layout = AreaLayout(
            max_instances=fields["max_instances"],
            n_shards=fields["n_shards"],
            slot_size=fields["slot_size"],
            shard_shift=fields["shard_shift"],
            ring_count=fields["ring_count"],
            ring_slots=fields["ring_slots"],
            latency_functions=fields["latency_functions"],
            latency_slots=fields["latency_slots"],
            latency_shards=fields["latency_shards"],
            string_size=fields["string_size"],
            string_ring_slots=fields["string_ring_slots"],
        )
        for name in _DERIVED:
            if fields[name] != getattr(layout, name):
                raise ValueError(
                    f"header {name} = {fields[name]:#x} does not match its layout ({getattr(layout, name):#x})"
                )
        if layout.data_size > _MAX_DATA:
            raise ValueError("data part too large")
        return cls(
            layout=layout,
            tracer_pid=fields["tracer_pid"],
            target_pid=fields["target_pid"],
            code_address=fields["code_address"],
            data_address=fields["data_address"],
        )


# What a header read from a target may claim at most; the sizes it must agree with its layout on.
_BOUNDS = {
    "max_instances": 1 << 16,
    "n_shards": 1 << 12,
    "slot_size": 1 << 16,
    "ring_count": 1 << 10,
    "ring_slots": 1 << 20,
    "latency_functions": 1 << 12,
    "latency_slots": 1 << 20,
    "latency_shards": 1 << 8,
    "string_ring_slots": 1 << 20,
}
_DERIVED = (
    "code_size", "data_size", "table_offset", "counters_offset", "rings_offset", "rings_size", "drops_offset",
    "latency_offset",
)  # fmt: skip
_MAX_DATA = 1 << 32


class AreaView:
    """Typed access to a probe area's data part held in a writable buffer (the tracer's mmap)."""

    def __init__(self, buffer: memoryview | bytearray, layout: AreaLayout) -> None:
        self.buffer = memoryview(buffer)
        self.layout = layout
        self._counters = np.frombuffer(
            self.buffer,
            dtype=np.uint64,
            count=layout.n_shards * layout.max_instances,
            offset=layout.counters_offset,
        ).reshape(layout.n_shards, layout.max_instances)
        self._apart = np.frombuffer(
            self.buffer, dtype=np.uint64, count=layout.max_instances, offset=layout.counters_offset + layout.apart_offset
        )
        self._drops = np.frombuffer(self.buffer, dtype=np.uint64, count=layout.max_instances, offset=layout.drops_offset)
        ring_words = 2 * layout.ring_count * RING_HEADER_SIZE // 8
        #: Rows 0 .. ring_count-1: rings of full records; then the rings of argument records.
        self.ring_headers = np.frombuffer(
            self.buffer, dtype=np.uint64, count=ring_words, offset=layout.rings_offset
        ).reshape(2 * layout.ring_count, RING_HEADER_SIZE // 8)
        self.records = np.frombuffer(
            self.buffer, dtype=RECORD_DTYPE, count=layout.ring_count * layout.ring_slots, offset=layout.records_offset
        ).reshape(layout.ring_count, layout.ring_slots)
        self.args_records = np.frombuffer(
            self.buffer,
            dtype=ARGS_RECORD_DTYPE,
            count=layout.ring_count * layout.ring_slots,
            offset=layout.args_records_offset,
        ).reshape(layout.ring_count, layout.ring_slots)
        #: Latency block: the table of calls in flight (key, start TSC), per-function counters,
        #: histograms [shard, function, word].
        self.latency_table = np.frombuffer(
            self.buffer, dtype=np.uint64, count=2 * layout.latency_slots, offset=layout.latency_offset
        ).reshape(layout.latency_slots, 2)
        self.latency_misc = np.frombuffer(
            self.buffer, dtype=np.uint64, count=layout.latency_functions * LATENCY_MISC_WORDS,
            offset=layout.latency_misc_offset,
        ).reshape(layout.latency_functions, LATENCY_MISC_WORDS)
        self.histograms = np.frombuffer(
            self.buffer, dtype=np.uint64, count=layout.latency_shards * layout.latency_functions * HIST_WORDS,
            offset=layout.hist_offset,
        ).reshape(layout.latency_shards, layout.latency_functions, HIST_WORDS)
        #: Rings of string records: their headers, then their records.
        self.string_ring_headers = np.frombuffer(
            self.buffer, dtype=np.uint64, count=layout.ring_count * RING_HEADER_SIZE // 8, offset=layout.string_rings_offset
        ).reshape(layout.ring_count, RING_HEADER_SIZE // 8)
        self.string_records = np.frombuffer(
            self.buffer,
            dtype=string_record_dtype(layout.string_size),
            count=layout.ring_count * layout.string_ring_slots,
            offset=layout.string_records_offset,
        ).reshape(layout.ring_count, layout.string_ring_slots)

    def write_header(self, header: AreaHeader) -> None:
        raw = header.pack()
        self.buffer[: len(raw)] = raw

    def header(self) -> AreaHeader:
        return AreaHeader.unpack(bytes(self.buffer[:HEADER_SIZE]))

    def entry(self, index: int) -> InstanceEntry:
        off = self.layout.table_offset + index * ENTRY_SIZE
        return InstanceEntry.unpack(bytes(self.buffer[off : off + ENTRY_SIZE]))

    def set_entry(self, index: int, entry: InstanceEntry) -> None:
        off = self.layout.table_offset + index * ENTRY_SIZE
        self.buffer[off : off + ENTRY_SIZE] = entry.pack()

    def waited_cycles(self) -> int:
        """TSC cycles that lossless probes spent waiting for room in the rings, in all."""
        return int(self.ring_headers[:, RING_WAITED // 8].sum(dtype=np.uint64)) + int(
            self.string_ring_headers[:, RING_WAITED // 8].sum(dtype=np.uint64)
        )

    def heartbeat(self, tsc: int) -> None:
        """Tell lossless probes that the consumer is alive (its TSC now)."""
        self.ring_headers[:, RING_HEARTBEAT // 8] = tsc
        self.string_ring_headers[:, RING_HEARTBEAT // 8] = tsc

    def count(self, index: int) -> int:
        """Hits of instance ``index``: the sum over all shards."""
        return int(self._counters[:, index].sum(dtype=np.uint64))

    def counts(self) -> np.ndarray:
        """Hits of every instance (one vector, summed over shards)."""
        return self._counters.sum(axis=0, dtype=np.uint64)

    def apart(self, index: int) -> int:
        """Hits of instance ``index`` in vfork/posix_spawn children before their exec (not in
        :meth:`count`)."""
        return int(self._apart[index])

    def reset_count(self, index: int) -> None:
        self._counters[:, index] = 0
        self._apart[index] = 0
        self._drops[index] = 0

    def drops(self, index: int) -> int:
        """Events of instance ``index`` dropped because a ring was full."""
        return int(self._drops[index])

    def release(self) -> None:
        """Drop the numpy view so the underlying mmap can be closed."""
        self._counters = self._apart = self._drops = self.ring_headers = self.records = self.args_records = None  # type: ignore[assignment]
        self.latency_table = self.latency_misc = self.histograms = None  # type: ignore[assignment]
        self.string_ring_headers = self.string_records = None  # type: ignore[assignment]
        self.buffer.release()
