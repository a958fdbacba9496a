"""Which instructions the kernel refuses to place a uprobe on (x86-64).

The rules of ``uprobe_init_insn`` and ``branch_setup_xol_ops`` in Linux's
``arch/x86/kernel/uprobes.c`` (6.x), restated over raw instruction bytes:

* a legacy prefix ``es``/``cs``/``ss``/``ds`` (26, 2e, 36, 3e) or ``lock`` (f0) anywhere in the
  prefixes (``is_prefix_bad``): e.g. ``cs nopw`` padding, ``notrack jmp *%rax``, every locked
  read-modify-write;
* ``mov ss, r/m`` (8e /2) (``insn_masking_exception``);
* a first opcode byte the 64-bit table marks bad: invalid in 64-bit mode (06 07 0e 16 17 1e 1f 27
  2f 37 3f 60 61 62 82 9a ce d4 d5 d6 ea), I/O (6c-6f e4-e7 ec-ef), ``int3``/``int N``/``iret``
  (cc cd cf), ``int1`` (f1), ``hlt`` (f4), ``cli``/``sti`` (fa fb);
* a relative ``jmp``/``call``/``jcc`` with an operand-size prefix (66).

The kernel checks only the first opcode byte, and ``0f`` is marked good, so every two- and
three-byte opcode (``syscall``, ``ud2``, SSE, ...) passes (its second-byte table is never
consulted in 64-bit mode); VEX/EVEX instructions are checked by the opcode byte after the prefix.
What is not decodable is refused too. Pure: no process, no kernel.
"""

from __future__ import annotations

_LEGACY = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))
_BAD_PREFIX = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0xF0: "lock"}
_BAD_OPCODES = frozenset(
    (0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61, 0x62, 0x6C, 0x6D, 0x6E,
     0x6F, 0x82, 0x9A, 0xCC, 0xCD, 0xCE, 0xCF, 0xD4, 0xD5, 0xD6, 0xE4, 0xE5, 0xE6, 0xE7, 0xEA, 0xEC, 0xED,
     0xEE, 0xEF, 0xF1, 0xF4, 0xFA, 0xFB)
)  # fmt: skip
_REL_BRANCHES = frozenset((0xE8, 0xE9, 0xEB, *range(0x70, 0x80)))


def uprobe_refusal(code: bytes) -> str | None:
    """Why the kernel would refuse a uprobe on the instruction at the start of ``code``, or None.

    ``code`` holds the instruction's bytes (more may follow)."""
    i, prefixes = 0, []
    while i < len(code) and code[i] in _LEGACY and len(prefixes) < 14:
        prefixes.append(code[i])
        i += 1
    for p in prefixes:
        if p in _BAD_PREFIX:
            return f"the kernel places no uprobe on an instruction with a {_BAD_PREFIX[p]} prefix ({p:02x})"
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1  # REX
    if i >= len(code):
        return "the instruction cannot be decoded"
    op = code[i]
    if op in (0xC4, 0xC5, 0x62):  # VEX3 / VEX2 / EVEX: the opcode byte follows the prefix
        skip = {0xC4: 3, 0xC5: 2, 0x62: 4}[op]
        if i + skip >= len(code):
            return "the instruction cannot be decoded"
        op = code[i + skip]
        return None if op not in _BAD_OPCODES else f"the kernel's uprobe table refuses opcode {op:02x}"
    if op in _BAD_OPCODES:
        return f"the kernel's uprobe table refuses opcode {op:02x} (invalid, privileged or a trap in user code)"
    if op == 0x8E and i + 1 < len(code) and (code[i + 1] >> 3) & 7 == 2:
        return "the kernel places no uprobe on mov ss (it masks exceptions)"
    if 0x66 in prefixes:
        if op in _REL_BRANCHES or (op == 0x0F and i + 1 < len(code) and 0x80 <= code[i + 1] <= 0x8F):
            return "the kernel places no uprobe on a relative branch with an operand-size (66) prefix"
    return None
