"""djprobe.sites.exits: every exit of a function and the window that ends at each."""

from __future__ import annotations

import glob

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from djprobe.errors import InvalidSiteError
from djprobe.sites import JUMP_SIZE, ExitKind, Verdict, analyse_exits, function_exits, module_index, split_return_spec
from djprobe.symbols import Symbols
from djprobe.x86 import Flow
from tests.conftest import TARGETS, compile_c


@pytest.fixture(scope="module")
def syms():
    exe = compile_c([TARGETS / "exits.S", TARGETS / "returns_main.c"], "-O2", name="returns")
    return Symbols.from_file(exe)


def exits_of(syms, name):
    (resolved,) = syms.resolve(f"{syms.modules[0].path}:{name}")
    return analyse_exits(syms, resolved)


def addr(syms, name):
    return syms.modules[0].symbols(name)[0].address


def test_three_rets_two_at_branch_targets(syms):
    res = exits_of(syms, "x_three")
    assert res.ok, res.reason
    assert res.site.endswith("x_three%return")
    f = addr(syms, "x_three")
    assert [(e.kind, e.insn.address - f) for e in res.exits] == [
        (ExitKind.RETURN, 10), (ExitKind.RETURN, 16), (ExitKind.RETURN, 27)
    ]
    # exit 1: [mov eax, 3; ret]; exit 2: its block begins at the branch target 2: (+11), so does
    # its window; exit 3, the last instruction: the ret and the alignment padding after it
    assert [(w.address - f, len(w.displaced), bool(w.padding)) for w in res.windows] == [
        (5, 2, False), (11, 2, False), (27, 1, True)
    ]
    assert res.windows[2].size >= JUMP_SIZE
    for e in res.exits:
        assert e.window.displaced[-1] == e.insn and e.window.exit == e.insn
        assert e.window.address + sum(i.length for i in e.window.displaced) == e.insn.end


def test_tail_calls(syms):
    res = exits_of(syms, "x_tail")
    assert res.ok, res.reason
    (e,) = res.exits
    assert e.kind is ExitKind.TAIL_CALL and e.insn.target == addr(syms, "x_leaf")
    assert (e.window.address, e.window.size, len(e.window.displaced)) == (e.insn.address, 5, 1)
    res = exits_of(syms, "x_itail")
    assert res.ok, res.reason
    (e,) = res.exits
    assert e.kind is ExitKind.INDIRECT_TAIL_CALL and e.insn.text == "jmp rax"
    assert (e.window.address, e.window.size) == (addr(syms, "x_itail") + 5, 9)


def test_ret_imm16_and_self_tail_call(syms):
    res = exits_of(syms, "x_retimm")
    assert res.ok and [e.insn.text for e in res.exits] == ["ret 8"]
    res = exits_of(syms, "x_self")
    assert res.ok, res.reason
    assert [e.kind for e in res.exits] == [ExitKind.RETURN, ExitKind.TAIL_CALL]
    assert res.exits[1].insn.target == addr(syms, "x_self")  # a jump to its own start is a new call


def test_ret_at_end_takes_padding(syms):
    res = exits_of(syms, "x_padded")
    assert res.ok, res.reason
    (e,) = res.exits
    assert e.window.address == e.insn.address and len(e.window.displaced) == 1 and e.window.padding
    assert e.window.size >= JUMP_SIZE


@pytest.mark.parametrize(
    "name, needle",
    [
        ("x_short", "exit 'ret' at {x_short+0xd:#x}"),
        ("x_short", "only 3 byte(s) from a branch target at {x_short+0xb:#x}"),
        ("x_tiny", "only 4 byte(s) from the start of x_tiny"),
    ],
)
def test_refused_as_a_whole_naming_the_exit(syms, name, needle):
    res = exits_of(syms, name)
    assert res.verdict is Verdict.REFUSED
    base = {"x_short": addr(syms, "x_short")}
    needle = needle.replace("{x_short+0xd:#x}", f"{base['x_short'] + 0xd:#x}").replace(
        "{x_short+0xb:#x}", f"{base['x_short'] + 0xb:#x}")
    assert needle in res.reason
    with pytest.raises(InvalidSiteError) as info:
        raise res.error()
    assert needle in str(info.value)


def test_not_a_function_start(syms):
    (resolved,) = syms.resolve(f"{syms.modules[0].path}:x_three+5")
    res = analyse_exits(syms, resolved)
    assert not res.ok and "not the start of x_three" in res.reason


def test_c_functions_recursion_and_longjmp(syms):
    for name in ("rec", "jumper", "one"):
        res = exits_of(syms, name)
        assert res.ok, res.reason
        assert res.exits and all(e.kind is ExitKind.RETURN for e in res.exits)


@pytest.mark.parametrize(
    "spec, want",
    [
        ("libc:malloc%return", ("libc:malloc", True)),
        ("f%return", ("f", True)),
        ("libc:str*%return", ("libc:str*", True)),
        ("f%entry", ("f", False)),
        ("libc:malloc", ("libc:malloc", False)),
    ],
)
def test_split_return_spec(spec, want):
    assert split_return_spec(spec) == want


def test_split_return_spec_rejects_other_suffixes():
    with pytest.raises(InvalidSiteError, match="unknown suffix '%exit'"):
        split_return_spec("f%exit")


def _check_window_rules(idx, exit_analysis):
    """Properties every accepted window must have, whatever the code."""
    spans = []
    for e in exit_analysis.exits:
        for w in e.windows:
            if not w.ok:
                continue
            assert w.exit is not None and w.size >= JUMP_SIZE
            end = w.displaced[-1].end
            assert w.address + sum(i.length for i in w.displaced) == end
            if w.exit_path:  # a path window: it ends with a way into the exit's block
                assert w.exit_path[-1] == w.exit
                last = w.displaced[-1]
                assert last.end == w.exit_via or last.target == w.exit_via
            else:
                assert w.displaced[-1] == e.insn == w.exit
            for a, b in zip(w.displaced, w.displaced[1:]):
                assert a.end == b.address
                assert a.flow not in (Flow.RETURN, Flow.JUMP, Flow.INDIRECT_JUMP, Flow.CALL, Flow.INDIRECT_CALL,
                                      Flow.SYSCALL)
            # no way into the window strictly inside it
            assert idx.entries_between(w.address, end) == []
            spans.append((w.address, w.address + w.size))
    if exit_analysis.ok:
        spans.sort()
        assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))  # windows never overlap


@pytest.mark.parametrize("lib", ["libz.so*", "libc.so.6"])
def test_window_rules_hold_on_real_libraries(lib):
    paths = sorted(glob.glob(f"/usr/lib/x86_64-linux-gnu/{lib}") + glob.glob(f"/lib/x86_64-linux-gnu/{lib}"))
    if not paths:
        pytest.skip(f"no {lib}")
    syms = Symbols.from_file(paths[0])
    module = syms.modules[0]
    idx = module_index(module)
    seen = set()
    checked = 0
    for func in module.functions()[:1500]:
        if func.address in seen or func.size <= 0:
            continue
        seen.add(func.address)
        res = function_exits(module, func, index=idx)
        _check_window_rules(idx, res)
        checked += len(res.exits)
    assert checked > 100


def test_path_windows_catch_a_ret_at_a_branch_target(syms):
    res = exits_of(syms, "x_paths")
    assert res.ok, res.reason
    f = addr(syms, "x_paths")
    (e,) = res.exits
    assert e.insn.address == f + 22 and not e.window.ok and len(e.paths) == 3
    # ending with the js into the ret, with the add falling into it, with the jmp into it
    assert sorted((w.address - f, w.size, w.displaced[-1].text.split()[0]) for w in e.paths) == [
        (5, 6, "js"), (16, 6, "add"), (23, 7, "jmp")
    ]
    for w in e.paths:
        assert w.exit == e.insn and w.exit_path == (e.insn,)
    assert res.windows == list(e.paths)
    assert "3 path window(s)" in res.reason


def test_conditional_tail_call_takes_a_path_window(syms):
    res = exits_of(syms, "x_condtail")
    assert res.ok, res.reason
    jne, ret = res.exits
    assert (jne.kind, jne.insn.text.split()[0], ret.kind) == (ExitKind.TAIL_CALL, "jne", ExitKind.RETURN)
    w = jne.window
    leaf = addr(syms, "x_leaf")
    assert w.displaced[-1] == jne.insn and w.exit_via == leaf
    assert w.exit.flow is Flow.JUMP and w.exit.target == leaf and w.exit_path == (w.exit,)


@given(st.text(alphabet=st.characters(blacklist_characters="%", blacklist_categories=("Cs",)), min_size=1))
def test_split_return_spec_property(spec):
    assume(spec.strip())
    assert split_return_spec(spec + "%return") == (spec.lstrip(), True)
    assert split_return_spec(spec + "%entry") == (spec.lstrip(), False)
    assert split_return_spec(spec) == (spec.strip(), False)


def test_path_window_through_two_blocks(syms):
    res = exits_of(syms, "x_chain")
    assert res.ok, res.reason
    f = addr(syms, "x_chain")
    (e,) = res.exits
    by_end = {w.displaced[-1].text.split()[0]: w for w in e.paths}
    assert sorted((w.address - f, w.size) for w in e.paths) == [(5, 9), (14, 6)]
    # the jle's window copies the block at its target (xor; jmp) and the ret's
    assert [i.text.split()[0] for i in by_end["jle"].exit_path] == ["xor", "jmp", "ret"]
    assert by_end["jle"].exit_via == f + 21 and by_end["add"].exit_via == f + 20


def test_padding_nops_are_not_a_way_in(syms):
    res = exits_of(syms, "x_deadpad")
    assert res.ok, res.reason
    f = addr(syms, "x_deadpad")
    first, second = res.exits
    assert first.window.ok and (first.window.address - f, first.window.size) == (14, 6)
    (w,) = second.paths  # only the jne: the nops before the ret are never run
    assert (w.address - f, w.size, w.displaced[-1].text.split()[0]) == (5, 9, "jne")


def test_tail_call_ending_the_entry_window_acts_at_the_entry(syms):
    res = exits_of(syms, "x_wrap")
    assert res.ok, res.reason
    (e,) = res.exits
    f = addr(syms, "x_wrap")
    assert e.kind is ExitKind.TAIL_CALL and e.insn.address == f + 3
    w = e.window
    assert w.exit_early and (w.address, w.size) == (f, 8) and w.exit == e.insn
    # the same window as an entry probe's: the two share one stub
    from djprobe.sites import analyse_site
    (resolved,) = syms.resolve(f"{syms.modules[0].path}:x_wrap")
    entry = analyse_site(syms, resolved)
    assert (entry.address, entry.size, entry.displaced) == (w.address, w.size, w.displaced)


def test_jump_through_pointers_into_the_function_is_no_tail_call(syms):
    """x_dispatch jumps through a table of code pointers that land inside it: counting that jump
    as a return would count one call twice; the return probe is refused, naming the jump."""
    res = exits_of(syms, "x_dispatch")
    assert res.verdict is Verdict.REFUSED
    assert "jumps through a code pointer" in res.reason and "x_dispatch" in res.reason
