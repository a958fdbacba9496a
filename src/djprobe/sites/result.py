"""Site verdicts: :class:`Verdict`, :class:`SiteAnalysis` (what a jump at a site displaces, and why
it may or may not go there)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidSiteError
from ..x86 import Insn, Relocated, RelocationError, relocate
from ..x86.packed import PackedInsns

if TYPE_CHECKING:
    from ..symbols import Module, Symbol


#: Size of the ``jmp rel32`` written at a site.
JUMP_SIZE = 5

ByteReader = Callable[[int, int], bytes]


class Verdict(enum.Enum):
    """What can be placed at a site."""

    JUMP = "jump"  # a direct-jump probe
    REFUSED = "refused"  # nothing: see the reason
    #: from ``coverage(springboards=True)`` only: no jmp rel32 fits, a jmp rel8 to a springboard
    #: does (``sites/springboards.py``); not ``ok`` (probes place one only with
    #: ``ProbedProcess.springboards`` on, from a jump verdict with ``springboard`` set)
    SHORT_JUMP = "short-jump"


@dataclass(frozen=True, slots=True)
class SiteAnalysis:
    """The verdict for one site.

    ``size`` is the number of displaced bytes (0 if not even that could be determined);
    ``displaced`` the whole instructions they hold (relocated to the stub); ``padding`` the
    never-executed alignment instructions after a function's last instruction that a jump at the
    end of a very short function also overwrites (``size`` counts them); ``reason`` always says why (for a jump: what
    is displaced). ``busy`` is True when the refusal is because something else already patched
    the bytes (callers raise ``SiteBusyError``/EBUSY for it, ``InvalidSiteError``/EINVAL for the
    other refusals). ``flags_dead``: the arithmetic flags are dead at the site (a probe action
    need not save them). ``at_entry``: the site is the first byte of its function. ``exit``: for
    the window of a return probe, the exit instruction (``ret`` or tail-call ``jmp``) it ends with
    (the last of ``displaced``); the probe's action runs right before it (see ``sites/exits.py``).
    ``exit_path``: for a *path window* (the exit's block begins at a branch target too close to it
    for a window of its own), the instructions from that target to the exit: the window ends with
    a way into the block (a branch to it, or the instruction falling into it), and the stub runs a
    copy of the block, the action and the exit instead of returning to the target. ``exit_via``:
    the address whose branches in the window are aimed at that copy (the block's first address;
    for a conditional tail call, the called function, and the block is a made-up ``jmp`` to it).
    ``exit_early``: the window is the function's entry window, which ends with a tail call reached
    by straight-line code that leaves ``rsp`` alone (``xor esi,esi; jmp f``): its action runs at
    the first byte, as an entry probe's does (the count is exact, and an entry probe can share it).
    ``springboard``: for a ``SHORT_JUMP`` verdict, where the ``jmp rel32`` the ``jmp rel8`` at the
    site leads to would go (dead padding, see ``sites/springboards.py``).
    """

    site: str
    address: int
    size: int
    verdict: Verdict
    reason: str
    busy: bool = False
    displaced: tuple[Insn, ...] = ()
    function: "Symbol | None" = None
    flags_dead: bool = False
    at_entry: bool = False
    module: "Module | None" = field(default=None, compare=False, repr=False)
    padding: tuple[Insn, ...] = ()
    exit: Insn | None = None
    exit_path: tuple[Insn, ...] = ()
    exit_via: int | None = None
    exit_early: bool = False
    springboard: int | None = None  # SHORT_JUMP: the address of the springboard jmp rel32

    @property
    def ok(self) -> bool:
        """True for a jump verdict."""
        return self.verdict is Verdict.JUMP

    @property
    def original(self) -> bytes:
        """The overwritten bytes (as decoded, i.e. as in the file), padding included."""
        displaced = self.displaced
        head = displaced.raw if isinstance(displaced, PackedInsns) else b"".join(i.raw for i in displaced)
        return head + b"".join(i.raw for i in self.padding)

    def error(self) -> Exception:
        """The exception a caller should raise for a refusal: SiteBusyError or InvalidSiteError."""
        from ..errors import SiteBusyError

        if self.busy:
            return SiteBusyError(f"{self.site}: {self.reason}", address=self.address)
        return InvalidSiteError(f"{self.site}: {self.reason}", address=self.address, reason=self.reason)

    def relocate_to(self, stub_address: int, return_to: int | None = None) -> Relocated:
        """The displaced instructions relocated to ``stub_address``, ending with ``jmp return_to``
        (default: ``address + size``).

        Raises InvalidSiteError for a refused site, RelocationError (``out_of_reach`` set) if the
        stub is beyond +-2 GiB of the site or of a RIP-relative/branch target.
        """
        if self.verdict is not Verdict.JUMP:
            raise self.error()
        rel = stub_address - (self.address + JUMP_SIZE)
        wraps = bool(self.displaced) and self.displaced[0].bits == 32  # i386: rel32 reaches all 4 GiB
        if not wraps and not -(2**31) <= rel < 2**31:
            raise RelocationError(
                f"stub at {stub_address:#x} is beyond the +-2 GiB reach of a jmp rel32 at {self.address:#x}",
                address=self.address,
                out_of_reach=True,
            )
        if return_to is None:
            return_to = self.address + self.size
        # a branch back to the site (a loop whose head is the site) goes through the jump there,
        # so the action counts every turn, not only the first
        return relocate(list(self.displaced), stub_address, return_to, external=(self.address,))

    def to_json(self) -> dict:
        """A JSON-ready dict: site, address, size, verdict, reason, busy, function, offset,
        module, at_entry, flags_dead, instructions [{address, bytes, text}]."""
        func = self.function
        return {
            "site": self.site,
            "address": f"{self.address:#x}",
            "size": self.size,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "busy": self.busy,
            "module": self.module.path if self.module is not None else None,
            "function": func.name if func is not None else None,
            "offset": (self.address - func.address) if func is not None else None,
            "at_entry": self.at_entry,
            "flags_dead": self.flags_dead,
            "instructions": [
                {"address": f"{i.address:#x}", "bytes": i.raw.hex(), "text": i.text} for i in self.displaced
            ],
            "padding": [
                {"address": f"{i.address:#x}", "bytes": i.raw.hex(), "text": i.text} for i in self.padding
            ],
            **({"exit": {"address": f"{self.exit.address:#x}", "text": self.exit.text}} if self.exit is not None else {}),
            **({"exit_path": [{"address": f"{i.address:#x}", "bytes": i.raw.hex(), "text": i.text}
                              for i in self.exit_path]} if self.exit_path else {}),
        }
