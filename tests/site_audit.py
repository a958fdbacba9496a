"""An audit of jump verdicts that does not trust djprobe's own index of ways into code.

For every site that ``djprobe sites --all MODULE --boundaries --json --each`` says takes a jump,
check that no known way into the code lies strictly inside the displaced bytes, and that the
displaced bytes begin and end on instruction boundaries:

- direct branch and call targets, and ``lea``-taken code addresses: from GNU objdump's
  disassembly (another decoder);
- instruction boundaries: objdump's;
- symbol starts (``.symtab`` and ``.dynsym``) and code pointers in relocations: read here with
  pyelftools;
- FDE starts: from ``readelf --debug-frame``'s ``pc=`` ranges;
- every case of every jump table djprobe decodes, and the exception landing pads (djprobe's LSDA
  reader: there is no other one at hand).

Run as ``python3 -m tests.site_audit MODULE...``: prints the counts and every violation.
"""

from __future__ import annotations

import bisect
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

_INSN = re.compile(rb"^\s+([0-9a-f]+):\t([^\n]*)$", re.M)
_BRANCH = re.compile(rb"^(?:(?:bnd|notrack|data16|rex\.?\w*|cs|ds)\s+)*(j\w+|call|loop\w*|xbegin)\s+([0-9a-f]+) <")
_RIPREF = re.compile(rb"\[rip[+-]0x[0-9a-f]+\].*#\s*([0-9a-f]+)")
_FDE = re.compile(rb"pc=([0-9a-f]+)\.\.([0-9a-f]+)")


@dataclass
class Ways:
    """Every way into the code found independently, with where it came from."""

    starts: list[int] = field(default_factory=list)  # objdump's instruction starts, sorted
    ends: dict[int, int] = field(default_factory=dict)  # instruction start -> its end
    entries: dict[int, str] = field(default_factory=dict)  # target -> what

    def add(self, target: int, what: str) -> None:
        self.entries.setdefault(target, what)


@dataclass
class AuditResult:
    module: str
    jumps: int = 0
    refused: int = 0
    violations: list[str] = field(default_factory=list)


def _exec_ranges(path: str) -> list[tuple[int, int]]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(s["sh_addr"], s["sh_addr"] + s["sh_size"]) for s in elf.iter_sections()
                if s["sh_flags"] & 0x4 and s["sh_type"] == "SHT_PROGBITS"]


def collect_ways(path: str) -> Ways:
    """The ways into ``path``'s code, from objdump, readelf and pyelftools (file addresses)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    ways = Ways()
    ranges = _exec_ranges(path)

    def in_code(a: int) -> bool:
        return any(lo <= a < hi for lo, hi in ranges)

    out = subprocess.run(["objdump", "-d", "-z", "-w", "-M", "intel", path], check=True, capture_output=True).stdout
    starts = []
    for m in _INSN.finditer(out):
        addr = int(m.group(1), 16)
        raw, _, text = m.group(2).partition(b"\t")
        starts.append(addr)
        ways.ends[addr] = addr + len(raw.split())
        text = text.strip()
        b = _BRANCH.match(text)
        if b is not None:
            ways.add(int(b.group(2), 16), f"objdump: {text.decode(errors='replace')} at {addr:#x}")
            continue
        r = _RIPREF.search(text)
        if r is not None and text.startswith(b"lea"):
            t = int(r.group(1), 16)
            if in_code(t):
                ways.add(t, f"objdump: {text.decode(errors='replace')} at {addr:#x}")
    ways.starts = sorted(set(starts))

    with open(path, "rb") as f:
        elf = ELFFile(f)
        for name in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(name)
            if sec is None:
                continue
            for sym in sec.iter_symbols():
                if sym["st_shndx"] == "SHN_UNDEF" or sym["st_info"]["type"] in ("STT_SECTION", "STT_FILE"):
                    continue
                if in_code(sym["st_value"]):
                    ways.add(sym["st_value"], f"symbol {sym.name}")
        dynsym = elf.get_section_by_name(".dynsym")
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection):
                continue
            symtab = elf.get_section(sec["sh_link"]) if sec["sh_link"] else dynsym
            for rel in sec.iter_relocations():
                addend = rel["r_addend"] if rel.is_RELA() else 0
                value = addend
                if rel["r_info_sym"] and symtab is not None:
                    value = symtab.get_symbol(rel["r_info_sym"])["st_value"] + addend
                if in_code(value):
                    ways.add(value, f"relocation at {rel['r_offset']:#x}")

    frames = subprocess.run(["readelf", "--debug-dump=frames", path], capture_output=True).stdout  # exits 1 on warnings
    for m in _FDE.finditer(frames):
        lo = int(m.group(1), 16)
        if in_code(lo):
            ways.add(lo, "FDE start")
    return ways


def djprobe_facts(path: str, ways: Ways) -> None:
    """Add djprobe's decoded jump-table cases and landing pads (file addresses) to ``ways``."""
    from djprobe.sites import module_index
    from djprobe.symbols import Symbols

    module = Symbols.from_file(path).modules[0]
    idx = module_index(module)
    idx._analyse_tables()
    for tgt, jmp, table in idx._table_targets:
        ways.add(tgt - module.bias, f"case of the table at {table - module.bias:#x} (jmp at {jmp - module.bias:#x})")
    facts = idx.facts
    if facts is not None:
        for lp in facts.landing_pads:
            ways.add(lp, "landing pad")


def each_site(path: str, timeout: float = 1800):
    """The per-site objects of ``djprobe sites --all PATH --boundaries --json --each``."""
    proc = subprocess.run([sys.executable, "-m", "djprobe", "sites", "--all", path, "--boundaries", "--json", "--each"],
                          check=True, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        obj = json.loads(line)
        if "verdict" in obj:
            yield obj


def audit(path: str, sites=None) -> AuditResult:
    """Check every jump verdict of ``path`` against ways into code found independently."""
    ways = collect_ways(path)
    djprobe_facts(path, ways)
    targets = sorted(ways.entries)
    starts = ways.starts
    res = AuditResult(module=path)
    for obj in sites if sites is not None else each_site(path):
        if obj["verdict"] != "jump":
            res.refused += 1
            continue
        res.jumps += 1
        a = int(obj["address"], 16)
        end = a + obj["size"]
        i = bisect.bisect_left(starts, a)
        if i >= len(starts) or starts[i] != a:
            res.violations.append(f"{a:#x}: not an instruction start for objdump")
        last = starts[bisect.bisect_left(starts, end) - 1]
        if ways.ends[last] > end:
            res.violations.append(f"{a:#x}: the {obj['size']} displaced bytes end inside an instruction ({last:#x})")
        k = bisect.bisect_right(targets, a)
        if k < len(targets) and targets[k] < end:
            t = targets[k]
            res.violations.append(f"{a:#x} (+{obj['size']}, {obj['function']}): {ways.entries[t]} enters at {t:#x}")
    return res


def main(argv: list[str]) -> int:
    bad = 0
    for path in argv:
        res = audit(path)
        print(f"{path}: {res.jumps} jump verdicts, {res.refused} refused, {len(res.violations)} violations")
        for v in res.violations:
            print("  " + v)
        bad += len(res.violations)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
