"""Restartable sequences in the target: where glibc keeps each thread's ``struct rseq``.

glibc 2.35+ registers an rseq area for every thread it creates, at ``__rseq_offset`` from the
thread pointer (``fs`` base; in a 32-bit (i386) process the ``gs`` base, ``__rseq_offset`` a 4-byte
``ptrdiff_t``), with the signature :data:`RSEQ_SIG`. The kernel keeps ``cpu_id`` in
it current, and restarts a critical section registered in ``rseq_cs`` at its abort handler if the
thread is preempted, migrated or signalled inside it. The count stub uses this to add one to a
per-CPU counter with a plain ``inc`` (no ``lock``), see :mod:`djprobe.stubs`.

Decided safely, per process: the per-CPU path is used only when glibc says it registered
(``__rseq_size`` > 0) and every stopped thread that has a registration has it at its own
``fs + __rseq_offset`` with glibc's signature (the abort handler of our critical section is
preceded by that signature; the kernel kills a thread whose signature does not match). A thread
without a registration reads ``cpu_id`` < 0 there and takes the ``lock inc`` path, as does any
thread whose program has a critical section of its own armed (``rseq_cs`` not 0). A thread that
shares another's thread pointer (a raw ``clone`` without ``CLONE_SETTLS``) is not supported by
glibc and would read the other's ``cpu_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._sys import ptrace as pt
from .arch import I386
from .errors import DjprobeError

if TYPE_CHECKING:  # pragma: no cover
    from .process import Process
    from .symbols import Symbols

__all__ = ["RSEQ_SIG", "RseqArea", "rseq_symbols", "glibc_rseq_area", "CPU_ID", "CPU_ID_START", "RSEQ_CS", "VFORK_CPU"]

#: glibc's signature on x86 (also librseq's): the 4 bytes before every abort handler.
RSEQ_SIG = 0x53053053
#: Offsets inside ``struct rseq``.
CPU_ID_START = 0  # struct rseq's cpu_id_start: written by the kernel with cpu_id
CPU_ID = 4
RSEQ_CS = 8
#: What the vfork hook (:mod:`djprobe.vforks`) writes into ``cpu_id`` in a vfork/posix_spawn
#: child (which has its parent thread's area but no registration of its own): more than any shard
#: count, so a stub takes its fallback path, where it counts the hit apart and does nothing else.
VFORK_CPU = 0x7FFF_FFF0
_FIELDS_END = 16  # cpu_id_start, cpu_id, rseq_cs: what the stub uses


@dataclass(frozen=True)
class RseqArea:
    """glibc's per-thread rseq area: ``fs:[offset]``."""

    offset: int
    size: int


def rseq_symbols(symbols: "Symbols") -> tuple[int, int] | None:
    """Addresses of glibc's ``__rseq_offset`` and ``__rseq_size`` in the target, or None (glibc
    older than 2.35, or not glibc). Reads symbol tables only: call it before stopping the world."""
    offset_sym = size_sym = None
    for module in symbols.modules:
        offset_sym = offset_sym or next(iter(module.symbols("__rseq_offset")), None)
        size_sym = size_sym or next(iter(module.symbols("__rseq_size")), None)
        if offset_sym is not None and size_sym is not None:
            return offset_sym.address, size_sym.address
    return None


def glibc_rseq_area(process: "Process", addresses: tuple[int, int] | None) -> tuple[RseqArea | None, str]:
    """The rseq area every thread of the stopped ``process`` may use, or None and why not;
    ``addresses`` from :func:`rseq_symbols`."""
    if addresses is None:
        return None, "no __rseq_offset/__rseq_size (glibc older than 2.35, or not glibc)"
    i386 = getattr(process, "arch", None) is I386  # gs-based TLS, a 4-byte ptrdiff_t
    try:
        offset = int.from_bytes(process.read(addresses[0], 4 if i386 else 8), "little", signed=True)
        size = int.from_bytes(process.read(addresses[1], 4), "little")
    except DjprobeError as exc:
        return None, f"cannot read __rseq_offset: {exc}"
    if size < _FIELDS_END:
        return None, "glibc did not register rseq (__rseq_size is 0: glibc.pthread.rseq=0?)"
    for thread in process.threads.values():
        if thread.gone:
            continue
        try:
            config = pt.get_rseq_configuration(thread.tid)
        except OSError as exc:
            return None, f"PTRACE_GET_RSEQ_CONFIGURATION: {exc.strerror}"
        if config.rseq_abi_pointer == 0:
            continue  # not registered: its cpu_id reads < 0 and the stub counts the other way
        regs = thread.regs()
        expected = ((regs.gs_base + offset) & 0xFFFF_FFFF) if i386 else ((regs.fs_base + offset) & ((1 << 64) - 1))
        if config.rseq_abi_pointer != expected or config.signature != RSEQ_SIG:
            return None, (
                f"thread {thread.tid} registered rseq at {config.rseq_abi_pointer:#x} with signature "
                f"{config.signature:#x}, not glibc's area"
            )
    return RseqArea(offset, size), ""
