"""Output of return-probe analyses for ``djprobe sites SITE%return``: each exit, its window and
verdict, then the function's verdict (lines under 80 columns)."""

from __future__ import annotations

from ..sites import ExitAnalysis, Verdict


def format_exits(res: ExitAnalysis) -> str:
    """The human form of one function's exit analysis."""
    from .sites import _wrap  # the same line layout as entry sites

    lines = [_wrap(f"{res.site} at {res.address:#x}: {len(res.exits)} exit(s)", "")]
    for e in res.exits:
        kind = e.kind.value.replace("_", " ")
        lines.append(_wrap(f"exit {kind} '{e.insn.text}' at {e.insn.address:#x}:", "  "))
        lines += _window_lines(e.window, "own window")
        for w in e.paths:
            lines += _window_lines(w, f"path window (way into {w.exit_via:#x})")
    verdict = "JUMP" if res.ok else "REFUSED"
    lines.append(_wrap(f"return probe: {verdict}: {res.reason}", "  "))
    return "\n".join(lines)


def _window_lines(w, what: str) -> list[str]:
    from .sites import _insn_line, _wrap

    lines = [f"   {what} at {w.address:#x}:"]
    for ins in w.displaced:
        lines.append(_insn_line(ins.address, ins.raw, ins.text, ""))
    for ins in w.padding:
        lines.append(_insn_line(ins.address, ins.raw, ins.text, "  (padding)"))
    verdict = "JUMP" if w.verdict is Verdict.JUMP else ("BUSY" if w.busy else "REFUSED")
    lines.append(f"    size {w.size}: {verdict}")
    if not w.ok:
        lines.append(_wrap(w.reason, "    "))
    return lines
