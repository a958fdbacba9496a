"""Site analysis: which instructions a jump probe at an address displaces, and whether it may.

A jump probe overwrites the first ``size`` (>= 5) bytes of whole instructions at a site with a
``jmp rel32``. That is only safe if no thread can ever *enter* those bytes anywhere but at their
first byte (design Guarantee 2). This module decides that, with a reason a user can act on.

How entries into code are found (all addresses are runtime addresses of one :class:`Module`):

* **direct branches** (``jmp``/``jcc``/``call``/``loop``/``xbegin``, rel8 and rel32) from anywhere
  in the module's executable sections. A fast byte scan (numpy) finds every *possible* encoding
  whose target falls in a range; each candidate is then confirmed by decoding the code region
  that holds it (a candidate that is not a real instruction is dropped). Regions are delimited by
  symbol bounds and by the ``.eh_frame`` FDE ranges, so stripped libraries (static functions and
  ``.cold`` parts without symbols) are decoded in step too. A region that does not decode cleanly
  keeps all its candidates.
* **code addresses taken**: symbol starts, dynamic relocations that produce a code address
  (``R_X86_64_RELATIVE``/``64``/``IRELATIVE``, RELR), ``lea reg, [rip+code]`` (computed goto,
  function pointers), and for non-PIE executables every 32-bit value in the file that falls in
  code. Every indirect ``call`` and every indirect ``jmp`` through a pointer loaded from memory
  (tail calls, PLT, ``jmp [table+i*8]``) can only reach one of these.
* **jump tables** (``lea rT,[rip+T]; movsxd rX,[rT+rI*4]; add rX,rT; jmp rX`` and the ``lea``
  variants of gcc, clang and glibc's assembly): the table bound is found from the guarding
  ``cmp rI, N; ja``/``and rI, N``, the entries are read and their targets are entries.
  An indirect ``jmp reg`` that fits neither the pointer-load nor the jump-table shape has
  *unknown* targets: every site in its region, and in the regions linked to it by direct jumps
  (its cold parts), is refused.
* **landing pads** of the C++/``-fexceptions`` unwinder, from the LSDA call-site tables that the
  FDEs point to.

On top of that a site is refused if it is not an instruction boundary, if the displaced bytes
cross the end of the function, contain a ``call``/``syscall`` that is not the last displaced
instruction (a thread would return into them), an instruction that follows an unconditional
transfer (it can only be reached from elsewhere), or an instruction that cannot be relocated; and,
for a live process, if the bytes there differ from the file (another tool's ``int3`` or ``jmp``:
``busy``, which callers turn into ``EBUSY``).

The package: ``result`` (verdicts), ``elf`` (ELF facts), ``slices`` (decoded regions, jump-table
value analysis), ``index`` (ways into a module's code), ``function`` (the verdict for a site),
``coverage`` (a whole module), ``exits`` (a function's exits and the windows ending at them).
"""

from __future__ import annotations

from .exits import Exit, ExitAnalysis, ExitKind, RETURN_SUFFIX, analyse_exits, function_exits, split_return_spec
from .coverage import CoverageReport, RefusedEntry, _reason_class, coverage  # noqa: F401 (_reason_class: soak)
from .function import FunctionAnalysis, analyse_function, analyse_site
from .index import ModuleIndex, module_index
from .result import JUMP_SIZE, SiteAnalysis, Verdict

__all__ = [
    "Verdict",
    "SiteAnalysis",
    "FunctionAnalysis",
    "ModuleIndex",
    "CoverageReport",
    "RefusedEntry",
    "JUMP_SIZE",
    "analyse_site",
    "analyse_function",
    "coverage",
    "module_index",
    "Exit",
    "ExitAnalysis",
    "ExitKind",
    "RETURN_SUFFIX",
    "analyse_exits",
    "function_exits",
    "split_return_spec",
]
