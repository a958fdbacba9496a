"""Jump probes: Djprobe objects, instances per address, the phases, and the undo registry.

The seed's phases, in user space:

* **preparing**: analyse the site, take a stub slot in a probe area near it, write the stub
  (action, relocated displaced instructions, jump back);
* **inserting**: with every thread of the target stopped, move any thread that stands inside the
  displaced bytes to the equivalent place in the stub, check that no thread can return into them,
  write the ``jmp``; then detach;
* **working**: the target runs untraced; the tracer only reads the counters;
* **removing**: stop every thread again, restore the original bytes, move threads that are in
  the stub's relocated copy back to the equivalent original place, and free the slot only when
  nothing can still run in it or return into it. A thread inside the stub's action is never
  stepped (a tracer killed during a step leaves the trap flag set): it runs through the action and
  the relocated copy by itself after the world resumes; its slot is *retired* and reclaimed at a
  later stop, and the probe's count stays live until then, so it stays exact.

Several probes at one address share one instance; each keeps its own count (taken as the
instance's counter minus its value when the probe joined, read while the world was stopped).
"""

from __future__ import annotations

import atexit
import bisect
import dataclasses
import gc
import logging
import time
import traceback
import weakref
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .area import AreaLayout, InstanceEntry, InstanceState
from .errors import (
    DjprobeError,
    InvalidSiteError,
    NoRoomError,
    ProcessGoneError,
    SiteBusyError,
    TargetTimeoutError,
    TracePermissionError,
)
from .process import Process, Thread
from ._sys.heap import fix_mmap_threshold, release_free_heap, release_shared_pages
from .regions import Region, area_candidates, create_region, unmap_region
from .rseq import RseqArea, glibc_rseq_area, rseq_symbols
from . import latency, overlaps, returns, springboards
from .sites import ExitAnalysis, SiteAnalysis, analyse_site, split_return_spec
from .sites_cache import SiteCache
from .slot_owners import SlotOwners
from .instance import Instance
from .stacks import StackWords
from .events import EventBatch, Regs, RingReader, ThreadMap, TscClock, decode
from .fetch_stubs import build_fetch_stub, string_rings
from .fetch_stubs32 import build_fetch_stub32, kernel_vsyscall
from .prototypes import Prototype, typed_probe
from .batch_window import InsertWindow, RemoveWindow
from .batches import StopBudget
from .stop_priority import StopPriority
from .prototypes32 import cdecl_prototype
from .stub_templates import build_count_stub_fast
from .stubs import Stub, build_record_stub, jump_bytes
from .stubs32 import build_stub32, jump_bytes32
from .arch import I386, X86_64
from .symbols import Symbols
from .traps import TrapSet
from .x86.relocate import RelocationError

log = logging.getLogger(__name__)

#: the string-copying record stub of each mode, built for a process: picked by its Arch
_FETCH_STUBS = {
    X86_64: lambda proc, *args: build_fetch_stub(*args),
    I386: lambda proc, *args: build_fetch_stub32(*args, vsyscall=kernel_vsyscall(proc.process.pid)),
}

Handler = Callable[["Djprobe", object], None]

#: At close, how often the world is let run briefly so that threads leave the stubs by themselves.
CLOSE_SETTLE_TRIES = 20
WAIT_TIMEOUT = 0.5
SYS_MADVISE = 28
MADV_POPULATE_WRITE = 23
#: A drain takes the records stamped this long before it began at most (a commit still in a
#: store buffer of another CPU must not let that thread's later record, in another ring, go first).
DRAIN_MARGIN_SECONDS = 20e-6
#: A reserved slot not committed for longer than this no longer holds back other rings' records.
#: Well under WAIT_TIMEOUT: the slot may be that of a thread whose signal handler waits for
#: room in one of the rings it holds back (its record cannot be committed before the handler
#: returns), and the consumer must let that ring go before the handler's wait times out.
HOLE_PATIENCE_SECONDS = 0.1
#: After placing this many probes at once, the free pages of the C heap go back to the system.
TRIM_AFTER = 1000
MAX_STOP_SECONDS = 0.01  # batches of insertions and removals: stop the target about this long at a time


def _remove_sorted(values: list[int], value: int) -> None:
    """Remove ``value`` from the sorted list ``values`` (a bisection, not a scan of 20,000)."""
    i = bisect.bisect_left(values, value)
    if i == len(values) or values[i] != value:
        raise ValueError(f"{value:#x} is not in the sorted list")
    del values[i]


class Djprobe:
    """A jump probe, in the seed's terms: ``addr``, ``size`` and ``handler(djp, regs)``.

    ``addr`` is an integer address or a site spec (``symbol``, ``module:symbol``, ``0xADDR``, each
    with an optional ``+offset``). ``size`` is the number of bytes to displace; leave it out to
    have it computed. After registration, ``address`` is the resolved address and ``hits`` the
    number of times the probe fired.

    ``at="return"`` (or a spec ending in ``%return``) makes a return probe: ``addr`` names a
    function, and the probe fires at each of its exits (every ``ret`` and tail call), right before
    the exit instruction, with ``regs.retval`` (``rax``) the value returned; ``hits`` counts the
    returns. It is placed only if every exit can take a jump (``exits`` then holds the analysis);
    otherwise registration raises InvalidSiteError naming the exit that cannot. A call left by
    ``longjmp`` or an exception has no return.

    ``at="latency"`` makes a latency probe (see :mod:`djprobe.latency`): the entry and every exit
    of the function, the duration of each call added into a histogram in the target; after
    registration ``latency`` holds the figures and ``hits`` counts the calls.
    """

    # 20,000 probes in a whole process: no per-probe dict unless someone adds an attribute of their
    # own, or one of the attributes below (class defaults) is set: only handlers, prototypes,
    # traps, return and latency probes and their parts set them (88 bytes less per count probe).
    handler: "Handler | None" = None
    trap: "bool | str | None" = None
    prototype: "Prototype | None" = None
    strings = 0
    exits: "ExitAnalysis | None" = None  # a return probe's exits (after registration)
    latency: "latency.Latency | None" = None  # a latency probe's figures (after registration)
    _latency_role: str | None = None  # "entry", "exit" or "both" for a part of a latency probe
    _latency_exit: "SiteAnalysis | None" = None  # for "both": the exit window its stub takes in
    _parts: "list[Djprobe] | None" = None  # a return probe's instances: one part per exit
    _parent: "Djprobe | None" = None  # the return probe this is a part of
    _preset: "SiteAnalysis | None" = None  # a part's exit window
    # Also class defaults (set per probe only where they differ: 72 bytes less per count probe).
    size: int | None = None
    record = False
    registers = "all"
    lossless = False
    at = "entry"
    no_jump_reason: str | None = None
    _baseline = 0  # the instance's count when the probe joined it
    _drop_baseline = 0
    _join_tsc = 0
    __slots__ = (
        "addr",
        "_mode",
        "address",
        "site",
        "analysis",
        "_instance",
        "_final_hits",
        "_final_missed",
        "_apart_baseline",
        "_final_apart",
        "_draining",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        addr: int | str,
        size: int | None = None,
        handler: Handler | None = None,
        *,
        record: bool = False,
        registers: str = "all",
        lossless: bool = False,
        at: str = "entry",
        trap: bool | None = None,
        prototype: "str | Prototype | None" = None,
    ) -> None:
        if not isinstance(addr, (int, str)) or isinstance(addr, bool):
            raise InvalidSiteError(f"probe address must be an int or a site spec string, not {type(addr).__name__}")
        if at not in ("entry", "return", "latency"):
            raise InvalidSiteError(f"at must be 'entry', 'return' or 'latency', not {at!r}")
        if isinstance(addr, str):
            addr, is_return = split_return_spec(addr)
            if is_return and at == "latency":
                raise InvalidSiteError("a latency probe names the function, without %return")
            at = "return" if is_return else at
        if at == "latency" and (size is not None or handler is not None or record or lossless):
            raise InvalidSiteError("a latency probe takes no size, handler, record or lossless: it only measures")
        if at == "return" and size is not None:
            raise InvalidSiteError("a return probe takes no size: each exit window's size is computed")
        if size is not None and (not isinstance(size, int) or size < 5 or size > 24):
            raise InvalidSiteError(f"size must be an integer from 5 to 24 bytes, not {size!r}")
        if handler is not None and not callable(handler):
            raise InvalidSiteError(f"handler must be callable, not {type(handler).__name__}")
        if trap not in (None, True, False, "only"):
            raise InvalidSiteError(f"trap must be None, True, False or 'only', not {trap!r}")
        if registers not in ("all", "args"):
            raise InvalidSiteError(f"registers must be 'all' or 'args', not {registers!r}")
        self.addr: int | str = addr
        if size is not None:
            self.size = size
        if handler is not None:
            self.handler = handler
        if record or handler is not None or lossless:
            self.record = True
        if registers != "all":
            self.registers = registers
        #: Recording waits for room in a full ring (up to ``ProbedProcess.wait_timeout``) instead
        #: of dropping the event, while the consumer is draining.
        if lossless:
            self.lossless = lossless
        if at != "entry":
            self.at = at
        #: Where no jump fits, fall back to a kernel uprobe (see ``traps.py``): True, False, or
        #: None for the process's ``trap_fallback``; "only" places a trap even where a jump fits
        #: (to compare, or to leave the code to the kernel). ``mode`` is then "trap", and
        #: ``no_jump_reason`` says why no jump could be placed.
        if trap is not None:
            self.trap = trap
        self._mode: str | None = None  # "jump" or "trap" once registered (see ``mode``)
        #: Parameter names and types (``prototype="char *s, long n"``, or one from
        #: ``djprobe.debuginfo``): a recording probe; ``char *`` arguments are copied at the hit.
        typed, strings = typed_probe(prototype, at)
        if typed is not None:
            self.prototype, self.strings = typed, strings
            self.record, self.registers = True, "args"
        self.address: int | None = None
        self.site: str | None = None
        self.analysis: SiteAnalysis | None = None
        self._instance: Instance | None = None
        self._final_hits: int | None = None
        self._final_missed: int | None = None
        self._apart_baseline = 0
        self._final_apart: int | None = None
        # Unregistered, but a thread may still be running through its stub: counts stay live.
        self._draining: Instance | None = None

    @property
    def mode(self) -> str | None:
        """How the probe is (or was last) placed: "jump" or "trap"; for a return or latency probe,
        that of its parts ("jump+trap" if they differ); None before it was ever placed."""
        if self._parts is not None:
            modes = sorted({p.mode for p in self._parts if p.mode})
            return "+".join(modes) if modes else None
        return self._mode

    @mode.setter
    def mode(self, value: str | None) -> None:
        self._mode = value

    @property
    def missed(self) -> int:
        """Events of this probe dropped because a ring was full (hits stay exact)."""
        if self._parts is not None:
            return sum(p.missed for p in self._parts)
        source = self._instance or self._draining
        if source is not None:
            return source.drops() - self._drop_baseline
        return self._final_missed or 0

    @property
    def registered(self) -> bool:
        if self._parts is not None:
            return any(p.registered for p in self._parts)
        return self._instance is not None

    @property
    def hits(self) -> int:
        """How many times the probe fired (exact; frozen once no thread can still be in its stub
        after unregistration)."""
        if self._parts is not None:
            return sum(p.hits for p in self._parts)
        source = self._instance or self._draining
        if source is not None:
            return source.count() - self._baseline
        return self._final_hits or 0

    @property
    def vfork_hits(self) -> int:
        """Hits in ``vfork``/``posix_spawn`` children before their ``exec`` (they run in this
        process's memory), counted apart and not in :attr:`hits`; 0 where the process has no
        usable rseq area or the vfork hook is not in (see :mod:`djprobe.vforks`)."""
        if self._parts is not None:
            return sum(p.vfork_hits for p in self._parts)
        source = self._instance or self._draining
        if source is not None and hasattr(source, "apart"):
            return source.apart() - self._apart_baseline
        return self._final_apart or 0

    def __repr__(self) -> str:
        where = self.site or (hex(self.addr) if isinstance(self.addr, int) else self.addr)
        state = "registered" if self.registered else "unregistered"
        return f"<Djprobe {where} {state} hits={self.hits}>"


class ProbedProcess:
    """A live process that djprobes can be placed in. Use :func:`attach` or :func:`spawn`.

    Every change to the target goes through this object, which can undo all of them:
    :meth:`close` (also called by ``with``, at interpreter exit, and by the CLI on signals)
    removes every probe and leaves the target running as it was.
    """

    def __init__(self, process: Process) -> None:
        fix_mmap_threshold()  # large temporaries (symbol sections, cache files) leave no holes in the heap
        self.process = process
        self.pid = process.pid
        self._symbols: Symbols | None = None
        self._regions: list[Region] = []
        self._region_numbers: dict[int, int] = {}  # id(region) -> its index in _regions (only appended)
        self._instances: dict[int, Instance] = {}
        self._addresses: list[int] = []  # sorted keys of _instances
        self.max_stop_seconds = MAX_STOP_SECONDS
        #: The tracer runs under SCHED_FIFO while the target is stopped (``enabled = False``: not).
        self.stop_priority = StopPriority()
        self._closed = False
        self._stop_depth = 0
        self._own_stop = False
        self._stop_began = time.monotonic()
        self._resume_seconds = 0.0  # how long the last resume took (a batch leaves room for it)
        self._stacks = StackWords()
        self._stacks_key: int | None = None
        self._stop_generation = 0
        self._retired: list[tuple[Instance, Region, int, Stub]] = []  # slots a thread may still be in
        #: Count with a plain increment of a per-CPU counter inside an rseq critical section where
        #: glibc registered rseq (set False before registering probes to force ``lock inc``).
        self.per_cpu_counters = True
        #: How long a lossless probe waits for room in a full ring at most (seconds); a consumer
        #: that has not drained for longer than this is taken as gone, and events are dropped.
        self.wait_timeout = WAIT_TIMEOUT
        self._rseq: tuple[RseqArea | None, str] | None = None
        #: Default-size site verdicts kept on disk per build-id (``site_cache.enabled = False``: off).
        self.site_cache = SiteCache()
        self.layout = AreaLayout()  # of probe areas created from now on (ring sizes, ...)
        self._readers: list[RingReader] = []
        self._by_slot: SlotOwners[Instance] = SlotOwners()  # (region number, slot) -> owner
        self._pending: list[EventBatch] = []
        #: Where a jump cannot be placed, place a kernel uprobe instead (``traps.py``), unless a
        #: probe says otherwise (``Djprobe(trap=...)``). Off by default here; the CLI turns it on.
        self.trap_fallback = False
        #: Where no jmp rel32 fits, a jmp rel8 to a springboard in dead padding (springboards.py).
        #: On by default; False (or ``DJPROBE_SPRINGBOARDS=0`` in the environment) leaves such
        #: sites to the trap fallback or a refusal.
        self.springboards = springboards.default_on()
        self._springboards: dict[int, Instance] = {}  # springboard address -> its instance
        self._traps: TrapSet | None = None
        self._clock: TscClock | None = None
        self._thread_map = ThreadMap()
        self.handler_errors: list[tuple[Djprobe, BaseException, str]] = []
        #: Called first by close() (e.g. loader.py: let a thread waiting in its hook go on).
        self.close_hooks: list[Callable[[], None]] = []
        #: Called with each new probe area, world stopped, before any jump leads into it (forks.py).
        self.region_hooks: list[Callable[[Region], None]] = []
        if process.stopped:
            self._thread_map.learn(process)
        _LIVE.add(self)

    # -- symbols -----------------------------------------------------------------------------
    @property
    def symbols(self) -> Symbols:
        """The target's modules and symbols (reloaded after new libraries are mapped)."""
        if self._symbols is None:
            self._symbols = Symbols.from_process(self.pid, self.process.memory)
        return self._symbols

    def refresh_symbols(self) -> None:
        self._symbols = None

    def read(self, address: int, size: int) -> bytes:
        """Read target memory as it is now."""
        return self.process.read(address, size)

    # -- stop the world ------------------------------------------------------------------------
    @contextmanager
    def stopped(self) -> Iterator[dict[int, Thread]]:
        """Keep every thread of the target stopped inside the block (re-entrant)."""
        if self._stop_depth == 0 and not self.process.stopped:
            self._stop_began = time.monotonic()
            collecting = gc.isenabled()
            gc.disable()  # a full collection (100+ ms with 20,000 probes) must not fall inside a stop
            try:
                self.stop_priority.raise_()  # not preempted while the target waits (stop_priority.py)
                self.process.stop()
                self._stop_generation += 1
                self._thread_map.learn(self.process)
                self._reclaim_retired()
            except BaseException:
                self.stop_priority.restore()
                if collecting:
                    gc.enable()
                raise
            owner = True
        else:
            owner = collecting = False
        self._own_stop = owner if self._stop_depth == 0 else self._own_stop
        self._stop_depth += 1
        try:
            yield self.process.threads
        finally:
            self._stop_depth -= 1
            if owner:
                try:
                    resumed = time.monotonic()
                    self.process.resume()
                    self._resume_seconds = min(time.monotonic() - resumed, self.max_stop_seconds / 2)
                finally:
                    self.stop_priority.restore()
                    if collecting:
                        gc.enable()

    def _batch_deadline(self) -> float:
        """When a batch of insertions or removals in the stop just made must end: the stop
        (from the request to stop to the end of the resume) stays within ``max_stop_seconds``."""
        return self._stop_began + self.max_stop_seconds - self._resume_seconds

    def _breathe(self) -> None:
        """Inside the one stop this object made itself (not a spawned target held before
        ``main``), let the target run for a moment and stop it again: a long job under one stop
        (the system calls that map a probe area) is cut into short stops."""
        if self._stop_depth != 1 or not self._own_stop:
            return
        self.stop_priority.restore()  # the target runs: the tracer is an ordinary task again
        self.process.resume()
        self.stop_priority.raise_()
        self.process.stop()
        self._stop_generation += 1
        self._thread_map.learn(self.process)

    # -- registration --------------------------------------------------------------------------
    def analyse(self, djp: Djprobe, *, cached: bool = True) -> SiteAnalysis:
        """Resolve and analyse the site of ``djp`` without changing the target (a default-size
        verdict through the on-disk cache of :mod:`djprobe.sites_cache` unless ``cached`` is False)."""
        if djp._preset is not None:
            return djp._preset  # an exit window of a return probe
        if cached and djp.size is None and self.site_cache.enabled:
            return self.site_cache.analyse(self.symbols, self.resolve_site(djp.addr), self.process.memory)  # type: ignore[arg-type]
        return analyse_site(self.symbols, self.resolve_site(djp.addr), djp.size, self.process.memory)  # type: ignore[arg-type]

    def resolve_site(self, spec: int | str) -> object:
        """The one site a spec names (an address stays as it is).

        Raises InvalidSiteError if it names several functions, SymbolNotFoundError if none."""
        if not isinstance(spec, str):
            return spec
        resolved = self.symbols.resolve(spec)
        if len(resolved) != 1:
            names = ", ".join(r.name for r in resolved[:5])
            raise InvalidSiteError(f"site {spec!r} matches {len(resolved)} functions ({names}...): give one")
        return resolved[0]

    def register(self, djp: Djprobe) -> Djprobe:
        """Place ``djp`` in the target (the seed's ``register_djprobe``).

        Raises InvalidSiteError (EINVAL) with the reason the site was refused, NoRoomError
        (ENOMEM) when no stub memory can be placed within reach, SiteBusyError (EBUSY) when
        something else patched the address or a thread may return into the displaced bytes.
        """
        errors = self.register_many([djp])
        if errors:
            raise errors[0][1]
        return djp

    def register_many(self, djps: Sequence[Djprobe]) -> list[tuple[Djprobe, DjprobeError]]:
        """Place many probes; returns those refused, with the error.

        Sites are analysed and stubs written while the target runs (a stub is unreachable
        until its jump is written); the jumps then go in with the world stopped, in batches
        that keep each stop under ``max_stop_seconds``.
        """
        self._check_open()
        refused: list[tuple[Djprobe, DjprobeError]] = []
        if getattr(self.process, "arch", None) is I386:  # ILP32 types on the cdecl stack
            for djp in djps:
                if djp.prototype is not None and not djp.registered:
                    djp.prototype = cdecl_prototype(djp.prototype)
                    djp.strings = djp.prototype.string_mask if djp.strings else 0
        djps = returns.expand(self, djps, refused)  # a return probe: one part per exit window
        djps = latency.expand(self, djps, refused)  # a latency probe: its entry, then its exit windows
        # [djp, analysis, region, slot, stub] (the last three once prepared), all made before any
        # analysis: the batch's temporaries then fill whole allocator pools of their own, given
        # back together (made one by one between the analyses, with a (region, slot, stub) tuple
        # each, they left 2.6 MB of holes among the objects kept)
        plans: list[list] = [[djp, None, None, None, None] for djp in djps]
        to_trap: list[tuple[Djprobe, SiteAnalysis | None, DjprobeError]] = []
        for plan in plans:
            djp = plan[0]
            if djp.registered:
                refused.append((djp, InvalidSiteError(f"{djp!r} is already registered")))
                plan[0] = None
                continue
            analysis = None
            try:
                analysis = self.analyse(djp)
                analysis = overlaps.unpatched_analysis(self, djp, analysis) or analysis  # covers one of ours
                if djp.trap == "only":
                    raise InvalidSiteError(f"{analysis.site}: a trap was asked for (trap='only')",
                                           address=analysis.address, reason="a trap was asked for (trap='only')")
            except DjprobeError as exc:
                self._refuse_or_trap(djp, analysis, exc, refused, to_trap)
                plan[0] = None
                continue
            plan[1] = analysis
        plans = [p for p in plans if p[0] is not None]
        windows = overlaps.PlanWindows(plans)
        overlaps.order_plans(plans, windows)  # a probe inside another's window after it: it joins that stub
        no_rel32: dict[int, SiteAnalysis] = {}  # id(djp) -> its refused analysis, for a short plan
        for plan in plans:
            djp, analysis = plan[0], plan[1]
            if analysis.ok or analysis.address in self._instances or overlaps.joins(self, djp, analysis, windows):
                continue
            short = springboards.plan(self, djp, analysis)
            if short is not None:
                no_rel32[id(djp)] = analysis  # if the short jump fails: this refusal, or a trap
                plan[1] = short  # a jmp rel8 to a springboard
                windows.add(short)  # a probe inside it joins its stub
                continue
            plan[0] = None
            other = self._overlapping(analysis.address, max(1, analysis.size))
            if other is not None:
                exc: DjprobeError = SiteBusyError(
                    f"{analysis.site}: inside the displaced bytes of the probe at {other.address:#x}",
                    address=analysis.address,
                )
            else:
                exc = analysis.error()  # type: ignore[assignment]
            self._refuse_or_trap(djp, analysis, exc, refused, to_trap)
        plans = [p for p in plans if p[0] is not None]
        overlaps.order_plans(plans, windows)  # again: inside a short window, after it
        first_at: set[int] = set()
        for plan in plans:
            djp, analysis = plan[0], plan[1]
            if analysis.address in self._instances or analysis.address in first_at or overlaps.joins(self, djp, analysis, windows):
                continue
            first_at.add(analysis.address)
            try:
                plan[2:] = self._prepare(analysis, *self._action_for(djp), part=djp, strings=djp.strings)
            except DjprobeError as exc:
                refusal = no_rel32.get(id(djp))
                if refusal is not None:  # the short jump's stub: the site's own refusal, or a trap
                    analysis, exc = refusal, springboards.refusal(refusal, self._site_error(exc))
                self._refuse_or_trap(djp, analysis, exc, refused, to_trap)
                plan[0] = None
        pending = [p for p in plans if p[0] is not None]
        pending.reverse()
        window = InsertWindow(self)  # several stops: the call's counts start at its last one
        while pending:
            with self.stopped():
                window.stopped()
                self._stack_snapshot()  # first: it costs the same for one probe as for many
                budget = StopBudget(self._batch_deadline())
                while pending:
                    djp, analysis, region, slot, stub = pending.pop()
                    prepared = (region, slot, stub) if region is not None else None
                    try:
                        self._insert(djp, analysis, prepared)
                    except DjprobeError as exc:
                        refusal = no_rel32.get(id(djp))
                        if refusal is None:
                            refused.append((djp, self._site_error(exc)))
                        else:  # no short jump after all (no springboard left, ...): a trap, or refused
                            self._refuse_or_trap(djp, refusal, springboards.refusal(refusal, self._site_error(exc)),
                                                 refused, to_trap)
                    if not budget.room_for_another() and not returns.same_group(djp, pending):
                        break
                if not pending:
                    window.close(djps)
        if to_trap:
            with self.stopped():  # every thread stopped: the events cover all of them
                for djp, analysis, exc in to_trap:
                    try:
                        self.traps.place(djp, analysis, exc)
                    except DjprobeError as err:
                        refused.append((djp, self._site_error(err)))
        order = {id(djp): i for i, djp in enumerate(djps)}
        refused.sort(key=lambda r: order.get(id(r[0]), -1))  # as given (return probes first)
        self.site_cache.flush()
        if len(djps) >= TRIM_AFTER:
            release_free_heap()  # the batch's temporaries (cache files, plans) leave holes in the C heap
            for region in self._regions:  # written through the tracer's views: not needed resident
                release_shared_pages(region._mmap)
        self._heartbeat()  # registration took its time: the consumer is alive as of now
        return returns.settle(self, refused)

    @property
    def traps(self) -> TrapSet:
        """The trap probes (kernel uprobes) of this process."""
        if self._traps is None:
            self._traps = TrapSet(self)
        return self._traps

    def _refuse_or_trap(self, djp: Djprobe, analysis: SiteAnalysis | None, exc: DjprobeError,
                        refused: list, to_trap: list) -> None:
        exc = self._site_error(exc)
        if self.traps.wants(djp, analysis, exc):
            to_trap.append((djp, analysis, exc))
        else:
            refused.append((djp, exc))

    def _site_error(self, exc: DjprobeError) -> DjprobeError:
        """Return ``exc`` if it is about one site; raise it if it is about the whole process
        (gone, not traceable, not stopping), so a batch does not report it once per site."""
        if isinstance(exc, (ProcessGoneError, TracePermissionError, TargetTimeoutError)):
            raise exc
        if not self.process.is_alive():
            raise ProcessGoneError(f"no such process: {self.pid} (it exited)") from exc
        return exc

    @staticmethod
    def _action_for(djp: Djprobe) -> tuple[str, str, bool]:
        if djp._latency_role is not None:
            return ("latency", "all", False)
        if getattr(djp, "build_stub", None) is not None:
            return ("custom", "all", False)  # a probe that builds its own stub (loader.py)
        return ("record", djp.registers, djp.lossless) if djp.record else ("count", "all", False)

    def _overlapping(self, address: int, size: int) -> Instance | None:
        """The instance whose displaced bytes overlap [address, address + size), if any."""
        i = bisect.bisect_left(self._addresses, address + size) - 1
        if i >= 0:
            inst = self._instances[self._addresses[i]]
            if inst.address + inst.size > address:
                return inst
        for sb, inst in self._springboards.items():  # a springboard is patched bytes too
            if sb < address + size and address < sb + springboards.SPRINGBOARD_SIZE:
                return inst
        return None

    def _insert(self, djp: Djprobe, analysis: SiteAnalysis, prepared: tuple[Region, int, Stub] | None) -> None:
        """Insert with the world stopped (the inserting phase)."""
        try:
            self._insert_stopped(djp, analysis, prepared)
        except BaseException:
            if prepared is not None and self._by_slot.get((self._region_number(prepared[0]), prepared[1])) is None:
                prepared[0].give_back(prepared[1])  # never reachable: free it
            raise

    def _insert_stopped(self, djp: Djprobe, analysis: SiteAnalysis, prepared: tuple[Region, int, Stub] | None) -> None:
        address = analysis.address
        short = springboards.in_the_way(self, djp, analysis) if self._springboards else None
        if short is not None:
            raise SiteBusyError(f"{analysis.site}: overlaps the short jump at {short.address:#x} or its springboard",
                                address=address)
        existing = self._instances.get(address)
        if analysis.springboard is not None and existing is None and not springboards.joins_short(self, djp, analysis):
            springboards.insert(self, djp, analysis, prepared)
            return
        if existing is not None and overlaps.shared(existing) and djp._preset is None:
            if not overlaps.can_share(self, djp):
                raise SiteBusyError(f"{analysis.site}: probes share a stub here; only a count or a record without strings "
                                    "can join them (not a latency probe, a string copy, a hook of djprobe's)",
                                    address=address)
            if djp.size is not None and djp.size != existing.size:
                raise SiteBusyError(f"{analysis.site}: inside the window of the probe at {(existing.host or existing).address:#x}: "
                                    "its size is not yours to choose", address=address)
            overlaps.join_member(self, djp, existing, analysis)
            return
        host = (overlaps.host_for(self, address)
                if existing is None and djp._preset is None and djp.size is None and overlaps.can_share(self, djp) else None)
        if host is not None:  # inside another probe's window: join its stub
            if prepared is not None:
                prepared[0].give_back(prepared[1])
            overlaps.insert_guest(self, djp, analysis, host)
            return
        if existing is not None:
            conflict = latency.join_conflict(existing, djp)
            hook_joins = (existing.action == "custom") != (getattr(djp, "build_stub", None) is not None)
            if conflict is None and hook_joins:
                conflict = self._hook_conflict(existing, djp)
            if conflict is None:
                conflict = returns.join_conflict(existing, analysis)
                if conflict is not None and (overlaps.place_exit(self, djp, analysis, prepared)
                                             or overlaps.reanchor(self, djp, analysis, existing, prepared)):
                    return  # an entry probe and an exit share the window
            if conflict is not None:
                raise SiteBusyError(f"{analysis.site}: {conflict}", address=address)
            if djp.size is not None and djp.size != existing.size:
                raise SiteBusyError(
                    f"{analysis.site}: a probe with size {existing.size} is already there, not {djp.size}",
                    address=address,
                )
            if hook_joins and existing.action != "custom":
                self._take_hook(existing, djp)  # the hook's stub counts for the probes there too
            elif not hook_joins and not existing.serves(djp):
                self._replace_stub(existing, djp)
            self._join(djp, existing, analysis)
            return
        other = self._overlapping(address, analysis.size)
        if other is not None and (overlaps.place_exit(self, djp, analysis, prepared)
                                  or overlaps.reanchor(self, djp, analysis, other, prepared)):
            return  # one window now holds both probes' actions
        if other is not None:
            raise SiteBusyError(f"{analysis.site}: displaced bytes overlap the probe at {other.address:#x}", address=address)
        original = self.process.read(address, analysis.size)
        if original == analysis.original:
            original = analysis.original  # the analysis's bytes: one copy per probe, not two
        else:
            # Changed since it was analysed: look again now that nothing runs.
            analysis = self.analyse(djp, cached=False)
            if not analysis.ok:
                raise analysis.error()
            original = self.process.read(address, analysis.size)
            if original != analysis.original:
                raise SiteBusyError(f"{analysis.site}: the bytes at the site differ from the file", address=address)
            if prepared is not None:
                prepared[0].give_back(prepared[1])
                prepared = None
        blocker = self._return_into(address, address + analysis.size)
        if blocker:
            raise SiteBusyError(f"{analysis.site}: {blocker}", address=address)
        action, registers, lossless = self._action_for(djp)
        region, slot, stub = prepared or self._prepare(analysis, action, registers, lossless, part=djp, strings=djp.strings)
        patched = self._jump(address, stub.address)
        entry = InstanceEntry(
            address=address,
            stub_address=stub.address,
            state=InstanceState.PREPARED,
            size=analysis.size,
            original=original,
            patched=patched + original[len(patched) :],
            name=analysis.site[:48],
        )
        region.view.set_entry(slot, entry)
        self._move_threads_into_stub(analysis, stub)
        self.process.write(address, patched)
        entry.state = InstanceState.INSERTED
        region.view.set_entry(slot, entry)
        instance = Instance(analysis, region, slot, stub, original, entry.patched, action, registers, lossless, djp.strings)
        self._instances[address] = instance
        bisect.insort(self._addresses, address)
        self._by_slot[(self._region_number(region), slot)] = instance
        self._join(djp, instance, analysis, fresh=True)

    def _join(self, djp: Djprobe, instance: Instance, analysis: SiteAnalysis, fresh: bool = False) -> None:
        """``djp`` is served by ``instance`` from now on; ``fresh``: the instance was placed just
        now, world stopped, so its counts are 0 (its slot's counters were zeroed when the slot was
        given back, and no thread could reach its stub before): not read, which would map every
        counter page of the area into the tracer (1 MiB per 1,024 probes) during insertion."""
        djp.mode = "jump"
        djp.address = analysis.address
        djp.site = analysis.site
        djp.analysis = analysis
        # set only where they differ from the class defaults (no per-probe dict for a count probe)
        for name, value in (("no_jump_reason", None), ("_baseline", 0 if fresh else instance.count()),
                            ("_drop_baseline", 0 if fresh else instance.drops()),
                            ("_apart_baseline", 0 if fresh else instance.apart()),
                            ("_join_tsc", self.clock.now_tsc() if djp.record else 0)):
            if getattr(djp, name) != value:
                setattr(djp, name, value)
        djp._final_apart = None
        djp._final_hits = None
        djp._final_missed = None
        djp._instance = instance
        instance.probes += (djp,)

    def _prepare(self, analysis: SiteAnalysis, action: str, registers: str, lossless: bool = False,
                 part: Djprobe | None = None, strings: int = 0) -> tuple[Region, int, Stub]:
        """Take a slot near the site and write its stub (not reachable by any thread yet); a
        ``part`` with a ``build_stub(self, analysis, region, slot)`` builds a custom action's stub
        (loader.py, forks.py: for the modes in its ``stub_arches``), a latency part a latency stub;
        ``strings`` (a mask of argument slots) makes a record stub that copies those strings
        (``fetch_stubs.py``, or ``fetch_stubs32.py`` in a 32-bit process)."""
        builder = getattr(part, "build_stub", None)
        tried_new = False
        # The last slots of an area are kept for the probes already in it (a probe joining one
        # of their windows takes a slot there, and every change of a shared stub one more).
        candidates = [r for r in self._regions if r.reaches(analysis.address)
                      and len(r.free_slots) > overlaps.reserved_slots(r.layout)]
        while True:
            if not candidates:
                if tried_new:
                    raise NoRoomError(f"{analysis.site}: no stub memory within reach", address=analysis.address)
                self.process.prepare_syscalls()  # the slow part of the first injected call, before the stop
                near = area_candidates(self.process, analysis.address, self.layout)  # the maps: before it too
                with self.stopped():  # mapping it takes injected syscalls: short stops
                    region = create_region(self.process, analysis.address, self.layout, between=self._breathe,
                                           candidates=near)
                    # owned (and unmapped by close) even if resuming after it fails
                    self._regions.append(region)
                    self._region_numbers[id(region)] = len(self._regions) - 1
                    self._readers.append(RingReader(region.view, len(self._regions) - 1))
                    for hook in self.region_hooks:  # before any jump can lead into it
                        hook(region)
                candidates = [region]
                tried_new = True
            region = candidates.pop(0)
            slot = region.take_slot()
            if slot is None:
                continue
            try:
                if action == "latency":  # per architecture: djprobe.latency picks the stub module
                    stub = latency.build_stub(self, part, analysis, region, slot)  # type: ignore[arg-type]
                elif action == "record" and strings and builder is None:  # per Arch: djprobe.fetch_stubs(32)
                    self._populate_rings(region)
                    where = region.record_targets(slot, self._thread_map.tid_offset, self._wait_cycles(lossless))
                    rings = string_rings(region.layout, region.data_address)
                    where = dataclasses.replace(where, rseq_offset=self._rseq_offset())  # a vfork child's hits apart
                    build_fetch = _FETCH_STUBS[getattr(self.process, "arch", X86_64)]
                    stub = build_fetch(self, analysis, region.layout, region.slot_address(slot), where, rings, strings)
                elif builder is not None:  # written for the modes its class names (stub_arches)
                    if getattr(self.process, "arch", X86_64) not in getattr(part, "stub_arches", (X86_64,)):
                        region.free_slots.append(slot)
                        raise InvalidSiteError(f"{analysis.site}: {type(part).__name__} probes are not supported "
                                               "in 32-bit processes yet", address=analysis.address)
                    stub = builder(self, analysis, region, slot)
                elif getattr(self.process, "arch", None) is I386:  # 32-bit code: djprobe.stubs32
                    if action not in ("count", "record"):
                        region.free_slots.append(slot)
                        raise InvalidSiteError(
                            f"{analysis.site}: {action} probes are not supported in 32-bit processes yet",
                            address=analysis.address,
                        )
                    targets = None
                    if action == "record":
                        self._populate_rings(region)
                        targets = region.record_targets(slot, self._thread_map.tid_offset, self._wait_cycles(lossless))
                        targets = dataclasses.replace(targets, rseq_offset=self._rseq_offset())  # vfork children apart
                    stub = build_stub32(analysis, region, slot, action, registers, targets, self._rseq_offset())
                elif action == "record":
                    self._populate_rings(region)
                    targets = region.record_targets(slot, self._thread_map.tid_offset, self._wait_cycles(lossless))
                    targets = dataclasses.replace(targets, rseq_offset=self._rseq_offset())  # per-CPU count and rings
                    stub = build_record_stub(analysis, region.layout, region.slot_address(slot), targets, registers)
                else:  # the count action from a template (djprobe.stub_templates)
                    stub = build_count_stub_fast(
                        analysis,
                        region.layout,
                        region.slot_address(slot),
                        region.counter_address(slot),
                        self._rseq_offset(),
                        slot=slot,
                        code_address=region.code_address,
                    )
            except RelocationError as exc:
                region.free_slots.append(slot)
                if tried_new:
                    raise NoRoomError(f"{analysis.site}: {exc.reason}", address=analysis.address) from exc
                continue
            self.process.write(stub.address, stub.image())
            return region, slot, stub

    def _region_number(self, region: Region) -> int:
        """The index of ``region`` in ``_regions`` (a dict lookup, not a scan per insertion)."""
        number = self._region_numbers.get(id(region))
        if number is None or number >= len(self._regions) or self._regions[number] is not region:
            number = self._regions.index(region)
            self._region_numbers[id(region)] = number
        return number

    def _jump(self, site: int, stub: int) -> bytes:
        """The jmp rel32 written at ``site`` (in a 32-bit process it wraps the 4 GiB)."""
        return jump_bytes32(site, stub) if getattr(self.process, "arch", None) is I386 else jump_bytes(site, stub)

    def _rseq_offset(self) -> int | None:
        """glibc's rseq area offset when per-CPU counting is usable in this process (decided
        once, with the world stopped: every thread's registration is checked), else None."""
        if not self.per_cpu_counters:
            return None
        if self._rseq is None:
            addresses = rseq_symbols(self.symbols)  # symbol tables: read before the stop
            with self.stopped():
                self._rseq = glibc_rseq_area(self.process, addresses)
            if self._rseq[0] is None:
                log.info("per-CPU counters not used in process %d: %s", self.pid, self._rseq[1])
        area = self._rseq[0]
        return None if area is None else area.offset

    def _wait_cycles(self, lossless: bool) -> int:
        """TSC cycles a lossless record stub waits for room at most (0: never waits)."""
        if not lossless:
            return 0
        self._heartbeat()  # the consumer is alive from now on
        return max(1, int(self.wait_timeout * 1e9 / self.clock.ns_per_tick))

    def _heartbeat(self) -> None:
        tsc = self.clock.now_tsc()
        for reader in self._readers:
            reader.view.heartbeat(tsc)

    @property
    def waited_seconds(self) -> float:
        """Time lossless probes spent waiting for room in the rings, all threads together."""
        cycles = sum(reader.view.waited_cycles() for reader in self._readers)
        return cycles * self.clock.ns_per_tick / 1e9

    def _populate_rings(self, region: Region) -> None:
        """Map the event rings of ``region`` in the target before the first record probe uses
        them, so that no hit pays a page fault (about 300 ns per record measured here)."""
        if region.rings_populated:
            return
        lay = region.layout
        start = region.data_address + lay.rings_offset
        with self.stopped():
            result = self.process.syscall(self.process.arch.syscalls["madvise"], start, lay.data_size - lay.rings_offset, MADV_POPULATE_WRITE)
        if result < 0:
            log.info("madvise(MADV_POPULATE_WRITE) of the event rings failed: %d", result)
        region.rings_populated = True

    def _return_into(self, start: int, end: int) -> str | None:
        """Why a thread might resume strictly inside (start, end) other than through its rip
        (a return address or a signal frame on its stack), or None."""
        found = self._stack_snapshot().first_inside(start, end)
        if found is not None:
            tid, word = found
            return (
                f"thread {tid} holds {word:#x} on its stack (a return address or signal "
                "frame inside the displaced bytes); try again later"
            )
        return None

    def _stack_snapshot(self) -> StackWords:
        """The code addresses on every stopped thread's whole used stack (cached for this stop:
        no thread runs while the world is stopped)."""
        key = self._stop_generation
        if self._stacks_key != key:
            self._stacks = StackWords.of(self.process)
            self._stacks_key = key
        return self._stacks

    def _move_threads_into_stub(self, analysis: SiteAnalysis, stub: Stub) -> None:
        start, end = analysis.address, analysis.address + analysis.size
        for thread in self.process.threads.values():
            regs = thread.regs()
            if start < regs.rip < end or (thread.in_syscall_restart() and start < regs.rip - 2 < end):
                new_rip = stub.relocated.address_map.get(regs.rip)  # built on demand (stub_templates.TemplateStub)
                if new_rip is None:
                    raise SiteBusyError(
                        f"{analysis.site}: thread {thread.tid} stopped at {regs.rip:#x}, not at an instruction "
                        "boundary of the displaced bytes",
                        address=start,
                    )
                regs = regs.copy()
                regs.rip = new_rip
                thread.set_regs(regs)

    # -- removal -------------------------------------------------------------------------------
    def unregister(self, djp: Djprobe) -> None:
        """Remove ``djp`` (the seed's ``unregister_djprobe``); its count is kept in ``hits``."""
        self.unregister_many([djp])

    def unregister_many(self, djps: Iterable[Djprobe]) -> None:
        """Remove many probes, in stops of the world of about ``max_stop_seconds`` each."""
        djps = [d for d in returns.parts_of(djps) if d._instance is not None]
        if self._traps is not None:
            djps = self._traps.unregister(djps)  # trap probes: events closed, counts final
        if not djps:
            return
        if not self.process.is_alive() or self._image_replaced():
            for djp in djps:
                self._forget(djp)
            return
        pending = list(reversed(djps))
        window = RemoveWindow(self, djps)  # several stops: the call's counts end at its first one
        while pending:
            with self.stopped():
                window.stopped()
                self._stack_snapshot()  # first: it costs the same for one probe as for many
                budget = StopBudget(self._batch_deadline())
                while pending:
                    djp = pending.pop()
                    instance = djp._instance
                    if instance is None:
                        continue
                    if len(instance.probes) == 1 and overlaps.shared(instance):
                        overlaps.remove_member(self, instance, djp)
                    elif len(instance.probes) == 1:
                        self._remove_instance(instance)  # freezes the final count
                    self._detach_probe(djp)
                    if not budget.room_for_another() and not returns.same_group(djp, pending):
                        break
        window.close()

    def _image_replaced(self) -> bool:
        """Whether the target exec'd since our probe areas were mapped (they are gone)."""
        if not self._regions:
            return False
        try:
            starts = {(m.start, m.perms) for m in self.process.maps()}
        except DjprobeError:
            return True
        return not any((r.code_address, "r-xp") in starts for r in self._regions)

    def _forget(self, djp: Djprobe) -> None:
        """Drop a probe whose target is gone (exited or exec'd): nothing to write back."""
        instance = djp._instance
        self._detach_probe(djp)
        if instance is not None and not instance.probes and overlaps.shared(instance):
            overlaps.forget_member(self, instance)
        elif instance is not None and not instance.probes and self._instances.get(instance.address) is instance:
            del self._instances[instance.address]
            _remove_sorted(self._addresses, instance.address)
            if instance.springboard is not None:
                self._springboards.pop(instance.springboard, None)

    def _detach_probe(self, djp: Djprobe) -> None:
        instance = djp._instance
        if instance is None:
            return
        if djp._final_hits is None:
            djp._final_hits = instance.count() - djp._baseline
            djp._final_missed = instance.drops() - djp._drop_baseline
            djp._final_apart = instance.apart() - djp._apart_baseline
        djp._instance = None
        instance.probes = tuple(p for p in instance.probes if p is not djp)

    def _remove_instance(self, instance: Instance) -> None:
        try:
            current = self.process.read(instance.address, len(instance.patched))
        except DjprobeError:
            current = b""
        if current[:5] == instance.patched[:5]:
            self.process.write(instance.address, instance.original)
        elif current:
            # Not our jump any more (the program exec'd, or something rewrote the code): writing
            # the old bytes could corrupt what is there now. Leave it.
            log.warning(
                "bytes at %#x are not our jump any more (%s, expected %s); not restoring them",
                instance.address,
                current[:5].hex(),
                instance.patched[:5].hex(),
            )
        springboards.remove(self, instance)  # a short jump's springboard, once its rel8 is gone
        self._move_threads_out_of_stub(instance.stub)
        del self._instances[instance.address]
        _remove_sorted(self._addresses, instance.address)
        instance.old_slots += ((instance.region, instance.slot, instance.stub),)
        instance.removed = True
        instance.drained = instance.drained + tuple(instance.probes)
        for djp in instance.drained:
            djp._draining = instance  # counts stay live until every slot is given back
        for region, slot, stub in list(instance.old_slots):
            self._give_back_or_retire(instance, region, slot, stub)

    def _move_threads_out_of_stub(self, stub: Stub, onto: Stub | None = None) -> None:
        """Move every thread standing in the relocated copy of ``stub`` to the equivalent place
        in the original code (``onto`` None: the original bytes are back) or in the relocated copy
        of the stub ``onto`` that replaces it. A thread inside the action (or blocked in a
        relocated system call) stays: it runs out of the stub by itself after resume, and the
        slot is retired until it has. Nothing is single-stepped."""
        for thread in self.process.threads.values():
            rip = thread.regs().rip
            if not (stub.address <= rip < stub.end) or stub.in_action(rip) or thread.in_syscall_restart():
                continue
            original = stub.original_address(rip)
            if original is None:
                continue
            target = original if onto is None else onto.relocated.address_map.get(original)
            if target is not None:
                regs = thread.regs()
                regs.rip = target
                thread.set_regs(regs)

    def _give_back_or_retire(self, owner: Instance, region: Region, slot: int, stub: Stub) -> None:
        """``stub`` (in ``slot``) of ``owner`` is out of use: give the slot back if no thread can
        still run in it or return into it, else retire it until a later stop finds it idle (a slot
        retired already is left to the stop that reclaims it: settled twice, it would be given
        back twice)."""
        if any(r is region and i == slot for _, r, i, _ in self._retired):
            return
        if self._referenced(stub.address, stub.end):
            entry = region.view.entry(slot)
            if entry.state != InstanceState.FREE:  # a guest's slot has no entry (overlaps.py)
                entry.state = InstanceState.RETIRED
                region.view.set_entry(slot, entry)
            self._retired.append((owner, region, slot, stub))
        else:
            self._settle(owner, region, slot)

    def _settle(self, owner: Instance, region: Region, slot: int) -> None:
        """No thread can be in ``slot`` any more: its counts are final; give it back."""
        if owner.action == "record":
            self._drain(complete=True)  # its events are attributed before the slot can be reused
        owner.old_slots = tuple(s for s in owner.old_slots if (s[0], s[1]) != (region, slot))
        owner.carried_hits += region.view.count(slot)
        owner.carried_drops += region.view.drops(slot)
        owner.carried_apart += region.view.apart(slot)
        if owner.removed and not owner.old_slots:
            owner.finish_drained()
        key = (self._region_number(region), slot)
        if self._by_slot.get(key) is owner and (owner.removed or owner.region is not region or owner.slot != slot):
            del self._by_slot[key]
        region.give_back(slot)

    def _reclaim_retired(self) -> None:
        """Give back the retired slots that no thread can be in any more (world stopped)."""
        if not self._retired:
            return
        still = []
        for owner, region, slot, stub in self._retired:
            if self._referenced(stub.address, stub.end):
                still.append((owner, region, slot, stub))
            else:
                self._settle(owner, region, slot)
        self._retired = still

    @staticmethod
    def _hook_conflict(existing: Instance, djp: Djprobe) -> str | None:
        """Why a hook of djprobe's own (a probe that builds its stub) and a probe of another kind
        cannot share one address, or None: only a hook that says whom it takes in, with a
        ``join_conflict(action, strings)`` (djprobe.vforks), shares its address, whichever of
        the two came first; its stub then serves both (see :meth:`_take_hook`)."""
        placing_hook = getattr(djp, "build_stub", None) is not None
        hook = djp if placing_hook else next((p for p in existing.probes if getattr(p, "build_stub", None)), None)
        asks = getattr(hook, "join_conflict", None)
        if asks is None:
            return "djprobe's own hook (a stub of another kind) is there"
        if placing_hook:
            return asks(existing.action, existing.strings)
        return asks(ProbedProcess._action_for(djp)[0], djp.strings)

    def _take_hook(self, instance: Instance, hook: Djprobe) -> None:
        """``hook`` (whose stub counts as a count stub does, djprobe.vforks) comes to the address
        of the count stub ``instance``: the hook's stub serves them all from now on."""
        prepared = self._prepare(instance.analysis, "custom", "all", part=hook)
        self._switch_stub(instance, prepared, "custom", "all", False, 0)

    def _replace_stub(self, instance: Instance, djp: Djprobe) -> None:
        """Give ``instance`` a record stub (a probe that wants events joined a count-only site)."""
        registers = "all" if "all" in (djp.registers, instance.registers if instance.action == "record" else "args") else "args"
        lossless = djp.lossless or instance.lossless
        strings = djp.strings | instance.strings
        if strings and registers == "all":
            raise SiteBusyError(f"{instance.analysis.site}: a probe recording every register is there; "
                                "string arguments are fetched only by argument records", address=instance.address)
        prepared = self._prepare(instance.analysis, "record", registers, lossless, strings=strings)
        self._switch_stub(instance, prepared, "record", registers, lossless, strings)

    def _switch_stub(self, instance: Instance, prepared: tuple[Region, int, Stub], action: str, registers: str,
                     lossless: bool, strings: int) -> None:
        """Point ``instance``'s jump at the new stub ``prepared`` (world stopped); the old one
        is counted until it is given back."""
        region, slot, stub = prepared
        patched = instance.patched if instance.springboard is not None else self._jump(instance.address, stub.address)
        entry = instance.region.view.entry(instance.slot)
        entry.stub_address = stub.address
        entry.patched = patched + instance.original[len(patched) :]
        region.view.set_entry(slot, entry)
        if instance.springboard is not None:
            springboards.repoint(self, instance, stub)  # the rel8 stays; its springboard leads to the new stub
        else:
            self.process.write(instance.address, patched)
        old_region, old_slot, old_stub = instance.region, instance.slot, instance.stub
        self._move_threads_out_of_stub(old_stub, onto=stub)
        instance.old_slots += ((old_region, old_slot, old_stub),)  # counted until given back
        instance.region, instance.slot, instance.stub = region, slot, stub
        instance.action, instance.registers, instance.patched = action, registers, entry.patched
        instance.lossless, instance.strings = lossless, strings
        self._by_slot[(self._region_number(region), slot)] = instance
        self._give_back_or_retire(instance, old_region, old_slot, old_stub)

    def _referenced(self, start: int, end: int) -> bool:
        """Whether any thread is in [start, end) or holds an address there on its stack."""
        return self._thread_in(start, end) or self._stack_snapshot().first_in(start, end) is not None

    def _code_part_referenced(self, region: Region) -> bool:
        """Whether a thread is in ``region``'s code part or may resume in one of its stubs
        (:meth:`StackWords.first_in_stubs`: a number on a stack that falls where no stub was
        ever written does not keep the area)."""
        start, end = region.code_address, region.code_address + region.layout.code_size
        return self._thread_in(start, end) or (
            self._stack_snapshot().first_in_stubs(start, end, region.layout.slot_size, self.process.read) is not None
        )

    def _thread_in(self, start: int, end: int) -> bool:
        return any(start <= p < end for thread in self.process.threads.values() for p in thread.positions())

    # -- events --------------------------------------------------------------------------------
    @property
    def clock(self) -> TscClock:
        """Converts the TSC timestamps of events to CLOCK_MONOTONIC nanoseconds."""
        if self._clock is None:
            self._clock = TscClock()
        return self._clock

    def _drain(self, complete: bool = False) -> None:
        """Move committed records from the rings into the pending list (with their instances);
        unless ``complete``, only those stamped a little before now (see ``RingReader.drain``)."""
        if self._traps is not None:
            trapped = self._traps.drain()
            if trapped is not None:
                self._pending.append(trapped)
        if not self._readers:
            return
        self._heartbeat()
        cutoff = patience = None
        if not complete:
            cutoff = self.clock.now_tsc() - int(DRAIN_MARGIN_SECONDS * 1e9 / self.clock.ns_per_tick)
            patience = int(HOLE_PATIENCE_SECONDS * 1e9 / self.clock.ns_per_tick)
        raw = [(reader.region_index, part) for reader in self._readers for part in reader.drain(None, cutoff, patience)]
        if not raw:
            return
        self.clock.refresh()
        batch = decode(raw, self.clock, self._thread_map, self.process if self.process.is_alive() else None)
        keys = batch.events["region"].astype(np.int64) << 32 | batch.events["instance"].astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        owners = np.empty(len(unique), dtype=object)
        owners[:] = [self._by_slot.get((k >> 32, k & 0xFFFFFFFF)) for k in unique.tolist()]
        batch.instances = owners[inverse]
        batch.fetched = {k: v for reader in self._readers for k, v in reader.take_fetched().items()}
        self._pending.append(batch)

    def read_events(self) -> EventBatch:
        """All events recorded since the last call, as one time-ordered numpy batch.

        ``batch.events`` is a structured array (fields ``tid``, ``time_ns``, ``tsc``, ``regs``,
        ...); ``batch.probes(i)`` lists the probes event ``i`` belongs to. Does not block.
        """
        self._drain()
        pending, self._pending = self._pending, []
        if not pending:
            return EventBatch.empty()
        return EventBatch.concat(pending)

    def events(self, timeout: float | None = None, interval: float = 0.01) -> Iterator[EventBatch]:
        """Yield non-empty event batches until ``timeout`` seconds pass or the target ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.read_events()
            if len(batch):
                yield batch
            elif not self.process.is_alive():
                return
            else:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                time.sleep(interval)

    def poll(self, timeout: float = 0.0) -> int:
        """Call the handlers of pending events, waiting up to ``timeout`` seconds for events.

        Events are delivered in order per thread. A handler that raises is reported (logged,
        and kept in ``handler_errors``); its probe keeps counting and dispatch goes on.
        Returns the number of events dispatched.
        """
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            n = self._dispatch(self.read_events())
            total += n
            alive = self.process.is_alive()
            if not alive or time.monotonic() >= deadline:
                return total + (0 if alive else self._dispatch(self.read_events()))
            if n == 0:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def _dispatch(self, batch: EventBatch) -> int:
        if not len(batch):
            return 0
        ev = batch.events
        done = 0
        handlers: dict[int, list] = {}
        regs_array = ev["regs"]
        regs_view = Regs
        if getattr(self.process, "arch", None) is I386:  # eax..edi, cdecl arguments
            from .events32 import Regs32 as regs_view
        columns = zip(ev["tid"].tolist(), ev["time_ns"].tolist(), ev["tsc"].tolist(), batch.instances.tolist())
        for k, (tid, when, tsc, instance) in enumerate(columns):
            todo = handlers.get(id(instance))
            if todo is None:
                todo = handlers[id(instance)] = (
                    [(d, d.handler, d._join_tsc) for d in instance.probes if d.handler is not None]
                    if instance is not None
                    else []
                )
            if not todo:
                continue
            regs = regs_view(regs_array, k, tid, when, batch.fetched_strings(k) if batch.fetched else None)
            for djp, handler, joined in todo:
                if tsc < joined:
                    continue
                regs.prototype = None if batch.is_return(k) else (djp._parent or djp).prototype
                try:
                    handler(djp, regs)
                except Exception as exc:  # noqa: BLE001 - a handler's bug must not stop tracing
                    tb = traceback.format_exc()
                    self.handler_errors.append((djp, exc, tb))
                    log.error("handler of %s raised:\n%s", djp.site, tb)
                done += 1
        return done

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> None:
        """Let a spawned (or otherwise held) target run: every thread is resumed and detached."""
        if self.process.stopped and self._stop_depth == 0:
            # the consumer is alive now: lossless probes whose rings fill before its first drain
            # wait for it (a heartbeat from registration, over wait_timeout ago, made them drop)
            self._heartbeat()
            self.process.resume()
            self._stop_generation += 1

    @property
    def probes(self) -> list[Djprobe]:
        traps = self._traps.probes() if self._traps is not None else []
        return [p for inst in self._instances.values() for p in inst.probes] + traps

    def close(self) -> None:
        """Remove every probe, drop the tracer's side of the probe areas, and let the target go."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        for hook in self.close_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - removing the probes matters more
                log.exception("close hook of process %d failed", self.pid)
        try:
            try:
                if self.process.is_alive():
                    probes = self.probes
                    if probes:
                        self.unregister_many(probes)
                    if self._regions and not self._image_replaced():
                        self._drain(complete=True)  # every probe is out: nothing comes later
                        self._let_threads_leave_stubs()
                        with self.stopped():
                            self._unmap_idle_regions()
                    if self.process.stopped:
                        self.process.resume()
            except ProcessGoneError:
                pass  # it exited meanwhile: nothing is left to undo in it
            for djp in self.probes:
                self._forget(djp)
        finally:
            latency.before_close(self._regions)
            if self._traps is not None:
                self._traps.close()
            for region in self._regions:
                region.close_tracer_side()
            self.process.close()

    def _let_threads_leave_stubs(self) -> None:
        """Threads left inside stubs at removal run out of them by themselves once resumed: give
        them a few short runs so that their slots (and areas) can be given back."""
        for _ in range(CLOSE_SETTLE_TRIES):
            if not self._retired:
                return
            if self.process.stopped and self._stop_depth == 0:
                self.process.resume()
            time.sleep(0.002)
            with self.stopped():
                pass  # stopping reclaims what is idle

    def _unmap_idle_regions(self) -> None:
        """Unmap the probe areas no thread can still be in or return into (world stopped). A
        retired slot does not keep its area: it was retired because a thread could return into
        it then; the same check over the whole code part, now, says whether one still can.
        Between two areas the target runs for a moment (each unmap is two injected system calls,
        about 4 ms: twenty areas under one stop held a whole-process target for 84 ms); the
        next area is checked again in the new stop."""
        unmapped = 0
        for region in self._regions:
            if region.mapped_in_target is False:
                continue
            if unmapped:
                self._breathe()
            if self._code_part_referenced(region):
                continue
            unmap_region(self.process, region)
            unmapped += 1

    def _check_open(self) -> None:
        if self._closed:
            raise DjprobeError("this process handle is closed")

    def __enter__(self) -> "ProbedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LIVE: "weakref.WeakSet[ProbedProcess]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for target in list(_LIVE):
        try:
            target.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.exception("cleanup of process %d failed", target.pid)


def attach(pid: int) -> ProbedProcess:
    """Take control of the running process ``pid`` (its threads keep running until a probe goes in).

    Raises ProcessGoneError (ESRCH) if there is no such process and TracePermissionError (EPERM)
    if it may not be traced, InvalidSiteError if ``DJPROBE_SPRINGBOARDS`` holds neither 0 nor 1.
    """
    springboards.default_on()  # a bad value is refused before the process is touched
    return ProbedProcess(Process(pid))


def spawn(argv: Sequence[str], **kwargs: object) -> ProbedProcess:
    """Start ``argv`` and hold it after its libraries are loaded, before ``main``.

    Probes registered now are in place before ``main`` runs. The program starts running when
    the first batch of probes is in (or on :meth:`ProbedProcess.start`). Raises
    InvalidSiteError if ``DJPROBE_SPRINGBOARDS`` holds neither 0 nor 1 (nothing is started).
    """
    springboards.default_on()
    return ProbedProcess(Process.spawn(list(argv), **kwargs))  # type: ignore[arg-type]


def register_djprobe(proc: ProbedProcess, djp: Djprobe) -> Djprobe:
    """The seed's ``register_djprobe``: place ``djp`` in ``proc``."""
    return proc.register(djp)


def unregister_djprobe(proc: ProbedProcess, djp: Djprobe) -> None:
    """The seed's ``unregister_djprobe``: remove ``djp`` from ``proc``."""
    proc.unregister(djp)
