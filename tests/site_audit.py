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

With ``--springboards``, each short-jump verdict is checked too: its window as above (2 bytes or
more), and its springboard: within rel8 reach, outside every FDE (readelf) and sized symbol
(pyelftools), no way in at any of its bytes, every byte an objdump nop/int3, the fill before it
entered by no way in and preceded by a ``jmp``, ``ret`` or ``call`` (a final call: counted apart,
as djprobe's judgement that the callee never returns is trusted there).

Run as ``python3 -m tests.site_audit [--springboards] MODULE...``: prints the counts and every
violation.
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
    texts: dict[int, str] = field(default_factory=dict)  # instruction start -> objdump's text
    covered: list[tuple[int, int]] = field(default_factory=list)  # FDE and sized symbol ranges

    def add(self, target: int, what: str) -> None:
        self.entries.setdefault(target, what)


@dataclass
class AuditResult:
    module: str
    jumps: int = 0
    refused: int = 0
    violations: list[str] = field(default_factory=list)
    short: int = 0  # short-jump verdicts (``--springboards``), window and springboard checked
    after_call: int = 0  # of them, springboards after a final call (djprobe's noreturn judgement)


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
        ways.texts[addr] = text.decode(errors="replace")
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
                    if sym["st_size"]:
                        ways.covered.append((sym["st_value"], sym["st_value"] + sym["st_size"]))
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
            ways.covered.append((lo, int(m.group(2), 16)))
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


def each_site(path: str, timeout: float = 1800, springboards: bool = False):
    """The per-site objects of ``djprobe sites --all PATH --boundaries --json --each`` (with
    ``--springboards``: short-jump verdicts too)."""
    proc = subprocess.run([sys.executable, "-m", "djprobe", "sites", "--all", path, "--boundaries", "--json", "--each"]
                          + (["--springboards"] if springboards else []),
                          check=True, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        obj = json.loads(line)
        if "verdict" in obj:
            yield obj


_FILL = re.compile(r"^(?:(?:data16|cs|ds|rex\.?\w*)\s+)*(?:nop|xchg\s+ax,\s*ax|int3)\b")
_ENDS = re.compile(r"^(?:(?:bnd|notrack|rep[a-z]*)\s+)*(jmp|ret|call)\b")


def _springboard_problem(ways: Ways, site: int, sb: int, covered_lo: list[int], reach: list[int]) -> str | None:
    """Why the springboard ``[sb, sb+5)`` of the short jump at ``site`` is not dead padding, or
    None; "call" when it follows a final call (trusting djprobe that the callee never returns)."""
    if not -128 <= sb - (site + 2) <= 127:
        return f"springboard {sb:#x} is beyond the rel8 reach of {site:#x}"
    k = bisect.bisect_left(covered_lo, sb + 5)
    if k and reach[k - 1] > sb:
        return f"springboard {sb:#x} lies in an FDE or a sized symbol"
    targets = ways.entries
    for b in range(sb, sb + 5):
        if b in targets:
            return f"{targets[b]} enters the springboard at {b:#x}"
    starts = ways.starts
    i = bisect.bisect_right(starts, sb) - 1  # the instruction holding sb, then back over the fill
    if i < 0:
        return f"springboard {sb:#x}: no instruction before it"
    last = bisect.bisect_left(starts, sb + 5) - 1
    if ways.ends[starts[last]] < sb + 5 and last + 1 < len(starts):
        last += 1
    for j in range(i, last + 1):
        if not _FILL.match(ways.texts[starts[j]]):
            return f"springboard {sb:#x}: '{ways.texts[starts[j]]}' at {starts[j]:#x} is not padding"
    while i >= 0 and _FILL.match(ways.texts[starts[i]]):
        if starts[i] in targets:
            return f"{targets[starts[i]]} enters the padding at {starts[i]:#x}"
        i -= 1
    if i < 0:
        return f"springboard {sb:#x}: nothing before the padding"
    m = _ENDS.match(ways.texts[starts[i]])
    if m is None:
        return f"springboard {sb:#x}: '{ways.texts[starts[i]]}' at {starts[i]:#x} falls through into the padding"
    return "call" if m.group(1) == "call" else None


def audit(path: str, sites=None, springboards: bool = False) -> AuditResult:
    """Check every jump verdict of ``path`` against ways into code found independently (with
    ``springboards``, every short-jump verdict too: its window, and that its springboard is
    padding after a jmp/ret/call outside every FDE and sized symbol, entered by no way in)."""
    ways = collect_ways(path)
    djprobe_facts(path, ways)
    targets = sorted(ways.entries)
    starts = ways.starts
    covered = sorted(ways.covered)
    covered_lo = [lo for lo, _ in covered]
    reach: list[int] = []
    for _, hi in covered:
        reach.append(max(hi, reach[-1]) if reach else hi)
    res = AuditResult(module=path)
    for obj in sites if sites is not None else each_site(path, springboards=springboards):
        if obj["verdict"] not in ("jump", "short-jump"):
            res.refused += 1
            continue
        a = int(obj["address"], 16)
        if obj["verdict"] == "short-jump":
            res.short += 1
            why = _springboard_problem(ways, a, int(obj["springboard"], 16), covered_lo, reach)
            if why == "call":
                res.after_call += 1
            elif why is not None:
                res.violations.append(f"{a:#x} ({obj['function']}): {why}")
        else:
            res.jumps += 1
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
    springboards = "--springboards" in argv
    for path in [p for p in argv if p != "--springboards"]:
        res = audit(path, springboards=springboards)
        print(f"{path}: {res.jumps} jump verdicts, {res.short} short-jump verdicts ({res.after_call} after a "
              f"final call), {res.refused} refused, {len(res.violations)} violations")
        for v in res.violations:
            print("  " + v)
        bad += len(res.violations)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
