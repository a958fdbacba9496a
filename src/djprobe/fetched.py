"""Values fetched in the target at the hit (strings), decoded from string records, and the typed
arguments of an event (a prototype applied to its registers and strings)."""

from __future__ import annotations

import errno as _errno
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .area import ARG_REGISTERS
from .prototypes import Prototype


class FetchedString(str):
    """A ``char *`` argument as it was at the hit (decoded as UTF-8, bad bytes escaped).
    ``address`` is the pointer; ``truncated`` is True when no NUL was found in the bytes copied
    (the string is longer than ``--string-size``, or runs into an unmapped page)."""

    address: int
    truncated: bool

    def __new__(cls, text: str, address: int, truncated: bool) -> "FetchedString":
        obj = super().__new__(cls, text)
        obj.address = address
        obj.truncated = truncated
        return obj


@dataclass(frozen=True)
class FetchError:
    """A ``char *`` argument that could not be read at the hit (NULL, wild, unmapped)."""

    address: int
    errno: int

    @property
    def error(self) -> str:
        """The error's name (``EFAULT``)."""
        return _errno.errorcode.get(self.errno, str(self.errno))

    def as_json(self) -> dict:
        return {"address": self.address, "error": self.error}

    def __str__(self) -> str:
        return f"{self.address:#x}<{self.error}>"


Fetched = tuple["FetchedString | FetchError | None", ...]


def decode_slots(mask: int, slots: np.void) -> Fetched:
    """The six string slots of one string record (``mask``: those the stub filled)."""
    return decode_records(np.asarray([mask], dtype=np.uint32), np.asarray(slots)[None])[0]


def decode_records(masks: np.ndarray, slots: np.ndarray) -> list[Fetched]:
    """The string slots of many string records at once (``slots``: an (N, 6) array of
    ``string_slot_dtype``): per record, a tuple of six values, None where the mask has no bit."""
    n = len(masks)
    columns: list[list] = []
    for i in range(len(ARG_REGISTERS)):
        filled = (masks >> i & 1).astype(bool)
        column: list = [None] * n
        if filled.any():
            rows = np.nonzero(filled)[0]
            data = slots["data"][rows, i]
            size = data.shape[1]
            results = slots["result"][rows, i].tolist()
            addresses = slots["address"][rows, i].tolist()
            zero = data == 0
            has_nul = zero.any(axis=1).tolist()
            first_nul = zero.argmax(axis=1).tolist()
            raw = data.tobytes()
            seen: dict[tuple, FetchedString] = {}  # the same string at the same address: one object
            for j, k in enumerate(rows.tolist()):
                result = results[j]
                if result < 0:
                    column[k] = FetchError(addresses[j], -result)
                    continue
                copied = min(result, size)
                end = first_nul[j] if has_nul[j] and first_nul[j] < copied else -1
                piece = raw[j * size : j * size + (copied if end < 0 else end)]
                key = (piece, addresses[j], end < 0)
                value = seen.get(key)
                if value is None:
                    value = seen[key] = FetchedString(piece.decode("utf-8", "backslashreplace"), addresses[j], end < 0)
                column[k] = value
        columns.append(column)
    return list(zip(*columns)) if n else []


def typed_values(prototype: Prototype, args: list[int] | tuple[int, ...], fetched: Fetched | None) -> dict[str, Any]:
    """``{name: value}`` for the recorded parameters of ``prototype`` (``args``: the six argument
    slots): integers converted to their type, pointers as ints, strings as :class:`FetchedString` or :class:`FetchError` (None when
    the string was not copied)."""
    values: dict[str, Any] = {}
    for i, p in enumerate(prototype.register_params):
        first, n = prototype.slots_of(i)
        if p.type.kind == "string":
            values[p.name] = fetched[first] if fetched is not None else None
        else:  # a 64-bit parameter of 32-bit code takes two stack words, low first
            raw = 0
            for k in range(n):
                raw |= (int(args[first + k]) & 0xFFFFFFFF if n > 1 else int(args[first + k])) << (32 * k)
            values[p.name] = p.type.convert(raw)
    return values


def format_value(prototype_param_kind: str, value: Any) -> str:
    """The text form of a typed value (strace's: strings quoted, ``...`` after a truncated one)."""
    if isinstance(value, FetchedString):
        return json.dumps(str(value), ensure_ascii=False) + ("..." if value.truncated else "")
    if isinstance(value, FetchError):
        return str(value)
    if value is None:
        return "?"
    if prototype_param_kind == "pointer":
        return f"{value:#x}"
    if prototype_param_kind == "bool":
        return "true" if value else "false"
    return str(value)


def json_value(value: Any) -> Any:
    """The JSON form of a typed value: strings as JSON strings, an error as an object."""
    if isinstance(value, FetchedString):
        return str(value)
    if isinstance(value, FetchError):
        return value.as_json()
    return value


class Args(tuple):
    """``regs.args``: the six argument registers (a tuple, as before), and with a prototype its
    parameters by name (``regs.args.path``), typed (see :func:`typed_values`)."""

    _values: dict[str, Any]

    def __new__(cls, raw: tuple[int, ...], values: dict[str, Any] | None = None) -> "Args":
        obj = super().__new__(cls, raw)
        obj._values = values or {}
        return obj

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no parameter named {name!r} (prototype: {list(self._values)})") from None

    def named(self) -> dict[str, Any]:
        """The typed parameters by name (empty without a prototype)."""
        return dict(self._values)
