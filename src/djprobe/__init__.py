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

from .probes import Djprobe, ProbedProcess, attach, register_djprobe, spawn, unregister_djprobe
from .latency import Latency

__version__ = "0.1.0"

__all__ = [
    "Djprobe",
    "Latency",
    "ProbedProcess",
    "attach",
    "register_djprobe",
    "spawn",
    "unregister_djprobe",
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
