"""A site-cache file kept as its text plus two arrays, one entry decoded when asked.

Parsing a module's cached verdicts with ``json.loads`` makes a dict of thousands of small
lists and strings (20,000 sites of a whole python3: about 7 MB of small objects) that live
through the whole batch, interleaved with the probes' own objects: once freed they leave the
allocator's pools partly used, and the tracer's resident size keeps them. Here the file's text
stays one string (one allocation, freed in one piece), the entries' keys (file vaddrs) sit in a
sorted array of 64-bit words and their offsets in the text in one of 32-bit words (``array``:
a bisection costs 1 µs there, ``numpy.searchsorted`` on one value 8 µs), and
:meth:`VerdictIndex.get` decodes the one entry asked for.

The file format is that of :mod:`djprobe.sites_cache` (a JSON object: the cache key, then
``"sites"``: file vaddr in hex -> entry list), as its writer lays it out; :func:`parse` returns
None for a text laid out otherwise, and the caller then reads it with ``json.loads``.
"""

from __future__ import annotations

import bisect
import json
import re
from array import array

import numpy as np

__all__ = ["VerdictIndex", "parse"]

# An entry's key where one starts: after "{" or "," (a key inside a reason string has its
# quotes escaped, so it cannot match).
_ENTRY = re.compile(r'[{,]"0x([0-9a-f]+)":\[')
# Entries of other kinds, under a letter before the vaddr (``springboard_cache.py``'s ``s0x...``).
_OTHER = re.compile(r'[{,]"([a-z]+0x[0-9a-f]+)":\[')
_DECODER = json.JSONDecoder()


class VerdictIndex:
    """The entries of one cache file: ``get(vaddr)`` -> the entry list, or None."""

    __slots__ = ("_text", "_keys", "_offsets", "_other")

    def __init__(self, text: str, keys: np.ndarray, offsets: np.ndarray, other: dict[str, int] | None = None) -> None:
        self._text = text
        self._other = other or {}  # key of another kind -> offset of its entry
        self._keys = array("Q", keys.astype(np.uint64).tobytes())
        self._offsets = array("L", offsets.astype(np.uint64 if array("L").itemsize == 8 else np.uint32).tobytes())

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, vaddr: int) -> list | None:
        """The entry of the site at file vaddr ``vaddr`` (decoded now), or None."""
        keys = self._keys
        i = bisect.bisect_left(keys, vaddr)
        if i >= len(keys) or keys[i] != vaddr:
            return None
        entry, _ = _DECODER.raw_decode(self._text, self._offsets[i])
        return entry if isinstance(entry, list) else None

    def get_key(self, key: str) -> list | None:
        """The entry under the text key ``key``: a site's (``0x...``) or another kind's
        (``s0x...``), decoded now, or None."""
        if key.startswith("0x"):
            return self.get(int(key, 16))
        offset = self._other.get(key)
        if offset is None:
            return None
        entry, _ = _DECODER.raw_decode(self._text, offset)
        return entry if isinstance(entry, list) else None


def parse(text: str, key: dict) -> VerdictIndex | None:
    """The index of a cache file's ``text`` written under ``key`` (format, build-id,
    fingerprint); None if the text does not start with that key followed by the sites, or names
    a site twice (a file written otherwise: the caller reads it whole)."""
    head = json.dumps(key, separators=(",", ":"))[:-1] + ',"sites":{'
    if not text.startswith(head) or not text.endswith("}}"):
        return None
    if text[len(head)] == "}":
        return VerdictIndex(text, np.zeros(0, np.uint64), np.zeros(0, np.uint32))
    other = {m.group(1): m.end() - 1 for m in _OTHER.finditer(text, len(head) - 1)}
    matches = _ENTRY.finditer(text, len(head) - 1)
    pairs = np.fromiter(((int(m.group(1), 16), m.end() - 1) for m in matches), dtype=np.dtype((np.uint64, 2)))
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].astype(np.uint32)
    if len(keys) == 0:
        return VerdictIndex(text, keys, offsets, other) if other else None
    order = np.argsort(keys, kind="stable")
    keys, offsets = keys[order], offsets[order]
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        return None  # a key twice: not a file of ours
    return VerdictIndex(text, keys, offsets, other)
