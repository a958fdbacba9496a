"""Exceptions raised by djprobe.

Every error derives from :class:`DjprobeError` and carries an ``errno`` value in the seed's terms
(``EINVAL``, ``ENOMEM``, ``EBUSY``) or the matching system one (``ESRCH``, ``EPERM``). Where a
standard exception type fits, the class also derives from it, so ``except ValueError`` or
``except ProcessLookupError`` work as a user would expect.
"""

from __future__ import annotations

import errno as _errno


class DjprobeError(Exception):
    """Base class of every djprobe error; ``errno`` says which kind it is."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, address: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.address = address

    def __str__(self) -> str:
        return self.message


class InvalidSiteError(DjprobeError, ValueError):
    """EINVAL: the site or the values given are invalid; ``reason`` says why."""

    errno = _errno.EINVAL

    def __init__(self, message: str, *, address: int | None = None, reason: str | None = None) -> None:
        super().__init__(message, address=address)
        self.reason = reason or message


class SymbolNotFoundError(InvalidSiteError, LookupError):
    """EINVAL: a module, symbol or pattern named in a site matched nothing."""


class NoRoomError(DjprobeError, MemoryError):
    """ENOMEM: no room for a probe instance (stub memory within reach of the site)."""

    errno = _errno.ENOMEM


class SiteBusyError(DjprobeError):
    """EBUSY: something else already patched the address (a breakpoint, a uprobe, a foreign jump)."""

    errno = _errno.EBUSY


class ProcessGoneError(DjprobeError, ProcessLookupError):
    """ESRCH: no such process, or the target exited during an operation."""

    errno = _errno.ESRCH


class TracePermissionError(DjprobeError, PermissionError):
    """EPERM: the target may not be traced (capabilities, ptrace_scope, another tracer)."""

    errno = _errno.EPERM


class TargetFaultError(DjprobeError):
    """EFAULT: target memory could not be read or written at ``address``."""

    errno = _errno.EFAULT


class TracerStateError(DjprobeError, RuntimeError):
    """The operation needs another state: the world stopped, or the calling OS thread to be the
    one that attached (ptrace requests belong to the tracer thread)."""

    errno = _errno.EINVAL


class TargetTimeoutError(DjprobeError, TimeoutError):
    """ETIMEDOUT: a thread did not stop, or an injected call did not return, in time."""

    errno = _errno.ETIMEDOUT


class RemoteSyscallError(DjprobeError):
    """A system call run inside the target failed; ``errno`` is the target's errno."""

    def __init__(self, message: str, *, errno: int, address: int | None = None) -> None:
        super().__init__(message, address=address)
        self.errno = errno


class UnsupportedTargetError(DjprobeError):
    """ENOEXEC: the process or file is not x86-64 code (32-bit i386, x32, another machine);
    ``machine`` names what it is."""

    errno = _errno.ENOEXEC

    def __init__(self, message: str, *, machine: str = "") -> None:
        super().__init__(message)
        self.machine = machine
