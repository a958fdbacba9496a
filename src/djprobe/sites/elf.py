"""ELF facts the symbol layer does not give: executable sections, ``.eh_frame`` FDE ranges, C++
landing pads (from the LSDAs) and every code pointer the file or the loader puts in memory."""

from __future__ import annotations

import struct

import numpy as np


_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_R_X86_64_64 = 1
_R_X86_64_RELATIVE = 8
_R_X86_64_IRELATIVE = 37
_ET_EXEC = "ET_EXEC"


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    value, end = _uleb(data, pos)  # the same bytes; the last one's bit 6 is the sign
    shift = 7 * (end - pos)
    if data[end - 1] & 0x40:
        value -= 1 << shift
    return value, end


_ENC_FMT = {0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q", 0x00: "<Q"}


class _Image:
    """The file's loadable bytes by virtual address (for .eh_frame and table reads)."""

    def __init__(self, data: bytes, loads: list[tuple[int, int, int, int]], word: int = 8) -> None:
        self.data = data
        self.loads = loads  # (vaddr, memsz, offset, filesz)
        self.absptr = "<Q" if word == 8 else "<I"  # DW_EH_PE_absptr: one machine word

    def read(self, vaddr: int, size: int) -> bytes:
        for va, memsz, off, filesz in self.loads:
            if va <= vaddr < va + memsz:
                start = vaddr - va
                out = self.data[off + start : off + min(start + size, filesz)] if start < filesz else b""
                return out + b"\0" * (size - len(out))
        raise ValueError(f"vaddr {vaddr:#x} not loaded")

    def enc(self, encoding: int, vaddr: int, data: bytes, pos: int, datarel: int = 0) -> tuple[int | None, int]:
        """Read a DW_EH_PE-encoded value at data[pos] (whose vaddr is ``vaddr``)."""
        if encoding == 0xFF:
            return None, pos
        fmt = encoding & 0x0F
        start = pos
        if fmt == 0x01:
            value, pos = _uleb(data, pos)
        elif fmt == 0x09:
            value, pos = _sleb(data, pos)
        else:
            f = self.absptr if fmt == 0x00 else _ENC_FMT.get(fmt)
            if f is None:
                raise ValueError(f"unsupported pointer encoding {encoding:#x}")
            (value,) = struct.unpack_from(f, data, pos)
            pos += struct.calcsize(f)
        app = encoding & 0x70
        if app == 0x10:
            value += vaddr
        elif app == 0x30:
            value += datarel
        del start
        return value & 0xFFFFFFFFFFFFFFFF, pos


class _ElfFacts:
    """Code sections, FDE ranges, landing pads and code pointers of one ELF file (file vaddrs)."""

    def __init__(self, path: str, data: bytes | None = None) -> None:
        from elftools.elf.elffile import ELFFile

        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        import io

        elf = ELFFile(io.BytesIO(data))
        self.is_exec = elf.header["e_type"] == _ET_EXEC
        self.elfclass = elf.elfclass
        #: i386 PIC code addresses data from the GOT (``_GLOBAL_OFFSET_TABLE_``): its file vaddr
        self.got: int | None = None
        loads = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                loads.append((seg["p_vaddr"], seg["p_memsz"], seg["p_offset"], seg["p_filesz"]))
        self.image = _Image(data, loads, 8 if elf.elfclass == 64 else 4)
        self.exec_sections: list[tuple[int, int]] = []
        sections = {}
        for sec in elf.iter_sections():
            sections[sec.name] = sec
            flags = sec["sh_flags"]
            if flags & _SHF_ALLOC and flags & _SHF_EXECINSTR and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
                self.exec_sections.append((sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]))
        self.exec_sections.sort()
        self.fdes: list[tuple[int, int]] = []
        self.landing_pads: list[int] = []
        self.lsda_error: str | None = None
        hdr = sections.get(".eh_frame_hdr")
        eh = sections.get(".eh_frame")
        if eh is not None and eh["sh_size"]:
            try:
                self._parse_eh_frame(eh["sh_addr"], eh["sh_size"], hdr["sh_addr"] if hdr is not None else 0)
            except (ValueError, IndexError, struct.error) as exc:
                # unparsable unwind info: landing pads unknown -> every site refused (see index)
                self.lsda_error = f".eh_frame could not be parsed ({exc})"
        self.pointers = self._code_pointers(elf, sections, data)

    # -- .eh_frame ---------------------------------------------------------------------------

    def _parse_eh_frame(self, base: int, size: int, hdr_vaddr: int) -> None:
        data = self.image.read(base, size)
        cies: dict[int, tuple[int, int | None, bool]] = {}  # offset -> (fde enc, lsda enc, z)
        pos = 0
        lsdas: list[tuple[int, int, int]] = []
        while pos + 4 <= len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            if length == 0:
                break  # terminator
            hdr_len = 4
            if length == 0xFFFFFFFF:
                (length,) = struct.unpack_from("<Q", data, pos + 4)
                hdr_len = 12
            body = pos + hdr_len
            end = body + length
            (cie_id,) = struct.unpack_from("<I", data, body)
            if cie_id == 0:
                cies[pos] = self._parse_cie(data, body + 4, end)
            else:
                cie_off = body - cie_id
                cie = cies.get(cie_off)
                if cie is None:
                    cie = self._parse_cie_at(data, cie_off)
                    cies[cie_off] = cie
                fde_enc, lsda_enc, z = cie
                p = body + 4
                start, p = self.image.enc(fde_enc, base + p, data, p, hdr_vaddr)
                rng, p = self.image.enc(fde_enc & 0x0F, base + p, data, p)
                if start is not None and rng:
                    self.fdes.append((start, start + rng))
                if z:
                    _auglen, p = _uleb(data, p)
                    if lsda_enc is not None:
                        lsda, p = self.image.enc(lsda_enc, base + p, data, p, hdr_vaddr)
                        if lsda and start is not None:
                            lsdas.append((start, start + rng, lsda))
            pos = end
        for fstart, _fend, lsda in lsdas:
            self._parse_lsda(fstart, lsda)

    def _parse_cie_at(self, data: bytes, off: int) -> tuple[int, int | None, bool]:
        (length,) = struct.unpack_from("<I", data, off)
        hdr_len = 4 if length != 0xFFFFFFFF else 12
        if hdr_len == 12:
            (length,) = struct.unpack_from("<Q", data, off + 4)
        body = off + hdr_len
        return self._parse_cie(data, body + 4, body + length)

    def _parse_cie(self, data: bytes, p: int, end: int) -> tuple[int, int | None, bool]:
        version = data[p]
        p += 1
        nul = data.index(b"\0", p)
        aug = data[p:nul].decode("ascii", "replace")
        p = nul + 1
        if "eh" in aug:
            p += 8 if self.elfclass == 64 else 4
        _, p = _uleb(data, p)  # code alignment
        _, p = _sleb(data, p)  # data alignment
        if version == 1:
            p += 1
        else:
            _, p = _uleb(data, p)
        fde_enc = 0x00
        lsda_enc: int | None = None
        z = aug.startswith("z")
        if z:
            _, p = _uleb(data, p)
            for ch in aug[1:]:
                if ch == "L":
                    lsda_enc = data[p]
                    p += 1
                elif ch == "R":
                    fde_enc = data[p]
                    p += 1
                elif ch == "P":
                    penc = data[p]
                    p += 1
                    _, p = self.image.enc(penc & 0x7F, 0, data, p)
                elif ch in "SBG":
                    pass
                else:
                    break  # unknown augmentation: the rest cannot be interpreted
        return fde_enc, lsda_enc, z

    def _parse_lsda(self, func_start: int, lsda: int) -> None:
        data = self.image.read(lsda, 4096)
        p = 0
        lp_enc = data[p]
        p += 1
        lpstart, p = self.image.enc(lp_enc, lsda + p, data, p)
        if lpstart is None:
            lpstart = func_start
        tt_enc = data[p]
        p += 1
        if tt_enc != 0xFF:
            _, p = _uleb(data, p)
        cs_enc = data[p]
        p += 1
        cs_len, p = _uleb(data, p)
        if p + cs_len > len(data):
            data = self.image.read(lsda, p + cs_len + 16)
        end = p + cs_len
        while p < end:
            _start, p = self.image.enc(cs_enc, lsda + p, data, p)
            _len, p = self.image.enc(cs_enc, lsda + p, data, p)
            lp, p = self.image.enc(cs_enc, lsda + p, data, p)
            _, p = _uleb(data, p)
            if lp:
                self.landing_pads.append((lpstart + lp) & 0xFFFFFFFFFFFFFFFF)

    # -- pointers to code ---------------------------------------------------------------------

    def _code_pointers(self, elf, sections: dict, data: bytes) -> np.ndarray:
        """Every value that the dynamic loader, or the file itself, puts in memory as an address."""
        out: list[np.ndarray] = []
        dynsym_values = None
        dynsym = sections.get(".dynsym")
        if dynsym is not None and dynsym["sh_size"]:
            raw = data[dynsym["sh_offset"] : dynsym["sh_offset"] + dynsym["sh_size"]]
            arr = np.frombuffer(raw[: len(raw) // 24 * 24], dtype=np.dtype(
                [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")]
            ))
            dynsym_values = np.where(arr["shndx"] != 0, arr["value"], 0).astype(np.uint64)
        rela_t = np.dtype([("off", "<u8"), ("info", "<u8"), ("add", "<i8")])
        if elf.elfclass == 32:  # REL relocations, 4-byte words: their own reader
            from .elf32 import code_pointers32, got_address

            out.extend(code_pointers32(self, sections, data))
            self.got = got_address(sections)
        for sec in (sections.values() if elf.elfclass == 64 else ()):
            if sec["sh_type"] == "SHT_RELA" and sec["sh_flags"] & _SHF_ALLOC and sec["sh_size"]:
                raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
                r = np.frombuffer(raw[: len(raw) // 24 * 24], dtype=rela_t)
                typ = (r["info"] & 0xFFFFFFFF).astype(np.int64)
                sym = (r["info"] >> np.uint64(32)).astype(np.int64)
                add = r["add"].astype(np.uint64)
                rel = (typ == _R_X86_64_RELATIVE) | (typ == _R_X86_64_IRELATIVE)
                out.append(add[rel])
                if dynsym_values is not None:
                    m = (typ == _R_X86_64_64) & (sym > 0) & (sym < len(dynsym_values))
                    if m.any():
                        vals = dynsym_values[sym[m]]
                        out.append((vals + add[m])[vals != 0])
            elif sec["sh_type"] in ("SHT_RELR", 19) and sec["sh_size"]:
                out.append(self._relr(data, sec))
        if self.is_exec:
            # No relocations tell where addresses are: take every 32-bit value of the file
            # that falls in code (a superset of immediates and pointers).
            for va, memsz, off, filesz in self.image.loads:
                seg = np.frombuffer(data[off : off + filesz], dtype=np.uint8)
                if len(seg) < 4:
                    continue
                words = (
                    seg[:-3].astype(np.uint32)
                    | (seg[1:-2].astype(np.uint32) << 8)
                    | (seg[2:-1].astype(np.uint32) << 16)
                    | (seg[3:].astype(np.uint32) << 24)
                ).astype(np.uint64)
                keep = np.zeros(len(words), dtype=bool)
                for lo, hi in self.exec_sections:
                    keep |= (words >= lo) & (words < hi)
                out.append(words[keep])
        if not out:
            return np.zeros(0, dtype=np.uint64)
        allp = np.unique(np.concatenate(out).astype(np.uint64))
        keep = np.zeros(len(allp), dtype=bool)
        for lo, hi in self.exec_sections:
            keep |= (allp >= lo) & (allp < hi)
        return allp[keep]

    def _relr(self, data: bytes, sec) -> np.ndarray:
        raw = data[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
        vals = []
        where = 0
        for (entry,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8]):
            if not entry & 1:
                where = entry
                vals.append(where)
                where += 8
            else:
                bits = entry >> 1
                for i in range(63):
                    if bits >> i & 1:
                        vals.append(where + i * 8)
                where += 63 * 8
        out = []
        for v in vals:
            try:
                out.append(struct.unpack("<Q", self.image.read(v, 8))[0])
            except ValueError:
                pass
        return np.array(out, dtype=np.uint64)
