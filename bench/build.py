"""Building the benchmark's C targets (cached by content), and ELF facts about them."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

TARGETS = Path(__file__).parent / "targets"
BUILD_DIR = Path(os.environ.get("DJPROBE_BENCH_BUILD", "/tmp/djprobe-bench-build"))
CFLAGS = ("-O2", "-g0", "-pthread")


def compile_c(sources: list[Path], name: str, *flags: str, inputs: tuple[Path, ...] = ()) -> Path:
    """Compile ``sources`` with gcc into the build directory (cached by the content of the
    sources and of the other ``inputs``, and the flags)."""
    h = hashlib.sha256()
    for src in [*sources, *inputs]:
        h.update(src.read_bytes() + b"\0")
    h.update("\0".join(CFLAGS + flags).encode())
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = BUILD_DIR / f"{name}-{h.hexdigest()[:16]}"
    if not out.exists():
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        cmd = ["gcc", *CFLAGS, *flags, "-o", str(tmp), *map(str, sources)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"gcc failed: {' '.join(cmd)}\n{res.stderr}")
        tmp.rename(out)
    return out


def loop_target() -> Path:
    return compile_c([TARGETS / "loop.c", TARGETS / "work.S"], "loop")


def ptrace_tracer() -> Path:
    return compile_c([TARGETS / "ptrace_count.c"], "ptrace_count")


def many_target(n_functions: int) -> Path:
    """The insertion target: ``n_functions`` distinct small functions (see targets/many.c)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    gen = BUILD_DIR / f"many_funcs_{n_functions}.h"
    lines = [f"#define N_FUNCS {n_functions}"]
    for i in range(n_functions):
        lines.append(
            f"__attribute__((noinline)) long f{i:05d}(long x) {{ return (x ^ {i * 7919 + 1}L) * {2 * i + 3}L + (x >> {i % 13 + 1}); }}"
        )
    lines.append("static long (*const funcs[N_FUNCS])(long) = {")
    lines.extend(f"    f{i:05d}," for i in range(n_functions))
    lines.append("};")
    text = "\n".join(lines) + "\n"
    if not gen.exists() or gen.read_text() != text:
        gen.write_text(text)
    return compile_c([TARGETS / "many.c"], "many", "-include", str(gen), inputs=(gen,))


def symbol(path: Path, name: str) -> tuple[int, int]:
    """(virtual address in the file, file offset) of function ``name`` in the ELF file ``path``."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        found = symtab.get_symbol_by_name(name) if symtab is not None else None
        if not found:
            raise LookupError(f"{path}: no symbol {name}")
        vaddr = found[0]["st_value"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr, vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise LookupError(f"{path}: {name} is not in a loaded segment")


def first_insn_length(path: Path, name: str) -> int:
    """Length of the first instruction of function ``name`` (for the ptrace tracer's step-over)."""
    from iced_x86 import Decoder

    vaddr, offset = symbol(path, name)
    data = path.read_bytes()[offset : offset + 16]
    return Decoder(64, data, ip=vaddr).decode().len
