"""C prototypes of probed functions: parsing, and turning recorded registers into typed values.

A prototype is what a user writes after a site (``ev_str(char *s, long n)``,
``libc:openat(int fd, const char *path, int flags)``) or what :mod:`djprobe.debuginfo` reads
from DWARF. Supported types: integers (``char`` ... ``long long``, ``signed``/``unsigned``,
``int8_t`` ... ``uint64_t``, ``size_t`` and the usual system typedefs), ``bool``/``_Bool``,
pointers (shown in hex), ``char *`` and ``const char *`` (a string, copied in the target at the
hit: see :mod:`djprobe.fetch_stubs`), and ``...`` last. Parameters take the SysV integer argument
registers in order (``rdi rsi rdx rcx r8 r9``); a seventh and later parameter is on the stack
and is not recorded. Floating-point and by-value structure parameters are refused (they do not
take integer registers in this simple way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidSiteError

#: Integer argument registers of the SysV ABI, in parameter order.
MAX_REGISTER_ARGS = 6


@dataclass(frozen=True)
class CType:
    """A parameter type as djprobe shows it: ``kind`` is ``int``, ``uint``, ``bool``,
    ``pointer`` or ``string`` (``char *``); ``bits`` the width of an integer (64 for the others);
    ``spelling`` how it was written."""

    kind: str
    bits: int = 64
    spelling: str = ""

    def convert(self, raw: int) -> int | bool:
        """The value of a 64-bit register holding a parameter of this type (the ABI leaves the
        bits above a narrow integer unspecified: they are cut off)."""
        raw &= (1 << 64) - 1
        if self.kind == "bool":
            return bool(raw & 0xFF)
        if self.kind in ("pointer", "string"):
            return raw
        value = raw & ((1 << self.bits) - 1)
        if self.kind == "int" and value >> (self.bits - 1):
            value -= 1 << self.bits
        return value


@dataclass(frozen=True)
class Param:
    """One parameter: its name (``arg<i>`` when the prototype gave none) and type."""

    name: str
    type: CType


@dataclass(frozen=True)
class Prototype:
    """The parameters of a function (``variadic``: the list ends with ``...``)."""

    params: tuple[Param, ...]
    variadic: bool = False
    #: Where each parameter is among the six recorded argument slots: (first slot, slots), one
    #: entry per parameter. None: parameter i in slot i (the SysV registers); a 32-bit process's
    #: prototype has the cdecl stack words here (:func:`djprobe.prototypes32.cdecl_prototype`).
    slots: tuple[tuple[int, int], ...] | None = None

    def slots_of(self, index: int) -> tuple[int, int]:
        """(first argument slot, number of slots) of parameter ``index``."""
        return (index, 1) if self.slots is None else self.slots[index]

    @property
    def register_params(self) -> tuple[Param, ...]:
        """The parameters that are recorded (in the six argument registers or stack words)."""
        if self.slots is None:
            return self.params[:MAX_REGISTER_ARGS]
        return tuple(p for p, (first, n) in zip(self.params, self.slots) if first + n <= MAX_REGISTER_ARGS)

    @property
    def string_mask(self) -> int:
        """Bit ``i`` set when argument slot ``i`` holds a ``char *`` to fetch at the hit."""
        mask = 0
        for i, p in enumerate(self.register_params):
            if p.type.kind == "string":
                mask |= 1 << self.slots_of(i)[0]
        return mask

    def __str__(self) -> str:
        parts = [f"{p.type.spelling} {p.name}".replace("* ", "*") for p in self.params]
        if self.variadic:
            parts.append("...")
        return ", ".join(parts)


_INT_NAMES: dict[str, tuple[str, int]] = {
    "char": ("int", 8),
    "signed char": ("int", 8),
    "unsigned char": ("uint", 8),
    "short": ("int", 16),
    "short int": ("int", 16),
    "signed short": ("int", 16),
    "signed short int": ("int", 16),
    "unsigned short": ("uint", 16),
    "unsigned short int": ("uint", 16),
    "int": ("int", 32),
    "signed": ("int", 32),
    "signed int": ("int", 32),
    "unsigned": ("uint", 32),
    "unsigned int": ("uint", 32),
    "long": ("int", 64),
    "long int": ("int", 64),
    "signed long": ("int", 64),
    "signed long int": ("int", 64),
    "unsigned long": ("uint", 64),
    "unsigned long int": ("uint", 64),
    "long long": ("int", 64),
    "long long int": ("int", 64),
    "signed long long": ("int", 64),
    "signed long long int": ("int", 64),
    "unsigned long long": ("uint", 64),
    "unsigned long long int": ("uint", 64),
    "int8_t": ("int", 8),
    "int16_t": ("int", 16),
    "int32_t": ("int", 32),
    "int64_t": ("int", 64),
    "uint8_t": ("uint", 8),
    "uint16_t": ("uint", 16),
    "uint32_t": ("uint", 32),
    "uint64_t": ("uint", 64),
    "size_t": ("uint", 64),
    "ssize_t": ("int", 64),
    "off_t": ("int", 64),
    "off64_t": ("int", 64),
    "ptrdiff_t": ("int", 64),
    "intptr_t": ("int", 64),
    "uintptr_t": ("uint", 64),
    "pid_t": ("int", 32),
    "uid_t": ("uint", 32),
    "gid_t": ("uint", 32),
    "mode_t": ("uint", 32),
    "socklen_t": ("uint", 32),
    "time_t": ("int", 64),
    "wchar_t": ("int", 32),
}
_BOOL_NAMES = {"bool", "_Bool"}
_FLOAT_WORDS = {"float", "double"}
_QUALIFIERS = {"const", "volatile", "restrict", "__restrict", "__restrict__"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|(\*)|(\[\s*\d*\s*\])|(\S))")


def _bad(text: str, why: str) -> InvalidSiteError:
    return InvalidSiteError(f"bad prototype {text!r}: {why}", reason=why)


def parse_type(text: str) -> CType:
    """The type of one parameter written without a name (``const char *``, ``unsigned long``)."""
    return _parse_param(text, 0, text, allow_name=False).type


def _parse_param(decl: str, index: int, whole: str, *, allow_name: bool = True) -> Param:
    words: list[str] = []
    stars = 0
    array = False
    pos = 0
    while pos < len(decl):
        m = _TOKEN.match(decl, pos)
        if m is None:  # only trailing blanks are left
            break
        pos = m.end()
        word, star, brackets, other = m.groups()
        if word is not None:
            if stars and word not in _QUALIFIERS:
                words.append("*" + word)  # a name after the stars
            else:
                words.append(word)
        elif star is not None:
            stars += 1
        elif brackets is not None:
            array = True  # a parameter declared as an array is a pointer
        elif other is not None:
            raise _bad(whole, f"unexpected {other!r} in parameter {index + 1} ({decl.strip()!r})")
    name = None
    after_stars = [w for w in words if w.startswith("*")]
    if len(after_stars) > 1:
        raise _bad(whole, f"parameter {index + 1} ({decl.strip()!r}) has more than one name")
    base = [w for w in words if not w.startswith("*") and w not in _QUALIFIERS]
    if after_stars:
        name = after_stars[0][1:]
    elif allow_name and len(base) >= 2 and " ".join(base) not in _INT_NAMES and base[-1] not in _INT_WORDS:
        name = base.pop()  # "int fd", "size_t n", "struct stat *st" (the last word)
    if not base:
        raise _bad(whole, f"parameter {index + 1} ({decl.strip()!r}) has no type")
    if not allow_name and name is not None:
        raise _bad(whole, f"unexpected name {name!r} in a type")
    if name is not None and not _IDENT.match(name):
        raise _bad(whole, f"bad parameter name {name!r}")
    stars += 1 if array else 0
    spelling = " ".join(w for w in words if not w.startswith("*") and w != name) + (" " + "*" * stars if stars else "")
    type_name = " ".join(base)
    pname = name or f"arg{index}"
    if base[0] in ("struct", "union", "enum") and len(base) != 2:
        raise _bad(whole, f"parameter {index + 1}: {base[0]} needs one tag name ({decl.strip()!r})")
    if stars:
        pointee = " ".join(base)
        if stars == 1 and pointee == "char":
            return Param(pname, CType("string", 64, spelling))
        if pointee not in _INT_NAMES and pointee not in _BOOL_NAMES and pointee != "void" and base[0] not in (
            "struct", "union", "enum"
        ) and not _IDENT.match(pointee):
            raise _bad(whole, f"parameter {index + 1}: unknown type {pointee!r}")
        return Param(pname, CType("pointer", 64, spelling))
    if type_name in _BOOL_NAMES:
        return Param(pname, CType("bool", 8, spelling))
    if type_name in _INT_NAMES:
        kind, bits = _INT_NAMES[type_name]
        return Param(pname, CType(kind, bits, spelling))
    if base[0] == "enum":
        return Param(pname, CType("int", 32, spelling))
    if set(base) & _FLOAT_WORDS:
        raise _bad(whole, f"parameter {index + 1} ({decl.strip()!r}): floating-point parameters are not supported")
    if base[0] in ("struct", "union"):
        raise _bad(whole, f"parameter {index + 1} ({decl.strip()!r}): a {base[0]} passed by value is not supported")
    if type_name == "void":
        raise _bad(whole, f"parameter {index + 1}: 'void' is only allowed alone, as '(void)'")
    raise _bad(whole, f"parameter {index + 1}: unknown type {type_name!r} (integers, bool, pointers and char * are supported)")


_INT_WORDS = {"char", "short", "int", "long", "signed", "unsigned"}


def parse_prototype(text: str) -> Prototype:
    """Parse a parameter list: ``"char *s, long n"``, ``"int fd, const char *path, ..."``,
    ``"void"`` or ``""`` (no parameters). Names are optional (``arg<i>`` then).

    Raises InvalidSiteError naming the parameter and what is wrong with it.
    """
    if not isinstance(text, str):
        raise InvalidSiteError(f"prototype must be a string, not {type(text).__name__}")
    body = text.strip()
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1].strip()
    if body in ("", "void"):
        return Prototype(())
    if "(" in body or ")" in body:
        raise _bad(text, "function pointer parameters and parentheses are not supported (use 'void *')")
    parts = [p.strip() for p in body.split(",")]
    params: list[Param] = []
    variadic = False
    for i, part in enumerate(parts):
        if not part:
            raise _bad(text, f"parameter {i + 1} is empty")
        if part == "...":
            if i != len(parts) - 1:
                raise _bad(text, "'...' must be the last parameter")
            if i == 0:
                raise _bad(text, "'...' needs a named parameter before it")
            variadic = True
            continue
        params.append(_parse_param(part, i, text))
    names = [p.name for p in params]
    for n in names:
        if names.count(n) > 1:
            raise _bad(text, f"parameter name {n!r} is used twice")
    return Prototype(tuple(params), variadic)


_SITE_PROTO = re.compile(r"^(?P<site>[^()]+?)\s*\((?P<params>[^()]*)\)\s*(?P<suffix>%\w+)?\s*$")


def split_prototype(pattern: str) -> tuple[str, Prototype | None]:
    """Split ``'libc:openat(int fd, char *path)%return'`` into ``('libc:openat%return',
    Prototype(...))``; a pattern without parentheses comes back unchanged with None."""
    if "(" not in pattern and ")" not in pattern:
        return pattern, None
    m = _SITE_PROTO.match(pattern)
    if m is None:
        raise InvalidSiteError(
            f"bad pattern {pattern!r}: expected SITE(TYPE NAME, ...), e.g. 'ev_str(char *s, long n)'",
            reason="unbalanced or nested parentheses",
        )
    return m["site"] + (m["suffix"] or ""), parse_prototype(m["params"])


def typed_probe(prototype: "str | Prototype | None", at: str = "entry") -> tuple[Prototype | None, int]:
    """The prototype of a probe (parsed if given as text) and the argument registers whose strings
    its stub copies at the hit (none at a return probe: the arguments are gone by then)."""
    if prototype is None:
        return None, 0
    if isinstance(prototype, str):
        prototype = parse_prototype(prototype)
    elif not isinstance(prototype, Prototype):
        raise InvalidSiteError(f"prototype must be a string or a Prototype, not {type(prototype).__name__}")
    return prototype, (prototype.string_mask if at == "entry" else 0)
