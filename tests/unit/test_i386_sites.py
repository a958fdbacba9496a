"""i386 (32-bit) files: decoding, relocation and site analysis in 32-bit mode.

Real 32-bit code: targets built with ``gcc -m32`` (PIE and non-PIE) and the machine's 32-bit libc,
checked against objdump where a second opinion exists."""

from __future__ import annotations

import bisect
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from djprobe.arch import I386, X86_64
from djprobe.sites import FunctionAnalysis, Verdict, analyse_site, coverage
from djprobe.symbols import Symbols
from djprobe.x86 import Flow, RelocationError, decode, relocate

from ..conftest import TARGETS, compile_c

LIBC32 = next((Path(p) for p in ("/lib/i386-linux-gnu/libc.so.6", "/lib32/libc.so.6") if os.path.exists(p)), None)
_LINE = re.compile(r"^\s+([0-9a-f]+):\t", re.M)

needs_libc32 = pytest.mark.skipif(LIBC32 is None, reason="no 32-bit libc (install libc6-i386 / gcc-multilib)")


def _build(*flags: str) -> Path:
    try:
        return compile_c(TARGETS / "i386.c", "-m32", *flags, name="i386")
    except RuntimeError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {exc}")


@pytest.fixture(scope="module", params=[("-fPIE", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "nopie"])
def target32(request):
    return _build(*request.param)


# -- decoding --------------------------------------------------------------------------------------


def test_module_arch_is_read_from_the_file(target32):
    m = Symbols.from_file(target32).modules[0]
    assert m.arch is I386 and m.arch.bits == 32 and m.arch.word == 4
    assert Symbols.from_file("/bin/sh").modules[0].arch is X86_64


@needs_libc32
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_libc32_whole_text_sweep_agrees_with_objdump():
    from elftools.elf.elffile import ELFFile

    with LIBC32.open("rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        lo, data = text["sh_addr"], text.data()
    ours = [i.address for i in decode(data, lo, 32)]
    out = subprocess.run(["objdump", "-d", "-z", "--no-show-raw-insn", "-j", ".text", str(LIBC32)],
                         check=True, capture_output=True, text=True).stdout
    ref = sorted({int(m.group(1), 16) for m in _LINE.finditer(out)})
    assert len(ours) > 300_000
    if ours != ref:
        k = next(k for k, (x, y) in enumerate(zip(ours + [-1], ref + [-1])) if x != y)
        pytest.fail(f"first disagreement at index {k}: ours {[hex(x) for x in ours[k:k+3]]}, "
                    f"objdump {[hex(x) for x in ref[k:k+3]]}")
    # decoded as 64-bit code, the same bytes give other boundaries: the mode matters
    assert [i.address for i in decode(data[:4096], lo, 64)] != [a for a in ours if a < lo + 4096][: len(ours)]


# -- relocation ------------------------------------------------------------------------------------


def _insns(hexbytes: str, at: int):
    return decode(bytes.fromhex(hexbytes.replace(" ", "")), at, 32)


def test_call_is_relocated_as_push_of_the_original_return_address():
    """`call thunk` at a PIC entry: the thunk must read the original next address."""
    ins = _insns("e8 f7 ff ff ff", 0x8049211)  # call 0x804920d (the thunk)
    rel = relocate(ins, 0x10000000, 0x8049216)
    out = decode(rel.code, rel.address, 32)
    assert [i.text for i in out] == ["push 0x8049216", "jmp 0x804920d"]
    assert rel.return_jump is None  # the thunk returns to the original code after the call
    assert rel.address_map[0x8049216] == 0x8049216


def test_short_jcc_and_esp_operand_relocated_anywhere_in_4gib():
    ins = _insns("78 06 b8 01 00 00 00 8b 44 24 04", 0x08049227)  # js +6; mov eax,1; mov eax,[esp+4]
    for stub in (0x1000, 0x08048000, 0x7FFFF000, 0xF7F00000):  # below, near, 2 GiB away, top
        rel = relocate(ins[:2], stub, 0x0804922E)
        out = decode(rel.code, rel.address, 32)
        assert out[0].flow is Flow.COND_JUMP and out[0].target == 0x0804922F and out[0].length == 6
        assert out[1].raw == bytes.fromhex("b801000000")
        assert out[2].flow is Flow.JUMP and out[2].target == 0x0804922E
    rel = relocate(ins[2:], 0xF0000000, 0x0804922E)
    assert decode(rel.code, rel.address, 32)[0].text == "mov eax,[esp+4]"


def test_call_through_esp_and_mixed_modes_refused():
    ins = _insns("ff 54 24 04", 0x1000)  # call [esp+4]
    with pytest.raises(RelocationError, match="through rsp"):
        relocate(ins, 0x2000, None)
    with pytest.raises(ValueError, match="different modes"):
        relocate([*_insns("90", 0x1000), *decode(b"\x90", 0x1001, 64)], 0x2000, None)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=24), st.integers(0x1000, 0xFFFF0000), st.integers(0x1000, 0xFFFF0000))
def test_relocation_preserves_every_decodable_32bit_instruction(code, at, stub):
    """Whatever 32-bit instruction relocates, its copy decodes as the same instruction, or as a
    branch to the same absolute target (in the 4 GiB space), and the relocator's own check holds."""
    insns = []
    for i in decode(code, at, 32):
        if i.flow is Flow.INVALID:
            break
        insns.append(i)
    if not insns or insns[-1].end > at + len(code):
        return
    try:
        rel = relocate(insns, stub, (at + 64) & 0xFFFFFFFF)
    except RelocationError:
        return
    out = {i.address: i for i in decode(rel.code, rel.address, 32)}
    for i in insns:
        new = out[rel.address_map[i.address]]
        if i.flow in (Flow.JUMP, Flow.COND_JUMP) and i.target is not None and not (at <= i.target < insns[-1].end):
            assert new.instruction.mnemonic == i.instruction.mnemonic
            if new.target != i.target & 0xFFFFFFFF:  # loop/jecxz: through a jmp rel32 in the copy
                assert out[new.target].flow is Flow.JUMP and out[new.target].target == i.target & 0xFFFFFFFF
        elif i.flow is Flow.NEXT:
            assert new.raw == i.raw


# -- site analysis ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, first", [
    ("thunk_entry", "call"), ("jcc_entry", "js short"), ("esp_entry", "mov eax,[esp+4]"), ("wide", "mov eax,[esp+4]"),
])
def test_entries_of_the_32bit_target_take_a_jump(target32, name, first):
    syms = Symbols.from_file(target32)
    (site,) = syms.resolve(name)
    res = analyse_site(syms, site)
    assert res.verdict is Verdict.JUMP, res.reason
    assert res.displaced[0].text.startswith(first) and res.displaced[0].bits == 32
    assert res.flags_dead is (name != "jcc_entry")  # js reads the caller's flags: they stay live
    rel = res.relocate_to(0xF7000000, res.address + res.size)
    out = decode(rel.code, rel.address, 32)
    if name == "thunk_entry":
        thunk = syms.resolve("djp_get_pc_thunk_cx")[0].address
        assert [i.text for i in out] == [f"push {res.address + 5:#x}", f"jmp {thunk:#x}"]


def test_gotoff_taken_address_is_an_entry(build_c):
    """PIC i386 code takes a label's address as GOT + disp32 (`lea reg,[ebx+L@GOTOFF]`): a label
    inside a function's first bytes is then an entry and the site is refused."""
    src = r"""
    __asm__(".text\n.globl f\n.type f,@function\nf:\n"
            "  call g_thunk\n  addl $_GLOBAL_OFFSET_TABLE_, %ecx\n"
            "  leal inner@GOTOFF(%ecx), %eax\n  ret\n"
            ".size f,.-f\n.globl h\n.type h,@function\nh:\n  nop\ninner:\n  movl $1, %eax\n  movl $2, %edx\n  ret\n.size h,.-h\n"
            "g_thunk:\n  movl (%esp), %ecx\n  ret\n");
    int f(void); int h(void);
    int main(void) { return f() ? h() : 0; }
    """
    path = build_c(src, "-m32", "-fPIE", "-pie", name="gotoff32")
    syms = Symbols.from_file(path)
    res = analyse_site(syms, syms.resolve("h")[0])
    assert res.verdict is Verdict.REFUSED and "taken" in res.reason, res.reason


@needs_libc32
def test_libc32_entry_coverage_and_no_jump_over_a_branch_target():
    """Coverage of the 32-bit libc's function entries, and the differential check of the 64-bit
    analysis: no entry that takes a jump displaces bytes an objdump-decoded direct branch lands in."""
    m = Symbols.from_file(LIBC32).modules[0]
    assert m.arch is I386
    rep = coverage(m)
    print(f"\n{LIBC32}: {rep.entries_jump}/{rep.entries} entries take a jump ({100 * rep.entry_ratio:.2f}%) "
          f"in {rep.seconds:.1f} s; refused: {dict(rep.refused)}")
    assert rep.entries > 3000 and rep.entry_ratio >= 0.97  # 97.26% (96.55% before the i386 filler, 94.8% before PIC tables)
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(LIBC32)], capture_output=True, text=True).stdout
    targets = set()
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith(("j", "call", "loop")):
            op = parts[2].split()[0] if parts[2].split() else ""
            try:
                targets.add(int(op, 16))
            except ValueError:
                pass
    tl = sorted(targets)
    bad, checked = [], 0
    for f in m.functions():
        res = FunctionAnalysis(m, f).analyse(f.address)
        if res.verdict is Verdict.JUMP:
            checked += 1
            i = bisect.bisect_right(tl, f.address)
            if i < len(tl) and tl[i] < res.displaced[-1].end:
                bad.append((hex(f.address), hex(tl[i])))
    assert checked > 3000 and not bad[:10]
