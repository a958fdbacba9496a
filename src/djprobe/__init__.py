"""djprobe: direct-jump probes for live x86-64 Linux processes, driven from Python."""

from __future__ import annotations

from .errors import (
    DjprobeError,
    InvalidSiteError,
    NoRoomError,
    ProcessGoneError,
    SiteBusyError,
    SymbolNotFoundError,
    RemoteSyscallError,
    TargetFaultError,
    TargetTimeoutError,
    TracePermissionError,
    TracerStateError,
    UnsupportedTargetError,
)

from .debuginfo import prototype_of
from .events import EventBatch
from .fetched import FetchedString, FetchError
from .probes import Djprobe, ProbedProcess, attach, register_djprobe, spawn, unregister_djprobe
from .latency import Latency
from .prototypes import Prototype, parse_prototype

__version__ = "0.1.0"

__all__ = [
    "Djprobe",
    "Latency",
    "ProbedProcess",
    "attach",
    "register_djprobe",
    "spawn",
    "unregister_djprobe",
    "EventBatch",
    "FetchedString",
    "FetchError",
    "Prototype",
    "parse_prototype",
    "prototype_of",
    "DjprobeError",
    "InvalidSiteError",
    "NoRoomError",
    "ProcessGoneError",
    "SiteBusyError",
    "SymbolNotFoundError",
    "RemoteSyscallError",
    "TargetFaultError",
    "TargetTimeoutError",
    "TracePermissionError",
    "TracerStateError",
    "UnsupportedTargetError",
]
