"""Stack scanning of 32-bit (i386) threads: :mod:`djprobe.stacks` with 4-byte stack words and
the i386 signal frame.

A 32-bit stack holds return addresses at every 4-byte boundary, so the words are read as 4-byte
values (widened to the 64-bit arrays the rest of the scan uses). The kernel's ``rt_sigframe`` of a
32-bit task is, in 4-byte words from its first (``pretcode``, the restorer address): ``sig`` 1,
``pinfo`` 2, ``puc`` 3 (a pointer to the ``ucontext`` below), the 128-byte ``siginfo`` 4..35, then
the ``ucontext``: ``uc_flags`` 36, ``uc_link`` 37, ``uc_stack`` 38..40, ``uc_mcontext`` 41..
(``gs fs es ds edi esi ebp esp ebx edx ecx eax trapno err eip``): ``esp`` at 48, ``eip`` at 55.
The restorer is the vDSO's ``__kernel_rt_sigreturn`` (``mov eax, 173; int 0x80``) or glibc's.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .stacks import _Scanner

__all__ = ["Scanner32", "RESTORERS32"]

#: ``rt_sigreturn`` (173) restorers of i386: ``mov eax, 173; int 0x80`` (vDSO, glibc), and with
#: a leading ``pop eax`` (the non-rt ``sigreturn`` form is never used by SA_SIGINFO handlers)
RESTORERS32 = (bytes.fromhex("b8ad000000cd80"),)

_PUC = 3
_FLAGS = 36
_LINK = 37
_ESP = 48
_EIP = 55
_UC_FLAGS_MAX = 0xFF


class Scanner32(_Scanner):
    """The stack scanner of a 32-bit process."""

    WORD = 4
    FRAME_WORDS = _EIP + 1

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, np.ndarray]]:
        start &= ~3
        head = start & 7  # the 64-bit reader works in 8-byte words: begin at the 4-byte word
        if head:
            try:
                first = self.process.read(start, 4)
                yield start, np.frombuffer(first, dtype=np.uint32).astype(np.uint64)
            except Exception:  # noqa: BLE001 - unreadable: skipped like a page
                pass
            start += 4
        for at, words in super()._pieces(start, end):
            yield at, words.view(np.uint32).astype(np.uint64)

    def _frames(self, words: np.ndarray, starts: int) -> list[int]:
        n = min(starts, len(words) - self.FRAME_WORDS + 1)
        if n <= 0:
            return []
        at = np.flatnonzero(words[_LINK : _LINK + n] == 0)
        at = at[(words[at + _FLAGS] <= _UC_FLAGS_MAX) & ((words[at] - self.lo) < self.hi - self.lo)]
        out = []
        for i in at.tolist():
            if self._is_restorer32(int(words[i])):
                self.frames += 1
                out.append(int(words[i + _ESP]))
        return out

    def _is_restorer32(self, address: int) -> bool:
        known = self._restorer.get(address)
        if known is None:
            known = False
            m = self.mapping(address)
            if m is not None and m.executable:
                for pattern in RESTORERS32:
                    try:
                        if self.process.read(address, len(pattern)) == pattern:
                            known = True
                            break
                    except Exception:  # noqa: BLE001
                        pass
            self._restorer[address] = known
        return known
